"""What row authentication costs a node at start and while it serves.

Fills a SQLite store with N AES keys through the keystore (row MACs and the
store digest made as a node makes them), then times the whole-store check a
node runs at start and every [storage] integrity_check_seconds, and
`kms-admin db verify`'s check (which also opens every sealed blob).
PyKMIP has no such check, so there is nothing to set beside it.

    .venv/bin/python bench/row_integrity.py --objects 20000
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kmip.core.enums import ObjectType  # noqa: E402

from kmip_core.policy import Principal, Role  # noqa: E402
from kmip_core.sealing.barrier import Barrier  # noqa: E402
from kms_server.keystore import attributes as attrs  # noqa: E402
from kms_server.keystore import row_auth  # noqa: E402
from kms_server.keystore.keystore import Keystore  # noqa: E402
from kms_server.keystore.objects import Material  # noqa: E402
from kms_server.storage import open_storage  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=20000, help="keys in the store (default 20000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(f"sqlite:///{tmp}/kms.db")
        barrier = Barrier(os.urandom(32))
        keystore = Keystore(storage, barrier)
        alice = Principal(name="alice", role=Role.USER)
        started = time.perf_counter()
        for first in range(0, args.objects, 500):
            with keystore.transaction() as txn:
                for _ in range(min(500, args.objects - first)):
                    keystore.new_object(
                        txn,
                        alice,
                        ObjectType.SYMMETRIC_KEY,
                        {"Cryptographic Length": [attrs.make("Cryptographic Length", 256)]},
                        Material(os.urandom(32)),
                        int(time.time()),
                    )
        filled = time.perf_counter() - started
        for label, unseal in (("start-up / periodic check", False), ("kms-admin db verify", True)):
            started = time.perf_counter()
            with storage.transaction(read_only=True) as txn:
                report = row_auth.verify_store(txn, barrier, unseal=unseal)
            took = time.perf_counter() - started
            assert report.ok, report
            print(f"{label:28} {args.objects:>8} objects {took:8.2f} s  {took / args.objects * 1e6:7.1f} us/object")
        print(f"{'filling the store':28} {args.objects:>8} objects {filled:8.2f} s  {filled / args.objects * 1e3:7.2f} ms/object")
        storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
