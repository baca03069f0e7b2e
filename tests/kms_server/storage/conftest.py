"""Backends for the storage contract suite.

Every test that takes `storage` (or `db_url`) runs once per backend: the
in-memory fake, SQLite in a file under tmp_path, and PostgreSQL in a fresh
database on 127.0.0.1:5432 that is dropped afterwards. PostgreSQL is skipped
only when the server is unreachable or psycopg is not installed
(`postgres_url` in tests/conftest.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from kms_server.storage import Storage, open_storage
from kms_server.storage.sql import SqlStorage

BACKENDS = ["memory", "sqlite", "postgresql"]


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


@pytest.fixture
def sqlite_storage(tmp_path) -> Iterator[SqlStorage]:
    """A SQLite storage in tmp_path, with its writers' group commit
    (WriteBatches): for the tests of SQLite's write path alone."""
    opened = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    assert isinstance(opened, SqlStorage) and opened.writes is not None
    try:
        yield opened
    finally:
        opened.close()
