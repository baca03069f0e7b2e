"""The audit page's site (kms_server/audit/web.py) driven in memory: real
HTTP parsing by Twisted's HTTPChannel over a StringTransport that presents
the development PKI's client certificates, a fake clock, and storage reads
run synchronously instead of in a worker thread."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from urllib.parse import urlencode

import pytest
from OpenSSL import crypto
from twisted.internet import defer, task
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from kmip_core import tls
from kmip_core.audit import audit_key
from kmip_core.audit.chain import parse_time
from kmip_core.audit.record import AuditDraft, client_fields
from kmip_core.policy import Principal, role_for
from kmip_core.server.dispatcher import ConnectionInfo
from kms_server.audit import web
from kms_server.audit.query import result_filter
from kms_server.audit.trail import HOST_COMPONENT, VM_COMPONENT, AuditTrail
from kms_server.storage.memory import MemoryStorage

T0 = 1_700_000_000.0


def identify(certificate, peer: str) -> ConnectionInfo:
    """What kms_server.server.KmsService._identify does with [access]
    administrators = ["admin"], auditors = ["auditor"]."""
    identity = tls.peer_identity(certificate, "cn")
    role = role_for(identity.name, ("admin",), ("nocrypto",), ("auditor",))
    principal = Principal(
        name=identity.name, role=role, subject=identity.subject, fingerprint=identity.fingerprint_sha256
    )
    return ConnectionInfo(principal=principal, peer=peer)


@pytest.fixture(scope="module")
def certificates(pki_dir) -> dict[str, crypto.X509]:
    return {
        name: crypto.load_certificate(crypto.FILETYPE_PEM, (pki_dir / f"{name}.pem").read_bytes())
        for name in ("alice", "admin", "nocrypto", "auditor")
    }


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(operation: str, uid: str | None, tags: dict | None = None, client: str = "vcenter", status="SUCCESS"):
    draft = AuditDraft(
        event="request",
        request_id="r1",
        item=0,
        client=client_fields(Principal(name=client)),
        peer="10.0.0.7:50123",
        protocol="1.4",
        operation=operation,
        requested=uid,
    )
    if uid is not None and tags is not None:
        draft.objects[uid] = dict(tags)
    reason = None if status == "SUCCESS" else "ITEM_NOT_FOUND"
    return draft.entry(status, reason)


VM1 = {"x-Component": VM_COMPONENT, "x-Name": "test01", "x-Identifier": "4211-aaaa"}
VM2 = {"x-Component": VM_COMPONENT, "x-Name": "web02", "x-Identifier": "4211-bbbb"}
HOST = {"x-Component": HOST_COMPONENT, "x-Name": "esx-1.lab", "x-Identifier": "host-11"}


@pytest.fixture
def trail():
    """A signed trail: test01's key k1 (Create before its tags, AddAttribute,
    Get, a refused Get by mallory), web02's key k2 (Create, Get x2) and a
    host key k3, one record per second from T0."""
    storage = MemoryStorage()
    clock = Clock()
    signer = audit_key.Signer(audit_key.Ed25519PrivateKey.generate())
    t = AuditTrail(storage, "node-1", signer=signer, clock=clock)
    script = [
        entry("CREATE", "k1", {}),
        entry("ADD_ATTRIBUTE", "k1", VM1),
        entry("GET", "k1", VM1),
        entry("CREATE", "k2", VM2),
        entry("GET", "k2", VM2),
        entry("GET", "k1", VM1, client="mallory", status="OPERATION_FAILED"),
        entry("GET", "k2", VM2),
        entry("CREATE", "k3", HOST),
        entry("LOCATE", None),
    ]
    for e in script:
        t.write(e)
        clock.now += 1
    t.checkpoint()
    t.write(entry("GET", "k3", HOST))
    return storage, signer


def synchronous(f, *args, **kwargs) -> defer.Deferred:
    return defer.maybeDeferred(f, *args, **kwargs)


class PeerTransport(StringTransport):
    """A StringTransport with the TLS transport's getPeerCertificate."""

    def __init__(self, certificate):
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40001))
        self.certificate = certificate

    def getPeerCertificate(self):
        return self.certificate


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        assert self.headers["content-type"] == "application/json", self.headers
        return json.loads(self.body)


def make(trail, defer_to_thread=synchronous, verifier="signer"):
    storage, signer = trail
    return web.make_site(
        storage, signer.public if verifier == "signer" else verifier, identify, defer_to_thread, reactor=task.Clock()
    )


def fetch(site, path: str, certificate, method: str = "GET", body: bytes = b"", keep: bool = False):
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40001))
    transport = PeerTransport(certificate)
    channel.makeConnection(transport)
    channel.dataReceived(
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
    )
    if keep:
        return channel, transport
    response = parse(transport.value())
    channel.connectionLost(Failure(ConnectionDone()))
    return response


def parse(raw: bytes) -> Response:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Response(int(lines[0].split()[1]), headers, body)


def records(site, certificate, **query):
    response = fetch(site, "/api/records?" + urlencode(query), certificate)
    assert response.status == 200, response.body
    return response.json()


# Who may see the page.
@pytest.mark.parametrize("name", ["auditor", "admin"])
def test_auditors_and_administrators_get_the_page(trail, certificates, name):
    """The auditor and the administrator are served the page."""
    response = fetch(make(trail), "/", certificates[name])
    assert response.status == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert b'id="records"' in response.body


@pytest.mark.parametrize("name", ["alice", "nocrypto"])
def test_other_roles_are_refused_with_403(trail, certificates, name):
    """A user and a no-cryptography administrator get 403 and one line of
    text on every route, and no record reaches them."""
    site = make(trail)
    for path in ("/", "/api/records", "/api/activity", "/api/verify", "/nowhere"):
        response = fetch(site, path, certificates[name])
        assert response.status == 403
        assert response.body.count(b"\n") == 1 and b"auditors and administrators" in response.body
        assert b"k1" not in response.body


def test_no_certificate_is_refused(trail):
    """A transport without a peer certificate is refused (the TLS context
    already requires one; this is the second lock)."""
    response = fetch(make(trail), "/api/records", None)
    assert response.status == 403
    assert b"client certificate is required" in response.body


def test_a_certificate_identify_rejects_is_refused(trail, certificates):
    """If identify raises (certificate without a usable identity), 403."""
    storage, signer = trail

    def reject(certificate, peer):
        raise tls.PeerIdentityError("no CN")

    site = web.make_site(storage, signer.public, reject, synchronous, reactor=task.Clock())
    response = fetch(site, "/", certificates["auditor"])
    assert response.status == 403
    assert b"not accepted" in response.body


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head_exist(trail, certificates, method):
    """The page is read-only: every other method is 405 with Allow, and the
    trail is unchanged."""
    storage, _ = trail
    site = make(trail)
    before = records(site, certificates["auditor"])
    response = fetch(site, "/api/records", certificates["auditor"], method=method, body=b"seq=1")
    assert response.status == 405
    assert response.headers["allow"] == "GET, HEAD"
    assert records(site, certificates["auditor"]) == before


def test_head_sends_headers_only(trail, certificates):
    response = fetch(make(trail), "/", certificates["auditor"], method="HEAD")
    assert response.status == 200
    assert response.body == b""
    assert int(response.headers["content-length"]) > 1000


def test_unknown_path_is_404(trail, certificates):
    assert fetch(make(trail), "/api/keys", certificates["auditor"]).status == 404


# The page itself.
def test_page_has_a_strict_content_security_policy(trail, certificates):
    """Only the page's own nonce-tagged script and style run; nothing is
    loaded from elsewhere; responses are not cached nor sniffed."""
    response = fetch(make(trail), "/", certificates["auditor"])
    policy = response.headers["content-security-policy"]
    nonce = re.search(r"script-src 'nonce-([A-Za-z0-9_-]+)'", policy).group(1)
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "default-src 'self'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    html = response.body.decode()
    assert html.count(f'nonce="{nonce}"') == 2
    assert len(re.findall(r"<script", html)) == 1 and len(re.findall(r"<style", html)) == 1
    assert not re.search(r"(src|href)=\"?(https?:)?//", html)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["cache-control"] == "no-store"
    # A new nonce for every response.
    again = fetch(make(trail), "/", certificates["auditor"]).headers["content-security-policy"]
    assert again != policy


def test_page_script_never_parses_data_as_markup():
    """Client-chosen strings (x-Name...) reach the page only through
    textContent and setAttribute: the script has no HTML sinks."""
    script = web.PAGE[web.PAGE.index("<script") :]
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script


def test_every_response_carries_the_security_headers(trail, certificates):
    site = make(trail)
    for path, name in (("/api/records", "auditor"), ("/api/verify", "auditor"), ("/", "alice")):
        headers = fetch(site, path, certificates[name]).headers
        assert headers["x-content-type-options"] == "nosniff"
        assert headers["cache-control"] == "no-store"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["server"] == "kms-server"


# /api/records
def test_records_newest_last_with_fields_from_the_body(trail, certificates):
    data = records(make(trail), certificates["auditor"])
    assert data["matched"] == 10
    rows = data["records"]
    assert [r["seq"] for r in rows] == list(range(1, 11))
    get = rows[2]
    assert get["operation"] == "GET" and get["uid"] == "k1"
    assert get["x_name"] == "test01" and get["x_component"] == VM_COMPONENT and get["x_identifier"] == "4211-aaaa"
    assert get["client"] == "vcenter" and get["peer"] == "10.0.0.7:50123" and get["protocol"] == "1.4"
    assert get["time"] == "2023-11-14T22:13:22.000000Z" and get["result"] == "SUCCESS" and get["reason"] is None
    refused = rows[5]
    assert (refused["client"], refused["result"], refused["reason"]) == (
        "mallory",
        "OPERATION_FAILED",
        "ITEM_NOT_FOUND",
    )


def test_vm_filter_selects_every_record_of_its_keys(trail, certificates):
    """--vm by x-Name or x-Identifier selects every record of the keys ever
    tagged with that VM, including the Create before the tags."""
    site = make(trail)
    for vm in ("test01", "4211-aaaa"):
        rows = records(site, certificates["auditor"], vm=vm)["records"]
        assert [(r["seq"], r["operation"]) for r in rows] == [
            (1, "CREATE"),
            (2, "ADD_ATTRIBUTE"),
            (3, "GET"),
            (6, "GET"),
        ]
    assert records(site, certificates["auditor"], vm="nope")["records"] == []
    # A host name is not a VM.
    assert records(site, certificates["auditor"], vm="esx-1.lab")["records"] == []
    assert [r["seq"] for r in records(site, certificates["auditor"], host="esx-1.lab")["records"]] == [8, 10]
    assert records(site, certificates["auditor"], vm="test01", host="esx-1.lab")["records"] == []


def test_other_filters(trail, certificates):
    site, auditor = make(trail), certificates["auditor"]
    assert [r["seq"] for r in records(site, auditor, object="k2")["records"]] == [4, 5, 7]
    assert [r["seq"] for r in records(site, auditor, vm="test01", object="k2")["records"]] == []
    assert [r["seq"] for r in records(site, auditor, client="mallory")["records"]] == [6]
    for spelling in ("Get", "get", "GET"):
        assert [r["seq"] for r in records(site, auditor, operation=spelling)["records"]] == [3, 5, 6, 7, 10]
    assert [r["seq"] for r in records(site, auditor, operation="AddAttribute")["records"]] == [2]
    assert [r["seq"] for r in records(site, auditor, result="failed")["records"]] == [6]
    assert [r["seq"] for r in records(site, auditor, result="SUCCESS", vm="test01")["records"]] == [1, 2, 3]
    since = "2023-11-14T22:13:23Z"  # T0 + 3 s: record 4
    until = T0 + 5
    assert [r["seq"] for r in records(site, auditor, since=since, until=until)["records"]] == [4, 5, 6]
    assert [r["seq"] for r in records(site, auditor, since="2023-11-14T22:13:27")["records"]] == [8, 9, 10]


def test_limit_keeps_the_newest(trail, certificates):
    data = records(make(trail), certificates["auditor"], limit=3)
    assert data["matched"] == 10
    assert [r["seq"] for r in data["records"]] == [8, 9, 10]


@pytest.mark.parametrize(
    "query, text",
    [
        ({"limit": "0"}, b"limit must be"),
        ({"limit": "5001"}, b"limit must be"),
        ({"limit": "many"}, b"limit must be"),
        ({"since": "yesterday"}, b"not a time"),
        ({"vm": "x" * 300}, b"longer than"),
    ],
)
def test_bad_parameters_are_400(trail, certificates, query, text):
    response = fetch(make(trail), "/api/records?" + urlencode(query), certificates["auditor"])
    assert response.status == 400
    assert text in response.body


def test_client_chosen_strings_come_back_as_json_data(certificates):
    """A hostile x-Name is returned verbatim inside JSON (the page puts it
    into the DOM as text), never into the HTML."""
    storage = MemoryStorage()
    name = '<img src=x onerror="pwned(1)"></td><script>pwned(2)</script>'
    AuditTrail(storage, "n", clock=Clock()).write(entry("GET", "k9", {"x-Component": VM_COMPONENT, "x-Name": name}))
    site = web.make_site(storage, None, identify, synchronous, reactor=task.Clock())
    rows = records(site, certificates["auditor"], vm=name)["records"]
    assert rows[0]["x_name"] == name
    page = fetch(site, "/?" + urlencode({"vm": name}), certificates["auditor"])
    assert b"pwned" not in page.body


# /api/activity
def test_activity_for_one_vm(trail, certificates):
    response = fetch(make(trail), "/api/activity?vm=test01", certificates["auditor"])
    data = response.json()
    assert data["bucket_seconds"] == 1 and data["start"] == T0
    assert data["series"] == [{"vm": "test01", "total": 4, "counts": [1, 1, 1, 0, 0, 1]}]
    assert data["other_vms"] == 0


def test_activity_for_the_top_vms(trail, certificates):
    """Without a VM, each VM's keys are counted under its name; the host
    key and the Locate count for nobody."""
    data = fetch(make(trail), "/api/activity", certificates["auditor"]).json()
    assert {s["vm"]: s["total"] for s in data["series"]} == {"test01": 4, "web02": 3}
    assert data["buckets"] == 7
    web02 = next(s for s in data["series"] if s["vm"] == "web02")
    assert web02["counts"] == [0, 0, 0, 1, 1, 0, 1]


def test_activity_top_limit_and_buckets():
    storage = MemoryStorage()
    clock = Clock()
    t = AuditTrail(storage, "n", clock=clock)
    for vm in range(8):
        tags = {"x-Component": VM_COMPONENT, "x-Name": f"vm{vm}"}
        for _ in range(vm + 1):
            t.write(entry("GET", f"key{vm}", tags))
            clock.now += 3600
    data = web.vm_activity(storage, web.Filters())
    assert [s["vm"] for s in data["series"]] == ["vm7", "vm6", "vm5", "vm4", "vm3"]
    assert data["other_vms"] == 3
    # The five shown span 29 hours: half-hour buckets, aligned to the half hour.
    assert data["bucket_seconds"] == 1800 and data["start"] % 1800 == 0 and data["buckets"] == 59
    assert sum(sum(s["counts"]) for s in data["series"]) == 8 + 7 + 6 + 5 + 4
    assert web.vm_activity(storage, web.Filters(vm="nothing"))["series"] == []


def test_bucket_width():
    assert web.bucket_width(1) == 1
    assert web.bucket_width(60) == 1
    assert web.bucket_width(61) == 2
    assert web.bucket_width(86400) == 1800
    assert web.bucket_width(10 * 365 * 86400) == 10 * 365 * 86400 // 60


# /api/verify
def test_verify_reports_an_intact_chain(trail, certificates):
    data = fetch(make(trail), "/api/verify", certificates["auditor"]).json()
    assert data["ok"] is True and data["first_problem"] is None
    assert (data["records"], data["checkpoints"], data["last_checkpoint"], data["unsigned_tail"]) == (10, 1, 9, 1)
    assert data["signatures_checked"] is True


def test_verify_names_the_first_altered_record(trail, certificates):
    storage, _ = trail
    state = storage._state.audit
    state[4] = dataclasses.replace(state[4], client="someone-else")
    data = fetch(make(trail), "/api/verify", certificates["auditor"]).json()
    assert data["ok"] is False
    assert data["first_problem"]["seq"] == 4
    assert "record 4 altered" in data["first_problem"]["text"]


def test_verify_without_a_key_says_signatures_were_not_checked(trail, certificates):
    data = fetch(make(trail, verifier=None), "/api/verify", certificates["auditor"]).json()
    assert data["signatures_checked"] is False
    assert data["ok"] is False and "not checked" in data["first_problem"]["text"]


def test_concurrent_verifications_share_one_run(trail, certificates):
    """Verification reads the whole trail: requests that arrive while it
    runs get its result instead of starting another."""
    pending: list[tuple[defer.Deferred, tuple]] = []

    def later(f, *args):
        d = defer.Deferred()
        pending.append((d, (f, args)))
        return d

    site = make(trail, defer_to_thread=later)
    first = fetch(site, "/api/verify", certificates["auditor"], keep=True)
    second = fetch(site, "/api/verify", certificates["auditor"], keep=True)
    assert len(pending) == 1 and first[1].value() == b""
    d, (f, args) = pending.pop()
    d.callback(f(*args))
    for _, transport in (first, second):
        assert parse(transport.value()).json()["ok"] is True
    fetch(site, "/api/verify", certificates["auditor"], keep=True)
    assert len(pending) == 1


def test_storage_failure_is_503_with_an_opaque_line(trail, certificates):
    storage, _ = trail
    storage.close()
    response = fetch(make(trail), "/api/records", certificates["auditor"])
    assert response.status == 503
    assert response.body == b"503 the audit trail cannot be read right now; see the server log\n"


def test_client_gone_before_the_answer(trail, certificates):
    """A client that disconnects while its query runs is not written to."""
    pending: list[tuple[defer.Deferred, object, tuple]] = []

    def later(f, *args):
        d = defer.Deferred()
        pending.append((d, f, args))
        return d

    channel, transport = fetch(make(trail, defer_to_thread=later), "/api/records", certificates["auditor"], keep=True)
    channel.connectionLost(Failure(ConnectionDone()))
    d, f, args = pending.pop()
    d.callback(f(*args))
    assert transport.value() == b""


def test_time_and_name_parsing():
    assert web.parse_time("1700000000") == T0
    assert web.parse_time("2023-11-14T22:13:20Z") == T0
    assert web.parse_time("2023-11-14 22:13:20") == T0
    assert web.parse_time("2023-11-14T23:13:20+01:00") == T0
    assert web.parse_time("2023-11-14") == parse_time("2023-11-14T00:00:00.000000Z")
    assert web.operation_name("AddAttribute") == "ADD_ATTRIBUTE"
    assert web.operation_name("add attribute") == "ADD_ATTRIBUTE"
    assert web.operation_name("get_attributes") == "GET_ATTRIBUTES"
    assert result_filter("failed") == ("OPERATION_FAILED", None)
    assert result_filter("Item_Not_Found") == ("OPERATION_FAILED", "ITEM_NOT_FOUND")
    assert result_filter("undone") == ("OPERATION_UNDONE", None)
