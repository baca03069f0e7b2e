"""A real kms-server whose master key is in a SoftHSM2 token (issue 19,
item 2; docs/hsm-master-key.md): it serves, its keys survive a restart
under the same token key, and a token that is missing or refuses is one
line on stderr and no start."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest
from conftest import start_server
from kmip.core import enums
from kmip.pie import objects as pie_objects
from kmip_client import pykmip
from softhsm import PIN, TOKEN, new_label, softhsm

from kms_server.admin import cli


@pytest.fixture(scope="module")
def hsm():
    return softhsm()


def new_token_key(hsm) -> str:
    label = new_label()
    argv = ["master-key", "new", "--pkcs11-module", str(hsm.module), "--token-label", TOKEN]
    assert cli.main([*argv, "--key-label", label, "--pin-file", str(hsm.pin_file)]) == 0
    return label


@pytest.fixture
def token_key(hsm):
    return new_token_key(hsm)


@pytest.fixture(scope="module")
def opened_node(hsm, pki_dir, tmp_path_factory):
    """A node's workdir whose store a token key has opened once (stopped)."""
    label = new_token_key(hsm)
    workdir = tmp_path_factory.mktemp("hsm-node")
    start_server(workdir, pki_dir, master_key_toml=hsm.toml(label)).stop()
    return workdir, label


def _client(server, pki):
    """PyKMIP's client as alice, at KMIP 1.2 (PyKMIP's own default)."""
    return pykmip(server, pki, version=enums.KMIPVersion.KMIP_1_2)


def test_node_serves_and_restarts_on_a_token_master_key(tmp_path, pki_dir, hsm, token_key):
    """Keys created on a node whose keyring the token key wraps come back
    the same after a restart; the database names the token key's id, and
    holds neither the secret nor the PIN."""
    workdir = tmp_path / "node"
    server = start_server(workdir, pki_dir, master_key_toml=hsm.toml(token_key))
    try:
        client = _client(server, pki_dir)
        try:
            aes = client.create(enums.CryptographicAlgorithm.AES, 256)
            secret = secrets.token_bytes(24)
            secret_uid = client.register(pie_objects.SecretData(secret, enums.SecretDataType.PASSWORD))
            aes_value = client.get(aes).value
        finally:
            client.close()
    finally:
        assert server.stop() == 0
    database = (workdir / "data" / "kms.db").read_bytes()
    assert secret not in database and aes_value not in database
    assert b"pkcs11:" in database
    assert PIN.encode() not in database and PIN not in server.stderr_text()

    server = start_server(workdir, pki_dir, master_key_toml=hsm.toml(token_key))
    try:
        client = _client(server, pki_dir)
        try:
            assert client.get(aes).value == aes_value
            assert client.get(secret_uid).value == secret
        finally:
            client.close()
    finally:
        server.stop()


@pytest.mark.parametrize("problem", ["wrong PIN", "missing token", "missing key", "another token key"])
def test_token_problems_stop_the_node_with_one_line(tmp_path, hsm, opened_node, problem):
    """Each is one line on stderr, exit status 2, and nothing listens."""
    workdir, token_key = opened_node
    settings = hsm.master_key_settings(token_key)
    expected = {
        "wrong PIN": "refused the PIN",
        "missing token": "no token labelled 'absent-token'",
        "missing key": "no AES key labelled 'absent-key'",
        "another token key": "does not open this database",
    }[problem]
    if problem == "wrong PIN":
        wrong = tmp_path / "wrong.pin"
        wrong.write_text("0000-wrong\n")
        wrong.chmod(0o600)
        settings["pin_file"] = str(wrong)
    elif problem == "missing token":
        settings["token_label"] = "absent-token"
    elif problem == "missing key":
        settings["key_label"] = "absent-key"
    else:
        settings["key_label"] = new_token_key(hsm)
    text = (workdir / "kms.toml").read_text()
    config = tmp_path / "kms.toml"
    for key, value in settings.items():
        text = text.replace(f'{key} = "{hsm.master_key_settings(token_key)[key]}"', f'{key} = "{value}"')
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.cli", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "listening on" not in result.stdout


def test_rotation_to_a_token_key_and_backups_on_either_side(tmp_path, pki_dir, hsm, token_key):
    """A node on a key file moves to a token key (kms-admin master-key
    rotate --new-config, then --finish) and serves the same keys on it; a
    backup made before the rotation is restored with the old key file and
    not with the token key, one made after with the token key."""
    from kmip_core.sealing.barrier import BarrierError, open_barrier
    from kms_server.admin import backup as backup_mod
    from kms_server.config import load_config
    from kms_server.storage.sql import SqlStorage

    workdir = tmp_path / "node"
    server = start_server(workdir, pki_dir)
    try:
        client = _client(server, pki_dir)
        try:
            keys = {uid: None for uid in (client.create(enums.CryptographicAlgorithm.AES, 256) for _ in range(5))}
            for uid in keys:
                keys[uid] = client.get(uid).value
        finally:
            client.close()
    finally:
        server.stop()
    old_config = workdir / "kms-old.toml"
    old_config.write_text((workdir / "kms.toml").read_text())
    token_config = workdir / "kms-token.toml"
    token_config.write_text(
        old_config.read_text().replace(f'file = "{workdir / "master.key"}"', hsm.toml(token_key).strip())
    )
    assert "pkcs11_module" in token_config.read_text()
    before = tmp_path / "before.kmsbak"
    backup_mod.backup(load_config(old_config), before)

    assert cli.main(["master-key", "rotate", "--config", str(old_config), "--new-config", str(token_config)]) == 0
    assert cli.main(["master-key", "rotate", "--finish", "--config", str(token_config)]) == 0
    server = start_server(workdir, pki_dir, master_key_toml=hsm.toml(token_key))
    try:
        client = _client(server, pki_dir)
        try:
            for uid, value in keys.items():
                assert client.get(uid).value == value
        finally:
            client.close()
    finally:
        server.stop()
    after = tmp_path / "after.kmsbak"
    backup_mod.backup(load_config(token_config), after)

    def restored(config, backup, name):
        url = f"sqlite:///{tmp_path / name}"
        backup_mod.restore(load_config(config, {"storage": {"db_url": url}}), backup)
        return url

    def opens(url, config) -> bool:
        storage = SqlStorage(url)
        try:
            open_barrier(storage, source=load_config(config).master_key).close()
            return True
        except BarrierError:
            return False
        finally:
            storage.close()

    with pytest.raises(backup_mod.BackupError, match="^the backup was made under another master key; configure a key"):
        restored(token_config, before, "wrong.db")
    old_copy = restored(old_config, before, "before.db")
    assert opens(old_copy, old_config) and not opens(old_copy, token_config)
    new_copy = restored(token_config, after, "after.db")
    assert opens(new_copy, token_config) and not opens(new_copy, old_config)
