#!/usr/bin/env python3
"""Regenerate the fuzzers' seed requests in tests/fixtures/fuzz/ from the
captured traffic in ../shared/vectors/ (a clone of the project has no
../shared, so the seeds are kept in the tree; this script is only needed
when the vectors change).

    .venv/bin/python tests/fuzz/make_seeds.py [--vectors ../shared/vectors]

- vcenter-requests.hex: every distinct request of the two vCenter sessions.
- oasis-requests.hex: the distinct requests of the OASIS profile test cases
  (1.4, 2.0, 2.1), placeholders replaced by fixed values, kept only when the
  in-memory dispatcher answers them in under 50 ms (no RSA key generation
  in a fuzz loop) and when they are at most 4 KiB; at most three for one
  protocol version and list of operations.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "conformance")]

import kmip_xml  # noqa: E402
import vcenter_vectors  # noqa: E402

from kmip_core import ttlv  # noqa: E402
from kmip_core.policy import Principal  # noqa: E402
from kmip_core.sealing.barrier import Barrier  # noqa: E402
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher  # noqa: E402
from kmip_core.ttlv import Item, ItemType  # noqa: E402
from kms_server.keystore.keystore import Keystore  # noqa: E402
from kms_server.operations import OPERATIONS  # noqa: E402
from kms_server.storage import open_storage  # noqa: E402

OUT = ROOT / "tests" / "fixtures" / "fuzz"
NOW = 1_767_225_600  # 2026-01-01, so the seeds do not change from run to run.
# At most this many requests for one protocol version and list of operations.
PER_SHAPE = 3
PLACEHOLDER = {
    ItemType.TEXT_STRING: "1",
    ItemType.BYTE_STRING: bytes(16),
    ItemType.INTEGER: 1,
    ItemType.LONG_INTEGER: 1,
    ItemType.BIG_INTEGER: 1,
    ItemType.ENUMERATION: 1,
    ItemType.BOOLEAN: True,
    ItemType.DATE_TIME: NOW,
    ItemType.DATE_TIME_EXTENDED: NOW * 1_000_000,
    ItemType.INTERVAL: 1,
}


def to_item(element, parent=None) -> Item:
    tag, item_type = kmip_xml.tag_of(element), kmip_xml.type_of(element)
    if item_type == ItemType.STRUCTURE:
        return Item(tag, item_type, tuple(to_item(c, element) for c in element))
    text = element.get("value", "")
    if kmip_xml.is_placeholder(text):
        return Item(tag, item_type, PLACEHOLDER[item_type])
    return Item(tag, item_type, kmip_xml.leaf_value(item_type, text, element.tag, NOW, kmip_xml.attribute_name_for(parent)))


def operations(element) -> tuple[str, ...]:
    return tuple(op.get("value", "") for op in element.iter("Operation"))


def write(path: Path, header: str, messages: list[bytes]) -> None:
    lines = [f"# {line}" if line else "#" for line in header.strip().splitlines()]
    path.write_text("\n".join(lines + [m.hex() for m in messages]) + "\n")
    print(f"{path.relative_to(ROOT)}: {len(messages)} requests")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=Path, default=ROOT.parent / "shared" / "vectors")
    args = parser.parse_args()
    vcenter_vectors.VECTOR_DIR = args.vectors / "vcenter"

    seen: set[bytes] = set()
    vcenter: list[bytes] = []
    for log_name in ("vcenter-7.0.3-session.log", "vcenter-probe-session.log"):
        for exchange in vcenter_vectors.load(log_name):
            if exchange.request not in seen:
                seen.add(exchange.request)
                vcenter.append(exchange.request)
    write(
        OUT / "vcenter-requests.hex",
        """
        The distinct requests of the captured vCenter 7.0.3 sessions
        (../shared/vectors/vcenter/, Cosmian KMS repository), one TTLV message in hex a line.
        Seeds of the fuzzers in tests/fuzz/; made by tests/fuzz/make_seeds.py.
        """.replace("        ", ""),
        vcenter,
    )

    dispatcher = Dispatcher(Keystore(open_storage("memory://"), Barrier(os.urandom(32))), OPERATIONS, retry_delays=())
    conn = ConnectionInfo(Principal("alice"), "127.0.0.1:1")
    oasis: list[bytes] = []
    shapes: dict[tuple, int] = {}
    for path in sorted(args.vectors.glob("oasis/v*/XML/*/*.xml")):
        try:
            exchanges = kmip_xml.load(path)
        except Exception:  # noqa: BLE001 - a file the converter cannot read gives no seeds
            continue
        for exchange in exchanges:
            try:
                data = ttlv.encode(to_item(exchange.request))
            except (kmip_xml.VectorError, ValueError, KeyError, TypeError):
                continue
            if data in seen or len(data) > 4096:
                continue
            started = time.perf_counter()
            dispatcher.handle(data, conn)
            if time.perf_counter() - started > 0.05:
                continue
            seen.add(data)
            shape = (kmip_xml.protocol_version(exchange.request), operations(exchange.request))
            if shapes.get(shape, 0) < PER_SHAPE:
                shapes[shape] = shapes.get(shape, 0) + 1
                oasis.append(data)
    write(
        OUT / "oasis-requests.hex",
        """
        Requests of the OASIS KMIP profile test cases 1.4, 2.0 and 2.1 (../shared/vectors/oasis/),
        placeholders replaced by fixed values; only those the in-memory dispatcher answers in
        under 50 ms and of at most 4 KiB, at most three for one protocol version and list of
        operations. One TTLV message in hex a line.
        Seeds of the fuzzers in tests/fuzz/; made by tests/fuzz/make_seeds.py.
        """.replace("        ", ""),
        oasis,
    )


if __name__ == "__main__":
    main()
