"""The monitoring listener both services serve, apart from their client
listeners: Prometheus metrics and health for load balancers and
orchestration.

    GET /metrics   the service's registry in Prometheus text format
    GET /healthz   200 while the process answers (alive)
    GET /readyz    200 or 503, a JSON body naming each readiness check

A service builds a `CollectorRegistry` of its own (never the process-wide
one: tests run several services in one process) and a `Readiness` with the
checks it means (database, master key, TLS material, audit trail...), and
serves them with `MetricsListener`. The listener speaks plain HTTP only
when bound to 127.0.0.1 or ::1; any other address needs mutual TLS (a
server context factory from `kmip_core.tls`), else it refuses to start.

Checks and collectors that read a database run on the listener's own small
thread pool, never on the reactor thread nor on the service's worker pool
(a saturated pool must not make a node look dead). Probes that arrive while
a readiness run is in progress share its answer.

`fetch_readiness` and `readiness_table` are the client side, for the
status commands (`kms-admin cluster status`, `vtpm-broker admin status`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import ssl
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from twisted.web import resource, server

from kmip_core.config import ConfigError, check_file, choice, nonempty_str, path_value, port_number

# prometheus-client's multi-process mode: set by kmip_core.workers for the
# workers of a node; read by prometheus-client when it is first imported.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

# In that mode every inc and observe asks the kernel for the process id
# (os.getpid, a system call: five per request), to notice a fork that
# would have the child write into its parent's file. The id is kept here
# instead, and taken again in a forked child before anything else runs in
# it: prometheus-client's own hook for it (`process_identifier`), set
# before any value exists.
_PROCESS_ID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PROCESS_ID.__setitem__(0, os.getpid()))


def process_id() -> int:
    """This process's id, as of its start or its last fork."""
    return _PROCESS_ID[0]


if os.environ.get(MULTIPROCESS_ENV):
    from prometheus_client import values as _values

    _values.ValueClass = _values.MultiProcessValue(process_identifier=process_id)


# Held (flock) by the process that made a multi-process directory, for its
# lifetime: a directory whose lock is free was left by a process that died
# without removing it (SIGKILL allows no cleanup).
_DIRECTORY_LOCK = ".held"


@contextlib.contextmanager
def multiprocess_directory(prefix: str) -> Iterator[str]:
    """A new directory for prometheus-client's multi-process files (under
    the temporary directory, named `prefix` and a random suffix), held while
    the block runs and removed at its end. Directories of the same prefix
    and owner that a killed process left behind (their lock free) are
    removed first; one whose process still runs, or without a lock file
    (made by an earlier release), is left alone."""
    removed = remove_abandoned(prefix)
    if removed:
        log.info("removed %d metrics directories left by stopped processes: %s", len(removed), ", ".join(removed))
    path = tempfile.mkdtemp(prefix=prefix)
    fd = os.open(os.path.join(path, _DIRECTORY_LOCK), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        os.close(fd)


def remove_abandoned(prefix: str, directory: str | None = None) -> list[str]:
    """Remove the directories `multiprocess_directory(prefix)` made whose
    process is gone; the paths removed."""
    base = Path(directory or tempfile.gettempdir())
    removed = []
    for candidate in sorted(base.glob(f"{prefix}*")):
        try:
            if not candidate.is_dir() or candidate.is_symlink() or candidate.stat().st_uid != os.geteuid():
                continue
            fd = os.open(candidate / _DIRECTORY_LOCK, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue  # gone meanwhile, not ours, or no lock file: left alone
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its process runs
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(str(candidate))
        finally:
            os.close(fd)
    return removed

__all__ = [
    "MULTIPROCESS_ENV",
    "multiprocess_directory",
    "remove_abandoned",
    "CheckResult",
    "LOGGING_FORMAT",
    "LOOPBACK",
    "METRICS_SCHEMA",
    "MetricsConfig",
    "MetricsListener",
    "MetricsListenerError",
    "Readiness",
    "ReadinessReport",
    "RequestMetrics",
    "check_metrics_section",
    "check_tls_material",
    "fetch_readiness",
    "listener_limits",
    "print_readiness",
    "process_id",
    "readiness_table",
    "require_safe_bind",
    "service_listener",
    "status_url",
]

log = logging.getLogger("kmip_core.metrics")

# The only addresses the listener serves plain HTTP on.
LOOPBACK = frozenset({"127.0.0.1", "::1"})
# How long a readiness run may take before the answer is 503 anyway.
READINESS_TIMEOUT = 5.0


class MetricsListenerError(ValueError):
    """The monitoring listener cannot start as configured; one line with the fix."""


def require_safe_bind(host: str, tls: object | None) -> None:
    """Plain HTTP on loopback only: anything else needs mutual TLS."""
    if tls is not None:
        return
    if host in LOOPBACK:
        return
    raise MetricsListenerError(
        f"the metrics listener on {host} would serve plain HTTP off this machine; bind it to 127.0.0.1 "
        "(or ::1), or give [metrics] cert, key and ca for mutual TLS"
    )


# --- Configuration: [metrics] in both services' files ---------------------------


@dataclass(frozen=True)
class MetricsConfig:
    """`[metrics]`: the monitoring listener. Off unless `port` is set (0:
    any free port). Off loopback it needs `cert`/`key` (its server
    certificate) and `ca` (the CA that issues the scrapers' client
    certificates): mutual TLS."""

    host: str = "127.0.0.1"
    port: int | None = None
    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.port is not None

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def check_files(self) -> list[str]:
        problems: list[str] = []
        for key, path, secret in (("cert", self.cert, False), ("key", self.key, True), ("ca", self.ca, False)):
            if path is not None:
                problems.extend(check_file(f"metrics.{key}", path, secret=secret))
        return problems

    def context_factory(self, min_version: str = "1.2") -> Any:
        """The mutual-TLS context of the listener (a
        kmip_core.tls.ServerContextFactory), or None for plain HTTP."""
        if self.cert is None:
            return None
        from kmip_core import tls
        from kmip_core.config import TlsConfig

        settings = TlsConfig(
            cert=self.cert,
            key=self.key,
            ca=self.ca,
            # No pinned scrapers: client certificates come from `ca` only.
            trusted_clients_dir=self.cert.parent / ".no-pinned-metrics-clients",
            identity="cn",
            min_version=min_version,
        )
        return tls.server_context_factory(settings, kmip_suites=False)


METRICS_SCHEMA = {
    "host": (nonempty_str, "127.0.0.1"),
    "port": (port_number, None),
    "cert": (path_value, None),
    "key": (path_value, None),
    "ca": (path_value, None),
}
# [logging] format: "text" (the default) or "json" (kmip_core.logs).
LOGGING_FORMAT = (choice(("text", "json")), "text")


def check_metrics_section(values: dict[str, Any]) -> None:
    """Cross-checks of [metrics]: TLS material whole or absent, and never
    plain HTTP off loopback (raises ConfigError)."""
    given = [k for k in ("cert", "key", "ca") if values.get(k) is not None]
    if given and len(given) != 3:
        missing = [k for k in ("cert", "key", "ca") if k not in given]
        raise ConfigError(f"config: metrics.{given[0]} is set without metrics.{missing[0]}; give cert, key and ca together")
    if values.get("port") is not None:
        try:
            require_safe_bind(values["host"], True if given else None)
        except MetricsListenerError as exc:
            raise ConfigError(f"config: {exc}") from None


# --- What a KMIP dispatcher reports -----------------------------------------------


# Children kept per RequestMetrics: far more than operations x results, and
# a bound all the same (undefined operation codes share one label, but each
# is its own key here).
_KEPT_CHILDREN = 4096


class RequestMetrics:
    """KMIP request items by operation and result, their latency, and the
    database retry/failover events of the layer that runs them. `prefix`
    names the service (``kms``, ``vtpm_broker_gateway``)."""

    def __init__(self, registry: CollectorRegistry, prefix: str):
        self.requests = Counter(
            f"{prefix}_requests_total",
            "KMIP request items answered, by operation and result (SUCCESS or the Result Reason); "
            "messages refused as a whole count under operation '-'",
            ["operation", "result"],
            registry=registry,
        )
        self.latency = Histogram(
            f"{prefix}_request_duration_seconds",
            "Time to run one KMIP request item, audit record included, by operation",
            ["operation"],
            registry=registry,
        )
        self.database = Counter(
            f"{prefix}_database_events_total",
            "Database connection losses met while running requests: 'retry' (run again after a wait), "
            "'gave_up' (answered General Failure after the retry window), 'commit_unknown' (lost during a commit)",
            ["event"],
            registry=registry,
        )
        # The children `labels` returns (it takes a lock and checks the
        # labels at every call), by (operation, result) and by operation.
        self._counters: dict[tuple[str, str], Any] = {}
        self._latencies: dict[str, Any] = {}

    @staticmethod
    def _operation(name: str) -> str:
        # Undefined operation codes come as hex: one label for all of them,
        # so a fuzzer cannot grow the series without bound.
        return "unknown" if name.startswith("0x") else name

    def request(self, operation: str, result: str, seconds: float | None = None) -> None:
        counter = self._counters.get((operation, result))
        if counter is None:
            counter = self.requests.labels(self._operation(operation), result)
            if len(self._counters) < _KEPT_CHILDREN:
                self._counters[(operation, result)] = counter
        counter.inc()
        if seconds is not None:
            latency = self._latencies.get(operation)
            if latency is None:
                latency = self.latency.labels(self._operation(operation))
                if len(self._latencies) < _KEPT_CHILDREN:
                    self._latencies[operation] = latency
            latency.observe(seconds)

    def database_event(self, event: str) -> None:
        self.database.labels(event).inc()


# --- Readiness ----------------------------------------------------------------------


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    seconds: float

    def as_json(self) -> dict:
        return {"name": self.name, "ok": self.ok, "detail": self.detail, "seconds": round(self.seconds, 4)}


@dataclass(frozen=True)
class ReadinessReport:
    checks: tuple[CheckResult, ...]

    @property
    def ready(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_json(self) -> dict:
        return {"ready": self.ready, "checks": [c.as_json() for c in self.checks]}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


class Readiness:
    """Named checks, run in the order added. A check returns a short detail
    when it passes and raises (any exception, its first line is the
    detail) when it does not. Checks run on a worker thread and may block."""

    def __init__(self) -> None:
        self._checks: list[tuple[str, Callable[[], str | None]]] = []

    def add(self, name: str, check: Callable[[], str | None]) -> None:
        if any(n == name for n, _ in self._checks):
            raise ValueError(f"readiness check {name!r} is registered twice")
        self._checks.append((name, check))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n, _ in self._checks)

    def run(self) -> ReadinessReport:
        results = []
        for name, check in self._checks:
            started = time.monotonic()
            try:
                detail = check() or "ok"
                ok = True
            except Exception as exc:
                detail, ok = _first_line(exc), False
            results.append(CheckResult(name, ok, detail, time.monotonic() - started))
        return ReadinessReport(tuple(results))


def check_tls_material(**factories: Any) -> str:
    """A readiness check: each listener's TLS context (name=factory, a
    Twisted context factory) holds a server certificate valid now."""
    import datetime as dt

    from OpenSSL import SSL

    details = []
    for name, factory in factories.items():
        if factory is None:
            continue
        certificate = SSL.Connection(factory.getContext(), None).get_certificate()
        if certificate is None:
            raise RuntimeError(f"{name}: no server certificate is loaded")
        cert = certificate.to_cryptography()
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
            raise RuntimeError(
                f"{name}: the server certificate is not valid now (valid until {cert.not_valid_after_utc:%Y-%m-%d})"
            )
        details.append(f"{name} valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    return "; ".join(details) or "no TLS listener"


# --- The listener -------------------------------------------------------------------


class _Monitor(resource.Resource):
    isLeaf = True

    def __init__(self, listener: MetricsListener):
        super().__init__()
        self.listener = listener

    def render_GET(self, request: server.Request) -> Any:
        request.setHeader(b"cache-control", b"no-store")
        path = request.path.rstrip(b"/") or b"/"
        if path == b"/healthz":
            request.setHeader(b"content-type", b"application/json")
            return b'{"alive": true}\n'
        if path == b"/readyz":
            return self._deferred(request, self.listener.ready(), self._ready_body)
        if path == b"/metrics":
            return self._deferred(request, self.listener.scrape(), self._metrics_body)
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"not found: /metrics, /healthz and /readyz are served here\n"

    @staticmethod
    def _ready_body(request: server.Request, report: ReadinessReport) -> bytes:
        request.setResponseCode(200 if report.ready else 503)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(report.as_json()).encode("utf-8") + b"\n"

    @staticmethod
    def _metrics_body(request: server.Request, data: bytes) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return data

    @staticmethod
    def _deferred(request: server.Request, d: defer.Deferred, body: Callable[[server.Request, Any], bytes]) -> Any:
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))

        def done(result: Any) -> None:
            if finished:
                return
            request.write(body(request, result))
            request.finish()

        def failed(failure: Any) -> None:
            log.warning("monitoring request %s failed: %s", request.path.decode("ascii", "replace"), failure.getErrorMessage())
            if finished:
                return
            request.setResponseCode(503 if request.path.startswith(b"/readyz") else 500)
            request.setHeader(b"content-type", b"application/json")
            request.write(json.dumps({"ready": False, "error": failure.getErrorMessage()}).encode("utf-8") + b"\n")
            request.finish()

        d.addCallbacks(done, failed)
        return server.NOT_DONE_YET


class _QuietSite(server.Site):
    """No access log: scrapes and probes every few seconds are not news."""

    def log(self, request: Any) -> None:
        pass


def listener_limits() -> Any:
    """The limits of the TLS monitoring listener (kmip_core.limits): a
    scraper or two and probes, nothing like a client listener's share."""
    from kmip_core.limits import ListenerLimits

    return ListenerLimits(max_connections=32, max_handshakes=32, handshake_timeout=10.0, request_timeout=10.0)


class MetricsListener:
    """/metrics, /healthz and /readyz on `host`:`port` (0: a free port).
    `tls`: a server context factory that verifies client certificates
    (mutual TLS), required unless `host` is 127.0.0.1 or ::1."""

    def __init__(
        self,
        reactor: Any,
        registry: CollectorRegistry,
        readiness: Readiness,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: Any = None,
        timeout: float = READINESS_TIMEOUT,
    ) -> None:
        require_safe_bind(host, tls)
        self.reactor = reactor
        self.registry = registry
        self.readiness = readiness
        self.host = host
        self.port_number = port
        self.tls = tls
        self.timeout = timeout
        self.port: Any = None
        self.factory: Any = None
        self.threadpool = ThreadPool(minthreads=0, maxthreads=2, name="monitoring")
        self._running: defer.Deferred | None = None
        # A run that timed out and has not returned yet (a check blocked on
        # a dead database): no new run starts until it does.
        self._stuck: defer.Deferred | None = None
        self._waiters: list[defer.Deferred] = []

    @property
    def scheme(self) -> str:
        return "http" if self.tls is None else "https"

    @property
    def url(self) -> str:
        address = self.port.getHost()
        host = f"[{address.host}]" if ":" in address.host else address.host
        return f"{self.scheme}://{host}:{address.port}/"

    def start(self) -> Any:
        site = _QuietSite(_Monitor(self))
        site.displayTracebacks = False
        site.timeOut = 30
        self.threadpool.start()
        try:
            if self.tls is None:
                self.factory = site
                self.port = self.reactor.listenTCP(self.port_number, site, interface=self.host)
            else:
                from kmip_core.limits import LimitedFactory, TimedRequest

                site.requestFactory = TimedRequest
                self.factory = LimitedFactory(site, listener_limits(), self.reactor, name="metrics")
                self.port = self.reactor.listenSSL(self.port_number, self.factory, self.tls, interface=self.host)
        except Exception:
            self.threadpool.stop()
            raise
        return self.port

    @defer.inlineCallbacks
    def stop(self) -> Any:
        if self.port is not None:
            yield self.port.stopListening()
            self.port = None
        close_all = getattr(self.factory, "close_all", None)
        if close_all is not None:
            yield close_all()
        if self.threadpool.started:
            self.threadpool.stop()

    # What the resource serves.
    def scrape(self) -> defer.Deferred:
        return deferToThreadPool(self.reactor, self.threadpool, generate_latest, self.registry)

    def ready(self) -> defer.Deferred:
        """The report of a readiness run: the one in progress, or a new one.
        A run that takes longer than `timeout` answers not ready."""
        waiter: defer.Deferred = defer.Deferred()
        if self._running is None and self._stuck is not None:
            waiter.callback(self._not_answered("the previous readiness run has not returned yet"))
            return waiter
        self._waiters.append(waiter)
        if self._running is None:
            run = deferToThreadPool(self.reactor, self.threadpool, self.readiness.run)
            self._running = run
            timeout = self.reactor.callLater(self.timeout, self._timed_out, run)

            def finished(result: Any) -> None:
                if timeout.active():
                    timeout.cancel()
                if self._stuck is run:
                    self._stuck = None
                if self._running is run:
                    self._running = None
                    self._answer(result)

            run.addBoth(finished)
        return waiter

    def _timed_out(self, run: defer.Deferred) -> None:
        if self._running is run:
            self._running = None
            self._stuck = run
            self._answer(self._not_answered(f"no answer within {self.timeout:g} s"))

    def _not_answered(self, why: str) -> ReadinessReport:
        return ReadinessReport(tuple(CheckResult(n, False, why, self.timeout) for n in self.readiness.names))

    def _answer(self, result: Any) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(result) if isinstance(result, ReadinessReport) else waiter.errback(result)


# --- Client side, for the status commands ------------------------------------------


def service_listener(
    service: Any, reactor: Any, readiness: Callable[[Any], Readiness], settings: MetricsConfig | None = None
) -> MetricsListener | None:
    """A service's monitoring listener as `settings` (default: the
    service's `[metrics]`) say, or None when it is off. The service has
    `cfg.metrics`, `cfg.tls.min_version` and `metrics` (a registry and a
    `watch(service)` for what is read on scrape); `readiness(service)` builds
    its checks."""
    settings = settings if settings is not None else service.cfg.metrics
    if settings.port is None:  # not enabled
        return None
    registry = service.metrics.registry
    shared = os.environ.get(MULTIPROCESS_ENV)
    if shared:
        # One of several worker processes (kmip_core.workers): the counters
        # and histograms of every worker are in `shared`; serve their sums,
        # and this process's own on-scrape readings beside them.
        from prometheus_client import multiprocess

        registry = CollectorRegistry(auto_describe=True)
        multiprocess.MultiProcessCollector(registry, path=shared)
    service.metrics.watch(service, registry)
    return MetricsListener(
        reactor,
        registry,
        readiness(service),
        host=settings.host,
        port=settings.port,
        tls=settings.context_factory(service.cfg.tls.min_version),
    )


def fetch_readiness(
    url: str, cert: Any = None, key: Any = None, ca: Any = None, timeout: float = 10.0
) -> tuple[int | None, dict]:
    """GET <url>/readyz: (HTTP status, JSON body). A listener that does
    not answer gives (None, {"error": ...}). `cert`/`key`/`ca`: client
    certificate and CA for an https URL (mutual TLS)."""
    target = url.rstrip("/")
    if not target.endswith("/readyz"):
        target += "/readyz"
    context = None
    if target.startswith("https://"):
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        if cert is not None:
            context.load_cert_chain(str(cert), str(key) if key else None)
    try:
        with urllib.request.urlopen(target, timeout=timeout, context=context) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read() or b"{}")
        except ValueError:
            return exc.code, {"error": f"HTTP {exc.code}"}
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, {"error": f"no answer from {target}: {reason}"}


def readiness_table(title: str, status: int | None, body: dict) -> Any:
    """A rich Table of one node's readiness: each check, ok or not, its detail."""
    from rich.table import Table

    verdict = "ready" if status == 200 else "NOT READY" if status is not None else "UNREACHABLE"
    table = Table(title=f"{title}: {verdict}")
    table.add_column("check")
    table.add_column("state")
    table.add_column("detail")
    for check in body.get("checks", []):
        state = "[green]ok[/green]" if check.get("ok") else "[red]FAILED[/red]"
        table.add_row(str(check.get("name")), state, str(check.get("detail", "")))
    if not body.get("checks"):
        table.add_row("-", "[red]FAILED[/red]", str(body.get("error", "no readiness report")))
    return table


def status_url(settings: MetricsConfig) -> str:
    """Where a status command on the same host finds the listener that
    `settings` describe; raises ConfigError when they do not say."""
    if not settings.enabled or not settings.port:
        raise ConfigError(
            "the metrics listener is off or on a port chosen at start ([metrics] port unset or 0); "
            "set [metrics] port, or give --url"
        )
    host = settings.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    return f"{'https' if settings.tls else 'http'}://{host}:{settings.port}/"


def print_readiness(title: str, urls: list[str], cert: Any = None, key: Any = None, ca: Any = None) -> int:
    """Print one readiness table per URL (rich); 0 if every node is ready, else 1."""
    from rich.console import Console

    console = Console()
    ready = True
    for url in urls:
        status, body = fetch_readiness(url, cert=cert, key=key, ca=ca)
        ready = ready and status == 200
        console.print(readiness_table(f"{title} {url.rstrip('/')}", status, body))
    return 0 if ready else 1
