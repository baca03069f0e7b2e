"""Backends for the storage contract suite.

Every test that takes `storage` (or `db_url`) runs once per backend: the
in-memory fake, SQLite in a file under tmp_path, and PostgreSQL in a fresh
database on 127.0.0.1:5432 that is dropped afterwards. PostgreSQL is skipped
only when the server is unreachable or psycopg is not installed.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator

import pytest

from kms_server.storage import Storage, open_storage

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DB = "test"

BACKENDS = ["memory", "sqlite", "postgresql"]


def _postgres_admin_connection():
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed: .venv/bin/pip install 'psycopg[binary]'")
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=2).close()
    except OSError as exc:
        pytest.skip(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}: {exc}")
    # Reachable but refusing us (bad role, no such database) is a failure,
    # not a reason to skip.
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB, autocommit=True
    )


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A URL for a new, empty PostgreSQL database that is dropped afterwards."""
    name = f"kms_test_{uuid.uuid4().hex}"
    with _postgres_admin_connection() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _postgres_admin_connection() as admin:
            # FORCE: a failed test may have left a connection open.
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def db_url(backend: str, request: pytest.FixtureRequest, tmp_path) -> str:
    if backend == "memory":
        return "memory://"
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'kms.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def storage(db_url: str) -> Iterator[Storage]:
    opened = open_storage(db_url)
    try:
        yield opened
    finally:
        opened.close()
