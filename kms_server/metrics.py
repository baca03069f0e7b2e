"""A KMS node's metrics and readiness checks, served by the shared
monitoring listener (`kmip_core.metrics`, `[metrics]` in the configuration).

Counted where each thing happens (the dispatcher for request items and
database retries, the node's TLS refusal hook for handshake failures, the
audit trail for records); read when Prometheus scrapes (open connections,
the worker pool's queue, objects by type and state, the audit sinks).
Names and labels: docs/metrics.md.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from kmip.core.enums import ObjectType, State
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily

from kmip_core.metrics import MetricsListener, Readiness, RequestMetrics, check_tls_material, service_listener

__all__ = ["KmsMetrics", "OBJECT_COUNT_SECONDS", "kms_readiness", "monitor_listener"]

log = logging.getLogger("kms_server.metrics")

# Objects by type and state are counted at most this often (a GROUP BY over
# the attribute table): scrapes in between get the last count.
OBJECT_COUNT_SECONDS = 10.0
# A failed audit write keeps the node unready this long, unless a later
# write succeeds first.
AUDIT_FAILURE_SECONDS = 30.0


class KmsMetrics:
    """One node's registry and the counters its layers report to."""

    def __init__(self, node: str):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = RequestMetrics(self.registry, "kms")
        self.tls_failures = Counter(
            "kms_tls_handshake_failures_total",
            "Connections refused at the TLS layer: 'handshake' (failed or not finished), 'certificate' "
            "(verified but not usable as a client identity), 'limits' (dropped by the listener limits)",
            ["reason"],
            registry=self.registry,
        )
        self.audit_records = Counter(
            "kms_audit_records_written_total",
            "Audit records committed to the trail by this node",
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "kms_audit_write_failures_total",
            "Audit records that could not be written (the request was refused: fail closed)",
            registry=self.registry,
        )
        self.write_batches = Counter(
            "kms_write_batches_total",
            "SQLite: batches of writes run in the reactor thread, by result ('committed' or 'failed': "
            "their writes were answered General Failure)",
            ["result"],
            registry=self.registry,
        )
        self.batched_writes = Counter(
            "kms_batched_writes_total",
            "SQLite: write transactions committed in those batches (divided by the committed batches: "
            "the writes one commit serves)",
            registry=self.registry,
        )
        self.shared_commits = Counter(
            "kms_shared_commits_total",
            "Commits that write transactions of worker threads shared (group commit: on PostgreSQL every "
            "write; on SQLite those not run in the reactor), by result ('committed' or 'failed')",
            ["result"],
            registry=self.registry,
        )
        self.shared_commit_writes = Counter(
            "kms_shared_commit_writes_total",
            "Write transactions committed by those commits (divided by the committed ones: the writes one "
            "commit serves)",
            registry=self.registry,
        )
        self.verified_rows = Counter(
            "kms_verified_row_reads_total",
            "Object rows read by a request, by result: 'held' (unchanged since this process authenticated "
            "them: not authenticated again) or 'read' (authenticated)",
            ["result"],
            registry=self.registry,
        )
        self._held, self._read = self.verified_rows.labels("held"), self.verified_rows.labels("read")
        self._service: Any = None
        self._objects: list[tuple[str, str, int]] = []
        self._objects_at = 0.0
        self._objects_lock = threading.Lock()

    # Reported by the layers.
    def tls_refused(self, reason: str) -> None:
        if reason.startswith("client certificate not accepted"):
            kind = "certificate"
        elif reason.startswith("TLS handshake failed"):
            kind = "handshake"
        else:
            kind = "limits"
        self.tls_failures.labels(kind).inc()

    def audit_record(self) -> None:
        self.audit_records.inc()

    def audit_failed(self) -> None:
        self.audit_failures.inc()

    def write_batch(self, writes: int, committed: bool) -> None:
        self.write_batches.labels("committed" if committed else "failed").inc()
        if committed:
            self.batched_writes.inc(writes)

    def shared_commit(self, writes: int, committed: bool) -> None:
        self.shared_commits.labels("committed" if committed else "failed").inc()
        if committed:
            self.shared_commit_writes.inc(writes)

    def verified_row_read(self, held: bool) -> None:
        (self._held if held else self._read).inc()

    # Read on scrape.
    def watch(self, service, registry: CollectorRegistry | None = None) -> None:
        """Read the node's connections, pool, store and sinks on scrape, into
        `registry` (default: the node's own)."""
        self._service = service
        (registry or self.registry).register(_NodeCollector(self))

    def object_counts(self) -> list[tuple[str, str, int]]:
        with self._objects_lock:
            if time.monotonic() - self._objects_at >= OBJECT_COUNT_SECONDS or not self._objects_at:
                self._objects = _count_objects(self._service.storage)
                self._objects_at = time.monotonic()
            return list(self._objects)


class _NodeCollector:
    def __init__(self, metrics: KmsMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        service = self.metrics._service
        connections = GaugeMetricFamily(
            "kms_open_connections", "Connections open on a listener (handshaking or established)", labels=["listener"]
        )
        for name, listener in (("kmip", service.listener), ("audit_page", service.web_listener)):
            if listener is not None:
                connections.add_metric([name], listener.open_connections)
        yield connections
        pool = service.threadpool
        yield GaugeMetricFamily(
            "kms_worker_queue_depth", "Requests waiting for a worker thread", value=pool.q.qsize()
        )
        yield GaugeMetricFamily("kms_worker_threads_busy", "Worker threads running a request", value=len(pool.working))
        yield GaugeMetricFamily("kms_worker_threads_max", "Size of the worker pool", value=pool.max)
        objects = GaugeMetricFamily(
            "kms_objects", "Managed objects in the store by type and state (counted at most every 10 s)",
            labels=["object_type", "state"],
        )
        try:
            for object_type, state, count in self.metrics.object_counts():
                objects.add_metric([object_type, state], count)
        except Exception as exc:  # The database may be away: the rest still shows.
            log.debug("objects not counted: %s", exc)
        yield objects
        if service.sinks is not None:
            sinks = GaugeMetricFamily(
                "kms_audit_sink_records", "Audit records per SIEM sink: sent, dropped (queue full), failed",
                labels=["sink", "outcome"],
            )
            for name, stats in service.sinks.stats().items():
                for outcome, count in stats.items():
                    sinks.add_metric([name, outcome], count)
            yield sinks


def _count_objects(storage) -> list[tuple[str, str, int]]:
    engine = getattr(storage, "engine", None)
    if engine is None:
        return []
    from sqlalchemy import and_, func, select

    from kms_server.storage.sql import kms_attributes

    kind = kms_attributes.alias("kind")
    state = kms_attributes.alias("state")
    query = (
        select(kind.c.value, state.c.value, func.count())
        .select_from(kind.join(state, and_(state.c.uid == kind.c.uid, state.c.name == "State")))
        .where(kind.c.name == "Object Type")
        .group_by(kind.c.value, state.c.value)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    counts: dict[tuple[str, str], int] = {}
    for kind_value, state_value, count in rows:
        key = (_enum_name(ObjectType, kind_value), _enum_name(State, state_value))
        counts[key] = counts.get(key, 0) + int(count)
    return sorted((k, s, n) for (k, s), n in counts.items())


def _enum_name(enum, data: bytes) -> str:
    from kms_server.keystore.attributes import decode_value

    try:
        return enum(decode_value(bytes(data)).value).name
    except Exception:
        return "unknown"


def monitor_listener(service, reactor, settings=None) -> MetricsListener | None:
    """The node's monitoring listener (kmip_core.metrics.service_listener), or None when
    its [metrics] are off."""
    return service_listener(service, reactor, kms_readiness, settings)


# --- Readiness -----------------------------------------------------------------------


def kms_readiness(service) -> Readiness:
    """What /readyz checks on a KMS node: its database (reachable, at this
    release's schema), its master key (the barrier seals and opens), its
    TLS material (loaded and valid now), and its audit trail (writable)."""
    readiness = Readiness()
    readiness.add("database", lambda: _database(service.storage))
    readiness.add("master_key", lambda: _master_key(service.keystore.barrier))
    readiness.add(
        "tls", lambda: check_tls_material(kmip=service.context_factory, audit_page=service.web_context_factory)
    )
    readiness.add("audit_trail", lambda: _audit(service))
    return readiness


def _database(storage) -> str:
    engine = getattr(storage, "engine", None)
    if engine is None:
        return "in-memory store"
    writes = getattr(storage, "writes", None)
    if writes is not None and writes.refused is not None:
        # Until the node restarts (kms_server.storage.sql.WalSync).
        raise RuntimeError(f"writes are refused: {writes.refused}")
    from sqlalchemy import text

    from kms_server.storage import schema

    with engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    schema.check(engine, getattr(storage, "shown_url", "the database"))
    return f"{engine.dialect.name}, schema {schema.head_revision()}"


def _master_key(barrier) -> str:
    probe = b"readiness probe"
    if barrier.unseal("readyz", barrier.seal("readyz", probe)) != probe:
        raise RuntimeError("the master key's data key does not open what it sealed")
    return f"open (data key term {barrier.active_term})"


def _audit(service) -> str:
    if service.trail is None:
        return "auditing is off ([audit] enabled = false)"
    engine = getattr(service.storage, "engine", None)
    if engine is not None and engine.dialect.name == "postgresql":
        from sqlalchemy import text

        with engine.connect() as conn:
            if conn.execute(text("SHOW transaction_read_only")).scalar() == "on":
                raise RuntimeError("the database is read-only (a standby): audit records cannot be written")
    failed = service.trail.last_failure
    if failed is not None and time.monotonic() - failed[0] < AUDIT_FAILURE_SECONDS:
        raise RuntimeError(f"an audit record could not be written {time.monotonic() - failed[0]:.0f} s ago: {failed[1]}")
    return "writable"


# --- kms-admin cluster status ---------------------------------------------------------


def add_status_arguments(parser) -> None:
    """The readiness options of `kms-admin cluster status`."""
    parser.add_argument(
        "--metrics",
        action="append",
        metavar="URL",
        help="a node's monitoring listener, such as http://127.0.0.1:9101 (repeat for each node); "
        "default: the configuration's [metrics], when it names a port",
    )
    parser.add_argument("--cert", metavar="F", help="client certificate, for listeners with mutual TLS")
    parser.add_argument("--key", metavar="F", help="the client certificate's key")
    parser.add_argument("--ca", metavar="F", help="CA of the listeners' certificates (default: [metrics] ca)")


def print_node_readiness(args, console) -> int:
    """Each node's /readyz as a table (the same checks a load balancer
    sees); 0 if every node asked is ready, else 1."""
    from kmip_core.metrics import print_readiness, status_url
    from kms_server.config import load_config

    urls = list(args.metrics or [])
    ca = args.ca
    if args.config:
        settings = load_config(args.config, None, require_master_key=False).metrics
        ca = ca or settings.ca
        if not urls and settings.enabled and settings.port:
            urls = [status_url(settings)]
    if not urls:
        console.print("readiness: no node's monitoring listener is known; set [metrics] port or give --metrics URL")
        return 0
    return print_readiness("kms-server", urls, cert=args.cert, key=args.key, ca=ca)
