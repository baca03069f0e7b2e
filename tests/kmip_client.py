"""A minimal raw KMIP/TLS client for tests: sends TTLV bytes and reads one
response, so tests can replay captured traffic and malformed input exactly.
(PyKMIP's client is the independent peer for everything else.)"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from kmip_core import ttlv


def tls_context(pki: Path, client: str | None = "alice") -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(pki / "ca.pem"))
    if client:
        ctx.load_cert_chain(str(pki / f"{client}.pem"), str(pki / f"{client}.key"))
    return ctx


class RawClient:
    def __init__(self, host: str, port: int, pki: Path, client: str | None = "alice", timeout: float = 15.0):
        raw = socket.create_connection((host, port), timeout=timeout)
        self.sock = tls_context(pki, client).wrap_socket(raw, server_hostname="localhost")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_message(self) -> bytes | None:
        header = self._recv_exact(8)
        if header is None:
            return None
        length = int.from_bytes(header[4:8], "big")
        body = self._recv_exact(length)
        if body is None:
            return None
        return header + body

    def request(self, data: bytes) -> ttlv.Item | None:
        self.send(data)
        response = self.recv_message()
        return None if response is None else ttlv.decode(response)

    def _recv_exact(self, n: int) -> bytes | None:
        chunks = b""
        while len(chunks) < n:
            try:
                chunk = self.sock.recv(n - len(chunks))
            except (ConnectionError, ssl.SSLError):
                return None
            if not chunk:
                return None
            chunks += chunk
        return chunks

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def pykmip(server, pki: Path, name: str = "alice", version=None):
    """PyKMIP's ProxyKmipClient, opened, for `server` (anything with host
    and port) as client `name` of the test PKI; KMIP 1.4 unless `version`
    (a kmip.core.enums.KMIPVersion) says otherwise."""
    from kmip.core import enums
    from kmip.pie.client import ProxyKmipClient

    client = ProxyKmipClient(
        hostname=server.host,
        port=server.port,
        cert=str(pki / f"{name}.pem"),
        key=str(pki / f"{name}.key"),
        ca=str(pki / "ca.pem"),
        kmip_version=version or enums.KMIPVersion.KMIP_1_4,
    )
    client.open()
    return client
