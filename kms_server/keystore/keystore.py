"""The keystore: managed objects, their attributes and lifecycle, access
policy, and the at-rest barrier, over one storage transaction.

Operations call it inside `with keystore.transaction() as txn:`; every
method takes the transaction, the calling principal and the request's
clock, so nothing here keeps per-request state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kmip.core.enums import ObjectType, State

from kmip_core import errors
from kmip_core.audit.record import AuditDraft
from kmip_core.policy import Action, Principal, check, may_see
from kmip_core.sealing.barrier import Barrier, BarrierError, UnknownTerm
from kmip_core.server.backend import Backend, Trail
from kmip_core.ttlv import Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore import lifecycle, row_auth
from kms_server.keystore.objects import ManagedObject, Material
from kms_server.keystore.streams import Streams
from kms_server.keystore.uids import new_uid
from kms_server.keystore.verified_rows import DEFAULT_SIZE, VerifiedRows
from kms_server.storage.base import (
    ConcurrentModification,
    LocateQuery,
    ObjectExists,
    Storage,
    StoredObject,
    Transaction,
)

log = logging.getLogger("kms_server.keystore")

# The row versions the running write transaction makes true once it
# commits, for the keystore whose `seen` they go to. A ContextVar: work
# of the reactor thread that waits for the writer's turn runs in a context
# of its own (kmip_core.nonblocking.Work), while others run meanwhile.
_PENDING: ContextVar[tuple[row_auth.SeenVersions, list[tuple[str, int]]] | None] = ContextVar(
    "kms_server.keystore.pending", default=None
)


@dataclass
class PreparedObject:
    """A new object ready to be stored (`Keystore.prepare_object`): built,
    its row (`stored`) sealed and authenticated under data key `term`.
    Holds the key material in the clear until stored, as the request does."""

    obj: ManagedObject
    material: Material | None
    stored: StoredObject
    term: int


class Keystore:
    # (trail, draft) when bound to one request item by `for_item`.
    _audit: tuple[Trail, AuditDraft] | None = None
    # The batch's one transaction when bound by `in_batch`.
    _batch_txn: Transaction | None = None

    def __init__(self, storage: Storage, barrier: Barrier, verified_rows: int = DEFAULT_SIZE):
        self.storage = storage
        self.barrier = barrier
        # Rows authenticated by this process, by unique identifier: a read
        # that finds the stored row unchanged, byte for byte, skips its MAC
        # check (verified_rows.py has the rule).
        self.rows = VerifiedRows(verified_rows)
        # The store digest as this process last wrote it (row_auth.LastDigest).
        self.last_digest = row_auth.LastDigest()
        # Multi-part Encrypt/Decrypt in progress on this node (shared by
        # the per-item views, which copy this object).
        self.streams = Streams()
        # Highest row version seen per object (rollback detection), and
        # the versions a running transaction will make true once it commits.
        self.seen = row_auth.SeenVersions()
        # A store without a digest gets one (rows made before row
        # authentication are adopted once); one whose digest was removed
        # is refused here.
        with storage.transaction() as txn:
            row_auth.ensure_digest(txn, barrier)

    def _view(self) -> Keystore:
        """A shallow copy sharing everything (copy.copy, without the
        __reduce_ex__ it goes through: one is made per request item)."""
        bound = object.__new__(type(self))
        bound.__dict__.update(self.__dict__)
        return bound

    def for_item(self, trail: Trail | None, draft: AuditDraft) -> Keystore:
        """A view of this keystore for one request item: its write
        transactions commit the item's audit record with the change, and
        every object it touches is noted in `draft`. The view is made per
        item and shared with nothing else."""
        bound = self._view()
        # The dispatcher makes a draft only with a trail (auditing on).
        bound._audit = (trail, draft) if trail is not None else None
        return bound

    def batch_transaction(self) -> AbstractContextManager[Transaction]:
        """The one transaction of a batch run with Undo (the Backend protocol
        of kmip_core.server.dispatcher)."""
        return self.storage.transaction()

    def in_batch(self, txn: Transaction, trail: Trail | None, draft: AuditDraft | None) -> Keystore:
        """A view for one item of a batch run with Batch Error Continuation
        Option Undo: every transaction of the item is the batch's `txn`
        (read-only ones too), so that a later failure rolls back this item's
        changes with the rest. Objects it touches are noted in `draft`; the
        dispatcher writes the audit records once it knows the batch's fate."""
        bound = self._view()
        bound._audit = (trail, draft) if trail is not None and draft is not None else None
        bound._batch_txn = txn
        return bound

    @contextmanager
    def transaction(self, read_only: bool = False) -> Iterator[Transaction]:
        if self._batch_txn is not None:
            # Versions seen inside an Undo batch may be rolled back with
            # it: they are not remembered.
            yield self._batch_txn
            return
        pending: list[tuple[str, int]] = []
        token = _PENDING.set((self.seen, pending))
        try:
            with self.storage.transaction(read_only=read_only) as txn:
                yield txn
                record = None
                if self._audit is not None and not read_only:
                    # The block finished: the change and its record commit
                    # together, or neither does (docs/audit-trail.md).
                    trail, draft = self._audit
                    record = trail.append(txn, draft.entry("SUCCESS", None))
                    draft.written = record
                # Only what is committed is remembered and published: the
                # commit may come after this block (a reactor batch).
                txn.after_commit(lambda: self._committed(pending, record))
        finally:
            _PENDING.reset(token)

    def _committed(self, pending: list[tuple[str, int]], record: object) -> None:
        for uid, version in pending:
            self.seen.note(uid, version)
        if record is not None and self._audit is not None:  # a record is made only when audited
            self._audit[0].publish(record)

    def _touch(self, obj: ManagedObject) -> None:
        if self._audit is not None:
            self._audit[1].touch(obj)

    def _note_version(self, uid: str, version: int) -> None:
        pending = _PENDING.get()
        if pending is not None and pending[0] is self.seen:
            pending[1].append((uid, version))

    def _refused(self, uid: str, problem: str) -> errors.IntegrityFailure:
        log.error("object %s refused: %s", uid, problem)
        if self._audit is not None:
            self._audit[1].note_uid(uid)
        return errors.IntegrityFailure(f"object {uid} failed its integrity check and is not served")

    def _verified(self, txn: Transaction, stored, held: bool = False) -> None:
        """Raise IntegrityFailure unless the row is authentic and not older
        than a version this node has seen. `held`: the row is one of
        `self.rows`, authenticated when it was kept; its MAC is checked
        again only if the keyring no longer holds the data key it names (a
        rotation retired it: such a row is refused)."""
        try:
            if not (held and self.barrier.knows_mac_term(stored.row_mac)):
                try:
                    row_auth.verify(self.barrier, stored)
                except UnknownTerm:
                    # A rotation elsewhere made a data key this node has not read.
                    self.barrier.refresh(txn, force=True)
                    row_auth.verify(self.barrier, stored)
            self.seen.check(stored.uid, stored.version)
        except (row_auth.RowIntegrityError, BarrierError) as exc:
            problem = exc.problem if isinstance(exc, row_auth.RowIntegrityError) else str(exc)
            raise self._refused(stored.uid, problem) from None

    def _write_row(
        self, txn: Transaction, stored, before: tuple[int, bytes] | None, signed_under: int | None = None
    ) -> None:
        """Authenticate `stored` at the version it is about to get (1 for a
        new row) and move the store digest from its previous row (`before`:
        version and MAC; None: a new row, inserted). `signed_under`: the
        data key `stored` was already authenticated under, before the
        transaction; it is signed again only if the keyring moved on since."""
        self.barrier.refresh(txn)
        version = 1 if before is None else stored.version + 1
        if signed_under != self.barrier.active_term:
            row_auth.sign(self.barrier, stored, version)
        try:
            removed = [] if before is None else [row_auth.element(self.barrier, stored.uid, *before)]
            added = [row_auth.element(self.barrier, stored.uid, version, stored.row_mac)]
            if before is None:
                txn.insert_object(stored)
            else:
                txn.update_object(stored)
            row_auth.apply(txn, self.barrier, removed, added, self.last_digest)
        except row_auth.RowIntegrityError as exc:
            raise self._refused(stored.uid, exc.problem) from None
        self._note_version(stored.uid, version)
        # Signed here at the version it now has: the next read of it, by
        # this or a later request, need not authenticate and decode it.
        self.rows.put(stored)

    # Creation.
    def validate_client_attributes(
        self,
        object_type: ObjectType,
        given: Iterable[tuple[str, Item]],
        implied: Iterable[str] = (),
    ) -> dict[str, list[Item]]:
        """Check attributes a client supplies at creation: known names, right
        types, settable by a client, applicable to the object type, single
        values where the specification allows only one. Names in `implied`
        (attributes the registered material determines, such as a
        certificate's Certificate Type) are accepted although the server
        sets them: the caller then checks the value against the material."""
        implied = frozenset(implied)
        result: dict[str, list[Item]] = {}
        for name, value in given:
            if value is None:
                raise errors.InvalidField(f"attribute {name!r} has no value")
            spec = attrs.check_known(name)
            attrs.check_value_type(name, value)
            if spec is not None:
                if not spec.client_initial and name not in implied:
                    raise errors.AttributeReadOnly(f"attribute {name!r} is set by the server")
                if object_type not in spec.applies_to:
                    raise errors.InvalidField(f"attribute {name!r} does not apply to a {object_type.name}")
            values = result.setdefault(name, [])
            value = attrs.as_value(value)
            if spec is not None and not spec.multi and values:
                if values[0] == value:
                    continue
                raise errors.AttributeSingleValued(f"attribute {name!r} takes a single value")
            if value not in values:
                values.append(value)
        return result

    def new_object(
        self,
        txn: Transaction,
        principal: Principal,
        object_type: ObjectType,
        attributes: dict[str, list[Item]],
        material: Material | None,
        now: int,
        uid: str | None = None,
        owner: str | None = None,
    ) -> ManagedObject:
        """Store a new object. Its owner is the caller, or `owner` when the
        object replaces one the caller may manage (ReKey by an administrator
        keeps the key with its owner)."""
        return self.store_object(txn, self.prepare_object(principal, object_type, attributes, material, now, uid, owner))

    def prepare_object(
        self,
        principal: Principal,
        object_type: ObjectType,
        attributes: dict[str, list[Item]],
        material: Material | None,
        now: int,
        uid: str | None = None,
        owner: str | None = None,
    ) -> PreparedObject:
        """A new object built, sealed and row-authenticated outside any
        transaction, for `store_object`: on SQLite a node's writes take
        turns, so what a write computes before its turn does not hold up
        the others (issue 15). Refuses what `new_object` refuses."""
        check(principal, Action.CREATE)
        attrs.check_quantum_safe(object_type, attributes)
        uid = uid or new_uid()
        obj = ManagedObject(uid=uid, owner=owner or principal.name, attributes=dict(attributes))
        obj.set_value("Unique Identifier", uid)
        obj.set_value("Object Type", object_type.value)
        obj.set_value("Initial Date", now)
        obj.set_value("Original Creation Date", now)
        obj.set_value("Last Change Date", now)
        if object_type in lifecycle.STATEFUL_TYPES:
            obj.set_value("State", State.PRE_ACTIVE.value)
            lifecycle.apply_dates(obj, now)
        return self._sealed_and_signed(obj, material)

    def _sealed_and_signed(self, obj: ManagedObject, material: Material | None) -> PreparedObject:
        """`obj` with its material sealed and its row authenticated
        (version 1) under the barrier's active data key."""
        term = self.barrier.active_term
        if material is not None:
            obj.sealed_material = self.barrier.seal(obj.uid, material.to_bytes())
        stored = obj.to_stored()
        row_auth.sign(self.barrier, stored, 1)
        return PreparedObject(obj, material, stored, term)

    def store_object(self, txn: Transaction, prepared: PreparedObject) -> ManagedObject:
        """Insert an object `prepare_object` made. If the keyring moved to
        another data key since (a rotation this node has just read), the
        object is sealed and authenticated again under the new one: a
        rotation must find no object left under the key it retires."""
        self.barrier.refresh(txn)
        if prepared.term != self.barrier.active_term:
            prepared = self._sealed_and_signed(prepared.obj, prepared.material)
        obj, stored = prepared.obj, prepared.stored
        try:
            self._write_row(txn, stored, None, signed_under=prepared.term)
        except ObjectExists:
            raise errors.ObjectAlreadyExists(f"object {obj.uid} already exists") from None
        obj.version = 1
        obj.row_mac = stored.row_mac
        self._touch(obj)
        return obj

    # Reading.
    def load(
        self,
        txn: Transaction,
        principal: Principal,
        uid: str,
        action: Action,
        now: int,
        for_update: bool = False,
    ) -> ManagedObject:
        if not isinstance(uid, str):
            raise errors.ItemNotFound(f"no object with unique identifier {uid!r}")
        # In a transaction that reads one snapshot and writes nothing, the
        # store digest: a row held under the digest read now is the stored
        # row, since every write of any object moves the digest
        # (keystore/verified_rows.py), and it is not read again.
        digest = txn.get_meta(row_auth.DIGEST_META) if txn.snapshot_reads and not for_update else None
        held, current = self.rows.get_current(uid, digest)
        stored = held if current else txn.get_object(uid, for_update=for_update, held=held)
        if stored is None:
            raise errors.ItemNotFound(f"no object with unique identifier {uid!r}")
        # Authenticated before anything in the row is believed, the owner
        # first of all.
        self._verified(txn, stored, held=stored is held)
        if stored is not held:
            self.rows.put(stored, digest)
        elif digest is not None and not current:
            self.rows.retag(stored, digest)
        self.rows.count(stored is held)
        if not may_see(principal, stored.owner):
            raise errors.ItemNotFound(f"no object with unique identifier {uid!r}")
        self._note_version(stored.uid, stored.version)
        check(principal, action, stored.owner)
        obj = ManagedObject.from_stored(stored)
        lifecycle.apply_dates(obj, now)
        self._touch(obj)
        return obj

    def material(self, obj: ManagedObject) -> Material:
        if obj.sealed_material is None:
            raise errors.KeyValueNotPresent(f"object {obj.uid} has no key material (destroyed)")
        try:
            return Material.from_bytes(self.barrier.unseal(obj.uid, obj.sealed_material))
        except BarrierError as exc:
            # The row's MAC covers the blob, so this is a wrong keyring.
            raise self._refused(obj.uid, str(exc)) from None

    def reseal(self, obj: ManagedObject, material: Material | None) -> None:
        obj.sealed_material = None if material is None else self.barrier.seal(obj.uid, material.to_bytes())

    # Writing.
    def save(self, txn: Transaction, obj: ManagedObject, now: int) -> None:
        stored, before = self._changed_row(obj, now)
        try:
            self._write_row(txn, stored, before)
        except ConcurrentModification:
            raise errors.IllegalOperation(
                f"object {obj.uid} was changed by a concurrent request; retry"
            ) from None
        self._saved(obj, stored)

    def save_if_unchanged(self, obj: ManagedObject, now: int) -> bool:
        """Write `obj`, loaded and checked by an earlier transaction and
        changed since by the caller, in a write transaction of its own if
        its row is still at the version it was read at (the update's
        version check). The row is built and authenticated before that
        transaction, so on SQLite it holds the node's write turn only for
        the SQL (issue 15). Returns False, having written nothing, if
        another writer changed the row in between, or inside a batch run
        with Undo: the caller then loads the object again under lock."""
        if self._batch_txn is not None:
            return False
        stored, before = self._changed_row(obj, now)
        term = self.barrier.active_term
        row_auth.sign(self.barrier, stored, stored.version + 1)
        try:
            with self.transaction() as txn:
                self._write_row(txn, stored, before, signed_under=term)
                self._saved(obj, stored)
        except ConcurrentModification:
            return False
        return True

    def _changed_row(self, obj: ManagedObject, now: int) -> tuple[StoredObject, tuple[int, bytes]]:
        """The row of `obj` as changed at `now`, and the version and MAC of
        the row it was loaded from."""
        if obj.row_mac is None:  # an object read from storage was verified, so it has one
            raise self._refused(obj.uid, "the row carries no MAC")
        obj.set_value("Last Change Date", now)
        return obj.to_stored(), (obj.version, obj.row_mac)

    def _saved(self, obj: ManagedObject, stored: StoredObject) -> None:
        obj.version = stored.version
        obj.row_mac = stored.row_mac
        self._touch(obj)

    # Locate (KMIP 1.4, 4.9).
    def locate(
        self,
        txn: Transaction,
        principal: Principal,
        equals: list[tuple[str, Item]],
        has: list[str],
        offset: int,
        limit: int | None,
        excluded: Iterable[tuple[str, Item]] = (),
    ) -> list[str]:
        """The uids of the objects `principal` sees that have every (name,
        value) of `equals`, a value of each name of `has`, and none of the
        (name, value) pairs of `excluded`, in the order they were stored."""
        check(principal, Action.READ_ATTRIBUTES)
        query = LocateQuery(
            equals=tuple((name, attrs.encode_value(value)) for name, value in equals),
            has=tuple(has),
            excluded=tuple((name, attrs.encode_value(value)) for name, value in excluded),
            owner=None if principal.sees_all else principal.name,
            uid=_asked_uid(equals),
            offset=offset,
            limit=limit,
        )
        return txn.locate(query)


def _asked_uid(equals: list[tuple[str, Item]]) -> str | None:
    """The uid a Locate's Unique Identifier condition names, if it has one
    (its first): the storage finds that object by its row (LocateQuery.uid)."""
    for name, value in equals:
        if name == "Unique Identifier":
            uid = attrs.as_value(value).value
            if isinstance(uid, str):
                return uid
    return None


if TYPE_CHECKING:
    # mypy checks here that the keystore is a Backend of the KMIP server
    # framework (kmip_core.server.backend), as the dispatcher takes it.
    def _is_backend(keystore: Keystore) -> Backend:
        return keystore
