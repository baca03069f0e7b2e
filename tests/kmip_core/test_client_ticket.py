"""A KMIP request can carry a Ticket credential (KMIP 2.0, 2.1.2 and 2.1.16):
the broker gateway's attestation token travels in the request header as
Authentication { Credential { Credential Type = Ticket, Credential Value {
Ticket Type = Login, Ticket Value } } }, beside a username/password when
both are given, in whatever protocol version the client speaks.

The encoding is checked by decoding the bytes with kmip_core.ttlv; the
client's `ticket` attribute over a real TLS connection to a one-shot server
thread that records what it receives."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from kmip.core.enums import CredentialType, Operation, ResultStatus, Tags, TicketType

from kmip_core import ttlv
from kmip_core.client import KmipClient
from kmip_core.client.messages import request_message, ticket_credential
from kmip_core.ttlv import Item, ItemType

T = Tags
TOKEN = b"v1.host-a.0123456789abcdef"


def _credentials(message: bytes) -> list[Item]:
    decoded = ttlv.decode(message)
    header = decoded.find(T.REQUEST_HEADER.value)
    assert header is not None
    authentication = header.find(T.AUTHENTICATION.value)
    if authentication is None:
        return []
    assert authentication.type == ItemType.STRUCTURE
    return authentication.find_all(T.CREDENTIAL.value)


def _ticket_of(credential: Item) -> tuple[int, bytes]:
    assert credential.get(T.CREDENTIAL_TYPE.value) == CredentialType.TICKET.value
    value = credential.find(T.CREDENTIAL_VALUE.value)
    assert value is not None and value.type == ItemType.STRUCTURE
    kinds = [child.tag for child in value.children()]
    assert kinds == [T.TICKET_TYPE.value, T.TICKET_VALUE.value]
    ticket_type = value.find(T.TICKET_TYPE.value)
    ticket_value = value.find(T.TICKET_VALUE.value)
    assert ticket_type is not None and ticket_type.type == ItemType.ENUMERATION
    assert ticket_value is not None and ticket_value.type == ItemType.BYTE_STRING
    return ticket_type.value, ticket_value.value


@pytest.mark.parametrize("version", [(1, 0), (1, 2), (1, 4), (2, 0)])
def test_ticket_alone_is_one_ticket_credential_in_every_version(version):
    message = request_message(version, Operation.DECRYPT, [], ticket=TOKEN)
    credentials = _credentials(message)
    assert len(credentials) == 1
    assert _ticket_of(credentials[0]) == (TicketType.LOGIN.value, TOKEN)


def test_username_password_and_ticket_are_two_credentials_username_first():
    """The KMS's dispatcher reads the first Credential only: the username/password comes first."""
    message = request_message((1, 4), Operation.DECRYPT, [], credential=("alice", "pw"), ticket=TOKEN)
    credentials = _credentials(message)
    assert len(credentials) == 2
    first = credentials[0]
    assert first.get(T.CREDENTIAL_TYPE.value) == CredentialType.USERNAME_AND_PASSWORD.value
    value = first.find(T.CREDENTIAL_VALUE.value)
    assert value is not None
    assert (value.get(T.USERNAME.value), value.get(T.PASSWORD.value)) == ("alice", "pw")
    assert _ticket_of(credentials[1]) == (TicketType.LOGIN.value, TOKEN)


def test_username_password_alone_is_unchanged():
    message = request_message((1, 4), Operation.DECRYPT, [], credential=("alice", "pw"))
    credentials = _credentials(message)
    assert len(credentials) == 1
    assert credentials[0].get(T.CREDENTIAL_TYPE.value) == CredentialType.USERNAME_AND_PASSWORD.value


def test_no_credential_no_authentication():
    decoded = ttlv.decode(request_message((1, 4), Operation.DECRYPT, []))
    header = decoded.find(T.REQUEST_HEADER.value)
    assert header is not None
    assert header.find(T.AUTHENTICATION.value) is None


def test_authentication_comes_before_batch_count():
    """KMIP orders the header's fields: Authentication before Batch Count."""
    decoded = ttlv.decode(request_message((2, 0), Operation.DECRYPT, [], correlation="req-1", ticket=TOKEN))
    header = decoded.find(T.REQUEST_HEADER.value)
    assert header is not None
    tags = [child.tag for child in header.children()]
    assert tags == [
        T.PROTOCOL_VERSION.value,
        T.CLIENT_CORRELATION_VALUE.value,
        T.AUTHENTICATION.value,
        T.BATCH_COUNT.value,
    ]


@pytest.mark.parametrize("bad", [b"", "text-token"])
def test_a_ticket_must_be_non_empty_bytes(bad):
    with pytest.raises(ValueError, match="non-empty byte string"):
        ticket_credential(bad)


# --- KmipClient.ticket over a real TLS connection ------------------------------------------------


class _RecordingServer:
    """Accepts one TLS connection and answers every request with a Decrypt
    success (Data = b"plain"), keeping the raw request bytes."""

    def __init__(self, pki: Path):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
        context.load_verify_locations(str(pki / "ca.pem"))
        context.verify_mode = ssl.CERT_REQUIRED
        self._context = context
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.requests: list[bytes] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        raw, _ = self._listener.accept()
        with self._context.wrap_socket(raw, server_side=True) as conn:
            while True:
                header = _recv_exact(conn, 8)
                if header is None:
                    return
                body = _recv_exact(conn, int.from_bytes(header[4:8], "big"))
                if body is None:
                    return
                self.requests.append(header + body)
                conn.sendall(_decrypt_response())

    def close(self) -> None:
        self._listener.close()
        self._thread.join(timeout=10)


def _recv_exact(conn: ssl.SSLSocket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _decrypt_response() -> bytes:
    return ttlv.encode(
        ttlv.structure(
            T.RESPONSE_MESSAGE.value,
            [
                ttlv.structure(
                    T.RESPONSE_HEADER.value,
                    [
                        ttlv.structure(
                            T.PROTOCOL_VERSION.value,
                            [
                                ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1),
                                ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4),
                            ],
                        ),
                        ttlv.date_time(T.TIME_STAMP.value, 0),
                        ttlv.integer(T.BATCH_COUNT.value, 1),
                    ],
                ),
                ttlv.structure(
                    T.BATCH_ITEM.value,
                    [
                        ttlv.enumeration(T.OPERATION.value, Operation.DECRYPT.value),
                        ttlv.enumeration(T.RESULT_STATUS.value, ResultStatus.SUCCESS.value),
                        ttlv.structure(
                            T.RESPONSE_PAYLOAD.value,
                            [ttlv.text(T.UNIQUE_IDENTIFIER.value, "k1"), ttlv.byte_string(T.DATA.value, b"plain")],
                        ),
                    ],
                ),
            ],
        )
    )


def test_client_ticket_attribute_applies_to_the_next_requests(pki_dir):
    """No ticket at first; once set, every request carries it; set to None, none does."""
    server = _RecordingServer(pki_dir)
    client = KmipClient(
        [f"127.0.0.1:{server.port}"],
        pki_dir / "alice.pem",
        pki_dir / "alice.key",
        pki_dir / "ca.pem",
        server_name="localhost",
    )
    try:
        assert client.ticket is None
        assert client.decrypt("k1", b"c", iv=b"i" * 12, tag=b"t" * 16) == b"plain"
        client.ticket = TOKEN
        client.decrypt("k1", b"c", iv=b"i" * 12, tag=b"t" * 16)
        client.ticket = None
        client.decrypt("k1", b"c", iv=b"i" * 12, tag=b"t" * 16)
    finally:
        client.close()
        server.close()
    assert len(server.requests) == 3
    assert _credentials(server.requests[0]) == []
    sent = _credentials(server.requests[1])
    assert len(sent) == 1 and _ticket_of(sent[0]) == (TicketType.LOGIN.value, TOKEN)
    assert _credentials(server.requests[2]) == []
    assert TOKEN not in repr(client).encode()


def test_client_ticket_keyword(pki_dir):
    server = _RecordingServer(pki_dir)
    client = KmipClient(
        [f"127.0.0.1:{server.port}"],
        pki_dir / "alice.pem",
        pki_dir / "alice.key",
        pki_dir / "ca.pem",
        server_name="localhost",
        version=(2, 0),
        ticket=TOKEN,
    )
    try:
        client.decrypt("k1", b"c", iv=b"i" * 12, tag=b"t" * 16)
    finally:
        client.close()
        server.close()
    sent = _credentials(server.requests[0])
    assert len(sent) == 1 and _ticket_of(sent[0]) == (TicketType.LOGIN.value, TOKEN)
