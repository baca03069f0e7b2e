"""How long schema revision 0007 (Locate's partial lookup index) takes on a
SQLite database holding a given number of keys (issue 15).

    .venv/bin/python bench/lookup_migration.py                  # a million keys
    .venv/bin/python bench/lookup_migration.py --keys 100000

It builds a database at revision 0006 in a temporary directory, stores
`--keys` objects with the 18 attribute rows an AES key with a Name has
(values of their sizes; the Name, Digest and Unique Identifier of each key
its own, the others shared as a store's are), then times
`kms_server.storage.schema.upgrade`, which is what a node runs at start on
SQLite and `kms-admin db upgrade` runs: the partial index built from the
attribute rows, the full one dropped. Then it times three Locates of one
key through the storage layer: by Name (through the index), by Unique
Identifier as the keystore asks it (left out of the index, but the query
names the uid: that object's row is read) and by Digest alone (left out of
it: every object's row is read). The rows carry no valid MAC: neither the
migration nor Locate reads it.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from audit_migration import filled_at, timed_upgrade  # noqa: E402  (a sibling script)

# An AES key's attribute names; True: a value of its own per key.
ATTRIBUTES = {
    "Always Sensitive": False,
    "Cryptographic Algorithm": False,
    "Cryptographic Length": False,
    "Cryptographic Usage Mask": False,
    "Digest": True,
    "Extractable": False,
    "Fresh": False,
    "Initial Date": False,
    "Last Change Date": False,
    "Lease Time": False,
    "Name": True,
    "Never Extractable": False,
    "Object Type": False,
    "Original Creation Date": False,
    "Random Number Generator": False,
    "Sensitive": False,
    "State": False,
    "Unique Identifier": True,
}


def build(path: str, keys: int) -> None:
    """A database at revision 0006 with `keys` objects and their rows."""
    with filled_at(path, "0006") as conn:
        conn.executemany(
            "INSERT INTO kms_objects (uid, owner, version, sealed_material, created_at, row_mac) "
            "VALUES (?, 'owner', 1, ?, 0, ?)",
            ((f"key-{i:09d}", b"s" * 60, b"m" * 32) for i in range(keys)),
        )

        def rows():
            for i in range(keys):
                uid = f"key-{i:09d}"
                for name, own in ATTRIBUTES.items():
                    value = (f"{name}-{i}" if own else f"{name}-{i // 5000}").encode().ljust(16, b"\0")
                    yield uid, name, 0, value, hashlib.sha256(value).digest()

        conn.executemany("INSERT INTO kms_attributes (uid, name, idx, value, value_digest) VALUES (?, ?, ?, ?, ?)", rows())


# What each timed Locate asks, and how the storage answers it.
LOCATES = (
    ("Name", False, "the lookup index"),
    ("Unique Identifier", True, "the uid's row"),
    ("Digest", False, "every object read"),
)


def _locates(path: str, keys: int) -> list[tuple[str, float]]:
    """After the upgrade, one Locate by a looked-up attribute (Name), one
    by Unique Identifier as the keystore asks it (with the uid) and one by
    an attribute left out of the index alone (Digest), each of the middle
    key, timed through the storage layer; each must find that key."""
    from kms_server.storage import LocateQuery, open_storage

    if keys == 0:
        return []
    middle = keys // 2
    storage = open_storage(f"sqlite:///{path}", schema="check")
    timed = []
    try:
        uid = f"key-{middle:09d}"
        for name, with_uid, how in LOCATES:
            value = f"{name}-{middle}".encode().ljust(16, b"\0")
            query = LocateQuery(equals=((name, value),), uid=uid if with_uid else None)
            with storage.transaction(read_only=True) as tx:
                started = time.monotonic()
                found = tx.locate(query)
                seconds = time.monotonic() - started
            if found != [uid]:
                raise SystemExit(f"lookup_migration: a Locate by {name} found {found[:3]}, not {uid}")
            timed.append((f"{name} ({how})", seconds))
    finally:
        storage.close()
    return timed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the store (default 1,000,000)")
    parser.add_argument("--dir", help="where to build the database (default: a temporary directory)")
    args = parser.parse_args()
    if args.keys < 0:
        parser.error("--keys cannot be negative")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = os.path.join(directory, "kms.db")
        build(path, args.keys)
        size = Path(path).stat().st_size
        before, after, took, count = timed_upgrade(path, "kms_attributes")
        size_after = Path(path).stat().st_size
        located = _locates(path, args.keys)
    if count != args.keys * len(ATTRIBUTES):
        raise SystemExit(f"lookup_migration: {count} attribute rows after the upgrade, {args.keys * len(ATTRIBUTES)} before")
    print(
        f"{args.keys:,} keys, {count:,} attribute rows ({size / 1e6:,.0f} MB): "
        f"revision {before} -> {after} in {took:.1f} s ({size_after / 1e6:,.0f} MB after)"
    )
    for what, seconds in located:
        print(f"then a Locate by {what}: {seconds * 1000:,.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
