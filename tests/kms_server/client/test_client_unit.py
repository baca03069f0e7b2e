"""The failover policy of `kmip_core.client.KmipClient`, against fake KMIP
nodes: TLS servers on free 127.0.0.1 ports, in threads, that refuse,
hang, drop, reset or answer with canned TTLV exactly as each test says."""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kmip.core.enums import (
    CredentialType,
    KeyFormatType,
    ObjectType,
    Operation,
    ResultReason,
    ResultStatus,
    Tags,
)

from kmip_core import ttlv
from kmip_core.client import KmipClient, KmipError, NoNodeAvailable, OutcomeUnknown
from kmip_core.ttlv import Item

T = Tags
KEY = bytes(range(0xA0, 0xC0))  # The fake key: 32 recognizable bytes.


# Canned responses.
def response(operation: Operation, status: ResultStatus, payload: list[Item] | None, reason=None, message="") -> Item:
    header = ttlv.structure(
        T.RESPONSE_HEADER.value,
        [
            ttlv.structure(
                T.PROTOCOL_VERSION.value,
                [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4)],
            ),
            ttlv.date_time(T.TIME_STAMP.value, int(time.time())),
            ttlv.integer(T.BATCH_COUNT.value, 1),
        ],
    )
    item = ttlv.structure(
        T.BATCH_ITEM.value,
        [
            ttlv.enumeration(T.OPERATION.value, operation.value),
            ttlv.enumeration(T.RESULT_STATUS.value, status.value),
            ttlv.enumeration(T.RESULT_REASON.value, reason.value) if reason is not None else None,
            ttlv.text(T.RESULT_MESSAGE.value, message) if message else None,
            ttlv.structure(T.RESPONSE_PAYLOAD.value, payload) if payload is not None else None,
        ],
    )
    return ttlv.structure(T.RESPONSE_MESSAGE.value, [header, item])


def failure(operation: Operation, reason: ResultReason, message: str) -> Item:
    return response(operation, ResultStatus.OPERATION_FAILED, None, reason, message)


def success(operation: Operation, request: Item, node: FakeNode) -> Item:
    """What a healthy node answers."""
    uid = ttlv.text(T.UNIQUE_IDENTIFIER.value, f"uid-{node.port}")
    if operation == Operation.DISCOVER_VERSIONS:
        version = ttlv.structure(
            T.PROTOCOL_VERSION.value,
            [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4)],
        )
        return response(operation, ResultStatus.SUCCESS, [version])
    if operation == Operation.CREATE:
        return response(
            operation,
            ResultStatus.SUCCESS,
            [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value), uid],
        )
    if operation == Operation.GET:
        block = ttlv.structure(
            T.KEY_BLOCK.value,
            [
                ttlv.enumeration(T.KEY_FORMAT_TYPE.value, KeyFormatType.RAW.value),
                ttlv.structure(T.KEY_VALUE.value, [ttlv.byte_string(T.KEY_MATERIAL.value, KEY)]),
            ],
        )
        return response(
            operation,
            ResultStatus.SUCCESS,
            [
                ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
                uid,
                ttlv.structure(T.SYMMETRIC_KEY.value, [block]),
            ],
        )
    return response(operation, ResultStatus.SUCCESS, [uid])


# Fake nodes.
Action = Item | str  # A response, or "drop", "reset", "hang", "close-after".


class FakeNode:
    """A KMIP/TLS node on a free 127.0.0.1 port. `on_accept` is "tls"
    (handshake, then answer each request with `respond`), "close" (close
    before any TLS) or "hang" (accept and say nothing). `listening=False`
    keeps the port bound but refusing until `listen()`."""

    def __init__(
        self,
        pki: Path,
        respond: Callable[[Operation, Item, FakeNode], Action] | None = None,
        on_accept: str = "tls",
        listening: bool = True,
    ):
        self.respond = respond or success
        self.on_accept = on_accept
        self.accepted = 0
        self.requests: list[Operation] = []
        self.headers: list[Item] = []
        self._sockets: list[socket.socket] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
        self.context.load_verify_locations(str(pki / "ca.pem"))
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        if listening:
            self.listen()

    def listen(self) -> None:
        self.listener.listen(16)
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def stop(self) -> None:
        self._stop.set()
        for sock in [self.listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with self._lock:
                self.accepted += 1
            self._sockets.append(conn)
            if self.on_accept == "close":
                conn.close()
            elif self.on_accept == "tls":
                threading.Thread(target=self._serve, args=(conn,), daemon=True).start()
            # "hang": keep the socket open, never answer.

    def _serve(self, raw: socket.socket) -> None:
        try:
            raw.settimeout(10)
            conn = self.context.wrap_socket(raw, server_side=True)
            self._sockets.append(conn)
            while not self._stop.is_set():
                data = _recv_message(conn)
                if data is None:
                    return
                request = ttlv.decode(data)
                header = request.find(T.REQUEST_HEADER.value)
                item = request.find(T.BATCH_ITEM.value)
                operation = Operation(item.get(T.OPERATION.value))
                with self._lock:
                    self.requests.append(operation)
                    self.headers.append(header)
                action = self.respond(operation, item.find(T.REQUEST_PAYLOAD.value), self)
                if action == "drop":
                    conn.close()
                    return
                if action == "reset":
                    # Linger 0: the close sends a TCP reset, not a FIN.
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    conn.close()
                    return
                if action == "hang":
                    self._stop.wait(30)
                    return
                if action == "close-after":
                    conn.sendall(ttlv.encode(success(operation, item, self)))
                    conn.close()
                    return
                conn.sendall(ttlv.encode(action))
        except (OSError, ValueError):
            return


def _recv_message(conn) -> bytes | None:
    def exact(n: int) -> bytes | None:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                return None
            buf += chunk
        return buf

    header = exact(8)
    if header is None:
        return None
    body = exact(int.from_bytes(header[4:8], "big"))
    return None if body is None else header + body


def once(first: Action, then=success):
    """A responder that does `first` to the first request, then `then`."""
    seen = []

    def respond(operation, payload, node):
        seen.append(operation)
        if len(seen) == 1:
            return first
        return then(operation, payload, node)

    return respond


def on(operation: Operation, action: Action | Callable):
    """A responder that does `action` to `operation` and answers the rest."""

    def respond(op, payload, node):
        if op == operation:
            return action(op, payload, node) if callable(action) else action
        return success(op, payload, node)

    return respond


@pytest.fixture
def fake(pki_dir):
    made: list[FakeNode] = []

    def make(respond=None, on_accept="tls", listening=True) -> FakeNode:
        node = FakeNode(pki_dir, respond, on_accept, listening)
        made.append(node)
        return node

    yield make
    for node in made:
        node.stop()


@pytest.fixture
def client_for(pki_dir):
    made: list[KmipClient] = []

    def make(nodes, **kwargs) -> KmipClient:
        kwargs.setdefault("connect_timeout", 1.0)
        kwargs.setdefault("request_timeout", 2.0)
        client = KmipClient(
            [n.address if isinstance(n, FakeNode) else n for n in nodes],
            cert=pki_dir / "alice.pem",
            key=pki_dir / "alice.key",
            ca=pki_dir / "ca.pem",
            **kwargs,
        )
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


# Connection failures: the request never reached the node.
def test_refused_node_moves_to_next(fake, client_for):
    """A node that refuses connections is skipped, for writes too: nothing
    was sent to it."""
    refused, b = fake(listening=False), fake()
    client = client_for([refused, b])
    assert client.create_symmetric_key() == f"uid-{b.port}"
    assert client.discover_versions() == [(1, 4)]
    assert b.requests == [Operation.CREATE, Operation.DISCOVER_VERSIONS]
    assert client.current_node == b.address


def test_handshake_failure_moves_to_next(fake, client_for):
    """A node that accepts and closes before TLS completes is a connection
    failure: the next node gets the request."""
    closing, b = fake(on_accept="close"), fake()
    client = client_for([closing, b])
    assert client.create_symmetric_key() == f"uid-{b.port}"
    assert closing.accepted == 1 and b.requests == [Operation.CREATE]


def test_hanging_node_times_out_then_next(fake, client_for):
    """A node that accepts and never answers the handshake costs at most
    connect_timeout before the next node serves the request."""
    hanging, b = fake(on_accept="hang"), fake()
    client = client_for([hanging, b], connect_timeout=0.3)
    started = time.monotonic()
    assert client.create_symmetric_key() == f"uid-{b.port}"
    assert time.monotonic() - started < 1.5
    assert hanging.accepted == 1 and b.requests == [Operation.CREATE]


def test_certificate_name_is_checked(fake, client_for):
    """The server certificate must name the node (or server_name): a name
    mismatch is a TLS failure, never a connection used anyway."""
    a = fake()
    with pytest.raises(NoNodeAvailable) as info:
        client_for([a], server_name="kms.example.org").discover_versions()
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert a.requests == []
    assert client_for([a], server_name="localhost").discover_versions() == [(1, 4)]


# After the request was sent.
@pytest.mark.parametrize("failure_mode", ["drop", "reset", "hang"])
def test_read_only_operation_retried_on_next_node(fake, client_for, failure_mode):
    """Get changes nothing, so after a dropped, reset or timed-out exchange
    it is asked again on the next node."""
    a = fake(on(Operation.GET, failure_mode))
    b = fake()
    client = client_for([a, b], request_timeout=0.3)
    assert client.get_key("k1") == KEY
    assert a.requests == [Operation.GET] and b.requests == [Operation.GET]
    assert client.current_node == b.address


@pytest.mark.parametrize("failure_mode", ["drop", "reset", "hang"])
@pytest.mark.parametrize(
    "call",
    [
        lambda c: c.create_symmetric_key(name="vm-1"),
        lambda c: c.add_attribute("k1", "x-vm", "vm-1"),
        lambda c: c.activate("k1"),
        lambda c: c.revoke("k1", "KEY_COMPROMISE"),
        lambda c: c.destroy("k1"),
        lambda c: c.request(Operation.CHECK, [ttlv.text(T.UNIQUE_IDENTIFIER.value, "k1")]),
    ],
    ids=["create", "add_attribute", "activate", "revoke", "destroy", "unlisted-check"],
)
def test_write_after_drop_is_outcome_unknown(fake, client_for, failure_mode, call):
    """A state-changing request that reached a node and got no answer is
    not sent anywhere else: OutcomeUnknown names the operation and node."""
    a = fake(once(failure_mode))
    b = fake()
    client = client_for([a, b], request_timeout=0.3)
    with pytest.raises(OutcomeUnknown) as info:
        call(client)
    assert info.value.node == a.address
    assert info.value.operation == a.requests[0].name
    assert info.value.reason is None
    assert len(a.requests) == 1
    assert b.accepted == 0 and b.requests == []


def test_kmip_error_response_is_not_retried(fake, client_for):
    """An error answer is the node's answer, even for a read: raised as
    KmipError with the reason, message and node, no other node asked."""
    a = fake(on(Operation.GET, failure(Operation.GET, ResultReason.ITEM_NOT_FOUND, "no such object")))
    b = fake()
    client = client_for([a, b])
    with pytest.raises(KmipError) as info:
        client.get_key("missing")
    error = info.value
    assert type(error) is KmipError
    assert (error.reason, error.message, error.node) == (ResultReason.ITEM_NOT_FOUND, "no such object", a.address)
    assert b.accepted == 0


def test_general_failure_is_not_retried(fake, client_for):
    """General Failure to a read is a plain KmipError; to a write it means
    the commit may have happened: OutcomeUnknown with that reason. Neither
    goes to another node."""

    def respond(operation, payload, node):
        return failure(operation, ResultReason.GENERAL_FAILURE, "internal error, request id 1234")

    a, b = fake(respond), fake()
    client = client_for([a, b])
    with pytest.raises(KmipError) as read:
        client.get_key("k1")
    assert type(read.value) is KmipError and read.value.reason == ResultReason.GENERAL_FAILURE
    with pytest.raises(OutcomeUnknown) as write:
        client.create_symmetric_key()
    assert write.value.reason == ResultReason.GENERAL_FAILURE
    assert "request id 1234" in write.value.message
    assert a.requests == [Operation.GET, Operation.CREATE] and b.accepted == 0


def test_all_nodes_down_lists_each_error(fake, client_for):
    """NoNodeAvailable names every node, in the order tried, with its error."""
    refused, closing, hanging = fake(listening=False), fake(on_accept="close"), fake(on_accept="hang")
    client = client_for([refused, closing, hanging], connect_timeout=0.3)
    with pytest.raises(NoNodeAvailable) as info:
        client.create_symmetric_key()
    errors = info.value.errors
    assert [node for node, _ in errors] == [refused.address, closing.address, hanging.address]
    assert "refused" in errors[0][1].lower()
    assert "timed out" in errors[2][1]
    assert isinstance(info.value, KmipError) and info.value.reason is None
    for node in (refused, closing, hanging):
        assert node.address in str(info.value)


def test_read_after_drop_everywhere_is_no_node_available(fake, client_for):
    a, b = fake(on(Operation.GET, "drop")), fake(on(Operation.GET, "reset"))
    with pytest.raises(NoNodeAvailable) as info:
        client_for([a, b]).get_key("k1")
    assert [n for n, _ in info.value.errors] == [a.address, b.address]
    assert all(e.startswith("no response") for _, e in info.value.errors)


# Back-off and connection reuse.
def test_backoff_skips_a_failed_node(fake, client_for):
    """After a failure the node is left alone for the back-off even though
    it comes first in the list and would answer now."""
    a = fake(on(Operation.CREATE, "reset"))
    b = fake()
    client = client_for([a, b], backoff=30)
    assert client.discover_versions() == [(1, 4)]  # Served by a.
    with pytest.raises(OutcomeUnknown):
        client.create_symmetric_key()
    assert client.discover_versions() == [(1, 4)]
    client.activate("k1")
    assert a.accepted == 1 and a.requests == [Operation.DISCOVER_VERSIONS, Operation.CREATE]
    assert b.requests == [Operation.DISCOVER_VERSIONS, Operation.ACTIVATE]


def test_backed_off_node_is_tried_when_it_is_the_only_one_left(fake, client_for):
    """Back-off never refuses a request that some node could serve: the
    only node, failed a moment ago and back now, is tried at once."""
    a = fake(listening=False)
    client = client_for([a], backoff=30)
    with pytest.raises(NoNodeAvailable):
        client.discover_versions()
    a.listen()
    assert client.discover_versions() == [(1, 4)]


def test_backed_off_node_is_last_resort(fake, client_for):
    """With a in back-off, b is asked first; when b fails too, a is asked
    rather than failing the request."""
    a = fake(once("reset"))
    b_port_holder = fake(listening=False)
    client = client_for([a, b_port_holder], backoff=30)
    with pytest.raises(OutcomeUnknown):
        client.activate("k1")  # a now in back-off.
    assert client.discover_versions() == [(1, 4)]  # b refused, a answers.
    assert a.requests == [Operation.ACTIVATE, Operation.DISCOVER_VERSIONS]


def test_connection_is_kept_and_reopened_when_idle_closed(fake, client_for):
    """One connection serves many requests; one the node closed while idle
    is reopened to the same node, so a write is not reported unknown."""
    a = fake(once("close-after"))
    b = fake()
    client = client_for([a, b])
    client.discover_versions()
    time.sleep(0.2)  # a has closed the idle connection by now.
    assert client.create_symmetric_key() == f"uid-{a.port}"
    for _ in range(5):
        client.discover_versions()
    assert a.accepted == 2 and b.accepted == 0


def get_keys_in_threads(client: KmipClient, threads: int, each: int) -> list:
    """`threads` threads each Get k1 `each` times; the keys they got, in any
    order (an exception in any thread fails the test)."""
    results, errors = [], []

    def work():
        try:
            for _ in range(each):
                results.append(client.get_key("k1"))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    running = [threading.Thread(target=work) for _ in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join(30)
    assert not errors
    return results


def test_threads_share_one_client(fake, client_for):
    a = fake()
    client = client_for([a])
    assert get_keys_in_threads(client, 8, 10) == [KEY] * 80
    assert a.accepted == 1


def test_pool_runs_requests_side_by_side(fake, client_for):
    """With connections=4, four requests are in flight at once, each on its
    own connection: the node answers only when four have arrived together
    (a barrier), which one shared connection could never reach."""
    together = threading.Barrier(4, timeout=10)

    def respond(operation, payload, node):
        together.wait()
        return success(operation, payload, node)

    a = fake(respond)
    client = client_for([a], connections=4, request_timeout=15)
    assert get_keys_in_threads(client, 4, 3) == [KEY] * 12
    assert a.accepted == 4  # Kept and reused: one connection per slot.


def test_pool_never_exceeds_its_size(fake, client_for):
    """Eight threads on a pool of two: at most two connections are opened,
    and at most two requests are at the node at any moment."""
    lock = threading.Lock()
    state = {"now": 0, "most": 0}

    def respond(operation, payload, node):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.01)
        with lock:
            state["now"] -= 1
        return success(operation, payload, node)

    a = fake(respond)
    client = client_for([a], connections=2)
    assert get_keys_in_threads(client, 8, 5) == [KEY] * 40
    assert len(a.requests) == 40
    assert a.accepted <= 2 and state["most"] <= 2


def test_pool_fails_over_and_drops_connections_to_the_old_node(fake, client_for):
    """A pool with idle connections to a node that then fails moves to the
    next node; the stale connections are closed, not reused."""
    a = fake()
    b = fake()
    client = client_for([a, b], connections=3, backoff=30)
    client.get_key("k1")
    a.respond = lambda operation, payload, node: "drop"
    assert client.get_key("k1") == KEY  # Dropped by a, answered by b.
    for _ in range(3):
        client.get_key("k1")
    assert client.current_node == b.address
    assert a.requests.count(Operation.GET) == 2 and b.requests.count(Operation.GET) == 4


def test_pool_size_must_be_positive(pki_dir):
    with pytest.raises(ValueError, match="connections"):
        KmipClient(["127.0.0.1:1"], pki_dir / "alice.pem", pki_dir / "alice.key", pki_dir / "ca.pem", connections=0)


def test_closed_client_refuses_requests(fake, client_for):
    client = client_for([fake()])
    with client:
        client.discover_versions()
    with pytest.raises(RuntimeError):
        client.discover_versions()


# Credentials, logging, secrets.
def test_username_and_password_sent_in_every_request(fake, client_for, tmp_path):
    password_file = tmp_path / "password"
    password_file.write_text("s3cret-pass\n")
    a = fake()
    client = client_for([a], username="broker", password_file=password_file)
    client.discover_versions()
    client.get_key("k1")
    for header in a.headers:
        credential = header.find(T.AUTHENTICATION.value).find(T.CREDENTIAL.value)
        assert credential.get(T.CREDENTIAL_TYPE.value) == CredentialType.USERNAME_AND_PASSWORD.value
        value = credential.find(T.CREDENTIAL_VALUE.value)
        assert (value.get(T.USERNAME.value), value.get(T.PASSWORD.value)) == ("broker", "s3cret-pass")
    assert "s3cret" not in repr(client)


def test_retries_logged_at_info_without_key_bytes(fake, client_for, caplog):
    """Each retry is an INFO line naming operation and nodes; no key bytes,
    plaintext or ciphertext in any log line or exception."""
    caplog.set_level(logging.DEBUG, logger="kmip_core.client")
    a = fake(on(Operation.GET, "reset"))
    b = fake()
    client = client_for([a, b])
    assert client.get_key("k1") == KEY
    retries = [r for r in caplog.records if r.levelno == logging.INFO and "retrying" in r.getMessage()]
    assert len(retries) == 1
    assert "GET" in retries[0].getMessage() and a.address in retries[0].getMessage()
    assert b.address in retries[0].getMessage()

    secret = b"plaintext-secret"
    b.respond = lambda op, payload, node: response(
        op,
        ResultStatus.SUCCESS,
        [ttlv.byte_string(T.DATA.value, secret), ttlv.byte_string(T.IV_COUNTER_NONCE.value, KEY)],
    )
    result = client.encrypt("k1", secret)
    assert "plaintext" not in repr(result) and KEY.hex() not in repr(result)

    c = fake(on(Operation.ENCRYPT, "drop"))
    with pytest.raises(NoNodeAvailable) as info:
        client_for([c]).encrypt("k1", secret, aad=KEY)
    text = caplog.text + str(info.value) + repr(info.value)
    for needle in (KEY.hex(), KEY.hex().upper(), repr(KEY), repr(secret), "plaintext-secret"):
        assert needle not in text
