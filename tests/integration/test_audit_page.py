"""The security team's audit page (issue 3, item 5) on a real kms-server
process: KMIP traffic tagged the way vCenter tags VM keys, then Debian's
chromium, headless and driven by Playwright with the auditor's client
certificate, loads the page, filters by VM and checks the table, the plot
and the chain's verification status. Refusals are checked with Python's
own TLS client."""

from __future__ import annotations

import http.client
import json
import ssl
import time
from pathlib import Path

import pytest
from conftest import start_server
from kmip.core.enums import Operation, Tags
from kmip_client import RawClient, tls_context

from kmip_core import ttlv
from kmip_core.audit import audit_key
from kmip_core.client.messages import request_message

T = Tags
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VM_TAGS = {
    "test01": ("Virtual Machine", "test01", "4211c0de-0000-0000-0000-000000000001"),
    "web02": ("Virtual Machine", "web02", "4211c0de-0000-0000-0000-000000000002"),
}
# What one VM's key goes through below, in order.
VM_OPERATIONS = ["CREATE", "ADD_ATTRIBUTE", "ADD_ATTRIBUTE", "ADD_ATTRIBUTE", "GET", "GET"]


def message(op: Operation, payload: list) -> bytes:
    return request_message((1, 4), op, payload)


def attribute(name: str, value: ttlv.Item) -> ttlv.Item:
    return ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), value])


def ok_payload(response: ttlv.Item) -> ttlv.Item:
    item = response.find(T.BATCH_ITEM.value)
    assert item.get(T.RESULT_STATUS.value) == 0, item
    return item.find(T.RESPONSE_PAYLOAD.value)


def vm_key(raw: RawClient, vm: str) -> str:
    """What vCenter does for a VM key: Create, tag it with x-Component,
    x-Name and x-Identifier, then Get it (twice: power-on and a migration)."""
    created = ok_payload(
        raw.request(
            message(
                Operation.CREATE,
                [
                    ttlv.enumeration(T.OBJECT_TYPE.value, 2),
                    ttlv.structure(
                        T.TEMPLATE_ATTRIBUTE.value,
                        [
                            attribute("Cryptographic Algorithm", ttlv.enumeration(T.ATTRIBUTE_VALUE.value, 3)),
                            attribute("Cryptographic Length", ttlv.integer(T.ATTRIBUTE_VALUE.value, 256)),
                            attribute("Cryptographic Usage Mask", ttlv.integer(T.ATTRIBUTE_VALUE.value, 12)),
                        ],
                    ),
                ],
            )
        )
    )
    uid = created.get(T.UNIQUE_IDENTIFIER.value)
    component, name, identifier = VM_TAGS[vm]
    for tag, value in (("x-Component", component), ("x-Name", name), ("x-Identifier", identifier)):
        ok_payload(
            raw.request(
                message(
                    Operation.ADD_ATTRIBUTE,
                    [
                        ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
                        attribute(tag, ttlv.text(T.ATTRIBUTE_VALUE.value, value)),
                    ],
                )
            )
        )
    for _ in range(2):
        ok_payload(raw.request(message(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])))
    return uid


def web_port_of(server) -> int:
    """The audit page's port, from the line the server prints once it listens."""
    line = server.announced("kms-server audit page on https://")
    return int(line.rstrip("/").rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def audited(tmp_path_factory, pki_dir):
    """A node with the trail signed every second and the audit page on a
    free port; test01's and web02's keys went through Create, tagging and
    two Gets each, and web02 had one more Get."""
    workdir = tmp_path_factory.mktemp("audited")
    audit_key.generate(workdir / "audit.key", workdir / "audit.pub")
    server = start_server(
        workdir / "node",
        pki_dir,
        extra_config=f"""
        [access]
        administrators = ["admin"]
        no_crypto_administrators = ["nocrypto"]
        auditors = ["auditor"]

        [audit]
        signing_key_file = "{workdir / "audit.key"}"
        checkpoint_seconds = 1.0
        web_port = 0
        """,
    )
    try:
        port = web_port_of(server)
        with RawClient(server.host, server.port, pki_dir, "alice") as raw:
            uids = {vm: vm_key(raw, vm) for vm in VM_TAGS}
            ok_payload(raw.request(message(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uids["web02"])])))
        # A checkpoint covers the traffic.
        time.sleep(1.5)
        yield server, port, uids
    finally:
        server.stop()


def https(port: int, pki: Path, client: str | None, method: str = "GET", path: str = "/"):
    ctx = tls_context(pki, client)
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=15)
    try:
        conn.request(method, path, headers={"Host": "localhost"})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_api_answers_the_auditor(audited, pki_dir):
    """The JSON routes over real mutual TLS: test01's records, its activity
    and an intact, checkpointed chain."""
    _, port, uids = audited
    status, headers, body = https(port, pki_dir, "auditor", path="/api/records?vm=test01")
    assert status == 200 and headers["Content-Type"] == "application/json"
    rows = json.loads(body)["records"]
    assert [r["operation"] for r in rows] == VM_OPERATIONS
    assert {r["uid"] for r in rows} == {uids["test01"]}
    assert {r["client"] for r in rows} == {"alice"}
    status, _, body = https(port, pki_dir, "admin", path="/api/verify")
    report = json.loads(body)
    assert status == 200 and report["ok"] is True, report
    assert report["checkpoints"] >= 1 and report["signatures_checked"] is True


def test_a_user_gets_403(audited, pki_dir):
    """alice (role user) and nocrypto (no-cryptography administrator) are
    refused with one line, on the page and on the API."""
    _, port, _ = audited
    for client in ("alice", "nocrypto"):
        for path in ("/", "/api/records"):
            status, _, body = https(port, pki_dir, client, path=path)
            assert status == 403
            assert body == b"403 the audit page is for auditors and administrators only\n"


def test_post_gets_405(audited, pki_dir):
    _, port, _ = audited
    for method in ("POST", "PUT", "DELETE"):
        status, headers, _ = https(port, pki_dir, "auditor", method=method, path="/api/records")
        assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_no_client_certificate_is_refused(audited, pki_dir):
    """Without a client certificate the TLS handshake is refused: no HTTP
    answer at all."""
    _, port, _ = audited
    with pytest.raises((ssl.SSLError, ConnectionError, http.client.HTTPException)):
        https(port, pki_dir, None, path="/api/records")


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed: apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_page_in_chromium_filters_by_vm(audited, pki_dir, browser):
    """Headless chromium with the auditor's certificate loads the page,
    types test01 into the VM filter and applies it: the table holds exactly
    test01's records, the plot has test01's points and no other VM's, the
    chain is reported intact, the filtered view can be linked, and the
    page's own script and style run under its CSP without complaint."""
    from playwright.sync_api import expect

    _, port, uids = audited
    origin = f"https://127.0.0.1:{port}"
    context = browser.new_context(
        client_certificates=[
            {"origin": origin, "certPath": str(pki_dir / "auditor.pem"), "keyPath": str(pki_dir / "auditor.key")}
        ],
        ignore_https_errors=True,
    )
    page = context.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    try:
        page.goto(origin + "/")
        expect(page.locator("#verify-status")).to_have_attribute("data-ok", "true", timeout=20_000)
        expect(page.locator("#verify-status")).to_contain_text("Chain intact")
        expect(page.locator("#verify-details")).to_contain_text("signed checkpoints")
        expect(page.locator("body")).to_have_attribute("data-loaded", "true")
        # Unfiltered: both VMs are plotted.
        expect(page.locator("#plot")).to_have_attribute("data-series", "2")
        assert page.locator("#records tbody tr").count() >= 2 * len(VM_OPERATIONS) + 1

        page.fill("#filter-vm", "test01")
        page.click("#apply")
        expect(page.locator("body")).to_have_attribute("data-loaded", "true")
        expect(page.locator("#plot")).to_have_attribute("data-series", "1")
        rows = page.locator("#records tbody tr")
        expect(rows).to_have_count(len(VM_OPERATIONS))
        assert rows.locator("td.c-operation").all_text_contents() == VM_OPERATIONS
        assert set(rows.locator("td.c-uid").all_text_contents()) == {uids["test01"]}
        assert set(rows.locator("td.c-client").all_text_contents()) == {"alice"}
        # The tags as they were: none at Create, all three by the Gets.
        names = rows.locator("td.c-x-name").all_text_contents()
        assert names[0] == "" and names[-2:] == ["test01", "test01"]
        assert rows.locator("td.c-x-component").all_text_contents()[-1] == "Virtual Machine"
        assert set(rows.locator("td.c-result").all_text_contents()) == {"SUCCESS"}

        points = page.locator("#plot circle.point")
        assert points.count() >= 1
        assert {points.nth(i).get_attribute("data-vm") for i in range(points.count())} == {"test01"}
        counts = [int(points.nth(i).get_attribute("data-count")) for i in range(points.count())]
        assert sum(counts) == len(VM_OPERATIONS)
        expect(page.locator("#plot text.legend")).to_have_text([f"test01 ({len(VM_OPERATIONS)})"])

        # The filtered view is in the URL, and the URL alone reproduces it.
        assert page.url.endswith("/?vm=test01")
        page.goto(origin + "/?vm=test01&operation=get")
        expect(page.locator("#filter-vm")).to_have_value("test01")
        expect(page.locator("body")).to_have_attribute("data-loaded", "true")
        expect(page.locator("#records tbody tr")).to_have_count(2)
        assert problems == [], problems
    finally:
        context.close()


def test_chromium_without_a_certificate_gets_no_page(audited, browser):
    """Chromium without a client certificate cannot load the page."""
    from playwright.sync_api import Error

    _, port, _ = audited
    context = browser.new_context(ignore_https_errors=True)
    try:
        with pytest.raises(Error):
            context.new_page().goto(f"https://127.0.0.1:{port}/", timeout=15_000)
    finally:
        context.close()
