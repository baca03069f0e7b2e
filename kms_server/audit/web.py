"""The security team's page: a read-only HTTPS view of the audit trail
(issue 3, item 5), served by kms-server on `[audit] web_port`.

Mutual TLS on the server's own context factory; every request is
identified from its client certificate and only auditors and
administrators are served. Only GET and HEAD exist. Database reads run in
a worker thread, never in the reactor thread.

Routes:

- `/`              one self-contained HTML page (inline CSS and JS under a
                   nonce-based Content-Security-Policy) that lists and
                   filters the trail, plots key accesses per VM over time
                   and shows the chain's verification status. Its HTML,
                   CSS and JS are package data in `page/`.
- `/api/records`   records matching the filters, newest last, as JSON.
- `/api/activity`  accesses per VM and time bucket, for the plot.
- `/api/verify`    the chain's verification report.

Everything in a record that a client chose (x-Name, attribute values, the
KMIP username) reaches the browser only as JSON and is put into the page
with textContent, never parsed as markup.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import replace
from importlib import resources

from twisted.internet import defer, threads
from twisted.python.failure import Failure
from twisted.web import resource, server

from kmip_core import limits
from kmip_core.audit.chain import format_time
from kmip_core.policy import Role
from kms_server.audit.query import Filters, find, operation_name, parse_time, result_filter
from kms_server.audit.trail import VM_COMPONENT, iter_records, objects_named, verify_storage
from kms_server.storage.base import AuditQuery, Storage, StoredAuditRecord

log = logging.getLogger("kms_server.audit.web")

ALLOWED_ROLES = (Role.AUDITOR, Role.ADMINISTRATOR)
DEFAULT_LIMIT = 500
MAX_LIMIT = 5000
MAX_PARAMETER_CHARS = 256
IDLE_TIMEOUT = 60
# The plot shows at most this many VMs when no VM is chosen, and at most
# this many time buckets.
TOP_VMS = 5
MAX_BUCKETS = 60
_BUCKET_STEPS = (
    1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800,
    21600, 43200, 86400, 172800, 604800, 2592000,
)  # fmt: skip

_COMMON_HEADERS = {
    b"X-Content-Type-Options": b"nosniff",
    b"Cache-Control": b"no-store",
    b"Referrer-Policy": b"no-referrer",
    b"X-Frame-Options": b"DENY",
    b"Cross-Origin-Opener-Policy": b"same-origin",
    b"Cross-Origin-Resource-Policy": b"same-origin",
    b"Content-Security-Policy": b"default-src 'none'; frame-ancestors 'none'",
    b"Server": b"kms-server",
}


class BadRequest(Exception):
    """A query parameter cannot be used; the text says which and why."""


def parse_filters(args: dict[bytes, list[bytes]]) -> Filters:
    def one(name: str) -> str | None:
        values = args.get(name.encode())
        if not values:
            return None
        try:
            text = values[-1].decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadRequest(f"parameter {name} is not UTF-8 text") from None
        if len(text) > MAX_PARAMETER_CHARS:
            raise BadRequest(f"parameter {name} is longer than {MAX_PARAMETER_CHARS} characters")
        return text or None

    limit_text = one("limit")
    if limit_text is None:
        limit = DEFAULT_LIMIT
    else:
        try:
            limit = int(limit_text)
        except ValueError:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {limit_text!r}") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {limit}")
    since, until = one("since"), one("until")
    operation, result = one("operation"), one("result")
    try:
        status, reason = result_filter(result) if result else (None, None)
        return Filters(
            vm=one("vm"),
            host=one("host"),
            object=one("object"),
            client=one("client"),
            operation=operation_name(operation) if operation else None,
            result=status,
            reason=reason,
            since=parse_time(since) if since else None,
            until=parse_time(until) if until else None,
            limit=limit,
        )
    except ValueError as exc:
        raise BadRequest(str(exc)) from None


# Reading the trail (worker threads).
def record_view(record: StoredAuditRecord) -> dict:
    """What the page shows of a record. The indexed columns are what the
    filters matched; the rest comes from the hashed body."""
    try:
        body = json.loads(record.body)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        body = {}

    def part(name: str) -> dict:
        value = body.get(name)
        return value if isinstance(value, dict) else {}

    client, outcome = part("client"), part("result")
    return {
        "seq": record.seq,
        "time": body.get("time") if isinstance(body.get("time"), str) else format_time(record.time),
        "epoch": record.time,
        "node": record.node,
        "event": body.get("event"),
        "request_id": body.get("request_id"),
        "client": record.client,
        "role": client.get("role"),
        "subject": client.get("subject"),
        "fingerprint": client.get("fingerprint"),
        "username": client.get("username"),
        "peer": body.get("peer"),
        "protocol": body.get("protocol"),
        "operation": record.operation,
        "uid": record.uid,
        "x_name": record.x_name,
        "x_component": record.x_component,
        "x_identifier": record.x_identifier,
        "objects": body.get("objects") if isinstance(body.get("objects"), list) else [],
        "attributes": body.get("attributes") if isinstance(body.get("attributes"), list) else [],
        "result": record.result,
        "reason": outcome.get("reason"),
        "detail": body.get("detail"),
    }


def find_records(storage: Storage, filters: Filters) -> dict:
    """The newest `filters.limit` matching records, oldest first, and how
    many matched in all."""
    matched, newest = find(storage, filters)
    return {"matched": matched, "records": [record_view(r) for r in newest]}


def bucket_width(span: float, max_buckets: int = MAX_BUCKETS) -> int:
    for step in _BUCKET_STEPS:
        if span / step <= max_buckets:
            return step
    return math.ceil(span / max_buckets)


def vm_activity(storage: Storage, filters: Filters, top: int = TOP_VMS, max_buckets: int = MAX_BUCKETS) -> dict:
    """Records per VM and time bucket: for the VM of `filters.vm`, or for
    the `top` VMs with the most records. A record counts for a VM when its
    object was ever tagged with that VM (x-Component "Virtual Machine"), so
    the Create before the tags were added counts too."""
    window = AuditQuery(since=filters.since, until=filters.until)
    per_second: Counter[tuple[str, int]] = Counter()
    if filters.vm:
        uids = objects_named(storage, filters.vm, VM_COMPONENT)
        if uids:
            for record in iter_records(storage, replace(window, uids=uids)):
                per_second[(filters.vm, int(record.time))] += 1
    else:
        vm_of: dict[str, str] = {}
        for record in iter_records(storage, AuditQuery(component=VM_COMPONENT)):
            label = record.x_name or record.x_identifier
            if record.uid is not None and label:
                vm_of[record.uid] = label
        if vm_of:
            for record in iter_records(storage, window):
                label = vm_of.get(record.uid) if record.uid is not None else None
                if label is not None:
                    per_second[(label, int(record.time))] += 1
    totals: Counter[str] = Counter()
    for (label, _), count in per_second.items():
        totals[label] += count
    if not per_second:
        return {"bucket_seconds": 0, "start": None, "buckets": 0, "series": [], "other_vms": 0}
    shown = [label for label, _ in totals.most_common(top)]
    seconds = [second for (label, second) in per_second if label in shown]
    low, high = min(seconds), max(seconds)
    width = bucket_width(high - low + 1, max_buckets)
    start = low - low % width
    buckets = (high - start) // width + 1
    counts = {label: [0] * buckets for label in shown}
    for (label, second), count in per_second.items():
        if label in counts:
            counts[label][(second - start) // width] += count
    return {
        "bucket_seconds": width,
        "start": start,
        "buckets": buckets,
        "series": [{"vm": label, "total": totals[label], "counts": counts[label]} for label in shown],
        "other_vms": len(totals) - len(shown),
    }


def verification(storage: Storage, verifier) -> dict:
    report = verify_storage(storage, verifier)
    first = report.first_problem
    return {
        "ok": report.ok,
        "records": report.records,
        "first_seq": report.first_seq,
        "last_seq": report.last_seq,
        "checkpoints": report.checkpoints,
        "last_checkpoint": report.last_checkpoint,
        "unsigned_tail": report.unsigned_tail,
        "first_problem": None if first is None else {"seq": first.seq, "text": first.text},
        "problems": [{"seq": p.seq, "text": p.text} for p in report.problems],
        "signatures_checked": verifier is not None,
        "key_id": getattr(verifier, "key_id", None),
        "checked_at": format_time(time.time()),
    }


class _Shared:
    """One run of `start` at a time; callers that arrive while it runs get
    its result instead of starting another (verification reads the whole
    trail)."""

    def __init__(self, start: Callable[[], defer.Deferred]):
        self._start = start
        self._waiters: list[defer.Deferred] | None = None

    def __call__(self) -> defer.Deferred:
        waiter: defer.Deferred = defer.Deferred()
        if self._waiters is not None:
            self._waiters.append(waiter)
            return waiter
        self._waiters = [waiter]
        defer.maybeDeferred(self._start).addBoth(self._fire)
        return waiter

    def _fire(self, result) -> None:
        waiters, self._waiters = self._waiters or [], None
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)


class AuditPage(resource.Resource):
    """The whole site: one leaf resource that checks the caller and the
    method, then serves a route from its table."""

    isLeaf = True

    def __init__(
        self,
        storage: Storage,
        verifier,
        identify: Callable,
        defer_to_thread: Callable[..., defer.Deferred] = threads.deferToThread,
    ):
        super().__init__()
        self.storage = storage
        self.verifier = verifier
        self.identify = identify
        self.defer_to_thread = defer_to_thread
        self._verify = _Shared(lambda: self.defer_to_thread(verification, self.storage, self.verifier))
        self.routes: dict[bytes, Callable] = {
            b"/": self.page,
            b"/api/records": self.records,
            b"/api/activity": self.activity,
            b"/api/verify": self.verify,
            b"/favicon.ico": self.no_icon,
        }

    def render(self, request: server.Request):
        for name, value in _COMMON_HEADERS.items():
            request.setHeader(name, value)
        refusal = self.refusal(request)
        if refusal is not None:
            return _text(request, 403, refusal)
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"Allow", b"GET, HEAD")
            return _text(request, 405, "this page is read-only: only GET and HEAD are allowed")
        route = self.routes.get(request.path)
        if route is None:
            return _text(request, 404, "no such page")
        try:
            return route(request)
        except BadRequest as exc:
            return _text(request, 400, str(exc))

    def refusal(self, request: server.Request) -> str | None:
        """Why this caller may not see the trail, or None if it may."""
        transport = getattr(request.channel, "transport", None)
        get_certificate = getattr(transport, "getPeerCertificate", None)
        certificate = get_certificate() if get_certificate is not None else None
        address = request.getClientAddress()
        peer = f"{getattr(address, 'host', '?')}:{getattr(address, 'port', '?')}"
        if certificate is None:
            log.warning("audit page: request from %s without a client certificate refused", peer)
            return "a client certificate is required"
        try:
            principal = self.identify(certificate, peer).principal
        except Exception as exc:
            log.warning("audit page: client certificate from %s not accepted: %s", peer, exc)
            return "the client certificate is not accepted"
        if principal.role not in ALLOWED_ROLES:
            log.warning("audit page: %r from %s refused (role %s)", principal.name, peer, principal.role.value)
            return "the audit page is for auditors and administrators only"
        return None

    # Routes.
    def page(self, request: server.Request) -> bytes:
        nonce = secrets.token_urlsafe(18)
        request.setHeader(
            b"Content-Security-Policy",
            (
                f"default-src 'self'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
                "img-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                "form-action 'self'; frame-ancestors 'none'"
            ).encode(),
        )
        body = PAGE.replace("{nonce}", nonce).encode("utf-8")
        return _body(request, 200, body, b"text/html; charset=utf-8")

    def no_icon(self, request: server.Request) -> bytes:
        # Browsers ask for it on their own; an empty answer keeps their
        # consoles free of 404s.
        request.setResponseCode(204)
        return b""

    def records(self, request: server.Request):
        filters = parse_filters(request.args or {})
        return self._json_later(request, self.defer_to_thread(find_records, self.storage, filters))

    def activity(self, request: server.Request):
        filters = parse_filters(request.args or {})
        return self._json_later(request, self.defer_to_thread(vm_activity, self.storage, filters))

    def verify(self, request: server.Request):
        return self._json_later(request, self._verify())

    def _json_later(self, request: server.Request, work: defer.Deferred):
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))

        def done(payload: bytes) -> None:
            if not gone:
                _send(request, 200, payload, b"application/json")

        def failed(failure: Failure) -> None:
            log.error(
                "audit page: %s failed: %s",
                request.path.decode("ascii", "replace"),
                failure.getErrorMessage(),
                # A Failure always holds its type and value; Twisted types them Optional.
                exc_info=(failure.type, failure.value, failure.getTracebackObject()),  # type: ignore[arg-type]
            )
            if not gone:
                _send(
                    request, 503, b"503 the audit trail cannot be read right now; see the server log\n", b"text/plain"
                )

        work.addCallback(lambda value: json.dumps(value, ensure_ascii=False).encode("utf-8"))
        work.addCallbacks(done, failed)
        return server.NOT_DONE_YET


def _body(request: server.Request, code: int, body: bytes, content_type: bytes) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Content-Length", b"%d" % len(body))
    return body


def _text(request: server.Request, code: int, line: str) -> bytes:
    return _body(request, code, f"{code} {line}\n".encode(), b"text/plain; charset=utf-8")


def _send(request: server.Request, code: int, body: bytes, content_type: bytes) -> None:
    if content_type == b"text/plain":
        content_type += b"; charset=utf-8"
    request.write(_body(request, code, body, content_type))
    request.finish()


def make_site(
    storage: Storage,
    verifier,
    identify: Callable,
    defer_to_thread: Callable[..., defer.Deferred] = threads.deferToThread,
    reactor=None,
) -> server.Site:
    """The audit page as a Twisted Site, for `reactor.listenSSL` with the
    server's mutual-TLS context factory. `identify(certificate, peer)`
    returns the caller's ConnectionInfo or raises; `verifier` checks
    checkpoint signatures (None: not checked). Tests pass a synchronous
    `defer_to_thread` and a fake `reactor`."""
    site = server.Site(
        AuditPage(storage, verifier, identify, defer_to_thread), reactor=reactor, requestFactory=limits.TimedRequest
    )
    site.displayTracebacks = False
    # Idle keep-alive connections go after a minute (twisted.web's default
    # is twelve hours); the listener limits bound the rest.
    site.timeOut = IDLE_TIMEOUT
    return site


def _load_page() -> str:
    """The page: page/index.html with page/page.css and page/page.js put
    inline (the Content-Security-Policy allows only inline code carrying
    the request's nonce). Package data, read once at import."""
    folder = resources.files("kms_server.audit").joinpath("page")

    def read(name: str) -> str:
        return folder.joinpath(name).read_text(encoding="utf-8")

    return (
        read("index.html")
        .replace("{page.css}", read("page.css"))
        .replace("{page.js}", read("page.js"))
    )


PAGE = _load_page()
