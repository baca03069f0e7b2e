"""The broker's schema migrations (broker/migrations, applied by
kms_server.storage.schema's functions): they build exactly the tables
broker/db.py declares, on SQLite and PostgreSQL; `vtpm-broker db upgrade`
applies them; a database at no or an unknown revision is refused in check
mode with one line; the broker's revision lives in its own version table."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from broker import schema
from broker.db import Database, metadata
from kms_server.storage import schema as kms_schema


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    return request.getfixturevalue("postgres_url")


def cli(tmp_path, db_url, *args):
    config = tmp_path / "broker.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [broker]
            provider_name = "kms-test"
            data_dir = "{tmp_path / "data"}"

            [storage]
            db_url = "{db_url}"
            """
        )
    )
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_migrations_build_the_declared_schema(db_url):
    """compare_metadata finds no difference between what the migrations
    build and broker.db.metadata: a table changed in db.py without a
    migration fails here."""
    db = Database(db_url)
    try:
        before, after = schema.upgrade(db)
        assert (before, after) == (None, schema.head_revision())
        with db.engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"version_table": "broker_alembic_version"})
            diff = compare_metadata(context, metadata)
            tables = set(inspect(conn).get_table_names())
        assert diff == []
        assert tables == set(metadata.tables) | {"broker_alembic_version"}
        # The KMS's version table is not touched: both may share one database.
        assert "alembic_version" not in tables
        assert schema.upgrade(db) == (after, after)
        schema.check(db)
    finally:
        db.close()


def test_check_refuses_an_empty_database_in_one_line(db_url):
    db = Database(db_url)
    try:
        with pytest.raises(schema.SchemaError) as failure:
            schema.check(db)
    finally:
        db.close()
    message = str(failure.value)
    assert "no vtpm-broker schema" in message and "vtpm-broker --config <file> db upgrade" in message
    assert "\n" not in message


def test_db_upgrade_and_status_commands(db_url, tmp_path):
    status = cli(tmp_path, db_url, "db", "status")
    assert status.returncode == 1 and "none (empty database)" in status.stdout
    first = cli(tmp_path, db_url, "db", "upgrade")
    assert first.returncode == 0, first.stderr
    assert f"upgraded from empty to {schema.head_revision()}" in first.stdout
    again = cli(tmp_path, db_url, "db", "upgrade")
    assert again.returncode == 0 and "already at revision" in again.stdout
    status = cli(tmp_path, db_url, "db", "status")
    assert status.returncode == 0 and f"this release needs: {schema.head_revision()}" in status.stdout


def test_unknown_newer_revision_is_refused(db_url, tmp_path):
    db = Database(db_url)
    try:
        schema.upgrade(db)
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE broker_alembic_version SET version_num = 'f00dfeed'"))
        with pytest.raises(schema.SchemaError) as failure:
            schema.check(db)
        assert "does not know" in str(failure.value) and "newer vtpm-broker" in str(failure.value)
    finally:
        db.close()
    status = cli(tmp_path, db_url, "db", "status")
    assert status.returncode == 1 and "newer than this release" in status.stdout


def test_a_database_made_before_migrations_is_adopted(tmp_path):
    """A broker database from before migrations (create_all, no revision)
    is stamped at the baseline and upgraded; its rows are kept."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = Database(url)
    try:
        db.create_all()
        with db.begin() as conn:
            db.set_meta(conn, "marker", b"kept")
        assert schema.current_revision(db) is None
        assert schema.upgrade(db) == (None, schema.head_revision())
        schema.check(db)
        with db.read() as conn:
            assert db.get_meta(conn, "marker") == b"kept"
    finally:
        db.close()


def test_the_kms_keeps_refusing_an_unversioned_database(tmp_path):
    """The parameterized module still refuses, for the KMS, a database with
    its tables but no revision (no baseline there)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'kms.db'}")
    try:
        from kms_server.storage.sql import metadata as kms_metadata

        kms_metadata.create_all(engine)
        with pytest.raises(kms_schema.SchemaError, match="kms-server tables but no schema revision"):
            kms_schema.upgrade(engine)
    finally:
        engine.dispose()


def test_admin_commands_refuse_an_unmigrated_postgresql(tmp_path, postgres_url):
    """On PostgreSQL the broker's commands only check (the running broker
    too: tests/integration/test_broker_postgresql.py): an empty database is
    refused with one line naming the command that fixes it."""
    early = cli(tmp_path, postgres_url, "admin", "list")
    assert early.returncode == 2
    # No master key yet: the admin command says so before touching the database.
    assert early.stderr.count("\n") == 1 and "vtpm-broker init" in early.stderr
    key = tmp_path / "data" / "master.key"
    key.parent.mkdir(mode=0o700)
    key.write_text("ab" * 32)
    key.chmod(0o600)
    listing = cli(tmp_path, postgres_url, "admin", "list")
    assert listing.returncode == 2 and listing.stderr.count("\n") == 1
    assert "no vtpm-broker schema" in listing.stderr and "db upgrade" in listing.stderr
    assert "Traceback" not in listing.stderr


def test_the_broker_replaces_a_connection_that_died_a_moment_ago(postgres_url):
    """The broker's gateway runs no request again, so its pool pings every
    connection it hands out (kms-server's ping only after idling, and run
    the item again): a connection whose server process was killed a moment
    ago is replaced before use, without an error."""
    db = Database(postgres_url, pool_size=1)
    try:
        with db.engine.connect() as conn:
            pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
        killer = create_engine(postgres_url)
        with killer.connect() as conn:
            conn.exec_driver_sql(f"SELECT pg_terminate_backend({int(pid)})")
        killer.dispose()
        with db.engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() != pid
    finally:
        db.close()
