"""A new object prepared outside its write transaction (Keystore.prepare_object,
then store_object): what is stored is what new_object stored, also when the
keyring moves to another data key in between, and a refused store changes
nothing. On a real SQLite file with a master-key barrier."""

from __future__ import annotations

import os

import pytest
from kmip.core.enums import CryptographicAlgorithm, ObjectType

from kmip_core import errors
from kmip_core.policy import Action, Principal, Role
from kmip_core.sealing import barrier as barrier_module
from kmip_core.sealing import master_key as master_key_module
from kmip_core.sealing.barrier import open_barrier
from kms_server.keystore import attributes as attrs
from kms_server.keystore import row_auth
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import Material
from kms_server.storage import open_storage

KEY = bytes(range(32))
SECRET = bytes(range(100, 132))
NOW = 1_800_000_000
ALICE = Principal("alice")


@pytest.fixture
def store(tmp_path):
    key_path = tmp_path / "master.key"
    key_path.write_text(KEY.hex() + "\n")
    storage = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    barrier = open_barrier(storage, key_file=str(key_path))
    keystore = Keystore(storage, barrier)
    yield storage, barrier, keystore, str(key_path)
    storage.close()


def _attributes() -> dict:
    return {
        "Cryptographic Algorithm": [attrs.make("Cryptographic Algorithm", CryptographicAlgorithm.AES.value)],
        "Cryptographic Length": [attrs.make("Cryptographic Length", 256)],
        "Fresh": [attrs.make("Fresh", True)],
    }


def _prepare(keystore: Keystore, principal: Principal = ALICE, uid: str | None = None):
    return keystore.prepare_object(
        principal, ObjectType.SYMMETRIC_KEY, _attributes(), Material(SECRET), NOW, uid=uid
    )


def _rotate_elsewhere(storage, key_path: str) -> int:
    """Another process adds a data key and makes it active (as
    `kms-admin master-key rotate` begins); returns the new term."""
    other = open_barrier(storage, key_file=key_path)
    ring = other.keyring
    term = max(ring.terms) + 1
    ring.terms[term] = os.urandom(32)
    ring.rotating_from, ring.active = ring.active, term
    with storage.transaction() as txn:
        barrier_module.write_keyring(txn, ring, [master_key_module.AesMasterKey(KEY, "k")])
    return term


def _verified_store(storage, barrier) -> row_auth.VerifyReport:
    with storage.transaction(read_only=True) as txn:
        return row_auth.verify_store(txn, barrier)


def test_a_prepared_object_is_stored_as_prepared_and_serves_its_key(store):
    storage, barrier, keystore, _ = store
    prepared = _prepare(keystore)
    # Sealed and authenticated before any transaction.
    assert prepared.stored is not None and prepared.stored.row_mac is not None
    sealed, mac = prepared.stored.sealed_material, prepared.stored.row_mac
    assert SECRET not in sealed
    with keystore.transaction() as txn:
        obj = keystore.store_object(txn, prepared)
    assert obj.version == 1 and obj.row_mac == mac
    with storage.transaction(read_only=True) as txn:
        row = txn.get_object(obj.uid)
        loaded = keystore.load(txn, ALICE, obj.uid, Action.READ_MATERIAL, NOW)
    assert row is not None and row.sealed_material == sealed and row.row_mac == mac
    assert keystore.material(loaded).data == SECRET
    assert loaded.value("State") is not None  # a stateful type starts PRE_ACTIVE
    report = _verified_store(storage, barrier)
    assert report.ok and report.objects == 1


def test_an_object_prepared_before_a_rotation_is_stored_under_the_new_data_key(store, monkeypatch):
    """The keyring moved to term 2 between preparing and storing: the object
    is sealed and authenticated again under term 2, so the rotation finds
    nothing left under the key it retires."""
    storage, barrier, keystore, key_path = store
    prepared = _prepare(keystore)
    old_term = barrier.active_term
    assert barrier.blob_term(prepared.stored.sealed_material) == old_term
    new_term = _rotate_elsewhere(storage, key_path)
    monkeypatch.setattr(barrier_module, "REFRESH_SECONDS", 0)  # the node re-reads at its next write
    with keystore.transaction() as txn:
        obj = keystore.store_object(txn, prepared)
    assert barrier.active_term == new_term
    with storage.transaction(read_only=True) as txn:
        row = txn.get_object(obj.uid)
        loaded = keystore.load(txn, ALICE, obj.uid, Action.READ_MATERIAL, NOW)
    assert row is not None
    assert barrier.blob_term(row.sealed_material) == new_term
    assert barrier.mac_term(row.row_mac) == new_term
    assert keystore.material(loaded).data == SECRET
    assert _verified_store(storage, barrier).ok


def test_a_prepared_object_whose_identifier_exists_is_refused_and_changes_nothing(store):
    storage, barrier, keystore, _ = store
    with keystore.transaction() as txn:
        first = keystore.store_object(txn, _prepare(keystore, uid="uid-1"))
    again = _prepare(keystore, uid="uid-1")
    with pytest.raises(errors.ObjectAlreadyExists), keystore.transaction() as txn:
        keystore.store_object(txn, again)
    with storage.transaction(read_only=True) as txn:
        row = txn.get_object("uid-1")
    assert row is not None and row.row_mac == first.row_mac and row.version == 1
    report = _verified_store(storage, barrier)
    assert report.ok and report.objects == 1


def test_preparing_is_refused_to_a_caller_who_may_not_create(store):
    storage, barrier, keystore, _ = store
    with pytest.raises(errors.KmsError):
        _prepare(keystore, principal=Principal("audit", role=Role.AUDITOR))
    assert _verified_store(storage, barrier).objects == 0


# An update built from a row read earlier (Keystore.save_if_unchanged, the
# first Get clearing Fresh).
def _stored_key(keystore: Keystore):
    with keystore.transaction() as txn:
        return keystore.store_object(txn, _prepare(keystore))


def _read(keystore: Keystore, uid: str):
    with keystore.transaction(read_only=True) as txn:
        return keystore.load(txn, ALICE, uid, Action.READ_MATERIAL, NOW)


def test_an_update_of_a_row_read_earlier_is_written_when_the_row_is_unchanged(store):
    storage, barrier, keystore, _ = store
    uid = _stored_key(keystore).uid
    obj = _read(keystore, uid)
    obj.set_value("Fresh", False)
    assert keystore.save_if_unchanged(obj, NOW + 5)
    assert obj.version == 2
    again = _read(keystore, uid)
    assert again.version == 2 and again.value("Fresh") is False
    assert again.value("Last Change Date") == NOW + 5
    assert _verified_store(storage, barrier).ok


def test_an_update_of_a_row_changed_since_it_was_read_writes_nothing(store):
    """Another request changed the row between the read and the write: the
    update is refused whole (no lost update), and the other change stays."""
    storage, barrier, keystore, _ = store
    uid = _stored_key(keystore).uid
    stale = _read(keystore, uid)
    with keystore.transaction() as txn:
        other = keystore.load(txn, ALICE, uid, Action.READ_MATERIAL, NOW, for_update=True)
        other.set_value("Contact Information", "changed elsewhere")
        keystore.save(txn, other, NOW + 1)
    stale.set_value("Fresh", False)
    assert not keystore.save_if_unchanged(stale, NOW + 2)
    current = _read(keystore, uid)
    assert current.version == 2
    assert current.value("Contact Information") == "changed elsewhere"
    assert current.value("Fresh") is True
    assert _verified_store(storage, barrier).ok


def test_an_update_built_before_a_rotation_is_authenticated_under_the_new_data_key(store, monkeypatch):
    storage, barrier, keystore, key_path = store
    uid = _stored_key(keystore).uid
    obj = _read(keystore, uid)
    obj.set_value("Fresh", False)
    new_term = _rotate_elsewhere(storage, key_path)
    monkeypatch.setattr(barrier_module, "REFRESH_SECONDS", 0)
    assert keystore.save_if_unchanged(obj, NOW + 5)
    with storage.transaction(read_only=True) as txn:
        row = txn.get_object(uid)
    assert row is not None and barrier.mac_term(row.row_mac) == new_term
    assert _read(keystore, uid).value("Fresh") is False
    assert _verified_store(storage, barrier).ok


def test_objects_stored_by_works_waiting_together_are_each_remembered_at_their_version(store):
    """Two writes started in the reactor thread (ReactorWrites.start) wait
    for the writer's turn inside their keystore transactions, then run in
    one batch: each transaction's row versions are its own (a ContextVar,
    not a thread-local the other would overwrite), so both objects are
    remembered at version 1 once the batch commits, and a read of either
    at an older version is refused as a rollback."""
    from twisted.internet import task

    from kmip_core.nonblocking import in_reactor
    from kms_server.storage.reactor_writes import ReactorWrites

    storage, _, keystore, _ = store
    clock = task.Clock()
    writes = ReactorWrites(storage.reactor_batches(), clock, lambda f: pytest.fail("no pool thread needed"))

    def create(uid: str) -> str:
        with in_reactor():
            prepared = _prepare(keystore, uid=uid)
            with keystore.transaction() as txn:  # waits here for the batch
                keystore.store_object(txn, prepared)
        return uid

    waiting = [writes.start(lambda u=u: create(u)) for u in ("obj-a", "obj-b")]
    assert writes.queued == 2, "both wait for the batch"
    done: list = []
    for d in waiting:
        d.addCallback(done.append)
    clock.advance(0)
    assert done == ["obj-a", "obj-b"]
    for uid in ("obj-a", "obj-b"):
        with pytest.raises(row_auth.RowIntegrityError, match="rolled back"):
            keystore.seen.check(uid, 0)
