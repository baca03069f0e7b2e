"""Backup formats (docs/backup-format.md): format 2 wraps a random backup
key under the master key; backups of format 1, sealed under a key derived
from the raw master key, are still restored."""

from __future__ import annotations

import hashlib
import json
import secrets
import struct
import uuid
from pathlib import Path

import pytest
from kms_store_support import dump, store_config

from kmip_core import backup_format
from kmip_core.sealing.backup_seal import BackupCipher
from kmip_core.sealing.barrier import open_barrier
from kmip_core.sealing.master_key import AesMasterKey
from kms_server.admin import backup as backup_mod
from kms_server.config import load_config
from kms_server.storage.base import StoredAttribute, StoredObject
from kms_server.storage.sql import SqlStorage

MAGIC = b"\x89KMSBAK\n"
PREFIX = struct.Struct(">8sHI")
FRAME = struct.Struct(">BI")


def secret_file(path: Path, content: str) -> Path:
    path.write_text(content)
    path.chmod(0o600)
    return path


def config(tmp_path: Path, name: str, db_url: str, key_file: Path) -> Path:
    return store_config(tmp_path, name, db_url, f'file = "{key_file}"\n', "formats")


@pytest.fixture
def store(tmp_path):
    """A SQLite store under a key file, a few sealed keys in it, and its
    (format 2) backup."""
    key = secrets.token_bytes(32)
    key_file = secret_file(tmp_path / "master.key", key.hex() + "\n")
    url = f"sqlite:///{tmp_path / 'source.db'}"
    storage = SqlStorage(url)
    try:
        barrier = open_barrier(storage, key_file=str(key_file))
        with storage.transaction() as txn:
            for _ in range(4):
                uid = str(uuid.uuid4())
                txn.insert_object(
                    StoredObject(
                        uid=uid,
                        owner="alice",
                        sealed_material=barrier.seal(uid, secrets.token_bytes(32)),
                        attributes=[StoredAttribute("Name", 0, b"n-" + uid.encode())],
                    )
                )
    finally:
        storage.close()
    cfg_path = config(tmp_path, "source", url, key_file)
    out = tmp_path / "b.kmsbak"
    backup_mod.backup(load_config(cfg_path), out)
    return key, key_file, url, cfg_path, out


def parse(content: bytes) -> tuple[int, dict, int]:
    """(version, header fields, offset of the first chunk)."""
    _magic, version, length = PREFIX.unpack(content[: PREFIX.size])
    return version, json.loads(content[PREFIX.size : PREFIX.size + length]), PREFIX.size + length + 32 + 16 + 16


def as_format_1(content: bytes, master_key: bytes) -> bytes:
    """The same backup written as format 1 did: chunks sealed under
    HKDF(raw master key, salt), no wrapped backup key. An implementation of
    the documented format apart from kms_server's writer."""
    version, fields, at = parse(content)
    assert version == 2
    salt = bytes.fromhex(fields["kdf"]["salt"])
    context = b"kms-backup:" + MAGIC + (2).to_bytes(2, "big") + salt
    backup_key = AesMasterKey(master_key, "test").unwrap(bytes.fromhex(fields["backup_key"]["wrapped"]), context)
    new, old = BackupCipher(backup_key, salt), BackupCipher(master_key, salt)
    new_aad = hashlib.sha256(content[: at - 64]).digest()

    fields = {k: v for k, v in fields.items() if k != "backup_key"}
    fields.update(format=1, master_key={"source": "file"})
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    prefix = PREFIX.pack(MAGIC, 1, len(body)) + body
    digest = hashlib.sha256(prefix).digest()
    out = bytearray(prefix + digest + old.key_check() + old.header_tag(prefix))
    index = 0
    while at < len(content):
        flags, size = FRAME.unpack(content[at : at + FRAME.size])
        sealed = content[at + FRAME.size : at + FRAME.size + size]
        plaintext = new.open(index, flags == 1, sealed, new_aad)
        resealed = old.seal(index, flags == 1, plaintext, digest)
        out += FRAME.pack(flags, len(resealed)) + resealed
        at += FRAME.size + size
        index += 1
    return bytes(out)


def test_backups_are_format_2_with_a_wrapped_backup_key(store):
    key, _key_file, _url, _cfg, out = store
    content = out.read_bytes()
    version, fields, _ = parse(content)
    assert version == fields["format"] == backup_format.FORMAT_VERSION == 2
    assert fields["master_key"] == {"source": "file", "key_id": AesMasterKey(key, "k").key_id}
    wrapped = bytes.fromhex(fields["backup_key"]["wrapped"])
    assert len(wrapped) == 12 + 32 + 16
    assert key not in content and key.hex().encode() not in content


def test_format_1_backup_is_still_restored(store, tmp_path):
    key, key_file, url, cfg_path, out = store
    old = tmp_path / "old.kmsbak"
    old.write_bytes(as_format_1(out.read_bytes(), key))
    target = f"sqlite:///{tmp_path / 'target.db'}"
    backup_mod.restore(load_config(cfg_path, {"storage": {"db_url": target}}), old)
    assert dump(target) == dump(url)

    other = secret_file(tmp_path / "other.key", secrets.token_hex(32) + "\n")
    again = f"sqlite:///{tmp_path / 'again.db'}"
    with pytest.raises(backup_mod.BackupError, match="^the backup was made under another master key;"):
        backup_mod.restore(load_config(config(tmp_path, "other", again, other)), old)
    assert not (tmp_path / "again.db").exists()


def test_unknown_format_is_refused_with_one_line(store, tmp_path):
    *_, cfg_path, out = store
    content = bytearray(out.read_bytes())
    content[8:10] = (3).to_bytes(2, "big")
    bad = tmp_path / "future.kmsbak"
    bad.write_bytes(bytes(content))
    with pytest.raises(backup_mod.BackupError, match="is backup format 3, this kms-admin reads formats 1, 2;"):
        backup_mod.restore(load_config(cfg_path, {"storage": {"db_url": f"sqlite:///{tmp_path / 't.db'}"}}), bad)


def test_a_wrapped_backup_key_moved_into_another_backup_does_not_open(store, tmp_path):
    """The wrapped key is bound to its own backup (its salt): copied into the
    header of another backup (digest recomputed) it is refused."""
    key, _key_file, _url, cfg_path, out = store
    second = tmp_path / "second.kmsbak"
    backup_mod.backup(load_config(cfg_path), second)
    _, first_fields, _ = parse(out.read_bytes())
    content = second.read_bytes()
    _, fields, at = parse(content)
    fields["backup_key"] = first_fields["backup_key"]
    body = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    prefix = PREFIX.pack(MAGIC, 2, len(body)) + body
    forged = prefix + hashlib.sha256(prefix).digest() + content[at - 32 : at] + content[at:]
    bad = tmp_path / "forged.kmsbak"
    bad.write_bytes(forged)
    with pytest.raises(backup_mod.BackupError) as caught:
        backup_mod.restore(load_config(cfg_path, {"storage": {"db_url": f"sqlite:///{tmp_path / 't.db'}"}}), bad)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "t.db").exists()
