"""Tests for kmip_core.sealing.barrier: sealing key material for storage
and opening the barrier with a key file or a passphrase."""

from __future__ import annotations

import os

import pytest

from kmip_core.sealing import barrier as barrier_module
from kmip_core.sealing import master_key as master_key_module
from kmip_core.sealing.barrier import Barrier, BarrierError, open_barrier
from kms_server.storage import open_storage

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SECRET = b"\x13\x37" * 16


@pytest.fixture
def fast_scrypt(monkeypatch):
    # Full cost is 64 MiB per derivation; the logic does not depend on it.
    monkeypatch.setattr(master_key_module, "SCRYPT_N", 2**4)


def key_file(tmp_path, key: bytes, name: str = "master.key"):
    path = tmp_path / name
    path.write_text(key.hex() + "\n")
    return str(path)


def passphrase_file(tmp_path, passphrase: bytes, name: str = "passphrase"):
    path = tmp_path / name
    path.write_bytes(passphrase)
    return str(path)


# Sealing.
def test_seal_unseal_round_trip():
    b = Barrier(KEY)
    blob = b.seal("uid-1", SECRET)
    assert b.unseal("uid-1", blob) == SECRET


def test_sealed_blob_format_and_no_plaintext():
    blob = Barrier(KEY).seal("uid-1", SECRET)
    assert blob[0] == barrier_module.VERSION
    assert len(blob) == 1 + barrier_module.NONCE_SIZE + len(SECRET) + 16
    assert SECRET not in blob and SECRET[:8] not in blob


def test_each_seal_uses_a_fresh_nonce():
    b = Barrier(KEY)
    assert b.seal("uid-1", SECRET) != b.seal("uid-1", SECRET)


def test_empty_plaintext_round_trips():
    b = Barrier(KEY)
    assert b.unseal("u", b.seal("u", b"")) == b""


def test_blob_moved_to_another_object_does_not_open():
    b = Barrier(KEY)
    blob = b.seal("uid-1", SECRET)
    with pytest.raises(BarrierError, match="uid-2"):
        b.unseal("uid-2", blob)


def test_wrong_master_key_does_not_open():
    blob = Barrier(KEY).seal("uid-1", SECRET)
    with pytest.raises(BarrierError):
        Barrier(OTHER_KEY).unseal("uid-1", blob)


@pytest.mark.parametrize(
    "tamper",
    [
        lambda blob: blob[:-1] + bytes([blob[-1] ^ 1]),  # tag
        lambda blob: blob[:20] + bytes([blob[20] ^ 1]) + blob[21:],  # ciphertext
        lambda blob: blob[:2] + bytes([blob[2] ^ 1]) + blob[3:],  # nonce
        lambda blob: b"\x02" + blob[1:],  # version
        lambda blob: blob[:28],  # shorter than version, nonce and tag
        lambda blob: b"",
    ],
    ids=["tag", "ciphertext", "nonce", "version", "truncated", "empty"],
)
def test_tampered_blob_does_not_open(tamper):
    b = Barrier(KEY)
    blob = b.seal("uid-1", SECRET)
    with pytest.raises(BarrierError):
        b.unseal("uid-1", tamper(blob))


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_master_key_must_be_32_bytes(size):
    with pytest.raises(BarrierError):
        Barrier(os.urandom(size))


# Key file mode.
def test_open_barrier_with_a_key_file_records_a_wrapped_keyring(tmp_path):
    """A new store gets a keyring of random data keys, wrapped under the
    master key: neither the master key nor a data key is stored in clear,
    and material is sealed under the data key (format 2), not the master."""
    storage = open_storage("memory://")
    b = open_barrier(storage, key_file=key_file(tmp_path, KEY))
    with storage.transaction() as txn:
        record = txn.get_meta(barrier_module.KEYRING_META)
        assert record is not None
        assert txn.get_meta(barrier_module.SALT_META) is None
        assert txn.get_meta(barrier_module.CHECK_META) is None
    data_key = b.keyring.terms[b.active_term]
    assert data_key != KEY
    for secret in (KEY, data_key):
        assert secret not in record and secret.hex().encode() not in record
    blob = b.seal("uid", SECRET)
    assert blob[0] == barrier_module.VERSION_2
    assert b.unseal("uid", blob) == SECRET
    with pytest.raises(BarrierError):
        Barrier(KEY).unseal("uid", blob)


def test_second_open_with_the_same_key_succeeds(tmp_path):
    storage = open_storage("memory://")
    first = open_barrier(storage, key_file=key_file(tmp_path, KEY))
    blob = first.seal("uid-1", SECRET)
    second = open_barrier(storage, key_file=key_file(tmp_path, KEY, "copy.key"))
    assert second.unseal("uid-1", blob) == SECRET


def test_second_open_with_a_wrong_key_is_detected(tmp_path):
    storage = open_storage("memory://")
    open_barrier(storage, key_file=key_file(tmp_path, KEY))
    with pytest.raises(BarrierError, match="does not open this database"):
        open_barrier(storage, key_file=key_file(tmp_path, OTHER_KEY, "other.key"))


@pytest.mark.parametrize(
    "content",
    ["", "00" * 31, "00" * 33, "zz" * 32, "not a key"],
    ids=["empty", "short", "long", "not-hex", "text"],
)
def test_malformed_key_file_names_the_fix(tmp_path, content):
    path = tmp_path / "bad.key"
    path.write_text(content)
    with pytest.raises(BarrierError, match="kms-admin master-key new"):
        open_barrier(open_storage("memory://"), key_file=str(path))


def test_missing_key_file(tmp_path):
    with pytest.raises(BarrierError, match="cannot read master key file"):
        open_barrier(open_storage("memory://"), key_file=str(tmp_path / "absent.key"))


def test_no_master_key_configured():
    with pytest.raises(BarrierError, match="no master key configured"):
        open_barrier(open_storage("memory://"))


# Passphrase mode.
def test_passphrase_derives_the_same_key_twice_with_the_stored_salt(
    tmp_path, fast_scrypt
):
    storage = open_storage("memory://")
    path = passphrase_file(tmp_path, b"correct horse battery staple\n")
    first = open_barrier(storage, passphrase_file=path)
    with storage.transaction() as txn:
        salt = txn.get_meta(barrier_module.SALT_META)
    assert salt is not None and len(salt) == 16
    blob = first.seal("uid-1", SECRET)

    second = open_barrier(storage, passphrase_file=path)
    assert second.unseal("uid-1", blob) == SECRET
    with storage.transaction() as txn:
        assert txn.get_meta(barrier_module.SALT_META) == salt
    # The derivation is a pure function of passphrase and salt: the derived
    # key opens the stored keyring.
    key = barrier_module.derive_from_passphrase(b"correct horse battery staple", salt)
    with storage.transaction() as txn:
        ring = barrier_module.read_keyring(txn, master_key_module.AesMasterKey(key, "derived"))
    assert Barrier(ring).unseal("uid-1", blob) == SECRET


def test_trailing_newline_of_the_passphrase_file_is_ignored(tmp_path, fast_scrypt):
    storage = open_storage("memory://")
    first = open_barrier(
        storage,
        passphrase_file=passphrase_file(tmp_path, b"correct horse battery staple\r\n"),
    )
    second = open_barrier(
        storage,
        passphrase_file=passphrase_file(
            tmp_path, b"correct horse battery staple", "p2"
        ),
    )
    assert second.unseal("u", first.seal("u", SECRET)) == SECRET


def test_each_store_gets_its_own_salt(tmp_path, fast_scrypt):
    path = passphrase_file(tmp_path, b"correct horse battery staple")
    salts = []
    for _ in range(2):
        storage = open_storage("memory://")
        open_barrier(storage, passphrase_file=path)
        with storage.transaction() as txn:
            salts.append(txn.get_meta(barrier_module.SALT_META))
    assert salts[0] != salts[1]


def test_different_salts_give_different_keys(fast_scrypt):
    a = barrier_module.derive_from_passphrase(
        b"correct horse battery staple", b"\x00" * 16
    )
    b = barrier_module.derive_from_passphrase(
        b"correct horse battery staple", b"\x01" * 16
    )
    assert len(a) == len(b) == 32 and a != b


def test_wrong_passphrase_is_detected(tmp_path, fast_scrypt):
    storage = open_storage("memory://")
    open_barrier(
        storage,
        passphrase_file=passphrase_file(tmp_path, b"correct horse battery staple"),
    )
    with pytest.raises(BarrierError, match="does not open this database"):
        open_barrier(
            storage,
            passphrase_file=passphrase_file(
                tmp_path, b"correct horse battery stapler", "p2"
            ),
        )


def test_short_passphrase_is_refused(tmp_path, fast_scrypt):
    storage = open_storage("memory://")
    with pytest.raises(BarrierError, match="shorter than 12"):
        open_barrier(storage, passphrase_file=passphrase_file(tmp_path, b"short\n"))
    with storage.transaction() as txn:
        assert txn.get_meta(barrier_module.CHECK_META) is None


def test_missing_passphrase_file(tmp_path):
    with pytest.raises(BarrierError, match="cannot read passphrase file"):
        open_barrier(
            open_storage("memory://"), passphrase_file=str(tmp_path / "absent")
        )


def test_key_file_and_passphrase_are_not_interchangeable(tmp_path, fast_scrypt):
    storage = open_storage("memory://")
    open_barrier(
        storage,
        passphrase_file=passphrase_file(tmp_path, b"correct horse battery staple"),
    )
    with pytest.raises(BarrierError):
        open_barrier(storage, key_file=key_file(tmp_path, KEY))


# Stores made before the keyring, and rotations made by another process.
def _legacy_store(tmp_path):
    """A store as the release before the keyring left it: a format-1 check
    record and objects sealed under the master key itself."""
    storage = open_storage("memory://")
    legacy = Barrier(KEY)
    with storage.transaction() as txn:
        txn.set_meta(barrier_module.CHECK_META, legacy.seal("barrier-check", b"kms-server master key check v1"))
    return storage, legacy.seal("uid-old", SECRET)


def test_a_store_made_before_the_keyring_opens_with_its_master_key(tmp_path):
    """Its format-1 blobs open through the keyring's legacy term; new
    material is sealed in format 2."""
    storage, old_blob = _legacy_store(tmp_path)
    b = open_barrier(storage, key_file=key_file(tmp_path, KEY))
    assert b.unseal("uid-old", old_blob) == SECRET
    assert b.seal("uid-new", SECRET)[0] == barrier_module.VERSION_2
    again = open_barrier(storage, key_file=key_file(tmp_path, KEY))
    assert again.unseal("uid-old", old_blob) == SECRET


def test_a_store_made_before_the_keyring_refuses_a_wrong_master_key(tmp_path):
    storage, _ = _legacy_store(tmp_path)
    with pytest.raises(BarrierError, match="does not open this database"):
        open_barrier(storage, key_file=key_file(tmp_path, OTHER_KEY))
    with storage.transaction() as txn:
        assert txn.get_meta(barrier_module.KEYRING_META) is None


def test_a_blob_under_a_term_the_node_has_not_read_is_unknown_until_refresh(tmp_path):
    """Another process adds a data key and makes it active; a running
    barrier reports the term as unknown, and a refresh learns it."""
    storage = open_storage("memory://")
    path = key_file(tmp_path, KEY)
    running = open_barrier(storage, key_file=path)
    other = open_barrier(storage, key_file=path)
    ring = other.keyring
    ring.terms[2] = os.urandom(32)
    ring.active = 2
    with storage.transaction() as txn:
        barrier_module.write_keyring(txn, ring, [master_key_module.AesMasterKey(KEY, "k")])
    newer = Barrier(ring).seal("uid-1", SECRET)
    with pytest.raises(barrier_module.UnknownTerm):
        running.unseal("uid-1", newer)
    with storage.transaction() as txn:
        assert running.refresh(txn, force=True)
    assert running.unseal("uid-1", newer) == SECRET
    assert running.active_term == 2


def test_a_tampered_keyring_record_does_not_open(tmp_path):
    storage = open_storage("memory://")
    path = key_file(tmp_path, KEY)
    open_barrier(storage, key_file=path)
    with storage.transaction() as txn:
        record = bytearray(txn.get_meta(barrier_module.KEYRING_META))
        record[-20] ^= 1
        txn.set_meta(barrier_module.KEYRING_META, bytes(record))
    with pytest.raises(BarrierError):
        open_barrier(storage, key_file=path)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_openers_of_a_new_store_at_the_same_moment_share_one_keyring(tmp_path, backend, request):
    """A node's worker processes (or a cluster's nodes) that open a new
    store together take turns: one makes the keyring, the others open it,
    so what one seals every other unseals. Without the turn each made its
    own keyring and the last write won (seen on PostgreSQL at start-up)."""
    import threading

    if backend == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'kms.db'}"
    storages = [open_storage(url) for _ in range(6)]
    try:
        start = threading.Barrier(len(storages))
        opened: list[Barrier] = []
        errors: list[BaseException] = []
        # Written once, before the openers start: a thread rewriting the
        # file while another reads it would see it empty.
        master = key_file(tmp_path, KEY)

        def open_one(storage) -> None:
            start.wait()
            try:
                opened.append(open_barrier(storage, key_file=master))
            except BaseException as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=open_one, args=(s,)) for s in storages]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == [] and len(opened) == len(storages)
        blob = opened[0].seal("uid-1", SECRET)
        assert all(b.unseal("uid-1", blob) == SECRET for b in opened)
        assert len({b.keyring.digest_key for b in opened}) == 1
    finally:
        for storage in storages:
            storage.close()
