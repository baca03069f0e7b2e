"""The host's two ways to the broker, both with its host certificate.

- The KMIP/TLS gateway: Decrypt of the wrapped DEK from the VM's key safe
  (`unwrap`). The DEK comes back as bytes and is only returned, never kept.
- The management API over HTTPS: the last `.nvram` generation the broker saw
  for a VM (`nvram_generation`) and the new one after a power-off
  (`report_generation`), the rollback protection of docs/nvram-format.md;
  and a new vTPM's EK certificates (`ek_certificate`, for the certificate
  tool through `broker.host.ek_relay`).

Host attestation (issue 18; broker/host/attest.py): when config.toml has an
[attestation] table, `unwrap` presents the broker's attestation token with
each Decrypt, as a KMIP Ticket credential, attesting first when no valid
token is cached. A gateway that answers ATTESTATION_REQUIRED or
ATTESTATION_FAILED (token expired, host rebooted since, policy changed) gets
one fresh attestation and the Decrypt once more; a second refusal is a
`BrokerRefused`. The four attestation calls of the API are here too.

A refused unwrap is explained: the gateway's answer (ITEM_NOT_FOUND or
PERMISSION_DENIED) cannot say whether the host is unknown, the VM is placed
elsewhere or the instance was revoked, but the API's answer to the same host
for the same VM can, so it is asked as well.
"""

from __future__ import annotations

import base64
import binascii
import http.client
import json
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from broker.ek_certtool import API_PATH, error_text
from broker.host.attest import (
    Attestation,
    AttestingTpm,
    Challenge,
    TokenCache,
    open_host_tpm,
)
from broker.host.attest import attest as run_attestation
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
    """The host's client of the broker. `tpm` and `clock` replace the host
    TPM named by config.toml's [attestation] and the host's clock (tests)."""

    def __init__(
        self, config: HostConfig, tpm: AttestingTpm | None = None, clock: Callable[[], float] = time.time
    ) -> None:
        config.require_certificate()
        self.config = config
        self._context: ssl.SSLContext | None = None
        self._kmip: Any = None
        self._https: http.client.HTTPSConnection | None = None
        self._api_prefix = ""
        self._tpm = tpm
        self._clock = clock
        self.tokens = TokenCache(
            config.attestation_dir if self.attests else None, binding=f"{config.name}@{config.api}", clock=clock
        )

    # Host attestation ---------------------------------------------------------------------------

    @property
    def attests(self) -> bool:
        """Whether this host attests with its TPM ([attestation] in config.toml)."""
        return self.config.attestation_tcti is not None or self._tpm is not None

    def host_tpm(self) -> AttestingTpm:
        if self._tpm is None:
            tcti = self.config.attestation_tcti
            if tcti is None:
                raise HostError(
                    f"host {self.config.name} has no host TPM configured; run "
                    f"'vtpm-host --state-dir {self.config.state_dir} init ... --tpm TCTI' "
                    "(e.g. --tpm device:/dev/tpmrm0) to add [attestation] to config.toml"
                )
            self._tpm = open_host_tpm(tcti, self.config.attestation_dir)
        return self._tpm

    def attest(self) -> Attestation:
        """Attest now (challenge, quote, verdict) and keep the token for the next unwraps.
        Refused, the host keeps no token: the last verdict is the broker's refusal."""
        with self.tokens.exclusive():
            return self._attest_now()

    def _attest_now(self) -> Attestation:
        try:
            attestation = run_attestation(self, self.host_tpm())
        except BrokerRefused:
            self.tokens.drop()
            raise
        self.tokens.put(attestation)
        return attestation

    def _attestation(self) -> Attestation:
        """A usable token (cached, else a fresh attestation). One process of
        the host attests at a time; one that waited uses what the other got."""
        cached = self.tokens.get()
        if cached is not None:
            return cached
        with self.tokens.exclusive():
            return self.tokens.get() or self._attest_now()

    # The gateway ---------------------------------------------------------------------------

    def unwrap(self, key_safe: KeySafe, vm_uuid: str, vm_name: str) -> bytes:
        """The VM's DEK, unwrapped by the broker's gateway (KMIP Decrypt, AES-256-GCM).

        A host that attests presents its token; refused for its attestation,
        it attests once more and asks once more."""
        from kmip.core.enums import ResultReason

        from kmip_core.client import KmipClient, KmipError

        cfg = self.config
        client = self._gateway_client(KmipClient)
        attestation_refusals = (ResultReason.ATTESTATION_REQUIRED, ResultReason.ATTESTATION_FAILED)
        fresh = False
        while True:
            if self.attests:
                attestation = self._attestation() if not fresh else self.attest()
                client.ticket = attestation.token.encode() if attestation.token is not None else None
            try:
                dek = client.decrypt(
                    key_safe.kms_key_id, key_safe.wrapped_dek, iv=key_safe.iv, tag=key_safe.tag, mode="GCM"
                )
                break
            except KmipError as exc:
                if exc.reason not in attestation_refusals:
                    raise self._unwrap_refused(exc, vm_uuid, vm_name) from None
                detail = " ".join(exc.message.split()) or exc.reason.name
                if not self.attests:
                    raise BrokerRefused(
                        f"the broker requires host {cfg.name} to attest with its TPM before unwrapping VM {vm_name} "
                        f"({detail}); add the host TPM with 'vtpm-host init ... --tpm TCTI', then run "
                        "'vtpm-host attest ek-pub' and 'vtpm-host attest enroll'"
                    ) from None
                self.tokens.drop()
                if fresh:
                    raise BrokerRefused(f"the broker refused this host's attestation: {detail}") from None
                fresh = True
        if len(dek) != 64:
            raise HostError(f"the broker's gateway returned a {len(dek) * 8}-bit key for VM {vm_name}, not 512 bits")
        return dek

    def _unwrap_refused(self, exc: Any, vm_uuid: str, vm_name: str) -> HostError:
        """The one-line error for a Decrypt the gateway did not answer with the DEK."""
        from kmip.core.enums import ResultReason

        cfg = self.config
        what = f"the broker refused to unwrap the DEK of VM {vm_name} ({vm_uuid})"
        if exc.reason in (ResultReason.ITEM_NOT_FOUND, ResultReason.PERMISSION_DENIED):
            return BrokerRefused(f"{what}: {self._why_refused(vm_uuid, vm_name, exc.reason.name)}")
        if exc.reason == ResultReason.CRYPTOGRAPHIC_FAILURE:
            return HostError(
                f"the key safe of VM {vm_name} does not unwrap (its wrapped DEK or tag was altered); "
                "restore the .vmx from a backup"
            )
        if exc.reason is None:
            return BrokerUnavailable(
                f"cannot reach the broker's gateway at {', '.join(cfg.gateway)} ({exc.message}); "
                "check that vtpm-broker runs and the gateway address in config.toml"
            )
        return HostError(f"{what}: the gateway answered {exc}")

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
                # Every call is safe to repeat: GETs, a PUT of the same
                # generation, which the broker accepts again, and the
                # attestation POSTs (a quote seen twice is refused the second
                # time: its nonce is spent; an enrollment begins again).
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    # The attestation calls (docs/attestation.md) ---------------------------------------------

    def attestation_enroll(self, ek_public_pem: bytes, ak_public: bytes) -> tuple[bytes, bytes]:
        """POST /v1/attestation/enroll: the EK (PEM) and the AK (TPM2B_PUBLIC);
        returns the broker's credential (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET)."""
        answer = self._attestation_call(
            "/v1/attestation/enroll",
            {"ek_public_pem": ek_public_pem.decode("ascii"), "ak_public_b64": _b64(ak_public)},
            "enroll this host's TPM",
        )
        return _unb64(answer, "id_object_b64"), _unb64(answer, "encrypted_secret_b64")

    def attestation_activate(self, secret: bytes) -> str:
        """POST /v1/attestation/activate: the secret the TPM recovered; returns the AK's name (hex)."""
        answer = self._attestation_call(
            "/v1/attestation/activate", {"secret_b64": _b64(secret)}, "enroll this host's TPM"
        )
        name = answer.get("ak_name_hex")
        if answer.get("state") != "enrolled" or not isinstance(name, str) or not _is_hex(name):
            raise HostError("the broker's answer to the TPM enrollment does not say enrolled with an AK name")
        return name

    def attestation_challenge(self) -> Challenge:
        """POST /v1/attestation/challenge: a fresh nonce and the PCRs to quote."""
        answer = self._attestation_call("/v1/attestation/challenge", {}, "attest this host")
        bank, pcrs, expires_in = answer.get("pcr_bank"), answer.get("pcrs"), answer.get("expires_in", 60)
        if (
            not isinstance(bank, str)
            or not isinstance(pcrs, list)
            or not pcrs
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 32 for i in pcrs)
            or not isinstance(expires_in, int)
        ):
            raise HostError("the broker's attestation challenge is not a PCR bank and a list of PCR indices")
        nonce = _unb64(answer, "nonce_b64")
        if not 8 <= len(nonce) <= 64:
            raise HostError(f"the broker's attestation nonce is {len(nonce)} bytes, not 8 to 64")
        return Challenge(nonce, bank, tuple(pcrs), expires_in)

    def attestation_quote(
        self, nonce: bytes, attest: bytes, signature: bytes, pcr_values: Mapping[int, bytes]
    ) -> Attestation:
        """POST /v1/attestation/quote: the TPM's quote over the challenge; the broker's verdict.
        The token's expiry is taken on this host's clock from `expires_in`."""
        now = self._clock()
        answer = self._attestation_call(
            "/v1/attestation/quote",
            {
                "nonce_b64": _b64(nonce),
                "quote_b64": _b64(attest),
                "signature_b64": _b64(signature),
                "pcr_values": {str(index): value.hex() for index, value in sorted(pcr_values.items())},
            },
            "attest this host",
        )
        token, policy = answer.get("token"), answer.get("policy")
        expires_in, expires_at = answer.get("expires_in"), answer.get("expires_at")
        if token is None:
            return Attestation(None, None, policy if isinstance(policy, str) else None)
        if not isinstance(token, str) or not token or not (policy is None or isinstance(policy, str)):
            raise HostError("the broker's attestation answer holds no token")
        if isinstance(expires_in, int | float) and not isinstance(expires_in, bool) and expires_in > 0:
            expiry = now + float(expires_in)
        elif isinstance(expires_at, int | float) and not isinstance(expires_at, bool):
            expiry = float(expires_at)
        else:
            raise HostError("the broker's attestation answer gives the token no expiry")
        return Attestation(token, expiry, policy)

    def _attestation_call(self, path: str, body: dict, what: str) -> dict:
        """POST to an attestation route; a refusal is one line naming what was refused and why
        (the broker's reason says what to do)."""
        status, data = self._request("POST", path, body)
        if status >= 400:
            detail = error_text(data)
            if status == 404 and detail.startswith("no such endpoint"):
                raise BrokerRefused(
                    f"the broker at {self.config.api} has no host attestation (HTTP 404 on {path}); "
                    "upgrade it, or remove [attestation] from config.toml"
                )
            if status in (400, 401, 403, 404, 409):
                if what == "attest this host":
                    raise BrokerRefused(f"the broker refused this host's attestation: {detail}")
                raise BrokerRefused(f"the broker refused to {what} (HTTP {status}): {detail}")
            raise HostError(f"the broker answered POST {path} with HTTP {status}: {detail}")
        return self._object("POST", path, data)

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        status, data = self._request(method, path, body)
        if status >= 400:
            detail = error_text(data)
            if status in (401, 403, 404):
                raise BrokerRefused(f"the broker refused {method} {path} (HTTP {status}): {detail}")
            if status == 409:
                raise RollbackRefused(f"the broker refused the .nvram generation (HTTP 409): {detail}")
            raise HostError(f"the broker answered {method} {path} with HTTP {status}: {detail}")
        return self._object(method, path, data)

    @staticmethod
    def _object(method: str, path: str, data: bytes) -> dict:
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if len(data) > MAX_RESPONSE or not isinstance(answer, dict):
            raise HostError(f"the broker's answer to {method} {path} is not a JSON object")
        return answer

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
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
        return status, data

    def _drop_connection(self) -> None:
        if self._https is not None:
            self._https.close()
            self._https = None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(answer: dict, field: str) -> bytes:
    value = answer.get(field)
    try:
        if not isinstance(value, str) or not value:
            raise ValueError(field)
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error):
        raise HostError(f"the broker's answer holds no base64 {field}") from None


def _is_hex(text: str) -> bool:
    try:
        bytes.fromhex(text)
    except ValueError:
        return False
    return bool(text)


def _generation(answer: dict) -> int:
    value = answer.get("generation")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise HostError("the broker's answer holds no generation; is it a broker with rollback protection?")
    return value
