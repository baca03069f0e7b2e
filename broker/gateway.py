"""The broker's KMIP/TLS gateway for hosts (issue 5, item 6; design note,
"Host gateway").

A host connects with its host certificate (issued by the broker's trust CA)
and sends Decrypt with the KMS key id of a VM's KEK and the wrapped DEK from
the VM's key safe. The gateway asks the trust registry whether that host may
unwrap that key, forwards the Decrypt to the KMS cluster (as the broker's own
KMIP client, with failover) when it may, and records every decision in the
broker's audit trail.

Nothing on the wire is written here. The listener is the KMS core's
`KmipFactory` (framing with a length limit and a deadline, per-connection
ordering, back-pressure, worker pool, idle timeout, drain) inside the
core's listener limits (`kmip_core.limits`: handshake cap and
timeout, connection slots counted after TLS) behind its strict mutual-TLS
context (`kmip_core.tls`, ECDHE-AEAD suites only), and requests go through the KMS core's
`Dispatcher` (decoding, batches, protocol versions 1.0 to 2.0, the one
table from failures to Result Reasons) with a three-row operation table:
DiscoverVersions, Query and Decrypt. Every other operation answers
OPERATION_NOT_SUPPORTED because the table does not have it.

A refused unwrap follows `broker.trust.Decision`: PERMISSION_DENIED when
the registry names the VM (`vm_uuid` set: the key is one of the host's own
instance's VMs, which the host may know about), ITEM_NOT_FOUND otherwise
(an unregistered host, a key of another instance's VM, a key of no VM), so
a refusal never tells a host that a key it may not know about exists.
A host that an attestation policy covers must also show a valid
attestation token (a KMIP Ticket credential in the request header,
docs/attestation.md): without one the answer is ATTESTATION_REQUIRED, with
an expired or void one ATTESTATION_FAILED, each recorded.
The DEK passes through memory only: it never reaches a log line, an
exception or an audit record.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    Operation,
    PaddingMethod,
    QueryFunction,
    ResultReason,
    Tags,
)
from OpenSSL import crypto
from twisted.python.threadpool import ThreadPool

from broker.request_scope import request_scope
from broker.trust import AttestationCheck, Decision
from kmip_core import __version__, errors, limits, tls, ttlv
from kmip_core.audit.record import AuditDraft
from kmip_core.client import KmipError
from kmip_core.config import TlsConfig
from kmip_core.metrics import RequestMetrics
from kmip_core.policy import Principal
from kmip_core.protocol import KmipFactory
from kmip_core.reasons import REASONS
from kmip_core.server import crypto_params, discover_versions
from kmip_core.server import payload as request_fields
from kmip_core.server.backend import Backend, Trail
from kmip_core.server.context import RequestContext
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher, Handler
from kmip_core.ttlv import Item, ItemType

__all__ = [
    "AUDIT_ACTION",
    "GATEWAY_OPERATIONS",
    "VENDOR_IDENTIFICATION",
    "GatewayContext",
    "KeyProviderUnavailable",
    "UnwrapRegistry",
    "build_dispatcher",
    "build_gateway_factory",
    "gateway_decrypt",
    "identify_host",
]

log = logging.getLogger("broker.gateway")

T = Tags

AUDIT_ACTION = "gateway.unwrap"
VENDOR_IDENTIFICATION = f"vtpm-broker gateway {__version__}"


# --- What the gateway needs from the rest of the broker ------------------------------


class UnwrapRegistry(Protocol):
    """The methods of `broker.trust.Registry` the gateway calls, from
    worker threads (several at once). `record_audit` raises when it cannot
    write: the gateway then fails closed."""

    def authorize_gateway_unwrap(
        self, host_fingerprint: str, kms_key_id: str, ticket: bytes | None
    ) -> tuple[Decision, AttestationCheck | None]: ...

    def record_audit(self, actor: str, action: str, target: str, allowed: bool, reason: str) -> None: ...


class KeyProviderClient(Protocol):
    """`kmip_core.client.KmipClient.decrypt`, or anything with its signature."""

    def decrypt(
        self,
        uid: str,
        data: bytes,
        iv: bytes | None = None,
        aad: bytes | None = None,
        tag: bytes | None = None,
        mode: BlockCipherMode | str | None = "GCM",
        padding: PaddingMethod | str | None = None,
    ) -> bytes: ...


class UnwrapMetrics(Protocol):
    """What the gateway reports (broker.metrics.BrokerMetrics)."""

    def unwrap(self, result: str) -> None: ...

    def unwrap_seconds(self, seconds: float) -> None: ...


class GatewayMetrics(UnwrapMetrics, Protocol):
    """broker.metrics.BrokerMetrics as the gateway sees it: unwraps, and the
    dispatcher's request metrics (kmip_core.metrics.RequestMetrics)."""

    @property
    def gateway(self) -> RequestMetrics: ...


@dataclass(frozen=True)
class GatewayContext:
    """The gateway's Backend (kmip_core.server.backend): what its operation
    handlers share. Its operations change nothing the gateway stores (the
    registry writes its own audit records), so an item needs no view of its
    own and a batch run with Undo has no transaction to roll back."""

    registry: UnwrapRegistry
    kms_client: KeyProviderClient
    # broker.metrics.BrokerMetrics (unwraps by result, their latency), or None.
    metrics: UnwrapMetrics | None = None

    def for_item(self, trail: Trail | None, draft: AuditDraft) -> GatewayContext:
        return self

    def batch_transaction(self) -> AbstractContextManager[None]:
        return nullcontext()

    def in_batch(self, txn: object, trail: Trail | None, draft: AuditDraft | None) -> GatewayContext:
        return self


if TYPE_CHECKING:
    # mypy checks here that the gateway is a Backend of the KMIP server
    # framework (kmip_core.server.backend), as the dispatcher takes it.
    def _is_backend(gateway: GatewayContext) -> Backend:
        return gateway


class KeyProviderUnavailable(errors.OutcomeUnknown):
    """No KMS node answered, or one answered with something the gateway
    cannot pass on. Deriving from OutcomeUnknown puts it on the
    GENERAL_FAILURE row of the KMS's one error table; for a Decrypt nothing
    changed anywhere, so the host may simply retry."""


# --- Result Reasons from the KMS, passed on -----------------------------------------


def _reason_table() -> dict[ResultReason, type[errors.KmsError]]:
    """ResultReason -> the KmsError that the Dispatcher turns back into it.
    The first class listed for a reason wins (ItemNotFound before
    AttributeNotFound), so the round trip gives the KMS's own reason, in
    the 1.x or 2.0 spelling the host's request asked for."""
    table: dict[ResultReason, type[errors.KmsError]] = {}
    for cls, (reason_1x, reason_2x) in REASONS.items():
        table.setdefault(reason_1x, cls)
        table.setdefault(reason_2x, cls)
    table[ResultReason.GENERAL_FAILURE] = KeyProviderUnavailable
    return table


_FROM_KMS = _reason_table()


def _kms_failure(exc: KmipError, key_id: str) -> errors.KmsError:
    if exc.reason is None:
        # Nobody answered (or the answer was unusable): the KMS's own text
        # names nodes and network errors, which is for the broker's log.
        log.warning("unwrap of key %s: the key provider did not answer: %s", key_id, exc)
        return KeyProviderUnavailable("the key provider did not answer; try again later")
    cls = _FROM_KMS.get(exc.reason)
    if cls is None:
        return KeyProviderUnavailable(f"the key provider answered {exc.reason.name}")
    return cls(exc.message or exc.reason.name.replace("_", " ").lower())


# --- The operations -----------------------------------------------------------------


def _unwrap_parameters(payload: Item) -> None:
    """Unwrapping a key safe is AES-GCM (design note, "Key safe"). Anything
    else is refused here rather than forwarded, so that a host can never use
    a VM's KEK as a general decryption oracle in another mode."""
    params = crypto_params.crypto_parameters(payload.find(T.CRYPTOGRAPHIC_PARAMETERS.value))
    if params is None:
        return
    if params.block_cipher_mode not in (None, BlockCipherMode.GCM):
        raise errors.InvalidField("the gateway unwraps with AES-GCM only (Block Cipher Mode GCM)")
    if params.padding_method not in (None, PaddingMethod.NONE):
        raise errors.InvalidField("AES-GCM unwrapping takes no Padding Method")
    if params.cryptographic_algorithm not in (None, CryptographicAlgorithm.AES):
        raise errors.InvalidField("the gateway unwraps with AES-GCM only (Cryptographic Algorithm AES)")


def _target(key_id: str, decision: Decision) -> str:
    return f"key:{key_id}" + (f" vm:{decision.vm_uuid}" if decision.vm_uuid else "")


def gateway_decrypt(ctx: RequestContext, gateway: GatewayContext, payload: Item) -> list[Item]:
    """KMIP 1.4, 4.30 Decrypt, on behalf of a host: authorize with the trust
    registry, then Decrypt at the KMS with the broker's own identity."""
    request_fields.reject_streaming(payload)
    key_id = request_fields.unique_identifier(ctx, payload)
    data = request_fields.require(payload, T.DATA, ItemType.BYTE_STRING).value
    iv = request_fields.optional_bytes(payload, T.IV_COUNTER_NONCE)
    aad = request_fields.optional_bytes(payload, T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA)
    tag = request_fields.optional_bytes(payload, T.AUTHENTICATED_ENCRYPTION_TAG)
    _unwrap_parameters(payload)
    if iv is None:
        raise errors.MissingData("IV/Counter/Nonce is required to decrypt in GCM")
    if tag is None:
        raise errors.MissingData("Authenticated Encryption Tag is required to decrypt in GCM")

    principal = ctx.principal
    fingerprint = principal.fingerprint
    decision, attestation = gateway.registry.authorize_gateway_unwrap(fingerprint, key_id, ctx.ticket)
    # Named as the API names hosts in the trail ("host:<name>"), so one
    # host's records read alike whichever door it came through.
    actor = f"host:{decision.host}" if decision.host else principal.name
    # The broker's records and the KMS's Decrypt record carry this request's
    # id, and the KMS learns which host the broker acts for (request_scope).
    started = time.monotonic()
    with request_scope(ctx.request_id, f"host:{decision.host}" if decision.host else None):
        try:
            return _unwrap(ctx, gateway, decision, attestation, actor, key_id, (data, iv, aad, tag))
        finally:
            if gateway.metrics is not None:
                gateway.metrics.unwrap_seconds(time.monotonic() - started)


def _unwrap(
    ctx: RequestContext,
    gateway: GatewayContext,
    decision: Decision,
    attestation: AttestationCheck | None,
    actor: str,
    key_id: str,
    sealed: tuple[bytes, bytes, bytes | None, bytes],
) -> list[Item]:
    data, iv, aad, tag = sealed
    who = f"certificate sha256:{ctx.principal.fingerprint}, request {ctx.request_id}, from {ctx.peer}"
    reason = decision.reason
    if attestation is not None:
        # Host attestation (docs/attestation.md): a host a policy covers
        # shows a valid token, issued for its current boot, with each unwrap.
        if not attestation.allowed:
            gateway.registry.record_audit(
                actor, AUDIT_ACTION, _target(key_id, decision), False, f"attestation: {attestation.reason} ({who})"
            )
            log.info(
                "request %s: unwrap of key %s by %s refused: %s", ctx.request_id, key_id, actor, attestation.reason
            )
            _count(gateway, "attestation_refused")
            # The reason concerns the host's own token: it is told.
            if attestation.missing:
                raise errors.AttestationRequired(f"{attestation.reason}; attest (vtpm-host attest now) and retry")
            raise errors.AttestationFailed(f"{attestation.reason}; attest again and retry")
        if attestation.required:
            reason = f"{reason}; {attestation.reason}"
    if not decision.allowed:
        gateway.registry.record_audit(
            actor, AUDIT_ACTION, _target(key_id, decision), False, f"{decision.reason} ({who})"
        )
        log.info("request %s: unwrap of key %s by %s refused: %s", ctx.request_id, key_id, actor, decision.reason)
        _count(gateway, "refused")
        # The registry's reason goes to the audit trail and the log only: it
        # may name instances and VMs the host has no business knowing about.
        if decision.vm_uuid is None:
            raise errors.ItemNotFound("no such object")
        raise errors.PermissionDenied(f"this host may not unwrap key {key_id}")

    try:
        plaintext = gateway.kms_client.decrypt(key_id, data, iv=iv, aad=aad, tag=tag, mode=BlockCipherMode.GCM)
    except KmipError as exc:
        failure = _kms_failure(exc, key_id)
        kms_answer = exc.reason.name if exc.reason is not None else "no answer"
        gateway.registry.record_audit(
            actor,
            AUDIT_ACTION,
            _target(key_id, decision),
            True,
            f"{reason}; key provider: {kms_answer}, nothing returned ({who})",
        )
        _count(gateway, "kms_failure")
        raise failure from None
    # No DEK leaves without its audit record: if recording fails, the
    # Dispatcher answers GENERAL_FAILURE and the plaintext is dropped.
    gateway.registry.record_audit(
        actor, AUDIT_ACTION, _target(key_id, decision), True, f"{reason}; key returned ({who})"
    )
    log.info("request %s: unwrap of key %s by %s allowed", ctx.request_id, key_id, actor)
    _count(gateway, "allowed")
    return [request_fields.uid_item(key_id), ttlv.byte_string(T.DATA.value, plaintext)]


def _count(gateway: GatewayContext, result: str) -> None:
    if gateway.metrics is not None:
        gateway.metrics.unwrap(result)


def gateway_query(ctx: RequestContext, gateway: GatewayContext, payload: Item) -> list[Item]:
    """KMIP 1.4, 4.25 Query, answered for the gateway rather than the KMS:
    its own operations, no object types (it stores none), its own name."""
    functions = {i.value for i in payload.find_all(T.QUERY_FUNCTION.value)}
    out: list[Item] = []
    if QueryFunction.QUERY_OPERATIONS.value in functions:
        out += [
            ttlv.enumeration(T.OPERATION.value, op.value) for op in sorted(GATEWAY_OPERATIONS, key=lambda o: o.value)
        ]
    if QueryFunction.QUERY_SERVER_INFORMATION.value in functions:
        out.append(ttlv.text(T.VENDOR_IDENTIFICATION.value, VENDOR_IDENTIFICATION))
    return out


GATEWAY_OPERATIONS: dict[Operation, Handler] = {
    Operation.DISCOVER_VERSIONS: discover_versions.handle,
    Operation.QUERY: gateway_query,
    Operation.DECRYPT: gateway_decrypt,
}


def build_dispatcher(
    registry: UnwrapRegistry,
    kms_client: KeyProviderClient,
    node: str = "gateway",
    metrics: GatewayMetrics | None = None,
) -> Dispatcher:
    """The KMS core's Dispatcher with the gateway's three operations;
    `metrics`: broker.metrics.BrokerMetrics, or None."""
    # Storage retries do not apply: the gateway has no storage of its own
    # beneath the Dispatcher (the registry handles its own database).
    return Dispatcher(
        backend=GatewayContext(registry=registry, kms_client=kms_client, metrics=metrics),
        operations=dict(GATEWAY_OPERATIONS),
        node=node,
        retry_delays=(),
        metrics=metrics.gateway if metrics is not None else None,
    )


# --- Connections --------------------------------------------------------------------


def identify_host(certificate: crypto.X509 | None, peer: str, identity_mode: str = "cn") -> ConnectionInfo:
    """The host on the other end of a verified TLS connection: its
    certificate's CN (or what `identity_mode` names) and SHA-256
    fingerprint, which is what the trust registry knows hosts by."""
    if certificate is None:
        raise ValueError("no client certificate")
    identity = tls.peer_identity(certificate, identity_mode)
    principal = Principal(name=identity.name, subject=identity.subject, fingerprint=identity.fingerprint_sha256)
    log.info("gateway connection from %s: host %r (sha256:%s)", peer, principal.name, principal.fingerprint)
    return ConnectionInfo(principal=principal, peer=peer)


def build_gateway_factory(
    tls_config: TlsConfig,
    registry: UnwrapRegistry,
    kms_client: KeyProviderClient,
    reactor: Any,
    threadpool: ThreadPool,
    *,
    max_message_size: int = 65536,
    idle_timeout: float = 300,
    handshake_timeout: float = 10,
    max_connections: int = 1024,
    max_handshakes: int = 256,
    frame_timeout: float = 30,
    max_unsent_bytes: int = 4 << 20,
    max_unsent_bytes_total: int = 256 << 20,
    metrics: GatewayMetrics | None = None,
) -> tuple[limits.LimitedFactory, tls.ServerContextFactory]:
    """The gateway listener's protocol factory and TLS context factory:
    `reactor.listenSSL(port, factory, context_factory, interface=host)`.
    The factory is the `KmipFactory` inside the listener limits; its
    `drain()` and `close_all()` stop it.

    `tls_config.ca` is the broker's trust CA: only certificates it issued
    (or pinned ones in `tls_config.trusted_clients_dir`) get past the
    handshake. The caller owns `threadpool` (start it before listening,
    stop it after `factory.drain()` and `factory.close_all()`).
    Raises `kmip_core.tls.TlsConfigError` on unusable TLS settings.
    """
    # Hosts are the broker's own agents: no KMIP profile suite without
    # forward secrecy is needed here.
    context_factory = tls.server_context_factory(tls_config, kmip_suites=False)
    dispatcher = build_dispatcher(registry, kms_client, metrics=metrics)
    identity_mode = tls_config.identity

    def identify(certificate: crypto.X509 | None, peer: str) -> ConnectionInfo:
        return identify_host(certificate, peer, identity_mode)

    factory = KmipFactory(
        handle=dispatcher.handle,
        identify=identify,
        threadpool=threadpool,
        reactor=reactor,
        max_message_size=max_message_size,
        idle_timeout=idle_timeout,
        frame_timeout=frame_timeout,
        max_unsent_bytes=max_unsent_bytes,
        max_unsent_bytes_total=max_unsent_bytes_total,
    )
    listener = limits.LimitedFactory(
        factory,
        limits.ListenerLimits(
            max_connections=max_connections,
            max_handshakes=max_handshakes,
            handshake_timeout=handshake_timeout,
        ),
        reactor,
        name="gateway",
    )
    return listener, context_factory
