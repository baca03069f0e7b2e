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

from kmip_core.db import migrations
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


def _audit_layout(engine) -> dict[str, object]:
    """What migration 0006 changes: the indexes of kms_audit and whether
    each is partial; on SQLite, whether seq is the rowid."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'kms_audit'")
            ).all()
            seq_is_rowid = conn.execute(text("SELECT count(*) FROM kms_audit WHERE rowid != seq")).scalar() == 0
            return {
                "indexes": {name: sql is not None and "WHERE" in sql for name, sql in rows},
                "seq_is_rowid": seq_is_rowid,
            }
        rows = conn.execute(
            text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'kms_audit'")
        ).all()
        return {"indexes": {name: "WHERE" in sql for name, sql in rows}}


def test_lean_audit_migration_keeps_every_record_both_ways(db_url):
    """Migration 0006 rebuilds kms_audit on SQLite (seq as the rowid) and
    makes three of its indexes partial: the records, and the chain they
    form, come through an upgrade and a downgrade byte for byte."""
    from kms_server.audit.trail import AuditTrail, iter_records, verify_storage

    storage = open_storage(db_url)
    try:
        trail = AuditTrail(storage, "n1")
        for i in range(30):
            entry = {"operation": "Get", "client": {"name": "c"}, "result": {"status": "SUCCESS"}}
            if i % 3:
                entry["uid"] = f"key-{i % 7}"  # some records have no uid
            if i % 5 == 0:
                entry["object"] = {"x-Name": f"vm-{i}", "x-Identifier": f"id-{i}", "x-Component": "Virtual Machine"}
            trail.write(entry)
        before = list(iter_records(storage))
    finally:
        storage.close()
    assert len(before) == 30

    engine = create_engine(db_url)
    try:
        lean = _audit_layout(engine)
        partial = {"ix_kms_audit_uid": True, "ix_kms_audit_x_name": True, "ix_kms_audit_x_identifier": True}
        for name, is_partial in partial.items():
            assert lean["indexes"][name] is is_partial
        assert lean["indexes"]["ix_kms_audit_time"] is False
        if engine.dialect.name == "sqlite":
            assert lean["seq_is_rowid"] and not any("autoindex" in n for n in lean["indexes"])

        migrations.migrate(engine, schema.KMS, "0005", down=True)
        old = _audit_layout(engine)
        assert not any(old["indexes"][name] for name in partial)
        if engine.dialect.name == "sqlite":
            assert any("autoindex" in n for n in old["indexes"])  # seq BIGINT: a B-tree of its own
        migrations.migrate(engine, schema.KMS, "head")
        assert _audit_layout(engine) == lean
    finally:
        engine.dispose()

    storage = open_storage(db_url, schema="check")
    try:
        after = list(iter_records(storage))
        assert after == before
        assert verify_storage(storage, None).ok
        # The next record follows the chain the copied records end.
        AuditTrail(storage, "n1").write({"operation": "Get", "client": {"name": "c"}, "result": {"status": "SUCCESS"}})
        last = list(iter_records(storage))[-1]
        assert last.seq == 31
        assert verify_storage(storage, None).ok
    finally:
        storage.close()


def test_audit_queries_use_the_partial_indexes(db_url):
    """The audit searches (by key, by vCenter name) still reach their
    records through the indexes after 0006 made them partial: the queries'
    conditions imply IS NOT NULL, on SQLite and on PostgreSQL."""
    open_storage(db_url).close()
    engine = create_engine(db_url)
    queries = {
        "uid": "SELECT * FROM kms_audit WHERE seq > 0 AND uid IN ('a', 'b') ORDER BY seq",
        "names": "SELECT * FROM kms_audit WHERE seq > 0 AND (x_name IN ('a') OR x_identifier IN ('a'))",
    }
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "sqlite":
                plans = {
                    what: " ".join(row[3] for row in conn.execute(text(f"EXPLAIN QUERY PLAN {sql}")))
                    for what, sql in queries.items()
                }
            else:
                # An empty table: the planner would scan it; told not to,
                # it shows which indexes it may use.
                conn.execute(text("SET enable_seqscan = off"))
                plans = {
                    what: " ".join(row[0] for row in conn.execute(text(f"EXPLAIN {sql}")))
                    for what, sql in queries.items()
                }
    finally:
        engine.dispose()
    assert "ix_kms_audit_uid" in plans["uid"]
    assert "ix_kms_audit_x_name" in plans["names"] and "ix_kms_audit_x_identifier" in plans["names"]
