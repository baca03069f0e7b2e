"""Helpers the KMS backup tests share: a minimal kms-server configuration
for a store, and every backed-up row of a database to compare two stores.

Used by tests/kms_server/admin/test_backup.py, test_backup_formats.py and
tests/kms_server/keystore/test_pkcs11_key.py.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, make_url, select
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool

from kms_server.admin import backup as backup_mod
from kms_server.storage import sql as sql_tables


def store_config(tmp_path: Path, name: str, db_url: str, master_key_body: str, node_name: str) -> Path:
    """TMP_PATH/NAME.toml: [server], [storage] db_url and [master_key] (its
    body as given, e.g. 'file = "..."\\n')."""
    path = tmp_path / f"{name}.toml"
    path.write_text(
        f'[server]\nnode_name = "{node_name}"\ndata_dir = "{tmp_path / "data"}"\n\n'
        f'[storage]\ndb_url = "{db_url}"\n\n[master_key]\n{master_key_body}'
    )
    return path


def engine(url: str) -> Engine:
    """An engine without a pool; PostgreSQL through psycopg (3)."""
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return create_engine(parsed, poolclass=NullPool)


def dump(url: str) -> dict[str, list[tuple]]:
    """Every row of every backed-up table, in primary-key order."""
    db = engine(url)
    try:
        with db.connect() as conn:
            out = {}
            for name in backup_mod.BACKUP_TABLES:
                table = sql_tables.metadata.tables[name]
                rows = conn.execute(select(*table.columns).order_by(*table.primary_key.columns))
                out[name] = [tuple(bytes(v) if isinstance(v, memoryview) else v for v in row) for row in rows]
            return out
    finally:
        db.dispose()
