"""Bad input over a real TLS connection: every malformed fixture gets a KMIP
error or a closed connection, never a crash or a hang, and the node keeps
serving other clients afterwards."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from kmip.core.enums import Operation, ResultReason, ResultStatus, Tags
from kmip_client import RawClient, tls_context

from kmip_core import ttlv
from kmip_core.client.messages import request_message

T = Tags
FIXTURES = sorted((Path(__file__).resolve().parents[1] / "fixtures" / "malformed").glob("*.hex"))


def load_fixture(path: Path) -> bytes:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return bytes.fromhex("".join(lines))


def discover_versions_request() -> bytes:
    return request_message((1, 4), Operation.DISCOVER_VERSIONS, [])


def assert_still_serving(server, pki):
    with RawClient(server.host, server.port, pki, "bob") as client:
        response = client.request(discover_versions_request())
        assert response is not None
        assert response.find(T.BATCH_ITEM.value).get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value


@pytest.mark.parametrize("fixture", FIXTURES, ids=lambda p: p.stem)
def test_malformed_message_gets_error_or_close(kms_module, pki_dir, fixture):
    data = load_fixture(fixture)
    with RawClient(kms_module.host, kms_module.port, pki_dir, "alice", timeout=10) as client:
        client.send(data)
        if len(data) < 8 or int.from_bytes(data[4:8], "big") + 8 > len(data):
            # A truncated message: the server waits for the rest; closing our
            # side must not disturb it.
            client.sock.shutdown(socket.SHUT_WR)
        response = client.recv_message()
    if response is not None:
        message = ttlv.decode(response)
        assert message.tag == T.RESPONSE_MESSAGE.value
        for item in message.find_all(T.BATCH_ITEM.value):
            if item.get(T.RESULT_STATUS.value) != ResultStatus.SUCCESS.value:
                assert item.get(T.RESULT_REASON.value) in (
                    ResultReason.INVALID_MESSAGE.value,
                    ResultReason.OPERATION_NOT_SUPPORTED.value,
                    ResultReason.MISSING_DATA.value,
                    # trailing_bytes: the framed message is valid (a Get of an
                    # unknown id); the 4 extra bytes start a next frame.
                    ResultReason.ITEM_NOT_FOUND.value,
                )
    assert_still_serving(kms_module, pki_dir)


def test_oversized_declared_length_is_closed_without_reading(kms_module, pki_dir):
    """A header declaring 2 GiB is refused at once: the connection closes
    before any body is sent, so the server never buffers it."""
    with RawClient(kms_module.host, kms_module.port, pki_dir, "alice", timeout=10) as client:
        client.send(bytes.fromhex("42007801") + (0x7FFFFFF8).to_bytes(4, "big"))
        assert client.recv_message() is None
    assert_still_serving(kms_module, pki_dir)


def test_client_without_certificate_is_refused(kms_module, pki_dir):
    context = tls_context(pki_dir, client=None)
    raw = socket.create_connection((kms_module.host, kms_module.port), timeout=10)
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(discover_versions_request())
            if not sock.recv(8):
                raise ConnectionError("closed")
    assert_still_serving(kms_module, pki_dir)


def test_half_open_handshakes_do_not_starve_clients(kms_module, pki_dir):
    """Twenty TCP connections that never start TLS do not stop a real
    client from being served."""
    idle = [socket.create_connection((kms_module.host, kms_module.port), timeout=10) for _ in range(20)]
    try:
        assert_still_serving(kms_module, pki_dir)
    finally:
        for s in idle:
            s.close()


def test_unfinished_handshake_is_closed_by_the_server(kms, pki_dir):
    """A connection that never completes the TLS handshake is closed by the
    server after handshake_timeout (5 s in the test configuration)."""
    s = socket.create_connection((kms.host, kms.port), timeout=30)
    try:
        try:
            data = s.recv(1)
        except ConnectionResetError:
            data = b""  # The server aborts: a reset is a close too.
        assert data == b""  # Closed by the server, well before our 30 s.
    finally:
        s.close()
