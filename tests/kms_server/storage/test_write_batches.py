"""Group commit of writers (kms_server.storage.sql.WriteBatches), on
SQLite and on PostgreSQL: writers that queue behind an open transaction
share its commit, each returns only once it is committed, a failed block
loses only its own changes, a failed commit fails every member; on SQLite
writers of other processes wait on the lock file's flock, on PostgreSQL
writers of other nodes wait on the writers' advisory lock, taken at BEGIN."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import event
from sqlalchemy.exc import OperationalError

from kmip_core.db.engine import READ_ONLY, SqliteWrite
from kms_server.storage import open_storage
from kms_server.storage.base import StorageError, StoredObject
from kms_server.storage.sql import AUDIT_LOCK_KEY, BATCH_MAX, SqlStorage


@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request) -> Iterator[SqlStorage]:
    """A SQL storage with its writers' group commit (not the in-memory
    fake of the contract suite)."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_storage")
        return
    opened = open_storage(request.getfixturevalue("postgres_url"))
    assert isinstance(opened, SqlStorage) and opened.writes is not None
    try:
        yield opened
    finally:
        opened.close()


def _dialect(storage: SqlStorage) -> str:
    return storage.engine.dialect.name


def _hook_write_commits(storage: SqlStorage, monkeypatch: pytest.MonkeyPatch, callback: Callable) -> Callable:
    """Run `callback(conn)` just before each commit of a write transaction
    (readers commit too), where what it raises fails that commit as a
    failed COMMIT would: through SQLAlchemy's commit event, and on SQLite
    through the batches' own commits on the sqlite3 connection
    (kmip_core.db.engine.SqliteWrite), which bypass it. The SqliteWrite
    hook goes with `monkeypatch`; returns the event listener."""

    def listener(conn):
        if not conn.get_execution_options().get(READ_ONLY):
            callback(conn)

    original = SqliteWrite.commit

    def commit(self):
        if not self.conn.in_transaction():  # else SQLAlchemy's commit, and its event
            callback(self.conn)
        original(self)

    event.listen(storage.engine, "commit", listener)
    monkeypatch.setattr(SqliteWrite, "commit", commit)
    return listener


def write_commits(storage: SqlStorage, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Commits of write transactions (readers commit too)."""
    count: list[int] = []
    _hook_write_commits(storage, monkeypatch, lambda _conn: count.append(1))
    return count


@contextlib.contextmanager
def on_write_commit(storage: SqlStorage, callback: Callable) -> Iterator[None]:
    """`callback(conn)` runs just before each commit of a write
    transaction inside the block (what it raises fails that commit)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        listener = _hook_write_commits(storage, monkeypatch, callback)
        try:
            yield
        finally:
            event.remove(storage.engine, "commit", listener)


def refuse_commit(_conn) -> None:
    """A commit that fails as a full disk would make it fail."""
    raise OperationalError("COMMIT", {}, Exception("disk I/O error"))


def _wait_for(predicate, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def _committed(storage: SqlStorage, key: str) -> bytes | None:
    """What a separate reader sees: only committed data."""
    with storage.transaction(read_only=True) as txn:
        return txn.get_meta(key)


class _Holder:
    """A writer that stays inside its block until released, so that others
    queue behind it."""

    def __init__(self, storage: SqlStorage, key: str, fail: bool = False, value: bytes = b"held", write=None):
        self.inside = threading.Event()
        self.release = threading.Event()
        self.error: BaseException | None = None
        self.seen_after: bytes | None = None

        def run():
            try:
                with storage.transaction() as txn:
                    if write is None:
                        txn.set_meta(key, value)
                    else:
                        write(txn)
                    self.inside.set()
                    assert self.release.wait(10)
                    if fail:
                        raise RuntimeError("the block failed")
                self.seen_after = _committed(storage, key)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()
        assert self.inside.wait(10)


def _writer(
    storage: SqlStorage, key: str, results: dict, fail: str | None = None, read_first: bool = False, write=None
):
    def run():
        try:
            with storage.transaction() as txn:
                if read_first:
                    # A statement of its own before its write (every write
                    # of an object reads it first): on PostgreSQL a batch's
                    # meta writes are sent only before its COMMIT.
                    txn.get_object(f"absent-{key}")
                if write is None:
                    txn.set_meta(key, key.encode())
                else:
                    write(txn)
                if fail == "raise":
                    raise ValueError("refused by the operation")
                if fail == "storage":
                    with pytest.raises(StorageError):
                        txn.get_meta(object())  # type: ignore[arg-type]
            # Back from the block: the change is committed, visible to any reader.
            results[key] = ("ok", _committed(storage, key))
        except BaseException as exc:
            results[key] = ("error", exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _queued_behind(
    storage: SqlStorage, holder: _Holder, count: int, before_release=None, read_first: bool = False
) -> dict:
    """Queue `count` writers (w0, w1, ...) behind the holder's open batch,
    run `before_release`, release the holder and wait for all: each
    writer's result."""
    results: dict = {}
    threads = [_writer(storage, f"w{i}", results, read_first=read_first) for i in range(count)]
    _wait_for(lambda: storage.writes.waiting == count, "queued writers")
    if before_release is not None:
        before_release()
    holder.release.set()
    for t in [holder.thread, *threads]:
        t.join(15)
    return results


def test_a_writer_alone_commits_its_own_transaction(storage, monkeypatch):
    commits = write_commits(storage, monkeypatch)
    with storage.transaction() as txn:
        txn.set_meta("alone", b"1")
    assert commits == [1]
    assert _committed(storage, "alone") == b"1"


def test_writers_queued_behind_an_open_transaction_share_its_commit(storage, monkeypatch):
    commits = write_commits(storage, monkeypatch)
    holder = _Holder(storage, "first")
    results = _queued_behind(storage, holder, 5)
    assert holder.error is None and holder.seen_after == b"held"
    # Every writer, back from its block, saw its own change committed.
    assert results == {f"w{i}": ("ok", f"w{i}".encode()) for i in range(5)}
    # Six writers, one commit: the holder's batch took the five queued behind it.
    assert len(commits) == 1


def test_a_batch_holds_at_most_batch_max_writers(storage, monkeypatch):
    commits = write_commits(storage, monkeypatch)
    count = BATCH_MAX + 3
    results = _queued_behind(storage, _Holder(storage, "first"), count)
    assert all(status == "ok" for status, _ in results.values()) and len(results) == count
    assert len(commits) == 2


@pytest.mark.parametrize("fail", ["raise", "storage"])
def test_a_failed_block_loses_its_own_changes_only(storage, fail):
    holder = _Holder(storage, "first")
    results: dict = {}
    before = _writer(storage, "before", results)
    _wait_for(lambda: storage.writes.waiting == 1, "a queued writer")
    failing = _writer(storage, "failing", results, fail=fail)
    _wait_for(lambda: storage.writes.waiting == 2, "two queued writers")
    after = _writer(storage, "after", results)
    _wait_for(lambda: storage.writes.waiting == 3, "three queued writers")
    holder.release.set()
    for t in (holder.thread, before, failing, after):
        t.join(10)
    status, error = results["failing"]
    assert status == "error"
    if fail == "raise":
        assert isinstance(error, ValueError)
    else:
        assert isinstance(error, StorageError) and "rolled back" in str(error)
    assert _committed(storage, "failing") is None
    assert results["before"] == ("ok", b"before") and results["after"] == ("ok", b"after")
    assert holder.seen_after == b"held"


def test_the_last_writer_failing_still_commits_the_others(storage):
    holder = _Holder(storage, "first")
    results: dict = {}
    t1 = _writer(storage, "kept", results)
    _wait_for(lambda: storage.writes.waiting == 1, "a queued writer")
    t2 = _writer(storage, "failing", results, fail="raise")
    _wait_for(lambda: storage.writes.waiting == 2, "two queued writers")
    holder.release.set()
    for t in (holder.thread, t1, t2):
        t.join(10)
    assert results["kept"] == ("ok", b"kept")
    assert results["failing"][0] == "error"
    assert _committed(storage, "first") == b"held" and _committed(storage, "failing") is None


@pytest.mark.parametrize("fail", ["raise", "storage"])
def test_a_batch_whose_last_member_failed_commits_without_its_changes(storage, fail):
    """One writer queued behind the holder, and it fails: the batch ends
    with that member's changes undone (on PostgreSQL its ROLLBACK TO, sent
    with the next statement otherwise, is sent before the COMMIT)."""
    holder = _Holder(storage, "first")
    results: dict = {}
    failing = _writer(storage, "failing", results, fail=fail)
    _wait_for(lambda: storage.writes.waiting == 1, "a queued writer")
    holder.release.set()
    for t in (holder.thread, failing):
        t.join(10)
    assert results["failing"][0] == "error"
    assert holder.error is None and holder.seen_after == b"held"
    assert _committed(storage, "failing") is None
    # The connection serves the next batch, with no savepoint left over.
    with storage.transaction() as txn:
        txn.set_meta("next", b"1")
    assert _committed(storage, "next") == b"1" and _committed(storage, "failing") is None


def _inserts(uid: str):
    return lambda txn: txn.insert_object(StoredObject(uid=uid, owner="alice", sealed_material=None, attributes=[]))


def test_a_batch_that_writes_no_meta_row_and_whose_last_member_failed_commits_without_its_changes(storage):
    """As above, with members that write objects only: on PostgreSQL the
    failed member's ROLLBACK TO is then the one statement sent before the
    COMMIT."""
    holder = _Holder(storage, "first", write=_inserts("first"))
    results: dict = {}
    failing = _writer(storage, "failing", results, fail="raise", write=_inserts("failing"))
    _wait_for(lambda: storage.writes.waiting == 1, "a queued writer")
    holder.release.set()
    for t in (holder.thread, failing):
        t.join(10)
    assert results["failing"][0] == "error" and holder.error is None
    with storage.transaction(read_only=True) as txn:
        assert txn.get_object("first") is not None
        assert txn.get_object("failing") is None


def test_a_failed_first_block_is_rolled_back_and_the_queued_writers_still_commit(storage, monkeypatch):
    """The first block of a batch runs without a savepoint: its failure
    rolls the whole transaction back, and the writers queued behind it
    start the next one."""
    commits = write_commits(storage, monkeypatch)
    holder = _Holder(storage, "first", fail=True)
    results = _queued_behind(storage, holder, 3)
    assert isinstance(holder.error, RuntimeError)
    assert _committed(storage, "first") is None
    assert results == {f"w{i}": ("ok", f"w{i}".encode()) for i in range(3)}
    assert len(commits) == 1


def test_a_failed_commit_fails_every_member_and_stores_nothing(storage):
    holder = _Holder(storage, "first")

    with on_write_commit(storage, refuse_commit):
        results = _queued_behind(storage, holder, 3)
    assert isinstance(holder.error, StorageError) and "commit" in str(holder.error)
    for i in range(3):
        status, error = results[f"w{i}"]
        assert status == "error" and isinstance(error, StorageError) and "commit" in str(error)
    for key in ("first", "w0", "w1", "w2"):
        assert _committed(storage, key) is None
    # The failed batch's connection was not kept for the next one.
    assert not storage.writes.holds_connection
    # The queue is usable afterwards.
    with storage.transaction() as txn:
        txn.set_meta("later", b"1")
    assert _committed(storage, "later") == b"1"


def test_batches_of_a_process_run_on_one_kept_connection(storage):
    """Connecting and returning a connection for every batch cost more
    than a small write: the writers' connection is kept from one batch to
    the next (and goes back to the pool only when the storage closes)."""
    seen = []
    with on_write_commit(storage, lambda conn: seen.append(conn.connection.dbapi_connection)):
        for i in range(3):
            with storage.transaction() as txn:
                txn.set_meta(f"k{i}", b"1")
    assert len(seen) == 3 and seen[0] is seen[1] is seen[2]
    assert storage.writes.holds_connection
    assert storage.engine.pool.checkedout() == 1
    # A read runs on a connection of its own, kept for the next read.
    with storage.transaction(read_only=True) as txn:
        assert txn.get_meta("k2") == b"1"
    assert storage.idle_readers == 1 and storage.engine.pool.checkedout() == 2
    storage.close()
    assert storage.engine.pool.checkedout() == 0


def test_a_batch_rolled_back_by_its_block_keeps_its_clean_connection(storage):
    """A block that raises rolls its batch back; the connection is clean
    and kept (a commit the database refuses drops it: the test above)."""
    with pytest.raises(RuntimeError), storage.transaction() as txn:
        txn.set_meta("lost", b"1")
        raise RuntimeError("block failed")
    assert storage.writes.holds_connection
    assert _committed(storage, "lost") is None
    with storage.transaction() as txn:
        txn.set_meta("kept", b"1")
    assert _committed(storage, "kept") == b"1"


def test_readers_reuse_their_connections_and_drop_a_failed_one(storage):
    """A read-only transaction's connection is kept for the next reader,
    also after the block raised (its rollback worked); one whose
    transaction failed in the database is closed, and the next reader
    still reads committed data."""
    with storage.transaction() as txn:
        txn.set_meta("k", b"v")
    opened = []  # new database connections (a read runs on the driver's own, past SQLAlchemy's events)
    event.listen(storage.engine, "connect", lambda dbapi_conn, _record: opened.append(dbapi_conn))
    for _ in range(3):
        with storage.transaction(read_only=True) as txn:
            assert txn.get_meta("k") == b"v"
    with pytest.raises(LookupError), storage.transaction(read_only=True) as txn:
        raise LookupError("no such object")
    assert len(opened) == 1, "four readers, one connection"
    assert storage.idle_readers == 1
    with pytest.raises(StorageError), storage.transaction(read_only=True) as txn:
        with pytest.raises(StorageError):
            txn.set_meta("k", b"w")  # refused: the transaction is read-only, and fails
    assert storage.idle_readers == 0
    with storage.transaction(read_only=True) as txn:
        assert txn.get_meta("k") == b"v"
    assert storage.idle_readers == 1


def test_reads_are_not_queued_behind_an_open_batch(storage):
    with storage.transaction() as txn:
        txn.set_meta("k", b"old")
    holder = _Holder(storage, "k")
    # A reader goes straight in and sees the last committed value.
    assert _committed(storage, "k") == b"old"
    holder.release.set()
    holder.thread.join(10)
    assert _committed(storage, "k") == b"held"


def test_the_lock_file_is_private_and_writers_wait_for_its_flock(sqlite_storage):
    storage = sqlite_storage  # PostgreSQL: the advisory lock (below)
    with storage.transaction() as txn:
        txn.set_meta("k", b"1")
    path = storage.writes.lock_path
    assert path is not None and os.path.exists(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    # Another process holds the writers' flock (as another worker's batch
    # would): a writer here waits for it instead of entering.
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); sys.stdin.readline()",
            path,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        results: dict = {}
        writer = _writer(storage, "blocked", results)
        writer.join(0.5)
        assert writer.is_alive() and "blocked" not in results
        holder.stdin.write("\n")
        holder.stdin.flush()
        writer.join(10)
        assert results["blocked"] == ("ok", b"blocked")
    finally:
        holder.kill()
        holder.wait()
    # And the flock is released after each batch.
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)


# PostgreSQL: the writers' advisory lock, taken at BEGIN.


@pytest.fixture
def pg_storages(postgres_url) -> Iterator[tuple[SqlStorage, SqlStorage]]:
    """Two storages on one PostgreSQL database, as two nodes of a cluster."""
    first, second = open_storage(postgres_url), open_storage(postgres_url)
    assert isinstance(first, SqlStorage) and isinstance(second, SqlStorage)
    try:
        yield first, second
    finally:
        first.close()
        second.close()


def _lock_waits(storage: SqlStorage) -> list[tuple[str, int | None]]:
    """(locktype, objid) of every lock a backend of this database waits for."""
    with storage.engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT locktype, objid FROM pg_locks WHERE NOT granted"
            " AND (database IS NULL OR database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
        ).all()
    return [(row[0], None if row[1] is None else int(row[1])) for row in rows]


def test_a_batch_of_another_node_waits_at_begin_and_nothing_deadlocks(pg_storages):
    """Node B's writer, whose block writes k2 then k, waits for the
    writers' lock before it takes any row; node A's open batch, holding k,
    then takes k2 in its next member. Without the lock at BEGIN, B would
    hold k2 and wait for k while A waited for k2: PostgreSQL's deadlock
    detector would fail one of them after a second."""
    a, b = pg_storages
    holder = _Holder(a, "k")  # A's batch is open and holds the row k
    results: dict = {}

    def node_b():
        try:
            with b.transaction() as txn:
                txn.set_meta("k2", b"from b")
                txn.set_meta("k", b"from b")
            results["b"] = "ok"
        except BaseException as exc:
            results["b"] = exc

    thread_b = threading.Thread(target=node_b)
    thread_b.start()
    waits: list = []
    _wait_for(lambda: bool(waits.extend(_lock_waits(a)) or waits), "node B waiting for a lock")
    assert _committed(a, "k2") is None  # B has committed nothing
    # A's next member takes k2, which B would have locked.
    queued = _writer(a, "k2", results)
    _wait_for(lambda: a.writes.waiting == 1, "a queued writer on node A")
    holder.release.set()
    for t in (holder.thread, queued, thread_b):
        t.join(15)
    assert holder.error is None
    assert results["k2"] == ("ok", b"k2") or results["k2"] == ("ok", b"from b")
    assert results["b"] == "ok", results["b"]
    # B ran after A's batch committed: its values are the last ones.
    assert _committed(a, "k") == b"from b" and _committed(a, "k2") == b"from b"
    # What B waited for was the writers' lock, not a row.
    assert waits == [("advisory", AUDIT_LOCK_KEY)]


def test_a_writer_waits_while_another_session_holds_the_writers_lock(postgres_url):
    storage = open_storage(postgres_url)
    assert isinstance(storage, SqlStorage)
    other = storage.engine.connect()
    try:
        trans = other.begin()
        other.exec_driver_sql(f"SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})")
        results: dict = {}
        writer = _writer(storage, "waits", results)
        writer.join(0.5)
        assert writer.is_alive() and "waits" not in results
        trans.commit()
        writer.join(10)
        assert results["waits"] == ("ok", b"waits")
    finally:
        other.close()
        storage.close()


def test_a_batch_whose_connection_is_killed_fails_every_member_and_the_next_write_reconnects(postgres_url):
    """The batch's backend terminated (a failover, an operator's
    pg_terminate_backend) while writers queue: the batch's members fail
    (the holder's block, and the writer that met the lost connection),
    nothing of the batch is stored, and the writers that had not joined it
    run in a new batch on a new connection."""
    storage = open_storage(postgres_url)
    assert isinstance(storage, SqlStorage)
    try:
        holder = _Holder(storage, "first")
        pid = storage.writes._conn.connection.driver_connection.info.backend_pid

        def terminate():
            with storage.engine.connect() as admin:
                admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
                admin.commit()

        results = _queued_behind(storage, holder, 3, terminate, read_first=True)
        assert isinstance(holder.error, StorageError)
        assert _committed(storage, "first") is None
        failed = [key for key, (status, _) in results.items() if status == "error"]
        # The writer that joined the broken batch failed with it; the
        # others, queued behind, committed in the next batch.
        assert len(failed) == 1 and isinstance(results[failed[0]][1], StorageError)
        assert _committed(storage, failed[0]) is None
        for key, (status, seen) in results.items():
            if status == "ok":
                assert seen == key.encode() and _committed(storage, key) == key.encode()
        with storage.transaction() as txn:
            txn.set_meta("later", b"1")
        assert _committed(storage, "later") == b"1"
        assert storage.writes._conn.connection.driver_connection.info.backend_pid != pid
    finally:
        storage.close()


def test_a_read_on_postgresql_runs_each_statement_on_its_own(postgres_url):
    """A read-only transaction holds no transaction open in PostgreSQL
    between its statements (BEGIN and COMMIT were two of a Get's three
    round trips; under READ COMMITTED each statement saw what was committed
    when it began either way); a write transaction's block runs inside one."""
    from psycopg.pq import TransactionStatus

    storage = open_storage(postgres_url)
    assert isinstance(storage, SqlStorage)
    try:
        with storage.transaction() as txn:
            txn.set_meta("k", b"v")
            assert txn._conn.connection.driver_connection.info.transaction_status == TransactionStatus.INTRANS
        with storage.transaction(read_only=True) as txn:
            assert txn.get_meta("k") == b"v"
            assert txn._conn.connection.driver_connection.info.transaction_status == TransactionStatus.IDLE
        # Still read-only: a write is refused, and the transaction fails.
        with pytest.raises(StorageError, match="rolled back"), storage.transaction(read_only=True) as txn:
            with pytest.raises(StorageError, match="read-only"):
                txn.set_meta("k", b"w")
        assert _committed(storage, "k") == b"v"
        # The connections go back to the pool as they came (the failed
        # reader's now, the kept one's when the storage closes): the next
        # write on them runs in a transaction again.
        assert storage.idle_readers == 1
        storage.close()
        for _ in range(2):
            with storage.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
                assert conn.connection.driver_connection.info.transaction_status == TransactionStatus.INTRANS
    finally:
        storage.close()


def _reader_pids(storage: SqlStorage, count: int) -> list[int]:
    """Make `count` readers' connections kept (reads that overlap), and
    return their backends' process ids."""
    inside = threading.Barrier(count)
    pids: list[int] = []

    def read() -> None:
        with storage.transaction(read_only=True) as txn:
            pids.append(txn._conn.connection.driver_connection.info.backend_pid)
            inside.wait(10)

    threads = [threading.Thread(target=read) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert storage.idle_readers == count and len(set(pids)) == count
    return pids


def _terminate(storage: SqlStorage, pids: list[int]) -> None:
    with storage.engine.connect() as admin:
        for pid in pids:
            admin.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        admin.commit()


def test_a_reader_kept_idle_longer_than_the_ping_limit_goes_back_to_the_pool(postgres_url, monkeypatch):
    """PostgreSQL: a kept reader's connection that sat idle longer than
    PING_AFTER_IDLE_SECONDS is not used as it is (the server may have
    dropped it: a failover); it goes back to the pool, which pings it, and
    the read runs without an error on a live connection."""
    from kmip_core.db import engine as engine_module
    from kms_server.storage import sql

    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 0.2)
    monkeypatch.setattr(sql, "PING_AFTER_IDLE_SECONDS", 0.2)
    storage = open_storage(postgres_url)
    assert isinstance(storage, SqlStorage)
    try:
        with storage.transaction() as txn:
            txn.set_meta("k", b"v")
        [pid] = _reader_pids(storage, 1)
        _terminate(storage, [pid])
        time.sleep(0.3)
        with storage.transaction(read_only=True) as txn:
            assert txn.get_meta("k") == b"v"
            assert txn._conn.connection.driver_connection.info.backend_pid != pid
        assert storage.idle_readers == 1
    finally:
        storage.close()


def test_a_read_on_a_dropped_connection_fails_once_and_drops_every_kept_reader(postgres_url):
    """PostgreSQL: the kept readers' backends terminated a moment ago (a
    failover): the next read meets a dead connection and fails as the
    database being unavailable (the dispatcher retries it); the other kept
    readers, dropped by the same server, are closed with it, and the next
    read runs on a new connection."""
    from kms_server.storage.base import StorageUnavailable

    storage = open_storage(postgres_url)
    assert isinstance(storage, SqlStorage)
    try:
        with storage.transaction() as txn:
            txn.set_meta("k", b"v")
        pids = _reader_pids(storage, 2)
        _terminate(storage, pids)
        with pytest.raises(StorageUnavailable), storage.transaction(read_only=True) as txn:
            txn.get_meta("k")
        assert storage.idle_readers == 0
        with storage.transaction(read_only=True) as txn:
            assert txn.get_meta("k") == b"v"
            assert txn._conn.connection.driver_connection.info.backend_pid not in pids
    finally:
        storage.close()


def test_each_shared_commit_is_reported_with_the_writes_it_served(storage):
    reports: list[tuple[int, bool]] = []
    storage.on_shared_commit(lambda writes, committed: reports.append((writes, committed)))
    with storage.transaction() as txn:
        txn.set_meta("alone", b"1")
    assert reports == [(1, True)]
    _queued_behind(storage, _Holder(storage, "first"), 3)
    assert reports[1:] == [(4, True)]
    # A block that raises alone commits nothing: nothing to report.
    with pytest.raises(RuntimeError), storage.transaction() as txn:
        txn.set_meta("lost", b"1")
        raise RuntimeError("block failed")
    assert len(reports) == 2

    with on_write_commit(storage, refuse_commit), pytest.raises(StorageError), storage.transaction() as txn:
        txn.set_meta("refused", b"1")
    assert reports[2:] == [(1, False)]


def test_a_batch_moves_a_meta_row_once_and_a_failed_member_leaves_it_as_it_was(postgres_url, pg_statements):
    """PostgreSQL: the members of a batch that each read a meta row under
    lock and write it (the store digest: every write moves it) see the
    value the member before them left; a member that fails leaves it as it
    was; the row is read once and written once, before the COMMIT."""
    storage = open_storage(postgres_url)
    assert isinstance(storage, SqlStorage)
    try:
        with storage.transaction() as txn:
            txn.set_meta("counter", b"0")
        sent = pg_statements.start()
        seen: list[bytes] = []

        def bump(fail: bool = False) -> None:
            with storage.transaction() as txn:
                value = txn.get_meta("counter", for_update=True)
                seen.append(value)
                txn.set_meta("counter", str(int(value) + 1).encode())
                if fail:
                    raise ValueError("refused")

        holder = _Holder(storage, "counter", value=b"10")
        errors: list[BaseException] = []

        def run(fail: bool) -> None:
            try:
                bump(fail)
            except ValueError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(i == 1,)) for i in range(4)]
        for i, thread in enumerate(threads):
            thread.start()
            _wait_for(lambda i=i: storage.writes.waiting == i + 1, "queued writers")
        holder.release.set()
        for thread in (holder.thread, *threads):
            thread.join(10)
        assert holder.error is None and len(errors) == 1
        # Three members bumped it from the holder's 10; the failed one's
        # bump was undone, whichever of them it was.
        assert _committed(storage, "counter") == b"13"
        assert sorted(seen)[0] == b"10" and len(seen) == 4
        reads = [s for s in sent.starting("SELECT kms_meta.value") if "FOR UPDATE" in s]
        writes = sent.starting("INSERT INTO kms_meta")
        assert len(reads) <= 1 and len(writes) <= 2, (reads, writes)
    finally:
        storage.close()
