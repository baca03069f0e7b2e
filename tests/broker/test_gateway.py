"""Tests for broker.gateway: the host gateway's Decrypt through the KMS
core's Dispatcher, with a fake trust registry and a fake KMS client (no
sockets, no threads), and the listener wiring on Twisted's in-memory
transport with a real certificate."""

from __future__ import annotations

import base64
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from kmip.core.enums import (
    BatchErrorContinuationOption,
    BlockCipherMode,
    CredentialType,
    ObjectType,
    Operation,
    QueryFunction,
    ResultReason,
    ResultStatus,
    TicketType,
)
from kmip.core.enums import Tags as T
from twisted.internet.testing import StringTransport
from twisted_fakes import FakeReactor, InlineThreadPool

from broker import gateway
from broker.trust import AttestationCheck, Decision
from kmip_core import ttlv
from kmip_core.client import KmipError, NoNodeAvailable
from kmip_core.config import TlsConfig
from kmip_core.pki import fingerprint_sha256, init_pki
from kmip_core.policy import Principal
from kmip_core.server.dispatcher import ConnectionInfo
from kmip_core.ttlv import Item

KEK = "6f1c0d4e-kek-vm-1"
OTHER_KEK = "0a9b8c7d-kek-vm-2"
HOST_A_FP = "aa" * 32
HOST_B_FP = "bb" * 32
HOST_C_FP = "cc" * 32
STRANGER_FP = "dd" * 32
DEK = bytes(range(64))  # Recognisable in any encoding the tests look for.
WRAPPED = b"\x5a" * 64
IV = b"\x01" * 12
TAG = b"\x02" * 16

HOST_A = ConnectionInfo(principal=Principal("host:a", fingerprint=HOST_A_FP), peer="127.0.0.1:40001")
HOST_B = ConnectionInfo(principal=Principal("host:b", fingerprint=HOST_B_FP), peer="127.0.0.1:40002")
HOST_C = ConnectionInfo(principal=Principal("host:c", fingerprint=HOST_C_FP), peer="127.0.0.1:40003")
STRANGER = ConnectionInfo(principal=Principal("host:x", fingerprint=STRANGER_FP), peer="127.0.0.1:40004")


# Fakes.
@dataclass
class FakeRegistry:
    """Instance A registered hosts a and b and placed vm-1 (KEK) on a;
    host c belongs to instance B; anyone else is unknown. Decisions are
    shaped as broker.trust.Registry makes them: vm_uuid only when the key
    is a VM of the host's own instance."""

    audit: list[tuple] = field(default_factory=list)
    asked: list[tuple[str, str]] = field(default_factory=list)
    fail_audit: bool = False
    # Host attestation: hosts that must attest, and the one valid token.
    must_attest: set = field(default_factory=set)
    valid_ticket: bytes = b"vat1.good"
    tickets: list = field(default_factory=list)

    def check_attestation(self, host: str, instance: str, ticket: bytes | None) -> AttestationCheck:
        self.tickets.append((host, instance, ticket))
        if host not in self.must_attest:
            return AttestationCheck(True, False, "no attestation policy covers this host")
        if ticket is None:
            return AttestationCheck(False, True, "attestation required: the request carries no token", True)
        if ticket != self.valid_ticket:
            return AttestationCheck(False, True, "attestation token unknown (not issued to this host)")
        return AttestationCheck(True, True, "attested under policy default")

    def authorize_gateway_unwrap(
        self, host_fingerprint: str, kms_key_id: str, ticket: bytes | None
    ) -> tuple[Decision, AttestationCheck | None]:
        # As broker.registry.policy: placement first, attestation only when it allows.
        decision = self.authorize_unwrap(host_fingerprint, kms_key_id)
        if not decision.allowed or decision.host is None:
            return decision, None
        return decision, self.check_attestation(decision.host, str(decision.instance), ticket)

    def authorize_unwrap(self, host_fingerprint: str, kms_key_id: str) -> Decision:
        self.asked.append((host_fingerprint, kms_key_id))
        host = {HOST_A_FP: "a", HOST_B_FP: "b", HOST_C_FP: "c"}.get(host_fingerprint)
        if host is None:
            return Decision(False, "host certificate is not registered", None, None, None)
        if host == "c":
            if kms_key_id == KEK:
                return Decision(False, "key belongs to a VM of another instance", "c", "instance-b", None)
            return Decision(False, "key is not the KEK of any registered VM", "c", "instance-b", None)
        if kms_key_id != KEK:
            return Decision(False, "key is not the KEK of any registered VM", host, "instance-a", None)
        if host == "b":
            return Decision(False, "VM is placed on host a, not on this host", "b", "instance-a", "vm-1")
        return Decision(True, "VM is placed on this host by its trusted instance", "a", "instance-a", "vm-1")

    def record_audit(self, actor: str, action: str, target: str, allowed: bool, reason: str) -> None:
        if self.fail_audit:
            raise RuntimeError("audit database unavailable")
        self.audit.append((actor, action, target, allowed, reason))


@dataclass
class FakeKms:
    """Decrypts WRAPPED under KEK with IV and TAG to DEK; `error` makes
    every call fail instead."""

    error: Exception | None = None
    calls: list[dict] = field(default_factory=list)

    def decrypt(self, uid, data, iv=None, aad=None, tag=None, mode="GCM", padding=None):
        self.calls.append(
            {"uid": uid, "data": data, "iv": iv, "aad": aad, "tag": tag, "mode": mode, "padding": padding}
        )
        if self.error is not None:
            raise self.error
        if (uid, data, iv, tag) != (KEK, WRAPPED, IV, TAG):
            raise KmipError(ResultReason.CRYPTOGRAPHIC_FAILURE, "authentication tag mismatch", "kms-1:5696")
        return DEK


# Request builders and response readers.
def version_item(version):
    return ttlv.structure(
        T.PROTOCOL_VERSION.value,
        [
            ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, version[0]),
            ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, version[1]),
        ],
    )


def batch_item(operation: Operation, payload: list | None) -> Item:
    return ttlv.structure(
        T.BATCH_ITEM.value,
        [
            ttlv.enumeration(T.OPERATION.value, operation.value),
            ttlv.structure(T.REQUEST_PAYLOAD.value, payload) if payload is not None else None,
        ],
    )


def ticket_authentication(ticket: bytes) -> Item:
    return ttlv.structure(
        T.AUTHENTICATION.value,
        [
            ttlv.structure(
                T.CREDENTIAL.value,
                [
                    ttlv.enumeration(T.CREDENTIAL_TYPE.value, CredentialType.TICKET.value),
                    ttlv.structure(
                        T.CREDENTIAL_VALUE.value,
                        [
                            ttlv.enumeration(T.TICKET_TYPE.value, TicketType.LOGIN.value),
                            ttlv.byte_string(T.TICKET_VALUE.value, ticket),
                        ],
                    ),
                ],
            )
        ],
    )


def request(items: list[Item], version=(1, 4), continuation=None, ticket: bytes | None = None) -> bytes:
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            version_item(version),
            ticket_authentication(ticket) if ticket is not None else None,
            ttlv.enumeration(T.BATCH_ERROR_CONTINUATION_OPTION.value, continuation.value) if continuation else None,
            ttlv.integer(T.BATCH_COUNT.value, len(items)),
        ],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, *items]))


def decrypt_payload(uid=KEK, data=WRAPPED, iv=IV, tag=TAG, mode=BlockCipherMode.GCM, extra=()) -> list[Item]:
    return [
        ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
        ttlv.structure(T.CRYPTOGRAPHIC_PARAMETERS.value, [ttlv.enumeration(T.BLOCK_CIPHER_MODE.value, mode.value)])
        if mode is not None
        else None,
        ttlv.byte_string(T.DATA.value, data),
        ttlv.byte_string(T.IV_COUNTER_NONCE.value, iv) if iv is not None else None,
        ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, tag) if tag is not None else None,
        *extra,
    ]


def decrypt_request(version=(1, 4), ticket: bytes | None = None, **kwargs) -> bytes:
    return request([batch_item(Operation.DECRYPT, decrypt_payload(**kwargs))], version, ticket=ticket)


def header_version(response: Item) -> tuple[int, int]:
    pv = response.find(T.RESPONSE_HEADER.value).find(T.PROTOCOL_VERSION.value)
    return pv.get(T.PROTOCOL_VERSION_MAJOR.value), pv.get(T.PROTOCOL_VERSION_MINOR.value)


def only_item(response: Item) -> Item:
    items = response.find_all(T.BATCH_ITEM.value)
    assert len(items) == 1
    return items[0]


def reason(item: Item) -> ResultReason | None:
    value = item.get(T.RESULT_REASON.value)
    return None if value is None else ResultReason(value)


def succeeded(item: Item) -> bool:
    return item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value


@pytest.fixture
def registry():
    return FakeRegistry()


@pytest.fixture
def kms():
    return FakeKms()


@pytest.fixture
def dispatcher(registry, kms):
    return gateway.build_dispatcher(registry, kms)


def handle(dispatcher, data: bytes, conn=HOST_A) -> Item:
    raw = dispatcher.handle(data, conn)
    assert raw is not None
    return ttlv.decode(raw)


def dek_encodings() -> list[str]:
    return [DEK.hex(), DEK.hex().upper(), base64.b64encode(DEK).decode(), repr(DEK), DEK.decode("latin-1")]


def assert_no_dek(text: str) -> None:
    for encoding in dek_encodings():
        assert encoding not in text


# Decrypt: the policy.
def test_allowed_host_gets_the_dek_and_the_decision_is_audited(dispatcher, registry, kms, caplog):
    """A registered host holding the VM gets the KMS's plaintext back; one
    audit record says so, naming host, key and VM, without the DEK."""
    caplog.set_level(logging.DEBUG)
    item = only_item(handle(dispatcher, decrypt_request()))
    assert succeeded(item), item.get(T.RESULT_MESSAGE.value)
    payload = item.find(T.RESPONSE_PAYLOAD.value)
    assert payload.get(T.UNIQUE_IDENTIFIER.value) == KEK
    assert payload.get(T.DATA.value) == DEK
    assert registry.asked == [(HOST_A_FP, KEK)]
    assert kms.calls == [
        {"uid": KEK, "data": WRAPPED, "iv": IV, "aad": None, "tag": TAG, "mode": BlockCipherMode.GCM, "padding": None}
    ]
    assert len(registry.audit) == 1
    actor, action, target, allowed, why = registry.audit[0]
    assert (actor, action, allowed) == ("host:a", gateway.AUDIT_ACTION, True)
    assert KEK in target and "vm-1" in target
    assert HOST_A_FP in why and "key returned" in why
    for record in registry.audit:
        for value in record:
            assert not isinstance(value, bytes)
            assert_no_dek(str(value))
    assert_no_dek(caplog.text)


def test_a_batch_run_with_undo_is_answered_item_by_item(dispatcher, registry, kms):
    """The gateway is a Backend of the framework like the keystore: a batch
    with Batch Error Continuation Option Undo runs (its operations change
    nothing the gateway stores, so there is nothing to roll back). Two good
    unwraps both succeed; a good one then a refused one: the first is
    answered Operation Undone, the second with its own reason."""
    from kmip.core.enums import BatchErrorContinuationOption

    undo = BatchErrorContinuationOption.UNDO
    good = batch_item(Operation.DECRYPT, decrypt_payload())
    response = handle(dispatcher, request([good, good], continuation=undo))
    items = response.find_all(T.BATCH_ITEM.value)
    assert [succeeded(i) for i in items] == [True, True]
    assert [i.find(T.RESPONSE_PAYLOAD.value).get(T.DATA.value) for i in items] == [DEK, DEK]

    not_gcm = batch_item(Operation.DECRYPT, decrypt_payload(mode=BlockCipherMode.CBC))
    response = handle(dispatcher, request([good, not_gcm], continuation=undo))
    first, second = response.find_all(T.BATCH_ITEM.value)
    assert first.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_UNDONE.value
    assert second.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value
    assert reason(second) != ResultReason.GENERAL_FAILURE


def test_additional_data_is_forwarded(dispatcher, kms):
    aad = ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA.value, b"vm-1")
    handle(dispatcher, request([batch_item(Operation.DECRYPT, decrypt_payload(extra=[aad]))]))
    assert kms.calls[0]["aad"] == b"vm-1"


def test_unknown_host_gets_item_not_found(dispatcher, registry, kms):
    """A certificate the registry does not know may not learn that the key
    exists; the refusal is audited and the KMS is never asked."""
    item = only_item(handle(dispatcher, decrypt_request(), STRANGER))
    assert reason(item) == ResultReason.ITEM_NOT_FOUND
    assert kms.calls == []
    [(actor, action, target, allowed, why)] = registry.audit
    assert (actor, allowed) == ("host:x", False)
    assert "not registered" in why and STRANGER_FP in why
    assert KEK in target


def test_host_of_the_same_instance_not_holding_the_vm_gets_permission_denied(dispatcher, registry, kms):
    """host b belongs to the VM's instance but vm-1 is placed on host a:
    PERMISSION_DENIED, and the registry's reason (which names another host)
    stays in the audit trail, out of the answer."""
    item = only_item(handle(dispatcher, decrypt_request(), HOST_B))
    assert reason(item) == ResultReason.PERMISSION_DENIED
    assert "host a" not in item.get(T.RESULT_MESSAGE.value)
    assert kms.calls == []
    [(actor, _, target, allowed, why)] = registry.audit
    assert (actor, allowed) == ("host:b", False)
    assert "vm:vm-1" in target and "host a" in why


def test_host_of_another_instance_gets_item_not_found(dispatcher, registry, kms):
    """host c is registered, by another instance: the VM is none of its
    business, so it is told the same as for a key that does not exist."""
    for uid in (KEK, "no-such-key"):
        item = only_item(handle(dispatcher, decrypt_request(uid=uid), HOST_C))
        assert reason(item) == ResultReason.ITEM_NOT_FOUND
        assert item.get(T.RESULT_MESSAGE.value) == "no such object"
    assert kms.calls == []
    assert [(r[0], r[3]) for r in registry.audit] == [("host:c", False), ("host:c", False)]
    assert "another instance" in registry.audit[0][4]


def test_registered_host_asking_for_a_key_of_no_vm_gets_item_not_found(dispatcher, kms):
    item = only_item(handle(dispatcher, decrypt_request(uid="no-such-key"), HOST_A))
    assert reason(item) == ResultReason.ITEM_NOT_FOUND
    assert kms.calls == []


@pytest.mark.parametrize(
    "operation, payload",
    [
        (Operation.CREATE, [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value)]),
        (Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, KEK)]),
        (Operation.LOCATE, []),
        (Operation.ENCRYPT, decrypt_payload()),
        (Operation.GET_ATTRIBUTES, [ttlv.text(T.UNIQUE_IDENTIFIER.value, KEK)]),
        (Operation.DESTROY, [ttlv.text(T.UNIQUE_IDENTIFIER.value, KEK)]),
        (Operation.REVOKE, [ttlv.text(T.UNIQUE_IDENTIFIER.value, KEK)]),
    ],
    ids=lambda v: v.name if isinstance(v, Operation) else "",
)
def test_other_operations_are_not_supported(dispatcher, registry, kms, operation, payload):
    """Even the host allowed to unwrap the KEK cannot Get, Create, Locate or
    use it otherwise: the gateway's table has no such operations."""
    item = only_item(handle(dispatcher, request([batch_item(operation, payload)])))
    assert reason(item) == ResultReason.OPERATION_NOT_SUPPORTED
    assert registry.asked == [] and kms.calls == []


# Decrypt: malformed or out-of-policy requests.
@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"tag": None}, ResultReason.MISSING_DATA),
        ({"iv": None}, ResultReason.MISSING_DATA),
        ({"mode": BlockCipherMode.ECB}, ResultReason.INVALID_FIELD),
        ({"mode": BlockCipherMode.CBC}, ResultReason.INVALID_FIELD),
    ],
    ids=["no tag", "no iv", "ECB", "CBC"],
)
def test_unwrap_is_aes_gcm_only(dispatcher, registry, kms, kwargs, expected):
    """A host may not use a KEK as a decryption oracle in another mode."""
    item = only_item(handle(dispatcher, decrypt_request(**kwargs)))
    assert reason(item) == expected
    assert kms.calls == []


def test_missing_data_field(dispatcher, kms):
    payload = [ttlv.text(T.UNIQUE_IDENTIFIER.value, KEK), ttlv.byte_string(T.IV_COUNTER_NONCE.value, IV)]
    item = only_item(handle(dispatcher, request([batch_item(Operation.DECRYPT, payload)])))
    assert reason(item) == ResultReason.MISSING_DATA
    assert kms.calls == []


def test_data_of_the_wrong_type(dispatcher, kms):
    payload = [ttlv.text(T.UNIQUE_IDENTIFIER.value, KEK), ttlv.text(T.DATA.value, "not bytes")]
    item = only_item(handle(dispatcher, request([batch_item(Operation.DECRYPT, payload)])))
    assert reason(item) == ResultReason.INVALID_FIELD


def test_bytes_that_are_not_ttlv_close_the_connection(dispatcher):
    assert dispatcher.handle(b"\x00" * 3 + b"garbage", HOST_A) is None


# Decrypt: the KMS's answers.
@pytest.mark.parametrize(
    "kms_reason, version, expected",
    [
        (ResultReason.ITEM_NOT_FOUND, (1, 4), ResultReason.ITEM_NOT_FOUND),
        (ResultReason.CRYPTOGRAPHIC_FAILURE, (1, 4), ResultReason.CRYPTOGRAPHIC_FAILURE),
        (ResultReason.PERMISSION_DENIED, (1, 4), ResultReason.PERMISSION_DENIED),
        (ResultReason.ILLEGAL_OPERATION, (1, 4), ResultReason.ILLEGAL_OPERATION),
        (ResultReason.ILLEGAL_OPERATION, (2, 0), ResultReason.WRONG_KEY_LIFECYCLE_STATE),
        (ResultReason.KEY_VALUE_NOT_PRESENT, (1, 4), ResultReason.KEY_VALUE_NOT_PRESENT),
        (ResultReason.GENERAL_FAILURE, (1, 4), ResultReason.GENERAL_FAILURE),
    ],
)
def test_kms_failures_are_passed_on(registry, kms_reason, version, expected):
    """The host gets the Result Reason the KMS gave (in the spelling of the
    host's protocol version); the audit record says the unwrap was allowed
    and what the KMS answered."""
    kms = FakeKms(error=KmipError(kms_reason, "the key provider's message", "kms-1:5696"))
    dispatcher = gateway.build_dispatcher(registry, kms)
    item = only_item(handle(dispatcher, decrypt_request(version=version)))
    assert reason(item) == expected
    assert item.find(T.RESPONSE_PAYLOAD.value) is None
    [(_, _, _, allowed, why)] = registry.audit
    assert allowed is True and kms_reason.name in why


def test_wrong_tag_is_a_cryptographic_failure(dispatcher):
    item = only_item(handle(dispatcher, decrypt_request(tag=b"\x00" * 16)))
    assert reason(item) == ResultReason.CRYPTOGRAPHIC_FAILURE


def test_no_kms_node_is_a_general_failure(registry):
    """Every KMS node down: GENERAL_FAILURE with a message that names no
    node or address of the KMS cluster."""
    kms = FakeKms(
        error=NoNodeAvailable("DECRYPT", [("10.0.0.1:5696", "connection refused"), ("10.0.0.2:5696", "timed out")])
    )
    dispatcher = gateway.build_dispatcher(registry, kms)
    item = only_item(handle(dispatcher, decrypt_request()))
    assert reason(item) == ResultReason.GENERAL_FAILURE
    assert "10.0.0" not in item.get(T.RESULT_MESSAGE.value)
    [(_, _, _, allowed, why)] = registry.audit
    assert allowed is True and "no answer" in why


def test_no_dek_without_an_audit_record(registry, kms):
    """If the decision cannot be recorded, the DEK is not handed out."""
    registry.fail_audit = True
    dispatcher = gateway.build_dispatcher(registry, kms)
    response = handle(dispatcher, decrypt_request())
    item = only_item(response)
    assert reason(item) == ResultReason.GENERAL_FAILURE
    assert DEK not in ttlv.encode(response)


# Versions, batches, the other two operations.
@pytest.mark.parametrize("version", [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0)])
def test_answered_in_the_request_version(dispatcher, version):
    response = handle(dispatcher, decrypt_request(version=version))
    assert header_version(response) == version
    assert only_item(response).find(T.RESPONSE_PAYLOAD.value).get(T.DATA.value) == DEK


@pytest.mark.parametrize("version", [(1, 1), (1, 4), (2, 0)])
def test_refusal_answered_in_the_request_version(dispatcher, version):
    response = handle(dispatcher, decrypt_request(version=version), HOST_B)
    assert header_version(response) == version
    assert reason(only_item(response)) == ResultReason.PERMISSION_DENIED


def test_batch_with_continue_answers_each_item(dispatcher, registry):
    """One message, three items: allowed, refused, not supported; each is
    answered and audited on its own."""
    data = request(
        [
            batch_item(Operation.DECRYPT, decrypt_payload()),
            batch_item(Operation.DECRYPT, decrypt_payload(uid=OTHER_KEK)),
            batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, KEK)]),
        ],
        continuation=BatchErrorContinuationOption.CONTINUE,
    )
    items = handle(dispatcher, data).find_all(T.BATCH_ITEM.value)
    assert [succeeded(i) for i in items] == [True, False, False]
    assert [reason(i) for i in items[1:]] == [ResultReason.ITEM_NOT_FOUND, ResultReason.OPERATION_NOT_SUPPORTED]
    assert [r[3] for r in registry.audit] == [True, False]


def test_discover_versions(dispatcher):
    item = only_item(handle(dispatcher, request([batch_item(Operation.DISCOVER_VERSIONS, [])])))
    versions = [
        (pv.get(T.PROTOCOL_VERSION_MAJOR.value), pv.get(T.PROTOCOL_VERSION_MINOR.value))
        for pv in item.find(T.RESPONSE_PAYLOAD.value).find_all(T.PROTOCOL_VERSION.value)
    ]
    # The gateway speaks every version the KMS dispatcher does, newest first.
    from kmip_core.server.dispatcher import SUPPORTED_VERSIONS

    assert versions == list(SUPPORTED_VERSIONS) and (1, 0) in versions


def test_query_names_the_gateway_and_its_three_operations(dispatcher, registry):
    payload = [
        ttlv.enumeration(T.QUERY_FUNCTION.value, QueryFunction.QUERY_OPERATIONS.value),
        ttlv.enumeration(T.QUERY_FUNCTION.value, QueryFunction.QUERY_OBJECTS.value),
        ttlv.enumeration(T.QUERY_FUNCTION.value, QueryFunction.QUERY_SERVER_INFORMATION.value),
    ]
    item = only_item(handle(dispatcher, request([batch_item(Operation.QUERY, payload)]), STRANGER))
    answer = item.find(T.RESPONSE_PAYLOAD.value)
    assert {Operation(i.value) for i in answer.find_all(T.OPERATION.value)} == {
        Operation.DISCOVER_VERSIONS,
        Operation.QUERY,
        Operation.DECRYPT,
    }
    assert answer.find_all(T.OBJECT_TYPE.value) == []
    assert answer.get(T.VENDOR_IDENTIFICATION.value).startswith("vtpm-broker gateway")
    assert registry.asked == []


# The listener: identity from the certificate, and the factory's wiring.
@pytest.fixture(scope="module")
def trust_pki(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("trust")
    init_pki(directory, server_names=["localhost"], clients=["host-a"])
    return directory


def test_identify_host_uses_the_certificate_fingerprint(trust_pki):
    cert = x509.load_pem_x509_certificate((trust_pki / "host-a.pem").read_bytes())
    conn = gateway.identify_host(cert, "127.0.0.1:40001")
    assert conn.principal.name == "host-a"
    assert conn.principal.fingerprint == fingerprint_sha256(cert)
    assert conn.peer == "127.0.0.1:40001"
    with pytest.raises(ValueError):
        gateway.identify_host(None, "127.0.0.1:40001")


def test_factory_serves_decrypt_to_the_certificate_it_identified(trust_pki, kms):
    """build_gateway_factory: the KMS core's wire layer, identity from the
    peer certificate's fingerprint, the gateway's dispatcher behind it."""
    from OpenSSL import crypto

    cert = x509.load_pem_x509_certificate((trust_pki / "host-a.pem").read_bytes())
    fingerprint = fingerprint_sha256(cert)

    class Registry(FakeRegistry):
        def authorize_unwrap(self, host_fingerprint, kms_key_id):
            return super().authorize_unwrap(
                HOST_A_FP if host_fingerprint == fingerprint else host_fingerprint, kms_key_id
            )

    registry = Registry()
    tls_config = TlsConfig(
        cert=trust_pki / "server.pem",
        key=trust_pki / "server.key",
        ca=trust_pki / "ca.pem",
        trusted_clients_dir=trust_pki / "no-pins",
        identity="cn",
        min_version="1.2",
    )
    factory, context_factory = gateway.build_gateway_factory(
        tls_config, registry, kms, FakeReactor(), InlineThreadPool(), max_message_size=4096
    )
    assert context_factory.getContext() is not None
    assert factory.wrappedFactory.max_message_size == 4096

    class Transport(StringTransport):
        def getPeerCertificate(self):
            return crypto.X509.from_cryptography(cert)

    proto = factory.buildProtocol(None)
    transport = Transport()
    proto.makeConnection(transport)
    proto.handshakeCompleted()
    proto.dataReceived(decrypt_request())
    response = ttlv.decode(transport.value())
    assert only_item(response).find(T.RESPONSE_PAYLOAD.value).get(T.DATA.value) == DEK
    assert registry.audit[0][0] == "host:a"

    # A message over the limit closes the connection before it is buffered.
    transport.clear()
    big = decrypt_request(data=os.urandom(8192))
    proto.dataReceived(big[:16])
    assert transport.disconnecting


def test_the_trust_registry_has_what_the_gateway_calls():
    """broker.trust.Registry fits UnwrapRegistry: same methods, same
    parameter names (the gateway calls them positionally)."""
    import inspect

    from broker.trust import Registry

    for name in ("authorize_gateway_unwrap", "record_audit"):
        wanted = list(inspect.signature(getattr(gateway.UnwrapRegistry, name)).parameters)
        assert list(inspect.signature(getattr(Registry, name)).parameters) == wanted


# Host attestation (docs/attestation.md).
@pytest.mark.parametrize("version", [(1, 4), (2, 0)])
def test_a_host_that_must_attest_and_sends_no_token_gets_attestation_required(dispatcher, registry, kms, version):
    """No ticket from a host a policy covers: ATTESTATION_REQUIRED, the KMS
    is never asked, the refusal is in the trail."""
    registry.must_attest.add("a")
    item = only_item(handle(dispatcher, decrypt_request(version)))
    assert reason(item) == ResultReason.ATTESTATION_REQUIRED
    assert "vtpm-host attest" in item.get(T.RESULT_MESSAGE.value)
    assert kms.calls == []
    [(actor, action, target, allowed, why)] = registry.audit
    assert (actor, action, allowed) == ("host:a", gateway.AUDIT_ACTION, False)
    assert why.startswith("attestation: attestation required") and KEK in target


def test_a_wrong_token_gets_attestation_failed_and_is_audited(dispatcher, registry, kms):
    registry.must_attest.add("a")
    item = only_item(handle(dispatcher, decrypt_request(ticket=b"vat1.forged")))
    assert reason(item) == ResultReason.ATTESTATION_FAILED
    assert kms.calls == []
    [(actor, _, _, allowed, why)] = registry.audit
    assert actor == "host:a" and not allowed and "token unknown" in why
    # The token never reaches the trail or the answer.
    assert "forged" not in why and "forged" not in item.get(T.RESULT_MESSAGE.value)


@pytest.mark.parametrize("version", [(1, 2), (1, 4), (2, 0)])
def test_a_valid_token_in_a_ticket_credential_unwraps(dispatcher, registry, kms, version):
    registry.must_attest.add("a")
    item = only_item(handle(dispatcher, decrypt_request(version, ticket=registry.valid_ticket)))
    assert succeeded(item), item.get(T.RESULT_MESSAGE.value)
    assert item.find(T.RESPONSE_PAYLOAD.value).get(T.DATA.value) == DEK
    assert registry.tickets == [("a", "instance-a", registry.valid_ticket)]
    [(_, _, _, allowed, why)] = registry.audit
    assert allowed and "attested under policy default" in why


def test_attestation_is_not_asked_before_the_placement_allows(dispatcher, registry, kms):
    """A host refused by placement is refused as before (PERMISSION_DENIED),
    whatever its attestation: the check comes after."""
    registry.must_attest.add("b")
    item = only_item(handle(dispatcher, decrypt_request(), conn=HOST_B))
    assert reason(item) == ResultReason.PERMISSION_DENIED
    assert registry.tickets == []
