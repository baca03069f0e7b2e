"""The storage contract (kms_server/storage/base.py), run unchanged against
every backend: the in-memory fake, SQLite and PostgreSQL (see conftest.py)."""

from __future__ import annotations

import os
import threading
import traceback
from pathlib import Path

import pytest

from kms_server.storage import (
    ConcurrentModification,
    LocateQuery,
    ObjectExists,
    Storage,
    StorageError,
    StoredAttribute,
    StoredObject,
    open_storage,
)


def attr(name: str, value: bytes, index: int = 0) -> StoredAttribute:
    return StoredAttribute(name=name, index=index, value=value)


def new_object(
    uid: str, owner: str = "alice", *attributes: StoredAttribute, sealed=b"sealed"
) -> StoredObject:
    return StoredObject(
        uid=uid, owner=owner, sealed_material=sealed, attributes=list(attributes)
    )


def insert(storage: Storage, *objects: StoredObject) -> None:
    with storage.transaction() as tx:
        for obj in objects:
            tx.insert_object(obj)


def get(storage: Storage, uid: str) -> StoredObject | None:
    with storage.transaction() as tx:
        return tx.get_object(uid)


def locate(storage: Storage, **kwargs) -> list[str]:
    with storage.transaction() as tx:
        return tx.locate(LocateQuery(**kwargs))


# Insert and get.


def test_insert_then_get_round_trips_object_and_attributes(storage):
    """Every field survives a round trip; several values of one name come
    back in order of their index, names in a fixed order."""
    obj = new_object(
        "uid-1",
        "alice",
        attr("Name", b"second", 1),
        attr("Cryptographic Length", b"\x00\x01\x00\x00"),
        attr("Name", b"first", 0),
        attr("Name", b"third", 2),
        sealed=b"opaque sealed bytes",
    )
    insert(storage, obj)
    assert obj.version == 1
    assert obj.sequence > 0

    got = get(storage, "uid-1")
    assert got == StoredObject(
        uid="uid-1",
        owner="alice",
        sealed_material=b"opaque sealed bytes",
        attributes=[
            attr("Cryptographic Length", b"\x00\x01\x00\x00"),
            attr("Name", b"first", 0),
            attr("Name", b"second", 1),
            attr("Name", b"third", 2),
        ],
        version=1,
        sequence=obj.sequence,
    )
    assert all(type(a.value) is bytes for a in got.attributes)
    assert type(got.sealed_material) is bytes


def test_get_of_unknown_uid_returns_none(storage):
    assert get(storage, "no-such-uid") is None


def test_object_without_material_or_attributes(storage):
    insert(storage, new_object("bare", sealed=None))
    got = get(storage, "bare")
    assert got.sealed_material is None
    assert got.attributes == []


def test_sequence_follows_insertion_order(storage):
    a, b = new_object("b-first"), new_object("a-second")
    insert(storage, a)
    insert(storage, b)
    assert a.sequence < b.sequence
    assert get(storage, "a-second").sequence == b.sequence


def test_callers_cannot_change_stored_state(storage):
    """Changing an object after insert, or one returned by get, changes
    nothing stored."""
    obj = new_object("uid-1", "alice", attr("Name", b"n"))
    insert(storage, obj)
    obj.attributes.append(attr("Name", b"added", 1))
    obj.owner = "mallory"

    got = get(storage, "uid-1")
    got.attributes.clear()
    got.owner = "mallory"

    again = get(storage, "uid-1")
    assert again.owner == "alice"
    assert again.attributes == [attr("Name", b"n")]


def test_duplicate_uid_raises_object_exists_and_keeps_the_original(storage):
    insert(storage, new_object("uid-1", "alice", attr("Name", b"original")))
    with pytest.raises(ObjectExists):
        insert(storage, new_object("uid-1", "bob", attr("Name", b"impostor")))
    got = get(storage, "uid-1")
    assert got.owner == "alice"
    assert got.attributes == [attr("Name", b"original")]
    assert locate(storage, equals=(("Name", b"impostor"),)) == []


def test_a_failed_call_rolls_back_the_whole_transaction(storage):
    """A StorageError means the transaction was rolled back, even when the
    caller catches it and leaves the block normally."""
    insert(storage, new_object("taken"))
    with pytest.raises(StorageError), storage.transaction() as tx:
        tx.insert_object(new_object("fresh"))
        with pytest.raises(ObjectExists):
            tx.insert_object(new_object("taken"))
        with pytest.raises(StorageError):
            tx.get_object("taken")
    assert get(storage, "fresh") is None
    assert get(storage, "taken") is not None


# Update.


def test_update_bumps_version_and_replaces_everything(storage):
    obj = new_object(
        "uid-1", "alice", attr("Name", b"old"), attr("State", b"1"), sealed=b"m1"
    )
    insert(storage, obj)

    with storage.transaction() as tx:
        current = tx.get_object("uid-1")
        current.owner = "bob"
        current.sealed_material = None
        current.attributes = [
            attr("State", b"2"),
            attr("Alias", b"x", 0),
            attr("Alias", b"y", 1),
        ]
        tx.update_object(current)
        assert current.version == 2

    got = get(storage, "uid-1")
    assert got.version == 2
    assert got.sequence == obj.sequence
    assert got.owner == "bob"
    assert got.sealed_material is None
    assert got.attributes == [
        attr("Alias", b"x", 0),
        attr("Alias", b"y", 1),
        attr("State", b"2"),
    ]
    assert locate(storage, equals=(("Name", b"old"),)) == []
    assert locate(storage, equals=(("State", b"1"),)) == []
    assert locate(storage, equals=(("State", b"2"),)) == ["uid-1"]

    with storage.transaction() as tx:
        tx.update_object(got)
    assert got.version == 3
    assert get(storage, "uid-1").version == 3


def test_update_with_stale_version_raises_concurrent_modification(storage):
    insert(storage, new_object("uid-1", "alice", attr("Name", b"v1")))
    first, second = get(storage, "uid-1"), get(storage, "uid-1")

    first.attributes = [attr("Name", b"winner")]
    with storage.transaction() as tx:
        tx.update_object(first)

    second.attributes = [attr("Name", b"loser")]
    with pytest.raises(ConcurrentModification), storage.transaction() as tx:
        tx.update_object(second)

    got = get(storage, "uid-1")
    assert got.version == 2
    assert got.attributes == [attr("Name", b"winner")]


def test_update_of_deleted_object_raises_concurrent_modification(storage):
    insert(storage, new_object("uid-1"))
    stale = get(storage, "uid-1")
    with storage.transaction() as tx:
        assert tx.delete_object("uid-1") is True
    with pytest.raises(ConcurrentModification), storage.transaction() as tx:
        tx.update_object(stale)
    assert get(storage, "uid-1") is None


def test_update_of_never_stored_object_raises_concurrent_modification(storage):
    with pytest.raises(ConcurrentModification), storage.transaction() as tx:
        tx.update_object(StoredObject("ghost", "alice", None, version=1))


# Transactions.


def test_exception_inside_transaction_rolls_everything_back(storage):
    insert(storage, new_object("kept", "alice", attr("Name", b"kept")))

    class Boom(Exception):
        pass

    with pytest.raises(Boom), storage.transaction() as tx:
        tx.insert_object(new_object("new", "alice", attr("Name", b"new")))
        tx.set_meta("salt", b"s")
        kept = tx.get_object("kept")
        kept.attributes = []
        tx.update_object(kept)
        assert tx.delete_object("kept")
        raise Boom()

    assert get(storage, "new") is None
    assert locate(storage, equals=(("Name", b"new"),)) == []
    kept = get(storage, "kept")
    assert kept.version == 1
    assert kept.attributes == [attr("Name", b"kept")]
    with storage.transaction() as tx:
        assert tx.get_meta("salt") is None


def test_writes_are_visible_inside_their_own_transaction(storage):
    with storage.transaction() as tx:
        tx.insert_object(new_object("uid-1", "alice", attr("Name", b"n")))
        assert tx.get_object("uid-1", for_update=True).owner == "alice"
        assert tx.locate(LocateQuery(equals=(("Name", b"n"),))) == ["uid-1"]


def _mac(obj: StoredObject, mac: bytes) -> StoredObject:
    obj.row_mac = mac
    return obj


@pytest.mark.parametrize("for_update", [False, True])
def test_a_held_row_still_stored_as_it_was_is_returned_itself(storage, for_update):
    """`held`: the row as the caller holds it. While the stored row is
    `held`'s byte for byte, the caller gets `held` itself; any difference
    (version, MAC, owner, material, an attribute's value or index, one
    missing or one more), and the stored row comes back whole."""
    insert(storage, _mac(new_object("uid-1", "alice", attr("Name", b"a"), attr("x-T", b"t")), b"mac-1"))
    with storage.transaction() as tx:
        held = tx.get_object("uid-1")
        assert tx.get_object("uid-1", for_update=for_update, held=held) is held
    changes = [
        {"version": 2},
        {"row_mac": b"mac-2"},
        {"owner": "mallory"},
        {"sealed_material": b"other"},
        {"attributes": [attr("Name", b"a"), attr("x-T", b"u")]},
        {"attributes": [attr("Name", b"a"), attr("x-T", b"t", index=1)]},
        {"attributes": [attr("Name", b"a")]},
        {"attributes": [attr("Name", b"a"), attr("x-T", b"t"), attr("x-U", b"")]},
    ]
    for change in changes:
        stale = StoredObject(**{**vars(held), **change})
        with storage.transaction() as tx:
            row = tx.get_object("uid-1", for_update=for_update, held=stale)
        assert row is not stale
        assert (row.owner, row.version, row.row_mac, row.sealed_material) == ("alice", 1, b"mac-1", b"sealed")
        assert row.attributes == [attr("Name", b"a"), attr("x-T", b"t")]


def test_a_held_row_is_not_returned_after_an_update_or_once_the_row_is_gone(storage):
    insert(storage, _mac(new_object("uid-1", "alice", attr("Name", b"a")), b"mac-1"))
    held = get(storage, "uid-1")
    with storage.transaction() as tx:
        changed = tx.get_object("uid-1", for_update=True)
        changed.attributes = [attr("Name", b"b")]
        changed.row_mac = b"mac-2"
        tx.update_object(changed)
    with storage.transaction() as tx:
        row = tx.get_object("uid-1", held=held)
    assert row is not held
    assert (row.version, row.row_mac, row.attributes) == (2, b"mac-2", [attr("Name", b"b")])
    with storage.transaction() as tx:
        assert tx.delete_object("uid-1")
    with storage.transaction() as tx:
        assert tx.get_object("uid-1", held=row) is None


def test_a_row_without_a_mac_is_never_taken_for_a_held_one(storage):
    insert(storage, new_object("uid-1", "alice", attr("Name", b"a")))
    held = get(storage, "uid-1")
    assert held.row_mac is None
    with storage.transaction() as tx:
        assert tx.get_object("uid-1", held=held) is not held


def test_transactions_do_not_nest(storage):
    """A nested transaction on one thread would wait for itself; it fails
    instead."""
    with storage.transaction(), pytest.raises(StorageError), storage.transaction():
        pass
    with storage.transaction() as tx:
        assert tx.get_meta("x") is None


def test_transaction_cannot_be_used_after_its_block(storage):
    with storage.transaction() as tx:
        pass
    with pytest.raises(StorageError):
        tx.get_object("uid-1")


# Locate.


@pytest.fixture
def located(storage):
    """Five objects of two owners, inserted out of alphabetical order."""
    insert(
        storage,
        new_object("k-e", "alice", attr("Object Type", b"sym"), attr("Name", b"db")),
        new_object("k-a", "bob", attr("Object Type", b"sym"), attr("Name", b"web")),
        new_object(
            "k-d",
            "alice",
            attr("Object Type", b"sym"),
            attr("Name", b"web", 0),
            attr("Name", b"web-2", 1),
            attr("x-tag", b"blue"),
        ),
        new_object("k-c", "alice", attr("Object Type", b"cert")),
        new_object("k-b", "bob", attr("Object Type", b"sym"), attr("x-tag", b"red")),
    )
    return storage


def test_locate_with_no_criteria_returns_all_in_insertion_order(located):
    assert locate(located) == ["k-e", "k-a", "k-d", "k-c", "k-b"]


def test_locate_by_one_equals_pair(located):
    assert locate(located, equals=(("Object Type", b"sym"),)) == [
        "k-e",
        "k-a",
        "k-d",
        "k-b",
    ]
    assert locate(located, equals=(("Name", b"web-2"),)) == ["k-d"]
    # Equality of bytes: no prefix match, no match across names.
    assert locate(located, equals=(("Name", b"we"),)) == []
    assert locate(located, equals=(("x-tag", b"web"),)) == []


def test_locate_by_several_equals_pairs_needs_all_of_them(located):
    assert locate(located, equals=(("Object Type", b"sym"), ("Name", b"web"))) == [
        "k-a",
        "k-d",
    ]
    assert locate(located, equals=(("Name", b"web"), ("Name", b"web-2"))) == ["k-d"]
    assert locate(located, equals=(("Object Type", b"cert"), ("Name", b"web"))) == []


def test_locate_by_has(located):
    assert locate(located, has=("x-tag",)) == ["k-d", "k-b"]
    assert locate(located, has=("x-tag", "Name")) == ["k-d"]
    assert locate(located, has=("Never Set",)) == []
    assert locate(located, equals=(("Object Type", b"sym"),), has=("Name",)) == [
        "k-e",
        "k-a",
        "k-d",
    ]


def test_locate_with_owner_filter(located):
    assert locate(located, owner="alice") == ["k-e", "k-d", "k-c"]
    assert locate(located, owner="bob", equals=(("Object Type", b"sym"),)) == [
        "k-a",
        "k-b",
    ]
    assert locate(located, owner="carol") == []


def test_locate_pages_with_offset_and_limit(located):
    assert locate(located, limit=2) == ["k-e", "k-a"]
    assert locate(located, offset=2, limit=2) == ["k-d", "k-c"]
    assert locate(located, offset=4, limit=2) == ["k-b"]
    assert locate(located, offset=5) == []
    assert locate(located, offset=3) == ["k-c", "k-b"]
    assert locate(located, limit=0) == []
    # Paging applies after filtering.
    assert locate(located, equals=(("Object Type", b"sym"),), offset=1, limit=2) == [
        "k-a",
        "k-d",
    ]


def test_locate_rejects_negative_offset_and_limit(storage):
    with storage.transaction() as tx:
        with pytest.raises(ValueError):
            tx.locate(LocateQuery(offset=-1))
        with pytest.raises(ValueError):
            tx.locate(LocateQuery(limit=-1))


def test_insertion_order_survives_updates(located):
    with located.transaction() as tx:
        first = tx.get_object("k-e")
        tx.update_object(first)
    assert locate(located)[0] == "k-e"


# Delete.


def test_delete_removes_object_and_cascades_to_attributes(located):
    with located.transaction() as tx:
        assert tx.delete_object("k-d") is True
        assert tx.delete_object("k-d") is False
        assert tx.delete_object("never-there") is False
    assert get(located, "k-d") is None
    assert locate(located, has=("x-tag",)) == ["k-b"]
    assert locate(located, equals=(("Name", b"web-2"),)) == []
    # A new object under the same identifier starts without the old rows.
    insert(located, new_object("k-d", "carol"))
    got = get(located, "k-d")
    assert got.attributes == []
    assert got.version == 1
    assert locate(located)[-1] == "k-d"


# Meta.


def test_meta_get_set_replace(storage):
    with storage.transaction() as tx:
        assert tx.get_meta("barrier.check") is None
        tx.set_meta("barrier.check", b"first")
        assert tx.get_meta("barrier.check") == b"first"
    with storage.transaction() as tx:
        assert tx.get_meta("barrier.check") == b"first"
        tx.set_meta("barrier.check", b"second")
        tx.set_meta("barrier.salt", b"salt")
    with storage.transaction() as tx:
        assert tx.get_meta("barrier.check") == b"second"
        assert tx.get_meta("barrier.salt") == b"salt"
        assert tx.get_meta("other") is None


# Bytes.


def test_binary_values_with_nul_bytes_are_preserved(storage):
    every_byte = bytes(range(256))
    value = b"\x00\x42\x00\x00" + every_byte + b"\x00"
    insert(
        storage,
        new_object(
            "bin", "alice", attr("x-bin", value), sealed=b"\x00" + every_byte + b"\x00"
        ),
    )
    insert(storage, new_object("near", "alice", attr("x-bin", b"\x00\x42\x00")))
    with storage.transaction() as tx:
        tx.set_meta("nul", b"\x00\x00" + every_byte)

    got = get(storage, "bin")
    assert got.sealed_material == b"\x00" + every_byte + b"\x00"
    assert got.attributes == [attr("x-bin", value)]
    assert locate(storage, equals=(("x-bin", value),)) == ["bin"]
    assert locate(storage, equals=(("x-bin", b"\x00\x42\x00"),)) == ["near"]
    with storage.transaction() as tx:
        assert tx.get_meta("nul") == b"\x00\x00" + every_byte


def test_large_attribute_values_are_stored_and_located(storage):
    """Clients choose attribute values; one far larger than a database index
    entry may hold is still stored and found."""
    big = os.urandom(64 * 1024)
    insert(storage, new_object("big", "alice", attr("Description", big)))
    # Another value differing in the last byte only (flipped: a random last
    # byte of zero made the two equal, 1 run in 256).
    insert(
        storage, new_object("other", "alice", attr("Description", big[:-1] + bytes([big[-1] ^ 1])))
    )
    assert get(storage, "big").attributes == [attr("Description", big)]
    assert locate(storage, equals=(("Description", big),)) == ["big"]


# Concurrency.


@pytest.mark.timeout(120)
@pytest.mark.parametrize("for_update", [False, True], ids=["optimistic", "for_update"])
def test_concurrent_read_modify_write_loses_no_increment(storage, for_update):
    """8 threads each add 1 to a counter attribute 25 times, retrying on
    ConcurrentModification; no increment is lost and no other error (such as
    SQLite's "database is locked") escapes."""
    insert(storage, new_object("counter", "alice", attr("count", b"0")))
    threads_n, increments = 8, 25
    errors: list[BaseException] = []
    retries = [0] * threads_n
    start = threading.Barrier(threads_n)

    def work(n: int) -> None:
        try:
            start.wait()
            for _ in range(increments):
                while True:
                    try:
                        with storage.transaction() as tx:
                            obj = tx.get_object("counter", for_update=for_update)
                            (count,) = obj.attributes
                            obj.attributes = [
                                attr("count", str(int(count.value) + 1).encode())
                            ]
                            tx.update_object(obj)
                        break
                    except ConcurrentModification:
                        retries[n] += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=100)
    assert not any(t.is_alive() for t in threads), "workers hung"
    assert errors == []

    got = get(storage, "counter")
    assert got.attributes == [attr("count", str(threads_n * increments).encode())]
    assert got.version == 1 + threads_n * increments


# Persistence and the raw SQLite file.


def test_data_survives_reopening(db_url, backend):
    if backend == "memory":
        pytest.skip("the in-memory fake keeps nothing after close")
    first = open_storage(db_url)
    try:
        insert(first, new_object("uid-1", "alice", attr("Name", b"n"), sealed=b"m"))
        with first.transaction() as tx:
            tx.set_meta("k", b"v")
    finally:
        first.close()
    second = open_storage(db_url)
    try:
        got = get(second, "uid-1")
        assert (got.owner, got.sealed_material, got.attributes) == (
            "alice",
            b"m",
            [attr("Name", b"n")],
        )
        with second.transaction() as tx:
            assert tx.get_meta("k") == b"v"
        assert locate(second, equals=(("Name", b"n"),)) == ["uid-1"]
    finally:
        second.close()


def raw_sqlite_bytes(db_path: Path) -> bytes:
    """Everything SQLite keeps on disk for one database: the main file, and
    the write-ahead log and rollback journal when they exist. Committed data
    can sit in the WAL until a checkpoint, so the main file alone would not
    prove that something is absent."""
    parts = []
    for suffix in ("", "-wal", "-journal"):
        path = Path(str(db_path) + suffix)
        if path.exists():
            parts.append(path.read_bytes())
    return b"".join(parts)


def test_raw_sqlite_file_shows_stored_bytes_and_only_those(tmp_path):
    """The method a later test uses to prove no plaintext key reaches disk:
    a marker stored as sealed material is found in the raw files, and one
    that was never stored is not, both before and after close."""
    db_path = tmp_path / "kms.db"
    stored_marker = b"STORED-" + os.urandom(16).hex().encode()
    absent_marker = b"ABSENT-" + os.urandom(16).hex().encode()

    storage = open_storage(f"sqlite:///{db_path}")
    try:
        insert(
            storage,
            new_object(
                "uid-1", "alice", attr("Name", b"n"), sealed=b"\x00" + stored_marker
            ),
        )
        on_disk = raw_sqlite_bytes(db_path)
        assert stored_marker in on_disk
        assert absent_marker not in on_disk
    finally:
        storage.close()

    on_disk = raw_sqlite_bytes(db_path)
    assert stored_marker in on_disk
    assert absent_marker not in on_disk


# The factory.


def test_open_storage_memory_gives_a_fresh_fake_each_time():
    first, second = open_storage("memory://"), open_storage("memory://")
    insert(first, new_object("uid-1"))
    assert get(second, "uid-1") is None


@pytest.mark.parametrize(
    "url",
    ["mysql://u@h/db", "sqlite://", "sqlite:///:memory:", "not a url"],
)
def test_open_storage_rejects_urls_it_cannot_serve(url):
    with pytest.raises(ValueError):
        open_storage(url)


def test_open_storage_does_not_show_the_password_of_a_rejected_url():
    with pytest.raises(ValueError) as info:
        open_storage("mysql://user:hunter2@host/db")
    assert "hunter2" not in str(info.value)


def test_backend_failures_do_not_carry_stored_values(storage, backend):
    """A database error becomes a StorageError whose text and traceback hold
    no bound values: PostgreSQL, for one, quotes the failing row."""
    if backend == "memory":
        pytest.skip("the in-memory fake has no database errors")
    marker = b"SECRET-" + os.urandom(8).hex().encode()
    with pytest.raises(StorageError) as info:
        insert(storage, StoredObject("uid-1", None, marker, [attr("Name", marker)]))
    shown = "".join(traceback.format_exception(info.value))
    for form in (marker.decode(), marker.hex(), repr(marker)):
        assert form not in shown
    assert get(storage, "uid-1") is None


def test_plain_postgresql_url_uses_psycopg(postgres_url):
    """`postgresql://` means psycopg 3, the driver the project installs,
    not SQLAlchemy's default psycopg2."""
    storage = open_storage(
        postgres_url.replace("postgresql+psycopg://", "postgresql://")
    )
    try:
        insert(storage, new_object("uid-1"))
        assert get(storage, "uid-1").owner == "alice"
    finally:
        storage.close()


def test_read_only_transaction_reads_and_refuses_every_write(storage):
    """A read-only unit of work sees committed objects and refuses insert,
    update, delete and meta writes; nothing it tried is stored."""
    with storage.transaction() as txn:
        txn.insert_object(StoredObject(uid="ro-1", owner="alice", sealed_material=b"s"))
    with storage.transaction(read_only=True) as txn:
        stored = txn.get_object("ro-1")
        assert stored is not None
        assert txn.locate(LocateQuery()) == ["ro-1"]
    for attempt in (
        lambda t: t.insert_object(StoredObject(uid="ro-2", owner="alice", sealed_material=None)),
        lambda t: t.update_object(t.get_object("ro-1")),
        lambda t: t.delete_object("ro-1"),
        lambda t: t.set_meta("k", b"v"),
    ):
        with pytest.raises(StorageError, match="read-only"):
            with storage.transaction(read_only=True) as txn:
                attempt(txn)
    with storage.transaction() as txn:
        assert txn.get_object("ro-2") is None
        assert txn.get_object("ro-1").version == 1
        assert txn.get_meta("k") is None


# --- the audit trail ------------------------------------------------------------------


def _audit_record(seq: int, **kw):
    from kms_server.storage.base import StoredAuditRecord

    fields = dict(
        seq=seq, time=1000.0 + seq, node="n1", operation="GET", uid=f"u{seq % 3}", client="alice",
        result="SUCCESS", x_component=None, x_name=None, x_identifier=None, body=f'{{"seq":{seq}}}', hash=f"h{seq}",
    )
    fields.update(kw)
    return StoredAuditRecord(**fields)


def test_audit_records_append_and_read_back_in_order_with_filters(storage):
    from kms_server.storage.base import AuditQuery

    with storage.transaction() as txn:
        assert txn.audit_head(lock=True) is None
        for seq in range(1, 7):
            txn.insert_audit(_audit_record(seq, x_name="vm1" if seq % 2 else None, x_component="Virtual Machine"))
    with storage.transaction(read_only=True) as txn:
        assert txn.audit_head() == (6, "h6")
        assert [r.seq for r in txn.audit_records(AuditQuery())] == [1, 2, 3, 4, 5, 6]
        assert txn.audit_records(AuditQuery(after_seq=4))[0] == _audit_record(5, x_name="vm1", x_component="Virtual Machine")
        assert [r.seq for r in txn.audit_records(AuditQuery(limit=2, after_seq=1))] == [2, 3]
        assert [r.seq for r in txn.audit_records(AuditQuery(uids=("u1",)))] == [1, 4]
        assert [r.seq for r in txn.audit_records(AuditQuery(names=("vm1",)))] == [1, 3, 5]
        assert [r.seq for r in txn.audit_records(AuditQuery(since=1002.0, until=1004.0))] == [2, 3, 4]
        assert txn.audit_records(AuditQuery(operation="CREATE")) == []


def test_audit_append_rolls_back_with_its_transaction(storage):
    with pytest.raises(RuntimeError):
        with storage.transaction() as txn:
            txn.insert_audit(_audit_record(1))
            raise RuntimeError("the change failed")
    with storage.transaction(read_only=True) as txn:
        assert txn.audit_head() is None


def test_audit_seq_is_unique_and_read_only_transactions_cannot_append(storage):
    with storage.transaction() as txn:
        txn.insert_audit(_audit_record(1))
    with pytest.raises(StorageError):
        with storage.transaction() as txn:
            txn.insert_audit(_audit_record(1, body="other"))
    with pytest.raises(StorageError):
        with storage.transaction(read_only=True) as txn:
            txn.insert_audit(_audit_record(2))
    with storage.transaction(read_only=True) as txn:
        assert txn.audit_head() == (1, "h1")


def test_checkpoints_are_stored_once_per_seq(storage):
    from kms_server.storage.base import StoredCheckpoint

    first = StoredCheckpoint(seq=5, time=1.0, node="n1", head_hash="h5", key_id="k", signature="s1")
    with storage.transaction() as txn:
        assert txn.insert_checkpoint(first) is True
        assert txn.insert_checkpoint(StoredCheckpoint(seq=5, time=2.0, node="n2", head_hash="h5", key_id="k", signature="s2")) is False
        assert txn.insert_checkpoint(StoredCheckpoint(seq=2, time=0.5, node="n1", head_hash="h2", key_id="k", signature="s0"))
    with storage.transaction(read_only=True) as txn:
        assert [c.seq for c in txn.audit_checkpoints()] == [2, 5]
        assert txn.audit_checkpoints()[1] == first


def test_update_rewrites_changed_unchanged_removed_and_added_attributes(storage):
    """An update may keep some values, change some, drop some and add some;
    what is read back (and found by Locate) is exactly the new set."""
    obj = new_object("u-diff", "alice", attr("a", b"1"), attr("b", b"2"), attr("c", b"3"), attr("c", b"4", 1))
    insert(storage, obj)
    stored = get(storage, "u-diff")
    stored.attributes = [attr("a", b"1"), attr("b", b"20"), attr("c", b"3"), attr("d", b"5")]
    with storage.transaction() as txn:
        txn.update_object(stored)
    again = get(storage, "u-diff")
    assert [(x.name, x.index, x.value) for x in again.attributes] == [
        ("a", 0, b"1"), ("b", 0, b"20"), ("c", 0, b"3"), ("d", 0, b"5")
    ]
    assert locate(storage, equals=(("b", b"20"),)) == ["u-diff"]
    assert locate(storage, equals=(("b", b"2"),)) == []
    assert locate(storage, equals=(("c", b"4"),)) == []


# Row MACs and whole-store scans (keystore/row_auth.py relies on them).


def test_row_mac_is_stored_and_replaced_as_given(storage):
    obj = new_object("u1")
    obj.row_mac = b"\x00\x00\x00\x01" + b"m" * 32
    insert(storage, obj)
    assert get(storage, "u1").row_mac == obj.row_mac
    with storage.transaction() as tx:
        stored = tx.get_object("u1")
        stored.row_mac = b"\x00\x00\x00\x02" + b"n" * 32
        tx.update_object(stored)
    assert get(storage, "u1").row_mac == b"\x00\x00\x00\x02" + b"n" * 32
    insert(storage, new_object("u2"))
    assert get(storage, "u2").row_mac is None


def test_scan_objects_pages_in_insertion_order_with_attributes(storage):
    for i in range(7):
        insert(storage, new_object(f"u{i}", "alice", attr("Name", b"n%d" % i), attr("x-Tag", b"t", 0)))
    seen = []
    after = 0
    with storage.transaction(read_only=True) as tx:
        while True:
            page = tx.scan_objects(after, 3)
            seen += page
            if len(page) < 3:
                break
            after = page[-1].sequence
    assert [o.uid for o in seen] == [f"u{i}" for i in range(7)]
    assert all(o == get(storage, o.uid) for o in seen)
    assert [a.name for a in seen[0].attributes] == ["Name", "x-Tag"]


def test_get_meta_for_update_reads_like_get_meta(storage):
    with storage.transaction() as tx:
        tx.set_meta("k", b"v")
    with storage.transaction() as tx:
        assert tx.get_meta("k", for_update=True) == b"v"
        assert tx.get_meta("absent", for_update=True) is None
    with pytest.raises(StorageError):
        with storage.transaction(read_only=True) as tx:
            tx.get_meta("k", for_update=True)


# One committed state per read: on PostgreSQL (READ COMMITTED) one
# statement reads the row and its attributes; on SQLite two statements, in
# one read transaction, one snapshot.


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_read_sees_the_row_and_its_attributes_of_one_commit(backend, tmp_path, request, monkeypatch):
    """A writer that commits while a read transaction is reading an object
    must not leave the reader with the row of one commit and the attributes
    of the next: the row MAC covers both, and such a mix would be refused
    as a row edited outside the server. The writer is run, to its commit,
    just before the reader's statement that reads the attributes (with the
    row, or after it): every statement of the storage's own goes through
    `pg_execute` or `sqlite_execute`."""
    from kms_server.storage import sql

    url = request.getfixturevalue("postgres_url") if backend == "postgresql" else f"sqlite:///{tmp_path}/kms.db"
    executor = "pg_execute" if backend == "postgresql" else "sqlite_execute"
    storage = open_storage(url)
    try:
        insert(storage, new_object("uid-1", "alice", attr("State", b"1"), attr("Name", b"k")))
        reader = threading.get_ident()
        wrote: list[int] = []

        def writer() -> None:
            with storage.transaction() as tx:
                current = tx.get_object("uid-1", for_update=True)
                current.attributes = [attr("State", b"2"), attr("Name", b"k")]
                tx.update_object(current)
                wrote.append(current.version)

        real_execute = getattr(sql, executor)

        def execute(conn, statement, *args, **kwargs):
            reads_attributes = statement.lstrip().startswith("SELECT") and "kms_attributes" in statement
            if threading.get_ident() == reader and not wrote and reads_attributes:
                thread = threading.Thread(target=writer)
                thread.start()
                thread.join(30)
            return real_execute(conn, statement, *args, **kwargs)

        monkeypatch.setattr(sql, executor, execute)
        with storage.transaction(read_only=True) as tx:
            got = tx.get_object("uid-1")
        monkeypatch.setattr(sql, executor, real_execute)
        assert wrote == [2], "the writer did not run inside the read"
        states = {a.value for a in got.attributes if a.name == "State"}
        assert (got.version, states) in ((1, {b"1"}), (2, {b"2"})), (got.version, states)
    finally:
        storage.close()


def test_records_appended_in_one_transaction_chain_on_each_other(storage):
    """A transaction that appends several records reads the audit head once
    and chains the next on the one it inserted (SQL: `audit_tail`); the
    chain verifies, and a later transaction continues it."""
    from kmip_core.audit.chain import verify
    from kms_server.audit.trail import AuditTrail, iter_records

    trail = AuditTrail(storage, "node-1")
    entry = {"event": "request", "operation": "GET", "client": {"name": "alice"}, "result": {"status": "SUCCESS"}}
    with storage.transaction() as tx:
        for _ in range(3):
            trail.append(tx, entry)
    with storage.transaction() as tx:
        assert tx.audit_head(lock=True)[0] == 3
        trail.append(tx, entry)
    records = list(iter_records(storage))
    assert [r.seq for r in records] == [1, 2, 3, 4]
    assert verify(records, [], None).ok


def test_an_update_after_a_locking_read_compares_with_the_rows_that_read_found(postgres_url, pg_statements):
    """PostgreSQL: update_object of the version a locking get_object read
    compares its attributes with the rows that read found, without reading
    them again (the row stayed locked); it still rewrites only what
    changed, and an update of another version reads them again."""
    storage = open_storage(postgres_url)
    try:
        insert(storage, new_object("uid-1", "alice", attr("State", b"1"), attr("Name", b"k"), attr("Name", b"l", 1)))
        sent = pg_statements.start()
        with storage.transaction() as tx:
            current = tx.get_object("uid-1", for_update=True)
            current.attributes = [attr("Name", b"k"), attr("Name", b"l", 1), attr("State", b"2")]
            tx.update_object(current)
            reads = sent.starting("SELECT kms_attributes.id")
            assert len(reads) == 1, "the attribute rows are read once, by the locking read"
            inserts = sent.starting("INSERT INTO kms_attributes")
            assert len(inserts) == 1, "only the changed attribute is written"
            # The version updated is no longer the one read: read again.
            again = tx.get_object("uid-1")
            again.attributes = [attr("Name", b"k"), attr("State", b"3")]
            tx.update_object(again)
            assert len(sent.starting("SELECT kms_attributes.id")) == 2
        with storage.transaction(read_only=True) as tx:
            stored = tx.get_object("uid-1")
        assert stored.version == 3
        assert sorted((a.name, a.index, a.value) for a in stored.attributes) == [("Name", 0, b"k"), ("State", 0, b"3")]
    finally:
        storage.close()


def test_a_database_error_in_an_operation_fails_the_transaction_as_a_storage_error(backend, storage):
    """A statement the database refuses (here: a parameter it cannot bind)
    is raised as StorageError, never as the driver's or SQLAlchemy's error;
    the transaction is then failed: a later operation in it is refused, and
    it ends rolled back, its earlier writes not stored."""
    if backend == "memory":
        pytest.skip("the in-memory fake runs no statements")
    with pytest.raises(StorageError) as failed:
        with storage.transaction() as tx:
            tx.insert_object(new_object("uid-1", "alice", attr("State", b"1")))
            with pytest.raises(StorageError) as refused:
                tx.get_object(object())  # type: ignore[arg-type]
            assert "get_object" in str(refused.value)
            assert tx.failed
            with pytest.raises(StorageError, match="failed and was rolled back"):
                tx.get_object("uid-1")
    assert "rolled back" in str(failed.value)
    with storage.transaction(read_only=True) as tx:
        assert tx.get_object("uid-1") is None
