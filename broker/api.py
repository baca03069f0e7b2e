"""The management API: HTTPS + JSON on Twisted Web (docs/broker-design.md,
"Management API").

TLS asks every client for a certificate but does not require one, because
enrollment (``POST /v1/enroll``, ``GET /v1/enrollments/{id}``) is how an
instance without a certificate gets one; every other route refuses a call
without a verified certificate that the registry knows (a trusted
instance's current certificate, a host of a trusted instance, or a user
issued with ``vtpm-broker admin issue-user``). Revocation therefore takes
effect on the next request, whatever TLS accepted.

Two layers, so the rules are testable without sockets:

- ``Api.dispatch(ApiRequest) -> ApiResponse``: routing, authentication,
  roles, JSON validation and the one table from failures to statuses. It
  blocks (database, KMS) and runs on a worker pool.
- ``ApiResource`` / ``make_site``: Twisted Web glue. The body limit is
  enforced while the body arrives (``LimitedRequest``), before buffering.

Errors are ``{"error": "<one line>"}``; a traceback never reaches a client
(an unexpected failure is logged with a request id that the answer names).
"""

from __future__ import annotations

import base64
import datetime as dt
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol
from urllib.parse import parse_qsl, unquote

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThreadPool
from twisted.web import http, resource, server
from zope.interface import implementer

from broker.config import BrokerConfig
from broker.db import DatabaseError, ek_certificates
from broker.keysafe import KeySafeError, format_key_safe, parse_key_safe
from broker.request_scope import current_request_id, new_request_id, refusal_recorded, request_scope
from broker.rotation import Rotation
from broker.trust import (
    Caller,
    Conflict,
    InvalidRequest,
    NotFound,
    Refused,
    Registry,
    TrustError,
    Unprocessable,
    check_host_name,
    check_instance_name,
    check_scope,
    check_vm_name,
    check_vm_uuid,
)
from broker.trust_ca import cert_pem
from broker.vmkeys import KmsUnavailable, VmKeys
from kmip_core import limits, tls
from kmip_core.config import TlsConfig

__all__ = [
    "Api",
    "ApiContextFactory",
    "ApiRequest",
    "ApiResponse",
    "ApiResource",
    "EkIssuer",
    "make_site",
]

log = logging.getLogger("broker.api")

# What each role may do beyond an instance's own hosts and VMs (README,
# docs/broker-design.md "Identities and roles"). inventory.manage: register
# and remove hosts, create, register and place VMs for a named trusted
# instance; no right here returns a DEK or decrypted state but dek.read.
ROLE_RIGHTS: dict[str, frozenset[str]] = {
    "security_admin": frozenset({"trust.manage", "audit.read", "vms.read_all", "attest.manage"}),
    "administrator": frozenset(
        {"inventory.manage", "vms.read_all", "dek.read", "vm.remove", "vm.transfer", "vm.rekey"}
    ),
    "no_crypto_administrator": frozenset({"inventory.manage", "vms.read_all"}),
    "auditor": frozenset({"audit.read"}),
}


@dataclass(frozen=True)
class Access:
    """Who may call one route: the one place the API decides by caller and
    role (`Api._authorize`); handlers only scope what an instance sees.

    action: the audit action of a refusal. what: the refused thing, in
    words. right: what a user's role needs (None: no user). instance:
    "own" (any trusted instance, for its own hosts and VMs), "role" (an
    instance whose role has `right`, for its own), None (no instance).
    host: the route is a host's (host certificate only)."""

    action: str
    what: str
    right: str | None = None
    instance: str | None = "own"
    host: bool = False


_HOST_ONLY = "only the host the VM is placed on may do this (use the host certificate)"
_HOST_TPM = "a host attests with its own TPM (use the host certificate)"
ACCESS: dict[str, Access] = {
    "register_host": Access("host.register", "registering a host", "inventory.manage"),
    "remove_host": Access("host.remove", "removing a host", "inventory.manage"),
    "create_vm": Access("vm.create", "creating a VM", "inventory.manage"),
    "register_vm": Access("vm.register", "registering a VM", "inventory.manage"),
    "place_vm": Access("vm.place", "placing a VM", "inventory.manage"),
    "list_vms": Access("vms.read_all", "listing all VMs", "vms.read_all"),
    "get_dek": Access("dek.read", "obtaining a DEK", "dek.read", instance="role"),
    "remove_vm": Access("vm.remove", "removing a VM's vTPM key", "vm.remove", instance="role"),
    "release_vm": Access("vm.release", "releasing a VM (its owner instance does)", None),
    "transfer_vm": Access("vm.transfer", "transferring a VM (administrators do)", "vm.transfer", instance=None),
    "rekey_vm": Access("vm.rekey", "rotating a VM's keys", "vm.rekey"),
    "commit_rekey": Access("vm.rekey", "rotating a VM's keys", "vm.rekey"),
    "abort_rekey": Access("vm.rekey", "rotating a VM's keys", "vm.rekey"),
    "rekey_resealed": Access("vm.rekey", _HOST_ONLY, instance=None, host=True),
    "get_nvram_generation": Access("nvram.generation.read", _HOST_ONLY, instance=None, host=True),
    "put_nvram_generation": Access("nvram.generation", _HOST_ONLY, instance=None, host=True),
    "ek_certificate": Access(
        "ek.issue", "EK certificates are issued to hosts only (use the host certificate)", instance=None, host=True
    ),
    "vm_ek_certificates": Access("ek.read", _HOST_ONLY, instance=None, host=True),
    "attest_enroll": Access("host.tpm.enroll", _HOST_TPM, instance=None, host=True),
    "attest_activate": Access("host.tpm.activate", _HOST_TPM, instance=None, host=True),
    "attest_challenge": Access("host.attest", _HOST_TPM, instance=None, host=True),
    "attest_quote": Access("host.attest", _HOST_TPM, instance=None, host=True),
    "attest_hosts": Access("attest.read", "reading hosts' attestation status", "attest.manage"),
    "attest_policies": Access("attest.read", "reading attestation policies", "attest.manage"),
    "set_attest_policy": Access("attest.policy.set", "setting an attestation policy", "attest.manage"),
    "remove_attest_policy": Access("attest.policy.remove", "removing an attestation policy", "attest.manage"),
    "read_audit": Access("audit.read", "reading the audit trail", "audit.read", instance="role"),
    "list_instances": Access("trust.manage", "listing instances", "trust.manage", instance="role"),
    "approve_instance": Access("trust.manage", "approving an instance", "trust.manage", instance="role"),
    "reject_instance": Access("trust.manage", "rejecting an instance", "trust.manage", instance="role"),
    "revoke_instance": Access("trust.manage", "revoking an instance", "trust.manage", instance="role"),
}

# One table from failures to HTTP statuses.
STATUS_FOR: tuple[tuple[type[BaseException], int], ...] = (
    (KeySafeError, 400),
    (InvalidRequest, 400),
    (Refused, 403),
    (NotFound, 404),
    (Conflict, 409),
    (Unprocessable, 422),
    (KmsUnavailable, 503),
)


class ApiError(Exception):
    """An answer with a status and a one-line error, raised inside handlers."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str
    body: bytes = b""
    authorization: str | None = None
    client_fingerprint: str | None = None
    peer: str = ""
    body_too_large: bool = False
    query: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ApiResponse:
    status: int
    body: dict | list | None = None
    headers: dict[str, str] = field(default_factory=dict)


# ``ek_issuer(request_json, caller_host, authorize) -> {"certificate_der_b64", "ca_pem"}``;
# raises an exception with ``status`` and ``message`` (vtpm_ca.EkRequestError)
# to refuse. ``authorize(caller_host, vm_uuid)`` raises to refuse.
EkIssuer = Callable[[object, str, Callable[[str, Any], None]], dict]


# --- JSON -----------------------------------------------------------------------------


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise ApiError(400, f"field {key!r} appears twice")
        out[key] = value
    return out


def _reject_constant(name: str):
    raise ApiError(400, f"{name} is not a JSON number")


def parse_json_object(body: bytes) -> dict:
    """The body as one JSON object, or a 400 naming the problem."""
    if not body:
        raise ApiError(400, "the body must be a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the body is not UTF-8") from None
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except RecursionError:
        raise ApiError(400, "the JSON body is nested too deeply") from None
    if not isinstance(value, dict):
        raise ApiError(400, "the body must be a JSON object")
    return value


def fields_of(obj: dict, required: tuple[str, ...], optional: tuple[str, ...] = ()) -> dict:
    unknown = sorted(set(obj) - set(required) - set(optional))
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0]!r}; this request takes {', '.join(required + optional)}")
    missing = [name for name in required if name not in obj]
    if missing:
        raise ApiError(400, f"missing field {missing[0]!r}")
    return obj


def _base64(obj: dict, name: str, max_length: int) -> bytes:
    """A base64 field's bytes; 400 when it is not base64 or too long."""
    value = _string(obj, name, max_length * 2)
    try:
        data = base64.b64decode(value, validate=True)
    except ValueError:
        raise ApiError(400, f"{name} is not valid base64") from None
    if len(data) > max_length:
        raise ApiError(400, f"{name} is longer than {max_length} bytes")
    return data


def _string(obj: dict, name: str, max_length: int = 16384) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise ApiError(400, f"{name} must be a string")
    if len(value) > max_length:
        raise ApiError(400, f"{name} is longer than {max_length} characters")
    return value


# --- The API -----------------------------------------------------------------------------


class RateLimit:
    """A token bucket per address: `per_minute` requests a minute, in
    bursts of up to that many. `take` answers 0 (go) or the whole seconds
    to wait. Idle addresses are forgotten once many are tracked."""

    MAX_TRACKED = 10_000

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, address: str) -> int:
        if self.per_minute <= 0:
            return 0
        rate = self.per_minute / 60.0
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(address, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[address] = (tokens, now)
                return max(1, math.ceil((1.0 - tokens) / rate))
            self._buckets[address] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_TRACKED:
                full = float(self.per_minute) - 1.0
                for key, (t, seen) in list(self._buckets.items()):
                    if t + (now - seen) * rate >= full:
                        del self._buckets[key]
            return 0


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    handler: str
    # "none": reachable without a client certificate (enrollment only).
    auth: str = "cert"


def _route(method: str, path: str, handler: str, auth: str = "cert") -> _Route:
    regex = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", path)
    return _Route(method, re.compile(f"^{regex}$"), handler, auth)


ROUTES = (
    _route("POST", "/v1/enroll", "enroll", auth="none"),
    _route("GET", "/v1/enrollments/{enrollment_id}", "poll_enrollment", auth="none"),
    _route("POST", "/v1/hosts", "register_host"),
    _route("DELETE", "/v1/hosts/{name}", "remove_host"),
    _route("POST", "/v1/vms/register", "register_vm"),
    _route("POST", "/v1/vms", "create_vm"),
    _route("GET", "/v1/vms", "list_vms"),
    _route("PUT", "/v1/vms/{vm_uuid}/host", "place_vm"),
    _route("GET", "/v1/vms/{vm_uuid}/dek", "get_dek"),
    _route("GET", "/v1/vms/{vm_uuid}/nvram-generation", "get_nvram_generation"),
    _route("PUT", "/v1/vms/{vm_uuid}/nvram-generation", "put_nvram_generation"),
    _route("DELETE", "/v1/vms/{vm_uuid}", "remove_vm"),
    _route("POST", "/v1/vms/{vm_uuid}/release", "release_vm"),
    _route("POST", "/v1/vms/{vm_uuid}/transfer", "transfer_vm"),
    _route("POST", "/v1/vms/{vm_uuid}/rekey", "rekey_vm"),
    _route("POST", "/v1/vms/{vm_uuid}/rekey/commit", "commit_rekey"),
    _route("POST", "/v1/vms/{vm_uuid}/rekey/abort", "abort_rekey"),
    _route("POST", "/v1/vms/{vm_uuid}/rekey/resealed", "rekey_resealed"),
    _route("POST", "/v1/vtpm/ek-certificates", "ek_certificate"),
    _route("GET", "/v1/vms/{vm_uuid}/ek-certificates", "vm_ek_certificates"),
    _route("POST", "/v1/attestation/enroll", "attest_enroll"),
    _route("POST", "/v1/attestation/activate", "attest_activate"),
    _route("POST", "/v1/attestation/challenge", "attest_challenge"),
    _route("POST", "/v1/attestation/quote", "attest_quote"),
    _route("GET", "/v1/attestation/hosts", "attest_hosts"),
    _route("GET", "/v1/attestation/policies", "attest_policies"),
    _route("PUT", "/v1/attestation/policies/{scope}", "set_attest_policy"),
    _route("DELETE", "/v1/attestation/policies/{scope}", "remove_attest_policy"),
    _route("GET", "/v1/audit", "read_audit"),
    _route("GET", "/v1/instances", "list_instances"),
    _route("POST", "/v1/instances/{name}/approve", "approve_instance"),
    _route("POST", "/v1/instances/{name}/reject", "reject_instance"),
    _route("POST", "/v1/instances/{name}/revoke", "revoke_instance"),
)


@dataclass(frozen=True)
class _Call:
    request: ApiRequest
    params: dict[str, str]
    caller: Caller | None
    role: str | None

    @property
    def actor(self) -> str:
        if self.caller is None:
            return f"anonymous@{self.request.peer}"
        return f"{self.caller.kind}:{self.caller.name}"

    def has(self, right: str) -> bool:
        return self.role is not None and right in ROLE_RIGHTS.get(self.role, frozenset())


class Api:
    """Routing, authentication and the handlers. Blocking: run on a pool."""

    def __init__(
        self,
        cfg: BrokerConfig,
        registry: Registry,
        vmkeys: VmKeys | None,
        ek_issuer: EkIssuer | None = None,
    ):
        self.cfg = cfg
        self.registry = registry
        self.vmkeys = vmkeys
        self.ek_issuer = ek_issuer
        self.enroll_limit = RateLimit(cfg.api.enroll_per_minute)
        # broker.metrics.BrokerMetrics (answers, enrollments, rate limits), or None.
        self.metrics: ApiMetrics | None = None

    def dispatch(self, request: ApiRequest) -> ApiResponse:
        # One id per request: in the broker's records, in the Client
        # Correlation Value of the KMS requests made for it, in the answer's
        # X-Request-Id header and in a 500's text (broker/request_scope.py).
        request_id = new_request_id()
        with request_scope(request_id):
            response = self._answer(request, request_id)
        response.headers.setdefault("X-Request-Id", request_id)
        if self.metrics is not None:
            self.metrics.api_answered(request.method, request.path, response.status)
        return response

    def _answer(self, request: ApiRequest, request_id: str) -> ApiResponse:
        try:
            return self._dispatch(request)
        except ApiError as exc:
            return _error(exc.status, exc.message)
        except DatabaseError as exc:
            log.error("database failure on %s %s: %s", request.method, request.path, exc)
            return _error(503, "the broker database is unavailable; try again")
        except Exception:
            log.exception("request %s (%s %s) failed", request_id, request.method, request.path)
            return _error(500, f"internal error (request id {request_id}); see the broker log")

    def _dispatch(self, request: ApiRequest) -> ApiResponse:
        if request.body_too_large:
            raise ApiError(413, f"the body is larger than {self.cfg.api.max_body} bytes")
        path = request.path
        allowed_methods = []
        for route in ROUTES:
            match = route.pattern.match(path)
            if match is None:
                continue
            allowed_methods.append(route.method)
            if route.method != request.method:
                continue
            caller = None
            role = None
            if route.handler == "enroll":
                # The one route that creates state for anyone who can reach
                # it: limited per address (429 with Retry-After).
                wait = self.enroll_limit.take(request.peer.rsplit(":", 1)[0])
                if wait:
                    log.warning("enrollment from %s refused: rate limit", request.peer)
                    response = _error(429, f"too many enrollment requests from this address; retry in {wait} s")
                    response.headers["Retry-After"] = str(wait)
                    return response
            if route.auth != "none":
                if request.client_fingerprint is None:
                    raise ApiError(401, "this request needs a client certificate issued by the broker")
                caller = self.registry.identify(request.client_fingerprint)
                if caller is None:
                    log.warning("refused certificate %s from %s", request.client_fingerprint, request.peer)
                    access = ACCESS.get(route.handler)
                    self.registry.record_audit(
                        f"certificate:{request.client_fingerprint[:16]}@{request.peer}",
                        access.action if access else route.handler,
                        (match.groupdict().get("vm_uuid") or match.groupdict().get("name") or path)[:200],
                        False,
                        "refused: the certificate is not trusted (revoked, replaced or unknown)",
                    )
                    raise ApiError(403, "this certificate is not trusted by the broker (revoked, replaced or unknown)")
                if caller.kind != "host":
                    role = self.cfg.roles.role_of(caller.name)
            call = _Call(request, match.groupdict(), caller, role)
            # From here on the KMS also learns whom the broker acts for.
            with request_scope(current_request_id() or new_request_id(), call.actor):
                if caller is not None:
                    self._authorize(call, ACCESS[route.handler])
                try:
                    return getattr(self, "_" + route.handler)(call)
                except TrustError as exc:
                    self._audit_refusal(call, route, _status_for(exc), str(exc))
                    raise ApiError(_status_for(exc), str(exc)) from None
                except (KeySafeError, KmsUnavailable) as exc:
                    raise ApiError(_status_for(exc), str(exc)) from None
        if allowed_methods:
            raise ApiError(405, f"{request.method} is not allowed here; use {' or '.join(allowed_methods)}")
        raise ApiError(404, f"no such endpoint {path[:100]}")

    # Guards ------------------------------------------------------------------------

    def _audit_refusal(self, call: _Call, route: _Route, status: int, message: str) -> None:
        """Every 403 and 409 is in the trail: the registry records most
        refusals itself; one it did not record in this request is recorded
        here."""
        if status not in (403, 409) or refusal_recorded():
            return
        access = ACCESS.get(route.handler)
        target = call.params.get("vm_uuid") or call.params.get("name") or call.request.path
        action = access.action if access else route.handler
        self.registry.record_audit(call.actor, action, target[:200], False, f"refused ({status}): {message}")

    def _authorize(self, call: _Call, access: Access) -> None:
        """Refuse (403, audited) unless this caller may call this route at
        all (ACCESS); which objects it may touch is the handler's scope."""
        caller = call.caller
        assert caller is not None
        if access.host:
            if caller.kind == "host":
                return
            message = access.what
        elif caller.kind == "host":
            message = f"{access.what} is not allowed with a host certificate"
        elif caller.kind == "instance" and (
            access.instance == "own" or (access.instance == "role" and access.right and call.has(access.right))
        ):
            return
        elif caller.kind == "user" and access.right is not None and call.has(access.right):
            return
        else:
            message = f"{access.what} is not allowed for role {call.role or 'none'}"
        target = call.params.get("vm_uuid") or call.params.get("name") or call.request.path
        self.registry.record_audit(call.actor, access.action, target[:200], False, f"refused: {message}")
        raise ApiError(403, message)

    def _for_instance(self, call: _Call, body: dict, action: str, target: str) -> str:
        """The trusted instance a host or VM is registered for: the calling
        instance itself, or the one a user with inventory.manage names in
        the body's "instance"."""
        assert call.caller is not None
        named = body.get("instance")
        if call.caller.kind == "instance":
            if named is not None and named != call.caller.name:
                reason = "an instance registers hosts and VMs for itself only; leave out 'instance'"
                self.registry.record_audit(call.actor, action, target[:200], False, f"refused: {reason}")
                raise ApiError(403, reason)
            return call.caller.name
        if named is None:
            raise ApiError(400, "missing field 'instance': name the trusted instance the host or VM belongs to")
        return check_instance_name(named)

    @staticmethod
    def _scope(call: _Call) -> str | None:
        """An instance acts on its own hosts and VMs only; a user with the
        right on any."""
        return call.caller.name if call.caller is not None and call.caller.kind == "instance" else None

    def _require_vmkeys(self) -> VmKeys:
        if self.vmkeys is None:
            raise ApiError(503, "the broker has no KMS connection configured")
        return self.vmkeys

    # Enrollment ----------------------------------------------------------------------

    def _enroll(self, call: _Call) -> ApiResponse:
        body = fields_of(parse_json_object(call.request.body), ("instance", "token", "csr_pem"))
        instance = check_instance_name(body["instance"])
        token = _string(body, "token", 256)
        csr = _string(body, "csr_pem")
        enrollment = self.registry.enroll(instance, token, csr, peer=call.request.peer)
        return ApiResponse(
            202, {"enrollment_id": enrollment.enrollment_id, "poll_secret": enrollment.poll_secret, "state": "pending"}
        )

    def _poll_enrollment(self, call: _Call) -> ApiResponse:
        auth = call.request.authorization or ""
        if not auth.startswith("Bearer "):
            raise ApiError(401, "send the poll secret as 'Authorization: Bearer <poll_secret>'")
        return ApiResponse(200, self.registry.poll_enrollment(call.params["enrollment_id"], auth[7:].strip()))

    # Hosts --------------------------------------------------------------------------

    def _register_host(self, call: _Call) -> ApiResponse:
        body = fields_of(parse_json_object(call.request.body), ("name", "csr_pem"), ("instance",))
        name = check_host_name(body["name"])
        instance = self._for_instance(call, body, "host.register", name)
        cert = self.registry.register_host(instance, name, _string(body, "csr_pem"), actor=call.actor)
        return ApiResponse(201, {"name": name, "certificate_pem": cert_pem(cert), "ca_pem": self._ca_pem()})

    def _remove_host(self, call: _Call) -> ApiResponse:
        self.registry.remove_host(self._scope(call), check_host_name(call.params["name"]), actor=call.actor)
        return ApiResponse(204)

    def _ca_pem(self) -> str:
        ca = self.registry.trust_ca
        assert ca is not None
        return ca.cert_pem

    # VMs ---------------------------------------------------------------------------------

    def _create_vm(self, call: _Call) -> ApiResponse:
        body = fields_of(parse_json_object(call.request.body), ("vm_uuid", "name"), ("host", "instance"))
        vm_uuid = check_vm_uuid(body["vm_uuid"])
        name = check_vm_name(body["name"])
        instance = self._for_instance(call, body, "vm.create", vm_uuid)
        host = body.get("host")
        if host is not None:
            host = check_host_name(host)
        vmkeys = self._require_vmkeys()
        # Refused before a KEK exists, so a refusal leaves nothing behind.
        self.registry.check_new_vm(instance, vm_uuid, host, actor=call.actor)
        key_safe = vmkeys.create(vm_uuid, name)
        text = format_key_safe(key_safe)
        self.registry.add_vm(instance, vm_uuid, name, key_safe.kms_key_id, text, host, actor=call.actor)
        return ApiResponse(201, {"vm_uuid": vm_uuid, "key_safe": text, "kms_key_id": key_safe.kms_key_id, "host": host})

    def _register_vm(self, call: _Call) -> ApiResponse:
        body = fields_of(parse_json_object(call.request.body), ("vm_uuid", "name", "key_safe"), ("instance",))
        vm_uuid = check_vm_uuid(body["vm_uuid"])
        name = check_vm_name(body["name"])
        instance = self._for_instance(call, body, "vm.register", vm_uuid)
        key_safe = parse_key_safe(body["key_safe"])
        self._require_vmkeys().check_key_safe(key_safe, vm_uuid)
        record = self.registry.register_vm(
            instance, vm_uuid, name, key_safe.kms_key_id, format_key_safe(key_safe), actor=call.actor
        )
        return ApiResponse(200, _vm_json(record))

    def _list_vms(self, call: _Call) -> ApiResponse:
        # Users got here with vms.read_all (ACCESS); an instance sees its own.
        return ApiResponse(200, {"vms": [_vm_json(v) for v in self.registry.list_vms(self._scope(call))]})

    def _place_vm(self, call: _Call) -> ApiResponse:
        body = fields_of(parse_json_object(call.request.body), ("host",))
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        self.registry.place_vm(self._scope(call), vm_uuid, check_host_name(body["host"]), actor=call.actor)
        return ApiResponse(200, _vm_json(self.registry.get_vm(vm_uuid)))

    def _get_dek(self, call: _Call) -> ApiResponse:
        """The one route that returns a DEK: administrators only (an
        instance only for its own VMs)."""
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        try:
            record = self.registry.get_vm(vm_uuid, self._scope(call))
        except NotFound:
            self.registry.record_audit(call.actor, "dek.read", vm_uuid, False, "no such VM")
            raise
        dek = self._require_vmkeys().unwrap(parse_key_safe(record.key_safe))
        self.registry.record_audit(call.actor, "dek.read", vm_uuid, True, f"KEK {record.kms_key_id}")
        return ApiResponse(200, {"vm_uuid": vm_uuid, "dek_b64": base64.b64encode(dek).decode("ascii")})

    def _remove_vm(self, call: _Call) -> ApiResponse:
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        self.registry.remove_vm(vm_uuid, call.actor, self._scope(call))
        return ApiResponse(204)

    # Cold migration ------------------------------------------------------------------------

    def _release_vm(self, call: _Call) -> ApiResponse:
        """The owner hands its VM over to the trusted instance "to"."""
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        body = fields_of(parse_json_object(call.request.body), ("to",))
        assert call.caller is not None
        record = self.registry.release_vm(vm_uuid, body["to"], call.actor, call.caller.name)
        return ApiResponse(200, _vm_json(record))

    def _transfer_vm(self, call: _Call) -> ApiResponse:
        """An administrator releases any VM to the trusted instance "to"."""
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        body = fields_of(parse_json_object(call.request.body), ("to",))
        record = self.registry.release_vm(vm_uuid, body["to"], call.actor, None)
        return ApiResponse(200, _vm_json(record))

    # Key rotation (broker/rotation.py) ------------------------------------------------------

    def _rotation(self) -> Rotation:
        return Rotation(self.registry, self._require_vmkeys())

    def _rekey_vm(self, call: _Call) -> ApiResponse:
        """Begin (or resume) a rotation: {"kind": "shallow"|"deep", "key_safe": the .vmx's}."""
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        body = fields_of(parse_json_object(call.request.body), ("kind", "key_safe"))
        kind, key_safe = _string(body, "kind", 16), _string(body, "key_safe", 4096)
        return ApiResponse(200, self._rotation().begin(vm_uuid, kind, key_safe, call.actor, self._scope(call)))

    def _commit_rekey(self, call: _Call) -> ApiResponse:
        """{"key_safe": read back from the switched .vmx}: the new KEK becomes the VM's, the old one is revoked."""
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        body = fields_of(parse_json_object(call.request.body), ("key_safe",))
        key_safe = _string(body, "key_safe", 4096)
        return ApiResponse(200, self._rotation().commit(vm_uuid, key_safe, call.actor, self._scope(call)))

    def _abort_rekey(self, call: _Call) -> ApiResponse:
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        return ApiResponse(200, self._rotation().abort(vm_uuid, call.actor, self._scope(call)))

    def _rekey_resealed(self, call: _Call) -> ApiResponse:
        """The host the VM is placed on re-sealed its .nvram under a deep
        rekey's new DEK and switched the .vmx (or found a switched one):
        the same commit as the instance's."""
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        body = fields_of(parse_json_object(call.request.body), ("key_safe",))
        key_safe = _string(body, "key_safe", 4096)
        host = self._placed_host(call, vm_uuid, "vm.rekey")
        return ApiResponse(200, self._rotation().commit(vm_uuid, key_safe, f"host:{host}", None))

    # .nvram generations (rollback protection) -----------------------------------------------

    def _placed_host(self, call: _Call, vm_uuid: str, action: str) -> str:
        """The calling host's name if the VM is placed on it; otherwise the
        refusal is audited and answered as the gateway would (404 when the
        host may not know the VM exists, 403 when it may)."""
        host = self._calling_host(call)
        self._refuse_unless(host, vm_uuid, action, self.registry.authorize_vm_for_host(host.fingerprint, vm_uuid))
        return host.name

    @staticmethod
    def _calling_host(call: _Call):
        if call.caller is None or call.caller.kind != "host":
            raise ApiError(403, "only the host the VM is placed on may do this (use the host certificate)")
        return call.caller

    def _refuse_unless(self, host, vm_uuid: str, action: str, decision) -> None:
        if not decision.allowed:
            self.registry.record_audit(f"host:{host.name}", action, vm_uuid, False, decision.reason)
            if decision.vm_uuid is None:
                raise ApiError(404, f"no VM {vm_uuid}")
            raise ApiError(403, f"host {host.name} may not act for VM {vm_uuid}: it is not placed on this host")

    def _get_nvram_generation(self, call: _Call) -> ApiResponse:
        # Every power-on asks: the placement check and the generation are one read.
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        host = self._calling_host(call)
        decision, generation = self.registry.nvram_generation_for_host(host.fingerprint, vm_uuid)
        self._refuse_unless(host, vm_uuid, "nvram.generation.read", decision)
        return ApiResponse(200, {"vm_uuid": vm_uuid, "generation": generation})

    def _put_nvram_generation(self, call: _Call) -> ApiResponse:
        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        body = fields_of(parse_json_object(call.request.body), ("generation",))
        host = self._placed_host(call, vm_uuid, "nvram.generation")
        generation = self.registry.record_nvram_generation(vm_uuid, body["generation"], f"host:{host}")
        return ApiResponse(200, {"vm_uuid": vm_uuid, "generation": generation})

    # vTPM EK certificates ------------------------------------------------------------------

    def _ek_certificate(self, call: _Call) -> ApiResponse:
        if call.caller is None or call.caller.kind != "host":
            raise ApiError(403, "EK certificates are issued to hosts only (use the host certificate)")
        if self.ek_issuer is None:
            raise ApiError(503, "the vTPM EK CA is not available on this broker")
        body = parse_json_object(call.request.body)
        host = call.caller
        authorized: list[str] = []

        def authorize(caller_host: str, vm_uuid: Any) -> None:
            decision = self.registry.authorize_vm_for_host(host.fingerprint, str(vm_uuid))
            self.registry.record_audit(f"host:{host.name}", "ek.issue", str(vm_uuid), decision.allowed, decision.reason)
            if not decision.allowed:
                if decision.vm_uuid is None:
                    raise ApiError(404, f"no VM {vm_uuid}")
                raise ApiError(403, f"host {host.name} may not act for VM {vm_uuid}")
            authorized.append(str(vm_uuid))

        try:
            answer = self.ek_issuer(body, host.name, authorize)
        except ApiError:
            raise
        except Exception as exc:
            status = getattr(exc, "status", None)
            if isinstance(status, int) and 400 <= status < 500:
                raise ApiError(status, str(getattr(exc, "message", exc)).splitlines()[0]) from None
            raise
        if authorized:
            der = base64.b64decode(answer["certificate_der_b64"])
            with self.registry.db.begin() as conn:
                conn.execute(
                    ek_certificates.insert().values(
                        vm_uuid=authorized[0],
                        cert_type=str(body.get("type")),
                        cert_der=der,
                        ca_fingerprint=_fingerprint_der_of_pem(answer.get("ca_pem", "")),
                        issued_to=host.name,
                        issued_at=time.time(),
                    )
                )
        return ApiResponse(201, answer)

    def _vm_ek_certificates(self, call: _Call) -> ApiResponse:
        """The newest EK certificate of each kind the broker issued for the
        VM (after `vtpm-broker ca recertify`: the re-issued ones), each with
        the chain of the CA that issued it, for `vtpm-host install-ek-certs`
        on the host the VM is placed on."""
        from sqlalchemy import select

        from broker.vtpm_ca import EK_CA_PURPOSE, EkCaError, read_ek_certificate

        vm_uuid = check_vm_uuid(call.params["vm_uuid"])
        host = self._placed_host(call, vm_uuid, "ek.read")
        with self.registry.db.read() as conn:
            rows = conn.execute(
                select(ek_certificates).where(ek_certificates.c.vm_uuid == vm_uuid).order_by(ek_certificates.c.id)
            ).all()
        chains = {
            _fingerprint_der_of_pem(row.cert_pem): row.cert_pem + (row.chain_pem or "")
            for row in self.registry.db.list_cas(EK_CA_PURPOSE)
        }
        newest: dict[tuple[str, str], dict] = {}
        for row in rows:
            try:
                info = read_ek_certificate(row.cert_der)
            except EkCaError:
                continue
            newest[(info.cert_type, info.key_type)] = {
                "type": info.cert_type,
                "key_type": info.key_type,
                "certificate_der_b64": base64.b64encode(row.cert_der).decode("ascii"),
                "ca_pem": chains.get(row.ca_fingerprint, ""),
                "issued_at": row.issued_at,
                "issued_to": row.issued_to,
            }
        certificates = [newest[k] for k in sorted(newest)]
        kinds = ", ".join(f"{c['type']} {c['key_type']}" for c in certificates) or "none"
        self.registry.record_audit(f"host:{host}", "ek.read", vm_uuid, True, f"EK certificates: {kinds}")
        return ApiResponse(200, {"vm_uuid": vm_uuid, "certificates": certificates})

    # Security administration and audit ---------------------------------------------------------

    # Host attestation (docs/attestation.md) ---------------------------------------------------

    def _attest_enroll(self, call: _Call) -> ApiResponse:
        host = self._calling_host(call)
        body = fields_of(parse_json_object(call.request.body), ("ek_public_pem", "ak_public_b64"))
        ak_public = _base64(body, "ak_public_b64", 4096)
        id_object, secret = self.registry.begin_tpm_enrollment(
            host.name, _string(body, "ek_public_pem", 8192), ak_public
        )
        return ApiResponse(
            200,
            {
                "id_object_b64": base64.b64encode(id_object).decode(),
                "encrypted_secret_b64": base64.b64encode(secret).decode(),
            },
        )

    def _attest_activate(self, call: _Call) -> ApiResponse:
        host = self._calling_host(call)
        body = fields_of(parse_json_object(call.request.body), ("secret_b64",))
        ak_name = self.registry.finish_tpm_enrollment(host.name, _base64(body, "secret_b64", 256))
        return ApiResponse(200, {"state": "enrolled", "ak_name_hex": ak_name})

    def _attest_challenge(self, call: _Call) -> ApiResponse:
        host = self._calling_host(call)
        fields_of(parse_json_object(call.request.body or b"{}"), ())
        challenge = self.registry.attestation_challenge(host.name, str(host.instance))
        return ApiResponse(
            200,
            {
                "nonce_b64": base64.b64encode(challenge.nonce).decode(),
                "pcr_bank": challenge.pcr_bank,
                "pcrs": list(challenge.pcrs),
                "expires_in": challenge.expires_in,
            },
        )

    def _attest_quote(self, call: _Call) -> ApiResponse:
        host = self._calling_host(call)
        body = fields_of(
            parse_json_object(call.request.body), ("nonce_b64", "quote_b64", "signature_b64", "pcr_values")
        )
        if not isinstance(body["pcr_values"], dict):
            raise ApiError(400, 'pcr_values must be an object such as {"0": "<hex>", ...}')
        try:
            result = self.registry.attest_host(
                host.name,
                str(host.instance),
                _base64(body, "nonce_b64", 256),
                _base64(body, "quote_b64", 4096),
                _base64(body, "signature_b64", 4096),
                body["pcr_values"],
            )
        except Refused:
            if self.metrics is not None:
                self.metrics.attestation("failed")
            raise
        if self.metrics is not None:
            self.metrics.attestation("attested" if result.token else "no_policy")
        return ApiResponse(
            200,
            {
                "token": result.token,
                "expires_at": result.expires_at,
                "expires_in": self.registry.attestation.token_ttl if result.token else None,
                "policy": result.policy,
            },
        )

    def _attest_hosts(self, call: _Call) -> ApiResponse:
        scope = self._scope(call)
        rows = [r for r in self.registry.attestation_status() if scope is None or r.instance == scope]
        return ApiResponse(200, {"hosts": [r.as_json() for r in rows]})

    def _attest_policies(self, call: _Call) -> ApiResponse:
        own = self._own_scopes(call)
        policies = [p for p in self.registry.attest_policies() if own is None or p.scope in own]
        return ApiResponse(200, {"policies": [p.as_json() for p in policies]})

    def _own_scopes(self, call: _Call) -> set[str] | None:
        """The policy scopes an instance may read and set: its own hosts and
        its own host group (None: a user with the right, every scope)."""
        name = self._scope(call)
        if name is None:
            return None
        return {f"instance:{name}"} | {
            f"host:{h.host}" for h in self.registry.attestation_status() if h.instance == name
        }

    def _set_attest_policy(self, call: _Call) -> ApiResponse:
        scope = check_scope(unquote(call.params["scope"]))
        own = self._own_scopes(call)
        if own is not None and scope not in own:
            assert call.caller is not None
            # Refused, not ApiError: the dispatcher records every refusal in the trail.
            raise Refused(
                f"an instance sets attestation policies for its own hosts and instance:{call.caller.name} only"
            )
        body = fields_of(
            parse_json_object(call.request.body), (), ("pcr_bank", "pcrs", "capture_from_host", "pcr_indices")
        )
        if "capture_from_host" in body:
            if "pcrs" in body or "pcr_bank" in body:
                raise ApiError(400, "give either capture_from_host (and pcr_indices) or pcr_bank and pcrs")
            source_host = check_host_name(body["capture_from_host"])
            if own is not None and f"host:{source_host}" not in own:
                raise ApiError(404, f"no host named {source_host}")
            indices = body.get("pcr_indices")
            if indices is not None and (
                not isinstance(indices, list)
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
            ):
                raise ApiError(400, "pcr_indices must be a list of PCR indices")
            policy = self.registry.capture_attest_policy(scope, source_host, indices, actor=call.actor)
        else:
            fields_of(body, ("pcr_bank", "pcrs"))
            if not isinstance(body["pcrs"], dict):
                raise ApiError(400, 'pcrs must be an object such as {"0": "<hex>", ...}')
            policy = self.registry.set_attest_policy(
                scope, _string(body, "pcr_bank", 16), body["pcrs"], source="given over the API", actor=call.actor
            )
        return ApiResponse(200, policy.as_json())

    def _remove_attest_policy(self, call: _Call) -> ApiResponse:
        scope = check_scope(unquote(call.params["scope"]))
        own = self._own_scopes(call)
        if own is not None and scope not in own:
            assert call.caller is not None
            raise Refused(
                f"an instance removes attestation policies of its own hosts and instance:{call.caller.name} only"
            )
        self.registry.remove_attest_policy(scope, actor=call.actor)
        return ApiResponse(204)

    def _read_audit(self, call: _Call) -> ApiResponse:
        try:
            after = int(call.request.query.get("after", "0"))
            limit = int(call.request.query.get("limit", "1000"))
        except ValueError:
            raise ApiError(400, "after and limit must be integers") from None
        if after < 0 or not 1 <= limit <= 10000:
            raise ApiError(400, "after must be at least 0 and limit between 1 and 10000")
        records = self.registry.audit_records(after=after, limit=limit)
        return ApiResponse(
            200,
            {
                "records": [r.__dict__ for r in records],
                "problems": self.registry.verify_audit(),
            },
        )

    def _list_instances(self, call: _Call) -> ApiResponse:
        return ApiResponse(200, {"instances": [i.__dict__ for i in self.registry.list_instances()]})

    def _approve_instance(self, call: _Call) -> ApiResponse:
        cert = self.registry.approve(check_instance_name(call.params["name"]), actor=call.actor)
        return ApiResponse(200, {"certificate_pem": cert_pem(cert)})

    def _reject_instance(self, call: _Call) -> ApiResponse:
        self.registry.reject(check_instance_name(call.params["name"]), actor=call.actor)
        return ApiResponse(200, {"state": "rejected"})

    def _revoke_instance(self, call: _Call) -> ApiResponse:
        self.registry.revoke(check_instance_name(call.params["name"]), actor=call.actor)
        return ApiResponse(200, {"state": "revoked"})


def _status_for(exc: BaseException) -> int:
    for kind, status in STATUS_FOR:
        if isinstance(exc, kind):
            return status
    return 400


def _error(status: int, message: str) -> ApiResponse:
    line = (message.splitlines() or [""])[0][:500]
    return ApiResponse(status, {"error": line})


def _vm_json(record) -> dict:
    return {
        "vm_uuid": record.vm_uuid,
        "name": record.name,
        "instance": record.instance,
        "kms_key_id": record.kms_key_id,
        "key_safe": record.key_safe,
        "host": record.host,
        "nvram_generation": record.nvram_generation,
        "released_to": record.released_to,
        # A key rotation under way (broker/rotation.py): kind and state, no key material.
        "rekey": {"kind": record.rekey_kind, "state": record.rekey_state} if record.rekey_state else None,
    }


def _fingerprint_der_of_pem(pem: str) -> str:
    try:
        return x509.load_pem_x509_certificate(pem.encode("ascii")).fingerprint(hashes.SHA256()).hex()
    except ValueError:
        return ""


# --- TLS: ask for a client certificate, do not require one -----------------------------------------


def build_api_context(cfg: BrokerConfig, pinned_pems: list[str]) -> SSL.Context:
    """The KMS core's server context (versions, suites, trust CA, clientAuth
    check), with the pinned instance certificates added as trust anchors
    that vouch only for themselves, and VERIFY_FAIL_IF_NO_PEER_CERT dropped:
    enrollment comes without a certificate; the API refuses everything else."""
    kms_tls = TlsConfig(
        cert=cfg.tls.cert,
        key=cfg.tls.key,
        ca=cfg.trust_ca_path,
        # Pins come from the database, not from a directory.
        trusted_clients_dir=cfg.broker.data_dir / ".no-pinned-clients-dir",
        identity="fingerprint",
        min_version=cfg.tls.min_version,
    )
    # ECDHE with AEAD only: the KMIP profile suites are the KMIP listener's.
    ctx = tls.build_context(kms_tls, kmip_suites=False)
    pins = []
    for pem in pinned_pems:
        try:
            pins.append(x509.load_pem_x509_certificate(pem.encode("ascii")))
        except ValueError:
            log.warning("a pinned instance certificate in the database does not parse; skipped")
    store = ctx.get_cert_store()
    assert store is not None
    ca_fingerprints = {
        c.fingerprint(hashes.SHA256()).hex() for c in x509.load_pem_x509_certificates(cfg.trust_ca_path.read_bytes())
    }
    pinned_only = set()
    for pin in pins:
        fp = pin.fingerprint(hashes.SHA256()).hex()
        if fp in ca_fingerprints:
            continue
        pinned_only.add(fp)
        store.add_cert(crypto.X509.from_cryptography(pin))
        ctx.add_client_ca(pin)
    ctx.set_verify(SSL.VERIFY_PEER, tls.client_verify_callback(frozenset(pinned_only), "fingerprint"))
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ApiContextFactory(twisted_ssl.ContextFactory):
    """The API listener's TLS; ``reload(pins)`` swaps in a new context for
    new connections (pinned certificates changed)."""

    def __init__(self, cfg: BrokerConfig, pinned_pems: list[str]):
        self.cfg = cfg
        self.pinned = list(pinned_pems)
        self._context = build_api_context(cfg, self.pinned)

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def reload(self, pinned_pems: list[str] | None = None) -> None:
        if pinned_pems is not None:
            self.pinned = list(pinned_pems)
        self._context = build_api_context(self.cfg, self.pinned)


# --- Twisted Web -------------------------------------------------------------------------------------


class ApiMetrics(Protocol):
    """What the API reports (broker.metrics.BrokerMetrics)."""

    def api_answered(self, method: str, path: str, status: int) -> None: ...

    def attestation(self, result: str) -> None: ...


class LimitedRequest(limits.TimedRequest):
    """A request whose body is counted as it arrives: past ``max_body`` the
    rest is discarded (never buffered) and the answer is 413. Once read
    whole it stops the listener's request deadline (`wire.limits`)."""

    max_body = 65536
    # Twisted declares `content = None` and documents it as a BinaryIO: it
    # is set once the body starts (gotLength).
    content: BinaryIO | None

    def gotLength(self, length):
        self.body_too_large = length is not None and length > self.max_body
        self._body_received = 0
        if self.body_too_large:
            self.content = io.BytesIO()
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_received = getattr(self, "_body_received", 0) + len(data)
        if self._body_received > self.max_body:
            if not getattr(self, "body_too_large", False):
                self.body_too_large = True
                self.content = io.BytesIO()
            return
        if getattr(self, "body_too_large", False):
            return
        super().handleContentChunk(data)


def _authorization(request) -> str | None:
    """The Authorization header; one that is not UTF-8 is kept as a value
    no credential matches (refused like any wrong one), not a crash."""
    raw = request.requestHeaders.getRawHeaders(b"authorization")
    if not raw:
        return None
    try:
        return raw[0].decode("utf-8") or None
    except UnicodeDecodeError:
        return "invalid"


def _peer_fingerprint(request: server.Request) -> str | None:
    transport = request.channel.transport if request.channel is not None else None
    get = getattr(transport, "getPeerCertificate", None)
    if get is None:
        return None
    try:
        cert = get()
    except Exception:
        return None
    if cert is None:
        return None
    if hasattr(cert, "to_cryptography"):
        cert = cert.to_cryptography()
    return cert.fingerprint(hashes.SHA256()).hex()


class ApiResource(resource.Resource):
    isLeaf = True

    def __init__(self, api: Api, reactor, threadpool):
        super().__init__()
        self.api = api
        self.reactor = reactor
        self.threadpool = threadpool

    def render(self, request: server.Request):
        try:
            path = request.path.decode("ascii")
        except UnicodeDecodeError:
            path = "/?"
        peer = request.getClientAddress()
        api_request = ApiRequest(
            method=request.method.decode("ascii", "replace"),
            path=path.rstrip("/") or "/",
            body=b"" if getattr(request, "body_too_large", False) else _body(request),
            authorization=_authorization(request),
            client_fingerprint=_peer_fingerprint(request),
            peer=f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}",
            body_too_large=bool(getattr(request, "body_too_large", False)),
            query=_query(request.uri),
        )
        finished = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        d = deferToThreadPool(self.reactor, self.threadpool, self.api.dispatch, api_request)

        def respond(response: ApiResponse) -> None:
            if finished:
                return  # The client went away.
            request.setResponseCode(response.status)
            request.setHeader(b"cache-control", b"no-store")
            if api_request.body_too_large:
                request.setHeader(b"connection", b"close")
            for name, value in response.headers.items():
                request.setHeader(name.encode("ascii"), value.encode("ascii"))
            if response.body is not None:
                data = json.dumps(response.body, default=_json_default).encode("utf-8") + b"\n"
                request.setHeader(b"content-type", b"application/json")
                request.write(data)
            request.finish()

        def failed(failure) -> None:
            log.error("API response failed: %s", failure.getErrorMessage())
            if not finished:
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"application/json")
                request.write(b'{"error": "internal error; see the broker log"}\n')
                request.finish()

        d.addCallback(respond).addErrback(failed)
        return server.NOT_DONE_YET


def _query(uri: bytes) -> dict[str, str]:
    _, _, raw = uri.partition(b"?")
    try:
        return {k: v for k, v in parse_qsl(raw.decode("ascii"), keep_blank_values=True)}
    except (UnicodeDecodeError, ValueError):
        return {}


def _json_default(value: object):
    if isinstance(value, dt.datetime):
        return value.isoformat()
    raise TypeError(f"cannot encode {type(value).__name__}")


def _body(request: server.Request) -> bytes:
    content: BinaryIO | None = request.content  # Twisted declares None; set once the body starts
    assert content is not None  # the request was read whole (gotLength)
    return content.read()


class _QuietSite(server.Site):
    """No access log through Twisted's own logger: paths carry no secrets,
    but the broker's log stays in one format."""

    def log(self, request: http.Request) -> None:
        pass


def make_site(api: Api, reactor, threadpool, max_body: int) -> server.Site:
    request_class = type("BrokerRequest", (LimitedRequest,), {"max_body": max_body})
    site = _QuietSite(ApiResource(api, reactor, threadpool), requestFactory=request_class)
    site.displayTracebacks = False
    site.timeOut = 60
    return site
