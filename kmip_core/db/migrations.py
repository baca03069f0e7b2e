"""Schema versions with Alembic, for any product's migrations.

A product describes its migrations with a `Migrations` (where the scripts
are, which version table, how messages name the product):
`kms_server.storage.schema.KMS` and `broker.schema.BROKER`. A node checks the
revision at start and refuses to serve against a schema it does not know:
older (run the upgrade) or newer (a newer release wrote it; upgrade this
node). On PostgreSQL an advisory lock serializes upgrades of nodes that
start together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection, Engine

__all__ = [
    "Migrations",
    "SchemaError",
    "check",
    "current_revision",
    "head_revision",
    "known_revisions",
    "migrate",
    "upgrade",
]


class SchemaError(Exception):
    """The database schema is not the one this node needs."""


@dataclass(frozen=True)
class Migrations:
    """One product's Alembic migrations and how its messages name it."""

    script_location: Path
    # The product's Alembic version table: two products may share a
    # PostgreSQL database only if they keep their revisions apart.
    version_table: str
    # pg_advisory_xact_lock id that serializes upgrades started together.
    lock_id: int
    # A table that exists once the schema does (to spot an unversioned one).
    marker_table: str
    product: str
    upgrade_command: str
    # What to do about a database that has the tables but no revision
    # (made before migrations existed), shown when it is refused ...
    unversioned_fix: str
    # ... unless baseline is set: then such a database is stamped at that
    # revision (the one that matches what the code created before) and
    # upgraded from there.
    baseline: str | None = None


def _config(migrations: Migrations, connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations.script_location))
    cfg.attributes["version_table"] = migrations.version_table
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _context(conn: Connection, migrations: Migrations) -> MigrationContext:
    return MigrationContext.configure(conn, opts={"version_table": migrations.version_table})


def head_revision(migrations: Migrations) -> str:
    head = ScriptDirectory.from_config(_config(migrations)).get_current_head()
    if head is None:
        raise SchemaError(f"the {migrations.product} schema has no migrations")
    return head


def known_revisions(migrations: Migrations) -> set[str]:
    return {rev.revision for rev in ScriptDirectory.from_config(_config(migrations)).walk_revisions()}


def current_revision(engine: Engine, migrations: Migrations) -> str | None:
    with engine.connect() as conn:
        return _context(conn, migrations).get_current_revision()


def upgrade(engine: Engine, migrations: Migrations) -> tuple[str | None, str]:
    """Apply every migration up to head; (revision before, revision after)."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": migrations.lock_id})
        before = _context(conn, migrations).get_current_revision()
        if before is None and inspect(conn).has_table(migrations.marker_table):
            if migrations.baseline is None:
                raise SchemaError(
                    f"the database has {migrations.product} tables but no schema revision "
                    f"(created before migrations); {migrations.unversioned_fix}"
                )
            command.stamp(_config(migrations, conn), migrations.baseline)
        command.upgrade(_config(migrations, conn), "head")
        after = _context(conn, migrations).get_current_revision()
    if after is None:
        raise SchemaError(f"the {migrations.product} schema has no migrations")
    return before, after


def migrate(engine: Engine, migrations: Migrations, revision: str, *, down: bool = False) -> None:
    """Bring the schema to `revision`: up from where it stands, or down with
    `down`. A database as an earlier release left it, for tests and
    measurements; nodes and the admin commands use `upgrade`."""
    with engine.begin() as conn:
        (command.downgrade if down else command.upgrade)(_config(migrations, conn), revision)


def check(engine: Engine, shown_url: str, migrations: Migrations) -> None:
    """Raise SchemaError unless the database is at this node's head."""
    current = current_revision(engine, migrations)
    head = head_revision(migrations)
    if current == head:
        return
    if current is None:
        raise SchemaError(
            f"database {shown_url} has no {migrations.product} schema; run '{migrations.upgrade_command}' first"
        )
    if current in known_revisions(migrations):
        raise SchemaError(
            f"database {shown_url} is at schema revision {current}, this node needs {head}; "
            f"run '{migrations.upgrade_command}'"
        )
    raise SchemaError(
        f"database {shown_url} is at schema revision {current}, which this node does not know "
        f"(it needs {head}); a newer {migrations.product} wrote it: upgrade this node"
    )
