"""A destroyed key's sealed material leaves the SQLite file: every
connection runs `PRAGMA secure_delete = ON` (kmip_core.db.engine), so what
an update or a delete frees is overwritten, whatever the build's default
(Debian's SQLite has it on; SQLite's own default is off)."""

from __future__ import annotations

import os
import sqlite3

import pytest

from kmip_core.db import engine as db_engine
from kms_server.storage import open_storage
from kms_server.storage.base import StoredAttribute, StoredObject


def _remnants(marker: bytes, data: bytes) -> int:
    """How many of the marker's 32-byte pieces are in `data`."""
    return sum(marker[i : i + 32] in data for i in range(0, len(marker), 32))


def _file_after_destroy(path, marker: bytes) -> tuple[bytes, bytes]:
    """The database file with a row holding `marker` as its sealed
    material, then once the row's material is removed as Destroy removes
    it (each after the log is copied into the file and the storage closed)."""
    url = f"sqlite:///{path}"
    storage = open_storage(url)
    with storage.transaction() as txn:
        txn.insert_object(
            StoredObject(uid="k1", owner="alice", sealed_material=marker, attributes=[StoredAttribute("Name", 0, b"n")])
        )
    storage.close()
    before = path.read_bytes()
    storage = open_storage(url)
    with storage.transaction() as txn:
        stored = txn.get_object("k1", for_update=True)
        assert stored is not None and stored.sealed_material == marker
        stored.sealed_material = None
        txn.update_object(stored)
    storage.close()
    assert not os.path.exists(f"{path}-wal") or os.path.getsize(f"{path}-wal") == 0
    return before, path.read_bytes()


def test_a_destroyed_keys_material_is_overwritten_in_the_file(tmp_path):
    # Larger than the row that replaces it, which SQLite may write where
    # the old one was: what is left of it must be gone too.
    marker = os.urandom(1024)
    before, after = _file_after_destroy(tmp_path / "kms.db", marker)
    assert marker in before  # the search finds it where it is
    assert _remnants(marker, after) == 0
    conn = sqlite3.connect(tmp_path / "kms.db")
    try:
        assert conn.execute("SELECT sealed_material FROM kms_objects WHERE uid = 'k1'").fetchone() == (None,)
    finally:
        conn.close()


def test_without_secure_delete_the_material_stays_in_free_space(tmp_path, monkeypatch):
    """The control: the pragma is what clears it (SQLite's own default)."""
    monkeypatch.setattr(db_engine, "SECURE_DELETE", "OFF")
    marker = os.urandom(1024)
    before, after = _file_after_destroy(tmp_path / "kms.db", marker)
    assert marker in before
    assert _remnants(marker, after) > 16  # most of it, in the page's free space


@pytest.mark.parametrize("value", ["ON", "OFF"])
def test_every_connection_runs_the_pragma(tmp_path, monkeypatch, value):
    monkeypatch.setattr(db_engine, "SECURE_DELETE", value)
    storage = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    try:
        with storage._engine.connect() as conn:  # the storage engine: its connections as the node has them
            assert conn.exec_driver_sql("PRAGMA secure_delete").scalar() == (1 if value == "ON" else 0)
    finally:
        storage.close()
