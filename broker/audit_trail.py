"""The broker's audit trail on the KMS's chain (kmip_core.audit.chain with
the broker's Domain): canonical JSON records, hashed with the broker's own
tag, and Ed25519-signed checkpoints of the head (docs/audit-trail.md).

A record's body is {"seq", "prev", "time", "node", "actor", "action",
"target", "allowed", "reason"}; its hash is SHA-256 over
b"vtpm-broker-audit-v1\\n" + the body's canonical JSON. The columns of
broker_audit repeat the body's fields; verification checks they agree.

Trails from before this format (schema revision 0001: positional JSON,
`repr(float)`, no tag) are carried over by migration 0002 with
`carry_over`: the old records stay as they are, checked by their own rule
(`legacy_hash`), and the first record in the new format commits to the old
chain's record count and last hash, so the new chain and its signed
checkpoints protect the old records too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa

from kmip_core.audit import audit_key, chain
from kmip_core.audit.chain import (
    BROKER,
    GENESIS,
    Problem,
    Report,
    canonical,
    format_time,
    parse_time,
    record_hash,
)

if TYPE_CHECKING:
    from twisted.internet import task

    from broker.db import Database

__all__ = [
    "CARRY_OVER_ACTION",
    "AuditKeyError",
    "CheckpointLoop",
    "Checkpoint",
    "Row",
    "ExportError",
    "carry_over",
    "chain_rows",
    "check_key",
    "legacy_hash",
    "load_signer",
    "load_verifier",
    "open_signer",
    "recorded_key_id",
    "sign_checkpoint",
    "export_lines",
    "read_export",
    "verify",
    "verify_rows",
]

log = logging.getLogger("broker.audit")

CARRY_OVER_ACTION = "audit.carry-over"
CARRY_OVER_ACTOR = "vtpm-broker"
KEY_ID_META = "audit.key_id"
AuditKeyError = audit_key.AuditKeyError
_PAGE = 2000


# --- Writing ----------------------------------------------------------------------------


def new_body(seq: int, prev: str, at: float, node: str, actor: str, action: str, target: str, allowed: bool,
             reason: str, request_id: str | None = None) -> dict:  # fmt: skip
    """A record body; `request_id` (the API or gateway request it belongs
    to, also passed to the KMS: broker/request_scope.py) only when given,
    so records without one hash exactly as before the field existed."""
    body = {
        "seq": seq,
        "prev": prev,
        "time": format_time(at),
        "node": node,
        "actor": actor,
        "action": action,
        "target": target,
        "allowed": bool(allowed),
        "reason": reason,
    }
    if request_id:
        body["request_id"] = request_id
    return body


def row_of(body: dict) -> dict:
    """The broker_audit row for a record body (columns repeat its fields)."""
    text = canonical(body)
    return {
        "seq": body["seq"],
        "at": parse_time(body["time"]),
        "actor": body["actor"],
        "action": body["action"],
        "target": body["target"],
        "allowed": body["allowed"],
        "reason": body["reason"],
        "prev_hash": body["prev"],
        "hash": record_hash(text, BROKER),
        "body": text,
    }


def chain_rows(entries: Iterable[tuple], head: tuple[int, str] | None, clock: Callable[[], float], node: str
               ) -> list[dict]:  # fmt: skip
    """Rows for `entries` (actor, action, target, allowed, reason and
    optionally a request id) chained after `head` (seq, hash of the newest
    record; None: an empty trail)."""
    seq, prev = head if head is not None else (0, GENESIS)
    rows = []
    for actor, action, target, allowed, reason, *request_id in entries:
        seq += 1
        reason = reason.splitlines()[0] if reason else ""
        body = new_body(seq, prev, clock(), node, actor, action, target, allowed, reason, *request_id[:1])
        row = row_of(body)
        rows.append(row)
        prev = row["hash"]
    return rows


# --- The old format (schema revision 0001), frozen -----------------------------------------


def legacy_hash(prev_hash: str, seq: int, at: float, actor: str, action: str, target: str, allowed: bool,
                reason: str) -> str:  # fmt: skip
    """The hash of a record written before the carry-over: SHA-256 over
    positional JSON, no domain tag. Kept only to check those records."""
    body = json.dumps(
        [prev_hash, seq, repr(float(at)), actor, action, target, bool(allowed), reason],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class _Legacy:
    """Walks records of the old format in seq order, by the old rule."""

    def __init__(self) -> None:
        self.count = 0
        self.first_seq: int | None = None
        self.last_seq = 0
        self.head = GENESIS
        self.problems: list[Problem] = []

    def add(self, row) -> None:
        self.count += 1
        if self.first_seq is None:
            self.first_seq = row.seq
        expected = self.last_seq + 1
        if row.seq > expected:
            span = f"record {expected}" if row.seq == expected + 1 else f"records {expected} to {row.seq - 1}"
            self.problems.append(Problem(expected, f"{span} missing: removed from the trail"))
        if row.prev_hash != self.head and row.seq == expected:
            self.problems.append(
                Problem(row.seq, f"record {row.seq} does not follow record {row.seq - 1}: the chain is broken here")
            )
        digest = legacy_hash(row.prev_hash, row.seq, row.at, row.actor, row.action, row.target, row.allowed, row.reason)
        if digest != row.hash:
            self.problems.append(Problem(row.seq, f"record {row.seq} altered: its content no longer matches its hash"))
        self.head = row.hash
        self.last_seq = max(self.last_seq, row.seq)


# The table as revision 0002 knows it: the carry-over must not change with
# later columns of broker.db.
_AUDIT_0002 = sa.table(
    "broker_audit",
    *(sa.column(name) for name in ("seq", "at", "actor", "action", "target", "allowed", "reason", "prev_hash")),
    sa.column("hash"),
    sa.column("body"),
)


def carry_over(conn, clock: Callable[[], float] = time.time, node: str = "vtpm-broker db upgrade") -> dict | None:
    """Migration 0002: check the records of the old format by their own rule,
    then append the first record of the new format, committing to their
    count and last hash (and to what the check found). Returns that
    record's body, or None when there is nothing to carry over."""
    legacy = _Legacy()
    if conn.execute(sa.select(_AUDIT_0002.c.seq).where(_AUDIT_0002.c.body.is_not(None)).limit(1)).first():
        return None  # Already in the new format.
    rows = conn.execute(sa.select(_AUDIT_0002).order_by(_AUDIT_0002.c.seq)).all()
    if not rows:
        return None
    for row in rows:
        legacy.add(row)
    problems = [f"record {p.seq}: {p.text}" for p in sorted(legacy.problems, key=lambda p: p.seq)]
    if problems:
        reason = f"{legacy.count} earlier records carried over; their chain was NOT intact: {problems[0]}"
    else:
        reason = f"{legacy.count} earlier records carried over; their chain was intact"
    seq = legacy.last_seq + 1
    body = new_body(seq, legacy.head, clock(), node, CARRY_OVER_ACTOR, CARRY_OVER_ACTION, "broker_audit", True, reason)
    body["carried_over"] = {"records": legacy.count, "last_seq": legacy.last_seq, "head_hash": legacy.head,
                            "problems": problems[:20]}  # fmt: skip
    conn.execute(_AUDIT_0002.insert().values(**row_of(body)))
    return body


# --- Reading and verifying -------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """A broker_audit row as kmip_core.audit.chain.verify reads records."""

    seq: int
    time: float
    body: str | None
    hash: str
    prev_hash: str
    actor: str
    action: str
    target: str
    allowed: bool
    reason: str

    @classmethod
    def of(cls, row) -> Row:
        return cls(row.seq, row.at, row.body, row.hash, row.prev_hash, row.actor, row.action, row.target,
                   bool(row.allowed), row.reason)  # fmt: skip


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    time: float
    node: str
    head_hash: str
    key_id: str
    signature: str


def _rows(db: Database) -> Iterator:
    from broker.db import audit

    after = 0
    while True:
        with db.read() as conn:
            batch = conn.execute(sa.select(audit).where(audit.c.seq > after).order_by(audit.c.seq).limit(_PAGE)).all()
        yield from batch
        if len(batch) < _PAGE:
            return
        after = batch[-1].seq


def checkpoints(db: Database) -> list[Checkpoint]:
    from broker.db import audit_checkpoints

    with db.read() as conn:
        rows = conn.execute(sa.select(audit_checkpoints).order_by(audit_checkpoints.c.seq)).all()
    return [Checkpoint(**row._mapping) for row in rows]


def verify(db: Database, verifier: audit_key.Verifier | None = None, max_problems: int = 20) -> Report:
    """The whole trail in the database; see verify_rows."""
    return verify_rows(_rows(db), checkpoints(db), verifier, max_problems)


def verify_rows(
    stored: Iterable, cps: list[Checkpoint], verifier: audit_key.Verifier | None = None, max_problems: int = 20
) -> Report:
    """Records (broker_audit rows or exported ones, in seq order) of the old
    format by their rule up to the carry-over record, the rest and the
    checkpoints by the chain's (kmip_core.audit.chain.verify with the
    broker's Domain). `verifier` checks checkpoint signatures; None reports
    any checkpoint as unchecked."""
    rows = iter(stored)
    legacy = _Legacy()
    first = None
    for row in rows:
        if row.body is None:
            legacy.add(row)
            continue
        first = Row.of(row)
        break
    extra: list[Problem] = list(legacy.problems)
    first_seq, first_prev = 1, GENESIS
    if legacy.count:
        carried = _carried(first)
        if carried is None:
            if first is None:
                extra.append(Problem(legacy.last_seq + 1, f"trail truncated: no record follows record "
                                     f"{legacy.last_seq}, not even the carry-over record of migration 0002"))  # fmt: skip
            else:
                extra.append(Problem(first.seq, f"record {first.seq} is not the carry-over record that commits to "
                                     f"the {legacy.count} records before it"))  # fmt: skip
            first_seq, first_prev = legacy.last_seq + 1, legacy.head
        else:
            assert first is not None  # _carried found the commitment in it
            first_seq, first_prev = carried["last_seq"] + 1, carried["head_hash"]
            if legacy.last_seq < carried["last_seq"]:
                extra.append(Problem(legacy.last_seq + 1, f"records {legacy.last_seq + 1} to {carried['last_seq']} "
                                     "missing: removed from the trail"))  # fmt: skip
            elif legacy.head != carried["head_hash"] or (legacy.count != carried["records"] and not legacy.problems):
                extra.append(Problem(legacy.first_seq or 1, f"records {legacy.first_seq or 1} to {legacy.last_seq} "
                                     f"rewritten after record {first.seq} committed to them"))  # fmt: skip
            for text in carried.get("problems") or []:
                extra.append(Problem(first.seq, f"record {first.seq}: the records before the carry-over were "
                                     f"already not intact when they were carried over ({text})"))  # fmt: skip

    def new_rows() -> Iterator[Row]:
        if first is not None:
            yield first
        for row in rows:
            yield Row.of(row)

    report = chain.verify(
        new_rows(),
        cps,
        verifier.check if verifier is not None else None,
        verifier.key_id if verifier is not None else None,
        max_problems,
        domain=BROKER,
        first_seq=first_seq,
        first_prev=first_prev,
    )
    if legacy.count:
        report.records += legacy.count
        report.first_seq = legacy.first_seq
        if report.last_seq is None:
            report.last_seq = legacy.last_seq
    report.problems = sorted(extra + report.problems, key=lambda p: p.seq)[:max_problems]
    return report


EXPORT_FORMAT = "vtpm-broker-audit-export"
_COLUMNS = ("seq", "at", "actor", "action", "target", "allowed", "reason", "prev_hash", "hash", "body")


@dataclass(frozen=True)
class Stored:
    """A broker_audit row (the table's columns), as read or exported; `body`
    is None for a record from before the format change."""

    seq: int
    at: float
    actor: str
    action: str
    target: str
    allowed: bool
    reason: str
    prev_hash: str
    hash: str
    body: str | None


class ExportError(Exception):
    """A file that is not a broker audit export; one line."""


def export_lines(db: Database) -> Iterator[str]:
    """JSON lines: a header, every record as stored, every checkpoint."""
    yield json.dumps({"format": EXPORT_FORMAT, "version": 1, "exported_at": format_time(time.time())})
    for row in _rows(db):
        yield json.dumps({"type": "record", **{c: getattr(row, c) for c in _COLUMNS}}, ensure_ascii=False)
    for c in checkpoints(db):
        yield json.dumps({"type": "checkpoint", **c.__dict__})


def read_export(path: Path) -> tuple[list[Stored], list[Checkpoint]]:
    return chain.read_export(
        path,
        export_format=EXPORT_FORMAT,
        record_type=Stored,
        checkpoint_type=Checkpoint,
        what="a broker audit export",
        made_by="vtpm-broker admin audit export --to FILE",
        error=ExportError,
    )


def _carried(first: Row | None) -> dict | None:
    """The carry-over commitment in the first record of the new format."""
    if first is None or first.body is None:
        return None
    try:
        body = json.loads(first.body)
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("action") != CARRY_OVER_ACTION:
        return None
    carried = body.get("carried_over")
    if not isinstance(carried, dict) or not isinstance(carried.get("last_seq"), int):
        return None
    if not isinstance(carried.get("records"), int) or not isinstance(carried.get("head_hash"), str):
        return None
    return carried


# --- The signing key and checkpoints -------------------------------------------------------------


def load_signer(path: Path) -> audit_key.Signer | None:
    """The broker's audit signing key (an audit_key.Signer), or None when the
    file does not exist (checkpoints are then not written; logged)."""
    if not Path(path).exists():
        log.warning(
            "audit checkpoints are not signed: %s does not exist (vtpm-broker init creates it); "
            "without them a truncated trail goes unnoticed",
            path,
        )
        return None
    return audit_key.load_signer(path)


def open_signer(db: Database, path: Path) -> audit_key.Signer | None:
    """load_signer, then check_key against the database (at start)."""
    signer = load_signer(path)
    if signer is not None:
        check_key(db, signer, path)
    return signer


def load_verifier(path: Path) -> audit_key.Verifier:
    """A public key (or the signing key itself) to check checkpoints."""
    return audit_key.load_verifier(path)


def generate_key(private_path: Path, public_path: Path) -> audit_key.Verifier:
    """A new Ed25519 audit key pair (private file 0600); returns the verifier."""
    return audit_key.generate(private_path, public_path)


def recorded_key_id(db: Database) -> str | None:
    """The id of the audit key this database's checkpoints are signed with
    (recorded when a broker first uses one), or None."""
    with db.read() as conn:
        value = db.get_meta(conn, KEY_ID_META)
    return value.decode("ascii") if value is not None else None


def check_key(db: Database, signer: audit_key.Signer, path: Path) -> None:
    """Every broker on one database signs with the same key, as they share
    the master key: the first use records its id, later uses refuse another
    key (an auditor verifies with one public key). Raises AuditKeyError."""
    with db.begin() as conn:
        value = db.get_meta(conn, KEY_ID_META)
        if value is None:
            db.set_meta(conn, KEY_ID_META, signer.key_id.encode("ascii"))
            return
    if value.decode("ascii") != signer.key_id:
        raise AuditKeyError(
            f"audit signing key {path} (key id {signer.key_id}) is not this broker database's audit key "
            f"(key id {value.decode('ascii')}); give every broker the same [audit] signing_key_file"
        )


def sign_checkpoint(
    db: Database, signer: audit_key.Signer, node: str, clock: Callable[[], float] = time.time
) -> Checkpoint | None:
    """Sign the head of the chain if it moved since the last checkpoint."""
    from broker.db import audit, audit_checkpoints

    head_query = sa.select(audit.c.seq, audit.c.hash, audit.c.body).order_by(audit.c.seq.desc()).limit(1)
    last_query = sa.select(sa.func.max(audit_checkpoints.c.seq))
    with db.read() as conn:
        head = conn.execute(head_query).first()
        last = conn.execute(last_query).scalar()
    if head is None or head.body is None or (last is not None and last >= head.seq):
        return None
    now = clock()
    checkpoint = Checkpoint(
        seq=head.seq,
        time=parse_time(format_time(now)),
        node=node,
        head_hash=head.hash,
        key_id=signer.key_id,
        signature=signer.sign(chain.checkpoint_message(head.seq, head.hash, now, node, BROKER)),
    )
    with db.begin() as conn:
        # Another broker on the same database may have signed this head.
        if conn.execute(sa.select(audit_checkpoints.c.seq).where(audit_checkpoints.c.seq == head.seq)).first():
            return None
        conn.execute(audit_checkpoints.insert().values(**checkpoint.__dict__))
    return checkpoint


class CheckpointLoop:
    """Signs a checkpoint at start, every `seconds`, and a last one at stop
    (so that removing the newest records shows), on `threadpool`."""

    def __init__(self, db, signer, node: str, reactor, threadpool, seconds: float):
        self.db = db
        self.signer = signer
        self.node = node
        self.reactor = reactor
        self.threadpool = threadpool
        self.seconds = seconds
        self.loop: task.LoopingCall | None = None

    def sign_now(self) -> Checkpoint | None:
        if self.signer is None:
            return None
        try:
            checkpoint = sign_checkpoint(self.db, self.signer, self.node)
        except Exception as exc:  # a failed checkpoint must not stop the broker; the next one retries
            log.error("audit checkpoint failed: %s", exc)
            return None
        if checkpoint is not None:
            log.info("audit checkpoint signed at record %d", checkpoint.seq)
        return checkpoint

    def _in_pool(self):
        from twisted.internet.threads import deferToThreadPool

        return deferToThreadPool(self.reactor, self.threadpool, self.sign_now)

    def start(self) -> None:
        if self.signer is None:
            return
        from twisted.internet import task

        self.loop = loop = task.LoopingCall(self._in_pool)
        loop.clock = self.reactor
        loop.start(self.seconds, now=True)

    def stop(self):
        """A Deferred that fires once the last checkpoint is written."""
        from twisted.internet import defer

        if self.loop is None:
            return defer.succeed(None)
        if self.loop.running:
            self.loop.stop()
        self.loop = None
        return self._in_pool()
