"""Tests for kmip_core.ttlv, the strict TTLV codec.

Known answers are the encoding examples of KMIP 1.4 section 9.1.2. The
malformed inputs live in tests/fixtures/malformed/ as hex, one message per
file, so the same bytes can be replayed against a running server.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kmip_core import ttlv
from kmip_core.ttlv import Item, ItemType, TTLVError

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "malformed"


def load_fixture(path: Path) -> bytes:
    lines = path.read_text().splitlines()
    assert lines and lines[0].startswith("# "), (
        f"{path.name} must start with a '# what is wrong' line"
    )
    return bytes.fromhex(
        "".join(line.strip() for line in lines[1:] if not line.startswith("#"))
    )


# Each fixture and the reason the codec must give; None for inputs that are
# well-formed TTLV and wrong only as KMIP (the dispatcher refuses those).
MALFORMED = {
    "wrong_type_byte": "unknown item type 0x0C",
    "length_overflow": "overruns",
    "nonzero_padding": "non-zero padding",
    "truncated_header_only": "overruns",
    "truncated_mid_item": "overruns",
    "deep_nesting": "nesting deeper",
    "trailing_bytes": "trailing bytes",
    "integer_length_8": "INTEGER of length 8",
    "boolean_value_2": "boolean",
    "invalid_utf8": "UTF-8",
    "structure_length_not_multiple_of_8": "multiple of 8",
    "tag_outside_kmip_ranges": "invalid tag",
    "unknown_operation": None,
    "batch_count_mismatch": None,
    "missing_request_payload": None,
    "response_message_as_request": None,
}


def test_every_fixture_has_an_expectation():
    """A new fixture file without an entry here would silently go untested."""
    on_disk = {p.stem for p in FIXTURES.glob("*.hex")}
    assert on_disk == set(MALFORMED)


@pytest.mark.parametrize(
    "name", [n for n, reason in MALFORMED.items() if reason is not None]
)
def test_malformed_fixture_raises_ttlv_error(name):
    data = load_fixture(FIXTURES / f"{name}.hex")
    with pytest.raises(TTLVError, match=MALFORMED[name]):
        ttlv.decode(data)


@pytest.mark.parametrize(
    "name", [n for n, reason in MALFORMED.items() if reason is None]
)
def test_well_formed_fixture_decodes(name):
    data = load_fixture(FIXTURES / f"{name}.hex")
    item = ttlv.decode(data)
    assert item.type == ItemType.STRUCTURE
    assert ttlv.encode(item) == data


def test_truncated_header_is_refused_by_read_header():
    with pytest.raises(TTLVError, match="truncated"):
        ttlv.read_header(b"\x42\x00\x78\x01\x00\x00")


@pytest.mark.parametrize("cut", range(16))
def test_every_truncation_of_a_message_raises_ttlv_error(cut):
    data = load_fixture(FIXTURES / "unknown_operation.hex")
    with pytest.raises(TTLVError):
        ttlv.decode(data[:cut])


def test_nesting_limit_is_configurable():
    data = load_fixture(FIXTURES / "deep_nesting.hex")
    assert ttlv.decode(data, max_depth=100).type == ItemType.STRUCTURE
    with pytest.raises(TTLVError, match="nesting deeper than 99"):
        ttlv.decode(data, max_depth=99)


# Known answers: KMIP 1.4, 9.1.2.
KNOWN = [
    (ttlv.integer(0x420020, 8), "42002002000000040000000800000000"),
    (
        ttlv.long_integer(0x420020, 123456789000000000),
        "420020030000000801B69B4BA5749200",
    ),
    (
        ttlv.big_integer(0x420020, 1234567890000000000000000000),
        "42002004000000100000000003FD35EB6BC2DF4618080000",
    ),
    (ttlv.enumeration(0x420020, 255), "4200200500000004000000FF00000000"),
    (ttlv.boolean(0x420020, True), "42002006000000080000000000000001"),
    (
        ttlv.text(0x420020, "Hello World"),
        "420020070000000B48656C6C6F20576F726C640000000000",
    ),
    (ttlv.byte_string(0x420020, b"\x01\x02\x03"), "42002008000000030102030000000000"),
    (ttlv.date_time(0x420020, 0x47DA67F8), "42002009000000080000000047DA67F8"),
    (ttlv.interval(0x420020, 864000), "4200200A00000004000D2F0000000000"),
    (
        ttlv.structure(
            0x420020, [ttlv.enumeration(0x420004, 254), ttlv.integer(0x420005, 255)]
        ),
        "42002001000000204200040500000004000000FE000000004200050200000004000000FF00000000",
    ),
]


@pytest.mark.parametrize(
    "item,hexdata", KNOWN, ids=lambda x: x.type.name if isinstance(x, Item) else ""
)
def test_known_answer_encoding(item, hexdata):
    assert ttlv.encode(item) == bytes.fromhex(hexdata)
    assert ttlv.decode(bytes.fromhex(hexdata)) == item


EDGE_VALUES = [
    Item(0x420001, ItemType.INTEGER, -(2**31)),
    Item(0x420001, ItemType.INTEGER, 2**31 - 1),
    Item(0x420001, ItemType.LONG_INTEGER, -(2**63)),
    Item(0x420001, ItemType.LONG_INTEGER, 2**63 - 1),
    Item(0x420001, ItemType.BIG_INTEGER, 0),
    Item(0x420001, ItemType.BIG_INTEGER, -1),
    Item(0x420001, ItemType.BIG_INTEGER, 255),
    Item(0x420001, ItemType.BIG_INTEGER, -(2**63)),
    Item(0x420001, ItemType.BIG_INTEGER, 2**64),
    Item(0x420001, ItemType.BIG_INTEGER, -(2**521) + 7),
    Item(0x420001, ItemType.ENUMERATION, 0),
    Item(0x420001, ItemType.ENUMERATION, 2**32 - 1),
    Item(0x420001, ItemType.BOOLEAN, False),
    Item(0x420001, ItemType.BOOLEAN, True),
    Item(0x420001, ItemType.TEXT_STRING, ""),
    Item(0x420001, ItemType.TEXT_STRING, "12345678"),
    Item(0x420001, ItemType.TEXT_STRING, "Grüße, 鍵 🔑"),
    Item(0x420001, ItemType.BYTE_STRING, b""),
    Item(0x420001, ItemType.BYTE_STRING, bytes(range(256))),
    Item(0x420001, ItemType.DATE_TIME, 0),
    Item(0x420001, ItemType.DATE_TIME, -1),
    Item(0x420001, ItemType.DATE_TIME, 2**62),
    Item(0x420001, ItemType.INTERVAL, 0),
    Item(0x420001, ItemType.INTERVAL, 2**32 - 1),
    Item(0x420001, ItemType.DATE_TIME_EXTENDED, 1_700_000_000_123_456),
    Item(0x420001, ItemType.DATE_TIME_EXTENDED, -(2**63)),
    Item(0x420001, ItemType.STRUCTURE, ()),
    Item(0x540000, ItemType.TEXT_STRING, "vendor extension"),
    Item(
        0x54FFFF,
        ItemType.STRUCTURE,
        (Item(0x420002, ItemType.BYTE_STRING, b"\x00" * 9),),
    ),
]


@pytest.mark.parametrize(
    "item", EDGE_VALUES, ids=lambda i: f"{i.type.name}-{i.tag:06X}"
)
def test_round_trip_of_every_type(item):
    data = ttlv.encode(item)
    assert len(data) % 8 == 0
    assert ttlv.decode(data) == item


def test_all_types_are_covered_by_the_round_trip():
    assert {i.type for i in EDGE_VALUES} == set(ItemType)


@pytest.mark.parametrize(
    "item",
    [
        Item(0x420001, ItemType.INTEGER, 2**31),
        Item(0x420001, ItemType.LONG_INTEGER, 2**63),
        Item(0x420001, ItemType.ENUMERATION, -1),
        Item(0x420001, ItemType.INTERVAL, 2**32),
        Item(0x420001, ItemType.DATE_TIME, -(2**63) - 1),
        Item(0x1000000, ItemType.INTEGER, 1),  # a tag is three bytes
        Item(-1, ItemType.INTEGER, 1),
    ],
    ids=lambda i: f"{i.type.name}-{i.tag:x}",
)
def test_encoding_an_out_of_range_value_raises_ttlv_error(item):
    with pytest.raises(TTLVError):
        ttlv.encode(item)


def test_encoding_pads_to_eight_bytes_with_zeros():
    data = ttlv.encode(ttlv.text(0x420020, "abcde"))
    assert data[4:8] == b"\x00\x00\x00\x05"
    assert data[8:] == b"abcde\x00\x00\x00"


def test_big_integer_of_length_not_a_multiple_of_8_is_refused():
    with pytest.raises(TTLVError, match="big integer"):
        ttlv.decode(bytes.fromhex("42002004000000040000000100000000"))


def test_navigation_helpers():
    s = ttlv.structure(
        0x420001,
        [
            ttlv.integer(0x420002, 1),
            None,
            ttlv.integer(0x420002, 2),
            ttlv.text(0x420003, "x"),
        ],
    )
    assert len(s.children()) == 3
    assert s.find(0x420002).value == 1
    assert [i.value for i in s.find_all(0x420002)] == [1, 2]
    assert s.get(0x420003) == "x"
    assert s.get(0x420004, "default") == "default"
    assert ttlv.integer(0x420002, 1).children() == ()
    assert [i.tag for i in ttlv.walk(s)] == [0x420001, 0x420002, 0x420002, 0x420003]


# Property tests.
TAGS = st.one_of(st.integers(0x420000, 0x42FFFF), st.integers(0x540000, 0x54FFFF))
INT64 = st.integers(-(2**63), 2**63 - 1)
LEAVES = st.one_of(
    st.builds(
        lambda t, v: Item(t, ItemType.INTEGER, v),
        TAGS,
        st.integers(-(2**31), 2**31 - 1),
    ),
    st.builds(lambda t, v: Item(t, ItemType.LONG_INTEGER, v), TAGS, INT64),
    st.builds(
        lambda t, v: Item(t, ItemType.BIG_INTEGER, v),
        TAGS,
        st.integers(-(2**300), 2**300),
    ),
    st.builds(
        lambda t, v: Item(t, ItemType.ENUMERATION, v), TAGS, st.integers(0, 2**32 - 1)
    ),
    st.builds(lambda t, v: Item(t, ItemType.BOOLEAN, v), TAGS, st.booleans()),
    st.builds(
        lambda t, v: Item(t, ItemType.TEXT_STRING, v), TAGS, st.text(max_size=40)
    ),
    st.builds(
        lambda t, v: Item(t, ItemType.BYTE_STRING, v), TAGS, st.binary(max_size=40)
    ),
    st.builds(lambda t, v: Item(t, ItemType.DATE_TIME, v), TAGS, INT64),
    st.builds(
        lambda t, v: Item(t, ItemType.INTERVAL, v), TAGS, st.integers(0, 2**32 - 1)
    ),
    st.builds(lambda t, v: Item(t, ItemType.DATE_TIME_EXTENDED, v), TAGS, INT64),
)
TREES = st.recursive(
    LEAVES,
    lambda children: st.builds(
        lambda t, cs: Item(t, ItemType.STRUCTURE, tuple(cs)),
        TAGS,
        st.lists(children, max_size=5),
    ),
    max_leaves=25,
)


def depth(item: Item) -> int:
    return 1 + max((depth(c) for c in item.children()), default=0)


@settings(max_examples=300, deadline=None)
@given(TREES)
def test_decode_inverts_encode(item):
    assume(depth(item) <= ttlv.DEFAULT_MAX_DEPTH)
    data = ttlv.encode(item)
    assert len(data) % 8 == 0
    assert ttlv.decode(data) == item


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_ttlv_error(data):
    try:
        item = ttlv.decode(data)
    except TTLVError:
        return
    # Whatever decodes re-encodes to bytes that decode to the same tree
    # (not always the same bytes: a Big Integer may carry sign padding).
    assert ttlv.decode(ttlv.encode(item)) == item


@st.composite
def mutated_messages(draw):
    """Valid encodings with bytes overwritten, cut or appended, so that the
    decoder gets past the first header and into the nested checks."""
    data = bytearray(ttlv.encode(draw(TREES)))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    data += draw(st.binary(max_size=12))
    return bytes(data)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_messages())
def test_mutated_messages_raise_only_ttlv_error(data):
    try:
        item = ttlv.decode(data)
    except TTLVError:
        return
    assert ttlv.decode(ttlv.encode(item)) == item


SECRET = st.binary(min_size=4, max_size=64)


@settings(max_examples=200, deadline=None)
@given(TAGS, SECRET)
def test_repr_of_a_byte_string_shows_only_its_length(tag, secret):
    item = ttlv.byte_string(tag, secret)
    text = repr(item)
    assert text == f"<{ttlv.tag_name(tag)} bytes[{len(secret)}]>"
    assert secret.hex() not in text.lower()
    assert repr(secret)[2:-1] not in text


@settings(max_examples=200, deadline=None)
@given(TREES)
def test_repr_never_contains_byte_string_contents(tree):
    secrets = [
        i.value
        for i in ttlv.walk(tree)
        if i.type == ItemType.BYTE_STRING and len(i.value) >= 4
    ]
    for item in ttlv.walk(tree):
        text = repr(item)
        for secret in secrets:
            assert secret.hex() not in text.lower()
            assert repr(secret)[2:-1] not in text


def test_repr_of_a_key_structure_hides_the_key():
    key = bytes.fromhex("00112233445566778899aabbccddeeff")
    s = ttlv.structure(0x420043, [ttlv.byte_string(0x420043, key)])
    for text in (repr(s), repr(s.value), str(s), f"{s!r}"):
        assert "00112233" not in text and "\\x00\\x11" not in text
    assert repr(s) == "<KEY_MATERIAL [1 items]>"


def test_retag_copies_only_what_needs_another_tag():
    item = ttlv.structure(0x420001, [ttlv.text(0x420002, "x")])
    assert item.retag(0x420001) is item  # immutable: its own copy
    other = item.retag(0x420003)
    assert (other.tag, other.type, other.value) == (0x420003, item.type, item.value)
    assert item.tag == 0x420001


def test_items_are_immutable_values():
    """Items are shared (decoded attribute values are memoized, answers are
    built from them), so none may change; equal items are one value."""
    import copy
    import dataclasses
    import pickle

    item = ttlv.structure(ttlv.TAG.NAME, [ttlv.text(ttlv.TAG.NAME_VALUE, "k"), ttlv.enumeration(ttlv.TAG.NAME_TYPE, 1)])
    for field in ("tag", "type", "value"):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(item, field, 0)
    again = ttlv.decode(ttlv.encode(item))
    assert again == item and hash(again) == hash(item) and again is not item
    assert again != ttlv.text(ttlv.TAG.NAME, "k")
    assert pickle.loads(pickle.dumps(item)) == item
    assert copy.deepcopy(item) == item
    assert (item.tag, item.type, item.value[0].value) == (ttlv.TAG.NAME, ItemType.STRUCTURE, "k")


def test_tag_numbers_are_the_tags_values():
    from kmip.core.enums import Tags

    assert all(getattr(ttlv.TAG, tag.name) == tag.value for tag in Tags)
    with pytest.raises(AttributeError):
        ttlv.TAG.NO_SUCH_TAG  # noqa: B018
