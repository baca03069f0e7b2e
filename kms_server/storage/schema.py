"""The KMS's schema versions (migrations in storage/migrations/).

`kms-admin db upgrade` applies them; the functions are those of
`kmip_core.db.migrations` with the KMS's own `Migrations`.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine

from kmip_core.db import migrations as _migrations
from kmip_core.db.migrations import Migrations, SchemaError

__all__ = [
    "KMS",
    "Migrations",
    "SchemaError",
    "check",
    "current_revision",
    "head_revision",
    "known_revisions",
    "upgrade",
]

KMS = Migrations(
    script_location=Path(__file__).with_name("migrations"),
    version_table="alembic_version",
    lock_id=0x6B6D735F,  # "kms_"
    marker_table="kms_objects",
    product="kms-server",
    upgrade_command="kms-admin db upgrade --config <file>",
    unversioned_fix="restore it into an empty database with kms-admin restore",
)


def head_revision() -> str:
    return _migrations.head_revision(KMS)


def known_revisions() -> set[str]:
    return _migrations.known_revisions(KMS)


def current_revision(engine: Engine) -> str | None:
    return _migrations.current_revision(engine, KMS)


def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every migration up to head; (revision before, revision after)."""
    return _migrations.upgrade(engine, KMS)


def check(engine: Engine, shown_url: str) -> None:
    """Raise SchemaError unless the database is at this node's head."""
    _migrations.check(engine, shown_url, KMS)
