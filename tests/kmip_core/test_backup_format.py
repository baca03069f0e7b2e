"""kmip_core.backup_format on its own (docs/backup-format.md): a product of
its own (signature, tables, a section that is no table) writes and reads
backups with nothing of kms_server or broker, on SQLite and on the
PostgreSQL on 127.0.0.1:5432 (skipped only when it is unreachable). The
KMS's and the broker's backups are tested through their commands in
tests/kms_server/admin/test_backup*.py and tests/broker/test_backup.py."""

from __future__ import annotations

import hashlib
import secrets
import stat
import struct
import subprocess
import sys

import pytest
from sqlalchemy import Column, Float, Integer, LargeBinary, MetaData, Table, Text, create_engine, insert, select
from sqlalchemy.pool import NullPool

from kmip_core import backup_format
from kmip_core.backup_format import (
    BackupError,
    BackupKind,
    Section,
    describe_rows,
    open_sealed,
    require_empty,
    set_high_water,
    table_section,
    write_sealed,
)
from kmip_core.sealing.master_key import AesMasterKey

metadata = MetaData()
THINGS = Table(
    "things",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("name", Text),
    Column("blob", LargeBinary),
    Column("score", Float),
    sqlite_autoincrement=True,
)
# Records that are no table in the database (the broker keeps files so).
NOTES = Table("notes", metadata, Column("key", Text, primary_key=True), Column("data", LargeBinary, nullable=False))
KIND = BackupKind(b"\x89TESTBK\n", "test-product", "test-tool", metadata)
OTHER = BackupKind(b"\x89OTHRBK\n", "other-product", "other-tool", metadata)
PREFIX = struct.Struct(">8sHI")


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request, tmp_path):
    """A factory of empty databases of the parameter's kind."""
    if request.param == "sqlite":
        return lambda label: f"sqlite:///{tmp_path / label}.db"
    from conftest import drop_postgres_database, new_postgres_database

    names = []

    def new(label):
        name, url = new_postgres_database(f"core_backup_{label}")
        names.append(name)
        return url

    request.addfinalizer(lambda: [drop_postgres_database(n) for n in names])
    return new


def engine(url):
    return create_engine(url, poolclass=NullPool)


def source_rows(url, count=30, deleted=3):
    """`count` rows in things, the last `deleted` of them deleted again:
    the high-water mark is above the largest id left."""
    eng = engine(url)
    try:
        metadata.create_all(eng, tables=[THINGS])
        with eng.begin() as conn:
            for i in range(count):
                conn.execute(
                    insert(THINGS),
                    {
                        "name": None if i % 7 == 0 else f"n\u00e9-{i}-secret-name",
                        "blob": secrets.token_bytes(i % 5),
                        "score": None if i % 3 else i / 3,
                    },
                )
            conn.execute(THINGS.delete().where(THINGS.c.id > count - deleted))
        with eng.connect() as conn:
            return [tuple(r) for r in conn.execute(select(THINGS).order_by(THINGS.c.id))]
    finally:
        eng.dispose()


def write(url, out, master, progress=None):
    notes = [("a", b"\x00\x01\x02"), ("b", b"")]
    eng = engine(url)
    try:
        with eng.connect() as conn, conn.begin():
            sections = [table_section(conn, THINGS), Section(NOTES, len(notes), [notes])]
            fields = {"schema_revision": "t1", "node": "n1", "master_key": {"source": "file", "key_id": master.key_id}}
            return write_sealed(out, KIND, master, fields, sections, progress)
    finally:
        eng.dispose()


def test_round_trip_with_a_product_of_its_own(tmp_path, new_url, monkeypatch):
    """Rows come back value for value (NULL, text, bytes, float), the
    section that is no table comes back as written, the autoincrement key
    continues above the high-water mark, and the file holds no value in the
    clear."""
    monkeypatch.setattr(backup_format, "CHUNK_SIZE", 64)
    monkeypatch.setattr(backup_format, "BATCH_ROWS", 4)
    source, target = new_url("source"), new_url("target")
    rows = source_rows(source)
    master = AesMasterKey(secrets.token_bytes(32), "test key")
    out = tmp_path / "b.bak"
    calls = []
    size, chunks = write(source, out, master, lambda done, total: calls.append((done, total)))

    content = out.read_bytes()
    assert size == len(content) and chunks > 5
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert content.startswith(KIND.magic)
    assert b"secret-name" not in content and "secret-name".encode("utf-16-le") not in content
    total = len(rows) + 2
    assert calls[0] == (0, total) and calls[-1] == (total, total)

    eng = engine(target)
    try:
        metadata.create_all(eng, tables=[THINGS])
        notes = []
        with open_sealed(out, KIND, master) as sealed:
            assert sealed.version == backup_format.FORMAT_VERSION == 2
            assert sealed.tables == [("things", len(rows)), ("notes", 2)]
            assert sealed.fields["schema_revision"] == "t1" and sealed.fields["node"] == "n1"
            with eng.begin() as conn:
                require_empty(conn, "target", [THINGS], revision=None, known_revisions=(), product="test-tool")
                for table, info, batch in sealed.sections():
                    assert len(batch) <= 4
                    if table.name == NOTES.name:
                        notes.extend(batch)
                        continue
                    if batch:
                        conn.execute(insert(table), batch)
                    if info["autoincrement"]:
                        high_water = info["autoincrement"]
                set_high_water(conn, THINGS, high_water)
        assert high_water == {"column": "id", "high_water": 30}
        assert notes == [{"key": "a", "data": b"\x00\x01\x02"}, {"key": "b", "data": b""}]
        with eng.begin() as conn:
            assert [tuple(r) for r in conn.execute(select(THINGS).order_by(THINGS.c.id))] == rows
            new_id = conn.execute(insert(THINGS).values(name="new")).inserted_primary_key[0]
            assert new_id == 31  # not 28: the deleted rows' numbers are never handed out again
        with eng.connect() as conn, pytest.raises(BackupError, match=r"is not empty \(things holds 28 rows\)"):
            require_empty(conn, "target", [THINGS], revision=None, known_revisions=(), product="test-tool")
    finally:
        eng.dispose()


@pytest.fixture
def made(tmp_path):
    """A backup of a small SQLite source and the key it was made under."""
    url = f"sqlite:///{tmp_path / 'source.db'}"
    source_rows(url, count=300, deleted=0)
    master = AesMasterKey(secrets.token_bytes(32), "test key")
    out = tmp_path / "b.bak"
    write(url, out, master)
    return out, master


def refused(path, kind, master) -> str:
    """Opening and reading `path` fails with one line."""
    with pytest.raises(BackupError) as caught, open_sealed(path, kind, master) as sealed:
        for _ in sealed.sections():
            pass
    message = str(caught.value)
    assert message and "\n" not in message
    return message


def test_another_products_backup_is_refused(made):
    out, master = made
    message = refused(out, OTHER, master)
    assert (
        message == f"{out} is not a other-product backup (no backup signature); give a file made by 'other-tool backup'"
    )


def test_another_master_key_is_named(made):
    out, master = made
    other = AesMasterKey(secrets.token_bytes(32), "other key")
    assert refused(out, KIND, other).startswith(
        f"the backup was made under another master key; configure a key file, id {master.key_id} ("
    )


def test_the_wrapped_key_is_bound_to_the_signature(made, tmp_path):
    """The same file under another product's signature (header digest
    recomputed): the backup key does not unwrap, since the signature is in
    its context."""
    out, master = made
    content = out.read_bytes()
    _magic, version, length = PREFIX.unpack(content[: PREFIX.size])
    prefix = PREFIX.pack(OTHER.magic, version, length) + content[PREFIX.size : PREFIX.size + length]
    forged = tmp_path / "forged.bak"
    forged.write_bytes(prefix + hashlib.sha256(prefix).digest() + content[len(prefix) + 32 :])
    assert refused(forged, OTHER, master).startswith("the backup was made under another master key;")


def test_an_altered_chunk_is_found_when_read(made, tmp_path):
    """The header still opens; the sections stop at the altered chunk."""
    out, master = made
    content = bytearray(out.read_bytes())
    content[-5] ^= 0x01
    bad = tmp_path / "bad.bak"
    bad.write_bytes(bytes(content))
    message = refused(bad, KIND, master)
    assert message.startswith("the backup is corrupt or was altered (chunk ")
    assert "does not authenticate: altered, reordered or missing" in message


def test_a_cut_file_is_truncated(made, tmp_path):
    out, master = made
    cut = tmp_path / "cut.bak"
    cut.write_bytes(out.read_bytes()[:-100])
    assert "truncated" in refused(cut, KIND, master)


def test_describe_rows():
    rows = {"zeta": 1, "things": 2, "notes": 1, "alpha": 0}
    assert describe_rows(rows, {"notes": ("note", "notes"), "things": ("thing", "things")}) == (
        "1 note, 2 things, 0 alpha rows, 1 zeta row"
    )
    assert describe_rows(rows) == "0 alpha rows, 1 notes row, 2 things rows, 1 zeta row"


def test_the_format_imports_neither_service():
    code = (
        "import sys, kmip_core.backup_format; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'kms_server', 'broker'}))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "[]"
