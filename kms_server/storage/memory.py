"""An in-memory fake of the storage contract, for unit tests.

One lock serializes whole transactions, as SQLite's BEGIN IMMEDIATE does.
Objects are copied on the way in and out, so callers cannot change stored
state behind the storage's back.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

from kms_server.storage.base import (
    AuditQuery,
    ConcurrentModification,
    LocateQuery,
    ObjectExists,
    Storage,
    StorageError,
    StoredAttribute,
    StoredAuditRecord,
    StoredCheckpoint,
    StoredObject,
    Transaction,
)

__all__ = ["MemoryStorage"]


@dataclass
class _State:
    objects: dict[str, StoredObject] = field(default_factory=dict)
    meta: dict[str, bytes] = field(default_factory=dict)
    next_sequence: int = 1
    audit: dict[int, StoredAuditRecord] = field(default_factory=dict)
    checkpoints: dict[int, StoredCheckpoint] = field(default_factory=dict)

    def snapshot(self) -> _State:
        return _State(dict(self.objects), dict(self.meta), self.next_sequence, dict(self.audit), dict(self.checkpoints))


def _copy_object(obj: StoredObject) -> StoredObject:
    # bytes() also turns a caller's bytearray into the immutable bytes the
    # SQL backends return.
    return StoredObject(
        uid=obj.uid,
        owner=obj.owner,
        sealed_material=None
        if obj.sealed_material is None
        else bytes(obj.sealed_material),
        attributes=sorted(
            (StoredAttribute(a.name, a.index, bytes(a.value)) for a in obj.attributes),
            key=lambda a: (a.name, a.index),
        ),
        version=obj.version,
        sequence=obj.sequence,
        row_mac=obj.row_mac,
    )


def _check_query(query: LocateQuery) -> None:
    if query.offset < 0:
        raise ValueError("LocateQuery.offset must not be negative")
    if query.limit is not None and query.limit < 0:
        raise ValueError("LocateQuery.limit must not be negative")


class _MemoryTransaction(Transaction):
    def __init__(self, state: _State, read_only: bool = False) -> None:
        self._state = state
        self._read_only = read_only
        self._closed = False
        self.failed = False

    @contextlib.contextmanager
    def _op(self, what: str, write: bool = False) -> Iterator[None]:
        if self._closed:
            raise StorageError(f"{what}: the transaction has ended")
        if write and self._read_only:
            self.failed = True
            raise StorageError(f"{what}: the transaction is read-only")
        if self.failed:
            raise StorageError(f"{what}: the transaction failed and was rolled back")
        try:
            yield
        except StorageError:
            self.failed = True
            raise

    def insert_object(self, obj: StoredObject) -> None:
        with self._op("insert_object", write=True):
            if obj.uid in self._state.objects:
                raise ObjectExists(f"object {obj.uid!r} already exists")
            stored = _copy_object(obj)
            stored.version = 1
            stored.sequence = self._state.next_sequence
            self._state.next_sequence += 1
            self._state.objects[obj.uid] = stored
            obj.version = stored.version
            obj.sequence = stored.sequence

    def get_object(
        self, uid: str, for_update: bool = False, held: StoredObject | None = None
    ) -> StoredObject | None:
        # The transaction already holds the only lock, so for_update adds
        # nothing.
        with self._op("get_object"):
            stored = self._state.objects.get(uid)
            if stored is None:
                return None
            if (
                held is not None
                and stored.row_mac is not None
                and (stored.version, stored.row_mac, stored.owner, stored.sealed_material)
                == (held.version, held.row_mac, held.owner, held.sealed_material)
                and _attribute_rows(stored) == _attribute_rows(held)
            ):
                return held
            return _copy_object(stored)

    def update_object(self, obj: StoredObject) -> None:
        with self._op("update_object", write=True):
            stored = self._state.objects.get(obj.uid)
            if stored is None or stored.version != obj.version:
                raise ConcurrentModification(
                    f"object {obj.uid!r} is gone or no longer at version {obj.version}"
                )
            replacement = _copy_object(obj)
            replacement.version = stored.version + 1
            replacement.sequence = stored.sequence
            self._state.objects[obj.uid] = replacement
            obj.version = replacement.version

    def delete_object(self, uid: str) -> bool:
        with self._op("delete_object", write=True):
            return self._state.objects.pop(uid, None) is not None

    def scan_objects(self, after_sequence: int = 0, limit: int = 500) -> list[StoredObject]:
        with self._op("scan_objects"):
            found = sorted(
                (o for o in self._state.objects.values() if o.sequence > after_sequence), key=lambda o: o.sequence
            )
            return [_copy_object(o) for o in found[:limit]]

    def locate(self, query: LocateQuery) -> list[str]:
        _check_query(query)
        with self._op("locate"):
            found = []
            for obj in sorted(self._state.objects.values(), key=lambda o: o.sequence):
                if query.owner is not None and obj.owner != query.owner:
                    continue
                if query.uid is not None and obj.uid != query.uid:
                    continue
                pairs = {(a.name, a.value) for a in obj.attributes}
                names = {a.name for a in obj.attributes}
                if (
                    all((n, bytes(v)) in pairs for n, v in query.equals)
                    and all(n in names for n in query.has)
                    and not any((n, bytes(v)) in pairs for n, v in query.excluded)
                ):
                    found.append(obj.uid)
            end = None if query.limit is None else query.offset + query.limit
            return found[query.offset : end]

    def get_meta(self, key: str, for_update: bool = False) -> bytes | None:
        with self._op("get_meta", write=for_update):
            return self._state.meta.get(key)

    def set_meta(self, key: str, value: bytes) -> None:
        with self._op("set_meta", write=True):
            self._state.meta[key] = bytes(value)


    def audit_head(self, lock: bool = False) -> tuple[int, str] | None:
        with self._op("audit_head", write=lock):
            if not self._state.audit:
                return None
            last = self._state.audit[max(self._state.audit)]
            return last.seq, last.hash

    def insert_audit(self, record: StoredAuditRecord) -> None:
        with self._op("insert_audit", write=True):
            if record.seq in self._state.audit:
                raise StorageError(f"insert_audit: record {record.seq} exists")
            self._state.audit[record.seq] = record

    def audit_records(self, query: AuditQuery) -> list[StoredAuditRecord]:
        with self._op("audit_records"):
            found = [r for seq, r in sorted(self._state.audit.items()) if seq > query.after_seq and _matches(r, query)]
            return found if query.limit is None else found[: query.limit]

    def insert_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
        with self._op("insert_checkpoint", write=True):
            if checkpoint.seq in self._state.checkpoints:
                return False
            self._state.checkpoints[checkpoint.seq] = checkpoint
            return True

    def audit_checkpoints(self) -> list[StoredCheckpoint]:
        with self._op("audit_checkpoints"):
            return [c for _, c in sorted(self._state.checkpoints.items())]


def _matches(r: StoredAuditRecord, q: AuditQuery) -> bool:
    return (
        (q.uids is None or r.uid in q.uids)
        and (q.operation is None or r.operation == q.operation)
        and (q.client is None or r.client == q.client)
        and (q.result is None or r.result == q.result)
        and (q.since is None or r.time >= q.since)
        and (q.until is None or r.time <= q.until)
        and (q.names is None or r.x_name in q.names or r.x_identifier in q.names)
        and (q.component is None or r.x_component == q.component)
    )


class MemoryStorage(Storage):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._local = threading.local()
        self._state = _State()
        self._closed = False

    @contextlib.contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Transaction]:
        # Without this check a nested transaction would deadlock on _lock.
        if getattr(self._local, "active", False):
            raise StorageError("transactions do not nest")
        if self._closed:
            raise StorageError("the storage is closed")
        self._local.active = True
        try:
            with self._lock:
                # Stored values are never changed in place (copied in and
                # out, replaced on update), so a copy of the dictionaries is
                # a complete snapshot to roll back to; a read-only
                # transaction cannot write and needs none.
                snapshot = None if read_only else self._state.snapshot()
                tx = _MemoryTransaction(self._state, read_only)
                try:
                    yield tx
                except BaseException:
                    if snapshot is not None:
                        self._state = snapshot
                    raise
                finally:
                    tx._closed = True
                if tx.failed:
                    if snapshot is not None:
                        self._state = snapshot
                    raise StorageError("the transaction failed and was rolled back")
                tx.run_after_commit()
        finally:
            self._local.active = False

    def close(self) -> None:
        self._closed = True


def _attribute_rows(obj: StoredObject) -> list[tuple[str, int, bytes]]:
    return sorted((a.name, a.index, a.value) for a in obj.attributes)
