"""The storage contract.

Storage is untrusted: it only ever sees sealed key material (opaque bytes
from the keystore's barrier) and attribute values already encoded as TTLV.
Every backend (SQL through SQLAlchemy for SQLite and PostgreSQL, and an
in-memory fake for unit tests) implements this interface and passes the
contract suite in tests/kms_server/storage/ unchanged.

All methods are synchronous; the server calls them from worker threads,
never from the reactor thread.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from kmip_core.server.backend import BackendUnavailable


class StorageError(Exception):
    """The backend failed; the transaction was rolled back."""


class StorageUnavailable(StorageError, BackendUnavailable):
    """The database could not be reached or the connection dropped. Nothing
    was committed, unless `commit_unknown` is set: then the connection was
    lost while committing and the change may or may not be stored. The
    dispatcher retries it as any backend's (kmip_core.server.dispatcher)."""

    def __init__(self, message: str, commit_unknown: bool = False):
        BackendUnavailable.__init__(self, message, commit_unknown)


class ObjectExists(StorageError):
    """insert_object with a unique identifier that is already stored."""


class ConcurrentModification(StorageError):
    """update_object saw a row version other than the one it expected."""


class StoredAttribute(NamedTuple):
    """One value of one attribute. `value` is the TTLV encoding of the value
    item (tag Attribute Value), so equal values have equal bytes and Locate
    is an indexed equality lookup. A tuple, so immutable and equal to the
    (name, index, value) row it was read from; built for every attribute
    row read or written, at a third of a frozen dataclass's cost."""

    name: str
    index: int  # type: ignore[assignment]  # the field, not tuple.index
    value: bytes


@dataclass
class StoredObject:
    uid: str
    owner: str
    sealed_material: bytes | None
    attributes: list[StoredAttribute] = field(default_factory=list)
    # Row version for optimistic concurrency; the backend sets it on insert
    # (to 1) and increments it on every update.
    version: int = 0
    # Insertion order, assigned by the backend; Locate returns objects in it.
    sequence: int = 0
    # The keystore's MAC over the row (keystore/row_auth.py); stored and
    # returned as given, never interpreted by storage.
    row_mac: bytes | None = None


@dataclass(frozen=True)
class LocateQuery:
    """Objects whose attributes include every (name, value) pair of
    `equals` (values as TTLV bytes), and, for each name in `has`, at least one
    value of that name, and none of the (name, value) pairs of `excluded`.
    `owner` restricts to one owner (None: any owner), `uid` to the object
    of that unique identifier (None: any object).

    `uid` adds nothing an `equals` condition on the Unique Identifier
    attribute (which every object carries, equal to its uid) does not ask
    already; the keystore passes both, so that the object is found by its
    row: the lookup index leaves Unique Identifier out (sql.NOT_LOOKED_UP),
    and a Locate by it alone would otherwise read every object."""

    equals: tuple[tuple[str, bytes], ...] = ()
    has: tuple[str, ...] = ()
    excluded: tuple[tuple[str, bytes], ...] = ()
    owner: str | None = None
    uid: str | None = None
    offset: int = 0
    limit: int | None = None


@dataclass(frozen=True)
class StoredAuditRecord:
    """One record of the audit trail. `body` is the record's canonical JSON
    (what its hash covers, see kmip_core/audit/chain.py); the other
    columns repeat fields of the body so that the trail can be searched
    with indexes, and verification checks that they still agree."""

    seq: int
    time: float
    node: str
    operation: str
    uid: str | None
    client: str
    result: str
    x_component: str | None
    x_name: str | None
    x_identifier: str | None
    body: str
    hash: str


@dataclass(frozen=True)
class StoredCheckpoint:
    """A signed statement that the trail's record `seq` has hash `head_hash`."""

    seq: int
    time: float
    node: str
    head_hash: str
    key_id: str
    signature: str


@dataclass(frozen=True)
class AuditQuery:
    """Records with seq > `after_seq`, in seq order, matching every filter
    that is set. `names` matches x-Name or x-Identifier; `component`
    x-Component."""

    after_seq: int = 0
    limit: int | None = None
    uids: tuple[str, ...] | None = None
    operation: str | None = None
    client: str | None = None
    result: str | None = None
    since: float | None = None
    until: float | None = None
    names: tuple[str, ...] | None = None
    component: str | None = None


class Transaction(abc.ABC):
    # Whether this transaction writes nothing and every read of it sees one
    # snapshot of the database: SQLite's read transactions. Not
    # PostgreSQL's (READ COMMITTED: a snapshot per statement), nor a write
    # transaction's (what it reads may still be rolled back). The keystore
    # then takes an unchanged store digest as unchanged rows
    # (keystore/verified_rows.py).
    snapshot_reads = False

    @abc.abstractmethod
    def insert_object(self, obj: StoredObject) -> None:
        """Store a new object with its attributes; raises ObjectExists."""

    @abc.abstractmethod
    def get_object(
        self, uid: str, for_update: bool = False, held: StoredObject | None = None
    ) -> StoredObject | None:
        """The object with its attributes, or None. `for_update` locks the
        row until the transaction ends where the backend can. `held`: the
        row as the caller already holds it: if the stored row, MAC (not
        None) and attribute rows included, is `held`'s byte for byte,
        `held` itself is returned, so the caller need not authenticate and
        decode it again."""

    @abc.abstractmethod
    def update_object(self, obj: StoredObject) -> None:
        """Replace owner, sealed material, row MAC and all attributes of an existing
        object if its stored version still equals obj.version; the stored
        version is then incremented and obj.version updated. Raises
        ConcurrentModification otherwise (also when the object is gone)."""

    @abc.abstractmethod
    def delete_object(self, uid: str) -> bool:
        """Remove the object and its attributes; True if it existed."""

    @abc.abstractmethod
    def scan_objects(self, after_sequence: int = 0, limit: int = 500) -> list[StoredObject]:
        """Up to `limit` objects with their attributes, in insertion order,
        whose sequence is above `after_sequence`: a whole-store pass (the
        integrity check, rotation) pages through it without a query per
        object."""

    @abc.abstractmethod
    def locate(self, query: LocateQuery) -> list[str]:
        """Unique identifiers matching the query, in insertion order."""

    @abc.abstractmethod
    def get_meta(self, key: str, for_update: bool = False) -> bytes | None:
        """A small server-wide value (e.g. the barrier's keyring).
        `for_update` locks it until the transaction ends where the backend
        can (write transactions only)."""

    @abc.abstractmethod
    def set_meta(self, key: str, value: bytes) -> None:
        """Insert or replace a server-wide value."""

    # Work that must follow the commit, not precede it: handing an audit
    # record to the sinks, remembering a row version as seen. A node may
    # commit a write transaction after its block has returned (SQLite
    # writes in the reactor thread, kms_server/storage/reactor_writes.py).
    def after_commit(self, fn: Callable[[], None]) -> None:
        """Call `fn` once this transaction is committed; never if it is
        rolled back."""
        self.__dict__.setdefault("_after_commit", []).append(fn)

    def run_after_commit(self) -> None:
        """For the storage that committed it: run what `after_commit` registered."""
        for fn in self.__dict__.pop("_after_commit", ()):
            fn()


    # The audit trail (kms_server/audit). Records are only ever appended.
    @abc.abstractmethod
    def audit_head(self, lock: bool = False) -> tuple[int, str] | None:
        """(seq, hash) of the last record, or None for an empty trail.
        `lock` serializes appenders across every node until the transaction
        ends (write transactions only)."""

    @abc.abstractmethod
    def insert_audit(self, record: StoredAuditRecord) -> None:
        """Append one record; its seq must be new."""

    def insert_audits(self, records: list[StoredAuditRecord]) -> None:
        """Append records (consecutive, in order), as `insert_audit` does
        each; a backend may send them in one statement (SqlStorage on
        PostgreSQL: one round trip for a batch's records)."""
        for record in records:
            self.insert_audit(record)

    @abc.abstractmethod
    def audit_records(self, query: AuditQuery) -> list[StoredAuditRecord]:
        """Records matching the query, in seq order."""

    @abc.abstractmethod
    def insert_checkpoint(self, checkpoint: StoredCheckpoint) -> bool:
        """Store a checkpoint; False (and nothing stored) if one for that
        seq exists already."""

    @abc.abstractmethod
    def audit_checkpoints(self) -> list[StoredCheckpoint]:
        """Every checkpoint, in seq order."""


def iter_objects(txn: Transaction, page: int = 500):
    """Every stored object, in insertion order, a page at a time."""
    after = 0
    while True:
        batch = txn.scan_objects(after, page)
        yield from batch
        if len(batch) < page:
            return
        after = batch[-1].sequence


class ReactorBatches(Protocol):
    """Write batches a reactor thread fills and commits (SQLite's
    WriteBatches; kms_server/storage/reactor_writes.py says how)."""

    @property
    def reactor_batch_open(self) -> bool: ...

    @property
    def lock_path(self) -> str | None:
        """The writers' flock file (kms_server.storage.sql.writer_flock)."""

    def open_reactor_batch(self) -> bool: ...

    @property
    def reactor_members(self) -> int: ...

    def wait_reactor_batch(self) -> None: ...

    def end_reactor_batch(self) -> StorageError | UnsyncedCommit | None: ...


class UnsyncedCommit(Protocol):
    """A reactor batch committed whose changes are not yet durable
    (ReactorBatches.end_reactor_batch): its log synced, by `sync()` on a
    thread that may block or by another process (`database`, then
    `settle(its OSError or None)`), then `durable()` in the reactor thread
    if that gave None; nobody is told of the batch's changes before."""

    @property
    def database(self) -> str: ...

    def sync(self) -> StorageError | None: ...

    def settle(self, error: OSError | None) -> StorageError | None: ...

    def lost(self, why: str) -> StorageError: ...

    def durable(self) -> None: ...


class Storage(abc.ABC):
    # Whether a read is a lookup in local files that never waits on the
    # network, and whether write transactions call
    # kmip_core.nonblocking.would_block before they wait: then a node runs
    # reads in its reactor thread (SQLite).
    reads_in_reactor: bool = False

    @abc.abstractmethod
    def transaction(self, read_only: bool = False) -> AbstractContextManager[Transaction]:
        """A unit of work: committed when the block exits normally, rolled
        back when it raises. Backend failures surface as StorageError. A
        `read_only` transaction refuses every write with StorageError; a
        backend may serve it without taking write locks."""

    def reactor_batches(self) -> ReactorBatches | None:
        """Where a reactor thread's writes go, if this backend lets a
        reactor write without waiting (SQLite); None otherwise."""
        return None

    def on_shared_commit(self, report: Callable[[int, bool], None]) -> None:
        """Have `report(writes, committed)` called after each commit that
        write transactions of worker threads shared (group commit of a SQL
        backend; the reactor's own batches are reported by their owner).
        A backend without group commit never calls it."""
        return None

    @abc.abstractmethod
    def close(self) -> None:
        """Release connections."""
