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
                   and shows the chain's verification status.
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
        filters = parse_filters(request.args)
        return self._json_later(request, self.defer_to_thread(find_records, self.storage, filters))

    def activity(self, request: server.Request):
        filters = parse_filters(request.args)
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
                exc_info=(failure.type, failure.value, failure.getTracebackObject()),
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


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>KMS audit trail</title>
<style nonce="{nonce}">
  body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #1d1d1f; }
  h1 { font-size: 1.4em; margin: 0 0 .5em; }
  h2 { font-size: 1.1em; margin: 1.2em 0 .4em; }
  form { display: flex; flex-wrap: wrap; gap: .5em 1em; align-items: end; }
  label { display: flex; flex-direction: column; font-size: .85em; color: #444; }
  input, select { font: inherit; padding: .2em .4em; min-width: 10em; }
  button { font: inherit; padding: .3em 1.2em; }
  #verify-status { padding: .5em .8em; border-radius: 4px; background: #eee; }
  #verify-status.ok { background: #e3f5e1; color: #1e5a1a; }
  #verify-status.bad { background: #fde2e1; color: #8a1410; font-weight: bold; }
  #verify-details { color: #555; margin: .3em 0 0; }
  #error { color: #8a1410; white-space: pre-wrap; }
  table { border-collapse: collapse; width: 100%; font-size: .9em; }
  th, td { text-align: left; padding: .2em .5em; border-bottom: 1px solid #ddd; vertical-align: top; }
  th { background: #f4f4f4; position: sticky; top: 0; }
  td { overflow-wrap: anywhere; }
  tr.failed td { background: #fff4f3; }
  #plot { width: 100%; max-width: 960px; height: 280px; border: 1px solid #ddd; }
  #plot text { font-size: 11px; fill: #333; }
</style>
</head>
<body>
<h1>KMS audit trail</h1>

<section>
  <h2>Chain verification</h2>
  <div id="verify-status" data-ok="">Verifying the chain&hellip;</div>
  <div id="verify-details"></div>
</section>

<section>
  <h2>Filter</h2>
  <form id="filters" method="get" action="/">
    <label>VM (x-Name or x-Identifier)<input id="filter-vm" name="vm" autocomplete="off"></label>
    <label>Host<input id="filter-host" name="host" autocomplete="off"></label>
    <label>Object UID<input id="filter-object" name="object" autocomplete="off"></label>
    <label>Client<input id="filter-client" name="client" autocomplete="off"></label>
    <label>Operation<input id="filter-operation" name="operation" placeholder="GET" autocomplete="off"></label>
    <label>Result<select id="filter-result" name="result">
      <option value="">any</option>
      <option value="SUCCESS">success</option>
      <option value="OPERATION_FAILED">failed</option>
      <option value="OPERATION_UNDONE">undone</option>
    </select></label>
    <label>Since (UTC)<input id="filter-since" name="since" placeholder="2024-05-01T10:00" autocomplete="off"></label>
    <label>Until (UTC)<input id="filter-until" name="until" placeholder="2024-05-01T18:00" autocomplete="off"></label>
    <label>Limit<input id="filter-limit" name="limit" type="number" min="1" max="5000" value="500"></label>
    <button id="apply" type="submit">Apply</button>
    <button id="clear" type="button">Clear</button>
  </form>
  <div id="error" role="alert"></div>
</section>

<section>
  <h2>Key accesses per VM over time</h2>
  <svg id="plot" viewBox="0 0 960 280" role="img" aria-label="key accesses per VM over time"></svg>
</section>

<section>
  <h2>Records</h2>
  <p id="summary"></p>
  <table id="records">
    <thead><tr>
      <th>Seq</th><th>Time (UTC)</th><th>Client</th><th>Peer</th><th>Operation</th><th>UID</th>
      <th>x-Name</th><th>x-Component</th><th>Result</th>
    </tr></thead>
    <tbody></tbody>
  </table>
</section>

<script nonce="{nonce}">
"use strict";
(function () {
  const FIELDS = ["vm", "host", "object", "client", "operation", "result", "since", "until", "limit"];
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
  const SVG = "http://www.w3.org/2000/svg";
  const byId = (id) => document.getElementById(id);

  function currentFilters() {
    const query = new URLSearchParams();
    for (const name of FIELDS) {
      const value = byId("filter-" + name).value.trim();
      if (value && !(name === "limit" && value === "500")) query.set(name, value);
    }
    return query;
  }

  function filtersFromUrl() {
    const query = new URLSearchParams(window.location.search);
    for (const name of FIELDS) {
      const value = query.get(name);
      if (value !== null) byId("filter-" + name).value = value;
    }
  }

  async function getJson(path) {
    const response = await fetch(path, {credentials: "same-origin", cache: "no-store"});
    if (!response.ok) {
      const text = (await response.text()).trim();
      throw new Error(text || ("HTTP " + response.status));
    }
    return response.json();
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function cell(row, text, name) {
    const td = document.createElement("td");
    td.className = "c-" + name;
    td.textContent = text === null || text === undefined ? "" : String(text);
    row.appendChild(td);
    return td;
  }

  function showRecords(data) {
    const body = document.querySelector("#records tbody");
    clear(body);
    for (const r of data.records) {
      const row = document.createElement("tr");
      row.dataset.seq = String(r.seq);
      if (r.result !== "SUCCESS") row.className = "failed";
      cell(row, r.seq, "seq");
      cell(row, r.time, "time");
      const who = cell(row, r.client, "client");
      if (r.subject) who.title = r.subject + (r.username ? " (user " + r.username + ")" : "");
      cell(row, r.peer, "peer");
      cell(row, r.operation, "operation");
      cell(row, r.uid, "uid");
      cell(row, r.x_name, "x-name");
      cell(row, r.x_component, "x-component");
      const result = cell(row, r.reason ? r.result + " / " + r.reason : r.result, "result");
      if (r.detail) result.title = r.detail;
      body.appendChild(row);
    }
    const shown = data.records.length;
    byId("summary").textContent = shown === data.matched
      ? shown + " records (oldest first)"
      : "the newest " + shown + " of " + data.matched + " matching records (oldest first)";
  }

  function svgNode(parent, name, attributes, text) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    parent.appendChild(node);
    return node;
  }

  function timeLabel(epoch) {
    return new Date(epoch * 1000).toISOString().replace(".000Z", "Z").replace("T", " ");
  }

  function drawPlot(data) {
    const svg = byId("plot");
    clear(svg);
    const W = 960, H = 280, left = 50, right = 190, top = 15, bottom = 40;
    const width = W - left - right, height = H - top - bottom;
    svg.dataset.series = String(data.series.length);
    if (!data.series.length) {
      svgNode(svg, "text", {x: left, y: H / 2, id: "plot-empty"}, "No key accesses for this selection.");
      return;
    }
    let peak = 1;
    for (const s of data.series) for (const c of s.counts) peak = Math.max(peak, c);
    const n = data.buckets;
    const x = (i) => left + (n === 1 ? width / 2 : (i * width) / (n - 1));
    const y = (c) => top + height - (c * height) / peak;
    svgNode(svg, "line", {x1: left, y1: top + height, x2: left + width, y2: top + height, stroke: "#888"});
    svgNode(svg, "line", {x1: left, y1: top, x2: left, y2: top + height, stroke: "#888"});
    svgNode(svg, "text", {x: left - 6, y: top + 4, "text-anchor": "end"}, String(peak));
    svgNode(svg, "text", {x: left - 6, y: top + height, "text-anchor": "end"}, "0");
    svgNode(svg, "text", {x: left, y: H - 20}, timeLabel(data.start));
    svgNode(svg, "text", {x: left + width, y: H - 20, "text-anchor": "end"},
      timeLabel(data.start + (n - 1) * data.bucket_seconds));
    svgNode(svg, "text", {x: left + width / 2, y: H - 4, "text-anchor": "middle"},
      "accesses per " + data.bucket_seconds + " s");
    data.series.forEach((s, index) => {
      const color = COLORS[index % COLORS.length];
      const points = s.counts.map((c, i) => x(i) + "," + y(c)).join(" ");
      svgNode(svg, "polyline", {points: points, fill: "none", stroke: color, "stroke-width": 2, class: "series"});
      s.counts.forEach((c, i) => {
        if (!c) return;
        const dot = svgNode(svg, "circle", {cx: x(i), cy: y(c), r: 3.5, fill: color, class: "point"});
        dot.setAttribute("data-vm", s.vm);
        dot.setAttribute("data-count", String(c));
        svgNode(dot, "title", {}, s.vm + ": " + c + " at " + timeLabel(data.start + i * data.bucket_seconds));
      });
      const ly = top + 14 + index * 18;
      svgNode(svg, "rect", {x: left + width + 15, y: ly - 9, width: 10, height: 10, fill: color});
      svgNode(svg, "text", {x: left + width + 30, y: ly, class: "legend"}, s.vm + " (" + s.total + ")");
    });
    if (data.other_vms) {
      svgNode(svg, "text", {x: left + width + 15, y: top + 14 + data.series.length * 18},
        "+ " + data.other_vms + " other VMs");
    }
  }

  function showVerification(v) {
    const status = byId("verify-status");
    status.dataset.ok = v.ok ? "true" : "false";
    status.className = v.ok ? "ok" : "bad";
    if (v.ok) {
      status.textContent = "Chain intact: " + v.records + " records verified" +
        (v.signatures_checked ? "" : " (checkpoint signatures not checked: no audit key configured)");
    } else {
      status.textContent = "Chain BROKEN at record " + v.first_problem.seq + ": " + v.first_problem.text;
    }
    const details = [
      v.records + " records" + (v.records ? " (" + v.first_seq + " to " + v.last_seq + ")" : ""),
      v.checkpoints + " signed checkpoints" + (v.last_checkpoint ? ", the last at record " + v.last_checkpoint : ""),
      v.unsigned_tail + " records after the last checkpoint",
    ];
    if (v.problems.length > 1) details.push(v.problems.length + " problems found");
    details.push("checked " + v.checked_at);
    byId("verify-details").textContent = details.join(" \\u00b7 ");
  }

  async function load() {
    const query = currentFilters();
    const error = byId("error");
    error.textContent = "";
    const plotQuery = new URLSearchParams();
    for (const name of ["vm", "since", "until"]) if (query.get(name)) plotQuery.set(name, query.get(name));
    const results = await Promise.allSettled([
      getJson("/api/records?" + query).then(showRecords),
      getJson("/api/activity?" + plotQuery).then(drawPlot),
    ]);
    const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
    error.textContent = failures.join("\\n");
    document.body.dataset.loaded = "true";
  }

  async function verify() {
    try {
      showVerification(await getJson("/api/verify"));
    } catch (e) {
      const status = byId("verify-status");
      status.dataset.ok = "unknown";
      status.className = "bad";
      status.textContent = "Verification could not run: " + e.message;
    }
  }

  byId("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = currentFilters().toString();
    window.history.replaceState(null, "", query ? "?" + query : window.location.pathname);
    document.body.dataset.loaded = "false";
    load();
  });
  byId("clear").addEventListener("click", () => {
    for (const name of FIELDS) byId("filter-" + name).value = name === "limit" ? "500" : "";
    byId("apply").click();
  });

  filtersFromUrl();
  load();
  verify();
})();
</script>
</body>
</html>
"""
