"""The broker's metrics and readiness checks, served by the shared
monitoring listener (`kmip_core.metrics`, `[metrics]` in the configuration).

Counted where each thing happens: the API for enrollments and rate-limit
refusals, the gateway for unwraps and their latency (what a host's power-on
waits for), the KMS client for its requests; read when Prometheus scrapes:
open connections, worker queues, the KMS connection pool. Names and labels:
docs/metrics.md.
"""

from __future__ import annotations

import logging
from typing import Any

from kmip.core.enums import Operation
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from kmip_core.client import KmipClient, KmipError
from kmip_core.metrics import MetricsListener, Readiness, RequestMetrics, check_tls_material, service_listener

__all__ = ["BrokerMetrics", "MeteredKmipClient", "broker_readiness", "monitor_listener"]

log = logging.getLogger("broker.metrics")

# Unwraps take milliseconds when all is well and up to the KMS client's
# timeouts when a node is failing over.
UNWRAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class BrokerMetrics:
    """One broker's registry and the counters its parts report to."""

    def __init__(self, node: str):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=True)
        self.gateway = RequestMetrics(self.registry, "vtpm_broker_gateway")
        self.enrollments = Counter(
            "vtpm_broker_enrollments_total",
            "Enrollment requests (POST /v1/enroll): accepted (pending approval), refused, rate_limited",
            ["result"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "vtpm_broker_rate_limit_refusals_total",
            "Requests answered 429 by a rate limit, by endpoint",
            ["endpoint"],
            registry=self.registry,
        )
        self.api_requests = Counter(
            "vtpm_broker_api_requests_total",
            "Management API answers by HTTP status",
            ["status"],
            registry=self.registry,
        )
        self.unwraps = Counter(
            "vtpm_broker_unwraps_total",
            "Gateway unwraps (Decrypt of a VM's DEK for a host): allowed (key returned), refused (by the trust "
            "registry), attestation_refused (the host's attestation token missing or not valid), kms_failure "
            "(allowed, but the KMS did not return the key)",
            ["result"],
            registry=self.registry,
        )
        self.attestations = Counter(
            "vtpm_broker_attestations_total",
            "Host quotes verified (POST /v1/attestation/quote): attested (token issued), no_policy (verified, no "
            "policy covers the host), failed (refused: signature, nonce, PCRs, boot counters)",
            ["result"],
            registry=self.registry,
        )
        self.unwrap_latency = Histogram(
            "vtpm_broker_unwrap_duration_seconds",
            "Time from a host's Decrypt to the gateway's answer (authorization, KMS Decrypt, audit record): "
            "what a power-on waits for",
            buckets=UNWRAP_BUCKETS,
            registry=self.registry,
        )
        self.kms_requests = Counter(
            "vtpm_broker_kms_requests_total",
            "KMIP requests the broker sent to the KMS, by operation and result (SUCCESS, the Result Reason, "
            "or NO_ANSWER)",
            ["operation", "result"],
            registry=self.registry,
        )
        self.kms_in_flight = Gauge(
            "vtpm_broker_kms_requests_in_flight",
            "KMIP requests to the KMS started and not answered yet (beyond the pool size they wait for a connection)",
            registry=self.registry,
        )
        self.kms_latency = Histogram(
            "vtpm_broker_kms_request_duration_seconds",
            "Time of one KMIP request to the KMS, waiting for a pooled connection included",
            ["operation"],
            buckets=UNWRAP_BUCKETS,
            registry=self.registry,
        )
        self._service: Any = None

    # Reported by the parts.
    def api_answered(self, method: str, path: str, status: int) -> None:
        self.api_requests.labels(str(status)).inc()
        if status == 429:
            self.rate_limited.labels("enroll" if path == "/v1/enroll" else "other").inc()
        if method == "POST" and path == "/v1/enroll":
            result = "accepted" if status == 202 else "rate_limited" if status == 429 else "refused"
            self.enrollments.labels(result).inc()

    def attestation(self, result: str) -> None:
        self.attestations.labels(result).inc()

    def unwrap(self, result: str) -> None:
        self.unwraps.labels(result).inc()

    def unwrap_seconds(self, seconds: float) -> None:
        self.unwrap_latency.observe(seconds)

    def watch(self, service, registry: CollectorRegistry | None = None) -> None:
        """Read the broker's state on scrape, into `registry` (default: its own)."""
        self._service = service
        (registry or self.registry).register(_BrokerCollector(self))


class _BrokerCollector:
    def __init__(self, metrics: BrokerMetrics):
        self.metrics = metrics

    def describe(self):
        return []

    def collect(self):
        service = self.metrics._service
        connections = GaugeMetricFamily(
            "vtpm_broker_open_connections",
            "Connections open on a listener (handshaking or established)",
            labels=["listener"],
        )
        connections.add_metric(["api"], service.api_listener.open_connections)
        if service.gateway is not None:
            connections.add_metric(["gateway"], getattr(service.gateway[0], "open_connections", 0))
        yield connections
        queue = GaugeMetricFamily(
            "vtpm_broker_worker_queue_depth", "Requests waiting for a worker thread", labels=["pool"]
        )
        queue.add_metric(["api"], service.api_threadpool.q.qsize())
        queue.add_metric(["gateway"], service.gateway_threadpool.q.qsize())
        yield queue
        yield GaugeMetricFamily(
            "vtpm_broker_kms_pool_connections",
            "Size of the KMS connection pool ([kms] connections)",
            value=service.kms_client.connections,
        )
        hosts = GaugeMetricFamily(
            "vtpm_broker_hosts_by_attestation",
            "Registered hosts by attestation status: attested (a valid token), failed (last quote refused), stale "
            "(no valid token), enrolled (never attested), pinned (TPM pinned, not enrolled), revoked, none (no TPM)",
            labels=["status"],
        )
        counts = {status: 0 for status in ("attested", "failed", "stale", "enrolled", "pinned", "revoked", "none")}
        try:
            for host in service.registry.attestation_status():
                counts[host.status] = counts.get(host.status, 0) + 1
        except Exception as exc:  # the database is down: /readyz says so; the scrape goes on
            log.warning("attestation status not read for /metrics: %s", exc)
        else:
            for status, count in counts.items():
                hosts.add_metric([status], count)
            yield hosts


class MeteredKmipClient(KmipClient):
    """The KMS client, counting its requests, their results and latency,
    and how many are in flight (the pool's use). `metrics` is set after
    construction; None counts nothing."""

    metrics: BrokerMetrics | None = None

    def request(self, operation, payload_items=()):
        metrics = self.metrics
        if metrics is None:
            return super().request(operation, payload_items)
        name = Operation(operation).name
        result = "SUCCESS"
        metrics.kms_in_flight.inc()
        with metrics.kms_latency.labels(name).time():
            try:
                return super().request(operation, payload_items)
            except KmipError as exc:
                result = exc.reason.name if exc.reason is not None else "NO_ANSWER"
                raise
            except Exception:
                result = "ERROR"
                raise
            finally:
                metrics.kms_in_flight.dec()
                metrics.kms_requests.labels(name, result).inc()


def monitor_listener(service, reactor, settings=None) -> MetricsListener | None:
    """The broker's monitoring listener (kmip_core.metrics.service_listener), or None when
    its [metrics] are off."""
    return service_listener(service, reactor, broker_readiness, settings)


# --- Readiness -----------------------------------------------------------------------


def broker_readiness(service) -> Readiness:
    """What /readyz checks on a broker: its database (reachable, at this
    release's schema), its KMS connection pool (a KMS node answers), its
    TLS material (the API's and the gateway's server certificate)."""
    readiness = Readiness()
    readiness.add("database", lambda: _database(service.db))
    readiness.add("kms", lambda: _kms(service.kms_client))
    readiness.add(
        "tls",
        lambda: check_tls_material(
            api=service.api_tls, gateway=service.gateway[1] if service.gateway is not None else None
        ),
    )
    return readiness


def _database(db) -> str:
    from sqlalchemy import text

    from broker import schema

    with db.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    schema.check(db)
    return f"{db.dialect}, schema {schema.head_revision()}"


def _kms(client: KmipClient) -> str:
    # DiscoverVersions: cheap, changes nothing, retried on the next node.
    client.discover_versions()
    return f"{client.current_node} answers ({client.connections} pooled connections)"
