"""Opening a database URL: one place for the KMS storage, its admin tools
(backup, `kms-admin db`) and the broker's own database.

- ``parse_db_url``: SQLite in a file or PostgreSQL; `postgresql://` means
  psycopg 3, the driver the project installs. Anything else, a malformed URL
  or an in-memory SQLite database (which every pooled connection would see
  as a different, empty database) raises ``DatabaseUrlError`` with one line
  that carries no password.
- ``open_engine``: a SQLAlchemy engine with bound values kept out of
  exception text and SQLAlchemy's log (``hide_parameters``): they are sealed
  key material and attribute values. A SQLite file is made mode 0600 first.
  A pooled PostgreSQL connection is pinged before use only after it sat
  idle (``PING_AFTER_IDLE_SECONDS``), not before every transaction.
- ``configure_sqlite``: SQLite as the services need it (WAL, busy_timeout,
  foreign keys, our own BEGIN so a writer takes the lock up front).
- ``describe_error``: a database error in one line without bound values.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, Connection, Engine, create_engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, DisconnectionError, SQLAlchemyError, StatementError

__all__ = [
    "PING_AFTER_IDLE_SECONDS",
    "READ_ONLY",
    "DatabaseUrlError",
    "SqliteRead",
    "SqliteWrite",
    "AutocommitRead",
    "configure_sqlite",
    "sqlite_execute",
    "sqlite_executemany",
    "pg_defer",
    "pg_execute",
    "pg_take_deferred",
    "describe_error",
    "open_engine",
    "parse_db_url",
    "ping_idle_connections",
    "private_sqlite_file",
    "refresh_statistics",
]

# Execution option of a connection whose transactions only read: on SQLite
# they begin with a plain (deferred) BEGIN, which under WAL neither blocks
# nor waits for the writer.
READ_ONLY = "kms_read_only"

_EXAMPLES = "sqlite:///path/to/file.db or postgresql+psycopg://user@host/dbname"


class DatabaseUrlError(ValueError):
    """The URL names no database this project can use; one line, no password."""


def parse_db_url(db_url: str, *, setting: str = "storage.db_url") -> tuple[URL, str]:
    """The URL to give SQLAlchemy and the form safe to show."""
    try:
        url = make_url(db_url)
    except ArgumentError:
        raise DatabaseUrlError(f"{setting} is malformed; use {_EXAMPLES}") from None
    shown = url.render_as_string(hide_password=True)
    backend = url.get_backend_name()
    if backend == "postgresql" and url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    if backend == "sqlite":
        if url.database in (None, "", ":memory:") or url.database.startswith("file::memory:"):
            raise DatabaseUrlError(
                f"{setting} {shown!r} is an in-memory SQLite database, which each connection sees "
                "separately; use a file (sqlite:///path)"
            )
    elif backend != "postgresql":
        raise DatabaseUrlError(f"{setting} {shown!r} names an unsupported database; use {_EXAMPLES}")
    return url, shown


def open_engine(url: URL, **options: Any) -> Engine:
    """An engine for a URL from parse_db_url; ``options`` go to
    create_engine (pool_size, poolclass, ...). Raises SQLAlchemyError or
    ImportError (driver missing) as create_engine does."""
    backend = url.get_backend_name()
    if backend == "sqlite":
        private_sqlite_file(url.database)
        # Pooled connections move between threads; each is used by one at a time.
        connect_args: dict[str, Any] = {"timeout": 10, "check_same_thread": False}
        return create_engine(url, connect_args=connect_args, hide_parameters=True, **options)
    engine = create_engine(url, hide_parameters=True, **options)
    if not options.get("pool_pre_ping"):
        ping_idle_connections(engine)
    return engine


# A pooled PostgreSQL connection that sat idle this long is pinged before it
# is handed out; one in use moments ago is not. SQLAlchemy's pool_pre_ping
# pinged before every transaction: two of the nine round trips of a Get
# (issue 15). A connection that died while in use raises a disconnect
# error, which invalidates the whole pool (the next checkouts connect
# again) and which kms-server's dispatcher retries.
PING_AFTER_IDLE_SECONDS = 1.0
_IDLE_SINCE = "kms_idle_since"


def ping_idle_connections(engine: Engine, idle_seconds: float | None = None) -> None:
    """Ping each connection checked out after `idle_seconds` (default
    PING_AFTER_IDLE_SECONDS) in the pool; a dead one is replaced, as
    pool_pre_ping would."""

    @event.listens_for(engine, "checkin")
    def _checked_in(dbapi_connection: Any, record: Any) -> None:
        record.info[_IDLE_SINCE] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection: Any, record: Any, proxy: Any) -> None:
        since = record.info.pop(_IDLE_SINCE, None)
        wait = PING_AFTER_IDLE_SECONDS if idle_seconds is None else idle_seconds
        if since is None or time.monotonic() - since < wait:
            return  # new, or in use a moment ago
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except Exception as exc:
            # The pool invalidates this connection and checks out another.
            raise DisconnectionError(f"connection idle {time.monotonic() - since:.0f} s failed its ping") from exc
        if not alive:
            raise DisconnectionError("connection failed its ping")


def private_sqlite_file(path: str | None) -> None:
    """Make a SQLite database file readable by its owner only (0600), before
    SQLite opens it: created so when missing, narrowed when an older release
    left it wider. SQLite gives the -wal and -shm files it creates the
    database file's mode; ones already there are narrowed too. The files
    hold no key in the clear, but owners, attributes and the audit trail are
    nobody else's business on a shared host."""
    if not path or path.startswith("file:") or path == ":memory:":
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError:
        return  # A missing directory, say: SQLite reports it in its own words.
    else:
        os.close(fd)
    for name in (path, path + "-wal", path + "-shm"):
        with contextlib.suppress(OSError):  # Absent, or not ours to change.
            mode = stat.S_IMODE(os.stat(name).st_mode)
            if mode & 0o077:
                os.chmod(name, mode & 0o700)


# `PRAGMA secure_delete` on every connection (`configure_sqlite`); a
# module value so that a test can show what the file keeps without it.
SECURE_DELETE = "ON"


def configure_sqlite(
    engine: Engine, *, begin: str = "BEGIN IMMEDIATE", wal: bool = True, query_only: bool = False
) -> None:
    """Set up every new connection of a SQLite engine, and emit ``begin``
    (``BEGIN`` for connections with the READ_ONLY option) at the start of
    each transaction.

    BEGIN IMMEDIATE takes the write lock up front: a deferred transaction
    that reads and then writes fails at once with "database is locked" when
    another writer committed in between, and busy_timeout cannot help it.
    ``query_only`` makes SQLite itself refuse writes (a reader engine).
    synchronous stays FULL: an acknowledged write must survive a power cut
    (kms_server's write batches set NORMAL on their own connection and
    sync the log themselves before anything is answered: WalSync).
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN away from the sqlite3 module; _on_begin emits it.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            # busy_timeout first, so that switching to WAL waits too.
            cursor.execute("PRAGMA busy_timeout = 10000")
            if wal:
                cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA foreign_keys = ON")
            # What a delete or an update frees is overwritten with zeros:
            # a destroyed key's sealed material does not stay in the file's
            # free space. Debian's SQLite does it by default; other builds
            # do not (SQLITE_SECURE_DELETE), so it is asked for here.
            cursor.execute(f"PRAGMA secure_delete = {SECURE_DELETE}")
            if query_only:
                cursor.execute("PRAGMA query_only = ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Every transaction runs one: on the sqlite3 connection itself.
        if conn.get_execution_options().get(READ_ONLY):
            # A read transaction begun on the sqlite3 connection already
            # (`SqliteRead`): a statement run through SQLAlchemy joins it.
            if not conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
                sqlite_execute(conn, "BEGIN")
            return
        if conn.info.get(_RAW_WRITE) and conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
            return  # it joins the SqliteWrite open on this connection
        sqlite_execute(conn, begin)


class _OnSqlite3:
    """A transaction begun and ended on the sqlite3 connection under a
    SQLAlchemy Connection (SQLAlchemy's own begin and commit, their events
    and bookkeeping, cost about as much as the one lookup most reads make:
    issue 15). A statement run through SQLAlchemy inside it makes
    SQLAlchemy begin a transaction of its own, which joins this one
    (configure_sqlite) and which `commit` and `rollback` then end."""

    __slots__ = ("conn",)

    conn: Connection

    def _end(self, commit: bool) -> None:
        if self.conn.in_transaction():
            trans = self.conn.get_transaction()
            assert trans is not None  # in_transaction() said so
            trans.commit() if commit else trans.rollback()
        elif self.conn.connection.driver_connection.in_transaction:  # type: ignore[union-attr]
            sqlite_execute(self.conn, "COMMIT" if commit else "ROLLBACK")

    def commit(self) -> None:
        self._end(True)

    def rollback(self) -> None:
        self._end(False)


class SqliteRead(_OnSqlite3):
    """A read transaction on a SQLite connection with the READ_ONLY option
    (`_OnSqlite3`): a deferred BEGIN."""

    __slots__ = ()

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        sqlite_execute(conn, "BEGIN")


# The key, in a connection's `info`, of a SqliteWrite open on it.
_RAW_WRITE = "kms_raw_write"


class SqliteWrite(_OnSqlite3):
    """A write transaction on a SQLite connection (`_OnSqlite3`): BEGIN
    IMMEDIATE, the write lock taken at once, as SQLAlchemy's begin takes
    it (configure_sqlite). The batches of kms_server's writers run in one:
    SQLAlchemy's begin and commit cost a one-statement write transaction
    about a sixth of its CPU (bench/README.md). Raises SQLAlchemy's errors,
    as SQLAlchemy would."""

    __slots__ = ()

    def __init__(self, conn: Connection) -> None:
        sqlite_execute(conn, "BEGIN IMMEDIATE")
        conn.info[_RAW_WRITE] = True
        self.conn = conn

    def _end(self, commit: bool) -> None:
        self.conn.info.pop(_RAW_WRITE, None)
        super()._end(commit)


class AutocommitRead:
    """A read on a connection in autocommit (a PostgreSQL reader's), where
    each statement is its own transaction: nothing to begin or end on the
    wire. A statement run through SQLAlchemy makes SQLAlchemy begin a
    transaction of its own (nothing is sent in autocommit), which `commit`
    and `rollback` end so that the connection can serve the next reader."""

    __slots__ = ("conn",)

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def _end(self, commit: bool) -> None:
        trans = self.conn.get_transaction()
        if trans is not None:
            trans.commit() if commit else trans.rollback()

    def commit(self) -> None:
        self._end(True)

    def rollback(self) -> None:
        self._end(False)


def sqlite_execute(conn: Connection, sql: str, args: tuple = ()) -> sqlite3.Cursor:
    """Run `sql` on the sqlite3 connection under a SQLAlchemy Connection,
    past SQLAlchemy's execute path, which costs more than SQLite's own work
    for the statements every request runs (issue 15). A failure is raised as
    SQLAlchemy would have raised it, so callers handle one kind of error."""
    try:
        return conn.connection.driver_connection.execute(sql, args)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, args, exc, sqlite3.Error, hide_parameters=True) from None


def sqlite_executemany(conn: Connection, sql: str, rows: list[tuple]) -> sqlite3.Cursor:
    """``sqlite_execute`` for one statement run once per row of `rows`."""
    try:
        return conn.connection.driver_connection.executemany(sql, rows)  # type: ignore[union-attr]
    except sqlite3.Error as exc:
        raise DBAPIError.instance(sql, rows, exc, sqlite3.Error, hide_parameters=True) from None


# The psycopg cursor a pooled PostgreSQL connection keeps for pg_execute
# (in the pool's per-connection info, which a replaced connection clears).
_PG_CURSOR = "kms_pg_cursor"


def pg_execute(conn: Connection, sql: str, params: dict[str, Any] | None = None, many: list[dict[str, Any]] | None = None) -> Any:
    """Run `sql` (psycopg's `%(name)s` placeholders, as SQLAlchemy compiles
    them for its psycopg dialect) on the psycopg connection under a
    SQLAlchemy Connection, past SQLAlchemy's execute path: its execution
    context and result objects cost more of a node's CPU than psycopg's own
    work for the statements every request runs (issue 15), as on SQLite
    (``sqlite_execute``). `many`: run it once per parameter set instead
    (psycopg pipelines them: one round trip). Returns the psycopg cursor,
    positioned on the result.

    The transaction is the one SQLAlchemy sees: psycopg begins it at the
    first statement, whichever path runs it, and SQLAlchemy's commit or
    rollback ends it. A failure is raised as SQLAlchemy would have raised
    it (the DBAPIError subclass, bound values hidden); when it means the
    connection is gone, the connection is invalidated and the pool
    replaced, as SQLAlchemy does for a disconnect, so that no other
    connection made before the failure is handed out again."""
    fairy = conn.connection
    driver: Any = fairy.driver_connection
    cursor = fairy.info.get(_PG_CURSOR)
    if cursor is None or cursor.connection is not driver or cursor.closed:
        cursor = fairy.info[_PG_CURSOR] = driver.cursor()
    deferred = fairy.info.pop(_PG_DEFERRED, None)
    try:
        with driver.pipeline() if deferred else contextlib.nullcontext():
            for statement in deferred or ():
                driver.cursor().execute(statement, {})
            if many is None:
                # Always a mapping, even an empty one: psycopg then reads the
                # placeholders, and SQLAlchemy's `%%` (a literal %) is one %.
                cursor.execute(sql, {} if params is None else params)
            else:
                cursor.executemany(sql, many)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _pg_failure(conn, exc, sql, params if many is None else many, cursor) from None
    return cursor


# Statements without parameters that pg_execute sends ahead of the next
# statement on a connection (pg_defer), in the pool's per-connection info.
_PG_DEFERRED = "kms_pg_deferred"


def pg_defer(conn: Connection, sql: str) -> None:
    """Send `sql` (no parameters) ahead of the next statement ``pg_execute``
    sends on this connection, in the same round trip (psycopg's pipeline
    mode, with the BEGIN if the transaction starts there): a statement
    whose answer is not needed, such as a savepoint's SAVEPOINT, RELEASE or
    ROLLBACK TO, or a lock to hold before the next statement runs. Each runs
    in order and sees what those before it did; a failure shows as the next
    statement's. Whoever defers takes what is still deferred
    (``pg_take_deferred``) before ending the transaction."""
    conn.connection.info.setdefault(_PG_DEFERRED, []).append(sql)


def pg_take_deferred(conn: Connection) -> list[str]:
    """The statements deferred on this connection and not sent yet, which
    are then no longer deferred."""
    return conn.connection.info.pop(_PG_DEFERRED, None) or []


def _pg_failure(conn: Connection, exc: Any, sql: str, params: Any, cursor: Any) -> StatementError:
    """`exc` (psycopg's) as SQLAlchemy would have raised it; a disconnect
    invalidates the connection and replaces the pool first, as SQLAlchemy
    does."""
    driver = conn.connection.driver_connection
    disconnect = conn.dialect.is_disconnect(exc, driver, cursor)
    if disconnect:
        with contextlib.suppress(Exception):
            conn.invalidate(exc)
        # SQLAlchemy invalidates the whole pool on a disconnect: the server
        # that closed this connection closed the others too. Connections
        # checked out now are closed when returned.
        conn.engine.dispose()
    return DBAPIError.instance(
        sql,
        params,
        exc,
        conn.dialect.loaded_dbapi.Error,
        hide_parameters=True,
        connection_invalidated=disconnect,
        dialect=conn.dialect,
    )


def describe_error(exc: SQLAlchemyError) -> str:
    """A one-line description that carries no bound values.

    The engine hides parameters, and only the first line of the driver's
    message is kept: PostgreSQL puts row contents into DETAIL lines.
    """
    orig = getattr(exc, "orig", None)
    if orig is None:
        return type(exc).__name__ + ": " + (str(exc).splitlines() or [""])[0]
    code = getattr(orig, "sqlstate", None) or getattr(orig, "sqlite_errorname", None)
    first_line = (str(orig).splitlines() or [""])[0]
    prefix = f"{type(orig).__name__} [{code}]" if code else type(orig).__name__
    return f"{prefix}: {first_line}"


def refresh_statistics(engine: Engine, tables: list[str] | tuple[str, ...]) -> None:
    """ANALYZE `tables` on PostgreSQL, after a bulk load (a restore).
    Without statistics the planner takes an object's attribute lookup for
    a scan of 0.5 % of the table: at a million keys, a parallel bitmap scan
    with JIT compilation, 36 ms instead of a fraction of one (issue 15).
    Autovacuum would gather them in time, if it is on. SQLite plans these
    lookups from its indexes without statistics: nothing to do there.
    Raises SQLAlchemyError as the statement does."""
    if engine.dialect.name != "postgresql":
        return
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE " + ", ".join(tables))
