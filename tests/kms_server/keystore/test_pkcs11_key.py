"""The master key in a PKCS#11 token (issue 19, item 2;
docs/hsm-master-key.md), against a real SoftHSM2 token made for the test
process (tests/softhsm.py): wrapping in the token, the key never leaving it,
one-line errors for every way opening it fails, backup and restore under it,
and `kms-admin master-key new --pkcs11-module ...`."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest
from kms_store_support import dump, store_config
from softhsm import OTHER_TOKEN, PIN, TOKEN, new_label, raw_session, softhsm

from kmip_core import backup_format
from kmip_core.config import ConfigError
from kmip_core.sealing.barrier import open_barrier
from kmip_core.sealing.master_key import MasterKeyError
from kmip_core.sealing.opener import open_master_key
from kms_server.admin import backup as backup_mod
from kms_server.admin import cli
from kms_server.config import load_config
from kms_server.storage.base import StoredAttribute, StoredObject
from kms_server.storage.sql import SqlStorage


@pytest.fixture(scope="module")
def hsm():
    return softhsm()


def settings(hsm, key_label: str, **changes) -> SimpleNamespace:
    values = hsm.master_key_settings(key_label)
    values.update(changes)
    return SimpleNamespace(file=None, passphrase_file=None, **values)


def open_key(cfg):
    return open_master_key(cfg, lambda name: None)


@pytest.fixture(scope="module")
def key_label(hsm):
    """A master key made in the token once for this module's tests."""
    label = new_label()
    code = cli.main(["master-key", "new", *_flags(hsm, label)])
    assert code == 0
    return label


@pytest.fixture
def master(hsm, key_label):
    key = open_key(settings(hsm, key_label))
    yield key
    key.close()


def _flags(hsm, label: str, token: str = TOKEN) -> list[str]:
    return [
        "--pkcs11-module", str(hsm.module),
        "--token-label", token,
        "--key-label", label,
        "--pin-file", str(hsm.pin_file),
    ]  # fmt: skip


def one_line(message: str) -> str:
    assert message and "\n" not in message and "Traceback" not in message
    assert PIN not in message
    return message


# --- wrapping -------------------------------------------------------------------------


def test_wrap_unwrap_round_trip(hsm, key_label, master):
    """Secrets of every size come back; each wrap has its own IV; the key_id
    names the key stably across a reopening."""
    for size in (0, 1, 16, 32, 33, 1000):
        secret = secrets.token_bytes(size)
        blob = master.wrap(secret, b"kms-keyring:v1")
        assert master.unwrap(blob, b"kms-keyring:v1") == secret
        assert blob[0] == 1 and len(blob) == 1 + 12 + size + 16
        assert secret not in blob or size < 2
    assert master.wrap(b"x" * 32, b"c") != master.wrap(b"x" * 32, b"c")
    assert master.key_id.startswith("pkcs11:") and master.legacy_key() is None
    assert key_label in master.description and TOKEN in master.description
    again = open_key(settings(hsm, key_label))
    try:
        assert again.key_id == master.key_id
        assert again.unwrap(master.wrap(b"s" * 32, b"c"), b"c") == b"s" * 32
    finally:
        again.close()


def test_altered_blob_and_wrong_context_are_refused(hsm, master):
    blob = master.wrap(b"k" * 32, b"kms-backup:one")
    with pytest.raises(MasterKeyError, match="does not open this blob"):
        master.unwrap(blob, b"kms-backup:two")
    for offset in range(len(blob)):
        altered = bytearray(blob)
        altered[offset] ^= 0x20
        with pytest.raises(MasterKeyError) as caught:
            master.unwrap(bytes(altered), b"kms-backup:one")
        one_line(str(caught.value))
    for cut in (0, 1, 13, 28, len(blob) - 1):
        with pytest.raises(MasterKeyError):
            master.unwrap(blob[:cut], b"kms-backup:one")
    assert master.unwrap(blob, b"kms-backup:one") == b"k" * 32


def test_another_token_key_does_not_open(hsm, master):
    other_label = new_label()
    assert cli.main(["master-key", "new", *_flags(hsm, other_label, OTHER_TOKEN)]) == 0
    other = open_key(settings(hsm, other_label, token_label=OTHER_TOKEN))
    try:
        assert other.key_id != master.key_id
        with pytest.raises(MasterKeyError, match="wrong master key, or altered"):
            other.unwrap(master.wrap(b"k" * 32, b"c"), b"c")
    finally:
        other.close()


def test_the_key_never_leaves_the_token(hsm, key_label):
    """The generated key is sensitive and not extractable: its value cannot
    be read, nor wrapped out by another key."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, ObjectClass

    session = raw_session(hsm)
    try:
        key = session.get_key(label=key_label, key_type=KeyType.AES, object_class=ObjectClass.SECRET_KEY)
        assert key[Attribute.EXTRACTABLE] is False
        assert key[Attribute.SENSITIVE] is True
        assert key[Attribute.NEVER_EXTRACTABLE] is True
        assert key[Attribute.ALWAYS_SENSITIVE] is True
        assert key[Attribute.TOKEN] is True and key[Attribute.PRIVATE] is True
        assert key[Attribute.VALUE_LEN] == 32
        assert key[Attribute.WRAP] is False and key[Attribute.UNWRAP] is False
        with pytest.raises(pkcs11.exceptions.AttributeSensitive):
            key[Attribute.VALUE]
        wrapper = session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})
        with pytest.raises(pkcs11.exceptions.KeyUnextractable):
            wrapper.wrap_key(key)
    finally:
        session.close()


def test_a_key_that_can_leave_the_token_is_refused(hsm):
    from pkcs11 import Attribute, KeyType

    label = new_label("extractable")
    session = raw_session(hsm)
    try:
        session.generate_key(
            KeyType.AES,
            256,
            label=label,
            store=True,
            template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: False},
        )
    finally:
        session.close()
    with pytest.raises(MasterKeyError) as caught:
        open_key(settings(hsm, label))
    assert "can leave the token" in one_line(str(caught.value))


def test_a_session_the_token_dropped_is_opened_again(hsm, master):
    """A network HSM or a restarted token daemon drops sessions: the next
    wrap logs in again instead of failing until a restart."""
    blob = master.wrap(b"k" * 32, b"c")
    master._shared.session.close()  # what the token does when it drops us
    assert master.unwrap(blob, b"c") == b"k" * 32
    assert master.unwrap(master.wrap(b"j" * 32, b"c"), b"c") == b"j" * 32


def test_two_keys_on_one_token_share_its_login(hsm, key_label, master):
    """A rotation from one token key to another opens both in one process."""
    label = new_label()
    assert cli.main(["master-key", "new", *_flags(hsm, label)]) == 0
    second = open_key(settings(hsm, label))
    blob = second.wrap(b"n" * 32, b"c")
    assert master.unwrap(master.wrap(b"o" * 32, b"c"), b"c") == b"o" * 32
    second.close()
    assert master.unwrap(master.wrap(b"o" * 32, b"c"), b"c") == b"o" * 32
    third = open_key(settings(hsm, label))
    try:
        assert third.unwrap(blob, b"c") == b"n" * 32
    finally:
        third.close()


# --- opening fails with one line --------------------------------------------------------


def _write(path: Path, content: str, mode: int = 0o600) -> Path:
    path.write_text(content)
    path.chmod(mode)
    return path


@pytest.mark.parametrize(
    "case, fragments",
    [
        ("wrong PIN", ["refused the PIN in", "(wrong PIN)", "master_key.pin_file"]),
        ("missing token", ["no token labelled 'no-such-token'", "(it has: kms-other, kms-test)", "token_label"]),
        ("missing key", ["no AES key labelled 'no-such-key' in token 'kms-test'", "kms-admin master-key new"]),
        ("missing module", ["PKCS#11 module", "does not exist", "apt-get install softhsm2"]),
        ("not a module", ["cannot be loaded", "master_key.pkcs11_module"]),
        ("missing PIN file", ["cannot read PIN file", "master_key.pin_file"]),
        ("empty PIN file", ["is empty or too long", "user PIN"]),
    ],
)
def test_opening_failures_are_one_line(hsm, key_label, tmp_path, case, fragments):
    cfg = settings(hsm, key_label)
    if case == "wrong PIN":
        cfg.pin_file = str(_write(tmp_path / "wrong.pin", "1234-not-the-pin\n"))
    elif case == "missing token":
        cfg.token_label = "no-such-token"
    elif case == "missing key":
        cfg.key_label = "no-such-key"
    elif case == "missing module":
        cfg.pkcs11_module = str(tmp_path / "libnothing.so")
    elif case == "not a module":
        cfg.pkcs11_module = str(_write(tmp_path / "libfake.so", "not an ELF file"))
    elif case == "missing PIN file":
        cfg.pin_file = str(tmp_path / "absent.pin")
    elif case == "empty PIN file":
        cfg.pin_file = str(_write(tmp_path / "empty.pin", "\n"))
    with pytest.raises(MasterKeyError) as caught:
        open_key(cfg)
    message = one_line(str(caught.value))
    for fragment in fragments:
        assert fragment in message, message


def test_a_wrong_pin_does_not_lock_out_the_right_one(hsm, key_label, tmp_path):
    cfg = settings(hsm, key_label, pin_file=str(_write(tmp_path / "wrong.pin", "0000\n")))
    with pytest.raises(MasterKeyError):
        open_key(cfg)
    key = open_key(settings(hsm, key_label))
    key.close()


# --- configuration --------------------------------------------------------------------


def _config(tmp_path: Path, body: str) -> Path:
    path = tmp_path / f"kms-{uuid.uuid4().hex[:6]}.toml"
    path.write_text("[master_key]\n" + body)
    return path


def test_config_pkcs11_section(tmp_path):
    pin = _write(tmp_path / "pin", "1234\n")
    module = _write(tmp_path / "lib.so", "x", 0o644)
    body = f'pkcs11_module = "{module}"\ntoken_label = "T"\nkey_label = "K"\npin_file = "{pin}"\n'
    cfg = load_config(_config(tmp_path, body))
    assert cfg.master_key.pkcs11_module == module and cfg.master_key.pin_file == pin
    assert (cfg.master_key.token_label, cfg.master_key.key_label) == ("T", "K")
    assert cfg.master_key.file is None and cfg.check_files() == [
        p for p in cfg.check_files() if not p.startswith("master_key")
    ]
    pin.chmod(0o644)
    assert any(p.startswith("master_key.pin_file") and "chmod 600" in p for p in cfg.check_files())
    with pytest.raises(ConfigError, match="master_key.file and master_key.pkcs11_module are both set"):
        load_config(_config(tmp_path, body + 'file = "k"\n'))
    with pytest.raises(ConfigError, match="needs master_key.pin_file too"):
        load_config(_config(tmp_path, body.replace(f'pin_file = "{pin}"\n', "")))
    with pytest.raises(ConfigError, match="master_key.token_label is set without master_key.pkcs11_module"):
        load_config(_config(tmp_path, 'file = "k"\ntoken_label = "T"\n'))


# --- kms-admin master-key new --pkcs11-module ----------------------------------------


def test_kms_admin_master_key_new_in_token(hsm, capsys):
    label = new_label()
    assert cli.main(["master-key", "new", *_flags(hsm, label)]) == 0
    out = capsys.readouterr().out
    assert f"generated key '{label}' in token '{TOKEN}'" in out and "not extractable" in out
    assert f'key_label = "{label}"' in out and f'pin_file = "{hsm.pin_file}"' in out
    assert PIN not in out
    key = open_key(settings(hsm, label))
    key.close()
    assert key.key_id in out

    # An existing key is never replaced.
    assert cli.main(["master-key", "new", *_flags(hsm, label)]) == 2
    err = capsys.readouterr().err
    assert "already holds a key labelled" in one_line(err.strip())
    again = open_key(settings(hsm, label))
    assert again.key_id == key.key_id
    again.close()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--token-label", "T"], "needs --pkcs11-module, --key-label, --pin-file too"),
        (["--out", "x.key", "--token-label", "T"], "give one of them"),
        ([], "give --out FILE for a key file, or --pkcs11-module"),
    ],
)
def test_kms_admin_master_key_new_usage_errors(capsys, argv, fragment):
    assert cli.main(["master-key", "new", *argv]) == 2
    assert fragment in one_line(capsys.readouterr().err.strip())


# --- backup and restore under a token key ------------------------------------------------


def _store_config(tmp_path: Path, name: str, db_url: str, master_key_body: str) -> Path:
    return store_config(tmp_path, name, db_url, master_key_body, "hsm-test")


def _new_store(url: str, master_key_config, objects: int = 5) -> dict[str, bytes]:
    """A store whose keyring the token key wraps, with a few sealed keys."""
    keys = {}
    storage = SqlStorage(url)
    try:
        barrier = open_barrier(storage, source=master_key_config)
        with storage.transaction() as txn:
            for _ in range(objects):
                uid = str(uuid.uuid4())
                keys[uid] = secrets.token_bytes(32)
                txn.insert_object(
                    StoredObject(
                        uid=uid,
                        owner="alice",
                        sealed_material=barrier.seal(uid, keys[uid]),
                        attributes=[StoredAttribute("Name", 0, b"n-" + uid.encode())],
                    )
                )
    finally:
        storage.close()
    return keys


def test_backup_and_restore_with_a_token_master_key(hsm, key_label, tmp_path):
    """The backup key is wrapped in the token; restore needs that token key
    (a key file, or another token key, is refused with one line naming the
    key it needs), and the restored store opens under it."""
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    config = _store_config(tmp_path, "source", source_url, hsm.toml(key_label))
    cfg = load_config(config)
    keys = _new_store(source_url, cfg.master_key)
    out = tmp_path / "hsm.kmsbak"
    summary = backup_mod.backup(cfg, out)
    assert summary.rows["kms_objects"] == len(keys)
    content = out.read_bytes()
    assert content[8:10] == backup_format.FORMAT_VERSION.to_bytes(2, "big") == b"\x00\x02"
    for key in keys.values():
        assert key not in content
    assert b'"source":"pkcs11"' in content and key_label.encode() in content

    target = f"sqlite:///{tmp_path / 'wrong.db'}"
    other_key = _write(tmp_path / "other.key", secrets.token_hex(32) + "\n")
    wrong = load_config(_store_config(tmp_path, "wrong", target, f'file = "{other_key}"\n'))
    with pytest.raises(backup_mod.BackupError) as caught:
        backup_mod.restore(wrong, out)
    message = one_line(str(caught.value))
    assert message.startswith("the backup was made under another master key;")
    assert f"token key '{key_label}' in token '{TOKEN}'" in message
    assert not (tmp_path / "wrong.db").exists()

    other_label = new_label()
    assert cli.main(["master-key", "new", *_flags(hsm, other_label, OTHER_TOKEN)]) == 0
    other = load_config(_store_config(tmp_path, "other", target, hsm.toml(other_label, OTHER_TOKEN)))
    with pytest.raises(backup_mod.BackupError, match="^the backup was made under another master key;"):
        backup_mod.restore(other, out)
    # A token key does not open a store it did not make either.
    with pytest.raises(backup_mod.BackupError, match="master key does not open this database"):
        backup_mod.backup(load_config(_store_config(tmp_path, "o2", source_url, hsm.toml(other_label, OTHER_TOKEN))),
                          tmp_path / "never.kmsbak")  # fmt: skip
    assert not (tmp_path / "never.kmsbak").exists()

    # A format-1 backup was sealed under the raw bytes of a key file or
    # passphrase, which a token key does not have.
    length = int.from_bytes(content[10:14], "big")
    prefix = content[:8] + b"\x00\x01" + content[10 : 14 + length]
    old = tmp_path / "format-1.kmsbak"
    old.write_bytes(prefix + hashlib.sha256(prefix).digest() + content[14 + length + 32 :])
    with pytest.raises(backup_mod.BackupError) as caught:
        backup_mod.restore(load_config(config, {"storage": {"db_url": target}}), old)
    assert "format 1" in one_line(str(caught.value)) and "a token key cannot open" in str(caught.value)

    restored_url = f"sqlite:///{tmp_path / 'restored.db'}"
    backup_mod.restore(load_config(config, {"storage": {"db_url": restored_url}}), out)
    assert dump(restored_url) == dump(source_url)
    storage = SqlStorage(restored_url)
    try:
        barrier = open_barrier(storage, source=cfg.master_key)
        with storage.transaction() as txn:
            for uid, key in keys.items():
                assert barrier.unseal(uid, txn.get_object(uid).sealed_material) == key
    finally:
        storage.close()
