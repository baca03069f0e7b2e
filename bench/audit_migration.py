"""How long schema revision 0006 (the leaner audit table) takes on a SQLite
database holding an audit trail of a given length (issue 15).

    .venv/bin/python bench/audit_migration.py                    # a million records
    .venv/bin/python bench/audit_migration.py --records 10000000

It builds a database at revision 0005 in a temporary directory, fills its
audit table with `--records` records of about the size a Get's has (a 600
byte body; one in ten without a key, as refusals are), then times
`kms_server.storage.schema.upgrade`, which is what a node runs at start on
SQLite and `kms-admin db upgrade` runs. The records are not a valid chain:
the migration copies them and does not read them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import sqlite3
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

BODY = '{"pad":"' + "x" * 588 + '"}'


@contextlib.contextmanager
def filled_at(path: str, revision: str) -> Iterator[sqlite3.Connection]:
    """A new SQLite database at `path`, migrated to `revision`, and a
    connection to it inside one transaction, committed when the block ends
    (rows inserted straight into the tables: the migration timed after
    reads them as a store holds them). Also bench/lookup_migration.py's."""
    from sqlalchemy import create_engine

    from kmip_core.db.migrations import migrate
    from kms_server.storage import schema

    engine = create_engine(f"sqlite:///{path}")
    try:
        migrate(engine, schema.KMS, revision)
    finally:
        engine.dispose()
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        yield conn
        conn.execute("COMMIT")
    finally:
        conn.close()


def build(path: str, records: int) -> None:
    """A database at revision 0005 with `records` audit records."""
    with filled_at(path, "0005") as conn:
        conn.executemany(
            "INSERT INTO kms_audit VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                (
                    seq,
                    1.7e9 + seq / 1000,
                    "node-1",
                    "Get",
                    f"key-{seq % 5000}" if seq % 10 else None,
                    "client",
                    "SUCCESS",
                    None,
                    None,
                    None,
                    BODY,
                    hashlib.sha256(seq.to_bytes(8, "big")).hexdigest(),
                )
                for seq in range(1, records + 1)
            ),
        )


def timed_upgrade(path: str, table: str) -> tuple[str | None, str, float, int]:
    """`kms_server.storage.schema.upgrade` of the SQLite database at
    `path`, timed: (revision before, revision after, seconds, rows in
    `table` after). Also bench/lookup_migration.py's."""
    from sqlalchemy import create_engine

    from kms_server.storage import schema

    engine = create_engine(f"sqlite:///{path}")
    try:
        started = time.monotonic()
        before, after = schema.upgrade(engine)
        took = time.monotonic() - started
        with engine.connect() as conn:
            count = conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
    finally:
        engine.dispose()
    return before, after, took, int(count or 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1_000_000, help="audit records (default 1,000,000)")
    parser.add_argument("--dir", help="where to build the database (default: a temporary directory)")
    args = parser.parse_args()
    if args.records < 0:
        parser.error("--records cannot be negative")
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        path = os.path.join(directory, "kms.db")
        build(path, args.records)
        size = Path(path).stat().st_size
        before, after, took, count = timed_upgrade(path, "kms_audit")
    if count != args.records:
        raise SystemExit(f"audit_migration: {count} records after the upgrade, {args.records} before")
    print(f"{args.records:,} audit records ({size / 1e6:,.0f} MB): revision {before} -> {after} in {took:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
