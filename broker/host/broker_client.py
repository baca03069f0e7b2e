"""The host's two ways to the broker, both with its host certificate.

- The KMIP/TLS gateway: Decrypt of the wrapped DEK from the VM's key safe
  (`unwrap`). The DEK comes back as bytes and is only returned, never kept.
- The management API over HTTPS: the last `.nvram` generation the broker saw
  for a VM (`nvram_generation`) and the new one after a power-off
  (`report_generation`), the rollback protection of docs/nvram-format.md.

A refused unwrap is explained: the gateway's answer (ITEM_NOT_FOUND or
PERMISSION_DENIED) cannot say whether the host is unknown, the VM is placed
elsewhere or the instance was revoked, but the API's answer to the same host
for the same VM can, so it is asked as well.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from typing import Protocol

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


class BrokerClient:
    def __init__(self, config: HostConfig):
        config.require_certificate()
        self.config = config
        self._context: ssl.SSLContext | None = None

    # The gateway ---------------------------------------------------------------------------

    def unwrap(self, key_safe: KeySafe, vm_uuid: str, vm_name: str) -> bytes:
        """The VM's DEK, unwrapped by the broker's gateway (KMIP Decrypt, AES-256-GCM)."""
        from kmip.core.enums import ResultReason

        from kms_server.client import KmipClient, KmipError

        cfg = self.config
        try:
            client = KmipClient(
                list(cfg.gateway),
                cfg.cert,
                cfg.key,
                cfg.ca,
                connect_timeout=min(cfg.timeout, 10.0),
                request_timeout=cfg.timeout,
            )
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise HostError(f"cannot load the host certificate, key or CA in {cfg.state_dir} ({exc})") from None
        try:
            with client:
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

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        cfg = self.config
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=self._ssl_context())
        )
        request = urllib.request.Request(
            cfg.api + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Accept": "application/json"},
            method=method,
        )
        try:
            with opener.open(request, timeout=cfg.timeout) as response:
                data = response.read(MAX_RESPONSE + 1)
        except urllib.error.HTTPError as exc:
            detail = _error_text(exc.read(MAX_RESPONSE + 1))
            if exc.code in (401, 403, 404):
                raise BrokerRefused(f"the broker refused {method} {path} (HTTP {exc.code}): {detail}") from None
            if exc.code == 409:
                raise RollbackRefused(f"the broker refused the .nvram generation (HTTP 409): {detail}") from None
            raise HostError(f"the broker answered {method} {path} with HTTP {exc.code}: {detail}") from None
        except urllib.error.URLError as exc:
            raise BrokerUnavailable(
                f"cannot reach the broker's API at {cfg.api} ({exc.reason}); check that vtpm-broker runs "
                "and the api URL in config.toml"
            ) from None
        except (TimeoutError, OSError) as exc:
            raise BrokerUnavailable(f"no answer from the broker's API at {cfg.api} ({exc})") from None
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if len(data) > MAX_RESPONSE or not isinstance(answer, dict):
            raise HostError(f"the broker's answer to {method} {path} is not a JSON object")
        return answer


def _generation(answer: dict) -> int:
    value = answer.get("generation")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HostError("the broker's answer holds no generation; is it a broker with rollback protection?")
    return value


def _error_text(body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        error = None
    text = error if isinstance(error, str) else body[:200].decode("utf-8", "replace")
    return " ".join(text.split()) or "(no detail)"
