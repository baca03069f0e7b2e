"""One KMS node: storage, barrier, keystore, dispatcher, worker pool and the
TLS listener, composed as a Twisted service that owns start and stop.

Stopping (SIGTERM) stops accepting connections, lets every request in
flight finish and be answered, closes connections, then releases the
worker pool and the database.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from kmip.core.enums import Operation, Tags
from twisted.application import service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from kmip_core import limits, tls, workers
from kmip_core.audit import audit_key
from kmip_core.audit.record import AuditDraft, AuditWriteFailed, client_fields, system_entry
from kmip_core.db.group_commit import DeferredGroupCommit
from kmip_core.nonblocking import WouldBlock, WriterBusy, in_reactor
from kmip_core.policy import Principal, role_for
from kmip_core.protocol import IN_POOL, HeldAnswer, InPool, KmipFactory
from kmip_core.sealing.barrier import open_barrier
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher, HeldResponse, retry_schedule, single_operation
from kmip_core.ttlv import Item
from kmip_core.workers import WorkerSlot
from kms_server import cluster, credentials
from kms_server.audit import sinks as audit_sinks
from kms_server.audit.trail import AuditTrail
from kms_server.config import Config
from kms_server.keystore import row_auth
from kms_server.keystore.keystore import Keystore
from kms_server.metrics import KmsMetrics, monitor_listener
from kms_server.operations import OPERATIONS, get
from kms_server.storage import open_storage
from kms_server.storage.base import StorageError, StoredAuditRecord
from kms_server.storage.reactor_writes import ReactorWrites, SyncProcess

log = logging.getLogger("kms_server.server")

# Operations that only read, tried in the reactor thread on SQLite.
READS_IN_REACTOR = frozenset(
    op.value
    for op in (
        Operation.GET,
        Operation.GET_ATTRIBUTES,
        Operation.GET_ATTRIBUTE_LIST,
        Operation.LOCATE,
        Operation.QUERY,
        Operation.DISCOVER_VERSIONS,
    )
)
# Operations that write, tried there too on SQLite: each a few row changes
# and no costly cryptography (a symmetric key's random bytes, a seal).
# Creating key pairs, rekeying and the cryptographic operations stay on the
# pool: an RSA key or signature would hold every connection of the node.
WRITES_IN_REACTOR = frozenset(
    op.value
    for op in (
        Operation.CREATE,
        Operation.REGISTER,
        Operation.DESTROY,
        Operation.ACTIVATE,
        Operation.REVOKE,
        Operation.ADD_ATTRIBUTE,
        Operation.MODIFY_ATTRIBUTE,
        Operation.DELETE_ATTRIBUTE,
        Operation.SET_ATTRIBUTE,
    )
)

_GET = Operation.GET.value


def _payload(message: Item) -> Item | None:
    """The Request Payload of a request message's one batch item."""
    item = message.find(Tags.BATCH_ITEM.value)
    return None if item is None else item.find(Tags.REQUEST_PAYLOAD.value)


# The answer to a write whose reactor batch failed to commit.
UNCOMMITTED = (
    "the database could not commit the change; it may or may not be stored: check before retrying"
)


def _checked_rows(storage, barrier, refused: str) -> row_auth.VerifyReport:
    """Every object row and the store digest, checked read-only; each
    object that fails is logged (it is refused on every request)."""
    with storage.transaction(read_only=True) as txn:
        report = row_auth.verify_store(txn, barrier, unseal=False)
    for uid, problem in report.failures:
        log.error("object %s fails its integrity check and %s: %s", uid, refused, problem)
    return report


def check_rows_while_serving(storage, barrier, trail) -> row_auth.VerifyReport:
    """The start-up check again, while the node serves: a rollback or an
    edit made since is logged CRITICAL and recorded in the audit trail."""
    report = _checked_rows(storage, barrier, "is refused")
    if report.digest_problem is not None:
        log.critical(
            "the database fails its integrity check: %s; run 'kms-admin db verify'", report.digest_problem
        )
    if not report.ok and trail is not None:
        detail = report.digest_problem or f"{len(report.failures)} objects fail their row MAC"
        entry = system_entry("kms-server", "INTEGRITY_CHECK", detail, [uid for uid, _ in report.failures], failed=True)
        try:
            trail.write(entry)
        except AuditWriteFailed as exc:
            log.error("audit record of a failed integrity check not written: %s", exc)
    return report


def check_rows_at_start(storage, barrier) -> None:
    """Verify every object row and the store digest before serving. Rows
    that no longer add up to the store digest (one was rolled back or
    removed while no node watched) stop the start: which one cannot be told."""
    report = _checked_rows(storage, barrier, "will be refused")
    if report.digest_problem is not None:
        raise row_auth.RowIntegrityError(
            None,
            f"the database fails its integrity check: {report.digest_problem}; "
            "run 'kms-admin db verify' and restore from a backup, or accept the rows as they are "
            "with 'kms-admin db verify --reset-digest'",
        )


class KmsService(service.Service):
    """One node, or with `slot` one worker process of a node
    (kmip_core.workers, docs/process-model.md): a worker accepts on the
    listening socket its supervisor bound; only the primary worker (0) runs
    the node's singletons (heartbeat, checkpoints, integrity check, audit
    page, metrics listener)."""

    def __init__(self, cfg: Config, reactor, announce=None, slot: WorkerSlot | None = None):
        self.cfg = cfg
        self.slot = slot
        self.primary = slot is None or slot.primary
        self.reactor = reactor
        self.announce = announce or (lambda text: None)
        # Twisted's listening ports (IListeningPort: a zope Interface, whose
        # methods mypy cannot call without a plugin) and the node's timers.
        self.port: Any = None
        self.heartbeat: cluster.Heartbeat | None = None
        self.heartbeat_loop: task.LoopingCall | None = None
        self.integrity_loop: task.LoopingCall | None = None
        # The data directory holds the embedded database; only this user reads it.
        cfg.server.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.storage = open_storage(cfg.storage.db_url, schema=cfg.storage.schema_mode)
        try:
            barrier = open_barrier(self.storage, source=cfg.master_key)
            self.keystore = Keystore(self.storage, barrier, verified_rows=cfg.storage.verified_rows)
            check_rows_at_start(self.storage, barrier)
        except Exception:
            self.storage.close()
            raise
        self.trail = None
        self.sinks = None
        self.checkpoint_loop: task.LoopingCall | None = None
        self._refusals = _RefusalBudget()
        self.metrics = KmsMetrics(cfg.server.node_name)
        self.keystore.rows.on_read = self.metrics.verified_row_read
        self.storage.on_shared_commit(self.metrics.shared_commit)
        if cfg.audit.enabled:
            try:
                signer = audit_key.load_signer(cfg.audit.signing_key_file) if cfg.audit.signing_key_file else None
                self.sinks = audit_sinks.build(cfg.audit)
            except Exception:
                self.storage.close()
                raise
            if signer is None:
                log.warning(
                    "audit checkpoints are not signed: set [audit] signing_key_file "
                    "(kms-admin audit key new); without them a truncated trail goes unnoticed"
                )
            self.trail = AuditTrail(
                self.storage,
                cfg.server.node_name,
                signer=signer,
                publish=self.sinks.publish if self.sinks is not None else None,
            )
            self.trail.metrics = self.metrics
        else:
            log.warning("AUDITING IS OFF ([audit] enabled = false): key accesses are not recorded")
        authenticate = None
        if cfg.access.require_credential:
            known = credentials.load_file(cfg.access.credentials_file)
            authenticate = credentials.Authenticator(known.users, known.clients)
        self.dispatcher = Dispatcher(
            self.keystore,
            OPERATIONS,
            node=cfg.server.node_name,
            authenticate=authenticate,
            retry_delays=retry_schedule(cfg.storage.retry_seconds),
            trail=self.trail,
            metrics=self.metrics.requests,
        )
        self.context_factory = tls.server_context_factory(cfg.tls)
        self.threadpool = ThreadPool(minthreads=1, maxthreads=cfg.server.worker_threads, name="kms-workers")
        # On SQLite a read is a few page-cache lookups: one asked alone in
        # its message runs in the reactor thread (docs/process-model.md).
        # So do writes, in batches the reactor commits once a turn
        # (kms_server/storage/reactor_writes.py). On PostgreSQL each is a
        # round trip over the network: every request goes to the pool.
        self.reads_in_reactor = self.storage.reads_in_reactor
        batches = self.storage.reactor_batches() if self.reads_in_reactor else None
        self.reactor_writes: ReactorWrites | None = None
        self.in_reactor_ops = READS_IN_REACTOR
        # The process that syncs the reactor's committed batches to disk,
        # while the reactor goes on (kms_server/storage/reactor_writes.py).
        # A reactor that cannot watch the helper's pipe (a test's Clock)
        # syncs in its own thread.
        self.log_syncer: SyncProcess | None = None
        if batches is not None:
            if IReactorFDSet.providedBy(reactor):
                self.log_syncer = SyncProcess(reactor)
            self.reactor_writes = ReactorWrites(
                batches,
                reactor,
                lambda f: deferToThreadPool(reactor, self.threadpool, f),
                self.log_syncer,
                clients=lambda: len(self.factory.connections),
            )
            self.reactor_writes.on_batch = self._write_batch_done
            self.in_reactor_ops = READS_IN_REACTOR | WRITES_IN_REACTOR
        # The audit records of reads asked alone, written while the answers
        # wait in the reactor (issue 15): a worker thread never waits for
        # one. On SQLite each joins the reactor's batch of writes; on
        # PostgreSQL they are gathered in batches written on a pool thread.
        self.read_records: DeferredGroupCommit[dict, StoredAuditRecord] | None = None
        if self.trail is not None:
            if self.reactor_writes is not None:
                # One job of the reactor's next batch of writes, which takes
                # every record submitted until it runs (one savepoint, one
                # read of the audit head), answered once that batch commits.
                self.read_records = DeferredGroupCommit(
                    self.trail.write_batch, self._in_next_write_batch, AuditWriteFailed, take_when_run=True
                )
            else:
                self.read_records = DeferredGroupCommit(
                    self.trail.write_batch,
                    lambda flush, entries: deferToThreadPool(reactor, self.threadpool, flush, entries),
                    AuditWriteFailed,
                )
        self.factory = KmipFactory(
            handle=self._handle,
            handle_inline=self._handle_inline if self.reads_in_reactor else None,
            identify=self._identify,
            threadpool=self.threadpool,
            reactor=reactor,
            max_message_size=cfg.server.max_message_size,
            idle_timeout=cfg.server.idle_timeout,
            frame_timeout=cfg.server.frame_timeout,
            max_unsent_bytes=cfg.server.max_unsent_bytes,
            max_unsent_bytes_total=cfg.server.max_unsent_bytes_total,
            refused=self._refused,
        )
        # Handshake cap and timeout, connection slots counted after TLS.
        self.listener = limits.LimitedFactory(
            self.factory,
            limits.ListenerLimits(
                max_connections=cfg.server.max_connections,
                max_handshakes=cfg.server.max_handshakes,
                handshake_timeout=cfg.server.handshake_timeout,
            ),
            reactor,
            name="kmip",
        )
        # The audit page offers no suite without forward secrecy: only
        # the KMIP listener has clients (vCenter 7) that need them.
        self.web_context_factory: tls.ServerContextFactory | None = None
        self.web_listener: limits.LimitedFactory | None = None
        self.web_port: Any = None
        # /metrics, /healthz, /readyz ([metrics]); None when off.
        self.monitor = monitor_listener(self, reactor) if self.primary else None

    def _identify(self, certificate, peer: str) -> ConnectionInfo:
        if certificate is None:
            raise ValueError("no client certificate")
        identity = tls.peer_identity(certificate, self.cfg.tls.identity)
        access = self.cfg.access
        role = role_for(identity.name, access.administrators, access.no_crypto_administrators, access.auditors)
        principal = Principal(
            name=identity.name, role=role, subject=identity.subject, fingerprint=identity.fingerprint_sha256
        )
        log.info("connection from %s authenticated as %r (%s)", peer, principal.name, role.value)
        return ConnectionInfo(principal=principal, peer=peer)

    def _handle_inline(self, message: bytes, conn: ConnectionInfo) -> object:
        """In the reactor thread: a request of one item whose operation
        runs here (READS_IN_REACTOR, and WRITES_IN_REACTOR with reactor
        writes), answered here unless it would block: then it goes to the
        pool, and runs again from the start there (kmip_core/nonblocking.py)."""
        decoded = self.dispatcher.decode(message)
        if decoded is None:
            return IN_POOL  # refused there, as any undecodable message
        # Whatever goes to the pool takes the decoded message along: decoded once.
        in_pool = InPool(lambda: self._handle(message, conn, decoded))
        operation = single_operation(decoded)
        if operation not in self.in_reactor_ops:
            return in_pool
        if operation in WRITES_IN_REACTOR or (
            # A first Get writes (it clears Fresh): started as a write.
            operation == _GET and self.reactor_writes is not None and get.writes(self.keystore, _payload(decoded))
        ):
            return self._write_now(message, conn, decoded, in_pool)
        return self._in_reactor(message, conn, decoded, in_pool)

    def _write_now(self, message: bytes, conn: ConnectionInfo, decoded: Item, in_pool: InPool) -> object:
        """A write: started now, its transaction run in the reactor's next
        batch of writes (ReactorWrites.start): what it computes before (a
        new key, its seal and row MAC; a first Get's read of its key, the
        unsealing and the answer) is not done in the writer's turn."""
        writes = self.reactor_writes
        assert writes is not None  # writes run in the reactor only with it (__init__)
        ran = writes.start(lambda: self._in_reactor(message, conn, decoded, in_pool))
        if not isinstance(ran, defer.Deferred):
            return ran
        return HeldAnswer(lambda: ran.addCallbacks(self._answer_of, self._not_run, errbackArgs=(in_pool,)))

    def _not_run(self, failure: Any, in_pool: InPool) -> Any:
        """A write queued for a batch that could not be opened (the
        database cannot be reached: StorageError) runs on the pool, whose
        dispatcher retries and answers as for any request. Anything else
        is a bug: the connection is closed rather than risk running twice
        a request that may have written."""
        if failure.check(StorageError):
            return self._in_pool(in_pool)
        log.error("a request queued for the reactor's writes failed: %s", failure.getTraceback())
        return None

    def _in_reactor(self, message: bytes, conn: ConnectionInfo, decoded: Item, in_pool: InPool) -> object:
        writes = self.reactor_writes
        try:
            # Counted once the client's answer is known: a write's, after
            # its batch is durable (dropped with a try that starts over).
            with (
                in_reactor(writable=writes is not None and writes.batch_open) as state,
                self.dispatcher.holding_counts() as counts,
            ):
                answer = self._handle(message, conn, decoded)
        except WriterBusy:
            if writes is None:
                return in_pool
            # It writes after all (a first Get clears Fresh), and nothing
            # was written yet: it starts again as a write.
            return self._write_now(message, conn, decoded, in_pool)
        except WouldBlock:
            return in_pool
        if writes is None or not state.pinned:
            counts.settle(True)
            return answer
        # It wrote: its answer leaves once the batch is committed.
        committed = writes.committed()

        def durable(_: object) -> Any:
            counts.settle(True)
            return self._answer_of(answer)

        def not_durable(_: object) -> bytes | None:
            counts.settle(False)
            return self._uncommitted(answer)

        return HeldAnswer(lambda: committed.addCallbacks(durable, not_durable))

    def _answer_of(self, answer: object) -> Any:
        """What the connection sends for an answer of `_in_reactor`: bytes,
        or a Deferred of them."""
        if isinstance(answer, InPool):
            return self._in_pool(answer)
        if isinstance(answer, HeldAnswer):
            return answer.release()
        return answer

    def _in_pool(self, in_pool: InPool) -> defer.Deferred[bytes | None]:
        assert in_pool.run is not None  # _handle_inline's, which carries its work
        return deferToThreadPool(self.reactor, self.threadpool, in_pool.run).addCallback(self._answer_of)

    def _uncommitted(self, answer: object) -> bytes | None:
        """The answer to a write whose batch did not commit (ReactorWrites
        logged why): General Failure in place of each item's answer."""
        if not isinstance(answer, bytes):
            return None  # a held read that also wrote is never built: close rather than guess
        return self.dispatcher.failed_instead(answer, UNCOMMITTED)

    def _write_batch_done(self, writes: int, committed: bool) -> None:
        """A reactor batch of writes ended: counted; if its commit failed,
        the records it held were not written either (each write's own, in
        its transaction), which the trail reports as failed writes."""
        self.metrics.write_batch(writes, committed)
        if not committed and self.trail is not None:
            self.trail.commit_failed("a reactor batch of writes did not commit", writes)

    def _in_next_write_batch(self, flush: Callable[[], list[StoredAuditRecord]]) -> defer.Deferred[list[StoredAuditRecord]]:
        """Run the read records' `flush` (DeferredGroupCommit) as a job of
        the reactor's next batch of writes; fires once that is committed."""
        writes = self.reactor_writes
        assert writes is not None  # chosen only with reactor writes (__init__)

        def write() -> defer.Deferred[list[StoredAuditRecord]]:
            with in_reactor(writable=True):
                records = flush()
            # Each record is one read's answer, which waits on this batch.
            writes.reads_joined(len(records))
            return writes.committed().addCallback(lambda _: records)

        return writes.when_free(write, reads=True)

    def _handle(self, message: bytes, conn: ConnectionInfo, decoded: Item | None = None) -> bytes | HeldAnswer | None:
        if self.read_records is None:
            return self.dispatcher.handle(message, conn, decoded)
        answer = self.dispatcher.handle_holding_records(message, conn, decoded)
        if isinstance(answer, HeldResponse):
            held = answer
            return HeldAnswer(lambda: self._release(held))
        return answer

    def _release(self, held: HeldResponse) -> defer.Deferred[bytes | None]:
        """In the reactor thread: the answer to a read once its audit record
        is durable; if the record cannot be written, General Failure instead
        (fail closed, as for any record) after trying to record that.
        Callbacks, not a coroutine: every read asked alone comes here."""
        assert self.read_records is not None  # reads are held only with a trail (_handle)
        submit = self.read_records.submit

        def written(_: StoredAuditRecord) -> bytes:
            held.settled(True)
            return held.response

        def not_written(failure: Failure) -> defer.Deferred[bytes | None]:
            failure.trap(AuditWriteFailed)
            held.settled(False)
            why = str(failure.value)

            def refusal_not_written(refusal: Failure) -> None:
                refusal.trap(AuditWriteFailed)
                log.error("request %s: audit record of a refusal not written: %s", held.request_id, refusal.value)

            refused = submit(held.refusal_record())
            refused.addCallbacks(lambda _: None, refusal_not_written)
            return refused.addCallback(lambda _: held.withheld(why))

        answer: defer.Deferred[bytes | None] = submit(held.record).addCallbacks(written, not_written)
        return answer

    def _refused(self, peer: str, reason: str, certificate) -> None:
        """A connection refused at the TLS layer goes into the trail, with
        the certificate's identity when one was presented. A flood of them
        is summarized instead of recorded one by one."""
        self.metrics.tls_refused(reason)
        if self.trail is None:
            return
        suppressed = self._refusals.take(self.reactor.seconds())
        if suppressed is None:
            return
        principal = None
        if certificate is not None:
            try:
                identity = tls.peer_identity(certificate, self.cfg.tls.identity)
                principal = Principal(
                    name=identity.name, subject=identity.subject, fingerprint=identity.fingerprint_sha256
                )
            except Exception:
                principal = None
        client = client_fields(principal)
        if principal is not None:
            client["role"] = None  # refused before any role was granted
        draft = AuditDraft(
            event="tls-refused",
            request_id="-",
            item=None,
            client=client,
            peer=peer,
            protocol=None,
            operation="-",
        )
        detail = reason if not suppressed else f"{reason} ({suppressed} earlier refusals not recorded one by one)"
        entry = draft.entry("OPERATION_FAILED", "TLS_REFUSED", detail)

        trail = self.trail

        def write() -> None:
            try:
                trail.write(entry)
            except AuditWriteFailed as exc:
                log.error("audit record of a refused connection from %s not written: %s", peer, exc)

        deferToThreadPool(self.reactor, self.threadpool, write)

    def _checkpoint(self) -> None:
        try:
            assert self.trail is not None  # checkpoints are scheduled only with a trail (startService)
            checkpoint = self.trail.checkpoint()
        except Exception as exc:
            log.error("audit checkpoint failed: %s", exc)
            return
        if checkpoint is not None:
            log.info("audit checkpoint signed at record %d", checkpoint.seq)

    def _integrity_check(self) -> None:
        try:
            check_rows_while_serving(self.storage, self.keystore.barrier, self.trail)
        except Exception as exc:
            log.error("integrity check could not run: %s", exc)

    def startService(self):
        super().startService()
        # SIGHUP re-reads the server certificate and the pinned client
        # certificates; new connections use them.
        if self.trail is not None and self.cfg.audit.web_port is not None:
            self.web_context_factory = tls.server_context_factory(self.cfg.tls, kmip_suites=False)
        tls.reload_on_sighup(self.reactor, _Reloader(self.context_factory, self.web_context_factory), log)
        self.threadpool.start()
        if self.log_syncer is not None:
            self.log_syncer.start()
        if self.slot is None:
            self.port = self.reactor.listenSSL(
                self.cfg.server.port, self.listener, self.context_factory, interface=self.cfg.server.host
            )
        else:
            # This worker's socket, bound by the supervisor, with the same
            # TLS wrapping listenSSL applies; the workers take turns at it
            # by load.
            self.port, self.accept_turns = workers.adopt_tls_port(
                self.reactor, self.slot, self.context_factory, self.listener
            )
        address = self.port.getHost()
        if self.slot is None:
            self.announce(f"kms-server listening on {address.host}:{address.port}")
        if not self.primary:
            return
        engine = getattr(self.storage, "engine", None)
        if engine is not None:
            batches = self.storage.reactor_batches()
            self.heartbeat = heartbeat = cluster.Heartbeat(
                engine,
                self.cfg.server.node_name,
                f"{address.host}:{address.port}",
                lock_path=batches.lock_path if batches is not None else None,
            )
            self.heartbeat_loop = heartbeat_loop = task.LoopingCall(
                lambda: deferToThreadPool(self.reactor, self.threadpool, heartbeat.beat)
            )
            heartbeat_loop.clock = self.reactor
            heartbeat_loop.start(cluster.HEARTBEAT_SECONDS, now=True)
        if self.cfg.storage.integrity_check_seconds:
            self.integrity_loop = integrity_loop = task.LoopingCall(
                lambda: deferToThreadPool(self.reactor, self.threadpool, self._integrity_check)
            )
            integrity_loop.clock = self.reactor
            integrity_loop.start(self.cfg.storage.integrity_check_seconds, now=False)
        if self.trail is not None and self.trail.signer is not None:
            self.checkpoint_loop = checkpoint_loop = task.LoopingCall(
                lambda: deferToThreadPool(self.reactor, self.threadpool, self._checkpoint)
            )
            checkpoint_loop.clock = self.reactor
            checkpoint_loop.start(self.cfg.audit.checkpoint_seconds, now=False)
        if self.trail is not None and self.cfg.audit.web_port is not None:
            from kms_server.audit import web

            site = web.make_site(self.storage, self.trail.signer.public if self.trail.signer else None, self._identify)
            self.web_listener = limits.LimitedFactory(
                site,
                limits.ListenerLimits(
                    max_connections=self.cfg.audit.web_max_connections,
                    max_handshakes=self.cfg.server.max_handshakes,
                    handshake_timeout=self.cfg.server.handshake_timeout,
                    request_timeout=self.cfg.server.frame_timeout,
                ),
                self.reactor,
                name="audit page",
            )
            self.web_port = self.reactor.listenSSL(
                self.cfg.audit.web_port, self.web_listener, self.web_context_factory, interface=self.cfg.audit.web_host
            )
            web_address = self.web_port.getHost()
            self.announce(f"kms-server audit page on https://{web_address.host}:{web_address.port}/")
        if self.monitor is not None:
            self.monitor.start()
            self.announce(f"kms-server metrics on {self.monitor.url}")

    @defer.inlineCallbacks
    def stopService(self):
        log.info("stopping: no new connections; draining requests in flight")
        if self.port is not None:
            yield self.port.stopListening()
        if self.web_port is not None:
            yield self.web_port.stopListening()
        if self.monitor is not None:
            yield self.monitor.stop()
        yield self.listener.drain()
        yield self.listener.close_all()
        if self.web_listener is not None:
            yield self.web_listener.close_all()
        if self.integrity_loop is not None and self.integrity_loop.running:
            self.integrity_loop.stop()
        if self.checkpoint_loop is not None and self.checkpoint_loop.running:
            self.checkpoint_loop.stop()
            # A last checkpoint, so that removing the newest records shows.
            yield deferToThreadPool(self.reactor, self.threadpool, self._checkpoint)
        if self.sinks is not None:
            yield deferToThreadPool(self.reactor, self.threadpool, self.sinks.close)
        if self.heartbeat_loop is not None and self.heartbeat_loop.running:
            self.heartbeat_loop.stop()
            assert self.heartbeat is not None  # its loop beats it (startService)
            yield deferToThreadPool(self.reactor, self.threadpool, self.heartbeat.leave)
        self.threadpool.stop()
        if self.log_syncer is not None:
            # The answers drained above waited for their syncs.
            self.log_syncer.stop()
        self.storage.close()
        yield super().stopService()
        log.info("stopped")


class _Reloader:
    """SIGHUP re-reads the TLS material of every listener."""

    def __init__(self, *factories):
        self.factories = [f for f in factories if f is not None]

    def reload(self) -> None:
        for factory in self.factories:
            factory.reload()


class _RefusalBudget:
    """At most `rate` refusal records per second (burst `burst`); the rest
    are counted and the count goes into the next record written."""

    def __init__(self, rate: float = 5.0, burst: float = 20.0):
        self.rate, self.burst = rate, burst
        self.tokens, self.suppressed = burst, 0
        self.last: float | None = None

    def take(self, now: float) -> int | None:
        if self.last is not None:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1:
            self.suppressed += 1
            return None
        self.tokens -= 1
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


class NodeRoot(service.MultiService):
    """The node's service tree; `announcements` holds what a worker would
    have printed, for its supervisor to print (kmip_core.workers)."""

    def __init__(self) -> None:
        super().__init__()
        self.announcements: list[str] = []


def build(cfg: Config, reactor, slot: WorkerSlot | None = None) -> NodeRoot:
    """The node's service tree. A worker (`slot`) prints nothing: what it
    would announce is kept in `root.announcements` for its supervisor."""
    root = NodeRoot()

    def announce(text: str) -> None:
        if slot is not None:
            root.announcements.append(text)
            return
        print(text, flush=True)
        sys.stdout.flush()

    KmsService(cfg, reactor, announce, slot).setServiceParent(root)
    return root
