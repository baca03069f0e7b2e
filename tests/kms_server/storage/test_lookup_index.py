"""Locate's lookup index is partial (migration 0007, issue 15): it holds
the attributes Locate is asked by, not those nearly every object carries
(`sql.NOT_LOOKED_UP`). Locate answers the same on both sides of that line,
on SQLite and on PostgreSQL, as the in-memory fake does (which has no
index at all); a condition on a looked-up name goes through the index; the
migration goes both ways."""

from __future__ import annotations

import importlib.util
import itertools
import re
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from kmip_core.db import migrations
from kms_server.storage import LocateQuery, StoredAttribute, StoredObject, open_storage, schema, sql
from kms_server.storage.memory import MemoryStorage

MIGRATION = Path(sql.__file__).with_name("migrations") / "versions" / "0007_partial_lookup_index.py"

# Looked up and not, as an AES key carries them, and custom ones.
LOOKED_UP = ("Name", "Object Type", "State", "Cryptographic Algorithm", "x-Identifier")
NOT_LOOKED_UP = ("Fresh", "Digest", "Initial Date", "Unique Identifier", "Cryptographic Usage Mask")


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kms.db'}"
    return request.getfixturevalue("postgres_url")


def _objects() -> list[StoredObject]:
    """Twelve objects whose attributes overlap in every combination the
    queries below ask: each name has two values, and some objects lack
    some names."""
    objects = []
    for i in range(12):
        attributes = []
        for j, name in enumerate(LOOKED_UP + NOT_LOOKED_UP):
            if (i + j) % 5 == 4:
                continue  # this object lacks this attribute
            attributes.append(StoredAttribute(name, 0, f"{name}={(i >> (j % 3)) & 1}".encode()))
        objects.append(
            StoredObject(uid=f"key-{i:02d}", owner="alice" if i % 3 else "bob", sealed_material=b"s", attributes=attributes)
        )
    return objects


def _store(storage) -> None:
    with storage.transaction() as tx:
        for obj in _objects():
            tx.insert_object(obj)


def _queries() -> list[LocateQuery]:
    value = {name: f"{name}=1".encode() for name in LOOKED_UP + NOT_LOOKED_UP}
    queries = []
    names = LOOKED_UP[:2] + NOT_LOOKED_UP[:3]
    for first, second in itertools.permutations(names, 2):
        queries.append(LocateQuery(equals=((first, value[first]), (second, value[second]))))
        queries.append(LocateQuery(equals=((first, value[first]),), has=(second,)))
        queries.append(LocateQuery(has=(first, second)))
    for name in LOOKED_UP + NOT_LOOKED_UP:
        queries.append(LocateQuery(equals=((name, value[name]),)))
        queries.append(LocateQuery(has=(name,)))
        queries.append(LocateQuery(equals=((name, value[name]),), owner="alice", offset=1, limit=2))
    # A uid (a Locate by Unique Identifier): alone, with either kind of
    # condition, with an owner, and one no object has.
    for uid in ("key-04", "key-07", "key-99"):
        queries.append(LocateQuery(uid=uid))
        queries.append(LocateQuery(uid=uid, equals=(("Name", value["Name"]),)))
        queries.append(LocateQuery(uid=uid, equals=(("Fresh", value["Fresh"]),), has=("Digest",)))
        queries.append(LocateQuery(uid=uid, owner="alice"))
        queries.append(LocateQuery(uid=uid, has=("Object Type",), offset=1))
    # Exclusions (a Locate leaving out the destroyed): after a looked-up
    # lead, after left-out conditions only, with a uid, two of them, one of
    # a left-out name, one that leaves out every candidate.
    other = {name: f"{name}=0".encode() for name in LOOKED_UP + NOT_LOOKED_UP}
    queries += [
        LocateQuery(equals=(("Name", value["Name"]),), excluded=(("State", value["State"]),)),
        LocateQuery(equals=(("Name", value["Name"]),), excluded=(("State", value["State"]), ("State", other["State"]))),
        LocateQuery(has=("Object Type",), excluded=(("Fresh", value["Fresh"]),)),
        LocateQuery(equals=(("Fresh", value["Fresh"]),), excluded=(("Name", other["Name"]),)),
        LocateQuery(uid="key-04", excluded=(("State", other["State"]),)),
        LocateQuery(uid="key-04", excluded=(("Digest", value["Digest"]),)),
        LocateQuery(equals=(("Name", value["Name"]),), excluded=(("Name", value["Name"]),)),
        LocateQuery(equals=(("Name", value["Name"]),), owner="alice", excluded=(("State", value["State"]),), offset=1, limit=2),
    ]
    return queries


def test_locate_answers_as_the_fake_on_both_sides_of_the_index(db_url):
    """Every query, led by a looked-up condition or made of others only,
    finds exactly the objects the in-memory fake finds, in the same order
    (paging and owner included)."""
    storage, fake = open_storage(db_url), MemoryStorage()
    try:
        _store(storage)
        _store(fake)
        for query in _queries():
            with fake.transaction(read_only=True) as tx:
                expected = tx.locate(query)
            with storage.transaction(read_only=True) as tx:
                assert tx.locate(query) == expected, query
        # The queries find something: the comparison is not of empty lists.
        with fake.transaction(read_only=True) as tx:
            assert all(tx.locate(LocateQuery(has=(name,))) for name in LOOKED_UP + NOT_LOOKED_UP)
            assert tx.locate(LocateQuery(uid="key-04")) == ["key-04"]
    finally:
        storage.close()


def _plan(engine, query: LocateQuery) -> str:
    stmt, params = sql.locate_statement(query, engine.dialect.name)
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            raw = conn.connection.driver_connection
            rows = raw.execute("EXPLAIN QUERY PLAN " + stmt.sql, [params[n] for n in stmt.names]).fetchall()
            return " ".join(row[3] for row in rows)
        # An empty table: the planner would scan it; told not to, it shows
        # which indexes it may use. A generic plan, as for a statement
        # psycopg has prepared (the fifth run on): the names are then
        # unknown to the planner, which uses the partial index only if the
        # statement states its condition.
        conn.exec_driver_sql("SET enable_seqscan = off")
        conn.exec_driver_sql("SET plan_cache_mode = force_generic_plan")
        order = re.findall(r"%\((\w+)\)s", stmt.pg_sql)
        names = list(dict.fromkeys(order))
        prepared = re.sub(r"%\((\w+)\)s", lambda m: f"${names.index(m.group(1)) + 1}", stmt.pg_sql)
        types = ["bytea" if name.endswith(("_digest", "_value")) else "text" for name in names]
        conn.exec_driver_sql(f"PREPARE locate ({', '.join(types)}) AS " + prepared)
        # EXPLAIN EXECUTE takes no parameters: the values as literals.
        arguments = ", ".join(
            f"'\\x{params[name].hex()}'::bytea" if kind == "bytea" else "'" + params[name].replace("'", "''") + "'"
            for name, kind in zip(names, types, strict=True)
        )
        rows = conn.exec_driver_sql(f"EXPLAIN EXECUTE locate({arguments})").all()
        return " ".join(row[0] for row in rows)


@pytest.mark.parametrize("lead", ["equals", "has"])
@pytest.mark.parametrize("name", LOOKED_UP)
def test_a_looked_up_condition_goes_through_the_partial_index(db_url, name, lead):
    """Led by a looked-up name, even after a condition that is not, the
    statement states the index's condition, so the database uses it."""
    open_storage(db_url).close()
    engine = create_engine(db_url)
    try:
        if lead == "equals":
            query = LocateQuery(equals=(("Fresh", b"x"), (name, b"v")))
        else:
            query = LocateQuery(has=("Initial Date", name))
        plan = _plan(engine, query)
    finally:
        engine.dispose()
    assert "ix_kms_attributes_lookup" in plan, plan


def test_conditions_that_are_not_looked_up_check_each_object(db_url):
    """A Locate by attributes outside the index reads the objects and
    checks each on the (uid, name, value_digest) index: never the lookup
    index, whose condition would leave their rows out."""
    open_storage(db_url).close()
    engine = create_engine(db_url)
    try:
        plan = _plan(engine, LocateQuery(equals=(("Fresh", b"x"),), has=("Digest",)))
    finally:
        engine.dispose()
    assert "ix_kms_attributes_lookup" not in plan, plan
    assert "ix_kms_attributes_uid_name_value_digest" in plan, plan


@pytest.mark.parametrize(
    "query",
    [
        LocateQuery(uid="key-04", equals=(("Unique Identifier", b"key-04"),)),
        LocateQuery(uid="key-04", equals=(("Unique Identifier", b"key-04"), ("Fresh", b"x")), has=("Digest",)),
        LocateQuery(uid="key-04", equals=(("Name", b"n"), ("Unique Identifier", b"key-04")), owner="alice"),
    ],
    ids=["alone", "with-others-left-out", "with-a-looked-up-one"],
)
def test_a_uid_is_read_by_its_row(db_url, query):
    """A Locate by Unique Identifier, which the lookup index leaves out,
    reads the one object's row by its uid's index and checks every
    condition on it: no read of every object, and no list of every object
    another condition matches, whatever else it asks."""
    open_storage(db_url).close()
    engine = create_engine(db_url)
    try:
        plan = _plan(engine, query)
    finally:
        engine.dispose()
    if engine.dialect.name == "sqlite":
        assert re.search(r"SEARCH (kms_objects|o) USING (COVERING )?INDEX sqlite_autoindex_kms_objects_1 \(uid=\?\)", plan), plan
        assert not re.search(r"SCAN (kms_objects|o)\b", plan), plan
        assert "ix_kms_attributes_lookup" not in plan, plan
    else:
        assert re.search(r"Index (Only )?Scan using kms_objects_uid_key on kms_objects\b.*?Index Cond: \(uid = \$\d+\)", plan), plan
        assert "Seq Scan on kms_objects" not in plan, plan
        assert "ix_kms_attributes_lookup" not in plan, plan


def test_exclusions_are_checked_on_each_candidate(db_url):
    """A Locate that leaves out destroyed keys is one statement: the
    leading condition through the lookup index, each exclusion a probe of
    (uid, name, value_digest) per candidate, never a read of every
    object."""
    open_storage(db_url).close()
    engine = create_engine(db_url)
    try:
        plan = _plan(
            engine,
            LocateQuery(equals=(("x-Identifier", b"vm"),), excluded=(("State", b"d"), ("State", b"c"))),
        )
    finally:
        engine.dispose()
    assert "ix_kms_attributes_lookup" in plan, plan
    assert plan.count("ix_kms_attributes_uid_name_value_digest") >= 2, plan
    if engine.dialect.name == "sqlite":
        assert not re.search(r"SCAN (kms_objects|o)\b", plan), plan
    else:
        assert "Seq Scan on kms_objects" not in plan, plan


def test_the_index_and_the_statements_state_one_condition():
    """The migration's copy of the index's condition is the one Locate's
    statements state (sql.py): if they parted, the databases would stop
    using the index, or Locate would miss the rows it leaves out."""
    spec = importlib.util.spec_from_file_location("migration_0007", MIGRATION)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module._WHERE == sql._lookup_where("name")
    assert set(module._NOT_LOOKED_UP) == sql.NOT_LOOKED_UP
    assert all(not sql.looked_up(name) for name in NOT_LOOKED_UP)
    assert all(sql.looked_up(name) for name in LOOKED_UP)


def _attribute_indexes(engine) -> dict[str, bool]:
    """The indexes of kms_attributes on (name, value_digest), and whether
    each is partial."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            rows = conn.execute(
                text("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = 'kms_attributes'")
            ).all()
        else:
            rows = conn.execute(
                text("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'kms_attributes'")
            ).all()
    return {name: "WHERE" in (definition or "") for name, definition in rows if "uid" not in name and "pkey" not in name}


def test_the_migration_goes_both_ways_and_locate_answers_at_each(db_url):
    """0007 replaces the full index by the partial one and back; the
    objects stored before are found by Locate at each revision."""
    storage = open_storage(db_url)
    try:
        _store(storage)
    finally:
        storage.close()
    query = LocateQuery(equals=(("Name", b"Name=1"),))
    fake = MemoryStorage()
    _store(fake)
    with fake.transaction(read_only=True) as tx:
        expected = tx.locate(query)
    assert expected

    engine = create_engine(db_url)
    try:
        assert _attribute_indexes(engine) == {"ix_kms_attributes_lookup": True}
        migrations.migrate(engine, schema.KMS, "0006", down=True)
        assert _attribute_indexes(engine) == {"ix_kms_attributes_name_value_digest": False}
        with engine.connect() as conn:
            # At 0006 the statement of 0005's era (the full index) answers.
            found = conn.execute(
                text(
                    "SELECT o.uid FROM kms_objects o JOIN kms_attributes a ON a.uid = o.uid "
                    "WHERE a.name = 'Name' AND a.value = :v ORDER BY o.sequence"
                ),
                {"v": b"Name=1"},
            ).scalars().all()
        assert found == expected
        migrations.migrate(engine, schema.KMS, "head")
        assert _attribute_indexes(engine) == {"ix_kms_attributes_lookup": True}
    finally:
        engine.dispose()
    storage = open_storage(db_url, schema="check")
    try:
        with storage.transaction(read_only=True) as tx:
            assert tx.locate(query) == expected
    finally:
        storage.close()


def _prepared_plans(url: str, stmt, params: dict, runs: int = 12) -> tuple[int, int]:
    """(generic, custom) plans PostgreSQL made for `stmt` run `runs` times
    on one new session, as the storage runs it (psycopg prepares it from
    its fifth run)."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database) as conn:
        for _ in range(runs):
            conn.execute(stmt.pg_sql, params).fetchall()
        ((generic, custom),) = conn.execute("SELECT generic_plans, custom_plans FROM pg_prepared_statements").fetchall()
    return generic, custom


def test_postgresql_keeps_the_generic_plan_of_a_prepared_locate(postgres_url):
    """Migration 0008: on a store whose attribute values are mostly shared
    (as a real one: State, algorithm, usage mask...), ANALYZE estimates few
    distinct digests, and PostgreSQL judged a prepared Locate's generic plan
    dearer than its custom ones and planned it at every run. Told the
    digests are mostly distinct, it keeps the generic plan; without that,
    on the same rows, it does not (the test shows the difference)."""
    import hashlib

    import psycopg
    from sqlalchemy.engine import make_url

    open_storage(postgres_url).close()
    u = make_url(postgres_url)
    objects = 40_000  # 720,000 attribute rows: more than ANALYZE samples
    names = ["Name", "Digest", "Unique Identifier", "x-Identifier"] + [f"shared-{j}" for j in range(14)]
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, autocommit=True) as conn:
        ((options,),) = conn.execute(
            "SELECT attoptions FROM pg_attribute WHERE attrelid = 'kms_attributes'::regclass AND attname = 'value_digest'"
        ).fetchall()
        assert "n_distinct=-0.2" in options, options
        with conn.cursor() as cur:
            with cur.copy("COPY kms_objects (uid, owner, version, sealed_material, created_at, row_mac) FROM STDIN") as copy:
                for i in range(objects):
                    copy.write_row((f"key-{i:07d}", "o", 1, b"s", 0.0, b"m"))
            with cur.copy("COPY kms_attributes (uid, name, idx, value, value_digest) FROM STDIN") as copy:
                for i in range(objects):
                    for j, name in enumerate(names):
                        value = (f"{name}-{i}" if j < 4 else f"{name}-{i % 3}").encode()
                        copy.write_row((f"key-{i:07d}", name, 0, value, hashlib.sha256(value).digest()))
        conn.execute("ANALYZE kms_attributes")
        query = LocateQuery(equals=(("x-Identifier", b"x-Identifier-5"),), excluded=(("State", b"d"), ("State", b"c")))
        stmt, params = sql.locate_statement(query, "postgresql")
        generic, _ = _prepared_plans(postgres_url, stmt, params)
        assert generic > 0, "a prepared Locate is planned at every run"
        # The same rows without the migration's setting.
        conn.execute("ALTER TABLE kms_attributes ALTER COLUMN value_digest RESET (n_distinct)")
        conn.execute("ANALYZE kms_attributes")
        assert _prepared_plans(postgres_url, stmt, params)[0] == 0
