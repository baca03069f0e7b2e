"""kmip_core.db.engine: the one place that turns a db_url into an
engine, for the KMS storage, its admin tools and the broker."""

from __future__ import annotations

import sqlite3
import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from kmip_core.db.engine import (
    READ_ONLY,
    DatabaseUrlError,
    SqliteRead,
    SqliteWrite,
    configure_sqlite,
    open_engine,
    parse_db_url,
    pg_defer,
    pg_execute,
    pg_take_deferred,
    sqlite_execute,
)


def test_plain_postgresql_means_psycopg_and_the_password_is_not_shown():
    url, shown = parse_db_url("postgresql://kms:hunter2@db.example/kms")
    assert url.drivername == "postgresql+psycopg"
    assert "hunter2" not in shown and "db.example/kms" in shown


@pytest.mark.parametrize(
    "db_url, words",
    [
        ("not a url", "malformed"),
        ("sqlite://", "in-memory"),
        ("sqlite:///:memory:", "in-memory"),
        ("sqlite:///file::memory:?cache=shared", "in-memory"),
        ("mysql://u:hunter2@h/db", "unsupported"),
    ],
)
def test_urls_that_cannot_serve_are_refused_in_one_line(db_url, words):
    with pytest.raises(DatabaseUrlError) as info:
        parse_db_url(db_url, setting="storage.db_url")
    message = str(info.value)
    assert words in message and "storage.db_url" in message
    assert "\n" not in message and "hunter2" not in message


@pytest.fixture
def one_row_engine(tmp_path):
    """A configured SQLite engine on x.db, whose table t holds one row."""
    url, _ = parse_db_url(f"sqlite:///{tmp_path / 'x.db'}")
    engine = open_engine(url, pool_size=2)
    configure_sqlite(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v INTEGER)")
        conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    yield engine
    engine.dispose()


def test_sqlite_writer_takes_the_lock_at_begin_and_a_reader_does_not_wait(tmp_path, one_row_engine):
    engine = one_row_engine
    with engine.begin() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
    with engine.begin() as writer:
        # The lock is held from BEGIN on, before the first write: a second
        # writer cannot start.
        other = sqlite3.connect(tmp_path / "x.db", timeout=0, isolation_level=None)
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
        other.close()
        writer.exec_driver_sql("INSERT INTO t VALUES (2)")
        # A reader (READ_ONLY option) runs beside the open write transaction
        # and sees the last committed state.
        with engine.connect().execution_options(**{READ_ONLY: True}) as reader:
            with reader.begin():
                assert reader.execute(text("SELECT count(*) FROM t")).scalar() == 1


@pytest.mark.parametrize("end", ["commit", "rollback"])
def test_a_read_begun_on_the_sqlite3_connection_keeps_one_snapshot_and_ends_whole(one_row_engine, end):
    """SqliteRead: raw statements and statements run through SQLAlchemy in
    it read one snapshot (a commit made meanwhile is not seen), the second
    kind joins it instead of failing to begin, and commit or rollback leaves
    the connection outside any transaction (no read mark kept on the WAL)."""
    engine = one_row_engine
    with engine.connect().execution_options(**{READ_ONLY: True}) as reader:
        for through_sqlalchemy in (False, True):
            read = SqliteRead(reader)
            assert sqlite_execute(reader, "SELECT count(*) FROM t").fetchall() == [(1,)]
            with engine.begin() as writer:
                writer.exec_driver_sql("INSERT INTO t VALUES (2)")
            if through_sqlalchemy:
                assert reader.execute(text("SELECT count(*) FROM t")).scalar() == 1
                assert reader.in_transaction()
            assert sqlite_execute(reader, "SELECT count(*) FROM t").fetchall() == [(1,)]
            getattr(read, end)()
            assert not reader.in_transaction()
            assert not reader.connection.driver_connection.in_transaction
            with engine.begin() as writer:
                writer.exec_driver_sql("DELETE FROM t WHERE v = 2")


def _count(engine) -> int:
    """The rows of t a reader sees (it does not wait for the writer)."""
    with engine.connect().execution_options(**{READ_ONLY: True}) as conn:
        return conn.exec_driver_sql("SELECT count(*) FROM t").scalar()


@pytest.mark.parametrize("through_sqlalchemy", [False, True])
def test_a_write_begun_on_the_sqlite3_connection_holds_the_lock_and_commits_whole(one_row_engine, through_sqlalchemy):
    """SqliteWrite: BEGIN IMMEDIATE on the sqlite3 connection takes the
    write lock at once (another writer cannot begin), nothing is seen by
    others before the commit, a statement run through SQLAlchemy inside it
    joins it instead of failing to begin, and commit ends both: the
    connection is outside any transaction, ready for the next."""
    engine = one_row_engine
    with engine.connect() as conn:
        write = SqliteWrite(conn)
        with engine.connect() as other:
            sqlite_execute(other, "PRAGMA busy_timeout = 0")
            with pytest.raises(OperationalError, match="locked"):
                sqlite_execute(other, "BEGIN IMMEDIATE")  # before its first write
        sqlite_execute(conn, "INSERT INTO t VALUES (2)")
        if through_sqlalchemy:
            conn.execute(text("INSERT INTO t VALUES (3)"))
            assert conn.in_transaction()
        assert _count(engine) == 1, "not committed yet"
        write.commit()
        assert not conn.in_transaction() and not conn.connection.driver_connection.in_transaction
        assert _count(engine) == (3 if through_sqlalchemy else 2)
        # The next write begins on the same connection as before.
        SqliteWrite(conn).commit()


@pytest.mark.parametrize("through_sqlalchemy", [False, True])
def test_a_write_begun_on_the_sqlite3_connection_rolls_back_whole(one_row_engine, through_sqlalchemy):
    engine = one_row_engine
    with engine.connect() as conn:
        write = SqliteWrite(conn)
        sqlite_execute(conn, "INSERT INTO t VALUES (2)")
        if through_sqlalchemy:
            conn.execute(text("INSERT INTO t VALUES (3)"))
        write.rollback()
        assert not conn.in_transaction() and not conn.connection.driver_connection.in_transaction
        assert _count(engine) == 1


def test_a_sqlalchemy_transaction_outside_a_raw_write_still_begins_immediate(one_row_engine):
    """Only a SqliteWrite open on the connection is joined: a transaction
    SQLAlchemy begins after it ended, or on a connection in a transaction
    begun some other way, takes the write lock itself, as always."""
    engine = one_row_engine
    with engine.connect() as conn:
        SqliteWrite(conn).commit()
        with conn.begin():
            with engine.connect() as other:
                sqlite_execute(other, "PRAGMA busy_timeout = 0")
                with pytest.raises(OperationalError, match="locked"):
                    sqlite_execute(other, "BEGIN IMMEDIATE")
        sqlite_execute(conn, "BEGIN")
        with pytest.raises(OperationalError, match="within a transaction"):
            conn.begin()
        sqlite_execute(conn, "ROLLBACK")


def test_a_failed_begin_of_a_raw_write_leaves_no_mark_on_the_connection(one_row_engine):
    engine = one_row_engine
    with engine.connect() as holder, engine.connect() as conn:
        SqliteWrite(holder)
        sqlite_execute(conn, "PRAGMA busy_timeout = 0")
        with pytest.raises(OperationalError, match="locked"):
            SqliteWrite(conn)
        sqlite_execute(holder, "ROLLBACK")
        # Not taken for a raw write's: SQLAlchemy's own begin runs BEGIN IMMEDIATE.
        sqlite_execute(conn, "BEGIN")
        with pytest.raises(OperationalError, match="within a transaction"):
            conn.begin()
        sqlite_execute(conn, "ROLLBACK")


def test_query_only_engine_refuses_writes(tmp_path):
    url, _ = parse_db_url(f"sqlite:///{tmp_path / 'x.db'}")
    writer = open_engine(url)
    configure_sqlite(writer)
    with writer.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE t (v INTEGER)")
    reader = open_engine(url)
    configure_sqlite(reader, begin="BEGIN", wal=False, query_only=True)
    with pytest.raises(OperationalError, match="readonly"):
        with reader.begin() as conn:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
    with reader.begin() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM t").scalar() == 0
    reader.dispose()
    writer.dispose()


# PostgreSQL: a pooled connection is pinged only after it sat idle.


@pytest.fixture
def pg_engine(postgres_url, monkeypatch):
    """A PostgreSQL engine as open_engine makes it, one pooled connection,
    its pings counted; idle means 0.2 s here."""
    from kmip_core.db import engine as engine_module

    monkeypatch.setattr(engine_module, "PING_AFTER_IDLE_SECONDS", 0.2)
    url, _ = parse_db_url(postgres_url)
    engine = open_engine(url, pool_size=1, max_overflow=0)
    pings: list[int] = []
    real_ping = engine.dialect.do_ping

    def counted(dbapi_connection):
        pings.append(1)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(engine.dialect, "do_ping", counted)
    try:
        yield engine, pings
    finally:
        engine.dispose()


def _backend_pid(engine) -> int:
    with engine.connect() as conn:
        return conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()


def _terminate(postgres_url: str, pid: int) -> None:
    url, _ = parse_db_url(postgres_url)
    other = open_engine(url, poolclass=NullPool)
    with other.connect() as conn:
        conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
    other.dispose()


def test_a_connection_in_use_a_moment_ago_is_not_pinged(pg_engine):
    engine, pings = pg_engine
    first = _backend_pid(engine)
    for _ in range(5):
        assert _backend_pid(engine) == first
    assert pings == []


def test_a_connection_idle_longer_than_the_limit_is_pinged(pg_engine):
    engine, pings = pg_engine
    first = _backend_pid(engine)
    time.sleep(0.3)
    assert _backend_pid(engine) == first
    assert pings == [1]


def test_a_dead_idle_connection_is_replaced_before_use(pg_engine, postgres_url):
    """As pool_pre_ping did: a connection whose server process went away
    while it sat in the pool fails its ping and is replaced; the caller
    sees no error."""
    engine, pings = pg_engine
    first = _backend_pid(engine)
    _terminate(postgres_url, first)
    time.sleep(0.3)
    assert _backend_pid(engine) != first
    assert pings == [1]


def test_a_connection_that_died_a_moment_ago_fails_once_as_a_disconnect(pg_engine, postgres_url):
    """Without a ping the first statement meets the dead connection: a
    disconnect error (kms-server's dispatcher runs the item again), and the
    pool's next connection is a new one."""
    from sqlalchemy.exc import DBAPIError

    engine, _ = pg_engine
    first = _backend_pid(engine)
    _terminate(postgres_url, first)
    with pytest.raises(DBAPIError) as info:
        _backend_pid(engine)
    assert info.value.connection_invalidated
    assert _backend_pid(engine) != first


# pg_execute: statements run on psycopg itself, errors raised as SQLAlchemy would.


def test_pg_execute_runs_in_the_transaction_sqlalchemy_ends(pg_engine):
    engine, _ = pg_engine
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE t (k int PRIMARY KEY, v bytea)")
        conn.commit()
        trans = conn.begin()
        pg_execute(conn, "INSERT INTO t VALUES (%(k)s, %(v)s)", many=[{"k": 1, "v": b"a"}, {"k": 2, "v": b"b"}])
        trans.rollback()
        assert pg_execute(conn, "SELECT count(*) FROM t").fetchone() == (0,)
        with conn.begin():
            pg_execute(conn, "INSERT INTO t VALUES (%(k)s, %(v)s)", {"k": 3, "v": b"c"})
        # A literal % as SQLAlchemy compiles it for psycopg: doubled.
        assert pg_execute(conn, "SELECT k, v, '100%%' FROM t").fetchall() == [(3, b"c", "100%")]
        conn.rollback()


def test_pg_execute_raises_sqlalchemy_errors_without_bound_values(pg_engine):
    from sqlalchemy.exc import IntegrityError

    engine, _ = pg_engine
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE t (k int PRIMARY KEY, v text)")
        conn.commit()
        with pytest.raises(IntegrityError) as info:
            with conn.begin():
                pg_execute(conn, "INSERT INTO t VALUES (%(k)s, %(v)s)", many=[{"k": 1, "v": "secret-1"}, {"k": 1, "v": "secret-2"}])
        assert info.value.orig.sqlstate == "23505"
        assert not info.value.connection_invalidated
        assert "secret" not in str(info.value)
        # The connection is still good.
        assert pg_execute(conn, "SELECT 1").fetchone() == (1,)


def test_pg_execute_on_a_connection_that_died_fails_once_as_a_disconnect(pg_engine, postgres_url):
    """As through SQLAlchemy (the test above): a disconnect error, the
    connection invalidated, and the pool's next connection a new one."""
    from sqlalchemy.exc import DBAPIError

    engine, _ = pg_engine
    first = _backend_pid(engine)
    with engine.connect() as conn:
        _terminate(postgres_url, first)
        with pytest.raises(DBAPIError) as info:
            pg_execute(conn, "SELECT 1")
        assert info.value.connection_invalidated
        assert conn.invalidated
    assert _backend_pid(engine) != first


def test_deferred_statements_run_in_order_ahead_of_the_next_in_the_transaction(pg_engine):
    """One round trip for BEGIN, the deferred statements and the next one;
    each sees what the one before did, and the transaction stays open for
    SQLAlchemy to end. A deferred SAVEPOINT and ROLLBACK TO run in order;
    what is deferred and not sent is taken back whole."""
    from psycopg.pq import TransactionStatus
    from sqlalchemy.exc import ProgrammingError

    engine, _ = pg_engine
    with engine.connect() as conn:
        conn.exec_driver_sql("CREATE TEMP TABLE t (k int PRIMARY KEY)")
        conn.commit()
        trans = conn.begin()
        pg_defer(conn, "INSERT INTO t VALUES (1)")
        counted = pg_execute(conn, "SELECT count(*) FROM t")
        assert counted.fetchone() == (1,)
        assert conn.connection.driver_connection.info.transaction_status == TransactionStatus.INTRANS
        trans.rollback()
        assert pg_execute(conn, "SELECT count(*) FROM t").fetchone() == (0,)
        conn.rollback()
        # A failing statement fails the round trip as SQLAlchemy raises it;
        # the connection serves again after the rollback.
        trans = conn.begin()
        pg_defer(conn, "INSERT INTO t VALUES (2)")
        with pytest.raises(ProgrammingError) as info:
            pg_execute(conn, "SELECT no_such_column FROM t")
        assert not info.value.connection_invalidated
        trans.rollback()
        assert pg_execute(conn, "SELECT count(*) FROM t").fetchone() == (0,)
        conn.rollback()
        # Savepoints.
        trans = conn.begin()
        pg_execute(conn, "INSERT INTO t VALUES (1)")
        pg_defer(conn, "SAVEPOINT s")
        pg_execute(conn, "INSERT INTO t VALUES (2)")
        pg_defer(conn, "ROLLBACK TO s")
        pg_defer(conn, "RELEASE s")
        assert pg_execute(conn, "SELECT k FROM t ORDER BY k").fetchall() == [(1,)]
        assert pg_take_deferred(conn) == []
        pg_defer(conn, "SAVEPOINT s")
        assert pg_take_deferred(conn) == ["SAVEPOINT s"] and pg_take_deferred(conn) == []
        trans.commit()
        assert pg_execute(conn, "SELECT k FROM t").fetchall() == [(1,)]
        conn.rollback()
