"""Schema versions with Alembic (migrations in storage/migrations/).

`kms-admin db upgrade` applies them. A node checks the revision at start
and refuses to serve against a schema it does not know: older (run the
upgrade) or newer (a newer release wrote it; upgrade this node). On
PostgreSQL an advisory lock serializes upgrades of nodes that start
together.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

_MIGRATIONS = Path(__file__).with_name("migrations")
_PG_UPGRADE_LOCK_ID = 0x6B6D735F  # "kms_"


class SchemaError(Exception):
    """The database schema is not the one this node needs."""


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    return ScriptDirectory.from_config(_config()).get_current_head()


def known_revisions() -> set[str]:
    return {rev.revision for rev in ScriptDirectory.from_config(_config()).walk_revisions()}


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every migration up to head; (revision before, revision after)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_UPGRADE_LOCK_ID})
        before = MigrationContext.configure(conn).get_current_revision()
        if before is None and inspect(conn).has_table("kms_objects"):
            raise SchemaError(
                "the database has kms tables but no schema revision (created before migrations); "
                "restore it into an empty database with kms-admin restore"
            )
        command.upgrade(_config(conn), "head")
        after = MigrationContext.configure(conn).get_current_revision()
    return before, after


def check(engine: Engine, shown_url: str) -> None:
    """Raise SchemaError unless the database is at this node's head."""
    current = current_revision(engine)
    head = head_revision()
    if current == head:
        return
    if current is None:
        raise SchemaError(
            f"database {shown_url} has no kms-server schema; run 'kms-admin db upgrade --config <file>' first"
        )
    if current in known_revisions():
        raise SchemaError(
            f"database {shown_url} is at schema revision {current}, this node needs {head}; "
            "run 'kms-admin db upgrade --config <file>'"
        )
    raise SchemaError(
        f"database {shown_url} is at schema revision {current}, which this node does not know "
        f"(it needs {head}); a newer kms-server wrote it: upgrade this node"
    )
