"""Strict TTLV codec (KMIP 1.4 section 9.1, KMIP 2.0 section 9.1).

A message decodes into a tree of `Item`s: tag, type and value, with no
knowledge of operations. The operation layer reads the fields it needs by
tag. Tag and enumeration numbers come from PyKMIP's `kmip.core.enums`.

PyKMIP's message classes are not used for decoding because they cannot carry
what real clients send (vCenter's AddAttribute with custom `x-` attributes,
2.0 Attributes structures, vendor extensions). A generic tree keeps every
field, and this decoder is strict where PyKMIP's is lenient: every length,
padding byte, boolean value, nesting depth and trailing byte is checked, and
any violation raises `TTLVError`, never another exception.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kmip.core.enums import Tags

HEADER_SIZE = 8
DEFAULT_MAX_DEPTH = 32


class ItemType(enum.IntEnum):
    STRUCTURE = 0x01
    INTEGER = 0x02
    LONG_INTEGER = 0x03
    BIG_INTEGER = 0x04
    ENUMERATION = 0x05
    BOOLEAN = 0x06
    TEXT_STRING = 0x07
    BYTE_STRING = 0x08
    DATE_TIME = 0x09
    INTERVAL = 0x0A
    DATE_TIME_EXTENDED = 0x0B


class TTLVError(ValueError):
    """The bytes are not a well-formed TTLV encoding."""


_FIXED_LENGTH = {
    ItemType.INTEGER: 4,
    ItemType.LONG_INTEGER: 8,
    ItemType.ENUMERATION: 4,
    ItemType.BOOLEAN: 8,
    ItemType.DATE_TIME: 8,
    ItemType.INTERVAL: 4,
    ItemType.DATE_TIME_EXTENDED: 8,
}


@dataclass(frozen=True, slots=True, init=False)
class Item:
    """One TTLV item. `value` is a tuple of Items for a structure, int for
    the integer kinds, enumerations, date-times (seconds since the epoch) and
    intervals, bool, str or bytes."""

    tag: int
    type: ItemType
    value: Any

    def __init__(self, tag: int, type: ItemType, value: Any) -> None:
        # Set through the slots themselves: a frozen dataclass's own
        # __init__ goes through object.__setattr__ for each field, 0.5 us
        # an item where this costs 0.3, and a request makes dozens of items
        # (issue 15). Frozen all the same: assigning raises.
        _SET_TAG(self, tag)
        _SET_TYPE(self, type)
        _SET_VALUE(self, value)

    # Navigation helpers for structures.
    def children(self) -> tuple[Item, ...]:
        if self.type != ItemType.STRUCTURE:
            return ()
        return self.value

    def find(self, tag: int) -> Item | None:
        for child in self.children():
            if child.tag == tag:
                return child
        return None

    def find_all(self, tag: int) -> list[Item]:
        return [c for c in self.children() if c.tag == tag]

    def get(self, tag: int, default: Any = None) -> Any:
        item = self.find(tag)
        return default if item is None else item.value

    def retag(self, tag: int) -> Item:
        # Items are immutable: one that has the tag already is its own copy.
        return self if tag == self.tag else Item(tag, self.type, self.value)

    def __repr__(self) -> str:  # Short form that never prints key bytes.
        name = tag_name(self.tag)
        if self.type == ItemType.STRUCTURE:
            return f"<{name} [{len(self.value)} items]>"
        if self.type == ItemType.BYTE_STRING:
            return f"<{name} bytes[{len(self.value)}]>"
        return f"<{name} {self.type.name} {self.value!r}>"


# The slots' own setters (member descriptors), for Item.__init__.
_SET_TAG, _SET_TYPE, _SET_VALUE = (vars(Item)[name].__set__ for name in ("tag", "type", "value"))


class _TagNumbers:
    """Every tag's number as a plain attribute: ``TAG.BATCH_ITEM`` is
    ``Tags.BATCH_ITEM.value``. The enum's ``value`` is a property (two
    Python calls, ~0.17 us) and the request path reads some sixty tags per
    request (issue 15); an attribute of this object costs a dict lookup."""

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> int: ...


TAG = _TagNumbers()
TAG.__dict__.update({t.name: t.value for t in Tags})


def tag_name(tag: int) -> str:
    try:
        return Tags(tag).name
    except ValueError:
        return f"0x{tag:06X}"


# Constructors used by the operation layer.
def structure(tag: int, items: Iterable[Item | None]) -> Item:
    return Item(tag, ItemType.STRUCTURE, tuple(i for i in items if i is not None))


def integer(tag: int, value: int) -> Item:
    return Item(tag, ItemType.INTEGER, int(value))


def long_integer(tag: int, value: int) -> Item:
    return Item(tag, ItemType.LONG_INTEGER, int(value))


def big_integer(tag: int, value: int) -> Item:
    return Item(tag, ItemType.BIG_INTEGER, int(value))


def enumeration(tag: int, value: int) -> Item:
    return Item(tag, ItemType.ENUMERATION, int(value))


def boolean(tag: int, value: bool) -> Item:
    return Item(tag, ItemType.BOOLEAN, bool(value))


def text(tag: int, value: str) -> Item:
    return Item(tag, ItemType.TEXT_STRING, value)


def byte_string(tag: int, value: bytes) -> Item:
    return Item(tag, ItemType.BYTE_STRING, bytes(value))


def date_time(tag: int, value: int) -> Item:
    return Item(tag, ItemType.DATE_TIME, int(value))


def interval(tag: int, value: int) -> Item:
    return Item(tag, ItemType.INTERVAL, int(value))


# Decoding.
def _padded(length: int) -> int:
    return (length + 7) // 8 * 8


# The header as two big-endian words: tag and type, then the length.
_HEADER = struct.Struct(">II")
_ZEROS = bytes(8)
_STRUCTURE, _INTEGER = ItemType.STRUCTURE, ItemType.INTEGER
_BOOLEAN, _TEXT, _BIG = ItemType.BOOLEAN, ItemType.TEXT_STRING, ItemType.BIG_INTEGER
# Item types by their number (the header's low byte).
_TYPE_BY_NUMBER: list[ItemType | None] = [None] * 256
for _t in ItemType:
    _TYPE_BY_NUMBER[_t.value] = _t


def read_header(data: bytes) -> tuple[int, ItemType, int]:
    """Parse the 8-byte item header: tag, type and declared length."""
    if len(data) < HEADER_SIZE:
        raise TTLVError("truncated item header")
    word, length = _HEADER.unpack_from(data)
    item_type = _TYPE_BY_NUMBER[word & 0xFF]
    if item_type is None:
        raise TTLVError(f"unknown item type 0x{word & 0xFF:02X}")
    return word >> 8, item_type, length


# A 4-byte value and its 4 bytes of padding, read at once; 8-byte values.
_SIGNED_4_PADDED = struct.Struct(">iI")
_UNSIGNED_4_PADDED = struct.Struct(">II")
_SIGNED_8 = struct.Struct(">q")
_UNSIGNED_8 = struct.Struct(">Q")


def _decode_at(buf: bytes, pos: int, end: int, depth: int, max_depth: int) -> tuple[Item, int]:
    # The hot path of every request (issue 15): the header is read in place
    # with one struct call, and the checks are those of read_header, in its
    # order: length of the header, type, tag, fixed lengths, overrun, padding.
    # Fixed-length values are read with their padding in one struct call.
    if end - pos < HEADER_SIZE:
        raise TTLVError("truncated item header")
    word, length = _HEADER.unpack_from(buf, pos)
    item_type = _TYPE_BY_NUMBER[word & 0xFF]
    if item_type is None:
        raise TTLVError(f"unknown item type 0x{word & 0xFF:02X}")
    tag = word >> 8
    pos += HEADER_SIZE
    if tag >> 16 not in (0x42, 0x54):
        raise TTLVError(f"invalid tag 0x{tag:06X}")
    value: int | bool | str | bytes
    if item_type is _STRUCTURE or item_type is _TEXT or item_type is ItemType.BYTE_STRING or item_type is _BIG:
        padded = (length + 7) & ~7
        if padded > end - pos:
            raise TTLVError(f"item {tag_name(tag)} overruns its container")
        value_end = pos + length
        next_pos = pos + padded
        if padded != length and buf[value_end:next_pos] != _ZEROS[: padded - length]:
            raise TTLVError(f"non-zero padding after {tag_name(tag)}")
        if item_type is _STRUCTURE:
            if length % 8:
                raise TTLVError("structure length is not a multiple of 8")
            if depth >= max_depth:
                raise TTLVError(f"nesting deeper than {max_depth} levels")
            children = []
            child_pos = pos
            while child_pos < value_end:
                child, child_pos = _decode_at(buf, child_pos, value_end, depth + 1, max_depth)
                children.append(child)
            return Item(tag, item_type, tuple(children)), next_pos
        if item_type is _TEXT:
            try:
                value = buf[pos:value_end].decode("utf-8")
            except UnicodeDecodeError:
                raise TTLVError(f"text string {tag_name(tag)} is not valid UTF-8") from None
        elif item_type is _BIG:
            if length == 0 or length % 8:
                raise TTLVError("big integer length is not a positive multiple of 8")
            value = int.from_bytes(buf[pos:value_end], "big", signed=True)
        else:  # BYTE_STRING
            value = buf[pos:value_end]
        return Item(tag, item_type, value), next_pos
    # Fixed lengths: 4 bytes (and 4 of padding) or 8.
    fixed = _FIXED_LENGTH[item_type]
    if length != fixed:
        raise TTLVError(f"{item_type.name} of length {length} (must be {fixed})")
    if end - pos < 8:
        raise TTLVError(f"item {tag_name(tag)} overruns its container")
    if fixed == 4:
        value, padding = (_SIGNED_4_PADDED if item_type is _INTEGER else _UNSIGNED_4_PADDED).unpack_from(buf, pos)
        if padding:
            raise TTLVError(f"non-zero padding after {tag_name(tag)}")
    elif item_type is _BOOLEAN:
        number = _UNSIGNED_8.unpack_from(buf, pos)[0]
        if number not in (0, 1):
            raise TTLVError("boolean value is neither 0 nor 1")
        value = bool(number)
    else:  # the 8-byte integer kinds
        value = _SIGNED_8.unpack_from(buf, pos)[0]
    return Item(tag, item_type, value), pos + 8


def decode(data: bytes, max_depth: int = DEFAULT_MAX_DEPTH) -> Item:
    """Decode exactly one item; trailing bytes are an error."""
    buf = bytes(data)
    try:
        item, pos = _decode_at(buf, 0, len(buf), 0, max_depth)
    except TTLVError:
        raise
    except (ValueError, IndexError, OverflowError) as exc:  # Defensive: never escape.
        raise TTLVError(f"malformed TTLV: {exc}") from None
    if pos != len(buf):
        raise TTLVError(f"{len(buf) - pos} trailing bytes after the message")
    return item


# Encoding.
_TRUE, _FALSE = struct.pack(">Q", 1), struct.pack(">Q", 0)


def _encode_value(item: Item) -> bytes:
    """The value of an item `_encode_into` does not pack whole: a text or
    byte string, a boolean or a big integer."""
    t, v = item.type, item.value
    if t == _TEXT:
        return v.encode("utf-8")
    if t == ItemType.BYTE_STRING:
        return bytes(v)
    if t == _BOOLEAN:
        return _TRUE if v else _FALSE
    if t == _BIG:
        size = max(1, (v.bit_length() + 8) // 8)
        size = _padded(size)
        return v.to_bytes(size, "big", signed=True)
    raise TTLVError(f"cannot encode type {t!r}")


# Fixed-length items whole (header, value, padding) in one struct call.
_PACK_FIXED = {
    ItemType.INTEGER: struct.Struct(">IIi4x").pack,
    ItemType.ENUMERATION: struct.Struct(">III4x").pack,
    ItemType.INTERVAL: struct.Struct(">III4x").pack,
    ItemType.LONG_INTEGER: struct.Struct(">IIq").pack,
    ItemType.DATE_TIME: struct.Struct(">IIq").pack,
    ItemType.DATE_TIME_EXTENDED: struct.Struct(">IIq").pack,
}


def _encode_into(item: Item, out: list[bytes]) -> int:
    """Append `item`'s encoding to `out` in parts; its length. A
    structure's header is filled in once its items are: the message is
    joined once (`encode`), not once per level (issue 15)."""
    t, tag = item.type, item.tag
    try:
        if t == _STRUCTURE:
            index = len(out)
            out.append(b"")
            length = 0
            for child in item.value:
                length += _encode_into(child, out)
            out[index] = _HEADER.pack(tag << 8 | t, length)
            return HEADER_SIZE + length
        pack = _PACK_FIXED.get(t)
        if pack is not None:
            out.append(pack(tag << 8 | t, _FIXED_LENGTH[t], item.value))
            return 16
        value = _encode_value(item)
        length = len(value)
        out.append(_HEADER.pack(tag << 8 | t, length))
    except struct.error as exc:
        raise TTLVError(f"value out of range for {tag_name(tag)}: {exc}") from None
    out.append(value)
    if length & 7:
        out.append(_ZEROS[: 8 - (length & 7)])
        return HEADER_SIZE + _padded(length)
    return HEADER_SIZE + length


def encode(item: Item) -> bytes:
    out: list[bytes] = []
    _encode_into(item, out)
    return b"".join(out)


def walk(item: Item) -> Iterator[Item]:
    yield item
    for child in item.children():
        yield from walk(child)
