"""Tests for kms_server.keystore.row_auth: row MACs, the store digest, the
versions a node remembers, the adoption of rows made by the previous
release, and what the audit trail learns of a refused row.

Rows are edited behind the server's back the way an attacker with write
access to the database would: in the in-memory fake by replacing its state,
in SQLite with SQL statements. Requests go to the keystore directly or
through the Dispatcher, never over the wire; the end-to-end checks against
a real node are in tests/integration/test_row_integrity.py.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import json
import os
import time

import pytest
from kmip.core.enums import (
    CryptographicAlgorithm,
    CryptographicUsageMask,
    KeyFormatType,
    ObjectType,
    Operation,
    ResultReason,
    ResultStatus,
    RevocationReasonCode,
    State,
    Tags,
    WrappingMethod,
)
from sqlalchemy import create_engine, text

from kmip_core import errors, ttlv
from kmip_core.audit.record import AuditDraft, client_fields
from kmip_core.client import messages
from kmip_core.db import migrations
from kmip_core.policy import Action, Principal, Role
from kmip_core.sealing.barrier import CHECK_META, Barrier, BarrierError, Keyring, UnknownTerm, open_barrier
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher
from kms_server.audit.trail import AuditTrail, iter_records
from kms_server.keystore import attributes as attrs
from kms_server.keystore import row_auth, verified_rows
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject, Material
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage, schema
from kms_server.storage.base import StorageError, StoredAttribute, StoredObject

T = Tags
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000
ALICE = Principal("alice")
MALLORY = Principal("mallory")
ADMIN = Principal("admin", Role.ADMINISTRATOR)
USAGE = (
    CryptographicUsageMask.ENCRYPT.value | CryptographicUsageMask.DECRYPT.value | CryptographicUsageMask.WRAP_KEY.value
)


# --- helpers -------------------------------------------------------------------------


def _insert_attributes(conn, stored: StoredObject) -> None:
    """The row's attributes as raw SQL writes them (with their value digests)."""
    for a in stored.attributes:
        conn.execute(
            text(
                "INSERT INTO kms_attributes (uid, name, idx, value, value_digest) "
                "VALUES (:uid, :name, :idx, :value, :digest)"
            ),
            {
                "uid": stored.uid,
                "name": a.name,
                "idx": a.index,
                "value": a.value,
                "digest": hashlib.sha256(a.value).digest(),
            },
        )


class MemoryTamper:
    """Writes to the in-memory fake's state as storage itself would hold
    it, outside any transaction and without the keystore."""

    def __init__(self, storage):
        self.storage = storage

    @property
    def _state(self):
        return self.storage._state

    def put_row(self, stored: StoredObject) -> None:
        """Store `stored` exactly as given (version and MAC included)."""
        row = copy.deepcopy(stored)
        existing = self._state.objects.get(row.uid)
        if existing is not None:
            row.sequence = existing.sequence
        else:
            row.sequence = self._state.next_sequence
            self._state.next_sequence += 1
        self._state.objects[row.uid] = row

    def delete_row(self, uid: str) -> None:
        del self._state.objects[uid]

    def set_owner(self, uid: str, owner: str) -> None:
        self._state.objects[uid] = dataclasses.replace(self._state.objects[uid], owner=owner)

    def set_column(self, uid: str, **values) -> None:
        self._state.objects[uid] = dataclasses.replace(self._state.objects[uid], **values)

    def set_attribute_index(self, uid: str, name: str, index: int) -> None:
        row = self._state.objects[uid]
        attributes = [StoredAttribute(a.name, index, a.value) if a.name == name else a for a in row.attributes]
        self._state.objects[uid] = dataclasses.replace(row, attributes=attributes)

    def set_attribute_value(self, uid: str, name: str, value: bytes) -> None:
        row = self._state.objects[uid]
        attributes = [StoredAttribute(a.name, a.index, value) if a.name == name else a for a in row.attributes]
        self._state.objects[uid] = dataclasses.replace(row, attributes=attributes)

    def delete_attribute(self, uid: str, name: str) -> None:
        row = self._state.objects[uid]
        self._state.objects[uid] = dataclasses.replace(row, attributes=[a for a in row.attributes if a.name != name])

    def delete_meta(self, key: str) -> None:
        del self._state.meta[key]


class SqlTamper:
    """SQL statements on the SQLite file, as an attacker with write access
    to the database would run them."""

    def __init__(self, storage):
        self.engine = storage.engine

    def put_row(self, stored: StoredObject) -> None:
        row = {
            "uid": stored.uid,
            "owner": stored.owner,
            "version": stored.version,
            "sealed_material": stored.sealed_material,
            "row_mac": stored.row_mac,
        }
        with self.engine.begin() as conn:
            updated = conn.execute(
                text(
                    "UPDATE kms_objects SET owner = :owner, version = :version, "
                    "sealed_material = :sealed_material, row_mac = :row_mac WHERE uid = :uid"
                ),
                row,
            ).rowcount
            if not updated:
                conn.execute(
                    text(
                        "INSERT INTO kms_objects (uid, owner, version, sealed_material, created_at, row_mac) "
                        "VALUES (:uid, :owner, :version, :sealed_material, 0, :row_mac)"
                    ),
                    row,
                )
            conn.execute(text("DELETE FROM kms_attributes WHERE uid = :uid"), row)
            _insert_attributes(conn, stored)

    def delete_row(self, uid: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM kms_objects WHERE uid = :uid"), {"uid": uid})

    def set_owner(self, uid: str, owner: str) -> None:
        self.set_column(uid, owner=owner)

    def set_column(self, uid: str, **values) -> None:
        assignments = ", ".join(f"{column} = :{column}" for column in values)
        with self.engine.begin() as conn:
            conn.execute(text(f"UPDATE kms_objects SET {assignments} WHERE uid = :uid"), {**values, "uid": uid})

    def set_attribute_index(self, uid: str, name: str, index: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                text("UPDATE kms_attributes SET idx = :idx WHERE uid = :uid AND name = :name"),
                {"idx": index, "uid": uid, "name": name},
            )

    def set_attribute_value(self, uid: str, name: str, value: bytes) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                text(
                    "UPDATE kms_attributes SET value = :value, value_digest = :digest "
                    "WHERE uid = :uid AND name = :name"
                ),
                {"value": value, "digest": hashlib.sha256(value).digest(), "uid": uid, "name": name},
            )

    def delete_attribute(self, uid: str, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM kms_attributes WHERE uid = :u AND name = :n"), {"u": uid, "n": name})

    def delete_meta(self, key: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(text("DELETE FROM kms_meta WHERE key = :key"), {"key": key})


@pytest.fixture(params=["memory", "sqlite"])
def backend(request, tmp_path):
    """(storage, tamper) over the in-memory fake or a SQLite file."""
    if request.param == "memory":
        storage = open_storage("memory://")
        yield storage, MemoryTamper(storage)
    else:
        storage = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
        yield storage, SqlTamper(storage)
    storage.close()


@pytest.fixture
def whole_reads(monkeypatch):
    """No row is taken as current because the store digest has not moved
    (keystore/verified_rows.py): every read reads the row, as on a store
    whose reads see no single snapshot. For the checks of what such a read
    finds; the digest's own rule has tests of its own."""
    monkeypatch.setattr(verified_rows, "RECHECK_SECONDS", 0.0)


@pytest.fixture
def memory():
    storage = open_storage("memory://")
    return storage, MemoryTamper(storage)


def key_attributes(name: str | None = None) -> dict:
    found = {
        "Cryptographic Algorithm": [attrs.make("Cryptographic Algorithm", CryptographicAlgorithm.AES.value)],
        "Cryptographic Length": [attrs.make("Cryptographic Length", 256)],
        "Cryptographic Usage Mask": [attrs.make("Cryptographic Usage Mask", USAGE)],
    }
    if name is not None:
        found["x-Name"] = [ttlv.text(attrs.VALUE_TAG, name)]
    return found


def create_key(keystore: Keystore, principal: Principal = ALICE, secret: bytes | None = None) -> str:
    with keystore.transaction() as txn:
        obj = keystore.new_object(
            txn, principal, ObjectType.SYMMETRIC_KEY, key_attributes(), Material(secret or os.urandom(32)), NOW
        )
    return obj.uid


def change(keystore: Keystore, uid: str, usage: int, principal: Principal = ALICE) -> None:
    """One write of the object through the keystore (its row version moves on)."""
    with keystore.transaction() as txn:
        obj = keystore.load(txn, principal, uid, Action.MANAGE, NOW, for_update=True)
        obj.set_value("Cryptographic Usage Mask", usage)
        keystore.save(txn, obj, NOW)


def stored_row(storage, uid: str) -> StoredObject:
    with storage.transaction(read_only=True) as txn:
        return txn.get_object(uid)


def load(keystore: Keystore, uid: str, principal: Principal = ALICE, action: Action = Action.READ_ATTRIBUTES):
    with keystore.transaction(read_only=True) as txn:
        return keystore.load(txn, principal, uid, action, NOW)


def verify_store(storage, barrier) -> row_auth.VerifyReport:
    with storage.transaction(read_only=True) as txn:
        return row_auth.verify_store(txn, barrier)


def digest_meta(storage) -> bytes | None:
    with storage.transaction(read_only=True) as txn:
        return txn.get_meta(row_auth.DIGEST_META)


def set_digest_meta(storage, value: bytes) -> None:
    with storage.transaction() as txn:
        txn.set_meta(row_auth.DIGEST_META, value)


# --- 1. sign and verify ---------------------------------------------------------------


def signed_row(barrier: Barrier, **changes) -> StoredObject:
    row = StoredObject(
        uid="uid-1",
        owner="alice",
        sealed_material=b"\x02sealed-blob",
        attributes=[
            StoredAttribute("Name", 0, b"name-0"),
            StoredAttribute("Name", 1, b"name-1"),
            StoredAttribute("State", 0, b"\x01"),
            StoredAttribute("x-Tag", 0, b""),
        ],
        version=3,
    )
    row = dataclasses.replace(row, **changes)
    row_auth.sign(barrier, row, row.version)
    return row


def _replace_attribute(row: StoredObject, position: int, **changes) -> None:
    row.attributes[position] = row.attributes[position]._replace(**changes)


EDITS = {
    "uid": lambda r: setattr(r, "uid", "uid-2"),
    "owner": lambda r: setattr(r, "owner", "mallory"),
    "owner emptied": lambda r: setattr(r, "owner", ""),
    "version up": lambda r: setattr(r, "version", r.version + 1),
    "version down": lambda r: setattr(r, "version", r.version - 1),
    "material changed": lambda r: setattr(r, "sealed_material", r.sealed_material[:-1] + b"X"),
    "material removed (None)": lambda r: setattr(r, "sealed_material", None),
    "material emptied (b'')": lambda r: setattr(r, "sealed_material", b""),
    "attribute value": lambda r: _replace_attribute(r, 2, value=b"\x02"),
    "attribute value emptied": lambda r: _replace_attribute(r, 0, value=b""),
    "empty attribute value filled": lambda r: _replace_attribute(r, 3, value=b"\x00"),
    "attribute name": lambda r: _replace_attribute(r, 2, name="Statf"),
    "attribute index": lambda r: _replace_attribute(r, 1, index=2),
    "attribute values swapped": lambda r: r.attributes.__setitem__(
        slice(0, 2), [StoredAttribute("Name", 0, b"name-1"), StoredAttribute("Name", 1, b"name-0")]
    ),
    "attribute added": lambda r: r.attributes.append(StoredAttribute("Extractable", 0, b"\x01")),
    "attribute copied": lambda r: r.attributes.append(StoredAttribute("Name", 2, b"name-0")),
    "attribute removed": lambda r: r.attributes.pop(2),
    "value moved between attributes": lambda r: (
        _replace_attribute(r, 2, value=b"name-0"),
        _replace_attribute(r, 0, value=b"\x01"),
    ),
}


def test_a_signed_row_verifies_whatever_order_its_attributes_come_in():
    """The MAC covers the attributes as a set: a backend that returns them
    in another order serves the same row."""
    b = Barrier(KEY)
    row = signed_row(b)
    row_auth.verify(b, row)
    row.attributes.reverse()
    row_auth.verify(b, row)


def test_the_bytes_a_row_mac_covers_are_pinned():
    """The layout of what a row MAC covers, written out by hand: a change to
    it would make every row a database holds fail its MAC."""
    stored = StoredObject(
        uid="u-1",
        owner="alice",
        sealed_material=b"\x07\x07\x07",
        attributes=[
            StoredAttribute(name="b", index=1, value=b"v2"),
            StoredAttribute(name="a", index=0, value=b""),
            StoredAttribute(name="b", index=-1, value=b"x"),
        ],
    )
    expected = b"".join(
        [
            b"kms-row:v1\x00",
            b"\x00\x00\x00\x03u-1",
            b"\x00\x00\x00\x05alice",
            (7).to_bytes(8, "big"),
            b"\x01\x00\x00\x00\x03\x07\x07\x07",
            b"\x00\x00\x00\x03",  # three attributes, by name then index
            b"\x00\x00\x00\x01a" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00",
            b"\x00\x00\x00\x01b" + b"\xff\xff\xff\xff" + b"\x00\x00\x00\x01x",
            b"\x00\x00\x00\x01b" + b"\x00\x00\x00\x01" + b"\x00\x00\x00\x02v2",
        ]
    )
    assert row_auth.message(stored, 7) == expected
    destroyed = dataclasses.replace(stored, sealed_material=None, attributes=[])
    assert row_auth.message(destroyed, 7) == expected[:35] + b"\x00" + b"\x00\x00\x00\x00"


def test_a_row_without_material_verifies_and_is_distinct_from_empty_material():
    """None (destroyed) and b"" are different rows under the MAC."""
    b = Barrier(KEY)
    destroyed = signed_row(b, sealed_material=None)
    row_auth.verify(b, destroyed)
    with pytest.raises(row_auth.RowIntegrityError):
        row_auth.verify(b, dataclasses.replace(destroyed, sealed_material=b""))
    empty = signed_row(b, sealed_material=b"")
    row_auth.verify(b, empty)
    with pytest.raises(row_auth.RowIntegrityError):
        row_auth.verify(b, dataclasses.replace(empty, sealed_material=None))


@pytest.mark.parametrize("edit", list(EDITS), ids=list(EDITS))
def test_any_one_change_to_a_row_fails_its_mac(edit):
    """Each field the keystore reads from a row is covered: changing one
    makes verify raise RowIntegrityError naming the object."""
    b = Barrier(KEY)
    row = signed_row(b)
    row_auth.verify(b, row)
    EDITS[edit](row)
    with pytest.raises(row_auth.RowIntegrityError, match="does not match its MAC") as raised:
        row_auth.verify(b, row)
    assert raised.value.uid == row.uid


def test_a_destroyed_row_given_material_again_fails_its_mac():
    """A row signed without material (None) does not verify with a blob
    written into it."""
    b = Barrier(KEY)
    row = signed_row(b, sealed_material=None)
    row.sealed_material = b"\x02sealed-blob"
    with pytest.raises(row_auth.RowIntegrityError):
        row_auth.verify(b, row)


def test_a_mac_moved_to_another_row_fails():
    """Two authentic rows: the MAC of one does not authenticate the other."""
    b = Barrier(KEY)
    first = signed_row(b)
    second = signed_row(b, uid="uid-2", owner="mallory")
    second.row_mac = first.row_mac
    with pytest.raises(row_auth.RowIntegrityError, match="does not match its MAC"):
        row_auth.verify(b, second)


def test_a_row_signed_for_the_next_version_does_not_verify_at_its_current_one():
    """The keystore signs a row for the version it is about to get; a row
    whose version was not moved on with it is refused."""
    b = Barrier(KEY)
    row = signed_row(b)
    row_auth.sign(b, row, row.version + 1)
    with pytest.raises(row_auth.RowIntegrityError):
        row_auth.verify(b, row)
    row.version += 1
    row_auth.verify(b, row)


def test_a_row_without_a_mac_fails():
    """A row with no MAC (written outside the server) is refused, never
    taken as unauthenticated-but-fine."""
    b = Barrier(KEY)
    row = signed_row(b)
    row.row_mac = None
    with pytest.raises(row_auth.RowIntegrityError, match="carries no MAC"):
        row_auth.verify(b, row)


@pytest.mark.parametrize("mac", [b"", b"\x00" * 4, b"\x00\x00\x00\x01" + b"\x00" * 31, b"\x00" * 100])
def test_a_malformed_mac_fails(mac):
    """A MAC of the wrong length is a failure, not a crash."""
    b = Barrier(KEY)
    row = signed_row(b)
    row.row_mac = mac
    with pytest.raises(row_auth.RowIntegrityError):
        row_auth.verify(b, row)


def test_a_mac_under_another_master_key_fails():
    """Same term number, other key: the MAC does not match."""
    row = signed_row(Barrier(OTHER_KEY))
    with pytest.raises(row_auth.RowIntegrityError, match="does not match its MAC"):
        row_auth.verify(Barrier(KEY), row)


def test_a_mac_under_a_term_the_keyring_lacks_raises_unknown_term():
    """A row authenticated under a data key this node has not read is
    UnknownTerm (the keystore then re-reads the keyring), not a plain
    failure; once the term is known the row verifies."""
    ring = Keyring(terms={1: KEY, 2: OTHER_KEY}, active=2, digest_key=os.urandom(32))
    row = signed_row(Barrier(ring))
    old = Keyring(terms={1: KEY}, active=1, digest_key=ring.digest_key)
    with pytest.raises(UnknownTerm):
        row_auth.verify(Barrier(old), row)
    row_auth.verify(Barrier(ring), row)


# --- 2. the store digest ----------------------------------------------------------------


def test_keystore_writes_keep_the_store_digest_whole(backend):
    """New objects and saves move the digest with the rows, so an untouched
    store verifies, with every object counted."""
    storage, _ = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    assert verify_store(storage, barrier).ok
    uids = [create_key(keystore) for _ in range(3)]
    change(keystore, uids[0], CryptographicUsageMask.ENCRYPT.value)
    change(keystore, uids[0], CryptographicUsageMask.DECRYPT.value)
    change(keystore, uids[2], CryptographicUsageMask.ENCRYPT.value)
    report = verify_store(storage, barrier)
    assert report.ok, report
    assert report.objects == 3
    assert json.loads(digest_meta(storage))["count"] == 3


def kmip(dispatcher: Dispatcher, principal: Principal, operation: Operation, items) -> messages.Response:
    request = messages.request_message((1, 4), operation, items)
    return messages.parse_response(dispatcher.handle(request, ConnectionInfo(principal, "test")), operation)


def kmip_ok(dispatcher, principal, operation, items) -> ttlv.Item:
    response = kmip(dispatcher, principal, operation, items)
    assert response.status == ResultStatus.SUCCESS, (response.reason, response.message)
    return response.payload


def kmip_create(dispatcher: Dispatcher, principal: Principal = ALICE) -> str:
    pairs = [
        ("Cryptographic Algorithm", CryptographicAlgorithm.AES),
        ("Cryptographic Length", 256),
        ("Cryptographic Usage Mask", USAGE),
    ]
    payload = kmip_ok(
        dispatcher,
        principal,
        Operation.CREATE,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            ttlv.structure(T.TEMPLATE_ATTRIBUTE.value, messages.attribute_items((1, 4), pairs)),
        ],
    )
    return payload.get(T.UNIQUE_IDENTIFIER.value)


def uid_item(uid: str) -> ttlv.Item:
    return ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)


def test_kmip_operations_keep_the_store_digest_whole(backend):
    """Create, Activate, Get (which clears Fresh), Revoke and Destroy each
    leave a store that verifies."""
    storage, _ = backend
    barrier = Barrier(KEY)
    dispatcher = Dispatcher(Keystore(storage, barrier), OPERATIONS)
    uid = kmip_create(dispatcher)
    assert verify_store(storage, barrier).ok
    steps = [
        (Operation.ACTIVATE, [uid_item(uid)]),
        (Operation.GET, [uid_item(uid), ttlv.enumeration(T.KEY_FORMAT_TYPE.value, KeyFormatType.RAW.value)]),
        (
            Operation.REVOKE,
            [
                uid_item(uid),
                ttlv.structure(
                    T.REVOCATION_REASON.value,
                    [
                        ttlv.enumeration(
                            T.REVOCATION_REASON_CODE.value, RevocationReasonCode.CESSATION_OF_OPERATION.value
                        )
                    ],
                ),
            ],
        ),
        (Operation.DESTROY, [uid_item(uid)]),
    ]
    for operation, items in steps:
        before = stored_row(storage, uid).version
        kmip_ok(dispatcher, ALICE, operation, items)
        assert stored_row(storage, uid).version > before, operation
        report = verify_store(storage, barrier)
        assert report.ok, (operation, report)
    assert stored_row(storage, uid).sealed_material is None


def test_a_row_written_back_at_an_older_version_passes_its_mac_but_not_the_digest(backend):
    """An old copy of a row (a revocation undone) is self-consistent: its
    own MAC verifies, but the rows no longer add up to the digest."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    other = create_key(keystore)
    uid = create_key(keystore)
    old = stored_row(storage, uid)
    assert old.version == 1
    change(keystore, uid, CryptographicUsageMask.ENCRYPT.value)
    assert verify_store(storage, barrier).ok
    tamper.put_row(old)
    replayed = stored_row(storage, uid)
    assert replayed.version == 1
    row_auth.verify(barrier, replayed)
    report = verify_store(storage, barrier)
    assert report.failures == []
    assert report.objects == 2
    assert report.digest_problem is not None and "rolled back" in report.digest_problem
    # The other row is untouched and still passes on its own.
    row_auth.verify(barrier, stored_row(storage, other))


def test_a_deleted_row_is_reported_by_the_digest(backend):
    """A row removed in storage leaves every other row intact, but the
    digest counts one object more than the store holds."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uids = [create_key(keystore) for _ in range(2)]
    tamper.delete_row(uids[1])
    report = verify_store(storage, barrier)
    assert report.failures == []
    assert report.digest_problem is not None
    assert "counts 2 objects, the database holds 1" in report.digest_problem


def test_a_copy_of_a_row_under_another_uid_is_reported(backend):
    """The copy fails its MAC (the uid is covered) and the count is off."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    copied = dataclasses.replace(stored_row(storage, uid), uid="copied-uid")
    tamper.put_row(copied)
    report = verify_store(storage, barrier)
    assert [failed for failed, _ in report.failures] == ["copied-uid"]
    assert "does not match its MAC" in report.failures[0][1]
    assert report.digest_problem is not None and "counts 1 objects" in report.digest_problem
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, "copied-uid")


def _bump_sum(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["sum"] = f"{(int(doc['sum'], 16) + 1) % 2**256:064x}"
    return json.dumps(doc).encode()


def _bump_count(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["count"] += 1
    return json.dumps(doc).encode()


def _flip_mac(raw: bytes) -> bytes:
    doc = json.loads(raw)
    doc["mac"] = ("0" if doc["mac"][0] != "0" else "1") + doc["mac"][1:]
    return json.dumps(doc).encode()


DIGEST_EDITS = {
    "sum": (_bump_sum, "does not match its MAC"),
    "count": (_bump_count, "does not match its MAC"),
    "mac": (_flip_mac, "does not match its MAC"),
    "not json": (lambda raw: b"\xff" + raw, "malformed"),
    "no mac": (lambda raw: json.dumps({k: v for k, v in json.loads(raw).items() if k != "mac"}).encode(), "malformed"),
    "a list": (lambda raw: b"[]", "malformed"),
}


@pytest.mark.parametrize("edit", list(DIGEST_EDITS))
def test_an_edited_digest_is_reported_and_stops_writes(memory, edit):
    """The digest is under its own MAC: an edited one is reported by
    verify_store, and every write, which moves it, is refused. (In-memory
    only: the digest is one opaque meta value on every backend.)"""
    storage, _ = memory
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    tampered, problem = DIGEST_EDITS[edit]
    set_digest_meta(storage, tampered(digest_meta(storage)))
    report = verify_store(storage, barrier)
    assert report.failures == []
    assert report.digest_problem is not None and problem in report.digest_problem
    with pytest.raises(errors.IntegrityFailure):
        create_key(keystore)
    with pytest.raises(errors.IntegrityFailure):
        change(keystore, uid, CryptographicUsageMask.ENCRYPT.value)
    # Nothing of the refused writes was stored.
    assert stored_row(storage, uid).version == 1
    assert verify_store(storage, barrier).objects == 1


def test_the_digest_bytes_are_what_json_makes_of_its_fields():
    """to_bytes writes the bytes json.dumps(sort_keys=True) made before it
    was spelled out: nodes of either release read each other's digest."""
    barrier = Barrier(KEY)
    for digest in (row_auth.StoreDigest(0, 0), row_auth.StoreDigest(2**256 - 1, 2**63 - 1), row_auth.StoreDigest(12345, 7)):
        mac = barrier.digest_mac(digest.mac_message()).hex()
        expected = json.dumps({"sum": f"{digest.total:064x}", "count": digest.count, "mac": mac}, sort_keys=True)
        assert digest.to_bytes(barrier) == expected.encode()
        assert row_auth.StoreDigest.from_bytes(barrier, digest.to_bytes(barrier)) == digest


def test_a_write_takes_the_digest_it_wrote_last_as_it_stands_and_checks_any_other(memory, monkeypatch):
    """The digest this process wrote last, found unchanged, is not parsed
    and checked again; one another process wrote is."""
    storage, _ = memory
    barrier = Barrier(KEY)
    keystore, other = Keystore(storage, barrier), Keystore(storage, barrier)
    create_key(keystore)
    checked = []
    original = row_auth.StoreDigest.from_bytes.__func__
    monkeypatch.setattr(
        row_auth.StoreDigest, "from_bytes", classmethod(lambda cls, b, raw: checked.append(raw) or original(cls, b, raw))
    )
    create_key(keystore)
    assert checked == [], "its own last digest, unchanged"
    create_key(other)
    assert len(checked) == 1, "the other keystore had not written it"
    create_key(keystore)
    assert len(checked) == 2, "another process's digest is checked"
    assert verify_store(storage, barrier).digest_problem is None


def test_a_digest_under_another_digest_key_is_refused(backend):
    """A digest copied from another store (another digest key) does not
    verify, even with the same sum and count."""
    storage, _ = backend
    barrier = Barrier(KEY)
    Keystore(storage, barrier)
    foreign = row_auth.StoreDigest(0, 0).to_bytes(Barrier(OTHER_KEY))
    set_digest_meta(storage, foreign)
    assert "does not match its MAC" in verify_store(storage, barrier).digest_problem


def test_a_deleted_digest_is_reported_and_not_recreated(backend):
    """Rows carry MACs, so the digest existed: ensure_digest (every node
    start) refuses rather than make a new one over whatever rows are there
    now, and writes are refused."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    create_key(keystore)
    tamper.delete_meta(row_auth.DIGEST_META)
    assert "missing" in verify_store(storage, barrier).digest_problem
    with pytest.raises(row_auth.RowIntegrityError, match="missing although the rows are authenticated"):
        with storage.transaction() as txn:
            row_auth.ensure_digest(txn, barrier)
    with pytest.raises(row_auth.RowIntegrityError):
        Keystore(storage, barrier)
    with pytest.raises(errors.IntegrityFailure):
        create_key(keystore)
    assert digest_meta(storage) is None


def test_an_empty_store_gets_a_digest_once():
    """A new store gets an empty digest at the first Keystore; a second
    one keeps it and adopts nothing."""
    storage = open_storage("memory://")
    barrier = Barrier(KEY)
    assert digest_meta(storage) is None
    Keystore(storage, barrier)
    first = digest_meta(storage)
    assert json.loads(first)["count"] == 0
    with storage.transaction() as txn:
        assert row_auth.ensure_digest(txn, barrier) == 0
    assert digest_meta(storage) == first


def test_reset_digest_accepts_the_rows_but_not_rows_that_fail_their_mac(backend):
    """After a replayed row (self-consistent) and an edited owner (fails
    its MAC), reset_digest makes the digest match the rows as they are;
    the edited row is still reported and still refused."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    replayed, edited, intact = (create_key(keystore) for _ in range(3))
    old = stored_row(storage, replayed)
    change(keystore, replayed, CryptographicUsageMask.ENCRYPT.value)
    tamper.put_row(old)
    tamper.set_owner(edited, "mallory")
    before = verify_store(storage, barrier)
    assert before.digest_problem is not None
    assert [uid for uid, _ in before.failures] == [edited]

    with storage.transaction() as txn:
        digest = row_auth.reset_digest(txn, barrier)
    assert digest.count == 3
    after = verify_store(storage, barrier)
    assert after.digest_problem is None
    assert [uid for uid, _ in after.failures] == [edited]
    assert not after.ok
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, edited, MALLORY)
    # The accepted rows are served and written again normally.
    assert load(Keystore(storage, barrier), replayed).version == 1
    change(Keystore(storage, barrier), intact, CryptographicUsageMask.ENCRYPT.value)
    assert verify_store(storage, barrier).digest_problem is None


def test_reset_digest_after_a_deleted_row_counts_the_rows_left(backend):
    """After an operator accepts a deliberate partial restore, the digest
    counts the rows that are left and the store verifies again."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uids = [create_key(keystore) for _ in range(3)]
    tamper.delete_row(uids[0])
    with storage.transaction() as txn:
        row_auth.reset_digest(txn, barrier)
    report = verify_store(storage, barrier)
    assert report.ok and report.objects == 2


@pytest.mark.parametrize("total", ["-1", "1" + "0" * 64])
def test_a_digest_with_an_out_of_range_sum_is_reported_as_malformed(total):
    """The digest meta is storage-controlled: any value in it is reported,
    never a crash of the check."""
    storage = open_storage("memory://")
    barrier = Barrier(KEY)
    Keystore(storage, barrier)
    doc = json.loads(digest_meta(storage))
    doc["sum"] = total
    set_digest_meta(storage, json.dumps(doc).encode())
    report = verify_store(storage, barrier)
    assert report.digest_problem is not None and "malformed" in report.digest_problem


# --- 3. the versions a node has seen --------------------------------------------------------


def test_a_node_that_saw_version_n_refuses_version_n_minus_1(backend, whole_reads):
    """The node that wrote version 2 refuses the version-1 copy written
    back at once; a node that never saw version 2 cannot tell (the digest
    reports it instead)."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    old = stored_row(storage, uid)
    change(keystore, uid, CryptographicUsageMask.ENCRYPT.value)
    assert load(keystore, uid).version == 2
    tamper.put_row(old)
    with pytest.raises(errors.IntegrityFailure, match="failed its integrity check"):
        load(keystore, uid)
    fresh_node = Keystore(storage, barrier)
    assert load(fresh_node, uid).version == 1
    assert "rolled back" in verify_store(storage, barrier).digest_problem


def test_a_version_only_read_is_remembered_too(backend, whole_reads):
    """A node that only read version 2 (another node wrote it) refuses
    version 1 afterwards."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    writer, reader = Keystore(storage, barrier), Keystore(storage, barrier)
    uid = create_key(writer)
    old = stored_row(storage, uid)
    change(writer, uid, CryptographicUsageMask.ENCRYPT.value)
    assert load(reader, uid).version == 2
    tamper.put_row(old)
    with pytest.raises(errors.IntegrityFailure):
        load(reader, uid)


def test_versions_written_in_a_rolled_back_transaction_are_not_remembered(backend):
    """A write whose transaction rolls back never existed: the node does
    not hold the committed version as a rollback of it."""
    storage, _ = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)

    class Abort(Exception):
        pass

    with pytest.raises(Abort):
        with keystore.transaction() as txn:
            obj = keystore.load(txn, ALICE, uid, Action.MANAGE, NOW, for_update=True)
            obj.set_value("Cryptographic Usage Mask", CryptographicUsageMask.ENCRYPT.value)
            keystore.save(txn, obj, NOW)
            keystore.save(txn, obj, NOW)
            assert obj.version == 3
            raise Abort
    assert stored_row(storage, uid).version == 1
    assert load(keystore, uid).value("Cryptographic Usage Mask") == USAGE
    # And the next write starts from the committed version, as usual.
    change(keystore, uid, CryptographicUsageMask.DECRYPT.value)
    assert load(keystore, uid).version == 2
    assert verify_store(storage, barrier).ok


def test_versions_of_a_transaction_the_storage_rolls_back_are_not_remembered(backend):
    """A transaction that failed inside storage (the caller went on after a
    StorageError) is rolled back at its end: its versions are not noted
    either."""
    storage, _ = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    with pytest.raises(StorageError) as raised:
        with keystore.transaction() as txn:
            obj = keystore.load(txn, ALICE, uid, Action.MANAGE, NOW, for_update=True)
            keystore.save(txn, obj, NOW)
            with pytest.raises(errors.ObjectAlreadyExists):
                keystore.new_object(txn, ALICE, ObjectType.SYMMETRIC_KEY, key_attributes(), None, NOW, uid=uid)
    assert "rolled back" in str(raised.value)
    assert stored_row(storage, uid).version == 1
    assert load(keystore, uid).version == 1


def test_versions_of_a_new_object_rolled_back_are_not_remembered(memory):
    """An object created in a rolled-back transaction and created again
    under the same uid (a client's retry) is served at version 1."""
    storage, _ = memory
    keystore = Keystore(storage, Barrier(KEY))
    with pytest.raises(RuntimeError):
        with keystore.transaction() as txn:
            obj = keystore.new_object(txn, ALICE, ObjectType.SYMMETRIC_KEY, key_attributes(), None, NOW, uid="retry")
            keystore.save(txn, obj, NOW)
            raise RuntimeError("abort")
    with keystore.transaction() as txn:
        keystore.new_object(txn, ALICE, ObjectType.SYMMETRIC_KEY, key_attributes(), None, NOW, uid="retry")
    assert load(keystore, "retry").version == 1


def test_seen_versions_refuses_older_and_accepts_equal_or_newer():
    """Only a version below the highest one seen is a rollback; noting an
    older version later does not lower the mark."""
    seen = row_auth.SeenVersions()
    seen.check("a", 1)  # never seen: anything goes
    seen.note("a", 5)
    seen.check("a", 5)
    seen.check("a", 6)
    with pytest.raises(row_auth.RowIntegrityError, match="older than version 5") as raised:
        seen.check("a", 4)
    assert raised.value.uid == "a"
    seen.note("a", 3)  # an older note does not lower what was seen
    with pytest.raises(row_auth.RowIntegrityError):
        seen.check("a", 4)


def test_seen_versions_forgets_the_least_recently_used_beyond_its_capacity():
    """With room for two objects, a third forgets the one used least
    recently (noting an object again counts as a use), not the oldest."""
    seen = row_auth.SeenVersions(capacity=2)
    seen.note("a", 5)
    seen.note("b", 5)
    seen.note("a", 5)  # a is now the most recently used
    seen.note("c", 5)
    seen.check("b", 1)  # forgotten
    for uid in ("a", "c"):
        with pytest.raises(row_auth.RowIntegrityError):
            seen.check(uid, 4)
    seen.note("b", 7)  # evicts a (c was used after a)
    seen.check("a", 1)
    with pytest.raises(row_auth.RowIntegrityError):
        seen.check("c", 4)
    with pytest.raises(row_auth.RowIntegrityError):
        seen.check("b", 6)


def test_the_keystore_forgets_the_least_recently_loaded_object(memory):
    """Through the keystore: loading an object keeps it remembered; with a
    capacity of two, the object loaded least recently is the one whose
    replay is no longer caught by the node."""
    storage, tamper = memory
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    keystore.seen = row_auth.SeenVersions(capacity=2)
    a, b, c = (create_key(keystore) for _ in range(3))
    old = {uid: stored_row(storage, uid) for uid in (a, b)}
    for uid in (a, b):
        change(keystore, uid, CryptographicUsageMask.ENCRYPT.value)
    load(keystore, a)  # order of use: b, a
    load(keystore, c)  # b is forgotten
    for uid in (a, b):
        tamper.put_row(old[uid])
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, a)
    assert load(keystore, b).version == 1


# --- 4. a database made by the previous release ------------------------------------------


OLD_SECRETS = {"old-key-1": os.urandom(32), "old-key-2": os.urandom(32)}


def _old_release_object(uid: str, owner: str, secret: bytes | None, barrier: Barrier) -> StoredObject:
    """A row as the release before row authentication stored it: format-1
    material under the master key itself, no MAC."""
    obj = ManagedObject(uid=uid, owner=owner, attributes=key_attributes(name=f"name of {uid}"))
    obj.set_value("Unique Identifier", uid)
    obj.set_value("Object Type", ObjectType.SYMMETRIC_KEY.value)
    obj.set_value("State", State.ACTIVE.value if secret is not None else State.DESTROYED.value)
    obj.set_value("Initial Date", NOW)
    if secret is not None:
        obj.sealed_material = barrier.seal(uid, Material(secret).to_bytes())
    return obj.to_stored()


@pytest.fixture
def old_release_db(tmp_path):
    """A SQLite database at schema revision 0003 with three objects (one
    updated twice, one destroyed) and the format-1 check record, and the
    master key file the old release used."""
    path = tmp_path / "kms.db"
    engine = create_engine(f"sqlite:///{path}")
    # The previous release's schema: what kms_server.storage.schema runs,
    # stopped at revision 0003.
    migrations.migrate(engine, schema.KMS, "0003")
    with engine.connect() as conn:
        columns = {row[1] for row in conn.execute(text("PRAGMA table_info(kms_objects)"))}
    assert "row_mac" not in columns
    legacy = Barrier(KEY)
    assert legacy.seal("x", b"y")[0] == 1  # format 1, as the old release sealed
    rows = [
        (_old_release_object("old-key-1", "alice", OLD_SECRETS["old-key-1"], legacy), 1),
        (_old_release_object("old-key-2", "alice", OLD_SECRETS["old-key-2"], legacy), 3),
        (_old_release_object("old-destroyed", "bob", None, legacy), 2),
    ]
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO kms_meta (key, value) VALUES (:key, :value)"),
            {"key": CHECK_META, "value": legacy.seal("barrier-check", b"kms-server master key check v1")},
        )
        for stored, version in rows:
            conn.execute(
                text(
                    "INSERT INTO kms_objects (uid, owner, version, sealed_material, created_at) "
                    "VALUES (:uid, :owner, :version, :sealed, :created)"
                ),
                {
                    "uid": stored.uid,
                    "owner": stored.owner,
                    "version": version,
                    "sealed": stored.sealed_material,
                    "created": time.time(),
                },
            )
            _insert_attributes(conn, stored)
    engine.dispose()
    key_file = tmp_path / "master.key"
    key_file.write_text(KEY.hex() + "\n")
    return f"sqlite:///{path}", str(key_file)


def _start(url: str, key_file: str):
    """What a node start does: open (and upgrade) storage, open the barrier."""
    storage = open_storage(url)
    return storage, open_barrier(storage, key_file=key_file)


def _row_columns(storage) -> dict[str, tuple[int, bytes | None]]:
    with storage.engine.connect() as conn:
        return {
            uid: (version, None if mac is None else bytes(mac))
            for uid, version, mac in conn.execute(text("SELECT uid, version, row_mac FROM kms_objects"))
        }


def test_the_old_database_is_upgraded_and_each_row_authenticated_once(old_release_db):
    """The first start upgrades the schema to head, gives every row a MAC
    as it stands (ensure_digest reports three) and creates the digest; the
    store then verifies. A second start adopts nothing."""
    url, key_file = old_release_db
    storage, barrier = _start(url, key_file)
    assert schema.current_revision(storage.engine) == schema.head_revision()
    assert barrier.keyring.legacy_term is not None
    assert all(mac is None for _, mac in _row_columns(storage).values())
    with storage.transaction() as txn:
        assert row_auth.ensure_digest(txn, barrier) == 3
    rows = _row_columns(storage)
    assert {uid: version for uid, (version, _) in rows.items()} == {
        "old-key-1": 2,
        "old-key-2": 4,
        "old-destroyed": 3,
    }
    assert all(mac is not None for _, mac in rows.values())
    assert json.loads(digest_meta(storage))["count"] == 3
    report = verify_store(storage, barrier)
    assert report.ok, report
    Keystore(storage, barrier)  # a start after the adoption refuses nothing
    storage.close()

    storage, barrier = _start(url, key_file)
    with storage.transaction() as txn:
        assert row_auth.ensure_digest(txn, barrier) == 0
    Keystore(storage, barrier)
    assert _row_columns(storage) == rows
    assert verify_store(storage, barrier).ok
    storage.close()


def test_objects_of_the_old_database_load_and_their_material_unseals(old_release_db):
    """Through the keystore of today: the attributes, the owner and the
    format-1 material of each old object are as the old release stored
    them, and they can be changed like any other."""
    url, key_file = old_release_db
    storage, barrier = _start(url, key_file)
    keystore = Keystore(storage, barrier)
    for uid, secret in OLD_SECRETS.items():
        obj = load(keystore, uid, ALICE, Action.READ_MATERIAL)
        assert obj.owner == "alice"
        assert obj.value("x-Name") == f"name of {uid}"
        assert obj.value("Cryptographic Length") == 256
        assert obj.sealed_material[0] == 1
        assert keystore.material(obj).data == secret
    destroyed = load(keystore, "old-destroyed", Principal("bob"))
    assert destroyed.state == State.DESTROYED
    with pytest.raises(errors.KeyValueNotPresent):
        keystore.material(destroyed)
    with pytest.raises(errors.ItemNotFound):
        load(keystore, "old-key-1", Principal("bob"))
    change(keystore, "old-key-1", CryptographicUsageMask.ENCRYPT.value)
    assert keystore.material(load(keystore, "old-key-1", ALICE, Action.READ_MATERIAL)).data == OLD_SECRETS["old-key-1"]
    assert verify_store(storage, barrier).ok
    storage.close()


def test_after_the_migration_an_owner_edited_in_sql_is_refused(old_release_db):
    """Once the rows are authenticated, the same SQL edit that the old
    release would have believed is refused, to the new owner and to the
    old one, also after a restart."""
    url, key_file = old_release_db
    storage, barrier = _start(url, key_file)
    keystore = Keystore(storage, barrier)
    SqlTamper(storage).set_owner("old-key-1", "mallory")
    for principal in (MALLORY, ALICE, ADMIN):
        with pytest.raises(errors.IntegrityFailure):
            load(keystore, "old-key-1", principal, Action.READ_MATERIAL)
    storage.close()

    storage, barrier = _start(url, key_file)
    keystore = Keystore(storage, barrier)
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, "old-key-1", MALLORY, Action.READ_MATERIAL)
    report = verify_store(storage, barrier)
    assert [uid for uid, _ in report.failures] == ["old-key-1"]
    storage.close()


def test_the_old_database_refuses_a_wrong_master_key_before_adopting_anything(old_release_db, tmp_path):
    """Adoption needs the master key: a node started with another key is
    refused by the check record and authenticates no row."""
    url, _ = old_release_db
    wrong = tmp_path / "wrong.key"
    wrong.write_text(OTHER_KEY.hex())
    storage = open_storage(url)
    with pytest.raises(BarrierError, match="does not open this database"):
        open_barrier(storage, key_file=str(wrong))
    assert all(mac is None for _, mac in _row_columns(storage).values())
    assert digest_meta(storage) is None
    storage.close()


def test_stripping_every_mac_and_the_digest_does_not_get_an_edited_row_adopted(tmp_path):
    """A store made by today's code never holds rows without a MAC, so a
    start must not authenticate whatever rows it finds once all MACs and
    the digest are gone: the owner edited meanwhile must stay refused."""
    url = f"sqlite:///{tmp_path / 'kms.db'}"
    key_file = tmp_path / "master.key"
    key_file.write_text(KEY.hex())
    storage, barrier = _start(url, str(key_file))
    uid = create_key(Keystore(storage, barrier))
    with storage.engine.begin() as conn:
        conn.execute(text("UPDATE kms_objects SET owner = 'mallory', row_mac = NULL"))
        conn.execute(text("DELETE FROM kms_meta WHERE key = :key"), {"key": row_auth.DIGEST_META})
    storage.close()

    storage, barrier = _start(url, str(key_file))
    try:
        try:
            keystore = Keystore(storage, barrier)
        except row_auth.RowIntegrityError:
            return  # refused at start: what the test asks for
        with pytest.raises(errors.IntegrityFailure):
            load(keystore, uid, MALLORY, Action.READ_MATERIAL)
    finally:
        storage.close()


# --- 5. what the audit trail learns of a refused row ------------------------------------------


def _draft(operation: str = "Get", requested: str | None = None) -> AuditDraft:
    return AuditDraft(
        event="request",
        request_id="req-1",
        item=0,
        client=client_fields(ALICE),
        peer="test",
        protocol="1.4",
        operation=operation,
        requested=requested,
    )


def test_a_refused_load_names_the_object_in_the_bound_draft(backend):
    """The request named no uid (requested is None); the refused object is
    still in the draft, and so in the record written from it."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    tamper.set_owner(uid, "mallory")
    draft = _draft()
    bound = keystore.for_item(AuditTrail(storage, "node-1"), draft)
    with pytest.raises(errors.IntegrityFailure):
        with bound.transaction(read_only=True) as txn:
            bound.load(txn, MALLORY, uid, Action.READ_MATERIAL, NOW)
    assert uid in draft.objects
    entry = draft.entry("OPERATION_FAILED", "GENERAL_FAILURE")
    assert entry["uid"] == uid
    assert [o["uid"] for o in entry["objects"]] == [uid]


def test_a_refused_rollback_names_the_object_in_the_bound_draft(memory):
    """The same for a row refused as older than a version the node saw."""
    storage, tamper = memory
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    old = stored_row(storage, uid)
    change(keystore, uid, CryptographicUsageMask.ENCRYPT.value)
    tamper.put_row(old)
    draft = _draft()
    bound = keystore.for_item(AuditTrail(storage, "node-1"), draft)
    with pytest.raises(errors.IntegrityFailure):
        with bound.transaction(read_only=True) as txn:
            bound.load(txn, ALICE, uid, Action.READ_MATERIAL, NOW)
    assert list(draft.objects) == [uid]


def test_a_refused_wrapping_key_is_in_the_audit_record_of_the_get(memory):
    """Get of an intact key wrapped by a key whose row was edited: the
    client gets General Failure, and the trail's record of the Get lists
    the refused wrapping key, which the request named only inside the Key
    Wrapping Specification."""
    storage, tamper = memory
    barrier = Barrier(KEY)
    trail = AuditTrail(storage, "node-1")
    dispatcher = Dispatcher(Keystore(storage, barrier), OPERATIONS, trail=trail)
    key = kmip_create(dispatcher)
    wrapping = kmip_create(dispatcher)
    for uid in (key, wrapping):
        kmip_ok(dispatcher, ALICE, Operation.ACTIVATE, [uid_item(uid)])
    tamper.set_column(wrapping, sealed_material=barrier.seal(wrapping, Material(b"\x00" * 32).to_bytes()))
    specification = ttlv.structure(
        T.KEY_WRAPPING_SPECIFICATION.value,
        [
            ttlv.enumeration(T.WRAPPING_METHOD.value, WrappingMethod.ENCRYPT.value),
            ttlv.structure(T.ENCRYPTION_KEY_INFORMATION.value, [uid_item(wrapping)]),
        ],
    )
    response = kmip(dispatcher, ALICE, Operation.GET, [uid_item(key), specification])
    assert response.status == ResultStatus.OPERATION_FAILED
    assert response.reason == ResultReason.GENERAL_FAILURE
    assert "integrity" in response.message
    record = list(iter_records(storage))[-1]
    body = json.loads(record.body)
    assert body["operation"] == "GET"
    assert body["result"]["status"] == "OPERATION_FAILED"
    assert wrapping in [o["uid"] for o in body["objects"]]


@pytest.mark.parametrize("field", ["version", "attribute index"])
def test_a_row_with_an_out_of_range_number_is_refused_as_an_integrity_failure(backend, field):
    """Numbers in a row are storage-controlled too: one no honest row can
    hold is refused like any other edit, and audited with the uid."""
    storage, tamper = backend
    keystore = Keystore(storage, Barrier(KEY))
    uid = create_key(keystore)
    if field == "version":
        tamper.set_column(uid, version=-1)
    else:
        tamper.set_attribute_index(uid, "Cryptographic Length", 2**31)
    draft = _draft()
    bound = keystore.for_item(AuditTrail(storage, "node-1"), draft)
    with pytest.raises(errors.IntegrityFailure):
        with bound.transaction(read_only=True) as txn:
            bound.load(txn, ALICE, uid, Action.READ_MATERIAL, NOW)
    assert uid in draft.objects


def test_verify_store_reports_a_row_with_a_negative_version(backend):
    """db verify and the start-up check report such a row by its uid, as
    they do any other edited row."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    tamper.set_column(uid, version=-1)
    report = verify_store(storage, barrier)
    assert [failed for failed, _ in report.failures] == [uid]


# --- 6. the rows a process keeps (keystore/verified_rows.py) -------------------------------


def _reads(keystore: Keystore) -> list[bool]:
    """The reads `keystore` makes from now on: True for one served from the
    rows it holds, False for one that read the row whole."""
    seen: list[bool] = []
    keystore.rows.on_read = seen.append
    return seen


def _usage_item(usage: int) -> bytes:
    return attrs.encode_value(attrs.make("Cryptographic Usage Mask", usage))


def test_a_row_still_at_its_version_and_mac_is_served_without_its_attribute_rows(backend):
    """The second read of an unchanged row is served from the row the
    process authenticated, with the same attributes in the same order as a
    process reading it whole, and in lists the caller may change alone."""
    storage, _ = backend
    keystore = Keystore(storage, Barrier(KEY))
    uid = create_key(keystore)
    reads = _reads(keystore)
    first = load(keystore, uid)
    first.attributes["Cryptographic Usage Mask"].append(attrs.make("Cryptographic Usage Mask", 1))
    first.set_value("State", State.ACTIVE.value)
    second = load(keystore, uid)
    whole = load(Keystore(storage, Barrier(KEY)), uid)
    assert reads == [True, True]  # the creating write left the row it signed
    assert list(second.attributes.items()) == list(whole.attributes.items())
    assert second.state == State.PRE_ACTIVE
    assert second.attributes["Cryptographic Usage Mask"] == [attrs.make("Cryptographic Usage Mask", USAGE)]
    assert (second.version, second.row_mac, second.owner) == (whole.version, whole.row_mac, whole.owner)


def test_a_row_another_process_changed_is_read_whole_again(backend):
    """The invalidation rule: another process's write moves the version and
    the MAC, so the process holding the old row reads the new one."""
    storage, _ = backend
    reader, writer = Keystore(storage, Barrier(KEY)), Keystore(storage, Barrier(KEY))
    uid = create_key(reader)
    assert load(reader, uid).usage_mask == USAGE
    change(writer, uid, CryptographicUsageMask.ENCRYPT.value)
    reads = _reads(reader)
    assert load(reader, uid).usage_mask == CryptographicUsageMask.ENCRYPT.value
    assert load(reader, uid).version == 2
    assert reads == [False, True]


def _destroy(keystore: Keystore, uid: str) -> None:
    """Destroy the key as the Destroy operation does: material gone, State
    Destroyed, in one write."""
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ALICE, uid, Action.MANAGE, NOW, for_update=True)
        keystore.reseal(obj, None)
        obj.set_value("State", State.DESTROYED.value)
        keystore.save(txn, obj, NOW)


def _refuses_material(keystore: Keystore, uid: str) -> None:
    """`keystore` serves the key as destroyed: no material."""
    obj = load(keystore, uid, action=Action.READ_MATERIAL)
    assert obj.state == State.DESTROYED
    with pytest.raises(errors.KeyValueNotPresent):
        keystore.material(obj)


def test_a_key_another_process_destroyed_is_not_served_by_the_process_holding_it(backend):
    storage, _ = backend
    reader, writer = Keystore(storage, Barrier(KEY)), Keystore(storage, Barrier(KEY))
    uid = create_key(reader)
    assert reader.material(load(reader, uid, action=Action.READ_MATERIAL)).to_bytes()
    _destroy(writer, uid)
    _refuses_material(reader, uid)


# --- the store digest as the version of every row (keystore/verified_rows.py) ---


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sqlite_store(tmp_path):
    """(storage, tamper, clock, a keystore whose held rows follow clock)
    on a SQLite file, whose read transactions see one snapshot."""
    storage = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    clock = _Clock()
    keystore = Keystore(storage, Barrier(KEY))
    keystore.rows = verified_rows.VerifiedRows(clock=clock)
    yield storage, SqlTamper(storage), clock, keystore
    storage.close()


def test_a_row_held_under_the_store_digest_read_now_is_not_read_again(sqlite_store):
    """While the store digest has not moved, the held row is the stored
    one and is not read: an edit made in place meanwhile is not seen, and
    never served (the owner stays the one authenticated). Read whole again
    after RECHECK_SECONDS, the edit is refused."""
    storage, tamper, clock, keystore = sqlite_store
    uid = create_key(keystore)
    reads = _reads(keystore)
    load(keystore, uid)
    tamper.set_owner(uid, "mallory")
    assert load(keystore, uid).owner == ALICE.name
    with pytest.raises(errors.ItemNotFound):
        load(keystore, uid, MALLORY)
    assert reads == [True, True, True]  # none of them authenticated the row again
    clock.now += verified_rows.RECHECK_SECONDS
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, uid)


def test_a_write_of_any_object_moves_the_digest_and_held_rows_are_read_whole(sqlite_store):
    """Another process's write of another object moves the store digest:
    the rows held under the old digest are read whole at their next read,
    so an edit made in place before it, unseen until then, is refused."""
    storage, tamper, clock, reader = sqlite_store
    writer = Keystore(storage, Barrier(KEY))
    uid, other = create_key(writer), create_key(writer)
    load(reader, uid)
    tamper.set_attribute_value(uid, "Cryptographic Usage Mask", _usage_item(USAGE | CryptographicUsageMask.EXPORT.value))
    assert load(reader, uid).usage_mask == USAGE
    change(writer, other, CryptographicUsageMask.ENCRYPT.value)
    with pytest.raises(errors.IntegrityFailure):
        load(reader, uid)


def test_a_state_another_process_wrote_is_served_at_once_under_the_digest(sqlite_store):
    """The cluster's rule with the digest: a key another process destroyed
    is not served by the process that held it under the old digest, within
    RECHECK_SECONDS or not."""
    storage, _, clock, reader = sqlite_store
    writer = Keystore(storage, Barrier(KEY))
    uid = create_key(writer)
    load(reader, uid)
    assert load(reader, uid, action=Action.READ_MATERIAL).state == State.PRE_ACTIVE
    _destroy(writer, uid)
    _refuses_material(reader, uid)


def test_an_older_copy_written_back_is_not_served_by_the_process_holding_the_newer(sqlite_store):
    """A row written back from an older copy, digest untouched: the process
    holding the newer row under that digest answers from the newer one, and
    refuses the older copy once it reads it whole."""
    storage, tamper, clock, keystore = sqlite_store
    uid = create_key(keystore)
    old = stored_row(storage, uid)
    change(keystore, uid, CryptographicUsageMask.ENCRYPT.value)
    assert load(keystore, uid).version == 2  # read whole: written here, no digest yet
    tamper.put_row(old)
    obj = load(keystore, uid)
    assert (obj.version, obj.usage_mask) == (2, CryptographicUsageMask.ENCRYPT.value)
    clock.now += verified_rows.RECHECK_SECONDS
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, uid)


def test_rows_written_here_and_write_transactions_do_not_go_by_the_digest(sqlite_store):
    """A row this process wrote is held with no digest (its transaction
    might still have been rolled back), so its first read reads it whole;
    a write transaction reads the rows it changes whatever the digest."""
    storage, tamper, clock, keystore = sqlite_store
    uid = create_key(keystore)
    tamper.set_owner(uid, "mallory")
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, uid)
    fresh = create_key(keystore)
    load(keystore, fresh)
    tamper.set_owner(fresh, "mallory")
    with pytest.raises(errors.IntegrityFailure):
        change(keystore, fresh, CryptographicUsageMask.ENCRYPT.value)


def test_a_store_whose_reads_see_no_single_snapshot_reads_every_row(memory):
    """Without one snapshot per read transaction (here the memory store;
    PostgreSQL's READ COMMITTED alike) the digest is not read: an edit in
    place is refused by the process holding the row at once."""
    storage, tamper = memory
    keystore = Keystore(storage, Barrier(KEY))
    uid = create_key(keystore)
    load(keystore, uid)
    load(keystore, uid)
    tamper.set_owner(uid, "mallory")
    with pytest.raises(errors.IntegrityFailure):
        load(keystore, uid)


def test_held_rows_under_a_digest_are_current_only_for_that_digest_and_recheck_time():
    clock = _Clock()
    rows = verified_rows.VerifiedRows(clock=clock)
    stored = StoredObject(
        uid="u", owner="alice", sealed_material=b"s", attributes=[StoredAttribute("State", 0, b"v")], version=3,
        sequence=1, row_mac=b"m",
    )
    rows.put(stored)
    assert rows.get_current("u", b"d1") == (stored, False)  # written here: no digest
    rows.put(stored, b"d1")
    assert rows.get_current("u", b"d1") == (stored, True)
    assert rows.get_current("u", b"d2")[1] is False
    assert rows.get_current("u", None)[1] is False
    assert rows.get_current("nobody", b"d1") == (None, False)
    clock.now += verified_rows.RECHECK_SECONDS - 0.001
    assert rows.get_current("u", b"d1")[1] is True
    clock.now += 0.001
    assert rows.get_current("u", b"d1")[1] is False
    rows.retag(stored, b"d2")  # read whole again under d2: current under it, from now
    assert rows.get_current("u", b"d2") == (stored, True)
    newer = dataclasses.replace(stored, version=4, row_mac=b"m2")
    rows.put(newer)
    rows.retag(stored, b"d3")  # no longer the row held: nothing changes
    assert rows.get_current("u", b"d3") == (newer, False)


IN_PLACE_EDITS = {
    "owner": lambda tamper, uid, barrier: tamper.set_owner(uid, "mallory"),
    "sealed material": lambda tamper, uid, barrier: tamper.set_column(
        uid, sealed_material=barrier.seal(uid, Material(b"\x00" * 32).to_bytes())
    ),
    "attribute value": lambda tamper, uid, barrier: tamper.set_attribute_value(
        uid, "Cryptographic Usage Mask", _usage_item(USAGE | CryptographicUsageMask.EXPORT.value)
    ),
    "attribute index": lambda tamper, uid, barrier: tamper.set_attribute_index(uid, "Cryptographic Length", 1),
    "attribute deleted": lambda tamper, uid, barrier: tamper.delete_attribute(uid, "State"),
}


@pytest.mark.parametrize("edit", IN_PLACE_EDITS)
def test_a_row_edited_in_place_is_refused_by_the_process_holding_it(backend, whole_reads, edit):
    """An edit that leaves the row's version and MAC as they were is refused
    by the process that holds the row as by any other: storage gives back
    the held row only if what it reads is that row byte for byte."""
    storage, tamper = backend
    barrier = Barrier(KEY)
    keystore = Keystore(storage, barrier)
    uid = create_key(keystore)
    load(keystore, uid)
    IN_PLACE_EDITS[edit](tamper, uid, barrier)
    reads = _reads(keystore)
    for principal in (ALICE, MALLORY):
        with pytest.raises(errors.IntegrityFailure):
            load(keystore, uid, principal)
    assert reads == []  # refused before it counts as a read
    assert keystore.rows.get(uid).version == 1  # the refused row is not kept in its place


def test_a_held_row_under_a_data_key_the_keyring_no_longer_holds_is_refused(memory):
    """A rotation retires a data key only once no row is left under it: a
    held row still under it (written back) is checked again, and refused,
    rather than served because it was authentic once."""
    storage, _ = memory
    digest_key = os.urandom(32)
    old_ring = Keyring(terms={1: os.urandom(32)}, active=1, digest_key=digest_key)
    new_ring = Keyring(terms={2: os.urandom(32)}, active=2, digest_key=digest_key)
    before = Keystore(storage, Barrier(old_ring))
    uid = create_key(before)
    load(before, uid)
    after = Keystore(storage, Barrier(new_ring))
    after.rows = before.rows  # the same process, once its keyring moved on
    with pytest.raises(errors.IntegrityFailure):
        load(after, uid)


def test_a_row_kept_from_a_rolled_back_write_is_not_served(backend):
    """A write rolled back leaves its row in the cache; no stored row
    matches its MAC, so the stored row is read, and so is the row another
    write makes at the same version."""
    storage, _ = backend
    keystore, other = Keystore(storage, Barrier(KEY)), Keystore(storage, Barrier(KEY))
    uid = create_key(keystore)
    with pytest.raises(RuntimeError), keystore.transaction() as txn:
        obj = keystore.load(txn, ALICE, uid, Action.MANAGE, NOW, for_update=True)
        obj.set_value("Cryptographic Usage Mask", CryptographicUsageMask.ENCRYPT.value)
        keystore.save(txn, obj, NOW)
        raise RuntimeError("the request fails after its write")
    assert keystore.rows.get(uid).version == 2
    reads = _reads(keystore)
    assert (load(keystore, uid).version, load(keystore, uid).usage_mask) == (1, USAGE)
    change(other, uid, CryptographicUsageMask.DECRYPT.value)
    assert load(keystore, uid).usage_mask == CryptographicUsageMask.DECRYPT.value
    assert reads == [False, True, False]


def test_the_rows_kept_are_bounded_and_zero_keeps_none(memory):
    storage, _ = memory
    keystore = Keystore(storage, Barrier(KEY), verified_rows=2)
    uids = [create_key(keystore) for _ in range(3)]
    assert len(keystore.rows) == 2
    assert keystore.rows.get(uids[0]) is None
    reads = _reads(keystore)
    for uid in reversed(uids):
        load(keystore, uid)
    assert reads == [True, True, False]
    off = Keystore(storage, Barrier(KEY), verified_rows=0)
    reads = _reads(off)
    for uid in uids + uids:
        load(off, uid)
    assert reads == [False] * 6
    assert len(off.rows) == 0


def test_the_rows_kept_add_nothing_for_the_collector_to_walk(backend):
    """A full collection walks every object the collector tracks, with the
    GIL held: rows kept as objects made its pauses grow with the cache (40
    objects a key). Kept as plain tuples of str, int and bytes, the
    collector stops tracking them, and each
    read gets an object of its own, which nothing it does reaches the cache
    through."""
    storage, _ = backend
    keystore = Keystore(storage, Barrier(KEY))
    uids = [create_key(keystore) for _ in range(20)]
    for uid in uids:
        load(keystore, uid)
    for _ in range(3):  # one level of tuples untracked per collection
        gc.collect()
    entries = list(keystore.rows._rows.values())
    assert len(entries) == 20
    assert not any(gc.is_tracked(entry) or any(map(gc.is_tracked, entry[5])) for entry in entries)
    held = keystore.rows.get(uids[0])
    assert held is not None and held is not keystore.rows.get(uids[0])
    held.attributes.clear()
    held.owner = "mallory"
    reads = _reads(keystore)
    obj = load(keystore, uids[0])
    assert reads == [True] and obj.owner != "mallory" and obj.usage_mask == USAGE
