"""Reads on PostgreSQL in the reactor thread (kmip_core/reactor_io.py,
kmip_core.db.engine.CooperativeWaits, SqlStorage): a read run as a work of
`ReactorReads` sends its statement and waits for the answer without
blocking the thread, so reads on several connections wait at once in one
thread; what would block otherwise (no kept connection, a connection idle
too long, a write) raises WouldBlock before anything is sent, and the
connection stays usable. Real PostgreSQL on 127.0.0.1:5432, real sockets
watched with select() (tests.twisted_fakes.SelectReactor)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from kmip_core.db.engine import open_engine, parse_db_url, pg_execute
from kmip_core.nonblocking import WouldBlock, in_reactor
from kmip_core.reactor_io import ReactorReads
from kms_server.storage import open_storage
from kms_server.storage.base import StorageUnavailable, StoredObject
from kms_server.storage.sql import SqlStorage
from tests.twisted_fakes import SelectReactor


@pytest.fixture
def pg_engine(postgres_url):
    url, _ = parse_db_url(postgres_url)
    engine = open_engine(url, pool_size=4)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture
def pg_storage(postgres_url):
    storage = open_storage(postgres_url)
    assert isinstance(storage, SqlStorage)
    try:
        yield storage
    finally:
        storage.close()


def in_reactor_read(fn):
    """A job for ReactorReads: `fn()` inside in_reactor(), as a node runs a read."""

    def job():
        with in_reactor():
            return fn()

    return job


def settle(d) -> list:
    """[result] or [Failure] once `d` fires."""
    out: list = []
    d.addBoth(out.append)
    return out


def test_reads_on_two_connections_wait_at_once_in_one_thread(pg_engine):
    """The slow read is still waiting when the quick one, started after it,
    is answered; both in the test's own thread, which no statement blocked."""
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    slow_conn, quick_conn = pg_engine.connect(), pg_engine.connect()
    threads: list = []
    try:

        def query(conn, sql):
            threads.append(threading.get_ident())
            return pg_execute(conn, sql).fetchall()

        slow = settle(reads.start(in_reactor_read(lambda: query(slow_conn, "SELECT 'slow', pg_sleep(0.3)"))))
        quick = settle(reads.start(in_reactor_read(lambda: query(quick_conn, "SELECT 'quick'"))))
        assert reads.waiting == 2 and slow == [] and quick == []
        reactor.pump_until(lambda: quick)
        assert quick == [[("quick",)]] and slow == [] and reads.waiting == 1
        reactor.pump_until(lambda: slow)
        assert slow[0][0][0] == "slow"
        assert set(threads) == {threading.get_ident()}
    finally:
        slow_conn.close()
        quick_conn.close()


def test_a_statement_run_often_enough_to_be_prepared_answers_the_same(pg_engine):
    """psycopg prepares a statement after a few runs (another exchange with
    the server): the same answers, waited for the same way."""
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    with pg_engine.connect() as conn:
        answers = []
        for i in range(8):
            out = settle(reads.start(in_reactor_read(lambda i=i: pg_execute(conn, "SELECT %(n)s::int + 1", {"n": i}).fetchall())))
            reactor.pump_until(lambda out=out: out)
            answers.append(out[0])
    assert answers == [[(i + 1,)] for i in range(8)]


def test_outside_a_work_a_statement_in_the_reactor_raises_would_block_before_it_is_sent(pg_engine):
    with pg_engine.connect() as conn:
        with in_reactor(), pytest.raises(WouldBlock, match="PostgreSQL round trip"):
            pg_execute(conn, "SELECT 1")
        # Nothing was sent: the connection is idle and answers the next one.
        assert conn.connection.driver_connection.pgconn.transaction_status == 0  # IDLE
        assert pg_execute(conn, "SELECT 2").fetchall() == [(2,)]


def test_on_a_pool_thread_statements_wait_the_blocking_way(pg_engine):
    with pg_engine.connect() as conn:
        assert pg_execute(conn, "SELECT 3").fetchall() == [(3,)]


def test_a_connection_dropped_while_its_read_waits_fails_it_as_a_disconnect(pg_engine, postgres_url):
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    conn = pg_engine.connect()
    pid = pg_execute(conn, "SELECT pg_backend_pid()").fetchall()[0][0]
    out = settle(reads.start(in_reactor_read(lambda: pg_execute(conn, "SELECT pg_sleep(30)").fetchall())))
    assert reads.waiting == 1
    url, _ = parse_db_url(postgres_url)
    other = open_engine(url, poolclass=NullPool)
    with other.connect() as killer:
        killer.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
    other.dispose()
    reactor.pump_until(lambda: out)
    assert out[0].check(DBAPIError) and out[0].value.connection_invalidated
    assert reads.waiting == 0 and not reactor.readers
    conn.close()
    with pg_engine.connect() as fresh:  # the pool was replaced
        assert pg_execute(fresh, "SELECT pg_backend_pid()").fetchall()[0][0] != pid


# The storage: reads on kept connections; what would block raises first.


def kept_reader(storage: SqlStorage) -> None:
    """Leave one reader's connection kept (a read on this thread)."""
    with storage.transaction(read_only=True) as txn:
        txn.get_meta("none")
    assert storage.idle_readers >= 1


def test_a_storage_read_in_the_reactor_waits_there_on_a_kept_connection(pg_storage):
    with pg_storage.transaction() as txn:
        txn.insert_object(StoredObject(uid="uid-1", owner="alice", sealed_material=b"sealed", attributes=[]))
    kept_reader(pg_storage)
    kept = pg_storage.idle_readers
    reactor = SelectReactor()
    reads = ReactorReads(reactor)

    def read():
        with pg_storage.transaction(read_only=True) as txn:
            return txn.get_object("uid-1")

    out = settle(reads.start(in_reactor_read(read)))
    assert reads.waiting == 1 and pg_storage.idle_readers == kept - 1
    reactor.pump_until(lambda: out)
    assert out[0].uid == "uid-1" and out[0].owner == "alice"
    assert pg_storage.idle_readers == kept  # kept again


def test_reads_in_the_reactor_at_once_each_take_a_kept_connection_and_one_too_many_would_block(pg_storage):
    kept_reader(pg_storage)
    reactor = SelectReactor()
    reads = ReactorReads(reactor)

    def read():
        with pg_storage.transaction(read_only=True) as txn:
            return txn.get_meta("none")

    first = settle(reads.start(in_reactor_read(read)))
    assert reads.waiting == 1 and pg_storage.idle_readers == 0
    with pytest.raises(WouldBlock, match="connection from the pool"):
        reads.start(in_reactor_read(read))
    reactor.pump_until(lambda: first)
    assert first == [None] and pg_storage.idle_readers == 1


def test_a_kept_connection_idle_too_long_is_left_to_the_pool(pg_storage, monkeypatch):
    """Its ping, or its return to the pool, talks to the server: a read in
    the reactor starts over on the pool, where it is closed."""
    from kms_server.storage import sql

    kept_reader(pg_storage)
    kept = pg_storage.idle_readers
    monkeypatch.setattr(sql, "PING_AFTER_IDLE_SECONDS", -1.0)

    def read():
        with pg_storage.transaction(read_only=True) as txn:
            return txn.get_meta("none")

    with pytest.raises(WouldBlock, match="idle too long"):
        ReactorReads(SelectReactor()).start(in_reactor_read(read))
    assert pg_storage.idle_readers == kept  # not closed in the reactor
    assert read() is None  # on a pool thread: closed, and a new one used
    assert pg_storage.idle_readers == 1


def test_a_write_transaction_in_the_reactor_would_block_on_postgresql(pg_storage):
    def write():
        with pg_storage.transaction() as txn:
            txn.set_meta("k", b"v")

    with pytest.raises(WouldBlock, match="write transaction on PostgreSQL"):
        ReactorReads(SelectReactor()).start(in_reactor_read(write))
    with pg_storage.transaction(read_only=True) as txn:
        assert txn.get_meta("k") is None


def test_a_read_in_the_reactor_whose_server_went_away_is_unavailable_and_keeps_no_connection(pg_storage, postgres_url):
    kept_reader(pg_storage)
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    with pg_storage.transaction(read_only=True) as txn:
        pid = txn._conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()  # the kept one, taken and kept again
    url, _ = parse_db_url(postgres_url)
    other = open_engine(url, poolclass=NullPool)
    with other.connect() as killer:
        killer.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
    other.dispose()

    def read():
        with pg_storage.transaction(read_only=True) as txn:
            return txn.get_meta("none")

    out = settle(reads.start(in_reactor_read(read)))
    reactor.pump_until(lambda: out)
    assert out[0].check(StorageUnavailable)
    assert pg_storage.idle_readers == 0


def test_transactions_of_one_thread_still_do_not_nest(pg_storage):
    from kms_server.storage.base import StorageError

    with pg_storage.transaction(read_only=True):
        with pytest.raises(StorageError, match="do not nest"):
            with pg_storage.transaction(read_only=True):
                pass


def keep_two_readers(storage: SqlStorage) -> None:
    """Leave two readers' connections kept: two reads at once, on two threads."""
    both_in = threading.Barrier(2)

    def read():
        with storage.transaction(read_only=True) as txn:
            txn.get_meta("none")
            both_in.wait(10)

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert storage.idle_readers == 2


def test_reads_waiting_at_once_in_the_reactor_each_have_a_transaction_of_their_own(pg_storage):
    """Two works of one thread each hold a transaction while they wait: a
    work's open transaction is its own (a context variable), not the
    thread's, so the second is not refused as nested in the first."""
    keep_two_readers(pg_storage)
    reactor = SelectReactor()
    reads = ReactorReads(reactor)

    def read():
        with pg_storage.transaction(read_only=True) as txn:
            return txn.get_meta("none")

    outs = [settle(reads.start(in_reactor_read(read))) for _ in range(2)]
    assert reads.waiting == 2
    reactor.pump_until(lambda: all(outs))
    assert outs == [[None], [None]]
    assert pg_storage.idle_readers == 2


def test_a_wait_given_a_time_limit_in_a_reactor_read_would_block_before_it_starts(pg_engine):
    """Only psycopg's own wait keeps a time limit: in the reactor such a
    wait raises WouldBlock, its generator not started."""
    started: list = []

    def gen():
        started.append(True)
        yield 1

    with pg_engine.connect() as conn:
        driver = conn.connection.driver_connection

        def job():
            with in_reactor():
                driver.wait(gen(), timeout=1.0)

        with pytest.raises(WouldBlock, match="PostgreSQL round trip"):
            ReactorReads(SelectReactor()).start(job)
    assert started == []
