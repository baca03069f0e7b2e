"""One TLS connection to one KMIP node: connect, send a request, read one
TTLV-framed response.

Failures are sorted by one question the failover policy needs answered:
could the node have received the whole request?

- `ConnectFailed`: no. Connecting, the TLS handshake, or writing the request
  failed (a request only partly written cannot be decoded, let alone
  executed), or the node refused our certificate with a TLS alert.
- `ResponseFailed`: maybe. The request was written in full and no complete,
  well-formed response came back (dropped connection, reset, timeout,
  oversized or undecodable reply).
"""

from __future__ import annotations

import select
import socket
import ssl
import time
from dataclasses import dataclass

from kmip_core import ttlv

DEFAULT_PORT = 5696
# A response larger than this is refused rather than buffered.
DEFAULT_MAX_RESPONSE_SIZE = 64 * 1024 * 1024


@dataclass(frozen=True)
class Node:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_node(node: str | tuple[str, int]) -> Node:
    """ "host:port", "[v6addr]:port", a bare host (port 5696) or (host, port)."""
    if isinstance(node, tuple):
        return Node(str(node[0]), int(node[1]))
    text = node.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host:
        raise ValueError(f"node {node!r} has no host")
    try:
        number = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise ValueError(f"node {node!r}: port {port!r} is not a number") from None
    if not 0 < number < 65536:
        raise ValueError(f"node {node!r}: port {number} is out of range")
    return Node(host, number)


def client_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.2 or newer, our certificate offered, the server's verified
    against `ca` with hostname checking."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(ca))
    context.load_cert_chain(str(cert), str(key))
    return context


class ConnectFailed(Exception):
    """The node did not receive the request."""


class ResponseFailed(Exception):
    """The request was sent in full; no usable response came back."""


def _describe(exc: BaseException) -> str:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return f"TLS error {exc.reason}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _is_tls_alert(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", None) or ""
    return isinstance(exc, ssl.SSLError) and "ALERT" in reason.upper()


class Connection:
    """A connected, verified TLS socket to `node`. Not thread-safe: the
    client serializes its use."""

    def __init__(self, sock: ssl.SSLSocket, node: Node, max_response_size: int):
        self._sock = sock
        self.node = node
        self.max_response_size = max_response_size
        self.exchanges = 0  # Responses read on this connection.

    @classmethod
    def open(
        cls,
        node: Node,
        context: ssl.SSLContext,
        server_name: str | None,
        timeout: float,
        max_response_size: int = DEFAULT_MAX_RESPONSE_SIZE,
    ) -> Connection:
        """Connect and complete the handshake within `timeout` seconds in
        all; raises `ConnectFailed`."""
        deadline = time.monotonic() + timeout
        try:
            raw = socket.create_connection((node.host, node.port), timeout=timeout)
        except OSError as exc:
            raise ConnectFailed(_describe(exc)) from None
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.settimeout(max(deadline - time.monotonic(), 0.001))
            sock = context.wrap_socket(raw, server_hostname=server_name or node.host)
        except (OSError, ValueError) as exc:
            raw.close()
            raise ConnectFailed(_describe(exc)) from None
        return cls(sock, node, max_response_size)

    def usable(self) -> bool:
        """False when an idle connection was closed by the node (idle
        timeout, restart) or holds bytes nobody asked for. TLS 1.3 session
        tickets make the socket readable without application data, so a
        readable socket is read, without blocking, to tell them apart."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if not readable and not self._sock.pending():
            return True
        try:
            self._sock.setblocking(False)
            self._sock.recv(1)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return True
        except OSError:
            return False
        # End of stream, or bytes no request asked for: unusable either way.
        return False

    def exchange(self, request: bytes, timeout: float) -> bytes:
        """Send one encoded request and read one response message, both
        within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        try:
            self._sock.settimeout(timeout)
            self._sock.sendall(request)
        except (OSError, ValueError) as exc:
            raise ConnectFailed(f"sending failed: {_describe(exc)}") from None
        try:
            header = self._read(ttlv.HEADER_SIZE, deadline)
            length = int.from_bytes(header[4:8], "big")
            if ttlv.HEADER_SIZE + length > self.max_response_size:
                raise ResponseFailed(f"response of {length} bytes exceeds the {self.max_response_size}-byte limit")
            body = self._read(length, deadline)
        except (OSError, ValueError) as exc:
            if self.exchanges == 0 and _is_tls_alert(exc):
                # The node rejected the handshake (TLS 1.3 reports that after
                # the client's side of the handshake has finished).
                raise ConnectFailed(_describe(exc)) from None
            raise ResponseFailed(_describe(exc)) from None
        self.exchanges += 1
        return header + body

    def _read(self, n: int, deadline: float) -> bytes:
        chunks = bytearray()
        while len(chunks) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ResponseFailed("timed out waiting for the response")
            self._sock.settimeout(remaining)
            chunk = self._sock.recv(min(n - len(chunks), 1 << 20))
            if not chunk:
                raise ResponseFailed("connection closed before the response" if not chunks else "response truncated")
            chunks += chunk
        return bytes(chunks)

    def close(self) -> None:
        try:
            self._sock.close()
        except OSError:
            pass
