"""Storage in SQLite or PostgreSQL through SQLAlchemy Core.

The schema lives in the module-level `metadata` so that Alembic can manage
it later. Values are never logged and never put into error messages: they
are sealed key material or TTLV attribute values.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    any_,
    bindparam,
    delete,
    insert,
    literal_column,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.dialects.postgresql import psycopg as psycopg_dialect
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError

from kmip_core.db.engine import (
    PING_AFTER_IDLE_SECONDS,
    READ_ONLY,
    AutocommitRead,
    SqliteRead,
    SqliteWrite,
    configure_sqlite,
    describe_error,
    open_engine,
    parse_db_url,
    pg_defer,
    pg_execute,
    pg_take_deferred,
    sqlite_execute,
    sqlite_executemany,
)
from kmip_core.nonblocking import WriterBusy, in_reactor_now, pinned, writer_turn
from kms_server.storage.base import (
    AuditQuery,
    ConcurrentModification,
    LocateQuery,
    ObjectExists,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredAttribute,
    StoredAuditRecord,
    StoredCheckpoint,
    StoredObject,
    Transaction,
)
from kms_server.storage.log_sync import WalSync

__all__ = [
    "SqlStorage",
    "writer_flock",
    "kms_attributes",
    "kms_audit",
    "kms_audit_checkpoints",
    "kms_meta",
    "kms_nodes",
    "kms_objects",
    "metadata",
]

log = logging.getLogger("kms_server.storage")

metadata = MetaData()

kms_objects = Table(
    "kms_objects",
    metadata,
    Column("sequence", Integer, primary_key=True, autoincrement=True),
    Column("uid", Text, nullable=False, unique=True),
    Column("owner", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("sealed_material", LargeBinary, nullable=True),
    Column("created_at", Float),
    # The keystore's MAC over the row and its attributes (keystore/row_auth.py).
    Column("row_mac", LargeBinary, nullable=True),
    # AUTOINCREMENT keeps SQLite from reusing the sequence of a deleted
    # last row, so a sequence number names one object forever.
    sqlite_autoincrement=True,
)

# The attributes Locate finds through the attribute rows of each object
# rather than through the lookup index (migration 0007): the ones nearly
# every object carries whose lookups match most of the store anyway or are
# not asked for (dates, which Locate compares after loading every object
# that has one; the booleans of sensitivity; the digest, usage mask, lease
# time and RNG of every key; the identifier, which names the object
# itself). An AES key with a Name carries 18 attributes, 13 of these:
# their index entries were most of the pages a Create wrote
# (docs/storage-schema.md).
# A Locate whose conditions all name one of these reads every object's row
# and checks each, a cost that grows with the store.
NOT_LOOKED_UP = frozenset(
    {
        "Activation Date",
        "Always Sensitive",
        "Archive Date",
        "Compromise Date",
        "Compromise Occurrence Date",
        "Cryptographic Usage Mask",
        "Deactivation Date",
        "Destroy Date",
        "Digest",
        "Extractable",
        "Fresh",
        "Initial Date",
        "Last Change Date",
        "Lease Time",
        "Never Extractable",
        "Original Creation Date",
        "Process Start Date",
        "Protect Stop Date",
        "Random Number Generator",
        "Sensitive",
        "Unique Identifier",
    }
)


def _lookup_where(column: str) -> str:
    """The lookup index's condition on the attribute name `column`: the
    same text in the index (migration 0007 holds its own copy) and in each
    Locate that goes through it, which both databases require of a partial
    index (the query must state the index's condition)."""
    names = ", ".join(f"'{name}'" for name in sorted(NOT_LOOKED_UP))
    return f"{column} NOT IN ({names})"


def looked_up(name: str) -> bool:
    """Whether Locate finds the attribute `name` through the lookup index."""
    return name not in NOT_LOOKED_UP


kms_attributes = Table(
    "kms_attributes",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "uid",
        Text,
        ForeignKey("kms_objects.uid", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("name", Text, nullable=False),
    Column("idx", Integer, nullable=False),
    Column("value", LargeBinary, nullable=False),
    # SHA-256 of value. PostgreSQL cannot put values over about 2.7 KB into
    # a btree index, and clients choose attribute values, so Locate uses an
    # index on the digest and then compares the value itself.
    Column("value_digest", LargeBinary(32), nullable=False),
    # Locate's lookup by (name, sha256(value)), for the attributes it is
    # asked by: every name but NOT_LOOKED_UP (migration 0007).
    Index(
        "ix_kms_attributes_lookup",
        "name",
        "value_digest",
        sqlite_where=text(_lookup_where("name")),
        postgresql_where=text(_lookup_where("name")),
    ),
    # An object's rows (reads, cascaded deletes) and the check of a further
    # Locate condition on one candidate object: a lookup, however many
    # objects share that value (migration 0005).
    Index("ix_kms_attributes_uid_name_value_digest", "uid", "name", "value_digest"),
)

# One row per node of the cluster, refreshed by its heartbeat
# (kms_server/cluster.py); read by `kms-admin cluster status`.
kms_nodes = Table(
    "kms_nodes",
    metadata,
    Column("name", Text, primary_key=True),
    Column("address", Text, nullable=False),
    Column("version", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", Float, nullable=False),
    Column("last_seen", Float, nullable=False),
)

kms_meta = Table(
    "kms_meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", LargeBinary, nullable=False),
)


# The audit trail (docs/audit-trail.md): append-only, hash-chained; `body`
# is the canonical JSON the hash covers, the other columns are indexes.
kms_audit = Table(
    "kms_audit",
    metadata,
    # On SQLite the rowid itself (INTEGER PRIMARY KEY): no second B-tree of
    # seq. The indexes hold only the records that have a value (migration
    # 0006: every index is a page written per batch of records).
    Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False),
    Column("time", Float, nullable=False),
    Column("node", Text, nullable=False),
    Column("operation", Text, nullable=False),
    Column("uid", Text, nullable=True),
    Column("client", Text, nullable=False),
    Column("result", Text, nullable=False),
    Column("x_component", Text, nullable=True),
    Column("x_name", Text, nullable=True),
    Column("x_identifier", Text, nullable=True),
    Column("body", Text, nullable=False),
    Column("hash", Text, nullable=False),
    *(
        Index(
            f"ix_kms_audit_{column}",
            column,
            sqlite_where=text(f"{column} IS NOT NULL"),
            postgresql_where=text(f"{column} IS NOT NULL"),
        )
        for column in ("uid", "x_name", "x_identifier")
    ),
    Index("ix_kms_audit_time", "time"),
)

kms_audit_checkpoints = Table(
    "kms_audit_checkpoints",
    metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=False),
    Column("time", Float, nullable=False),
    Column("node", Text, nullable=False),
    Column("head_hash", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("signature", Text, nullable=False),
)

# Every request item runs these; built once (SQLAlchemy caches their
# compiled form by statement object).
_AUDIT_HEAD = select(kms_audit.c.seq, kms_audit.c.hash).order_by(kms_audit.c.seq.desc()).limit(1)
_AUDIT_INSERT = insert(kms_audit)
_OBJECT_ROW = select(
    kms_objects.c.sequence,
    kms_objects.c.uid,
    kms_objects.c.owner,
    kms_objects.c.version,
    kms_objects.c.sealed_material,
    kms_objects.c.row_mac,
).where(kms_objects.c.uid == bindparam("uid"))
_OBJECT_ROW_FOR_UPDATE = _OBJECT_ROW.with_for_update()
# An object's row and its attribute rows in one statement: one round trip,
# and, under PostgreSQL's READ COMMITTED, one snapshot. Two statements could
# straddle another transaction's commit and pair the row of one version with
# the attributes of the next, which the row MAC then refuses as an edit made
# outside the server. (The locking read needs no join: once the row is
# locked, no writer can change the attributes before this one ends.)
_OBJECT_WITH_ATTRIBUTES = (
    select(*_OBJECT_ROW.selected_columns, kms_attributes.c.name, kms_attributes.c.idx, kms_attributes.c.value)
    .select_from(kms_objects.outerjoin(kms_attributes, kms_attributes.c.uid == kms_objects.c.uid))
    .where(kms_objects.c.uid == bindparam("uid"))
)
# On SQLite a read transaction is one snapshot however many statements it
# runs (SqliteRead; a writer holds the database's lock), so the row and its
# attribute rows are read apart: the join repeats the row's six columns on
# each of some twenty attribute rows, and SQLite builds them all. 17 us
# against 27 for a key read again, 30 against 44 after another connection's
# commit (issue 15).
_ATTRIBUTE_ROWS = select(kms_attributes.c.name, kms_attributes.c.idx, kms_attributes.c.value).where(
    kms_attributes.c.uid == bindparam("uid")
)


def _is_held(held: StoredObject | None, row: Any, attributes: list[Any], raw: bool) -> bool:
    """True if the object row read (sequence, uid, owner, version, sealed
    material, MAC) and its attribute rows (name, index, value) are `held`'s,
    byte for byte: an edit of any of them is then found as without `held`.
    (`held`'s attributes are in (name, index) order, as a row read is and
    as VerifiedRows keeps them. `raw`: the rows came from the sqlite3
    module, as tuples with bytes values.)"""
    if held is None or row[3] != held.version or row[5] is None or bytes(row[5]) != held.row_mac:
        return False
    if row[2] != held.owner or (None if row[4] is None else bytes(row[4])) != held.sealed_material:
        return False
    if len(attributes) != len(held.attributes):
        return False
    # StoredAttribute is a tuple: equal to the (name, index, value) read.
    return sorted(attributes if raw else [(n, i, bytes(v)) for n, i, v in attributes]) == held.attributes


# The dialects `_Raw` compiles its statements for: SQLAlchemy's own, for
# sqlite3 and psycopg (the SQL it sends when it runs them itself).
_SQLITE = sqlite_dialect.dialect()
_PSYCOPG = psycopg_dialect.dialect()


def _only_named(compiled: Any, names: tuple[str, ...]) -> None:
    """Only named parameters are passed to a `_Raw`: a constant bound by
    the statement itself (say `version + 1`, or an OFFSET 0) would be
    missing when it runs."""
    preset = [name for name in names if not compiled.binds[name].required]
    if preset:
        raise ValueError(f"statement binds constants {preset}: use literal_column or literal=True")


class _Raw:
    """A prebuilt statement run through the driver itself: the sqlite3
    module on SQLite, psycopg on PostgreSQL. SQLAlchemy's execute path
    (execution context, cursor wrapper, result rows) cost more than the
    database's own work for the lookups every request item runs, and for
    an object's writes: a quarter of a Create's CPU on SQLite, and on
    PostgreSQL more than psycopg's own work (issue 15). The SQL is
    SQLAlchemy's compilation of the same statement for each dialect, so the
    schema stays written once. `postgresql`: the statement to run there
    instead (an upsert, which each dialect spells its own way)."""

    __slots__ = ("stmt", "sql", "names", "pg_sql", "pg_stmt", "_pg_returning")

    def __init__(
        self,
        stmt: Any,
        column_keys: list[str] | None = None,
        literal: bool = False,
        *,
        postgresql: Any = None,
        only: str | None = None,
    ) -> None:
        # `literal`: the statement's only parameters are constants (a LIMIT).
        # `only`: the one dialect the statement is built for (a Locate's).
        compile_kwargs = {"literal_binds": True} if literal else {}
        self.stmt = stmt
        self.sql = ""
        self.names: tuple[str, ...] = ()
        if only != "postgresql":
            compiled = stmt.compile(dialect=_SQLITE, column_keys=column_keys, compile_kwargs=compile_kwargs)
            self.sql = str(compiled)
            self.names = tuple(compiled.positiontup or ())
            _only_named(compiled, self.names)
        self.pg_stmt = stmt if postgresql is None else postgresql
        self.pg_sql = ""
        if only != "sqlite":
            compiled = self.pg_stmt.compile(dialect=_PSYCOPG, column_keys=column_keys, compile_kwargs=compile_kwargs)
            self.pg_sql = str(compiled)
            _only_named(compiled, tuple(compiled.binds))
        self._pg_returning: str | None = None

    def rows(self, conn: Connection, dialect: str, params: dict[str, Any]) -> list[Any]:
        """Every row (tuples); none for a statement without rows."""
        if dialect != "sqlite":
            cursor = pg_execute(conn, self.pg_sql, params)
            return cursor.fetchall() if cursor.description is not None else []
        return sqlite_execute(conn, self.sql, tuple(params[name] for name in self.names)).fetchall()

    def changed(self, conn: Connection, dialect: str, params: dict[str, Any]) -> int:
        """Run a write; the number of rows it changed."""
        if dialect != "sqlite":
            return pg_execute(conn, self.pg_sql, params).rowcount
        return sqlite_execute(conn, self.sql, tuple(params[name] for name in self.names)).rowcount

    def inserted(self, conn: Connection, dialect: str, params: dict[str, Any]) -> int:
        """Run a single-row INSERT; the new row's integer primary key."""
        if dialect != "sqlite":
            if self._pg_returning is None:
                stmt = self.pg_stmt.returning(*self.pg_stmt.table.primary_key.columns)
                self._pg_returning = str(stmt.compile(dialect=_PSYCOPG, column_keys=list(params)))
            row = pg_execute(conn, self._pg_returning, params).fetchone()
            assert row is not None  # an INSERT .. RETURNING that worked returns its row
            return row[0]
        rowid = sqlite_execute(conn, self.sql, tuple(params[name] for name in self.names)).lastrowid
        assert rowid is not None  # set after an INSERT
        return rowid

    def many(self, conn: Connection, dialect: str, rows: list[tuple[Any, ...]]) -> None:
        """Run the statement once per row of values, given in the order of
        its parameters (`names`): one execute for one row, else an
        executemany. Rows built as tuples spare a dict per row and its
        reading back on SQLite (a read's audit record, a Create's attribute
        rows: issue 15)."""
        if dialect != "sqlite":
            names = self.names
            if len(rows) == 1:
                pg_execute(conn, self.pg_sql, dict(zip(names, rows[0], strict=True)))
            else:
                pg_execute(conn, self.pg_sql, many=[dict(zip(names, row, strict=True)) for row in rows])
        elif len(rows) == 1:
            sqlite_execute(conn, self.sql, rows[0])
        else:
            sqlite_executemany(conn, self.sql, rows)


# Writes of objects and their attribute rows (bound parameters whose names
# differ from the columns': SQLAlchemy reserves those for VALUES and SET).
_OBJECT_INSERT = insert(kms_objects)
_ATTRIBUTES_INSERT = insert(kms_attributes)
_OBJECT_UPDATE = (
    update(kms_objects)
    .where(kms_objects.c.uid == bindparam("b_uid"), kms_objects.c.version == bindparam("b_version"))
    .values(
        # A literal, not a bound 1: the SQLite shortcut (_Raw) passes only
        # the named parameters.
        version=kms_objects.c.version + literal_column("1"),
        owner=bindparam("b_owner"),
        sealed_material=bindparam("b_sealed_material"),
        row_mac=bindparam("b_row_mac"),
    )
)
_OBJECT_DELETE = delete(kms_objects).where(kms_objects.c.uid == bindparam("uid"))
_ATTRIBUTE_VALUES = select(
    kms_attributes.c.id, kms_attributes.c.name, kms_attributes.c.idx, kms_attributes.c.value
).where(kms_attributes.c.uid == bindparam("uid"))
_ATTRIBUTES_DELETE = delete(kms_attributes).where(kms_attributes.c.uid == bindparam("uid"))

# Every write transaction reads and writes the store digest (keystore/row_auth.py).
_META_GET = select(kms_meta.c.value).where(kms_meta.c.key == bindparam("key"))
_META_GET_FOR_UPDATE = _META_GET.with_for_update()

# Writes run on SQLite through the sqlite3 module too (the storage
# contract tests run every one of them on SQLite and PostgreSQL).
_ATTRIBUTE_COLUMNS = ["uid", "name", "idx", "value", "value_digest"]
_ATTRIBUTE_DELETE_ID = delete(kms_attributes).where(kms_attributes.c.id == bindparam("id"))
_RAW_OBJECT_INSERT = _Raw(_OBJECT_INSERT, ["uid", "owner", "version", "sealed_material", "created_at", "row_mac"])
_RAW_ATTRIBUTES_INSERT = _Raw(_ATTRIBUTES_INSERT, _ATTRIBUTE_COLUMNS)
_RAW_OBJECT_UPDATE = _Raw(_OBJECT_UPDATE)
_RAW_OBJECT_DELETE = _Raw(_OBJECT_DELETE)
_RAW_ATTRIBUTE_VALUES = _Raw(_ATTRIBUTE_VALUES)
_RAW_ATTRIBUTES_DELETE = _Raw(_ATTRIBUTES_DELETE)
_RAW_ATTRIBUTE_DELETE_ID = _Raw(_ATTRIBUTE_DELETE_ID)
_RAW_OBJECT_WITH_ATTRIBUTES = _Raw(_OBJECT_WITH_ATTRIBUTES, only="postgresql")
_RAW_OBJECT_ROW = _Raw(_OBJECT_ROW, only="sqlite")
_RAW_ATTRIBUTE_ROWS = _Raw(_ATTRIBUTE_ROWS, only="sqlite")
_RAW_AUDIT_HEAD = _Raw(_AUDIT_HEAD, literal=True)
_RAW_AUDIT_INSERT = _Raw(_AUDIT_INSERT, [c.name for c in kms_audit.c])
_RAW_META_GET = _Raw(_META_GET)


def _meta_upsert(dialect_insert):
    stmt = dialect_insert(kms_meta).values(key=bindparam("key"), value=bindparam("value"))
    return stmt.on_conflict_do_update(index_elements=[kms_meta.c.key], set_={"value": stmt.excluded.value})


_META_UPSERT = {"postgresql": _meta_upsert(pg_dialect.insert), "sqlite": _meta_upsert(sqlite_dialect.insert)}
_RAW_META_UPSERT = _Raw(_META_UPSERT["sqlite"], postgresql=_META_UPSERT["postgresql"])
# PostgreSQL's locking reads (SQLite's BEGIN IMMEDIATE holds the database's
# write lock already) and deletes of several attribute rows in one statement.
_RAW_OBJECT_ROW_FOR_UPDATE = _Raw(_OBJECT_ROW_FOR_UPDATE)
_RAW_META_GET_FOR_UPDATE = _Raw(_META_GET_FOR_UPDATE)
_RAW_ATTRIBUTES_DELETE_IDS = _Raw(
    delete(kms_attributes).where(kms_attributes.c.id == any_(bindparam("ids", type_=pg_dialect.ARRAY(Integer))))
)

# pg_advisory_xact_lock key that serializes the writers of all nodes
# ("kmsa"): every write batch on PostgreSQL takes it at BEGIN, before any
# of its members runs, and holds it to COMMIT. A batch therefore never
# waits for a row lock that another writer holds while waiting for one of
# the batch's; and the audit trail's appenders take turns under it
# (docs/process-model.md, "Writers on PostgreSQL").
AUDIT_LOCK_KEY = 0x6B6D7361
_WRITERS_LOCK = f"SELECT pg_advisory_xact_lock({AUDIT_LOCK_KEY})"


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


def _is_disconnect(exc: SQLAlchemyError) -> bool:
    """The connection is gone (server down, failover, network): as opposed
    to an error in the statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError) and getattr(getattr(exc, "orig", None), "sqlstate", None) in (
        None,
        "08000",
        "08001",
        "08003",
        "08006",
        "57P01",
        "57P02",
        "57P03",
    ) and "sqlite" not in type(getattr(exc, "orig", None)).__module__


def _storage_error(what: str, exc: SQLAlchemyError, commit: bool = False) -> StorageError:
    if _is_disconnect(exc):
        return StorageUnavailable(f"{what}: {describe_error(exc)}", commit_unknown=commit)
    return StorageError(f"{what}: {describe_error(exc)}")


def _is_unique_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == "23505":
        return True
    if getattr(orig, "sqlite_errorname", None) in (
        "SQLITE_CONSTRAINT_UNIQUE",
        "SQLITE_CONSTRAINT_PRIMARYKEY",
    ):
        return True
    return "unique" in str(orig).lower()


# Locate's statements by the shape of the query (conditions, owner, paging,
# which condition leads, a uid or not, how many exclusions), built once
# each: building one cost more than running it.
_LOCATE_STATEMENTS: dict[tuple[str, int, int, bool, bool, bool, str | None, bool, int], Any] = {}
_LOCATE_SHAPES_MAX = 256


def locate_statement(query: LocateQuery, dialect: str = "sqlite"):
    """The SELECT that answers a LocateQuery (a `_Raw`), and its parameters.

    The leading condition, the first of `equals`, else of `has`, whose
    name is `looked_up`, is one lookup on the lookup index (name,
    value_digest; partial: migration 0007); every other condition is
    checked on each candidate that lookup found, by a correlated EXISTS on
    the (uid, name, value_digest) index: a lookup per candidate. The cost
    grows with the objects the leading condition matches, and not with
    what the others match: kms-server's Locate asks for a located object's
    State Destroyed that way, which every destroyed key in the store
    matches (issue 15). When no condition is looked up (all name
    NOT_LOOKED_UP attributes), every object's row is read and each
    condition checked on it the same way: the cost grows with the store.
    A query's `uid` (a Locate by Unique Identifier, which the index leaves
    out) leads instead of any condition: the object's row, read by the
    uid's unique index, and every condition checked on that one row. The objects
    are then fetched by uid. Each of `excluded` is a NOT EXISTS checked on
    each candidate the same way (one statement where the Locate operation
    once ran one per destroyed State: on PostgreSQL a round trip each, and
    a plan each, as the planner kept custom plans for them).

    History: an INTERSECT of one lookup per condition walked every match of
    every condition (the Destroyed check of a Locate by Name walked every
    destroyed key); a correlated EXISTS that the database answered from the
    (name, value_digest) index walked every row of that value again for
    each candidate, quadratic in the matches (issue 19); one uncorrelated IN
    per condition let PostgreSQL, with statistics not yet gathered on new
    rows, nest the second lookup inside the first. PostgreSQL, without
    statistics, also turned the EXISTS into a semi-join probing the
    (name, value_digest) index; there each EXISTS has an OFFSET 0, which
    keeps it a subplan run per candidate with the uid bound, on the
    (uid, name, value_digest) index.

    The statement depends on the query's shape only (how many conditions of
    each kind, which kind leads, an owner or not, paging or not, a uid or
    not, how many exclusions); the values are bound parameters, so one
    statement object (and SQLAlchemy's compiled form of it) serves every
    query of that shape."""
    equals, has = list(query.equals), list(query.has)
    lead: str | None = None
    # The leading condition goes first among its kind's parameters. With a
    # uid none leads: that one row is read, and every condition checked on
    # it (a lookup would list every object the condition matches).
    for i, (name, _) in enumerate(equals if query.uid is None else ()):
        if looked_up(name):
            lead = "e"
            equals.insert(0, equals.pop(i))
            break
    else:
        for i, name in enumerate(has if query.uid is None else ()):
            if looked_up(name):
                lead = "h"
                has.insert(0, has.pop(i))
                break
    shape = (
        dialect,
        len(equals),
        len(has),
        query.owner is not None,
        bool(query.offset),
        query.limit is not None,
        lead,
        query.uid is not None,
        len(query.excluded),
    )
    stmt = _locate_shape(shape)
    params: dict[str, Any] = {}
    for i, (name, value) in enumerate(equals):
        params[f"e{i}_name"] = name
        params[f"e{i}_digest"] = _digest(value)
        params[f"e{i}_value"] = value
    for i, name in enumerate(has):
        params[f"h{i}_name"] = name
    for i, (name, value) in enumerate(query.excluded):
        params[f"x{i}_name"] = name
        params[f"x{i}_digest"] = _digest(value)
        params[f"x{i}_value"] = value
    if query.owner is not None:
        params["owner"] = query.owner
    if query.uid is not None:
        params["uid"] = query.uid
    if query.offset:
        params["offset"] = query.offset
    if query.limit is not None:
        params["limit"] = query.limit
    return stmt, params


def _locate_shape(shape: tuple[str, int, int, bool, bool, bool, str | None, bool, int]) -> Any:
    """The statement of a Locate's shape (built once per shape), as a `_Raw`
    for its dialect: its SQL is run as it is, past SQLAlchemy's execute
    path."""
    stmt = _LOCATE_STATEMENTS.get(shape)
    if stmt is None:
        stmt = _Raw(_build_locate(*shape), only=shape[0])
        if len(_LOCATE_STATEMENTS) < _LOCATE_SHAPES_MAX:  # clients choose the shape: bounded
            _LOCATE_STATEMENTS[shape] = stmt
    return stmt


def _attribute_condition(a, kind: str, i: int) -> list:
    """The condition `kind` i on the attribute rows `a`: a (name, value)
    pair ("e", equals; "x", excluded) or a name ("h", has)."""
    if kind in ("e", "x"):
        return [
            a.c.name == bindparam(f"{kind}{i}_name"),
            a.c.value_digest == bindparam(f"{kind}{i}_digest"),
            a.c.value == bindparam(f"{kind}{i}_value"),
        ]
    return [a.c.name == bindparam(f"h{i}_name")]


def _build_locate(
    dialect: str,
    equals: int,
    has: int,
    owner: bool,
    offset: bool,
    limit: bool,
    lead: str | None,
    uid: bool,
    excluded: int,
):
    o = kms_objects
    conditions = []
    if uid:
        conditions.append(o.c.uid == bindparam("uid"))
    if owner:
        conditions.append(o.c.owner == bindparam("owner"))
    checks = [("e", i) for i in range(equals)] + [("h", i) for i in range(has)]

    def exists(kind: str, i: int, uid: Any) -> Any:
        other = kms_attributes.alias(f"{kind}{i}")
        check = select(other.c.uid).where(other.c.uid == uid, *_attribute_condition(other, kind, i))
        if dialect == "postgresql":
            # A literal, not a bound 0: a `_Raw` passes only the named
            # parameters.
            check = check.offset(literal_column("0", Integer))
        return check.exists()

    if lead is not None:
        # The leading condition is its kind's first (locate_statement).
        first = kms_attributes.alias("located")
        # The lookup index's own condition, stated as the index states it
        # (text, not bound values): each database uses a partial index
        # only for a query whose conditions imply the index's.
        where = [*_attribute_condition(first, lead, 0), text(_lookup_where("located.name"))]
        where += [exists(kind, i, first.c.uid) for kind, i in checks if (kind, i) != (lead, 0)]
        where += [~exists("x", i, first.c.uid) for i in range(excluded)]
        conditions.append(o.c.uid.in_(select(first.c.uid).where(*where)))
    else:
        conditions += [exists(kind, i, o.c.uid) for kind, i in checks]
        conditions += [~exists("x", i, o.c.uid) for i in range(excluded)]
    stmt = select(o.c.uid).where(*conditions).order_by(o.c.sequence)
    if offset:
        stmt = stmt.offset(bindparam("offset", type_=Integer))
    elif limit and dialect == "sqlite":
        # SQLite's compiler adds an OFFSET to every LIMIT: here a constant,
        # not a parameter it binds to 0, so that the SQL runs as it is (_Raw).
        stmt = stmt.offset(literal_column("0", Integer))
    if limit:
        stmt = stmt.limit(bindparam("limit", type_=Integer))
    elif offset and dialect == "sqlite":
        stmt = stmt.limit(literal_column("-1", Integer))  # and a LIMIT to every OFFSET
    return stmt


def _check_query(query: LocateQuery) -> None:
    # Offset and limit come from the client's Locate; backends disagree on
    # negative values, so none of them accepts one.
    if query.offset < 0:
        raise ValueError("LocateQuery.offset must not be negative")
    if query.limit is not None and query.limit < 0:
        raise ValueError("LocateQuery.limit must not be negative")


class _Op:
    """Around one storage operation (`_SqlTransaction._op`, which checks
    the transaction first): a StorageError or a database error marks the
    transaction failed, and a database error is raised as StorageError. A
    class, not a generator: every statement runs inside one (issue 15)."""

    __slots__ = ("_txn", "_what")

    def __init__(self, txn: _SqlTransaction, what: str) -> None:
        self._txn = txn
        self._what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc_type is None:
            return
        if issubclass(exc_type, StorageError):
            self._txn.failed = True
        elif isinstance(exc, SQLAlchemyError):
            self._txn.failed = True
            raise _storage_error(self._what, exc) from None


class _SqlTransaction(Transaction):
    def __init__(self, conn: Connection, dialect: str, read_only: bool = False) -> None:
        self._conn = conn
        self._dialect = dialect
        self._read_only = read_only
        self.snapshot_reads = read_only and dialect == "sqlite"
        self._closed = False
        # Set when a method raised StorageError: the unit of work is then
        # rolled back as a whole, even if the caller carries on.
        self.failed = False
        # The audit trail's head as this transaction has made it, once a
        # locking audit_head read it (a writer holds the lock until the
        # end): later records of the same transaction, or of the next
        # member of a batch, need not read it again.
        self.audit_tail: tuple[bool, tuple[int, str] | None] = (False, None)
        # PostgreSQL: the transaction holds the writers' advisory lock
        # already (a WriteBatches batch takes it at BEGIN).
        self.writers_locked = False
        # A PostgreSQL batch's meta rows as its members left them, by key:
        # (value, written). A row read under lock or written is not read
        # again, and a write is sent once, before the batch's COMMIT
        # (WriteBatches): every write moves the store digest, and its read
        # and write were two of a Create's round trips under the writers'
        # lock. In a read of one snapshot (snapshot_reads), the meta rows
        # read so far: they cannot change before it ends, and the keystore
        # reads the store digest for each object it loads (a Locate's
        # candidates). None: read and write the database each time.
        self.meta: dict[str, tuple[bytes | None, bool]] | None = {} if self.snapshot_reads else None
        # PostgreSQL: the attribute rows a locking get_object read, by uid:
        # (the row's version, {(name, index): (row id, value)}).
        self._locked_attributes: dict[str, tuple[int, dict[tuple[str, int], tuple[int, bytes]]]] | None = None

    def _op(self, what: str, write: bool = False) -> _Op:
        if self._closed:
            raise StorageError(f"{what}: the transaction has ended")
        if write and self._read_only:
            self.failed = True
            raise StorageError(f"{what}: the transaction is read-only")
        if self.failed:
            raise StorageError(f"{what}: the transaction failed and was rolled back")
        return _Op(self, what)

    def _insert_attributes(self, uid: str, attributes: list[StoredAttribute]) -> None:
        if not attributes:
            return
        # In the insert's parameter order (_RAW_ATTRIBUTES_INSERT.names: the
        # table's columns, id left out); the storage contract's round trips
        # fail if a value lands in another column.
        _RAW_ATTRIBUTES_INSERT.many(
            self._conn,
            self._dialect,
            [(uid, a.name, a.index, a.value, _digest(a.value)) for a in attributes],
        )

    def insert_object(self, obj: StoredObject) -> None:
        with self._op("insert_object", write=True):
            try:
                sequence = _RAW_OBJECT_INSERT.inserted(
                    self._conn,
                    self._dialect,
                    {
                        "uid": obj.uid,
                        "owner": obj.owner,
                        "version": 1,
                        "sealed_material": obj.sealed_material,
                        "created_at": time.time(),
                        "row_mac": obj.row_mac,
                    },
                )
            except IntegrityError as exc:
                if _is_unique_violation(exc):
                    raise ObjectExists(f"object {obj.uid!r} already exists") from None
                raise
            self._insert_attributes(obj.uid, obj.attributes)
            obj.version = 1
            obj.sequence = sequence

    def get_object(
        self, uid: str, for_update: bool = False, held: StoredObject | None = None
    ) -> StoredObject | None:
        with self._op("get_object"):
            # SQLite needs no row lock: BEGIN IMMEDIATE already holds the
            # database's write lock.
            if for_update and self._dialect == "postgresql":
                found = _RAW_OBJECT_ROW_FOR_UPDATE.rows(self._conn, self._dialect, {"uid": uid})
                if not found:
                    return None
                row = found[0]
                stored = {
                    (name, idx): (row_id, bytes(value))
                    for row_id, name, idx, value in _RAW_ATTRIBUTE_VALUES.rows(self._conn, self._dialect, {"uid": uid})
                }
                # What update_object compares its attributes with, for this
                # version of the row, which stays locked to the end.
                if self._locked_attributes is None:
                    self._locked_attributes = {}
                self._locked_attributes[uid] = (row[3], stored)
                attrs = [(name, idx, value) for (name, idx), (_, value) in stored.items()]
            elif self._dialect == "sqlite":
                found = _RAW_OBJECT_ROW.rows(self._conn, self._dialect, {"uid": uid})
                if not found:
                    return None
                row = found[0]
                attrs = _RAW_ATTRIBUTE_ROWS.rows(self._conn, self._dialect, {"uid": uid})
            else:
                rows = _RAW_OBJECT_WITH_ATTRIBUTES.rows(self._conn, self._dialect, {"uid": uid})
                if not rows:
                    return None
                row = rows[0][:6]
                # An object without attributes comes as one row of NULLs.
                attrs = [r[6:] for r in rows if r[6] is not None]
            if _is_held(held, row, attrs, raw=self._dialect == "sqlite"):
                return held
            sequence, uid, owner, version, sealed_material, row_mac = row
            # Sorted here, not in SQL: the order of names must not depend on
            # the database's collation.
            attributes = sorted(
                (StoredAttribute(name=name, index=idx, value=bytes(value)) for name, idx, value in attrs),
                key=lambda a: (a.name, a.index),
            )
            return StoredObject(
                uid=uid,
                owner=owner,
                sealed_material=None if sealed_material is None else bytes(sealed_material),
                attributes=attributes,
                version=version,
                sequence=sequence,
                row_mac=None if row_mac is None else bytes(row_mac),
            )

    def update_object(self, obj: StoredObject) -> None:
        with self._op("update_object", write=True):
            changed_rows = _RAW_OBJECT_UPDATE.changed(
                self._conn,
                self._dialect,
                {
                    "b_uid": obj.uid,
                    "b_version": obj.version,
                    "b_owner": obj.owner,
                    "b_sealed_material": obj.sealed_material,
                    "b_row_mac": obj.row_mac,
                },
            )
            if changed_rows != 1:
                raise ConcurrentModification(
                    f"object {obj.uid!r} is gone or no longer at version {obj.version}"
                )
            # Only the attribute rows that changed are rewritten: most
            # updates (Activate, the first Get clearing Fresh, AddAttribute)
            # touch one or two of an object's dozen or more attributes.
            # Compared by value (a few dozen bytes each), not by digest:
            # no hash of every value at every write. On PostgreSQL the rows
            # a locking read of this version found are used, not read again
            # (the row has been locked since: no other writer changed them).
            read = self._locked_attributes.pop(obj.uid, None) if self._locked_attributes else None
            if read is not None and read[0] == obj.version:
                stored = read[1]
            else:
                stored = {
                    (name, idx): (row_id, bytes(value))
                    for row_id, name, idx, value in _RAW_ATTRIBUTE_VALUES.rows(
                        self._conn, self._dialect, {"uid": obj.uid}
                    )
                }
            wanted = {(attr.name, attr.index): attr for attr in obj.attributes}
            if len(wanted) != len(obj.attributes):
                # Two values under one (name, index): keep every row as given.
                _RAW_ATTRIBUTES_DELETE.changed(self._conn, self._dialect, {"uid": obj.uid})
                self._insert_attributes(obj.uid, obj.attributes)
                obj.version += 1
                return
            changed = [
                attr for key, attr in wanted.items() if key not in stored or stored[key][1] != attr.value
            ]
            gone = [
                row_id
                for key, (row_id, value) in stored.items()
                if key not in wanted or value != wanted[key].value
            ]
            if gone and self._dialect == "sqlite":
                _RAW_ATTRIBUTE_DELETE_ID.many(self._conn, self._dialect, [(row_id,) for row_id in gone])
            elif gone:
                _RAW_ATTRIBUTES_DELETE_IDS.changed(self._conn, self._dialect, {"ids": gone})
            self._insert_attributes(obj.uid, changed)
            obj.version += 1

    def delete_object(self, uid: str) -> bool:
        with self._op("delete_object", write=True):
            if self._locked_attributes:
                self._locked_attributes.pop(uid, None)
            # Attribute rows go by ON DELETE CASCADE.
            return _RAW_OBJECT_DELETE.changed(self._conn, self._dialect, {"uid": uid}) > 0

    def scan_objects(self, after_sequence: int = 0, limit: int = 500) -> list[StoredObject]:
        with self._op("scan_objects"):
            o, a = kms_objects.c, kms_attributes.c
            rows = self._conn.execute(
                select(o.sequence, o.uid, o.owner, o.version, o.sealed_material, o.row_mac)
                .where(o.sequence > after_sequence)
                .order_by(o.sequence)
                .limit(limit)
            ).all()
            if not rows:
                return []
            attributes: dict[str, list[StoredAttribute]] = {}
            for attr in self._conn.execute(
                select(a.uid, a.name, a.idx, a.value).where(a.uid.in_([r.uid for r in rows]))
            ):
                attributes.setdefault(attr.uid, []).append(StoredAttribute(attr.name, attr.idx, bytes(attr.value)))
            return [
                StoredObject(
                    uid=r.uid,
                    owner=r.owner,
                    sealed_material=None if r.sealed_material is None else bytes(r.sealed_material),
                    attributes=sorted(attributes.get(r.uid, []), key=lambda x: (x.name, x.index)),
                    version=r.version,
                    sequence=r.sequence,
                    row_mac=None if r.row_mac is None else bytes(r.row_mac),
                )
                for r in rows
            ]

    def locate(self, query: LocateQuery) -> list[str]:
        _check_query(query)
        with self._op("locate"):
            stmt, params = locate_statement(query, self._dialect)
            return [row[0] for row in stmt.rows(self._conn, self._dialect, params)]

    def get_meta(self, key: str, for_update: bool = False) -> bytes | None:
        with self._op("get_meta", write=for_update):
            meta = self.meta
            if meta is not None and key in meta:
                return meta[key][0]  # read under lock, or written, earlier in the batch
            # SQLite's BEGIN IMMEDIATE already serializes writers.
            if for_update and self._dialect == "postgresql":
                found = _RAW_META_GET_FOR_UPDATE.rows(self._conn, self._dialect, {"key": key})
            else:
                found = _RAW_META_GET.rows(self._conn, self._dialect, {"key": key})
            value = bytes(found[0][0]) if found and found[0][0] is not None else None
            if meta is not None and (for_update or self.snapshot_reads):
                meta[key] = (value, False)
            return value

    def set_meta(self, key: str, value: bytes) -> None:
        with self._op("set_meta", write=True):
            if self.meta is not None:
                self.meta[key] = (value, True)  # written when the batch commits
                return
            _RAW_META_UPSERT.changed(self._conn, self._dialect, {"key": key, "value": value})


    def audit_head(self, lock: bool = False) -> tuple[int, str] | None:
        with self._op("audit_head", write=lock):
            known, tail = self.audit_tail
            if lock and known:
                return tail  # this transaction took the lock when it read the head
            if lock and self._dialect == "postgresql" and not self.writers_locked:
                # Held until commit; SQLite's BEGIN IMMEDIATE already
                # serializes writers, and a batch on PostgreSQL holds it
                # from its BEGIN (WriteBatches).
                pg_execute(self._conn, _WRITERS_LOCK)
            found = _RAW_AUDIT_HEAD.rows(self._conn, self._dialect, {})
            head = (found[0][0], found[0][1]) if found else None
            if lock:
                self.audit_tail = (True, head)
            return head

    def insert_audit(self, record: StoredAuditRecord) -> None:
        self.insert_audits([record])

    def insert_audits(self, records: list[StoredAuditRecord]) -> None:
        if not records:
            return
        with self._op("insert_audit", write=True):
            # A prebuilt statement with bound parameters: building an
            # INSERT .. VALUES per record cost more than the rest of the
            # record together. Several records: one executemany (on
            # PostgreSQL pipelined, one round trip).
            _RAW_AUDIT_INSERT.many(self._conn, self._dialect, [_AUDIT_VALUES(r) for r in records])
            known, tail = self.audit_tail
            first, last = records[0], records[-1]
            consecutive = last.seq - first.seq == len(records) - 1
            if known and consecutive and first.seq == (1 if tail is None else tail[0] + 1):
                self.audit_tail = (True, (last.seq, last.hash))
            else:
                self.audit_tail = (False, None)  # not the next records: read the head again

    def audit_records(self, query: AuditQuery) -> list[StoredAuditRecord]:
        with self._op("audit_records"):
            a = kms_audit.c
            conditions = [a.seq > query.after_seq]
            if query.uids is not None:
                conditions.append(a.uid.in_(query.uids))
            for column, value in (
                (a.operation, query.operation),
                (a.client, query.client),
                (a.result, query.result),
                (a.x_component, query.component),
            ):
                if value is not None:
                    conditions.append(column == value)
            if query.since is not None:
                conditions.append(a.time >= query.since)
            if query.until is not None:
                conditions.append(a.time <= query.until)
            if query.names is not None:
                conditions.append(or_(a.x_name.in_(query.names), a.x_identifier.in_(query.names)))
            stmt = select(kms_audit).where(*conditions).order_by(a.seq)
            if query.limit is not None:
                stmt = stmt.limit(query.limit)
            return [StoredAuditRecord(**row._mapping) for row in self._conn.execute(stmt)]

    def insert_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
        with self._op("insert_checkpoint", write=True):
            dialect_insert = pg_dialect.insert if self._dialect == "postgresql" else sqlite_dialect.insert
            stmt = dialect_insert(kms_audit_checkpoints).values(
                seq=checkpoint.seq,
                time=checkpoint.time,
                node=checkpoint.node,
                head_hash=checkpoint.head_hash,
                key_id=checkpoint.key_id,
                signature=checkpoint.signature,
            )
            stmt = stmt.on_conflict_do_nothing(index_elements=[kms_audit_checkpoints.c.seq])
            return self._conn.execute(stmt.returning(kms_audit_checkpoints.c.seq)).first() is not None

    def audit_checkpoints(self) -> list[StoredCheckpoint]:
        with self._op("audit_checkpoints"):
            rows = self._conn.execute(select(kms_audit_checkpoints).order_by(kms_audit_checkpoints.c.seq))
            return [StoredCheckpoint(**row._mapping) for row in rows]


# A record's row, in the order of the audit insert's parameters (its
# columns, which are StoredAuditRecord's fields), read from C.
_AUDIT_VALUES = operator.attrgetter(*_RAW_AUDIT_INSERT.names)


class SqlStorage(Storage):
    """Storage in a SQL database: `sqlite:///path` or
    `postgresql+psycopg://user@host/db` (`postgresql://` means psycopg)."""

    def __init__(self, db_url: str, *, pool_size: int = 16, schema: str = "upgrade") -> None:
        """`schema`: "upgrade" applies the Alembic migrations up to head
        (the embedded single-node default and tests), "check" refuses a
        database that is not at head (cluster nodes: `kms-admin db upgrade`
        is an explicit step)."""
        url, shown = parse_db_url(db_url)
        backend = url.get_backend_name()
        self._dialect = backend
        self._local = threading.local()
        # Group commit of this process's writers (WriteBatches). On SQLite
        # the reactor thread fills batches too (reactor_batches).
        self.writes: WriteBatches | None = None
        # Read-only connections between transactions, at most READERS_KEPT,
        # each taken by one reader at a time, with the time it was put back.
        # Taking a connection from the pool and returning it cost about as
        # much as a Get's own reads on SQLite (issue 15), and a tenth of a
        # Get's CPU on PostgreSQL; a connection whose transaction failed is
        # closed instead.
        self._idle_readers: collections.deque[tuple[Connection, float]] = collections.deque()
        self._closing = False
        try:
            self._engine = open_engine(url, pool_size=pool_size)
        except (SQLAlchemyError, ImportError) as exc:
            raise StorageError(f"cannot open storage {shown!r}: {exc}") from None
        if backend == "sqlite":
            configure_sqlite(self._engine)
            self.writes = WriteBatches(self._engine, url.database)
            self.reads_in_reactor = True
        elif backend == "postgresql":
            self.writes = WriteBatches(self._engine, None, dialect=backend)
        from kms_server.storage import schema as schema_versions

        self.shown_url = shown
        try:
            if schema == "upgrade":
                schema_versions.upgrade(self._engine)
            else:
                schema_versions.check(self._engine, shown)
        except schema_versions.SchemaError as exc:
            self._engine.dispose()
            raise StorageError(str(exc)) from None
        except SQLAlchemyError as exc:
            self._engine.dispose()
            raise StorageError(
                f"cannot open storage {shown!r}: {describe_error(exc)}"
            ) from None

    def on_shared_commit(self, report: Callable[[int, bool], None]) -> None:
        if self.writes is not None:
            self.writes.on_finish = report

    def reactor_batches(self) -> WriteBatches | None:
        # On PostgreSQL each statement is a round trip: writes stay on the
        # pool's threads, whose batches share commits all the same.
        return self.writes if self._dialect == "sqlite" else None

    @property
    def idle_readers(self) -> int:
        """Read-only connections kept between transactions."""
        return len(self._idle_readers)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for Alembic and administrative tools."""
        return self._engine

    @contextlib.contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Transaction]:
        # A second transaction on the same thread would wait for the first
        # one's locks forever (or for busy_timeout on SQLite).
        if getattr(self._local, "active", False):
            raise StorageError("transactions do not nest")
        writes = None if read_only else self.writes
        reactor = self._dialect == "sqlite"  # SQLite's writes may run in the reactor thread
        if writes is not None and reactor and not writes.reactor_batch_open:
            # In the reactor thread, work that can wait for the writer's
            # turn waits here, before its transaction begins, while the
            # reactor serves others; other work raises WriterBusy.
            writer_turn("a write transaction (the reactor's batch is not open)")
        self._local.active = True
        try:
            if writes is not None:
                # One writer at a time (SQLite's write lock; on PostgreSQL
                # the writers' advisory lock); the writers of this process
                # share commits (group commit, WriteBatches). In the reactor
                # thread (SQLite), the block joins the reactor's batch,
                # committed later, or raises WriterBusy when none is open
                # (reactor_transaction).
                if reactor and in_reactor_now():
                    with writes.reactor_transaction(self._dialect) as tx:
                        yield tx
                else:
                    with writes.transaction(self._dialect) as tx:
                        yield tx
            else:
                with self._unit_of_work(read_only) as tx:
                    yield tx
        finally:
            self._local.active = False

    @contextlib.contextmanager
    def _unit_of_work(self, read_only: bool = False) -> Iterator[Transaction]:
        # Readers keep their connections between transactions (see
        # _idle_readers); a write's comes from the pool.
        keep_reader = read_only
        postgresql = self._dialect == "postgresql"
        conn = None
        if keep_reader:
            conn = self._kept_reader()
        if conn is None:
            try:
                conn = self._engine.connect()
                if read_only and postgresql:
                    # Each statement its own transaction: under READ
                    # COMMITTED, PostgreSQL's level here, each statement of
                    # a transaction sees what was committed when it began
                    # anyway, and BEGIN and COMMIT were two round trips of
                    # a Get's three.
                    conn = conn.execution_options(**{READ_ONLY: True, "isolation_level": "AUTOCOMMIT"})
                elif read_only:
                    conn = conn.execution_options(**{READ_ONLY: True})
            except SQLAlchemyError as exc:
                raise _storage_error("connect", exc) from None
        clean = False  # the transaction ended by a commit or rollback that worked
        gone = False  # the database connection was lost (PostgreSQL)
        try:
            try:
                trans: Any = (
                    (AutocommitRead(conn) if postgresql else SqliteRead(conn)) if keep_reader else conn.begin()
                )
            except SQLAlchemyError as exc:
                raise _storage_error("begin", exc) from None
            tx = _SqlTransaction(conn, self._dialect, read_only)
            try:
                yield tx
            except BaseException as exc:
                tx._closed = True
                gone = isinstance(exc, StorageUnavailable)
                with contextlib.suppress(SQLAlchemyError):
                    trans.rollback()
                    clean = not tx.failed
                raise
            tx._closed = True
            if tx.failed:
                with contextlib.suppress(SQLAlchemyError):
                    trans.rollback()
                raise StorageError("the transaction failed and was rolled back")
            try:
                trans.commit()
            except SQLAlchemyError as exc:
                raise _storage_error("commit", exc, commit=True) from None
            clean = True
            tx.run_after_commit()
        finally:
            if keep_reader and clean and not self._closing and len(self._idle_readers) < READERS_KEPT:
                self._idle_readers.append((conn, time.monotonic()))
            else:
                with contextlib.suppress(SQLAlchemyError):
                    conn.close()
            if gone:
                # The server that dropped this connection dropped the kept
                # ones too (pg_execute replaced the pool already).
                self._drop_idle_readers()

    def _kept_reader(self) -> Connection | None:
        """A reader's connection kept from an earlier read, or None. On
        PostgreSQL one that sat idle longer than PING_AFTER_IDLE_SECONDS is
        closed instead (back to the pool, which pings it before handing it
        out again): the server may have dropped it meanwhile (a failover),
        and a read on it would fail and be retried."""
        while True:
            try:
                conn, since = self._idle_readers.pop()
            except IndexError:
                return None
            stale = self._dialect == "postgresql" and time.monotonic() - since > PING_AFTER_IDLE_SECONDS
            if not stale and not (conn.closed or conn.invalidated):
                return conn
            with contextlib.suppress(SQLAlchemyError):
                conn.close()

    def _drop_idle_readers(self) -> None:
        while self._idle_readers:
            with contextlib.suppress(SQLAlchemyError, IndexError):
                self._idle_readers.pop()[0].close()

    def close(self) -> None:
        self._closing = True
        self._drop_idle_readers()
        if self.writes is not None:
            self.writes.close()  # its connection first, back to the pool
        self._engine.dispose()


# The most idle read-only connections a SQLite storage keeps (within the
# pool's own limit: pool_size, 16, plus its overflow).
READERS_KEPT = 16


# The most write transactions one commit holds. A batch runs its members'
# blocks one after the other, so a longer batch delays its first member's
# answer; and another process waits for the whole batch.
BATCH_MAX = 16


class _Batch:
    """One database transaction that several write transactions share."""

    __slots__ = ("conn", "trans", "members", "broken", "done", "error", "joined", "audit_tail", "meta", "unsynced")

    def __init__(self, conn: Connection, trans: Any) -> None:
        self.conn = conn
        self.trans = trans
        self.members = 0  # blocks whose changes wait for the commit
        # The audit head as the members joined so far left it (a member
        # rolled back leaves it as it was): _SqlTransaction.audit_tail.
        self.audit_tail: tuple[bool, tuple[int, str] | None] = (False, None)
        # Its meta rows as the members joined so far left them (PostgreSQL):
        # _SqlTransaction.meta.
        self.meta: dict[str, tuple[bytes | None, bool]] = {}
        self.joined: list[_SqlTransaction] = []  # a reactor batch's members
        self.broken: StorageError | None = None  # the connection failed: no commit
        self.done = False
        self.error: StorageError | None = None
        # Committed, its frames of the log not yet synced: what syncs them
        # (a reactor batch ended with `end_reactor_batch`).
        self.unsynced: WalSync | None = None


class UnsyncedCommit:
    """A reactor batch committed, whose frames of the write-ahead log are
    not yet durable (`WriteBatches.end_reactor_batch`). Nobody may be told
    of its members' changes before `sync()` (or `settle`) returned None."""

    __slots__ = ("_batches", "_batch", "_wal")

    def __init__(self, batches: WriteBatches, batch: _Batch, wal: WalSync) -> None:
        self._batches = batches
        self._batch = batch
        self._wal = wal

    @property
    def database(self) -> str:
        """The database file whose log is to be synced (the sync process
        is sent its path)."""
        return self._wal.database

    def sync(self) -> StorageError | None:
        """Blocks: one `fdatasync` of the log in this process, which makes
        this commit durable and every commit before it; the error that
        leaves the batch not durable, or None."""
        return self._batches._synced(self._wal)

    def settle(self, error: OSError | None) -> StorageError | None:
        """The outcome of a sync of the log made elsewhere (the sync
        process: None, or the OSError its fdatasync raised), taken as
        `sync()` takes its own: a failure refuses every later write."""
        return self._batches._settled(self._wal, error)

    @staticmethod
    def lost(why: str) -> StorageError:
        """The outcome when the sync's answer never came (the sync process
        exited): unknown, though no sync failed, so later writes go on and
        the next sync covers this batch's frames too."""
        return StorageUnavailable(f"{why}: the change may or may not be stored", commit_unknown=True)

    def durable(self) -> None:
        """In the reactor thread, once `sync()` returned None: the members'
        `after_commit` work."""
        self._batches._after_commit(self._batch)


@contextlib.contextmanager
def writer_flock(path: str | None) -> Iterator[None]:
    """Hold the writers' flock of a SQLite database (`WriteBatches.lock_path`)
    around a write made outside the storage (a node's heartbeat row): the
    node's own batches, in its reactor thread, then find the flock taken and
    wait for it on a pool thread, instead of meeting the write in SQLite's
    busy handler, which sleeps in the thread that waits. Taken on a file of
    its own, it excludes this process's batches as well as others'. None:
    nothing to hold (PostgreSQL)."""
    if path is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError:
        yield  # a read-only directory: the batches take no flock either
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


# How the write-ahead log is copied into the database file (a checkpoint).
# A checkpointer thread of each process (`WalCheckpointer`) does it, outside
# the writers' flock and the reactor thread, at most every
# CHECKPOINT_SECONDS while batches commit: SQLite's own checkpoint ran in
# the COMMIT that passed 10,000 pages of log, the flock held and the
# reactor waiting (4-8 ms every 0.7 s under the cycle at 16 connections,
# bench/README.md, "The cycle's tail"). The pages every write touches (the
# store digest's, the audit trail's head, the indexes' upper levels) are
# copied once per checkpoint. The batches' connection keeps SQLite's own
# checkpoint as a backstop, at WAL_BACKSTOP_PAGES (of 4 KiB): reached only
# if the thread falls behind, it bounds the log (160 MiB); a restart after
# a crash replays at most that much.
CHECKPOINT_SECONDS = 0.5
WAL_BACKSTOP_PAGES = 40_000


class WalCheckpointer:
    """Copies the write-ahead log of `database` into the database file on a
    thread of its own, with a connection of its own: ``PRAGMA
    wal_checkpoint(PASSIVE)``, which copies what no reader still needs
    without taking the write lock, so writers append meanwhile. SQLite syncs
    the log before it copies and the database file after, as in the
    checkpoints it runs itself; the log starts over from its beginning at the
    next write after a checkpoint that copied all of it.

    The thread starts with the checkpointer (the first batch's connection
    to a database in WAL mode) and waits; `committed()` (after each batch's
    commit) wakes it, and it checkpoints, then sleeps `interval` seconds before it looks again. A
    checkpoint that fails (an I/O error) is logged and tried again after
    the next commit: the frames it did not copy stay in the log, which
    `WalSync` made durable. While `allowed()` is false (a sync of the log
    failed, in this process or another: `WriteBatches.refused`), it copies
    nothing: after a failed sync the kernel may have dropped pages of the
    log, and a copy would carry what it reads back into the database file,
    as SQLite's own checkpoint never did then (no commit, no checkpoint)."""

    def __init__(
        self, database: str, interval: float = CHECKPOINT_SECONDS, allowed: Callable[[], bool] | None = None
    ):
        self.database = database
        self.interval = interval
        self.allowed = allowed
        self.checkpoints = 0  # completed PRAGMA calls (tests, diagnostics)
        self.last_error: str | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sqlite-checkpointer", daemon=True)
        self._thread.start()

    def committed(self) -> None:
        """A batch committed: the log has frames to copy."""
        self._wake.set()

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.database, timeout=10, isolation_level=None, check_same_thread=False)
            # Sync the log before copying and the file after, whatever the
            # build's default.
            conn.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            self.last_error = str(exc)
            log.error("the write-ahead log's checkpointer could not open %s: %s", self.database, exc)
            return
        try:
            while True:
                self._wake.wait()
                if self._stopping.is_set():
                    return
                self._wake.clear()
                if self.allowed is not None and not self.allowed():
                    continue
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    self.last_error = str(exc)
                    log.error("checkpoint of the write-ahead log of %s failed: %s", self.database, exc)
                else:
                    self.checkpoints += 1
                if self._stopping.wait(self.interval):
                    return
        finally:
            conn.close()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(30)


def _durable_after_turn(conn: Connection) -> WalSync | None:
    """Set up the batches' new connection: in WAL mode on a database file,
    `synchronous = NORMAL` and the `WalSync` that makes its commits
    durable after the turn, and SQLite's own checkpoints only past
    `WAL_BACKSTOP_PAGES` (`WalCheckpointer` checkpoints); otherwise (a
    rollback journal) SQLite's `synchronous = FULL` stays, and None. Run
    on the sqlite3 connection itself, outside any transaction."""
    raw = conn.connection.driver_connection
    assert raw is not None  # a connection just made
    mode = raw.execute("PRAGMA journal_mode").fetchone()
    files = {name: path for _, name, path in raw.execute("PRAGMA database_list").fetchall()}
    if mode is None or str(mode[0]).lower() != "wal" or not files.get("main"):
        return None
    raw.execute("PRAGMA synchronous = NORMAL")
    # The checkpoints are WalCheckpointer's; SQLite's own, in COMMIT, only
    # past the backstop.
    raw.execute(f"PRAGMA wal_autocheckpoint = {WAL_BACKSTOP_PAGES}")
    return WalSync(files["main"])


class WriteBatches:
    """Group commit of the write transactions of one process on SQLite
    (and on PostgreSQL, where each batch first takes the writers' advisory
    lock instead of the flock below, and no reactor batch is opened:
    docs/process-model.md, "Writers on PostgreSQL").

    SQLite lets one writer in at a time, and each commit's frames of the
    write-ahead log must reach the disk (`WalSync`, after the flock is
    released) before its writers are told. Writers of this process
    therefore queue here, and those that arrive while a transaction is
    open join it instead of opening their own: each runs its block, in
    turn, under a SAVEPOINT of the shared transaction (the first needs
    none: a failure of its block rolls back the whole transaction, which
    holds nothing else yet, and ends the batch); a block that raises (or
    whose transaction failed) is rolled back to its savepoint, and the
    others keep their changes. The writer that finds nobody waiting behind
    it (or the BATCH_MAX-th) commits for all; every member returns from its
    `with` only then (once synced), with the commit's outcome: nothing is
    answered before it is durable, and a failed commit or sync fails each
    member. Alone, a writer pays one commit, as before. Members see the
    changes of earlier members of their batch, as they would have seen
    them committed.

    Writers of other processes (`[server] processes`, `kms-admin` commands)
    wait on an exclusive flock of the lock file `<database>-writer`, taken
    for each batch before BEGIN IMMEDIATE: the kernel wakes them when it is
    released, where SQLite's busy handler would sleep and poll (up to 100
    ms a turn). busy_timeout still covers a writer that does not take it."""

    def __init__(self, engine: Engine, database: str | None, dialect: str = "sqlite") -> None:
        self._engine = engine
        self._dialect = dialect
        self._cond = threading.Condition()
        self._busy = False  # a thread is using the open batch (its block or its commit)
        self._waiting = 0
        self._batch: _Batch | None = None
        self._lock_fd: int | None = None
        self._lock_path = f"{database}-writer" if database else None
        # Left by a process whose sync of the log failed: every process
        # writing this database refuses to write while it exists (WalSync).
        self._failed_path = f"{database}-sync-failed" if database else None
        # The connection batches run on, kept from one batch to the next
        # (batches of a process take turns): connecting and returning a
        # connection to the pool cost more than a small write (issue 15).
        # Dropped after a batch that failed.
        self._conn: Connection | None = None
        # Commits of `_conn` made durable after the flock is released
        # (WalSync); None: SQLite syncs inside COMMIT (not in WAL mode).
        self._wal: WalSync | None = None
        # Copies the log into the database file after commits, on a
        # thread of its own (WalCheckpointer); with `_wal`.
        self._checkpointer: WalCheckpointer | None = None
        # Why writes are refused for good: the log could not be synced.
        self._sync_failed: str | None = None
        # The batch the reactor thread has open (kms_server/storage/
        # reactor_writes.py opens and commits it), how many blocks have
        # joined one so far, and the thread that fills it.
        self._reactor_batch: _Batch | None = None
        self._reactor_joined = 0
        self._reactor_thread: int | None = None
        # Told (members, committed) after each batch of worker threads'
        # writers ends (the node's metrics); the reactor's batches are
        # reported by ReactorWrites.
        self.on_finish: Callable[[int, bool], None] | None = None

    @property
    def waiting(self) -> int:
        """Writers queued behind the open batch (tests, diagnostics)."""
        return self._waiting

    @property
    def holds_connection(self) -> bool:
        """Whether a connection is kept for the next batch (tests, diagnostics)."""
        return self._conn is not None

    @property
    def lock_path(self) -> str | None:
        """The file whose flock writers of every process take."""
        return self._lock_path

    @property
    def refused(self) -> str | None:
        """Why writes are refused (the log could not be synced, by this
        process or another: WalSync), or None. The node's readiness."""
        if self._sync_failed is None and self._failed_path is not None and os.path.exists(self._failed_path):
            self._sync_failed = f"another process could not sync the write-ahead log ({self._failed_path} exists)"
        return self._sync_failed

    @property
    def wal(self) -> WalSync | None:
        """What makes the batches' commits durable after the flock is
        released, once a batch has connected (None: SQLite syncs inside
        COMMIT, not in WAL mode). Tests, diagnostics."""
        return self._wal

    @property
    def checkpointer(self) -> WalCheckpointer | None:
        """What copies the log into the database file (None: not in WAL
        mode, or no batch yet). Tests, diagnostics."""
        return self._checkpointer

    def close(self) -> None:
        self._drop_connection()
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        if self._wal is not None:
            self._wal.close()
            self._wal = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _flock(self, op: int) -> bool:
        """flock the lock file; False if LOCK_NB was asked and another
        process holds it."""
        if self._lock_path is None:
            return True
        if self._lock_fd is None:
            try:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError:
                self._lock_path = None  # a read-only directory: busy_timeout alone, as before
                return True
        try:
            fcntl.flock(self._lock_fd, op)
        except BlockingIOError:
            return False
        return True

    def _open(self) -> _Batch:
        """Take the writer flock (held already if taken with LOCK_NB) and
        begin the batch's transaction."""
        refused = self.refused
        if refused is not None:
            raise StorageError(
                f"writes are refused: {refused}; check the disk, remove {self._failed_path}, then restart the node"
            )
        self._flock(fcntl.LOCK_EX)
        conn = self._conn
        if conn is None or conn.closed or conn.invalidated:
            try:
                conn = self._conn = self._engine.connect()
                wal = _durable_after_turn(conn) if self._dialect == "sqlite" else None
            except (SQLAlchemyError, sqlite3.Error) as exc:
                self._drop_connection()
                self._flock(fcntl.LOCK_UN)
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"connect: {exc}") from None
                raise _storage_error("connect", exc) from None
            # The log's descriptor is kept across connections (WalSync).
            if self._wal is None or wal is None or wal.path != self._wal.path:
                if self._wal is not None:
                    self._wal.close()
                self._wal = wal
                if self._checkpointer is not None:
                    self._checkpointer.close()
                self._checkpointer = (
                    WalCheckpointer(wal.database, allowed=lambda: self.refused is None) if wal is not None else None
                )
        try:
            trans = SqliteWrite(conn) if self._dialect == "sqlite" else conn.begin()
            batch = _Batch(conn, trans)
            if self._dialect == "postgresql":
                # The writers' turn, cluster-wide, before any member runs
                # (AUDIT_LOCK_KEY), held until the batch ends; and, once it
                # is held, the audit trail's head, which every write's
                # record needs: with the BEGIN, one round trip.
                pg_defer(conn, _WRITERS_LOCK)
                found = _RAW_AUDIT_HEAD.rows(conn, self._dialect, {})
                batch.audit_tail = (True, (found[0][0], found[0][1]) if found else None)
            return batch
        except SQLAlchemyError as exc:
            self._drop_connection()
            self._flock(fcntl.LOCK_UN)
            raise _storage_error("begin", exc) from None

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(SQLAlchemyError):
                # Closed for good, not returned to the pool: it may run with
                # synchronous = NORMAL, whose commits only WalSync makes durable.
                conn.invalidate()
                conn.close()

    def _finish(self, batch: _Batch, sync: bool = True) -> None:
        """Commit (or roll back) the batch and wake its members. With
        `sync` false, a commit's frames of the log are left for the caller
        to sync (`batch.unsynced`: UnsyncedCommit)."""
        error = batch.broken
        keep = False  # the connection serves the next batch only after a clean end
        try:
            deferred = self._take_deferred(batch)
            if error is None and batch.members and self._dialect == "postgresql":
                error = self._before_commit(batch, deferred)
            if error is None and batch.members:
                try:
                    batch.trans.commit()
                    keep = True
                except SQLAlchemyError as exc:
                    error = _storage_error("commit", exc, commit=True)
                    # Whatever state the failed COMMIT left it in, this
                    # connection does not go back to the pool.
                    with contextlib.suppress(SQLAlchemyError):
                        batch.conn.invalidate()
            else:
                try:
                    batch.trans.rollback()
                    keep = batch.broken is None
                except SQLAlchemyError:
                    pass
        finally:
            if not keep:
                self._drop_connection()
            self._flock(fcntl.LOCK_UN)
            if keep and batch.members and self._wal is not None:
                # Durable before anyone is told: outside the flock, so the
                # node's other processes write meanwhile (WalSync).
                if sync:
                    error = self._synced(self._wal)
                else:
                    batch.unsynced = self._wal
            with self._cond:
                batch.error, batch.done = error, True
                self._busy = False
                self._cond.notify_all()

    def _synced(self, wal: WalSync) -> StorageError | None:
        """Sync the log after a commit, in this process (blocks)."""
        try:
            wal.sync()
        except OSError as exc:
            return self._settled(wal, exc)
        return self._settled(wal, None)

    def _settled(self, wal: WalSync, failure: OSError | None) -> StorageError | None:
        """The outcome of a sync of the log after a commit, made here or by
        the sync process (`failure`: what its fdatasync raised, or None).
        A failure is the batch's error, and every later write is refused,
        by every process (WalSync). A batch synced once another process's
        sync failed is not reported durable either: its frames may follow
        pages that failure lost. Once durable, the checkpointer is woken."""
        if failure is not None:
            self._sync_failed = f"the write-ahead log {wal.path} could not be synced to disk ({failure})"
            log.critical(
                "%s: the last batch's changes may not survive a power cut, and no further write is accepted"
                " by any process of this database; check the disk, remove %s, then restart the node",
                self._sync_failed,
                self._failed_path,
            )
            self._mark_failed()
        elif self.refused is None:
            if self._checkpointer is not None:
                self._checkpointer.committed()
            return None
        return StorageUnavailable(f"{self.refused}: the change may or may not be stored", commit_unknown=True)

    def _mark_failed(self) -> None:
        """Tell every process of this database (the file `<database>-sync-failed`)."""
        if self._failed_path is None:
            return
        try:
            fd = os.open(self._failed_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            log.critical("cannot leave %s for the other processes: %s", self._failed_path, exc)
            return
        try:
            os.write(fd, (self._sync_failed or "").encode() + b"\n")
            os.fsync(fd)
        except OSError:
            pass  # the file's existence is what counts
        finally:
            os.close(fd)

    def _savepoint(self, batch: _Batch, sql: str) -> None:
        try:
            if self._dialect == "sqlite":
                sqlite_execute(batch.conn, sql)
            else:
                # Sent with the next statement, in its round trip (two of a
                # member's seven were its SAVEPOINT and RELEASE); what is
                # left at the end, `_finish` sends or drops.
                pg_defer(batch.conn, sql)
        except SQLAlchemyError as exc:
            batch.broken = batch.broken or _storage_error("savepoint", exc)

    def _before_commit(self, batch: _Batch, deferred: list[str]) -> StorageError | None:
        """PostgreSQL: what must reach the database before the batch's
        COMMIT, in one round trip: a pending ROLLBACK TO (a failed member's
        changes undone), then the meta rows the members wrote. A pending
        SAVEPOINT or RELEASE alone changes nothing a COMMIT keeps: dropped."""
        writes = [{"key": key, "value": value} for key, (value, wrote) in batch.meta.items() if wrote]
        if not writes and not any(statement.startswith("ROLLBACK") for statement in deferred):
            return None
        try:
            for statement in deferred if writes else deferred[:-1]:
                pg_defer(batch.conn, statement)
            for params in writes:  # usually one: the store digest
                _RAW_META_UPSERT.changed(batch.conn, self._dialect, params)
            if not writes:
                pg_execute(batch.conn, deferred[-1])
        except SQLAlchemyError as exc:
            return _storage_error("set_meta" if writes else "savepoint", exc)
        return None

    def _take_deferred(self, batch: _Batch) -> list[str]:
        """PostgreSQL: the savepoint statements deferred and not sent."""
        if self._dialect != "postgresql" or batch.conn.closed or batch.conn.invalidated:
            return []
        try:
            return pg_take_deferred(batch.conn)
        except SQLAlchemyError:
            return []

    def _take_turn(self) -> _Batch | None:
        """Wait for this process's turn at the writer, behind the threads
        queued before; the batch its last holder handed over, if any."""
        with self._cond:
            self._waiting += 1
            while self._busy:
                self._cond.wait()
            self._waiting -= 1
            self._busy = True
            return self._batch

    @contextlib.contextmanager
    def transaction(self, dialect: str) -> Iterator[Transaction]:
        if self._reactor_batch is not None and threading.get_ident() == self._reactor_thread:
            # It would wait for the reactor's own commit, forever.
            raise StorageError("a waiting write transaction in the reactor thread while its batch is open")
        batch = self._take_turn()
        if batch is None:
            try:
                batch = self._batch = self._open()
            except BaseException:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
                raise
        # Only a block after the first has others' changes to keep.
        savepoint = batch.members > 0
        if savepoint:
            self._savepoint(batch, "SAVEPOINT member")
        tx = _SqlTransaction(batch.conn, dialect)
        tx.audit_tail = batch.audit_tail
        if self._dialect == "postgresql":
            tx.writers_locked = True
            tx.meta = dict(batch.meta)  # a member rolled back leaves the batch's as they were
        if batch.broken is not None:
            tx.failed = True
        failure: BaseException | None = None
        try:
            yield tx
        except BaseException as exc:
            failure = exc
        tx._closed = True
        if batch.broken is None and (batch.conn.invalidated or batch.conn.closed):
            # The block met a lost connection (pg_execute invalidated it):
            # the batch cannot commit, and the writers queued behind it
            # start a new one.
            batch.broken = StorageUnavailable("the batch's database connection was lost")
        joined = failure is None and not tx.failed and batch.broken is None
        if savepoint:
            if joined:
                self._savepoint(batch, "RELEASE member")
                joined = batch.broken is None
            else:
                self._savepoint(batch, "ROLLBACK TO member")
                self._savepoint(batch, "RELEASE member")
        if joined:
            batch.members += 1
            batch.audit_tail = tx.audit_tail
            if tx.meta is not None:
                batch.meta = tx.meta
        with self._cond:
            # A failed first block is undone by rolling the batch back.
            hand_over = (
                batch.broken is None
                and (savepoint or joined)
                and self._waiting > 0
                and batch.members < BATCH_MAX
            )
            if hand_over:
                # The next writer continues the batch; this one waits for
                # the commit if it has changes in it.
                self._busy = False
                self._cond.notify_all()
                if joined:
                    while not batch.done:
                        self._cond.wait()
            else:
                self._batch = None
        if not hand_over:
            self._finish(batch)
            if self.on_finish is not None and batch.members:
                try:
                    self.on_finish(batch.members, batch.error is None)
                except Exception:
                    log.exception("reporting a batch of writes failed")
        if failure is not None:
            raise failure
        if tx.failed:
            raise StorageError("the transaction failed and was rolled back")
        error = batch.error if joined else batch.broken
        if error is not None:
            raise _own_copy(error)
        tx.run_after_commit()

    # The reactor thread's batches (kms_server/storage/reactor_writes.py).
    # A node on SQLite runs most writes in its reactor thread: there, a
    # write transaction joins the batch the reactor has open, or raises
    # WriterBusy (before it has done anything) when none is. The batch is
    # committed by `end_reactor_batch`, after the blocks have returned,
    # so nothing inside waits on another thread; each member's
    # `after_commit` work runs then.

    @property
    def reactor_batch_open(self) -> bool:
        return self._reactor_batch is not None

    @property
    def reactor_members(self) -> int:
        """Blocks that joined reactor batches so far (a counter the caller
        compares before and after a request to know whether it joined)."""
        return self._reactor_joined

    def open_reactor_batch(self) -> bool:
        """In the reactor thread: open a batch if that needs no wait (no
        other thread of this process writing or queued to, the writer
        flock free); False otherwise."""
        if self._reactor_batch is not None:
            return True
        with self._cond:
            if self._busy or self._waiting:
                return False  # threads queued first go first
            self._busy = True
        batch: _Batch | None
        if self._batch is not None:
            batch = self._adopt()
        else:
            try:
                locked = self._flock(fcntl.LOCK_EX | fcntl.LOCK_NB)
                batch = self._open() if locked else None
            except BaseException:
                self._release_turn()
                raise
        if batch is None:
            self._release_turn()
            return False
        self._reactor_batch = batch
        return True

    def wait_reactor_batch(self) -> None:
        """On a pool thread: wait for this process's turn and the writer
        flock, then open a batch for the reactor thread to fill and commit."""
        if self._take_turn() is not None:
            self._reactor_batch = self._adopt()
            return
        try:
            batch = self._open()
        except BaseException:
            self._release_turn()
            raise
        self._reactor_batch = batch

    def _adopt(self) -> _Batch:
        """The worker threads' batch, handed over by its last writer to the
        next in line (`transaction`): the reactor continues and commits it,
        which wakes its members."""
        batch, self._batch = self._batch, None
        assert batch is not None  # the callers checked
        return batch

    def end_reactor_batch(self) -> StorageError | UnsyncedCommit | None:
        """In the reactor thread: commit the open batch (roll it back if
        no block joined it) and end this process's turn, without waiting
        for the disk: the commit's error; or what makes the commit durable
        and then runs the members' `after_commit` work (UnsyncedCommit),
        when its frames of the write-ahead log are still to be synced; or
        None once all is done (nothing to commit, or SQLite synced inside
        COMMIT). The writer flock is free again either way, so the node's
        other processes write while this one's sync runs."""
        batch, self._reactor_batch = self._reactor_batch, None
        if batch is None:
            return None
        # A batch adopted from the worker threads (`_adopt`) has members
        # waiting on their threads for `done`, which `_finish` sets: its
        # sync runs here, before they are woken.
        self._finish(batch, sync=batch.members != len(batch.joined))
        if batch.error is not None:
            return batch.error
        if batch.unsynced is not None:
            return UnsyncedCommit(self, batch, batch.unsynced)
        self._after_commit(batch)
        return None

    def _after_commit(self, batch: _Batch) -> None:
        for tx in batch.joined:
            try:
                tx.run_after_commit()
            except Exception:
                # Committed all the same: one member's follow-up work
                # must not keep the others' answers back.
                log.exception("work after a reactor batch's commit failed")

    @contextlib.contextmanager
    def reactor_transaction(self, dialect: str) -> Iterator[Transaction]:
        """In the reactor thread: a block of the open batch, under its own
        savepoint; not committed on exit (end_reactor_batch)."""
        if self._reactor_batch is None:
            # Writes are run together, by whoever opens the reactor's
            # batches (ReactorWrites), not one by one as they come.
            raise WriterBusy("a write transaction (the reactor's batch is not open)")
        self._reactor_thread = threading.get_ident()
        batch = self._reactor_batch
        assert batch is not None  # opened above
        self._savepoint(batch, "SAVEPOINT member")
        tx = _SqlTransaction(batch.conn, dialect)
        tx.audit_tail = batch.audit_tail
        if batch.broken is not None:
            tx.failed = True
        try:
            yield tx
        except BaseException:
            tx._closed = True
            self._savepoint(batch, "ROLLBACK TO member")
            self._savepoint(batch, "RELEASE member")
            raise
        tx._closed = True
        if tx.failed or batch.broken is not None:
            self._savepoint(batch, "ROLLBACK TO member")
            self._savepoint(batch, "RELEASE member")
            raise StorageError("the transaction failed and was rolled back")
        self._savepoint(batch, "RELEASE member")
        if batch.broken is not None:
            raise _own_copy(batch.broken)
        batch.members += 1
        batch.audit_tail = tx.audit_tail
        batch.joined.append(tx)
        self._reactor_joined += 1
        pinned()  # its change waits in this batch: the work cannot start over elsewhere

    def _release_turn(self) -> None:
        with self._cond:
            self._busy = False
            self._cond.notify_all()


def _own_copy(error: StorageError) -> StorageError:
    """Each member raises its own exception (one object raised in several
    threads would share one traceback)."""
    if isinstance(error, StorageUnavailable):
        return StorageUnavailable(str(error), commit_unknown=error.commit_unknown)
    return StorageError(str(error))
