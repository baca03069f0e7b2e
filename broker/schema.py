"""The broker's schema versions: Alembic migrations in broker/migrations/,
applied and checked by kmip_core.db.migrations' functions (the same code
as the KMS, pointed at the broker's scripts and version table).

`vtpm-broker db upgrade` applies them. At start the broker applies them
itself on SQLite (one broker) and only checks on PostgreSQL (several broker
replicas share the database: the operator upgrades once, then restarts
them), as the KMS does; `[storage] schema` overrides that choice. The
revision lives in `broker_alembic_version`, so a broker may even share a
PostgreSQL database with a KMS without either seeing the other's revision.

A database made by a broker from before migrations (tables created by
`Database.create_all`) is stamped at revision 0001, which is that schema,
and upgraded from there.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from broker.db import Database, DatabaseError
from kmip_core.db import migrations as _schema
from kmip_core.db.engine import describe_error
from kmip_core.db.migrations import Migrations, SchemaError

__all__ = ["BROKER", "SchemaError", "check", "current_revision", "head_revision", "prepare", "upgrade"]

BROKER = Migrations(
    script_location=Path(__file__).with_name("migrations"),
    version_table="broker_alembic_version",
    lock_id=0x76746D75,  # "vtmu"
    marker_table="broker_meta",
    product="vtpm-broker",
    upgrade_command="vtpm-broker --config <file> db upgrade",
    unversioned_fix="upgrade it with vtpm-broker db upgrade",
    baseline="0001",
)


def head_revision() -> str:
    return _schema.head_revision(BROKER)


def known_revisions() -> set[str]:
    return _schema.known_revisions(BROKER)


def current_revision(db: Database) -> str | None:
    try:
        return _schema.current_revision(db.engine, BROKER)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema revision of {db.shown_url}: {describe_error(exc)}") from None


def upgrade(db: Database) -> tuple[str | None, str]:
    """Apply the broker's migrations up to head: (revision before, after)."""
    try:
        return _schema.upgrade(db.engine, BROKER)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot upgrade the schema of {db.shown_url}: {describe_error(exc)}") from None


def check(db: Database) -> None:
    """Raise SchemaError (one line) unless the database is at head."""
    try:
        _schema.check(db.engine, db.shown_url, BROKER)
    except SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the schema revision of {db.shown_url}: {describe_error(exc)}") from None


def prepare(db: Database, mode: str) -> None:
    """At start: "upgrade" applies the migrations, "check" refuses a database
    that is not at head."""
    if mode == "upgrade":
        upgrade(db)
    elif mode == "check":
        check(db)
    else:
        raise ValueError(f"schema mode must be 'upgrade' or 'check', not {mode!r}")
