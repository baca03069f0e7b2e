"""SQLite database files are readable by their owner only (issue 19: kms.db
and its -wal/-shm were 0644): the KMS storage, and the broker's database,
which opens through the same engine module."""

from __future__ import annotations

import os
import stat
from contextlib import contextmanager

from kmip_core.db.engine import private_sqlite_file
from kms_server.storage import StoredAttribute, StoredObject, open_storage


@contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_kms_database_and_its_wal_and_shm_are_created_0600(tmp_path):
    db = tmp_path / "kms.db"
    with umask(0o022):
        storage = open_storage(f"sqlite:///{db}")
        try:
            with storage.transaction() as tx:
                tx.insert_object(
                    StoredObject(uid="k", owner="alice", sealed_material=b"s", attributes=[StoredAttribute("Name", 0, b"n")])
                )
            # While the storage is open, WAL mode keeps the -wal and -shm files.
            files = [db, tmp_path / "kms.db-wal", tmp_path / "kms.db-shm"]
            assert all(f.exists() for f in files)
            assert {f.name: mode(f) for f in files} == {f.name: 0o600 for f in files}
        finally:
            storage.close()


def test_a_database_left_wider_by_an_older_release_is_narrowed(tmp_path):
    db = tmp_path / "kms.db"
    with umask(0o022):
        storage = open_storage(f"sqlite:///{db}")
        storage.close()
    os.chmod(db, 0o644)
    storage = open_storage(f"sqlite:///{db}")
    try:
        assert mode(db) == 0o600
    finally:
        storage.close()


def test_broker_database_is_created_0600(tmp_path):
    from broker.db import Database

    db = tmp_path / "broker.db"
    with umask(0o022):
        database = Database(f"sqlite:///{db}")
        try:
            database.create_all()
            assert mode(db) == 0o600
            for suffix in ("-wal", "-shm"):
                extra = tmp_path / f"broker.db{suffix}"
                if extra.exists():
                    assert mode(extra) == 0o600
        finally:
            database.engine.dispose()
            database.read_engine.dispose()


def test_paths_sqlite_owns_are_left_alone(tmp_path):
    """No file is made for an in-memory or URI database, nor in a directory
    that does not exist (SQLite says so in its own words)."""
    private_sqlite_file(":memory:")
    private_sqlite_file("file:x.db?mode=ro")
    private_sqlite_file(str(tmp_path / "missing" / "kms.db"))
    assert list(tmp_path.iterdir()) == []
