"""The broker's management API over HTTPS + JSON, with the standard library.

One `BrokerClient` per management instance. It verifies the broker against
the CA the operator gave at `init` and, once enrolled, presents the
instance's certificate. Connections are kept alive, one per thread, so a
`vm register` of a whole datastore does not pay a TLS handshake per VM.

Every failure is a `BrokerError` with one line that names the problem and,
where there is one, the fix.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

__all__ = ["BrokerClient", "BrokerError", "BrokerRefused", "parse_broker_url"]

MAX_ANSWER = 4 * 1024 * 1024
DEFAULT_TIMEOUT = 60.0


class BrokerError(Exception):
    """The broker could not be reached or did not answer sensibly."""


class BrokerRefused(BrokerError):
    """The broker answered with an HTTP error; `status` and its one-line `error`."""

    def __init__(self, status: int, error: str, method: str, path: str):
        self.status = status
        self.error = error
        super().__init__(f"the broker refused {method} {path}: {error} (HTTP {status})")


@dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}"


def parse_broker_url(text: str) -> BrokerUrl:
    """`https://HOST:PORT` (a path, query or credentials are refused)."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise BrokerError(f"broker URL {text!r} is not a URL; give https://HOST:PORT") from None
    if parts.scheme != "https" or not parts.hostname:
        raise BrokerError(f"broker URL {text!r} must be https://HOST:PORT")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise BrokerError(f"broker URL {text!r} must be just https://HOST:PORT, without a path")
    return BrokerUrl(parts.hostname, port or 443)


class BrokerClient:
    """Blocking JSON calls to one broker; safe to share between threads."""

    def __init__(
        self,
        url: str | BrokerUrl,
        ca: Path,
        cert: Path | None = None,
        key: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.url = url if isinstance(url, BrokerUrl) else parse_broker_url(url)
        self.ca = Path(ca)
        self.timeout = timeout
        self._context = _context(self.ca, cert, key)
        self._local = threading.local()

    # The API ------------------------------------------------------------------------

    def enroll(self, instance: str, token: str, csr_pem: str) -> dict:
        return self.call("POST", "/v1/enroll", {"instance": instance, "token": token, "csr_pem": csr_pem})

    def poll_enrollment(self, enrollment_id: str, poll_secret: str) -> dict:
        return self.call(
            "GET",
            f"/v1/enrollments/{quote(enrollment_id, safe='')}",
            headers={"Authorization": f"Bearer {poll_secret}"},
        )

    def add_host(self, name: str, csr_pem: str) -> dict:
        return self.call("POST", "/v1/hosts", {"name": name, "csr_pem": csr_pem})

    def create_vm(self, vm_uuid: str, name: str, host: str | None = None) -> dict:
        body = {"vm_uuid": vm_uuid, "name": name}
        if host is not None:
            body["host"] = host
        return self.call("POST", "/v1/vms", body)

    def register_vm(self, vm_uuid: str, name: str, key_safe: str) -> dict:
        return self.call("POST", "/v1/vms/register", {"vm_uuid": vm_uuid, "name": name, "key_safe": key_safe})

    def place_vm(self, vm_uuid: str, host: str) -> dict:
        return self.call("PUT", f"/v1/vms/{quote(vm_uuid, safe='')}/host", {"host": host})

    def remove_host(self, name: str) -> None:
        self.call("DELETE", f"/v1/hosts/{quote(name, safe='')}")

    def remove_vm(self, vm_uuid: str) -> None:
        self.call("DELETE", f"/v1/vms/{quote(vm_uuid, safe='')}")

    def release_vm(self, vm_uuid: str, to: str) -> dict:
        """Cold migration: hand this instance's VM over to the trusted instance `to`."""
        return self.call("POST", f"/v1/vms/{quote(vm_uuid, safe='')}/release", {"to": to})

    def transfer_vm(self, vm_uuid: str, to: str) -> dict:
        """An administrator's release of any VM to the trusted instance `to`."""
        return self.call("POST", f"/v1/vms/{quote(vm_uuid, safe='')}/transfer", {"to": to})

    def rekey_vm(self, vm_uuid: str, kind: str, key_safe: str) -> dict:
        """Begin (or resume) a rotation of the VM whose .vmx holds `key_safe`."""
        return self.call("POST", f"/v1/vms/{quote(vm_uuid, safe='')}/rekey", {"kind": kind, "key_safe": key_safe})

    def commit_rekey(self, vm_uuid: str, key_safe: str) -> dict:
        """The switched .vmx's key safe becomes the VM's; the broker retires the old KEK."""
        return self.call("POST", f"/v1/vms/{quote(vm_uuid, safe='')}/rekey/commit", {"key_safe": key_safe})

    def abort_rekey(self, vm_uuid: str) -> dict:
        return self.call("POST", f"/v1/vms/{quote(vm_uuid, safe='')}/rekey/abort", {})

    def list_vms(self) -> list[dict]:
        answer = self.call("GET", "/v1/vms")
        vms = answer.get("vms") if isinstance(answer, dict) else None
        if not isinstance(vms, list):
            raise BrokerError("the broker's VM list is not {'vms': [...]}")
        return vms

    # The wire -----------------------------------------------------------------------

    def call(self, method: str, path: str, body: dict | None = None, headers: dict[str, str] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        send_headers = {"Accept": "application/json", **(headers or {})}
        if data is not None:
            send_headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            conn, reused = self._connection()
            try:
                conn.request(method, path, body=data, headers=send_headers)
                response = conn.getresponse()
                raw = response.read(MAX_ANSWER + 1)
                status = response.status
                if response.will_close:
                    self._drop()
                break
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self._drop()
                # A kept-alive connection the broker closed meanwhile: the
                # request never reached it, so one retry on a fresh one is safe.
                if reused and attempt == 1:
                    continue
                raise BrokerError(f"the broker at {self.url} closed the connection ({type(exc).__name__})") from None
            except ssl.SSLCertVerificationError as exc:
                self._drop()
                raise BrokerError(
                    f"the broker at {self.url} has a certificate that {self.ca} does not verify "
                    f"({exc.verify_message}); check --ca (the broker's trust-ca.pem)"
                ) from None
            except ssl.SSLError as exc:
                self._drop()
                reason = exc.reason or str(exc)
                raise BrokerError(f"TLS with the broker at {self.url} failed ({reason})") from None
            except ConnectionRefusedError:
                self._drop()
                raise BrokerError(
                    f"cannot reach the broker at {self.url} (connection refused); is vtpm-broker running?"
                ) from None
            except TimeoutError:
                self._drop()
                raise BrokerError(f"the broker at {self.url} did not answer within {self.timeout:g} s") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop()
                text = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
                raise BrokerError(f"cannot talk to the broker at {self.url} ({text})") from None
        if len(raw) > MAX_ANSWER:
            raise BrokerError(f"the broker's answer to {method} {path} is larger than {MAX_ANSWER} bytes")
        answer: Any = None
        if raw:
            try:
                answer = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise BrokerError(f"the broker's answer to {method} {path} is not JSON (HTTP {status})") from None
        if status >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            text = str(error).splitlines()[0] if error else "no reason given"
            raise BrokerRefused(status, text, method, path)
        return answer

    def close(self) -> None:
        self._drop()

    def _connection(self) -> tuple[http.client.HTTPSConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        conn = http.client.HTTPSConnection(self.url.host, self.url.port, timeout=self.timeout, context=self._context)
        self._local.conn = conn
        return conn, False

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass


def _context(ca: Path, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    except FileNotFoundError:
        raise BrokerError(f"the broker CA {ca} does not exist; check the path") from None
    except (ssl.SSLError, OSError) as exc:
        raise BrokerError(
            f"the broker CA {ca} is not a PEM certificate ({getattr(exc, 'reason', None) or exc})"
        ) from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert is not None:
        try:
            context.load_cert_chain(str(cert), str(key) if key else None)
        except FileNotFoundError as exc:
            raise BrokerError(f"{exc.filename or cert}: no such file; is this instance enrolled?") from None
        except (ssl.SSLError, OSError) as exc:
            raise BrokerError(
                f"the instance certificate {cert} does not match its key or does not parse "
                f"({getattr(exc, 'reason', None) or exc})"
            ) from None
    return context
