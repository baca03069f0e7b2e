"""A tiny DER (ITU-T X.690) writer and reader.

cryptography has no builder for subjectDirectoryAttributes (RFC 5280
4.2.1.8), so the EK CA (broker/vtpm_ca.py) writes and reads that
extension's value with this: single-byte tags, definite lengths (of at most
4 length bytes), non-negative INTEGERs and OBJECT IDENTIFIERs. Anything the
reader cannot take is a `DerError` with a short message ("truncated DER",
"bad DER length", ...) the caller puts in context.
"""

from __future__ import annotations

__all__ = [
    "INTEGER",
    "OID",
    "SEQUENCE",
    "SET",
    "UTF8_STRING",
    "DerError",
    "DerTagError",
    "encode",
    "encode_integer",
    "encode_oid",
    "expect",
    "read",
    "read_items",
]

SEQUENCE, SET, OID, UTF8_STRING, INTEGER = 0x30, 0x31, 0x06, 0x0C, 0x02

# Length bytes the reader takes after 0x80|n: lengths up to 4 GiB, far more
# than any certificate extension.
_MAX_LENGTH_BYTES = 4


class DerError(ValueError):
    """Bytes that are not the DER the reader was asked for (or a value the
    writer cannot encode)."""


class DerTagError(DerError):
    """Well-formed DER, but not the one TLV with the tag `expect` was given."""


# --- Writing -------------------------------------------------------------------------


def encode(tag: int, content: bytes) -> bytes:
    """One TLV: `tag`, the definite length of `content` in its shortest form, `content`."""
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def encode_integer(value: int) -> bytes:
    """A non-negative INTEGER in its minimal two's-complement form."""
    if value < 0:
        raise DerError("negative INTEGER")
    return encode(INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def encode_oid(dotted: str) -> bytes:
    """An OBJECT IDENTIFIER from its dotted form ("2.23.133.2.16")."""
    try:
        arcs = [int(a) for a in dotted.split(".")]
    except ValueError:
        raise DerError(f"not an OID: {dotted!r}") from None
    if len(arcs) < 2 or min(arcs) < 0 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] > 39):
        raise DerError(f"not an OID: {dotted!r}")
    out = bytearray()
    for arc in [arcs[0] * 40 + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return encode(OID, bytes(out))


# --- Reading -------------------------------------------------------------------------


def read(data: bytes, pos: int = 0) -> tuple[int, bytes, int]:
    """(tag, content, next position) of the TLV at `pos`."""
    if pos + 2 > len(data):
        raise DerError("truncated DER")
    tag, first = data[pos], data[pos + 1]
    pos += 2
    if first & 0x80:
        count = first & 0x7F
        if count == 0 or count > _MAX_LENGTH_BYTES or pos + count > len(data):
            raise DerError("bad DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    else:
        length = first
    if pos + length > len(data):
        raise DerError("truncated DER")
    return tag, data[pos : pos + length], pos + length


def read_items(content: bytes) -> list[tuple[int, bytes]]:
    """The (tag, content) of each TLV that `content` is made of, in order."""
    items, pos = [], 0
    while pos < len(content):
        tag, value, pos = read(content, pos)
        items.append((tag, value))
    return items


def expect(data: bytes, tag: int) -> bytes:
    """The content of `data`, which must be exactly one TLV with `tag`: a
    DerError if it is not DER, a DerTagError if it is another tag or more
    than one TLV."""
    found, content, end = read(data)
    if found != tag:
        raise DerTagError(f"DER tag 0x{found:02x} where 0x{tag:02x} was expected")
    if end != len(data):
        raise DerTagError("trailing bytes after DER")
    return content
