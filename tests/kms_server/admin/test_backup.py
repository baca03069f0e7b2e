"""kms-admin backup and restore (issue 4, item 5; docs/backup-format.md).

The round trips populate a real node over KMIP, back it up while it runs,
restore into an empty database and start a node on the copy; SQLite and the
PostgreSQL on 127.0.0.1:5432 (fresh databases, dropped afterwards; skipped
only when it is unreachable). The tamper tests use a small store written
through the storage layer, so that every byte of a backup can be altered.
"""

from __future__ import annotations

import io
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from conftest import drop_postgres_database, new_postgres_database, postgres_available, start_server
from kmip.core import enums
from kmip.core.enums import Operation, Tags
from kmip.pie import objects as pie_objects
from kmip.pie.client import ProxyKmipClient
from kmip_client import RawClient, pykmip
from kms_store_support import dump
from kms_store_support import engine as _engine
from sqlalchemy import inspect, make_url

from kmip_core import backup_format, ttlv
from kmip_core.sealing.barrier import BarrierError, open_barrier
from kms_server.admin import backup as backup_mod
from kms_server.admin import cli
from kms_server.admin.backup_cli import ProgressReporter, register_backup
from kms_server.config import load_config
from kms_server.storage import sql as sql_tables
from kms_server.storage.base import StoredAttribute, StoredObject
from kms_server.storage.sql import SqlStorage

T = Tags


# --- databases ------------------------------------------------------------------------


@pytest.fixture
def pg_database():
    """A factory of fresh PostgreSQL databases, all dropped afterwards."""
    if not postgres_available():  # skip before the test starts, not at its first database
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 or psycopg missing")
    names: list[str] = []

    def new(label: str = "db") -> str:
        name, url = new_postgres_database(f"kms_backup_{label}")
        names.append(name)
        return url

    yield new
    for name in names:
        drop_postgres_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def new_url(request, tmp_path):
    """new_url(name): the URL of a new, empty database of the backend."""
    if request.param == "sqlite":
        (tmp_path / "db").mkdir(exist_ok=True)
        return lambda name: f"sqlite:///{tmp_path / 'db' / name}.db"
    return request.getfixturevalue("pg_database")


def kms_tables(url: str) -> set[str]:
    """The tables of a database (nothing for a SQLite file that is not there)."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database).exists():
        return set()
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            return set(inspect(conn).get_table_names())
    finally:
        engine.dispose()


def write_config(
    workdir: Path, db_url: str, *, key_file: Path | None = None, passphrase_file: Path | None = None
) -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    master = f'file = "{key_file}"' if key_file else f'passphrase_file = "{passphrase_file}"'
    path = workdir / f"kms-{uuid.uuid4().hex[:6]}.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [server]
            node_name = "backup-test"
            data_dir = "{workdir / "data"}"

            [storage]
            db_url = "{db_url}"

            [master_key]
            """
        )
        + master
        + "\n"
    )
    return path


def secret_file(path: Path, content: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, content.encode())
    os.close(fd)
    return path


def new_key_file(path: Path) -> Path:
    return secret_file(path, secrets.token_hex(32) + "\n")


# --- a populated node -------------------------------------------------------------------


def _request(*batch_items) -> bytes:
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            ttlv.structure(
                T.PROTOCOL_VERSION.value,
                [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 1)],
            ),
            ttlv.integer(T.BATCH_COUNT.value, len(batch_items)),
        ],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, *batch_items]))


def _add_attribute(uid: str, name: str, value: str):
    return ttlv.structure(
        T.BATCH_ITEM.value,
        [
            ttlv.enumeration(T.OPERATION.value, Operation.ADD_ATTRIBUTE.value),
            ttlv.structure(
                T.REQUEST_PAYLOAD.value,
                [
                    ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
                    ttlv.structure(
                        T.ATTRIBUTE.value,
                        [ttlv.text(T.ATTRIBUTE_NAME.value, name), ttlv.text(T.ATTRIBUTE_VALUE.value, value)],
                    ),
                ],
            ),
        ],
    )


def _client(server, pki: Path) -> ProxyKmipClient:
    """PyKMIP's client as alice, at KMIP 1.2 (PyKMIP's own default)."""
    return pykmip(server, pki, version=enums.KMIPVersion.KMIP_1_2)


def populate(server, pki: Path) -> tuple[dict[str, bytes], list[bytes]]:
    """Keys of several kinds, names and x- attributes, one key activated and
    one destroyed. Returns the key bytes by uid and the attribute values
    that must not appear in a backup."""
    keys: dict[str, bytes] = {}
    clear_values: list[bytes] = []
    client = _client(server, pki)
    try:
        aes = []
        for _ in range(6):
            name = f"backup-name-{secrets.token_hex(8)}"
            clear_values.append(name.encode())
            aes.append(client.create(enums.CryptographicAlgorithm.AES, 256, name=name))
        public_uid, private_uid = client.create_key_pair(enums.CryptographicAlgorithm.RSA, 2048)
        secret_uid = client.register(pie_objects.SecretData(secrets.token_bytes(24), enums.SecretDataType.PASSWORD))
        client.activate(aes[0])
        doomed = client.create(enums.CryptographicAlgorithm.AES, 128)
        client.destroy(doomed)
        for uid in [*aes, public_uid, private_uid, secret_uid]:
            keys[uid] = client.get(uid).value
    finally:
        client.close()
    with RawClient(server.host, server.port, pki, "alice") as raw:
        for uid in aes:
            for name in ("x-Identifier", "x-BackupTest"):
                value = f"{name}-{secrets.token_hex(12)}"
                clear_values.append(value.encode())
                response = raw.request(_request(_add_attribute(uid, name, value)))
                assert response.find(T.BATCH_ITEM.value).get(T.RESULT_STATUS.value) == 0
    return keys, clear_values


class Calls:
    """A progress callback that records its calls."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, done: int, total: int) -> None:
        self.calls.append((done, total))


def test_round_trip_through_real_nodes(tmp_path, pki_dir, new_url, monkeypatch):
    """A backup of a running node restored into an empty database holds every
    object row, attribute and server value unchanged; a node started on the
    copy with the same master key serves the very same keys, and keeps
    numbering objects after the originals. The file holds no key bytes and
    no attribute value in the clear, and progress reaches the total."""
    # Small chunks and batches, so that the test crosses many boundaries.
    monkeypatch.setattr(backup_format, "CHUNK_SIZE", 700)
    monkeypatch.setattr(backup_format, "BATCH_ROWS", 7)
    source_url, target_url = new_url("source"), new_url("target")
    source = start_server(tmp_path / "source", pki_dir, db_url=source_url)
    try:
        keys, clear_values = populate(source, pki_dir)
        source_cfg = load_config(source.workdir / "kms.toml")
        out = tmp_path / "backups" / "kms.backup"
        out.parent.mkdir()
        written = Calls()
        summary = backup_mod.backup(source_cfg, out, written)
        # Before the node stops: stopping signs one more audit checkpoint.
        original = dump(source_url)
    finally:
        source.stop()

    assert summary.rows == {name: len(rows) for name, rows in original.items()}
    assert summary.rows["kms_objects"] == len(keys) + 1  # and the destroyed key
    assert summary.chunks > 5
    total = sum(summary.rows.values())
    assert written.calls[0] == (0, total) and written.calls[-1] == (total, total)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    content = out.read_bytes()
    for key in keys.values():
        assert key not in content
    for value in clear_values:
        assert value not in content
    if source_url.startswith("sqlite"):
        # The check means something: the database holds the values in the clear.
        files = Path(make_url(source_url).database).parent.glob("source.db*")
        database = b"".join(f.read_bytes() for f in files)
        assert all(value in database for value in clear_values)

    target_cfg = load_config(source.workdir / "kms.toml", {"storage": {"db_url": target_url}})
    inserted, verified = Calls(), Calls()
    restored = backup_mod.restore(target_cfg, out, inserted, verify_progress=verified)
    assert restored.rows == summary.rows
    assert inserted.calls[-1] == (total, total) and verified.calls[-1] == (total, total)
    assert dump(target_url) == original

    (tmp_path / "copy").mkdir()
    shutil.copy2(source.workdir / "master.key", tmp_path / "copy" / "master.key")
    for name in ("audit.key", "audit.pub"):
        shutil.copy2(source.workdir / name, tmp_path / "copy" / name)
    copy = start_server(tmp_path / "copy", pki_dir, db_url=target_url)
    try:
        client = _client(copy, pki_dir)
        try:
            for uid, key in keys.items():
                assert client.get(uid).value == key
            new_uid = client.create(enums.CryptographicAlgorithm.AES, 256)
        finally:
            client.close()
    finally:
        copy.stop()
    after = dump(target_url)["kms_objects"]
    new_row = next(row for row in after if row[1] == new_uid)
    assert new_row[0] > max(row[0] for row in original["kms_objects"])
    # The restored audit trail goes on where the original stopped, as one chain.
    assert len(dump(target_url)["kms_audit"]) > len(original["kms_audit"])
    verified = subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", "audit", "verify", "--config", str(copy.workdir / "kms.toml")],
        capture_output=True, text=True, timeout=120,
    )
    assert verified.returncode == 0, verified.stderr


# --- a store written through the storage layer -----------------------------------------


class Store:
    def __init__(self, workdir: Path, url: str, objects: int = 12, passphrase: bool = False):
        self.workdir = workdir
        self.url = url
        if passphrase:
            self.passphrase_file = secret_file(workdir / "passphrase", "correct horse battery staple\n")
            self.config = write_config(workdir, url, passphrase_file=self.passphrase_file)
        else:
            self.key_file = new_key_file(workdir / "master.key")
            self.config = write_config(workdir, url, key_file=self.key_file)
        self.keys: dict[str, bytes] = {}
        self.clear_values: list[bytes] = []
        storage = SqlStorage(url)
        try:
            barrier = open_barrier(
                storage,
                key_file=None if passphrase else str(self.key_file),
                passphrase_file=str(self.passphrase_file) if passphrase else None,
            )
            self.barrier = barrier
            with storage.transaction() as txn:
                for _ in range(objects):
                    self._insert(txn, barrier)
        finally:
            storage.close()

    def _insert(self, txn, barrier) -> str:
        uid = str(uuid.uuid4())
        key = secrets.token_bytes(32)
        tag = f"x-value-{secrets.token_hex(10)}".encode()
        txn.insert_object(
            StoredObject(
                uid=uid,
                owner="alice",
                sealed_material=barrier.seal(uid, key),
                attributes=[StoredAttribute("x-Identifier", 0, tag), StoredAttribute("Name", 0, b"n-" + uid.encode())],
            )
        )
        self.keys[uid] = key
        self.clear_values.append(tag)
        return uid

    def add_object(self) -> str:
        storage = SqlStorage(self.url)
        try:
            with storage.transaction() as txn:
                return self._insert(txn, self.barrier)
        finally:
            storage.close()

    def cfg(self, db_url: str | None = None, config: Path | None = None):
        overrides = {"storage": {"db_url": db_url}} if db_url else None
        return load_config(config or self.config, overrides)


@pytest.fixture
def small_backup(tmp_path, monkeypatch):
    """A SQLite store of a few objects and its backup in chunks of 200 bytes."""
    monkeypatch.setattr(backup_format, "CHUNK_SIZE", 200)
    store = Store(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}", objects=6)
    out = tmp_path / "small.backup"
    backup_mod.backup(store.cfg(), out)
    return store, out


def frames(content: bytes) -> tuple[bytes, list[bytes]]:
    """The header part of a backup file and its framed chunks."""
    _magic, _version, length = struct.unpack(">8sHI", content[:14])
    at = 14 + length + 32 + 16 + 16
    head, chunks = content[:at], []
    while at < len(content):
        size = struct.unpack(">I", content[at + 1 : at + 5])[0]
        chunks.append(content[at : at + 5 + size])
        at += 5 + size
    return head, chunks


def refused(store: Store, target_url: str, path: Path) -> str:
    """Restore must fail with a one-line message and leave the target untouched."""
    with pytest.raises(backup_mod.BackupError) as caught:
        backup_mod.restore(store.cfg(target_url), path)
    message = str(caught.value)
    assert "\n" not in message and message
    assert kms_tables(target_url) == set()
    return message


def test_restore_into_sqlite_and_postgresql(tmp_path, new_url):
    """The small store restores row for row; its barrier opens the copy, and
    the copy never hands out the number of an object deleted before the
    backup again."""
    store = Store(tmp_path / "source", new_url("source"), objects=25)
    deleted = store.add_object()
    storage = SqlStorage(store.url)
    try:
        with storage.transaction() as txn:
            deleted_sequence = txn.get_object(deleted).sequence
            txn.delete_object(deleted)
    finally:
        storage.close()
    del store.keys[deleted]
    out = tmp_path / "b.backup"
    backup_mod.backup(store.cfg(), out)
    target = new_url("target")
    backup_mod.restore(store.cfg(target), out)
    assert dump(target) == dump(store.url)
    assert max(row[0] for row in dump(target)["kms_objects"]) < deleted_sequence
    copy = SqlStorage(target, schema="check")
    try:
        barrier = open_barrier(copy, key_file=str(store.key_file))
        with copy.transaction() as txn:
            for uid, key in store.keys.items():
                assert barrier.unseal(uid, txn.get_object(uid).sealed_material) == key
            fresh = StoredObject(uid="after-restore", owner="alice", sealed_material=None)
            txn.insert_object(fresh)
        assert fresh.sequence > deleted_sequence
    finally:
        copy.close()


def test_backup_is_one_snapshot(tmp_path, new_url):
    """An object created while the backup runs is either wholly in it or not
    at all: the backup reads one snapshot, and the server is not blocked."""
    store = Store(tmp_path / "source", new_url("source"), objects=30)
    before = dump(store.url)
    added: list[str] = []

    def write_meanwhile(done: int, total: int) -> None:
        if done and not added:
            added.append(store.add_object())

    out = tmp_path / "b.backup"
    summary = backup_mod.backup(store.cfg(), out, write_meanwhile)
    assert added, "the writer ran during the backup"
    assert summary.rows == {name: len(rows) for name, rows in before.items()}
    target = new_url("target")
    backup_mod.restore(store.cfg(target), out)
    assert dump(target) == before
    assert len(dump(store.url)["kms_objects"]) == len(before["kms_objects"]) + 1


def test_every_flipped_bit_is_refused(tmp_path, small_backup):
    """Whichever byte of the file is altered, restore refuses it with one
    line and writes nothing."""
    store, out = small_backup
    content = out.read_bytes()
    target = f"sqlite:///{tmp_path / 'target.db'}"
    bad = tmp_path / "bad.backup"
    messages = set()
    for offset in range(len(content)):
        altered = bytearray(content)
        altered[offset] ^= 1 << (offset % 8)
        bad.write_bytes(altered)
        messages.add(refused(store, target, bad).split(" (")[0])
    assert "the backup is corrupt or was altered" in messages


@pytest.mark.parametrize("where", ["header", "key check", "header tag", "chunk frame", "chunk body", "final chunk"])
def test_flipped_bit_messages(tmp_path, small_backup, where):
    store, out = small_backup
    content = bytearray(out.read_bytes())
    head, chunks = frames(bytes(content))
    length = struct.unpack(">I", content[10:14])[0]
    offset = {
        "header": 20,
        "key check": 14 + length + 32,
        "header tag": 14 + length + 48,
        "chunk frame": len(head),
        "chunk body": len(head) + 5 + 3,
        "final chunk": len(content) - 1,
    }[where]
    content[offset] ^= 0x01
    bad = tmp_path / "bad.backup"
    bad.write_bytes(content)
    message = refused(store, f"sqlite:///{tmp_path / 'target.db'}", bad)
    assert message.startswith("the backup is corrupt or was altered")
    assert "master key" not in message


def test_truncation_is_refused(tmp_path, small_backup):
    """A file cut anywhere (also exactly after a chunk) is refused."""
    store, out = small_backup
    content = out.read_bytes()
    head, chunks = frames(content)
    assert len(chunks) >= 4
    target = f"sqlite:///{tmp_path / 'target.db'}"
    bad = tmp_path / "bad.backup"
    boundaries = {len(head) + sum(len(c) for c in chunks[:i]) for i in range(len(chunks))}
    for length in sorted(set(range(0, len(content), 7)) | boundaries):
        bad.write_bytes(content[:length])
        message = refused(store, target, bad)
        if length in boundaries:
            assert message.startswith("the backup is truncated"), message


def test_removed_swapped_duplicated_chunks_are_refused(tmp_path, small_backup):
    store, out = small_backup
    head, chunks = frames(out.read_bytes())
    target = f"sqlite:///{tmp_path / 'target.db'}"
    bad = tmp_path / "bad.backup"
    variants = []
    for i in range(len(chunks)):
        variants.append(chunks[:i] + chunks[i + 1 :])  # removed
        variants.append(chunks[: i + 1] + [chunks[i]] + chunks[i + 1 :])  # duplicated
    for i in range(len(chunks) - 1):
        variants.append(chunks[:i] + [chunks[i + 1], chunks[i]] + chunks[i + 2 :])  # swapped
    variants.append(chunks + [chunks[0]])  # appended
    for variant in variants:
        bad.write_bytes(head + b"".join(variant))
        message = refused(store, target, bad)
        assert message.startswith(("the backup is corrupt or was altered", "the backup is truncated")), message


def test_chunks_of_another_backup_do_not_fit(tmp_path, small_backup):
    """Each backup has its own key: a chunk spliced in from another backup
    of the same store under the same master key does not open."""
    store, out = small_backup
    other = tmp_path / "other.backup"
    backup_mod.backup(store.cfg(), other)
    head, chunks = frames(out.read_bytes())
    _, other_chunks = frames(other.read_bytes())
    bad = tmp_path / "bad.backup"
    bad.write_bytes(head + b"".join([other_chunks[0], *chunks[1:]]))
    assert "chunk 0 does not authenticate" in refused(store, f"sqlite:///{tmp_path / 't.db'}", bad)


def test_wrong_master_key_is_refused(tmp_path, new_url, small_backup):
    store, out = small_backup
    other_key = new_key_file(tmp_path / "other.key")
    target = new_url("target")
    config = write_config(tmp_path / "other", target, key_file=other_key)
    with pytest.raises(backup_mod.BackupError) as caught:
        backup_mod.restore(load_config(config), out)
    assert str(caught.value).startswith("the backup was made under another master key;")
    assert kms_tables(target) == set()


def test_restore_into_a_non_empty_database_is_refused(tmp_path, new_url):
    """Into the source itself, or into a database a node has opened once."""
    store = Store(tmp_path / "source", new_url("source"), objects=3)
    out = tmp_path / "b.backup"
    backup_mod.backup(store.cfg(), out)
    before = dump(store.url)
    with pytest.raises(backup_mod.BackupError, match=r"is not empty \(kms_meta holds 1 row\); restore into a new"):
        backup_mod.restore(store.cfg(), out)
    assert dump(store.url) == before

    opened = new_url("opened")
    storage = SqlStorage(opened)
    open_barrier(storage, key_file=str(store.key_file))
    storage.close()
    with pytest.raises(backup_mod.BackupError, match="is not empty"):
        backup_mod.restore(store.cfg(opened), out)
    assert dump(opened)["kms_objects"] == []


def test_passphrase_master_key(tmp_path):
    """With a passphrase the scrypt salt travels in the header; the restored
    store opens with the same passphrase, and not with another."""
    store = Store(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}", objects=4, passphrase=True)
    out = tmp_path / "b.backup"
    backup_mod.backup(store.cfg(), out)
    target = f"sqlite:///{tmp_path / 'target.db'}"
    wrong = secret_file(tmp_path / "wrong-passphrase", "another passphrase entirely\n")
    with pytest.raises(backup_mod.BackupError, match="^the backup was made under another master key;"):
        backup_mod.restore(load_config(write_config(tmp_path / "w", target, passphrase_file=wrong)), out)
    assert kms_tables(target) == set()
    backup_mod.restore(store.cfg(target), out)
    assert dump(target) == dump(store.url)
    copy = SqlStorage(target)
    try:
        open_barrier(copy, passphrase_file=str(store.passphrase_file))
        with pytest.raises(BarrierError):
            open_barrier(copy, passphrase_file=str(wrong))
    finally:
        copy.close()


def test_backup_refuses_a_master_key_that_does_not_open_the_store(tmp_path):
    store = Store(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}", objects=2)
    config = write_config(tmp_path / "other", store.url, key_file=new_key_file(tmp_path / "other.key"))
    out = tmp_path / "b.backup"
    with pytest.raises(backup_mod.BackupError, match="master key does not open this database"):
        backup_mod.backup(load_config(config), out)
    assert list(tmp_path.glob("*.backup*")) == []


def test_schema_revision_must_match(tmp_path, small_backup, monkeypatch):
    store, out = small_backup
    monkeypatch.setattr(backup_mod.schema, "head_revision", lambda: "9999")
    message = refused(store, f"sqlite:///{tmp_path / 'target.db'}", out)
    assert "schema revision" in message and "9999" in message
    with pytest.raises(backup_mod.BackupError, match="schema revision"):
        backup_mod.backup(store.cfg(), tmp_path / "again.backup")


def test_every_table_is_backed_up_or_excluded_on_purpose():
    """A new table (the audit trail) must be placed in BACKUP_TABLES or,
    with the reason, in NOT_BACKED_UP."""
    known = set(backup_mod.BACKUP_TABLES) | set(backup_mod.NOT_BACKED_UP)
    assert set(sql_tables.metadata.tables) <= known
    assert set(backup_mod.BACKUP_TABLES) <= set(sql_tables.metadata.tables)
    # Parents before children: restore inserts in this order.
    order = {name: i for i, name in enumerate(backup_mod.BACKUP_TABLES)}
    for name in backup_mod.BACKUP_TABLES:
        for fk in sql_tables.metadata.tables[name].foreign_keys:
            assert order[fk.column.table.name] < order[name]


# --- the commands -----------------------------------------------------------------------


@pytest.fixture
def admin(monkeypatch, capsys):
    """kms-admin with the backup commands, whether or not cli.py lists them yet."""
    if register_backup not in cli.COMMAND_GROUPS:
        monkeypatch.setattr(cli, "COMMAND_GROUPS", [*cli.COMMAND_GROUPS, register_backup])

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


PROGRESS_LINE = re.compile(r"^kms-admin: (backing up|verifying|restoring): \d+/\d+ rows")


def assert_one_line_error(err: str, *fragments: str) -> None:
    """One error line, after any progress lines; never a traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, err
    assert lines[0].startswith("kms-admin: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], err


def test_commands(tmp_path, admin):
    """backup and restore from the command line: results on stdout, plain
    progress lines on a stderr that is not a terminal, one-line errors."""
    store = Store(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}", objects=5)
    out = tmp_path / "cli.backup"
    code, stdout, stderr = admin("backup", "--out", str(out), "--config", str(store.config))
    assert code == 0, stderr
    assert f"wrote {out} (mode 0600" in stdout and "5 objects, 10 attributes, 1 server value, 0 audit records, 0 audit checkpoints;" in stdout
    assert stderr.splitlines()[0] == "kms-admin: backing up: 0/16 rows"
    assert stderr.splitlines()[-1].startswith("kms-admin: backing up: 16/16 rows")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    code, _, stderr = admin("backup", "--out", str(out), "--config", str(store.config))
    assert code == 2
    assert_one_line_error(stderr, "exists", "--force")
    first = out.read_bytes()
    code, _, stderr = admin("backup", "--out", str(out), "--config", str(store.config), "--force")
    assert code == 0, stderr
    assert out.read_bytes() != first  # a new salt, a new file
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cli.backup")] == []

    target = tmp_path / "restored.db"
    code, stdout, stderr = admin(
        "restore", "--from", str(out), "--config", str(store.config), "--db-url", f"sqlite:///{target}"
    )
    assert code == 0, stderr
    assert "restored 5 objects, 10 attributes, 1 server value, 0 audit records, 0 audit checkpoints into" in stdout
    assert "kms-admin: verifying: 16/16 rows" in stderr and "kms-admin: restoring: 16/16 rows" in stderr
    assert dump(f"sqlite:///{target}") == dump(store.url)

    code, _, stderr = admin(
        "restore", "--from", str(out), "--config", str(store.config), "--db-url", f"sqlite:///{target}"
    )
    assert code == 2
    assert_one_line_error(stderr, "is not empty", "new, empty database")

    content = bytearray(out.read_bytes())
    content[-40] ^= 0x10
    bad = tmp_path / "bad.backup"
    bad.write_bytes(content)
    code, _, stderr = admin(
        "restore", "--from", str(bad), "--config", str(store.config), "--db-url", f"sqlite:///{tmp_path / 'x.db'}"
    )
    assert code == 2
    assert_one_line_error(stderr, "the backup is corrupt or was altered", "use an intact copy")
    assert not (tmp_path / "x.db").exists()

    other = write_config(
        tmp_path / "other", f"sqlite:///{tmp_path / 'y.db'}", key_file=new_key_file(tmp_path / "other.key")
    )
    code, _, stderr = admin("restore", "--from", str(out), "--config", str(other))
    assert code == 2
    assert_one_line_error(stderr, "the backup was made under another master key")
    assert not (tmp_path / "y.db").exists()

    code, _, stderr = admin("restore", "--from", str(tmp_path / "missing.backup"), "--config", str(store.config))
    assert_one_line_error(stderr, "does not exist")
    code, _, stderr = admin(
        "restore",
        "--from",
        str(store.config),
        "--config",
        str(store.config),
        "--db-url",
        f"sqlite:///{tmp_path / 'z.db'}",
    )
    assert_one_line_error(stderr, "is not a kms-server backup")
    code, _, stderr = admin("backup", "--out", str(tmp_path / "nodir" / "b"), "--config", str(store.config))
    assert_one_line_error(stderr, "does not exist")
    code, _, stderr = admin(
        "backup",
        "--out",
        str(tmp_path / "m"),
        "--config",
        str(store.config),
        "--db-url",
        f"sqlite:///{tmp_path / 'none.db'}",
    )
    assert_one_line_error(stderr, "does not exist", "db-url")
    assert not (tmp_path / "none.db").exists()


def test_progress_bar_on_a_terminal():
    """On a terminal the reporter draws rich bars (here into a buffer)."""
    stream = io.StringIO()
    reporter = ProgressReporter(stream, tty=True)
    with reporter.running():
        verify, insert = reporter.phase("verifying"), reporter.phase("restoring")
        for callback in (verify, insert):
            for done in range(0, 101, 25):
                callback(done, 100)
    text = stream.getvalue()
    assert "verifying" in text and "restoring" in text and "100/100" in text


def test_sqlite_backup_restores_into_postgresql(tmp_path, pg_database):
    """A single node's SQLite store moves to PostgreSQL row for row."""
    store = Store(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}", objects=8)
    out = tmp_path / "b.backup"
    backup_mod.backup(store.cfg(), out)
    target = pg_database("moved")
    backup_mod.restore(store.cfg(target), out)
    assert dump(target) == dump(store.url)
    moved = SqlStorage(target, schema="check")
    try:
        barrier = open_barrier(moved, key_file=str(store.key_file))
        with moved.transaction() as txn:
            for uid, key in store.keys.items():
                assert barrier.unseal(uid, txn.get_object(uid).sealed_material) == key
    finally:
        moved.close()


def test_a_restore_into_postgresql_leaves_planner_statistics(tmp_path, pg_database):
    """The restore ends with ANALYZE of what it loaded: without statistics
    PostgreSQL plans an object's attribute lookup as a scan (36 ms a Get at
    a million keys) until autovacuum, if it is on, gets there."""
    from sqlalchemy import create_engine

    store = Store(tmp_path / "source", f"sqlite:///{tmp_path / 'source.db'}", objects=4)
    out = tmp_path / "b.backup"
    backup_mod.backup(store.cfg(), out)
    target = pg_database("analyzed")
    backup_mod.restore(store.cfg(target), out)
    engine = create_engine(target)
    try:
        deadline = time.monotonic() + 10
        while True:  # the statistics views are updated shortly after the ANALYZE commits
            with engine.connect() as conn:
                analyzed = dict(
                    conn.exec_driver_sql(
                        "SELECT relname, last_analyze IS NOT NULL FROM pg_stat_user_tables "
                        "WHERE relname IN ('kms_objects', 'kms_attributes', 'kms_audit')"
                    ).all()
                )
            if all(analyzed.values()) and len(analyzed) == 3 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert analyzed == {"kms_objects": True, "kms_attributes": True, "kms_audit": True}
    finally:
        engine.dispose()
