"""Master-key rotation while a node serves (kms-admin master-key rotate):
every object re-sealed under a new data key, the keyring wrapped under the
new master key, resumable after a crash, recorded in the audit trail."""

from __future__ import annotations

import secrets
import subprocess
import sys

import pytest
from conftest import start_server
from sqlalchemy import create_engine, text

from kmip_core.client import KmipClient
from kmip_core.sealing.barrier import Barrier, open_barrier
from kmip_core.sealing.master_key import AesMasterKey
from kms_server.keystore import rotation
from kms_server.storage import open_storage


def admin(*args):
    return subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", *args], capture_output=True, text=True, timeout=180
    )


def new_key_file(path):
    path.write_text(secrets.token_hex(32) + "\n")
    path.chmod(0o600)
    return path


def client(server, pki):
    return KmipClient([f"127.0.0.1:{server.port}"], pki / "alice.pem", pki / "alice.key", pki / "ca.pem")


def db_url(workdir):
    return f"sqlite:///{workdir / 'data' / 'kms.db'}"


def terms(workdir) -> set[int]:
    """The data-key terms the stored material and row MACs are under."""
    engine = create_engine(db_url(workdir))
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT sealed_material, row_mac FROM kms_objects")).all()
    engine.dispose()
    out = set()
    for sealed, mac in rows:
        out.add(int.from_bytes(bytes(mac)[:4], "big"))
        if sealed is not None:
            out.add(int.from_bytes(bytes(sealed)[1:5], "big"))
    return out


def test_rotation_while_serving_then_finish_under_the_new_key(tmp_path, pki_dir):
    """Keys made before and during the rotation stay readable; after it
    every object is under the new data key; the node restarts on the new
    master key; --finish drops the old one, which then opens nothing."""
    workdir = tmp_path / "node"
    server = start_server(workdir, pki_dir)
    config = workdir / "kms.toml"
    try:
        with client(server, pki_dir) as alice:
            before = {alice.create_symmetric_key(): None for _ in range(30)}
            for uid in before:
                before[uid] = alice.get_key(uid)
            # Beside the old one, so the node keeps its audit signing key.
            new_key = new_key_file(workdir / "new.key")
            result = admin("master-key", "rotate", "--config", str(config), "--new-key-file", str(new_key), "--batch", "7")
            assert result.returncode == 0, result.stdout + result.stderr
            assert "30 objects re-sealed" in result.stdout
            assert "Traceback" not in result.stderr
            # The running node, still on the old master key, serves on.
            for uid, key in before.items():
                assert alice.get_key(uid) == key
            during = alice.create_symmetric_key()
            during_key = alice.get_key(during)
    finally:
        server.stop()
    # A key made by a node that had not re-read the keyring yet is picked
    # up by running the command again.
    again = admin("master-key", "rotate", "--config", str(config), "--new-key-file", str(new_key))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming" in again.stdout
    assert terms(workdir) == {2}

    old_config = workdir / "kms-old.toml"
    old_config.write_text(config.read_text())
    # The node's configuration now names the new key.
    server = start_server(workdir, pki_dir, master_key=new_key)
    assert str(new_key) in config.read_text()
    try:
        with client(server, pki_dir) as alice:
            for uid, key in {**before, during: during_key}.items():
                assert alice.get_key(uid) == key
    finally:
        server.stop()
    finish = admin("master-key", "rotate", "--finish", "--config", str(config))
    assert finish.returncode == 0, finish.stdout + finish.stderr
    verify = admin("db", "verify", "--config", str(config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert verify.stdout.strip().endswith("store digest ok")
    # The old master key opens nothing any more.
    stale = admin("db", "verify", "--config", str(old_config))
    assert stale.returncode == 2 and "does not open this database" in stale.stderr
    engine = create_engine(db_url(workdir))
    with engine.connect() as conn:
        operations = conn.execute(text("SELECT operation FROM kms_audit WHERE client = 'kms-admin'")).scalars().all()
    engine.dispose()
    assert {"MASTER_KEY_ROTATE_BEGIN", "MASTER_KEY_ROTATE_RESEAL", "MASTER_KEY_ROTATE_FINISH"} <= set(operations)
    audit = admin("audit", "verify", "--config", str(config))
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_an_interrupted_rotation_resumes_where_it_stopped(tmp_path, pki_dir):
    """A rotation that died after re-sealing part of the objects: running
    the command again re-seals only the rest, and nothing is lost."""
    workdir = tmp_path / "node"
    server = start_server(workdir, pki_dir)
    try:
        with client(server, pki_dir) as alice:
            keys = {}
            for _ in range(12):
                uid = alice.create_symmetric_key()
                keys[uid] = alice.get_key(uid)
    finally:
        server.stop()
    old = AesMasterKey(bytes.fromhex((workdir / "master.key").read_text()), "old")
    new_key = new_key_file(tmp_path / "new.key")
    new = AesMasterKey(bytes.fromhex(new_key.read_text()), "new")
    storage = open_storage(db_url(workdir))
    try:
        state = rotation.begin(storage, old, new)
        barrier = Barrier(state.keyring)
        left = rotation.pending(storage, barrier)
        done, refused = rotation.reseal_batch(storage, barrier, left[:5])
        assert (done, refused) == (5, [])
    finally:
        storage.close()
    assert terms(workdir) == {1, 2}
    config = workdir / "kms.toml"
    result = admin("master-key", "rotate", "--config", str(config), "--new-key-file", str(new_key))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resuming" in result.stdout and "7 objects re-sealed" in result.stdout
    assert terms(workdir) == {2}
    server = start_server(workdir, pki_dir, master_key=new_key)
    try:
        with client(server, pki_dir) as alice:
            for uid, key in keys.items():
                assert alice.get_key(uid) == key
    finally:
        server.stop()


def test_a_tampered_row_is_not_laundered_by_a_rotation(tmp_path, pki_dir):
    """Re-sealing would give an edited row a fresh MAC: it is reported and
    left under the old key, and --finish refuses while it remains."""
    workdir = tmp_path / "node"
    server = start_server(workdir, pki_dir)
    try:
        with client(server, pki_dir) as alice:
            good = alice.create_symmetric_key()
            bad = alice.create_symmetric_key()
    finally:
        server.stop()
    engine = create_engine(db_url(workdir))
    with engine.begin() as conn:
        conn.execute(text("UPDATE kms_objects SET owner = 'mallory' WHERE uid = :u"), {"u": bad})
    engine.dispose()
    config = workdir / "kms.toml"
    new_key = new_key_file(tmp_path / "new.key")
    result = admin("master-key", "rotate", "--config", str(config), "--new-key-file", str(new_key))
    assert result.returncode == 1
    assert f"object {bad}: not re-sealed" in result.stdout
    assert good not in result.stdout
    new_config = workdir / "kms-new.toml"
    new_config.write_text(config.read_text().replace(str(workdir / "master.key"), str(new_key)))
    finish = admin("master-key", "rotate", "--finish", "--config", str(new_config))
    assert finish.returncode == 2 and "still under the old data key" in finish.stderr


def test_rotating_to_the_configured_key_is_refused(tmp_path, pki_dir):
    workdir = tmp_path / "node"
    start_server(workdir, pki_dir).stop()
    result = admin(
        "master-key", "rotate", "--config", str(workdir / "kms.toml"), "--new-key-file", str(workdir / "master.key")
    )
    assert result.returncode == 2
    assert "the new master key is the one configured now" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [[], ["--new-key-file", "a", "--new-passphrase-file", "b"]])
def test_the_new_key_must_be_given_once(tmp_path, pki_dir, args):
    workdir = tmp_path / "node"
    start_server(workdir, pki_dir).stop()
    result = admin("master-key", "rotate", "--config", str(workdir / "kms.toml"), *args)
    assert result.returncode == 2
    assert "exactly one of --new-key-file" in result.stderr


def test_a_store_opened_by_the_old_release_layout_rotates_away_from_its_legacy_key(tmp_path):
    """A store made before the keyring (material sealed under the master
    key itself) rotates like any other: afterwards the old master key's
    bytes no longer open any object."""
    storage = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    key = secrets.token_bytes(32)
    legacy = Barrier(key)
    from kmip_core.sealing.barrier import CHECK_META

    with storage.transaction() as txn:
        txn.set_meta(CHECK_META, legacy.seal("barrier-check", b"kms-server master key check v1"))
    (tmp_path / "old.key").write_text(key.hex())
    barrier = open_barrier(storage, key_file=str(tmp_path / "old.key"))
    assert barrier.keyring.legacy_term == 1
    new = AesMasterKey(secrets.token_bytes(32), "new")
    state = rotation.begin(storage, AesMasterKey(key, "old"), new)
    ring = rotation.finish(storage, new, Barrier) if not rotation.pending(storage, Barrier(state.keyring)) else None
    assert ring is not None and ring.legacy_term is None and set(ring.terms) == {2}
    storage.close()
