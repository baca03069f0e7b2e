"""The host's two ways to the broker, both with its host certificate.

- The KMIP/TLS gateway: Decrypt of the wrapped DEK from the VM's key safe
  (`unwrap`). The DEK comes back as bytes and is only returned, never kept.
- The management API over HTTPS: the last `.nvram` generation the broker saw
  for a VM (`nvram_generation`) and the new one after a power-off
  (`report_generation`), the rollback protection of docs/nvram-format.md;
  and a new vTPM's EK certificates (`ek_certificate`, for the certificate
  tool through `broker.host.ek_relay`).

A refused unwrap is explained: the gateway's answer (ITEM_NOT_FOUND or
PERMISSION_DENIED) cannot say whether the host is unknown, the VM is placed
elsewhere or the instance was revoked, but the API's answer to the same host
for the same VM can, so it is asked as well.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.parse
from typing import Protocol

from broker.ek_certtool import API_PATH, error_text
from broker.host.config import HostConfig
from broker.host.errors import BrokerRefused, BrokerUnavailable, HostError, RollbackRefused
from broker.keysafe import KeySafe

__all__ = ["Broker", "BrokerClient"]

MAX_RESPONSE = 64 * 1024


class Broker(Protocol):
    """What the agent needs from the broker (a fake in unit tests)."""

    def unwrap(self, key_safe: KeySafe, vm_uuid: str, vm_name: str) -> bytes: ...

    def nvram_generation(self, vm_uuid: str) -> int: ...

    def report_generation(self, vm_uuid: str, generation: int) -> int: ...

    def ek_certificate(self, request: dict) -> dict: ...

    def ek_certificates(self, vm_uuid: str) -> list[dict]: ...

    def commit_rekey(self, vm_uuid: str, key_safe: str) -> dict: ...


class BrokerClient:
    def __init__(self, config: HostConfig):
        config.require_certificate()
        self.config = config
        self._context: ssl.SSLContext | None = None
        self._kmip = None
        self._https: http.client.HTTPSConnection | None = None
        self._api_prefix = ""

    # The gateway ---------------------------------------------------------------------------

    def unwrap(self, key_safe: KeySafe, vm_uuid: str, vm_name: str) -> bytes:
        """The VM's DEK, unwrapped by the broker's gateway (KMIP Decrypt, AES-256-GCM)."""
        from kmip.core.enums import ResultReason

        from kmip_core.client import KmipClient, KmipError

        cfg = self.config
        client = self._gateway_client(KmipClient)
        try:
            dek = client.decrypt(
                key_safe.kms_key_id, key_safe.wrapped_dek, iv=key_safe.iv, tag=key_safe.tag, mode="GCM"
            )
        except KmipError as exc:
            what = f"the broker refused to unwrap the DEK of VM {vm_name} ({vm_uuid})"
            if exc.reason in (ResultReason.ITEM_NOT_FOUND, ResultReason.PERMISSION_DENIED):
                raise BrokerRefused(f"{what}: {self._why_refused(vm_uuid, vm_name, exc.reason.name)}") from None
            if exc.reason == ResultReason.CRYPTOGRAPHIC_FAILURE:
                raise HostError(
                    f"the key safe of VM {vm_name} does not unwrap (its wrapped DEK or tag was altered); "
                    "restore the .vmx from a backup"
                ) from None
            if exc.reason is None:
                raise BrokerUnavailable(
                    f"cannot reach the broker's gateway at {', '.join(cfg.gateway)} ({exc.message}); "
                    "check that vtpm-broker runs and the gateway address in config.toml"
                ) from None
            raise HostError(f"{what}: the gateway answered {exc}") from None
        if len(dek) != 64:
            raise HostError(f"the broker's gateway returned a {len(dek) * 8}-bit key for VM {vm_name}, not 512 bits")
        return dek

    def _gateway_client(self, client_class):
        """One KMIP/TLS connection to the gateway, kept for the life of this
        client: a host agent that powers on many VMs pays for the mutual-TLS
        handshake once. The KMIP client reconnects by itself if the gateway
        closed it."""
        if self._kmip is None:
            cfg = self.config
            try:
                self._kmip = client_class(
                    list(cfg.gateway),
                    cfg.cert,
                    cfg.key,
                    cfg.ca,
                    connect_timeout=min(cfg.timeout, 10.0),
                    request_timeout=cfg.timeout,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise HostError(f"cannot load the host certificate, key or CA in {cfg.state_dir} ({exc})") from None
        return self._kmip

    def close(self) -> None:
        if self._kmip is not None:
            self._kmip.close()
            self._kmip = None
        self._drop_connection()

    def _why_refused(self, vm_uuid: str, vm_name: str, reason: str) -> str:
        """Ask the API, as the same host, why: its refusals name the cause."""
        host = self.config.name
        try:
            self.nvram_generation(vm_uuid)
        except BrokerRefused as exc:
            text = str(exc)
            if "not trusted" in text:
                return (
                    f"the broker no longer accepts host {host}'s certificate (the host was removed or registered "
                    "again, or its management instance was revoked); have a trusted instance register the host "
                    "(POST /v1/hosts) and run 'vtpm-host install-cert' with the new certificate"
                )
            if "not placed" in text:
                return (
                    f"VM {vm_name} is not placed on host {host}; place it here from its management instance "
                    f"(PUT /v1/vms/{vm_uuid}/host) and power on again"
                )
            if "no VM" in text:
                return (
                    f"VM {vm_uuid} is not a VM of host {host}'s management instance (not registered, or another "
                    f"instance's VM); register it (POST /v1/vms/register) and place it on host {host}"
                )
        except HostError:
            pass
        return f"the gateway answered {reason}; check that VM {vm_name} is registered and placed on host {host}"

    # The management API ---------------------------------------------------------------------

    def nvram_generation(self, vm_uuid: str) -> int:
        answer = self._call("GET", f"/v1/vms/{vm_uuid}/nvram-generation")
        return _generation(answer)

    def report_generation(self, vm_uuid: str, generation: int) -> int:
        answer = self._call("PUT", f"/v1/vms/{vm_uuid}/nvram-generation", {"generation": generation})
        return _generation(answer)

    def ek_certificate(self, request: dict) -> dict:
        """An EK certificate from the broker's EK CA (POST /v1/vtpm/ek-certificates,
        `broker.vtpm_ca` request fields), for swtpm_setup's certificate tool
        through the agent's relay. Returns the API's answer; the relay checks it."""
        return self._call("POST", API_PATH, request)

    def commit_rekey(self, vm_uuid: str, key_safe: str) -> dict:
        """After a deep rekey's re-seal and the .vmx switch (or on finding a
        switched .vmx): the broker unwraps through the new key safe, makes
        it the VM's and retires the old KEK (POST .../rekey/resealed)."""
        try:
            return self._call("POST", f"/v1/vms/{vm_uuid}/rekey/resealed", {"key_safe": key_safe})
        except RollbackRefused as exc:  # _call's wording for a 409 is the generation's.
            detail = str(exc).split(": ", 1)[-1]
            raise BrokerRefused(f"the broker refused to finish the rekey (HTTP 409): {detail}") from None

    def ek_certificates(self, vm_uuid: str) -> list[dict]:
        """The newest EK certificate of each kind the broker issued for the
        VM, each with its CA chain (GET /v1/vms/{uuid}/ek-certificates), for
        `vtpm-host install-ek-certs`. Checked by the caller before NV sees them."""
        answer = self._call("GET", f"/v1/vms/{vm_uuid}/ek-certificates")
        certificates = answer.get("certificates")
        if not isinstance(certificates, list) or not all(isinstance(c, dict) for c in certificates):
            raise HostError("the broker's answer holds no EK certificate list; is it a broker with install-ek-certs?")
        return certificates

    def _ssl_context(self) -> ssl.SSLContext:
        if self._context is None:
            cfg = self.config
            try:
                context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cfg.ca))
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.load_cert_chain(str(cfg.cert), str(cfg.key))
            except (OSError, ssl.SSLError) as exc:
                raise HostError(f"cannot load the host certificate, key or CA in {cfg.state_dir} ({exc})") from None
            self._context = context
        return self._context

    def _connection(self) -> http.client.HTTPSConnection:
        """One HTTPS connection to the management API, kept alive between
        calls (the broker speaks HTTP/1.1), like the gateway connection."""
        if self._https is None:
            url = urllib.parse.urlsplit(self.config.api)
            if url.scheme != "https" or not url.hostname:
                raise HostError(f"the api URL {self.config.api} in config.toml must be https://HOST:PORT")
            self._https = http.client.HTTPSConnection(
                url.hostname, url.port or 443, timeout=self.config.timeout, context=self._ssl_context()
            )
            self._api_prefix = url.path.rstrip("/")
        return self._https

    def _exchange(self, method: str, path: str, payload: bytes | None) -> tuple[int, bytes]:
        """Send one request, reconnecting once if the kept connection was
        closed by the broker while idle (the request was then not seen)."""
        for attempt in (1, 2):
            connection = self._connection()
            try:
                connection.request(
                    method,
                    self._api_prefix + path,
                    body=payload,
                    headers={"Content-Type": "application/json", "Accept": "application/json"},
                )
                response = connection.getresponse()
                return response.status, response.read(MAX_RESPONSE + 1)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                connection.close()
                self._https = None
                # Both calls are safe to repeat: GET, and a PUT of the same
                # generation, which the broker accepts again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        cfg = self.config
        payload = None if body is None else json.dumps(body).encode()
        try:
            status, data = self._exchange(method, path, payload)
        except ssl.SSLError as exc:
            self._drop_connection()
            raise BrokerUnavailable(
                f"cannot reach the broker's API at {cfg.api} ({exc}); check that vtpm-broker runs "
                "and the api URL in config.toml"
            ) from None
        except (TimeoutError, OSError, http.client.HTTPException) as exc:
            self._drop_connection()
            raise BrokerUnavailable(
                f"cannot reach the broker's API at {cfg.api} ({exc}); check that vtpm-broker runs "
                "and the api URL in config.toml"
            ) from None
        if status >= 400:
            detail = error_text(data)
            if status in (401, 403, 404):
                raise BrokerRefused(f"the broker refused {method} {path} (HTTP {status}): {detail}")
            if status == 409:
                raise RollbackRefused(f"the broker refused the .nvram generation (HTTP 409): {detail}")
            raise HostError(f"the broker answered {method} {path} with HTTP {status}: {detail}")
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if len(data) > MAX_RESPONSE or not isinstance(answer, dict):
            raise HostError(f"the broker's answer to {method} {path} is not a JSON object")
        return answer

    def _drop_connection(self) -> None:
        if self._https is not None:
            self._https.close()
            self._https = None


def _generation(answer: dict) -> int:
    value = answer.get("generation")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HostError("the broker's answer holds no generation; is it a broker with rollback protection?")
    return value
