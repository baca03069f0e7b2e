"""Listener limits against a real kms-server over real TLS sockets (issue 19,
item 0): connection slots freed on every path, slots counted only after
the TLS handshake, a deadline for a whole message, bounded buffers for
responses a client does not read, the same limits on the audit page, and
the KMIP profile suites without forward secrecy on the KMIP listener only.

What the server holds is read from the kernel (/proc/net/tcp: the sockets
on the server's port that a process still owns) and from its resident
memory (/proc/<pid>/status), never from the server's own word.
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
from pathlib import Path

import broker_process
import pytest
import requests
from conftest import start_server
from kmip.core.enums import Operation, ResultStatus, Tags
from kmip_client import RawClient, tls_context

from kmip_core import ttlv
from kmip_core.audit import audit_key
from kmip_core.client.messages import request_message

T = Tags
MAX_CONNECTIONS = 4
WEB_MAX_CONNECTIONS = 3
FRAME_TIMEOUT = 3.0
HANDSHAKE_TIMEOUT = 5.0  # conftest's test configuration
MAX_UNSENT_BYTES = 256 * 1024


# --- What the kernel says the server holds ------------------------------------------


def server_sockets(port: int) -> int:
    """Connected sockets on local port `port` (the server's side of its
    connections) still owned by a process: established, or closed by the
    peer and waiting for the server to close (CLOSE_WAIT). Orphaned
    sockets the kernel finishes alone (TIME_WAIT, FIN_WAIT) own no inode."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if int(local.rsplit(":", 1)[1], 16) == port and state != "0A" and inode != "0":
                count += 1
    return count


def wait_for_no_server_sockets(port: int, timeout: float = 20.0) -> int:
    """Wait until the server holds no connection on `port`; the count left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server_sockets(port) == 0:
            return 0
        time.sleep(0.2)
    return server_sockets(port)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# --- Messages -------------------------------------------------------------------------


def discover_versions() -> bytes:
    return request_message((1, 4), Operation.DISCOVER_VERSIONS, [])


def rng_retrieve(length: int) -> bytes:
    return request_message((1, 4), Operation.RNG_RETRIEVE, [ttlv.integer(T.DATA_LENGTH.value, length)])


def undecodable_frame() -> bytes:
    """A Request Message header declaring 16 bytes, and 16 bytes of 0x01."""
    return bytes.fromhex("4200780100000010") + b"\x01" * 16


def assert_served(host: str, port: int, pki: Path, client: str = "bob") -> None:
    with RawClient(host, port, pki, client, timeout=15) as raw:
        response = raw.request(discover_versions())
    assert response is not None, "a fresh client was not served"
    assert response.find(T.BATCH_ITEM.value).get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value


def trickled_until_closed(sock: socket.socket, data: bytes) -> bool:
    """Send `data` one byte a second; whether the server closed the
    connection before all of it was sent."""
    for byte in data:
        try:
            sock.sendall(bytes([byte]))
        except (OSError, ssl.SSLError):
            return True
        sock.settimeout(1.0)
        try:
            if sock.recv(1) == b"":
                return True
        except TimeoutError:
            continue
        except (OSError, ssl.SSLError):
            return True
    return False


def closed_by_server(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes `sock` within `timeout` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


# --- The node -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def node(tmp_path_factory, pki_dir):
    """A node with small limits: 4 KMIP connections, 8 handshakes in
    progress, 3 s to finish a message, 256 KiB of unsent responses per
    connection, and the audit page (3 connections) on a free port."""
    workdir = tmp_path_factory.mktemp("limits")
    audit_key.generate(workdir / "audit.key", workdir / "audit.pub")
    server = start_server(
        workdir / "node",
        pki_dir,
        server_config=f"""
        max_connections = {MAX_CONNECTIONS}
        max_handshakes = 8
        frame_timeout = {FRAME_TIMEOUT}
        max_unsent_bytes = {MAX_UNSENT_BYTES}
        """,
        extra_config=f"""
        [access]
        auditors = ["auditor"]

        [audit]
        signing_key_file = "{workdir / "audit.key"}"
        web_port = 0
        web_max_connections = {WEB_MAX_CONNECTIONS}
        """,
    )
    line = server.announced("kms-server audit page on https://")
    server.web_port = int(line.rstrip("/").rsplit(":", 1)[1])
    yield server
    server.stop()


def test_slots_are_freed_after_an_undecodable_frame_and_pipelined_requests(node, pki_dir):
    """The slot leak of issue 19: a client writes a frame whose 16-byte body
    is all 0x01 and four DiscoverVersions at once, then closes. Three times
    max_connections such clients leave the node holding no connection, and
    a fresh client is served."""
    burst = undecodable_frame() + discover_versions() * 4
    for _ in range(3 * MAX_CONNECTIONS):
        with RawClient(node.host, node.port, pki_dir, "alice", timeout=15) as raw:
            raw.send(burst)
            # The server answers the undecodable frame by closing (TLS
            # close_notify); the client closes its side after that.
            assert raw.recv_message() is None
    assert wait_for_no_server_sockets(node.port) == 0
    assert_served(node.host, node.port, pki_dir)
    assert "Traceback" not in node.stderr_text()


def hammer_once(node, pki_dir, kind: int) -> None:
    """One connection that ends in one of the ways a client can end it."""
    burst = undecodable_frame() + discover_versions() * 4
    if kind == 0:  # bare TCP, closed
        socket.create_connection((node.host, node.port), timeout=15).close()
        return
    with RawClient(node.host, node.port, pki_dir, "alice", timeout=15) as raw:
        if kind == 1:  # the burst, closed once the server closes
            raw.send(burst)
            raw.recv_message()
        elif kind == 2:  # the burst, closed at once
            raw.send(burst)
        elif kind == 3:  # half a message, closed
            raw.send(discover_versions()[:13])
        elif kind == 4:  # the burst, then a reset
            raw.send(burst)
            raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        elif kind == 5:  # pipelined good requests, answers not read
            raw.send(discover_versions() * 8)


def test_the_open_connection_count_returns_to_zero_after_a_hammering(node, pki_dir):
    """Four clients at once end 60 connections in every way (bare socket,
    the undecodable burst closed before or after the server's close, half a
    message, a reset, unread answers): afterwards the node holds no
    connection and a fresh client is served."""
    errors = []

    def client(offset: int) -> None:
        for i in range(15):
            try:
                hammer_once(node, pki_dir, (i + offset) % 6)
            except (OSError, ssl.SSLError) as exc:  # refused while the cap is reached
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert wait_for_no_server_sockets(node.port) == 0
    assert_served(node.host, node.port, pki_dir)
    assert "Traceback" not in node.stderr_text()


def test_bare_sockets_do_not_lock_out_a_client(node, pki_dir):
    """More idle TCP connections than max_connections (and than the
    handshake slots) do not keep a client with a certificate out: slots are
    taken only after TLS, and the oldest handshakes make room."""
    idle = [socket.create_connection((node.host, node.port), timeout=10) for _ in range(5 * MAX_CONNECTIONS)]
    try:
        assert_served(node.host, node.port, pki_dir)
    finally:
        for sock in idle:
            sock.close()


def test_a_bare_socket_is_closed_at_the_handshake_timeout(node):
    """A connection that never starts TLS is closed by the server after
    handshake_timeout."""
    with socket.create_connection((node.host, node.port)) as sock:
        assert closed_by_server(sock, HANDSHAKE_TIMEOUT + 10)


def test_a_slow_loris_is_closed_at_the_frame_deadline(node, pki_dir):
    """One byte a second keeps the idle timer (30 s) from ever firing, but
    the message must be complete within frame_timeout of its first byte:
    the server closes the connection long before the message is done."""
    message = discover_versions()
    with RawClient(node.host, node.port, pki_dir, "alice", timeout=15) as raw:
        assert trickled_until_closed(raw.sock, message[:20]), "a message trickled in over 20 s was still read"


def test_responses_not_read_are_bounded_and_others_are_still_served(node, pki_dir):
    """A client pipelines 1 MiB RNG Retrieve requests and reads nothing:
    once max_unsent_bytes wait to be sent the server stops taking its
    requests, so its memory grows by about one response, not by all of
    them; other clients are served meanwhile, and the connection's memory
    goes when it does."""
    count = 300  # 300 MiB of responses if the server answered them all
    before = rss_bytes(node.proc.pid)
    raw = RawClient(node.host, node.port, pki_dir, "alice", timeout=30)
    try:
        # The requests are small: the kernel's buffers take them all.
        sender = threading.Thread(target=raw.send, args=(rng_retrieve(1 << 20) * count,), daemon=True)
        sender.start()
        time.sleep(5)
        assert_served(node.host, node.port, pki_dir)
        grown = rss_bytes(node.proc.pid) - before
        assert grown < 64 << 20, f"the server's memory grew by {grown >> 20} MiB for one client"
    finally:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        raw.close()
    assert wait_for_no_server_sockets(node.port, timeout=40) == 0


# --- The audit page -------------------------------------------------------------------


def https_get(port: int, pki: Path, client: str, path: str = "/api/verify") -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls_context(pki, client), timeout=15)
    try:
        conn.request("GET", path, headers={"Host": "localhost"})
        return conn.getresponse().status
    finally:
        conn.close()


def test_the_audit_page_closes_a_bare_socket_at_the_handshake_timeout(node):
    """The audit page has the same handshake timeout as the KMIP listener."""
    with socket.create_connection(("127.0.0.1", node.web_port)) as sock:
        assert closed_by_server(sock, HANDSHAKE_TIMEOUT + 10)


def test_the_audit_page_caps_its_connections_after_tls(node, pki_dir):
    """web_max_connections TLS connections are held; the next one is closed
    right after its handshake; bare sockets do not count; once the held
    ones go, the page serves again."""
    bare = [socket.create_connection(("127.0.0.1", node.web_port)) for _ in range(2 * WEB_MAX_CONNECTIONS)]
    held = []
    try:
        for _ in range(WEB_MAX_CONNECTIONS):
            raw = socket.create_connection(("127.0.0.1", node.web_port), timeout=15)
            held.append(tls_context(pki_dir, "auditor").wrap_socket(raw, server_hostname="localhost"))
        raw = socket.create_connection(("127.0.0.1", node.web_port), timeout=15)
        extra = tls_context(pki_dir, "auditor").wrap_socket(raw, server_hostname="localhost")
        with extra:
            assert closed_by_server(extra, 10)
    finally:
        for sock in held + bare:
            sock.close()
    deadline = time.monotonic() + 15
    status = None
    while time.monotonic() < deadline:
        try:
            status = https_get(node.web_port, pki_dir, "auditor")
            break
        except (OSError, ssl.SSLError, http.client.HTTPException):
            time.sleep(0.2)
    assert status == 200


def test_the_audit_page_closes_a_request_trickled_in(node, pki_dir):
    """An HTTP request sent one byte a second is closed at the request
    deadline (frame_timeout), before it is complete."""
    raw = socket.create_connection(("127.0.0.1", node.web_port), timeout=15)
    with tls_context(pki_dir, "auditor").wrap_socket(raw, server_hostname="localhost") as sock:
        request = b"GET /api/verify HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40
        assert trickled_until_closed(sock, request[:20]), "a request trickled in over 20 s was still read"


# --- TLS suites -----------------------------------------------------------------------


def legacy_only_context(pki: Path, client: str) -> ssl.SSLContext:
    """A client that offers only TLS_RSA_WITH_AES_128_CBC_SHA256 (no forward
    secrecy), as vCenter 7 can."""
    ctx = tls_context(pki, client)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("AES128-SHA256")
    return ctx


def handshake_cipher(port: int, ctx: ssl.SSLContext) -> str | None:
    """The suite negotiated, or None when the server refuses the handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        with ctx.wrap_socket(raw, server_hostname="localhost") as sock:
            return sock.cipher()[0]
    except (ssl.SSLError, ConnectionError):
        return None
    finally:
        raw.close()


def test_legacy_suite_on_the_kmip_listener_only(node, pki_dir):
    """AES128-SHA256 alone is accepted by the KMIP listener (vCenter 7
    needs it) and refused by the audit page, which offers ECDHE with AEAD
    only."""
    assert handshake_cipher(node.port, legacy_only_context(pki_dir, "alice")) == "AES128-SHA256"
    assert handshake_cipher(node.web_port, legacy_only_context(pki_dir, "auditor")) is None
    modern = tls_context(pki_dir, "auditor")
    modern.maximum_version = ssl.TLSVersion.TLSv1_2
    cipher = handshake_cipher(node.web_port, modern)
    assert cipher is not None and cipher.startswith("ECDHE-"), cipher
    assert "GCM" in cipher or "CHACHA20" in cipher, cipher


# --- The broker: API and gateway ------------------------------------------------------

BROKER_API_MAX_CONNECTIONS = 3
BROKER_HANDSHAKE_TIMEOUT = 3.0
BROKER_REQUEST_TIMEOUT = 3.0
GATEWAY_MAX_CONNECTIONS = 3


@pytest.fixture(scope="module")
def broker(tmp_path_factory, pki_dir, kms_module):
    """A `vtpm-broker` with small listener limits: 3 API connections, 3
    gateway connections, 3 s handshake timeouts and API request deadline."""
    workdir = tmp_path_factory.mktemp("broker-limits")
    config = broker_process.write_config(workdir, kms_module.port, pki_dir)
    text = config.read_text()
    text = text.replace(
        "[api]\nport = 0\n",
        "[api]\nport = 0\n"
        f"max_connections = {BROKER_API_MAX_CONNECTIONS}\n"
        f"handshake_timeout = {BROKER_HANDSHAKE_TIMEOUT}\n"
        f"request_timeout = {BROKER_REQUEST_TIMEOUT}\n",
    )
    text = text.replace(
        "[gateway]\nport = 0\n",
        "[gateway]\nport = 0\n"
        f"max_connections = {GATEWAY_MAX_CONNECTIONS}\n"
        f"handshake_timeout = {BROKER_HANDSHAKE_TIMEOUT}\n",
    )
    assert "request_timeout" in text and text.count("handshake_timeout") == 2
    config.write_text(text)
    b = broker_process.set_up(workdir, config, pki_dir)
    b.start()
    assert b.gateway_port, "this build has no broker.gateway"
    yield b
    b.stop()


@pytest.fixture(scope="module")
def host_identity(broker) -> tuple[str, str]:
    """A host certificate issued by the broker's trust CA, for the gateway."""
    instance = broker_process.enroll(broker, "limits-instance")
    return broker_process.register_host(broker, instance, "limits-host")


def broker_context(broker, identity: tuple[str, str] | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(broker.ca))
    ctx.check_hostname = False
    if identity is not None:
        ctx.load_cert_chain(*identity)
    return ctx


def broker_tls(broker, port: int, identity=None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    return broker_context(broker, identity).wrap_socket(raw)


def test_the_gateway_frees_slots_after_an_undecodable_frame_and_pipelined_requests(broker, host_identity):
    """The gateway reuses the KMIP protocol: the same burst and close, three
    times its connection cap, leaves it holding no connection, and a host
    is still served."""
    burst = undecodable_frame() + discover_versions() * 4
    for _ in range(3 * GATEWAY_MAX_CONNECTIONS):
        with broker_tls(broker, broker.gateway_port, host_identity) as sock:
            sock.sendall(burst)
            assert closed_by_server(sock, 15)
    assert wait_for_no_server_sockets(broker.gateway_port) == 0
    with broker_tls(broker, broker.gateway_port, host_identity) as sock:
        sock.sendall(discover_versions())
        header = sock.recv(8)
        assert header[:3] == bytes.fromhex("42007b"), "the gateway did not answer a fresh host"


def test_the_gateway_lets_a_host_in_past_idle_sockets(broker, host_identity):
    """More bare sockets than the gateway's connection cap do not keep a
    host out."""
    idle = [socket.create_connection(("127.0.0.1", broker.gateway_port)) for _ in range(3 * GATEWAY_MAX_CONNECTIONS)]
    try:
        with broker_tls(broker, broker.gateway_port, host_identity) as sock:
            sock.sendall(discover_versions())
            assert sock.recv(8)[:3] == bytes.fromhex("42007b")
    finally:
        for sock in idle:
            sock.close()


def test_the_broker_api_closes_a_bare_socket_at_the_handshake_timeout(broker):
    """The API listener had no handshake timeout: a socket that never
    starts TLS is now closed after handshake_timeout."""
    with socket.create_connection(("127.0.0.1", broker.port)) as sock:
        assert closed_by_server(sock, BROKER_HANDSHAKE_TIMEOUT + 10)


def test_the_broker_api_caps_its_connections_after_tls(broker):
    """The API listener had no connection cap: past max_connections a TLS
    connection is closed after its handshake; bare sockets take no slot;
    the API answers again once connections go."""
    bare = [socket.create_connection(("127.0.0.1", broker.port)) for _ in range(2 * BROKER_API_MAX_CONNECTIONS)]
    held = []
    try:
        held = [broker_tls(broker, broker.port) for _ in range(BROKER_API_MAX_CONNECTIONS)]
        with broker_tls(broker, broker.port) as extra:
            assert closed_by_server(extra, 10)
    finally:
        for sock in held + bare:
            sock.close()
    deadline = time.monotonic() + 15
    status = None
    while time.monotonic() < deadline:
        try:
            status = broker.call("GET", "/v1/vms").status_code
            break
        except requests.RequestException:
            time.sleep(0.2)
    assert status is not None and status < 500


def test_the_broker_api_closes_a_request_trickled_in(broker):
    """An API request sent one byte a second is closed at the request
    deadline, before it is complete."""
    with broker_tls(broker, broker.port) as sock:
        request = b"GET /v1/vms HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"a" * 40
        assert trickled_until_closed(sock, request[:20]), "a request trickled in over 20 s was still read"


def test_the_broker_listeners_refuse_suites_without_forward_secrecy(broker, host_identity):
    """Neither the API nor the gateway accepts AES128-SHA256 (RSA key
    transport): only the KMS's KMIP listener offers it, for vCenter 7."""
    for port, identity in ((broker.port, None), (broker.gateway_port, host_identity)):
        ctx = broker_context(broker, identity)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("AES128-SHA256")
        assert handshake_cipher(port, ctx) is None, port
