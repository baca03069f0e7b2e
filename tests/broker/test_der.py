"""Unit tests of broker.der, the DER writer and reader of the EK CA: what it
writes against bytes written out by hand from X.690, what it reads back, and
that every malformed input is a DerError."""

from __future__ import annotations

import pytest

from broker import der
from broker.der import DerError, DerTagError


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        (0, "020100"),
        (127, "02017f"),
        (128, "02020080"),  # a leading 00 keeps it positive
        (255, "020200ff"),
        (256, "02020100"),
        (2**31 - 1, "02047fffffff"),
    ],
)
def test_integers_are_minimal_twos_complement(value, encoded):
    assert der.encode_integer(value).hex() == encoded
    tag, content, end = der.read(bytes.fromhex(encoded))
    assert (tag, int.from_bytes(content, "big", signed=True), end) == (der.INTEGER, value, len(encoded) // 2)


def test_oid_arcs_are_base_128():
    # tcg-at-tpmSpecification: 2.23 -> 2*40+23 = 103 = 0x67; 133 -> 81 05.
    assert der.encode_oid("2.23.133.2.16").hex() == "06056781050210"
    assert der.encode_oid("2.5.29.9").hex() == "0603551d09"
    assert der.encode_oid("1.2.840.113549").hex() == "06062a864886f70d"


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 70000])
def test_round_trip_in_short_and_long_length_forms(size):
    content = bytes(i % 251 for i in range(size))
    encoded = der.encode(der.SEQUENCE, content)
    length_bytes = 0 if size < 128 else (size.bit_length() + 7) // 8
    assert len(encoded) == 2 + length_bytes + size  # the shortest length form
    assert der.read(encoded) == (der.SEQUENCE, content, len(encoded))
    assert der.expect(encoded, der.SEQUENCE) == content


def test_nested_items_read_back_in_order():
    inner = der.encode(der.UTF8_STRING, b"2.0") + der.encode_integer(0) + der.encode_integer(164)
    outer = der.encode(der.SEQUENCE, der.encode(der.SEQUENCE, inner) + der.encode(der.SET, b""))
    (first, second) = der.read_items(der.expect(outer, der.SEQUENCE))
    assert first == (der.SEQUENCE, inner) and second == (der.SET, b"")
    assert der.read_items(inner) == [(der.UTF8_STRING, b"2.0"), (der.INTEGER, b"\x00"), (der.INTEGER, b"\x00\xa4")]
    # Reading from a position: the second TLV of the concatenation.
    two = der.encode_integer(1) + der.encode_integer(2)
    assert der.read(two, 3) == (der.INTEGER, b"\x02", 6)


@pytest.mark.parametrize(
    "data",
    [
        "",  # nothing
        "30",  # a tag and no length
        "3005020100",  # content shorter than the length says
        "3081",  # long form, its length byte missing
        "308200",  # long form, one of its two length bytes missing
        "30820100" + "00" * 255,  # 256 bytes said, 255 there
    ],
)
def test_truncated_input_is_refused(data):
    with pytest.raises(DerError, match="truncated DER|bad DER length"):
        der.read(bytes.fromhex(data))
    with pytest.raises(DerError):
        der.expect(bytes.fromhex(data), der.SEQUENCE)


def test_truncation_inside_a_list_of_items_is_refused():
    with pytest.raises(DerError, match="truncated DER"):
        der.read_items(der.encode_integer(5) + bytes.fromhex("0203"))


@pytest.mark.parametrize(
    "data",
    [
        "3085" + "0000000001" + "00",  # five length bytes: more than the reader takes
        "30ff" + "00" * 127,  # 127 length bytes
        "3080" + "0000",  # indefinite length (BER, not DER)
    ],
)
def test_overlong_length_fields_are_refused(data):
    with pytest.raises(DerError, match="bad DER length"):
        der.read(bytes.fromhex(data))


def test_a_length_beyond_the_input_is_refused():
    # Four length bytes saying 4 GiB - 1 over three bytes of content.
    with pytest.raises(DerError, match="truncated DER"):
        der.read(bytes.fromhex("3084ffffffff") + b"abc")


def test_wrong_tag_and_trailing_bytes_are_refused():
    sequence = der.encode(der.SEQUENCE, der.encode_integer(1))
    with pytest.raises(DerTagError, match="DER tag 0x30 where 0x31 was expected"):
        der.expect(sequence, der.SET)
    with pytest.raises(DerTagError, match="trailing bytes"):
        der.expect(sequence + b"\x00", der.SEQUENCE)
    assert issubclass(DerTagError, DerError)


def test_what_the_writer_cannot_encode_is_refused():
    with pytest.raises(DerError, match="negative INTEGER"):
        der.encode_integer(-1)
    for bad in ("", "1", "1.x.3", "3.1", "1.40", "1.-2"):
        with pytest.raises(DerError, match="not an OID"):
            der.encode_oid(bad)
