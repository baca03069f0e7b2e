"""What the fuzz tests share: the hypothesis profiles, the seed requests
(tests/fixtures/fuzz/, real client traffic) and mutators that work on the
TTLV tree and on its bytes.

Every `make test` runs the "fuzz" profile: a bounded number of examples per
test, no deadline (a loaded 2-core machine is slow, not wrong). A longer run
is asked for with an environment variable:

    KMS_FUZZ_PROFILE=fuzz-long .venv/bin/python -m pytest -q tests/fuzz

("fuzz-long" runs 50 times the examples; KMS_FUZZ_SCALE=N sets another
multiplier.) A failure prints the reproduction blob and the minimal input.
"""

from __future__ import annotations

import enum
import logging
import os
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from kmip.core import enums

from kmip_core import ttlv
from kmip_core.ttlv import Item, ItemType

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "fuzz"

settings.register_profile(
    "fuzz",
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
settings.register_profile("fuzz-long", parent=settings.get_profile("fuzz"))
PROFILE = os.environ.get("KMS_FUZZ_PROFILE", "fuzz")
SCALE = int(os.environ.get("KMS_FUZZ_SCALE", "50" if PROFILE == "fuzz-long" else "1"))


def budget(examples: int) -> settings:
    """Settings for one property: `examples` in the suite, times the scale
    in a longer run."""
    return settings(settings.get_profile(PROFILE), max_examples=max(1, examples * SCALE))


def load_seeds(name: str) -> list[bytes]:
    lines = (FIXTURES / name).read_text().splitlines()
    return [bytes.fromhex(line) for line in lines if line and not line.startswith("#")]


VCENTER = load_seeds("vcenter-requests.hex")
OASIS = load_seeds("oasis-requests.hex")
SEEDS = VCENTER + OASIS
SEED_ITEMS = [ttlv.decode(data) for data in SEEDS]


# --- Values -------------------------------------------------------------------------------

TAGS = st.one_of(
    st.sampled_from([t.value for t in enums.Tags]),
    st.integers(0x420000, 0x42FFFF),
    st.integers(0x540000, 0x54FFFF),
)
INT32 = st.one_of(st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 255, 256, 4096, 0x80000000 - 8]), st.integers(-(2**31), 2**31 - 1))
UINT32 = st.one_of(st.sampled_from([0, 1, 2**32 - 1, 0x80000000, 0x7FFFFFFF, 0xFFFF]), st.integers(0, 2**32 - 1))
INT64 = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
TEXTS = st.one_of(
    st.sampled_from(
        [
            "",
            "1",
            "x-Name",
            "Cryptographic Algorithm",
            "Cryptographic Length",
            "Cryptographic Usage Mask",
            "State",
            "Name",
            "Object Type",
            "Unique Identifier",
            "Sensitive",
            "Extractable",
            "x-",
            "\x00",
            "é" * 40,
        ]
    ),
    st.text(max_size=40),
)


def value_for(item_type: ItemType) -> st.SearchStrategy:
    """Any encodable value of `item_type`, edge values often."""
    return {
        ItemType.INTEGER: INT32,
        ItemType.LONG_INTEGER: INT64,
        ItemType.BIG_INTEGER: st.one_of(st.sampled_from([0, -1, 2**64, -(2**2047)]), st.integers(-(2**300), 2**300)),
        ItemType.ENUMERATION: UINT32,
        ItemType.BOOLEAN: st.booleans(),
        ItemType.TEXT_STRING: TEXTS,
        ItemType.BYTE_STRING: st.one_of(st.binary(max_size=64), st.sampled_from([b"", bytes(16), bytes(32), bytes(4096)])),
        ItemType.DATE_TIME: INT64,
        ItemType.INTERVAL: UINT32,
        ItemType.DATE_TIME_EXTENDED: INT64,
    }[item_type]


LEAF_TYPES = [t for t in ItemType if t != ItemType.STRUCTURE]


@st.composite
def leaves(draw, tag=None) -> Item:
    item_type = draw(st.sampled_from(LEAF_TYPES))
    return Item(draw(TAGS) if tag is None else tag, item_type, draw(value_for(item_type)))


def trees(max_leaves: int = 12) -> st.SearchStrategy[Item]:
    return st.recursive(
        leaves(),
        lambda children: st.builds(lambda t, cs: Item(t, ItemType.STRUCTURE, tuple(cs)), TAGS, st.lists(children, max_size=4)),
        max_leaves=max_leaves,
    )


def depth(item: Item) -> int:
    return 1 + max((depth(c) for c in item.children()), default=0)


# --- Tree mutations -------------------------------------------------------------------------


def paths(item: Item, prefix: tuple[int, ...] = ()) -> list[tuple[int, ...]]:
    """The position of every item in the tree (the root is ())."""
    found = [prefix]
    for i, child in enumerate(item.children()):
        found.extend(paths(child, prefix + (i,)))
    return found


def at(item: Item, path: tuple[int, ...]) -> Item:
    for i in path:
        item = item.value[i]
    return item


def replace(item: Item, path: tuple[int, ...], new: Item | None) -> Item:
    """The tree with the item at `path` replaced (None removes it)."""
    if not path:
        assert new is not None
        return new
    children = list(item.value)
    head, rest = path[0], path[1:]
    if rest:
        children[head] = replace(children[head], rest, new)
    elif new is None:
        del children[head]
    else:
        children[head] = new
    return Item(item.tag, item.type, tuple(children))


def _enum_values(tag: int) -> list[int]:
    """The defined values of the enumeration a tag names, if PyKMIP has one."""
    try:
        name = enums.Tags(tag).name
    except ValueError:
        return []
    wanted = name.replace("_", "").lower()
    for cls_name, cls in vars(enums).items():
        if isinstance(cls, type) and issubclass(cls, enum.Enum) and cls is not enums.Tags:
            if cls_name.lower() == wanted:
                return [int(m.value) for m in cls if isinstance(m.value, int)]
    return []


@st.composite
def mutated_tree(draw, root: Item, uids: tuple[str, ...] = ()) -> Item:
    """`root` with one to four structure-aware changes: a value replaced by
    another of its type (a defined enumeration value, an edge value, a known
    object's id), an item's type changed, an item removed, duplicated,
    moved or retagged, a random subtree inserted, a structure nested
    deeper. Every result is encodable."""
    tree = root
    for _ in range(draw(st.integers(1, 4))):
        spots = paths(tree)
        path = draw(st.sampled_from(spots))
        target = at(tree, path)
        kind = draw(
            st.sampled_from(
                ["value", "value", "value", "retype", "remove", "duplicate", "swap", "retag", "insert", "wrap"]
            )
        )
        if kind == "value" and target.type != ItemType.STRUCTURE:
            if target.type == ItemType.ENUMERATION and (defined := _enum_values(target.tag)) and draw(st.booleans()):
                value = draw(st.sampled_from(defined))
            elif target.type == ItemType.TEXT_STRING and uids and draw(st.booleans()):
                value = draw(st.sampled_from(uids))
            else:
                value = draw(value_for(target.type))
            tree = replace(tree, path, Item(target.tag, target.type, value))
        elif kind == "retype" and path:
            new_type = draw(st.sampled_from(list(ItemType)))
            value = draw(st.lists(leaves(), max_size=3)) if new_type == ItemType.STRUCTURE else draw(value_for(new_type))
            tree = replace(tree, path, Item(target.tag, new_type, tuple(value) if new_type == ItemType.STRUCTURE else value))
        elif kind == "remove" and path:
            tree = replace(tree, path, None)
        elif kind == "duplicate" and path:
            parent = at(tree, path[:-1])
            children = list(parent.value)
            children.insert(path[-1], target)
            tree = replace(tree, path[:-1], Item(parent.tag, parent.type, tuple(children)))
        elif kind == "swap" and path:
            parent = at(tree, path[:-1])
            children = list(parent.value)
            other = draw(st.integers(0, len(children) - 1))
            children[path[-1]], children[other] = children[other], children[path[-1]]
            tree = replace(tree, path[:-1], Item(parent.tag, parent.type, tuple(children)))
        elif kind == "retag" and path:
            tree = replace(tree, path, target.retag(draw(TAGS)))
        elif kind == "insert" and target.type == ItemType.STRUCTURE:
            children = list(target.value)
            children.insert(draw(st.integers(0, len(children))), draw(trees(6)))
            tree = replace(tree, path, Item(target.tag, target.type, tuple(children)))
        elif kind == "wrap" and path:
            wrapped = target
            for _ in range(draw(st.integers(1, 3))):
                wrapped = Item(target.tag, ItemType.STRUCTURE, (wrapped,))
            tree = replace(tree, path, wrapped)
    return tree


# --- Byte mutations ---------------------------------------------------------------------------


def header_offsets(item: Item, offset: int = 0) -> list[int]:
    """The byte offset of every item header in `item`'s encoding."""
    found = [offset]
    position = offset + ttlv.HEADER_SIZE
    for child in item.children():
        found.extend(header_offsets(child, position))
        position += len(ttlv.encode(child))
    return found


LENGTHS = st.one_of(
    st.sampled_from([0, 1, 4, 7, 8, 9, 16, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF8, 1 << 20, (1 << 20) + 8]),
    st.integers(0, 2**32 - 1),
)


@st.composite
def mutated_bytes(draw, root: Item) -> bytes:
    """The encoding of `root` with one to four byte-level corruptions aimed
    at the headers (a length made larger, smaller, odd or huge; a type byte
    or tag changed) or anywhere (bit flips, bytes cut, spliced, appended)."""
    data = bytearray(ttlv.encode(root))
    headers = header_offsets(root)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["length", "length", "type", "tag", "bitflip", "truncate", "splice", "append", "delete"]))
        if not data:
            data += draw(st.binary(min_size=1, max_size=16))
            continue
        offset = draw(st.sampled_from([h for h in headers if h + 8 <= len(data)] or [0]))
        if kind == "length" and offset + 8 <= len(data):
            old = int.from_bytes(data[offset + 4 : offset + 8], "big")
            new = draw(st.one_of(LENGTHS, st.sampled_from([old + 1, old - 1, old + 8, old - 8, old * 2])))
            data[offset + 4 : offset + 8] = (new % 2**32).to_bytes(4, "big")
        elif kind == "type" and offset + 4 <= len(data):
            data[offset + 3] = draw(st.integers(0, 255))
        elif kind == "tag" and offset + 3 <= len(data):
            data[offset : offset + 3] = draw(st.integers(0, 2**24 - 1)).to_bytes(3, "big")
        elif kind == "bitflip":
            position = draw(st.integers(0, len(data) - 1))
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "splice":
            position = draw(st.integers(0, len(data)))
            data[position:position] = draw(st.binary(max_size=24))
        elif kind == "append":
            data += draw(st.one_of(st.binary(max_size=24), st.just(bytes(data[:16]))))
        elif kind == "delete":
            start = draw(st.integers(0, len(data) - 1))
            del data[start : start + draw(st.integers(1, 16))]
    return bytes(data)


def nested(levels: int, tag: int = 0x420001, leaf: Item | None = None) -> bytes:
    """A structure nested `levels` deep around `leaf`, built as bytes in
    linear time (no recursion, no repeated copying)."""
    inner = ttlv.encode(leaf) if leaf is not None else b""
    headers = [
        tag.to_bytes(3, "big") + bytes([ItemType.STRUCTURE]) + (8 * (levels - 1 - i) + len(inner)).to_bytes(4, "big")
        for i in range(levels)
    ]
    return b"".join(headers) + inner


def structure_depth(item: Item) -> int:
    """Structures on the deepest path: what the decoder's limit counts."""
    if item.type != ItemType.STRUCTURE:
        return 0
    return 1 + max((structure_depth(c) for c in item.children()), default=0)


# --- Logging --------------------------------------------------------------------------------


class Tracebacks(logging.Handler):
    """Collects the log records that carry an exception (a traceback in the
    server log means a failure nobody mapped)."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info:
            self.records.append(record)

    def take(self) -> list[str]:
        found = [f"{r.name}: {r.getMessage()}: {r.exc_info[0].__name__}: {r.exc_info[1]}" for r in self.records]
        self.records.clear()
        return found
