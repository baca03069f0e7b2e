"""Schema migrations (Alembic): the migrations build exactly the schema the
code declares, `kms-admin db upgrade` applies them, and a node refuses a
database whose schema it does not know, with a one-line reason."""

from __future__ import annotations

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, text

from kms_server.storage import open_storage, schema
from kms_server.storage.base import StorageError
from kms_server.storage.sql import metadata


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kms.db'}"
    return request.getfixturevalue("postgres_url")


def admin(*args):
    return subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_migrations_build_the_declared_schema(db_url):
    engine = create_engine(db_url)
    try:
        schema.upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_check_mode_refuses_an_empty_database(db_url):
    with pytest.raises(StorageError) as failure:
        open_storage(db_url, schema="check")
    assert "kms-admin db upgrade" in str(failure.value)


def test_db_upgrade_then_check_mode_opens(db_url):
    first = admin("db", "upgrade", "--db-url", db_url)
    assert first.returncode == 0, first.stderr
    assert "upgraded from empty to" in first.stdout
    again = admin("db", "upgrade", "--db-url", db_url)
    assert "already at revision" in again.stdout
    status = admin("db", "status", "--db-url", db_url)
    assert status.returncode == 0
    open_storage(db_url, schema="check").close()


def test_unknown_newer_revision_is_refused(db_url):
    assert admin("db", "upgrade", "--db-url", db_url).returncode == 0
    engine = create_engine(db_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed'"))
    engine.dispose()
    with pytest.raises(StorageError) as failure:
        open_storage(db_url, schema="check")
    assert "does not know" in str(failure.value) and "upgrade this node" in str(failure.value)
    status = admin("db", "status", "--db-url", db_url)
    assert status.returncode == 1 and "newer than this release" in status.stdout


def test_node_refuses_to_start_on_an_unmigrated_postgresql(tmp_path, pki_dir, postgres_url):
    key = tmp_path / "m.key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.cli", "--port", "0",
         "--db-url", postgres_url,
         "--tls-cert", str(pki_dir / "server.pem"), "--tls-key", str(pki_dir / "server.key"),
         "--tls-ca", str(pki_dir / "ca.pem"), "--master-key-file", str(key), "--data-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    assert "no kms-server schema" in result.stderr and "kms-admin db upgrade" in result.stderr
    assert "Traceback" not in result.stderr
