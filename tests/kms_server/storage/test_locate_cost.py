"""Locate's cost grows with the matches, not with their square (issue 19).

No timing: the SQL that `Transaction.locate` sends is captured and its work
is counted by the database itself, at N and at 2N matching objects. SQLite
counts virtual-machine steps (a progress handler); PostgreSQL counts the rows
every plan node produced over all its loops (EXPLAIN ANALYZE). A linear plan
doubles; the correlated EXISTS of old walked every row of the value again
for each candidate, and quadrupled.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from kms_server.storage import LocateQuery, StoredAttribute, StoredObject, open_storage, sql

AES = b"\x42\x00\x0b\x05\x00\x00\x00\x04\x00\x00\x00\x03\x00\x00\x00\x00"
N = 150


@pytest.fixture(params=["sqlite", "postgresql"])
def sql_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kms.db'}"
    return request.getfixturevalue("postgres_url")


def _add_keys(storage, start: int, count: int) -> None:
    with storage.transaction() as tx:
        for i in range(start, start + count):
            tx.insert_object(
                StoredObject(
                    uid=f"key-{i:05d}",
                    owner="alice",
                    sealed_material=b"sealed",
                    attributes=[
                        StoredAttribute("Cryptographic Algorithm", 0, AES),
                        StoredAttribute("Object Type", 0, b"symmetric"),
                        StoredAttribute("Name", 0, f"name-{i}".encode()),
                    ],
                )
            )


def _captured_locate(storage, query: LocateQuery) -> tuple[list[str], str, object]:
    """Locate's answer, and the SQL statement and parameters it sent."""
    sent = []

    def raw_capture(conn, statement, parameters=()):
        sent.append((statement, parameters))
        return raw_execute(conn, statement, parameters)

    def pg_capture(conn, statement, parameters=None, many=None):
        sent.append((statement, parameters))
        return pg_execute(conn, statement, parameters, many)

    # The statement runs on the driver's connection itself (sqlite3,
    # psycopg), past SQLAlchemy's events: captured where it is sent.
    raw_execute, pg_execute = sql.sqlite_execute, sql.pg_execute
    sql.sqlite_execute, sql.pg_execute = raw_capture, pg_capture
    try:
        with storage.transaction(read_only=True) as tx:
            found = tx.locate(query)
    finally:
        sql.sqlite_execute, sql.pg_execute = raw_execute, pg_execute
    statements = [(s, p) for s, p in sent if s.lstrip().upper().startswith("SELECT") and "kms_objects" in s]
    assert len(statements) == 1, sent
    return found, *statements[0]


def _work(storage, statement: str, parameters) -> int:
    """What running the statement cost the database, in its own units."""
    url = storage.engine.url
    if url.get_backend_name() == "sqlite":
        steps = 0

        def count() -> int:
            nonlocal steps
            steps += 1
            return 0

        raw = sqlite3.connect(url.database)
        try:
            raw.set_progress_handler(count, 10)
            raw.execute(statement, parameters).fetchall()
        finally:
            raw.close()
        return steps
    with storage.engine.connect() as conn:
        plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).scalar()
    if isinstance(plan, str):
        plan = json.loads(plan)

    def rows(node) -> int:
        own = node.get("Actual Rows", 0) * node.get("Actual Loops", 1)
        return own + sum(rows(child) for child in node.get("Plans", []))

    return rows(plan[0]["Plan"])


@pytest.mark.parametrize(
    "query",
    [
        LocateQuery(equals=(("Cryptographic Algorithm", AES),)),
        LocateQuery(equals=(("Cryptographic Algorithm", AES), ("Object Type", b"symmetric")), owner="alice"),
        LocateQuery(has=("Name",)),
    ],
    ids=["one-value", "two-values-and-owner", "has-name"],
)
def test_locate_work_grows_linearly_with_matches(sql_url, query):
    """Doubling the matching objects at most about doubles the work of a
    Locate (2x linear, 4x quadratic; 3x is the line)."""
    storage = open_storage(sql_url)
    try:
        _add_keys(storage, 0, N)
        found, statement, parameters = _captured_locate(storage, query)
        assert len(found) == N
        small = _work(storage, statement, parameters)
        _add_keys(storage, N, N)
        found, statement, parameters = _captured_locate(storage, query)
        assert len(found) == 2 * N
        large = _work(storage, statement, parameters)
    finally:
        storage.close()
    assert large < 3 * small, f"Locate work went from {small} to {large} for twice the matches"


@pytest.mark.parametrize(
    "query",
    [
        # Locate by Name with the State every object has: how kms-server
        # asks whether a located object is Destroyed (operations/locate.py).
        LocateQuery(equals=(("Name", b"name-7"), ("Cryptographic Algorithm", AES))),
        LocateQuery(equals=(("Name", b"name-7"),), has=("Object Type",)),
    ],
    ids=["value-then-common-value", "value-then-common-name"],
)
def test_locate_work_follows_the_first_condition_not_the_broadest(sql_url, query):
    """A Locate whose first condition matches one object costs the same
    whatever the other conditions match: those are checked on that object,
    not looked up in full and intersected (issue 15: the destroyed-state
    check of every Locate walked every destroyed key)."""
    storage = open_storage(sql_url)
    try:
        _add_keys(storage, 0, N)
        found, statement, parameters = _captured_locate(storage, query)
        assert found == ["key-00007"]
        small = _work(storage, statement, parameters)
        _add_keys(storage, N, 3 * N)
        found, statement, parameters = _captured_locate(storage, query)
        assert found == ["key-00007"]
        large = _work(storage, statement, parameters)
    finally:
        storage.close()
    assert large < 1.5 * small, f"Locate work went from {small} to {large} with four times the objects"
