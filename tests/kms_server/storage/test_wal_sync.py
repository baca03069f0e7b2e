"""The commits of SQLite's write batches made durable after the writers'
flock is released (kms_server.storage.sql.WalSync, WriteBatches): the
batches' connection commits with synchronous = NORMAL, and one fdatasync of
the write-ahead log, outside the flock, comes before any writer is told;
a failed sync fails the batch's writers (its outcome unknown) and every
later write; a new log file gets its directory entry synced."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
from types import SimpleNamespace

import pytest
from sqlalchemy import create_engine

from kmip_core.db.engine import configure_sqlite
from kms_server.metrics import kms_readiness
from kms_server.storage import open_storage
from kms_server.storage.base import StorageError, StorageUnavailable
from kms_server.storage.sql import WAL_BACKSTOP_PAGES, SqlStorage, WalCheckpointer, WalSync, WriteBatches, metadata


@pytest.fixture
def storage(sqlite_storage):
    return sqlite_storage  # SQLite only (conftest.py)


def _path_of(fd: int) -> str:
    return os.readlink(f"/proc/self/fd/{fd}")


class Syncs:
    """os.fdatasync and os.fsync, recorded (by the path each descriptor
    names) and then done; `fail` makes fdatasync raise EIO instead."""

    def __init__(self, monkeypatch, on_sync=None):
        self.data: list[str] = []
        self.full: list[str] = []
        self.fail = False
        real_fdatasync, real_fsync = os.fdatasync, os.fsync

        def fdatasync(fd):
            self.data.append(_path_of(fd))
            if on_sync is not None:
                on_sync()
            if self.fail:
                raise OSError(errno.EIO, "Input/output error")
            real_fdatasync(fd)

        def fsync(fd):
            self.full.append(_path_of(fd))
            real_fsync(fd)

        monkeypatch.setattr(os, "fdatasync", fdatasync)
        monkeypatch.setattr(os, "fsync", fsync)


def _committed(storage: SqlStorage, key: str) -> bytes | None:
    with storage.transaction(read_only=True) as txn:
        return txn.get_meta(key)


def _synchronous(conn) -> int:
    return conn.connection.driver_connection.execute("PRAGMA synchronous").fetchone()[0]


def test_the_batches_commit_without_syncing_and_other_connections_keep_full(storage):
    with storage.transaction() as txn:
        txn.set_meta("a", b"1")
    wal = storage.writes.wal
    assert wal is not None and wal.path == os.path.realpath(storage.writes.lock_path[: -len("-writer")]) + "-wal"
    assert _synchronous(storage.writes._conn) == 1  # NORMAL: SQLite does not sync at COMMIT
    raw = storage.writes._conn.connection.driver_connection
    # SQLite's own checkpoint, inside COMMIT, only as a backstop (WalCheckpointer).
    assert raw.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == WAL_BACKSTOP_PAGES
    with storage.engine.connect() as other:
        assert _synchronous(other) == 2  # FULL, SQLite's own, everywhere else


def test_a_batch_is_synced_outside_the_flock_before_its_writer_is_told(storage, monkeypatch):
    lock_path = storage.writes.lock_path
    returned = threading.Event()
    seen: list[tuple[bool, bool]] = []

    def during_sync():
        fd = os.open(lock_path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if still held
            flock_free = True
        except BlockingIOError:
            flock_free = False
        finally:
            os.close(fd)
        seen.append((flock_free, returned.is_set()))

    syncs = Syncs(monkeypatch, during_sync)
    with storage.transaction() as txn:
        txn.set_meta("a", b"1")
    returned.set()
    assert syncs.data == [storage.writes.wal.path]
    assert seen == [(True, False)], "synced with the flock released, before the writer returned"
    assert _committed(storage, "a") == b"1"
    # A read-only transaction writes nothing and syncs nothing.
    _committed(storage, "a")
    assert len(syncs.data) == 1


def test_writers_that_share_a_batch_share_one_sync(storage, monkeypatch):
    syncs = Syncs(monkeypatch)
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def first():
        try:
            with storage.transaction() as txn:
                txn.set_meta("first", b"1")
                inside.set()
                assert release.wait(10)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def second():
        try:
            with storage.transaction() as txn:
                txn.set_meta("second", b"2")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    t1 = threading.Thread(target=first)
    t1.start()
    assert inside.wait(10)
    t2 = threading.Thread(target=second)
    t2.start()
    while storage.writes.waiting == 0:
        threading.Event().wait(0.005)
    release.set()
    t1.join(10)
    t2.join(10)
    assert errors == []
    assert len(syncs.data) == 1, "one commit, one sync, for both writers"
    assert _committed(storage, "first") == b"1" and _committed(storage, "second") == b"2"


def test_a_failed_sync_fails_its_writers_as_of_unknown_outcome_and_refuses_every_later_write(
    storage, monkeypatch, caplog
):
    syncs = Syncs(monkeypatch)
    syncs.fail = True
    with caplog.at_level(logging.CRITICAL, logger="kms_server.storage"):
        with pytest.raises(StorageUnavailable) as failed:
            with storage.transaction() as txn:
                txn.set_meta("a", b"1")
    assert failed.value.commit_unknown, "committed, but perhaps not on disk: the outcome is unknown"
    assert "could not be synced" in str(failed.value) and "may or may not be stored" in str(failed.value)
    assert any("no further write is accepted" in r.getMessage() for r in caplog.records)
    syncs.fail = False
    assert storage.writes.refused is not None and "could not be synced" in storage.writes.refused
    database = next(
        c for c in kms_readiness(SimpleNamespace(storage=storage, keystore=None, trail=None)).run().checks
        if c.name == "database"
    )
    assert not database.ok and database.detail.startswith("writes are refused: the write-ahead log")
    with pytest.raises(StorageError, match="writes are refused: .*check the disk, remove .*sync-failed, then restart the node"):
        with storage.transaction() as txn:
            txn.set_meta("b", b"2")
    assert _committed(storage, "b") is None
    assert len(syncs.data) == 1, "a refused write syncs nothing"
    # Every process of the database is told (another worker, a restart),
    # until the operator, having checked the disk, removes the file.
    marker = storage.writes.wal.database + "-sync-failed"
    assert os.path.exists(marker) and "could not be synced" in open(marker).read()
    other = open_storage(f"sqlite:///{storage.writes.wal.database}")
    try:
        with pytest.raises(StorageError, match=f"another process could not sync .*remove {marker}"):
            with other.transaction() as txn:
                txn.set_meta("b", b"2")
    finally:
        other.close()
    os.unlink(marker)
    again = open_storage(f"sqlite:///{storage.writes.wal.database}")
    try:
        with again.transaction() as txn:
            txn.set_meta("b", b"2")
        assert _committed(again, "b") == b"2"
    finally:
        again.close()


def test_a_batch_synced_once_another_process_failed_its_sync_is_not_reported_durable(storage, monkeypatch):
    """Its frames may follow pages the other process's failed sync lost:
    its writers are told the outcome is unknown, and it writes no more."""
    marker = os.path.realpath(storage.writes.lock_path[: -len("-writer")]) + "-sync-failed"
    Syncs(monkeypatch, on_sync=lambda: open(marker, "w").close())  # another worker fails meanwhile
    with pytest.raises(StorageUnavailable, match="another process could not sync") as failed:
        with storage.transaction() as txn:
            txn.set_meta("a", b"1")
    assert failed.value.commit_unknown
    with pytest.raises(StorageError, match="writes are refused"):
        with storage.transaction() as txn:
            txn.set_meta("b", b"2")


def test_a_new_log_file_has_its_directory_synced_once_and_its_own_descriptor(tmp_path, monkeypatch):
    database = tmp_path / "kms.db"
    log = tmp_path / "kms.db-wal"
    log.write_bytes(b"frames")
    syncs = Syncs(monkeypatch)
    wal = WalSync(str(database))
    wal.sync()
    wal.sync()
    assert syncs.full == [str(tmp_path)], "the directory once, for the file's entry"
    assert syncs.data == [str(log)] * 2
    first_inode = os.stat(log).st_ino
    # The log deleted and made anew (every connection closed, then a write).
    log.unlink()
    log.write_bytes(b"new frames")
    # The old file stays open (its descriptor is kept), so its inode is not reused.
    assert os.stat(log).st_ino != first_inode
    wal.sync()
    assert syncs.full == [str(tmp_path)] * 2, "the new file's entry synced too"
    assert syncs.data == [str(log)] * 3 and not any("(deleted)" in p for p in syncs.data)
    # No log at all: everything was checkpointed into the database file.
    log.unlink()
    wal.sync()
    assert len(syncs.data) == 3
    wal.close()


def test_syncs_of_one_log_from_two_threads_run_one_at_a_time_and_close_waits_for_them(tmp_path, monkeypatch):
    """The reactor's sync thread and a worker thread's batch sync the same
    log (WalSync): one at a time, so that neither closes or replaces the
    descriptor under the other's fdatasync."""
    database = tmp_path / "kms.db"
    (tmp_path / "kms.db-wal").write_bytes(b"frames")
    inside, overlaps, closed_during = [0], [], []
    real = os.fdatasync

    def slow(fd):
        inside[0] += 1
        overlaps.append(inside[0])
        time.sleep(0.05)
        os.fstat(fd)  # still open
        closed_during.append(wal._fd is None)
        inside[0] -= 1
        real(fd)

    monkeypatch.setattr(os, "fdatasync", slow)
    wal = WalSync(str(database))
    threads = [threading.Thread(target=wal.sync) for _ in range(3)]
    for thread in threads:
        thread.start()
    time.sleep(0.01)
    wal.close()  # waits for the sync running, then the others open the file again
    for thread in threads:
        thread.join(10)
    assert overlaps == [1, 1, 1], "never two at once"
    assert closed_during == [False, False, False]
    wal.close()


def test_without_a_write_ahead_log_sqlite_keeps_syncing_at_commit(tmp_path, monkeypatch):
    database = tmp_path / "journal.db"
    engine = create_engine(f"sqlite:///{database}")
    configure_sqlite(engine, wal=False)
    metadata.create_all(engine)
    writes = WriteBatches(engine, str(database))
    syncs = Syncs(monkeypatch)
    try:
        with writes.transaction("sqlite") as txn:
            txn.set_meta("a", b"1")
        assert writes.wal is None and syncs.data == []
        assert _synchronous(writes._conn) == 2  # FULL: SQLite syncs the journal inside COMMIT
    finally:
        writes.close()
        engine.dispose()


def _wait_for(condition, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def _in_database_file_alone(database: str, key: str, tmp_path) -> bytes | None:
    """`key`'s meta value as the database file holds it, without its log:
    a copy of the file alone, opened read-only (None: not there, or not
    even the table, whose creation is in the log too)."""
    copy = tmp_path / "file-alone.db"
    shutil.copyfile(database, copy)
    conn = sqlite3.connect(f"file:{copy}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM kms_meta WHERE key = ?", (key,)).fetchone()
    except sqlite3.OperationalError as exc:
        assert "no such table" in str(exc)
        return None
    finally:
        conn.close()
    return None if row is None else bytes(row[0])


def test_the_checkpointer_thread_copies_the_log_into_the_database_file(storage, tmp_path):
    with storage.transaction() as txn:
        txn.set_meta("a", b"1")
    checkpointer = storage.writes.checkpointer
    assert checkpointer is not None and checkpointer.database == storage.writes.wal.database
    assert _wait_for(lambda: checkpointer.checkpoints >= 1), checkpointer.last_error
    assert checkpointer._thread is not None and checkpointer._thread.name == "sqlite-checkpointer"
    assert _in_database_file_alone(checkpointer.database, "a", tmp_path) == b"1"
    # Each later commit wakes it again: the next change reaches the file too.
    before = checkpointer.checkpoints
    with storage.transaction() as txn:
        txn.set_meta("b", b"2")
    assert _wait_for(lambda: checkpointer.checkpoints > before), checkpointer.last_error
    assert _in_database_file_alone(checkpointer.database, "b", tmp_path) == b"2"
    assert checkpointer.last_error is None


def test_without_the_checkpointer_the_log_stays_out_of_the_database_file(storage, tmp_path, monkeypatch):
    """The control of the test above: SQLite's own checkpoint, now at the
    backstop, does not copy a small commit into the file."""
    monkeypatch.setattr(WalCheckpointer, "committed", lambda self: None)
    with storage.transaction() as txn:
        txn.set_meta("a", b"1")
    assert _committed(storage, "a") == b"1"
    assert _in_database_file_alone(storage.writes.wal.database, "a", tmp_path) is None


def test_closing_the_storage_stops_the_checkpointer(tmp_path):
    opened = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    try:
        with opened.transaction() as txn:
            txn.set_meta("a", b"1")
        checkpointer = opened.writes.checkpointer
        assert _wait_for(lambda: checkpointer.checkpoints >= 1)
        thread = checkpointer._thread
        assert thread is not None and thread.is_alive()
    finally:
        opened.close()
    assert not thread.is_alive()
    assert opened.writes.checkpointer is None


def test_a_checkpointer_that_cannot_open_its_database_says_so_and_stops(tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="kms_server.storage"):
        checkpointer = WalCheckpointer(str(tmp_path / "no-such-directory" / "kms.db"), interval=0.01)
        checkpointer.committed()
        assert _wait_for(lambda: checkpointer.last_error is not None)
        checkpointer._thread.join(5)
    assert not checkpointer._thread.is_alive()
    assert "could not open" in caplog.text and "no-such-directory" in caplog.text
    assert checkpointer.checkpoints == 0
    checkpointer.close()


def test_no_checkpoint_copies_the_log_once_a_sync_has_failed(storage, tmp_path, monkeypatch):
    """After a failed sync (here another process's: its file) the kernel may
    have dropped pages of the log; nothing is copied into the database file."""
    monkeypatch.setattr(WalCheckpointer, "committed", lambda self: None)  # not before the file exists
    with storage.transaction() as txn:
        txn.set_meta("a", b"1")
    checkpointer = storage.writes.checkpointer
    failed = storage.writes.lock_path[: -len("-writer")] + "-sync-failed"
    with open(failed, "w") as f:
        f.write("another process could not sync\n")
    monkeypatch.undo()
    checkpointer.interval = 0.01
    checkpointer.committed()
    assert _wait_for(lambda: checkpointer._thread is not None and not checkpointer._wake.is_set())
    time.sleep(0.2)
    assert checkpointer.checkpoints == 0
    assert _in_database_file_alone(checkpointer.database, "a", tmp_path) is None
    # The operator removes the file (and restarts the node): checkpoints resume.
    os.unlink(failed)
    storage.writes._sync_failed = None  # what the restart clears
    checkpointer.committed()
    assert _wait_for(lambda: checkpointer.checkpoints >= 1), checkpointer.last_error
    assert _in_database_file_alone(checkpointer.database, "a", tmp_path) == b"1"
