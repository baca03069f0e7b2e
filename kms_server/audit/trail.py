"""The audit trail over the storage contract: appending records inside the
transaction of the change they describe, writing standalone records for
reads and refusals, signing checkpoints, handing committed records to the
sinks, and reading the trail back (search, export, verification).

Appending takes the chain lock (`Transaction.audit_head(lock=True)`), so
records of all nodes form one chain; the lock is taken as the last step of
a transaction and held only until its commit.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Protocol

from kmip_core.audit import chain
from kmip_core.audit.chain import GENESIS, Report, canonical, format_time, record_hash
from kmip_core.audit.record import AuditWriteFailed
from kmip_core.db.group_commit import GroupCommit
from kms_server.storage.base import AuditQuery, Storage, StoredAuditRecord, StoredCheckpoint, Transaction

log = logging.getLogger("kms_server.audit")

EXPORT_FORMAT = "kms-audit-export"
VM_COMPONENT = "Virtual Machine"
HOST_COMPONENT = "ESXi Server"


class TrailMetrics(Protocol):
    """What the trail reports (kms_server.metrics.KmsMetrics)."""

    def audit_record(self) -> None: ...

    def audit_failed(self) -> None: ...


class AuditTrail:
    def __init__(
        self,
        storage: Storage,
        node: str,
        signer=None,
        publish: Callable[[StoredAuditRecord], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.storage = storage
        self.node = node
        self.signer = signer
        self._publish = publish
        self.clock = clock
        self._group: GroupCommit[dict, StoredAuditRecord] = GroupCommit(self._write_batch, AuditWriteFailed)
        # kms_server.metrics.KmsMetrics (records committed, write failures),
        # or None; and the last write that failed, unless one succeeded
        # since: (time.monotonic(), why), read by the node's readiness check.
        self.metrics: TrailMetrics | None = None
        self.last_failure: tuple[float, str] | None = None

    # Writing.
    def append(self, txn: Transaction, entry: dict) -> StoredAuditRecord:
        """Append a record inside `txn` (a write transaction)."""
        return self.append_all(txn, [entry])[0]

    def append_all(self, txn: Transaction, entries: list[dict]) -> list[StoredAuditRecord]:
        """Append a record per entry, in order, inside `txn` (a write
        transaction): the head is read once and the records are stored
        together (`Transaction.insert_audits`)."""
        head = txn.audit_head(lock=True)
        seq, prev = (head[0] + 1, head[1]) if head else (1, GENESIS)
        records = []
        for entry in entries:
            time_text, at = chain.stamp(self.clock())
            body = dict(entry, seq=seq, prev=prev, time=time_text, node=self.node)
            text = canonical(body)
            obj = body.get("object") or {}
            record = StoredAuditRecord(
                seq=seq,
                time=at,
                node=self.node,
                operation=body["operation"],
                uid=body.get("uid"),
                client=body["client"]["name"],
                result=body["result"]["status"],
                x_component=obj.get("x-Component"),
                x_name=obj.get("x-Name"),
                x_identifier=obj.get("x-Identifier"),
                body=text,
                hash=record_hash(text),
            )
            records.append(record)
            seq, prev = seq + 1, record.hash
        txn.insert_audits(records)
        return records

    def write(self, entry: dict) -> StoredAuditRecord:
        """Store a record outside any change (reads, refusals) and return
        once it is committed; raises AuditWriteFailed if it cannot be.

        Group commit (`kmip_core.db.group_commit`): records that
        worker threads write at the same time share one transaction; a
        failed batch fails each of its records, so fail-closed holds per
        request."""
        try:
            record = self._group.submit(entry)
        except AuditWriteFailed as exc:
            self._failed(str(exc), 1)
            raise
        self.last_failure = None
        return record

    def write_batch(self, entries: list[dict]) -> list[StoredAuditRecord]:
        """Store records outside any change in one transaction, as `write`
        does for one, and return them once committed (in the reactor
        thread, once appended to the reactor's batch, which commits them
        later: kms_server/storage/reactor_writes.py); raises
        AuditWriteFailed (for every record) if they cannot be. For the
        node's answers to reads, held in the reactor until their record is
        durable (kms_server/server.py)."""
        try:
            records = self._write_batch(entries)
        except Exception as exc:
            text = str(exc) or type(exc).__name__
            self._failed(text, len(entries))
            raise AuditWriteFailed(text) from None
        self.last_failure = None
        return records

    def commit_failed(self, why: str, records: int) -> None:
        """Records appended in a transaction whose commit then failed,
        after `write_batch` or `append` had returned (a reactor batch,
        kms_server/storage/reactor_writes.py): counted and reported as
        failed writes (the node's readiness check), as `write` does."""
        self._failed(why, records)

    def _failed(self, why: str, records: int) -> None:
        self.last_failure = (time.monotonic(), why)
        if self.metrics is not None:
            for _ in range(records):
                self.metrics.audit_failed()

    def _write_batch(self, entries: list[dict]) -> list[StoredAuditRecord]:
        with self.storage.transaction() as txn:
            records = self.append_all(txn, entries)
            # Handed to the sinks once committed, which may be after this
            # block (a reactor batch: kms_server/storage/reactor_writes.py).
            txn.after_commit(lambda: self._published(records))
        return records

    def _published(self, records: list[StoredAuditRecord]) -> None:
        for record in records:
            self.publish(record)

    def publish(self, record: StoredAuditRecord) -> None:
        """Hand a committed record to the sinks; never raises."""
        if self.metrics is not None:
            self.metrics.audit_record()
        if self._publish is None:
            return
        try:
            self._publish(record)
        except Exception:
            log.exception("audit sink fan-out failed for record %d", record.seq)

    def checkpoint(self) -> StoredCheckpoint | None:
        """Sign the current head if it moved since the last checkpoint."""
        if self.signer is None:
            return None
        with self.storage.transaction(read_only=True) as txn:
            head = txn.audit_head()
            done = txn.audit_checkpoints()
        if head is None or (done and done[-1].seq >= head[0]):
            return None
        now = self.clock()
        checkpoint = StoredCheckpoint(
            seq=head[0],
            time=chain.stamp(now)[1],
            node=self.node,
            head_hash=head[1],
            key_id=self.signer.key_id,
            signature=self.signer.sign(chain.checkpoint_message(head[0], head[1], now, self.node)),
        )
        with self.storage.transaction() as txn:
            stored = txn.insert_checkpoint(checkpoint)
        return checkpoint if stored else None


# Reading.
def iter_records(storage: Storage, query: AuditQuery | None = None, page: int = 2000) -> Iterator[StoredAuditRecord]:
    query = query or AuditQuery()
    after = query.after_seq
    while True:
        q = AuditQuery(**{**asdict(query), "after_seq": after, "limit": page})
        with storage.transaction(read_only=True) as txn:
            batch = txn.audit_records(q)
        yield from batch
        if len(batch) < page:
            return
        after = batch[-1].seq


def checkpoints(storage: Storage) -> list[StoredCheckpoint]:
    with storage.transaction(read_only=True) as txn:
        return txn.audit_checkpoints()


def objects_named(storage: Storage, name: str, component: str | None) -> tuple[str, ...]:
    """Unique identifiers of every object that any record shows tagged with
    x-Name or x-Identifier `name` (and x-Component `component`)."""
    uids = []
    for record in iter_records(storage, AuditQuery(names=(name,), component=component)):
        if record.uid is not None and record.uid not in uids:
            uids.append(record.uid)
    return tuple(uids)


def verify_storage(storage: Storage, verifier) -> Report:
    return chain.verify(
        iter_records(storage),
        checkpoints(storage),
        verifier.check if verifier is not None else None,
        verifier.key_id if verifier is not None else None,
    )


# Export (JSON lines: a header, then records, then checkpoints).
def export_lines(records: Iterable[StoredAuditRecord], cps: Iterable[StoredCheckpoint]) -> Iterator[str]:
    yield json.dumps({"format": EXPORT_FORMAT, "version": 1, "exported_at": format_time(time.time())})
    for r in records:
        yield json.dumps({"type": "record", **asdict(r)}, ensure_ascii=False)
    for c in cps:
        yield json.dumps({"type": "checkpoint", **asdict(c)})


class ExportError(Exception):
    pass


def read_export(path: Path) -> tuple[list[StoredAuditRecord], list[StoredCheckpoint]]:
    return chain.read_export(
        path,
        export_format=EXPORT_FORMAT,
        record_type=StoredAuditRecord,
        checkpoint_type=StoredCheckpoint,
        what="an audit export",
        made_by="kms-admin audit export --to FILE",
        error=ExportError,
    )
