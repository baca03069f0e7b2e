"""The part of the registry every other part stands on: the shared state
(the database, the clock, the trust CA) and the hash-chained audit trail
each change is recorded in, inside the change's own transaction."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

from sqlalchemy import select

from broker import audit_trail
from broker.db import Database, DatabaseError, audit
from broker.registry.model import AuditRecord, TrustError
from broker.request_scope import record_made
from broker.trust_ca import TrustCa
from kmip_core.audit.chain import GENESIS, Report
from kmip_core.db.group_commit import GroupCommit

AUDIT_GENESIS = GENESIS

# The chain head, read by every append; built once: SQLAlchemy then only
# binds the parameters.
_AUDIT_HEAD = select(audit.c.seq, audit.c.hash).order_by(audit.c.seq.desc()).limit(1)


class AuditTrail:
    """The registry's state and its audit trail. ``trust_ca`` is needed only
    by the methods that issue certificates (approve, register_host,
    issue_user)."""

    def __init__(
        self,
        db: Database,
        trust_ca: TrustCa | None = None,
        clock: Callable[[], float] = time.time,
        *,
        node: str = "vtpm-broker",
        audit_signer=None,
    ):
        self.db = db
        self.trust_ca = trust_ca
        self.clock = clock
        # Named in every audit record; the signer (kmip_core.audit.
        # audit_key.Signer) signs checkpoints and its public half checks them.
        self.node = node
        self.audit_signer = audit_signer
        # Appends to the audit chain are serialized in this process too, so
        # SQLite never sees two writers race for the chain head.
        self._audit_lock = threading.Lock()
        self._audit_group: GroupCommit[tuple, None] = GroupCommit(self._write_audit_batch, DatabaseError)

    def _ca(self) -> TrustCa:
        if self.trust_ca is None:
            raise RuntimeError("this registry has no trust CA; load it with broker.trust_ca.load_trust_ca")
        return self.trust_ca

    # Audit -------------------------------------------------------------------

    def record_audit(self, actor: str, action: str, target: str, allowed: bool, reason: str) -> None:
        """Append one record to the hash-chained audit trail and return once
        it is committed. Records that several threads append at once share
        one transaction (group commit: the gateway's unwraps under a boot
        storm). Raises DatabaseError if it cannot be written: callers fail
        closed. Inside a request (broker/request_scope.py) the record
        carries that request's id."""
        self._audit_group.submit((actor, action, target, allowed, reason, record_made(allowed)))

    def _write_audit_batch(self, entries: list[tuple]) -> list[None]:
        with self._audit_lock, self.db.begin() as conn:
            self._append_audits(conn, entries)
        return [None] * len(entries)

    def _append_audit(self, conn, actor: str, action: str, target: str, allowed: bool, reason: str) -> None:
        self._append_audits(conn, [(actor, action, target, allowed, reason, record_made(allowed))])

    def _append_audits(self, conn, entries: list[tuple]) -> None:
        """Chain `entries` (actor, action, target, allowed, reason[, request id]) onto the
        trail inside `conn`'s transaction, holding the chain lock."""
        self.db.lock_audit_chain(conn)
        last = conn.execute(_AUDIT_HEAD).first()
        head = (last.seq, last.hash) if last else None
        conn.execute(audit.insert(), audit_trail.chain_rows(entries, head, self.clock, self.node))

    def audit_records(self, after: int = 0, limit: int = 1000) -> list[AuditRecord]:
        with self.db.read() as conn:
            rows = conn.execute(select(audit).where(audit.c.seq > after).order_by(audit.c.seq).limit(limit)).all()
        return [AuditRecord(**row._mapping) for row in rows]

    def verify_audit_report(self, verifier=None) -> Report:
        """The whole chain and its signed checkpoints (broker/audit_trail.py);
        `verifier` defaults to the public half of the broker's audit key."""
        if verifier is None and self.audit_signer is not None:
            verifier = self.audit_signer.public
        return audit_trail.verify(self.db, verifier)

    def verify_audit(self) -> list[str]:
        """Problems with the audit trail, one line each (empty: intact), in
        the words of `vtpm-broker admin audit verify`."""
        return [p.text for p in self.verify_audit_report().problems]

    def sign_audit_checkpoint(self):
        """Sign the chain's head now (None: no key, or nothing new)."""
        if self.audit_signer is None:
            return None
        return audit_trail.sign_checkpoint(self.db, self.audit_signer, self.node, self.clock)

    @contextlib.contextmanager
    def _refusals_audited(self, actor: str, action: str, target: str) -> Iterator[None]:
        """Record a refusal (any TrustError) raised inside, after the refused
        transaction has rolled back, so the trail is all it changes."""
        try:
            yield
        except TrustError as exc:
            self.record_audit(actor, action, target, False, str(exc))
            raise
