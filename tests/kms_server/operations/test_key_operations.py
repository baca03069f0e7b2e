"""Key operations (Get, Register, CreateKeyPair, ReKey, Encrypt, Decrypt,
MAC, Sign, Signature Verify) through the real Dispatcher, over the
in-memory storage and a barrier with a random master key."""

from __future__ import annotations

import datetime
import os
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kmip.core.enums import (
    BlockCipherMode,
    CertificateType,
    CryptographicAlgorithm,
    CryptographicUsageMask,
    DerivationMethod,
    DigitalSignatureAlgorithm,
    EncodingOption,
    HashingAlgorithm,
    KeyFormatType,
    KeyWrapType,
    LinkType,
    ObjectType,
    Operation,
    PaddingMethod,
    ProtectionLevel,
    RecommendedCurve,
    ResultReason,
    ResultStatus,
    RevocationReasonCode,
    SecretDataType,
    SplitKeyMethod,
    State,
    StorageStatusMask,
    Tags,
    UsageLimitsUnit,
    ValidityIndicator,
    WrappingMethod,
)

from kmip_core import ttlv
from kmip_core.policy import Principal, Role
from kmip_core.sealing.barrier import Barrier
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher
from kmip_core.ttlv import Item
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage, sql

T = Tags
V1_1, V1_4, V2_0 = (1, 1), (1, 4), (2, 0)
U = CryptographicUsageMask


class Client:
    """Sends one-item request messages through a Dispatcher as `principal`."""

    def __init__(
        self, dispatcher: Dispatcher, name: str, role: Role = Role.USER, version=V1_4
    ):
        self.dispatcher = dispatcher
        self.conn = ConnectionInfo(Principal(name, role), "test")
        self.version = version

    def batch(
        self, items: list[tuple[Operation, list[Item]]], version=None
    ) -> list[Item]:
        version = version or self.version
        header = ttlv.structure(
            T.REQUEST_HEADER.value,
            [
                ttlv.structure(
                    T.PROTOCOL_VERSION.value,
                    [
                        ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, version[0]),
                        ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, version[1]),
                    ],
                ),
                ttlv.integer(T.BATCH_COUNT.value, len(items)),
            ],
        )
        batch_items = [
            ttlv.structure(
                T.BATCH_ITEM.value,
                [
                    ttlv.enumeration(T.OPERATION.value, op.value),
                    ttlv.structure(T.REQUEST_PAYLOAD.value, payload),
                ],
            )
            for op, payload in items
        ]
        message = ttlv.structure(T.REQUEST_MESSAGE.value, [header, *batch_items])
        response = ttlv.decode(self.dispatcher.handle(ttlv.encode(message), self.conn))
        return response.find_all(T.BATCH_ITEM.value)

    def call(self, op: Operation, payload: list[Item], version=None) -> Item:
        (item,) = self.batch([(op, payload)], version)
        return item

    def ok(self, op: Operation, payload: list[Item], version=None) -> Item:
        item = self.call(op, payload, version)
        assert item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value, item.get(
            T.RESULT_MESSAGE.value
        )
        return item.find(T.RESPONSE_PAYLOAD.value)

    def fails(
        self, op: Operation, payload: list[Item], reason: ResultReason, version=None
    ) -> str:
        item = self.call(op, payload, version)
        assert item.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value
        assert item.get(T.RESULT_REASON.value) == reason.value, (
            ResultReason(item.get(T.RESULT_REASON.value)),
            item.get(T.RESULT_MESSAGE.value),
        )
        return item.get(T.RESULT_MESSAGE.value) or ""


# Request building helpers.
def uid_item(uid: str) -> Item:
    return ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)


def attribute(name: str, value: Item) -> Item:
    return ttlv.structure(
        T.ATTRIBUTE.value,
        [ttlv.text(T.ATTRIBUTE_NAME.value, name), value.retag(T.ATTRIBUTE_VALUE.value)],
    )


def template(*attributes: Item, tag: Tags = T.TEMPLATE_ATTRIBUTE) -> Item:
    return ttlv.structure(tag.value, attributes)


def algorithm(value: CryptographicAlgorithm) -> Item:
    return ttlv.enumeration(T.CRYPTOGRAPHIC_ALGORITHM.value, value.value)


def length(bits: int) -> Item:
    return ttlv.integer(T.CRYPTOGRAPHIC_LENGTH.value, bits)


def usage(mask: int) -> Item:
    return ttlv.integer(T.CRYPTOGRAPHIC_USAGE_MASK.value, mask)


def v1_attributes(*items: Item, tag: Tags = T.TEMPLATE_ATTRIBUTE) -> Item:
    """A 1.x Template-Attribute from 2.0-style attribute items."""
    names = {
        T.CRYPTOGRAPHIC_ALGORITHM.value: "Cryptographic Algorithm",
        T.CRYPTOGRAPHIC_LENGTH.value: "Cryptographic Length",
        T.CRYPTOGRAPHIC_USAGE_MASK.value: "Cryptographic Usage Mask",
        T.ACTIVATION_DATE.value: "Activation Date",
        T.CRYPTOGRAPHIC_PARAMETERS.value: "Cryptographic Parameters",
        T.CRYPTOGRAPHIC_DOMAIN_PARAMETERS.value: "Cryptographic Domain Parameters",
        T.NAME.value: "Name",
        T.USAGE_LIMITS.value: "Usage Limits",
        T.CERTIFICATE_TYPE.value: "Certificate Type",
    }
    return template(*(attribute(names[i.tag], i) for i in items), tag=tag)


def params(**fields) -> Item:
    tags = {
        "mode": (T.BLOCK_CIPHER_MODE, ttlv.enumeration),
        "padding": (T.PADDING_METHOD, ttlv.enumeration),
        "hashing": (T.HASHING_ALGORITHM, ttlv.enumeration),
        "signature": (T.DIGITAL_SIGNATURE_ALGORITHM, ttlv.enumeration),
        "algorithm": (T.CRYPTOGRAPHIC_ALGORITHM, ttlv.enumeration),
        "tag_length": (T.TAG_LENGTH, ttlv.integer),
        "random_iv": (T.RANDOM_IV, ttlv.boolean),
        "p_source": (T.P_SOURCE, ttlv.byte_string),
    }
    items = []
    for key, value in fields.items():
        t, make = tags[key]
        items.append(make(t.value, getattr(value, "value", value)))
    return ttlv.structure(T.CRYPTOGRAPHIC_PARAMETERS.value, items)


def key_block(fmt: KeyFormatType, material: Item | bytes, alg=None, bits=None) -> Item:
    if isinstance(material, bytes):
        material = ttlv.byte_string(T.KEY_MATERIAL.value, material)
    return ttlv.structure(
        T.KEY_BLOCK.value,
        [
            ttlv.enumeration(T.KEY_FORMAT_TYPE.value, fmt.value),
            ttlv.structure(T.KEY_VALUE.value, [material]),
            algorithm(alg) if alg is not None else None,
            length(bits) if bits is not None else None,
        ],
    )


@pytest.fixture
def keystore():
    return Keystore(open_storage("memory://"), Barrier(os.urandom(32)))


@pytest.fixture
def dispatcher(keystore):
    return Dispatcher(keystore, OPERATIONS)


@pytest.fixture
def alice(dispatcher):
    return Client(dispatcher, "alice")


@pytest.fixture
def bob(dispatcher):
    return Client(dispatcher, "bob")


def create_aes(
    client: Client,
    bits=256,
    mask=U.ENCRYPT.value | U.DECRYPT.value,
    activate=True,
    version=None,
    extra=(),
):
    payload = client.ok(
        Operation.CREATE,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            v1_attributes(
                algorithm(CryptographicAlgorithm.AES), length(bits), usage(mask), *extra
            ),
        ],
        version=V1_4 if version is None or version < V2_0 else version,
    )
    uid = payload.get(T.UNIQUE_IDENTIFIER.value)
    if activate:
        client.ok(Operation.ACTIVATE, [uid_item(uid)])
    return uid


def get(client: Client, uid: str, *extra: Item, version=None) -> Item:
    return client.ok(Operation.GET, [uid_item(uid), *extra], version)


def key_material(get_payload: Item) -> Item:
    obj = get_payload.children()[2]
    block = obj.find(T.KEY_BLOCK.value)
    return block.find(T.KEY_VALUE.value).find(T.KEY_MATERIAL.value)


# ---------------------------------------------------------------------------
# Get
# ---------------------------------------------------------------------------


def test_get_symmetric_key_is_what_vcenter_expects(alice):
    """vCenter (KMIP 1.1) reads exactly: Object Type, Unique Identifier and
    a Symmetric Key whose Key Block holds Raw 32-byte Key Material, AES and
    256."""
    uid = create_aes(alice, activate=False)
    payload = get(alice, uid, version=V1_1)
    object_type, uid_field, key = payload.children()
    assert (object_type.tag, object_type.value) == (
        T.OBJECT_TYPE.value,
        ObjectType.SYMMETRIC_KEY.value,
    )
    assert (uid_field.tag, uid_field.value) == (T.UNIQUE_IDENTIFIER.value, uid)
    assert key.tag == T.SYMMETRIC_KEY.value
    (block,) = key.children()
    assert [c.tag for c in block.children()] == [
        T.KEY_FORMAT_TYPE.value,
        T.KEY_VALUE.value,
        T.CRYPTOGRAPHIC_ALGORITHM.value,
        T.CRYPTOGRAPHIC_LENGTH.value,
    ]
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.RAW.value
    (material,) = block.find(T.KEY_VALUE.value).children()
    assert material.tag == T.KEY_MATERIAL.value and len(material.value) == 32
    assert (
        block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == CryptographicAlgorithm.AES.value
    )
    assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == 256


def test_get_sets_the_id_placeholder(alice):
    uid = create_aes(alice)
    _, second = alice.batch(
        [(Operation.GET, [uid_item(uid)]), (Operation.GET_ATTRIBUTES, [])]
    )
    assert second.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value
    assert second.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value) == uid


def test_get_transparent_symmetric_key(alice):
    uid = create_aes(alice, bits=128)
    raw = key_material(get(alice, uid)).value
    transparent = key_material(
        get(
            alice,
            uid,
            ttlv.enumeration(
                T.KEY_FORMAT_TYPE.value, KeyFormatType.TRANSPARENT_SYMMETRIC_KEY.value
            ),
        )
    )
    assert transparent.get(T.KEY.value) == raw


def test_get_symmetric_key_in_a_key_pair_format_is_refused(alice):
    uid = create_aes(alice)
    alice.fails(
        Operation.GET,
        [
            uid_item(uid),
            ttlv.enumeration(T.KEY_FORMAT_TYPE.value, KeyFormatType.PKCS_8.value),
        ],
        ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
    )


def test_get_of_a_destroyed_key(alice):
    uid = create_aes(alice, activate=False)
    alice.ok(Operation.DESTROY, [uid_item(uid)])
    # Issue 14: Item Not Found at 1.x (Key Value Not Present before).
    alice.fails(Operation.GET, [uid_item(uid)], ResultReason.ITEM_NOT_FOUND)


def test_get_of_another_clients_key_is_not_found(alice, bob):
    uid = create_aes(alice)
    bob.fails(Operation.GET, [uid_item(uid)], ResultReason.ITEM_NOT_FOUND)


def test_no_crypto_administrator_may_not_get(alice, dispatcher):
    uid = create_aes(alice)
    admin = Client(dispatcher, "ops", Role.NO_CRYPTO_ADMINISTRATOR)
    admin.ok(Operation.GET_ATTRIBUTES, [uid_item(uid)])
    admin.fails(Operation.GET, [uid_item(uid)], ResultReason.PERMISSION_DENIED)


def test_get_of_a_sensitive_key_needs_wrapping(alice):
    uid = create_aes(alice, extra=())
    # Every key carries Sensitive (False by default), so it is modified.
    alice.ok(
        Operation.MODIFY_ATTRIBUTE,
        [uid_item(uid), attribute("Sensitive", ttlv.boolean(0, True))],
    )
    alice.fails(Operation.GET, [uid_item(uid)], ResultReason.PERMISSION_DENIED)


# ---------------------------------------------------------------------------
# Register + Get round trips
# ---------------------------------------------------------------------------


def register(
    client: Client, object_type: ObjectType, obj: Item, *attributes: Item, version=None
) -> str:
    if version is not None and version >= V2_0:
        attrs_item = ttlv.structure(T.ATTRIBUTES.value, attributes)
    else:
        attrs_item = v1_attributes(*attributes)
    payload = client.ok(
        Operation.REGISTER,
        [ttlv.enumeration(T.OBJECT_TYPE.value, object_type.value), attrs_item, obj],
        version,
    )
    return payload.get(T.UNIQUE_IDENTIFIER.value)


def symmetric_key(
    key: bytes, alg=CryptographicAlgorithm.AES, bits=None, fmt=KeyFormatType.RAW
) -> Item:
    material = (
        key
        if fmt == KeyFormatType.RAW
        else ttlv.structure(T.KEY_MATERIAL.value, [ttlv.byte_string(T.KEY.value, key)])
    )
    return ttlv.structure(T.SYMMETRIC_KEY.value, [key_block(fmt, material, alg, bits)])


def fmt_item(fmt: KeyFormatType) -> Item:
    return ttlv.enumeration(T.KEY_FORMAT_TYPE.value, fmt.value)


@pytest.mark.parametrize(
    "fmt", [KeyFormatType.RAW, KeyFormatType.TRANSPARENT_SYMMETRIC_KEY]
)
def test_register_and_get_symmetric_key(alice, fmt):
    key = os.urandom(32)
    uid = register(alice, ObjectType.SYMMETRIC_KEY, symmetric_key(key, fmt=fmt))
    assert key_material(get(alice, uid)).value == key
    attributes = alice.ok(
        Operation.GET_ATTRIBUTES,
        [uid_item(uid), ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Length")],
    )
    assert attributes.find(T.ATTRIBUTE.value).get(T.ATTRIBUTE_VALUE.value) == 256


def test_register_with_a_length_that_contradicts_the_material(alice):
    alice.fails(
        Operation.REGISTER,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            v1_attributes(length(128)),
            symmetric_key(os.urandom(32)),
        ],
        ResultReason.INVALID_FIELD,
    )
    alice.fails(
        Operation.REGISTER,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            symmetric_key(os.urandom(32), bits=128),
        ],
        ResultReason.INVALID_FIELD,
    )


def test_register_symmetric_key_without_an_algorithm(alice):
    alice.fails(
        Operation.REGISTER,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            symmetric_key(os.urandom(32), alg=None),
        ],
        ResultReason.MISSING_DATA,
    )


def rsa_pair(bits=2048) -> tuple[bytes, bytes]:
    private, public, _ = crypto.generate_key_pair(CryptographicAlgorithm.RSA, bits)
    return private, public


def ec_pair() -> tuple[bytes, bytes]:
    private, public, _ = crypto.generate_key_pair(
        CryptographicAlgorithm.EC, curve=RecommendedCurve.P_256
    )
    return private, public


def key_object(tag: Tags, fmt: KeyFormatType, material, alg=None, bits=None) -> Item:
    return ttlv.structure(tag.value, [key_block(fmt, material, alg, bits)])


def get_material(client, uid, fmt: KeyFormatType) -> Item:
    return key_material(get(client, uid, fmt_item(fmt)))


@pytest.mark.parametrize("registered", [KeyFormatType.PKCS_1, KeyFormatType.PKCS_8])
def test_register_and_get_rsa_private_key(alice, registered):
    pkcs8, _ = rsa_pair()
    data = crypto.export_private_key(pkcs8, registered)
    uid = register(
        alice,
        ObjectType.PRIVATE_KEY,
        key_object(T.PRIVATE_KEY, registered, data, CryptographicAlgorithm.RSA, 2048),
    )
    # Without a Key Format Type the key comes back as registered.
    payload = get(alice, uid)
    block = payload.children()[2].find(T.KEY_BLOCK.value)
    assert block.get(T.KEY_FORMAT_TYPE.value) == registered.value
    assert (
        block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == CryptographicAlgorithm.RSA.value
    )
    assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == 2048
    assert key_material(payload).value == data
    assert get_material(alice, uid, KeyFormatType.PKCS_8).value == pkcs8
    assert get_material(
        alice, uid, KeyFormatType.PKCS_1
    ).value == crypto.export_private_key(pkcs8, KeyFormatType.PKCS_1)
    transparent = get_material(alice, uid, KeyFormatType.TRANSPARENT_RSA_PRIVATE_KEY)
    fields = crypto.transparent_private_key(pkcs8)
    assert transparent.get(T.MODULUS.value) == fields["modulus"]
    assert transparent.get(T.PRIVATE_EXPONENT.value) == fields["private_exponent"]
    assert transparent.get(T.CRT_COEFFICIENT.value) == fields["crt_coefficient"]
    alice.fails(
        Operation.GET,
        [uid_item(uid), fmt_item(KeyFormatType.TRANSPARENT_EC_PRIVATE_KEY)],
        ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
    )
    alice.fails(
        Operation.GET,
        [uid_item(uid), fmt_item(KeyFormatType.RAW)],
        ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
    )


@pytest.mark.parametrize("layout", [KeyFormatType.PKCS_8, KeyFormatType.PKCS_1])
def test_register_rsa_private_key_in_raw(alice, layout):
    """Issue 14: a private key registered in Raw (DER bytes, as PyKMIP's
    client sends them) is recognized by its DER layout; a Get that names no
    format returns it in Raw, byte for byte, and the other formats still
    work."""
    pkcs8, _ = rsa_pair()
    data = crypto.export_private_key(pkcs8, layout)
    uid = register(
        alice,
        ObjectType.PRIVATE_KEY,
        key_object(T.PRIVATE_KEY, KeyFormatType.RAW, data, CryptographicAlgorithm.RSA, 2048),
    )
    payload = get(alice, uid)
    block = payload.children()[2].find(T.KEY_BLOCK.value)
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.RAW.value
    assert key_material(payload).value == data
    assert get_material(alice, uid, KeyFormatType.RAW).value == data
    assert get_material(alice, uid, KeyFormatType.PKCS_8).value == pkcs8
    attributes = alice.ok(Operation.GET_ATTRIBUTES, [uid_item(uid), ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Length")])
    assert attributes.find(T.ATTRIBUTE.value).get(T.ATTRIBUTE_VALUE.value) == 2048


@pytest.mark.parametrize("layout", [KeyFormatType.X_509, KeyFormatType.PKCS_1])
def test_register_rsa_public_key_in_raw(alice, layout):
    _, spki = rsa_pair()
    data = crypto.export_public_key(spki, layout)
    uid = register(alice, ObjectType.PUBLIC_KEY, key_object(T.PUBLIC_KEY, KeyFormatType.RAW, data))
    payload = get(alice, uid)
    block = payload.children()[2].find(T.KEY_BLOCK.value)
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.RAW.value
    assert block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == CryptographicAlgorithm.RSA.value
    assert key_material(payload).value == data
    assert get_material(alice, uid, KeyFormatType.X_509).value == spki


def test_register_ec_private_key_in_raw(alice):
    pkcs8, _ = ec_pair()
    data = crypto.export_private_key(pkcs8, KeyFormatType.EC_PRIVATE_KEY)
    uid = register(alice, ObjectType.PRIVATE_KEY, key_object(T.PRIVATE_KEY, KeyFormatType.RAW, data))
    assert key_material(get(alice, uid)).value == data
    assert get_material(alice, uid, KeyFormatType.PKCS_8).value == pkcs8


@pytest.mark.parametrize(
    "object_type,tag,data",
    [
        (ObjectType.PRIVATE_KEY, T.PRIVATE_KEY, b"not DER at all"),
        (ObjectType.PUBLIC_KEY, T.PUBLIC_KEY, b"\x30\x03\x02\x01\x00"),
        # A well-formed SEQUENCE in an RSAPrivateKey layout whose numbers are no key.
        (ObjectType.PRIVATE_KEY, T.PRIVATE_KEY, b"\x30\x06\x02\x01\x00\x02\x01\x05"),
    ],
)
def test_register_in_raw_refuses_what_is_no_key(alice, object_type, tag, data):
    alice.fails(
        Operation.REGISTER,
        [ttlv.enumeration(T.OBJECT_TYPE.value, object_type.value), key_object(tag, KeyFormatType.RAW, data)],
        ResultReason.INVALID_FIELD,
    )


def test_raw_is_only_the_format_of_a_key_registered_in_raw(alice):
    """A key registered in PKCS#8 has no Raw form of its own."""
    pkcs8, spki = rsa_pair()
    private = register(alice, ObjectType.PRIVATE_KEY, key_object(T.PRIVATE_KEY, KeyFormatType.PKCS_8, pkcs8))
    public = register(alice, ObjectType.PUBLIC_KEY, key_object(T.PUBLIC_KEY, KeyFormatType.X_509, spki))
    for uid in (private, public):
        alice.fails(Operation.GET, [uid_item(uid), fmt_item(KeyFormatType.RAW)], ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED)


def test_register_transparent_rsa_private_key(alice):
    pkcs8, _ = rsa_pair()
    fields = crypto.transparent_private_key(pkcs8)
    material = ttlv.structure(
        T.KEY_MATERIAL.value,
        [
            ttlv.big_integer(T.MODULUS.value, fields["modulus"]),
            ttlv.big_integer(T.PRIVATE_EXPONENT.value, fields["private_exponent"]),
            ttlv.big_integer(T.PUBLIC_EXPONENT.value, fields["public_exponent"]),
        ],
    )
    uid = register(
        alice,
        ObjectType.PRIVATE_KEY,
        key_object(
            T.PRIVATE_KEY,
            KeyFormatType.TRANSPARENT_RSA_PRIVATE_KEY,
            material,
            CryptographicAlgorithm.RSA,
        ),
    )
    assert get_material(alice, uid, KeyFormatType.PKCS_8).value == pkcs8


def test_register_and_get_rsa_public_key(alice):
    _, spki = rsa_pair()
    uid = register(
        alice,
        ObjectType.PUBLIC_KEY,
        key_object(T.PUBLIC_KEY, KeyFormatType.X_509, spki),
    )
    assert key_material(get(alice, uid)).value == spki
    assert get_material(
        alice, uid, KeyFormatType.PKCS_1
    ).value == crypto.export_public_key(spki, KeyFormatType.PKCS_1)
    transparent = get_material(alice, uid, KeyFormatType.TRANSPARENT_RSA_PUBLIC_KEY)
    assert (
        transparent.get(T.MODULUS.value)
        == crypto.transparent_public_key(spki)["modulus"]
    )
    assert transparent.get(T.PUBLIC_EXPONENT.value) == 65537


def test_register_public_key_with_a_contradicting_algorithm(alice):
    _, spki = rsa_pair()
    alice.fails(
        Operation.REGISTER,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.PUBLIC_KEY.value),
            key_object(
                T.PUBLIC_KEY, KeyFormatType.X_509, spki, CryptographicAlgorithm.ECDSA
            ),
        ],
        ResultReason.INVALID_FIELD,
    )


def test_register_and_get_ec_keys(alice):
    pkcs8, spki = ec_pair()
    private_uid = register(
        alice,
        ObjectType.PRIVATE_KEY,
        key_object(
            T.PRIVATE_KEY, KeyFormatType.PKCS_8, pkcs8, CryptographicAlgorithm.ECDSA
        ),
    )
    public_uid = register(
        alice,
        ObjectType.PUBLIC_KEY,
        key_object(T.PUBLIC_KEY, KeyFormatType.X_509, spki),
    )
    payload = get(alice, private_uid)
    block = payload.children()[2].find(T.KEY_BLOCK.value)
    assert (
        block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == CryptographicAlgorithm.ECDSA.value
    )
    assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == 256
    assert key_material(payload).value == pkcs8
    ec_private = get_material(
        alice, private_uid, KeyFormatType.TRANSPARENT_EC_PRIVATE_KEY
    )
    assert ec_private.get(T.RECOMMENDED_CURVE.value) == RecommendedCurve.P_256.value
    assert ec_private.get(T.D.value) == crypto.transparent_private_key(pkcs8)["d"]
    ec_public = get_material(alice, public_uid, KeyFormatType.TRANSPARENT_EC_PUBLIC_KEY)
    assert (
        ec_public.get(T.Q_STRING.value)
        == crypto.transparent_public_key(spki)["q_string"]
    )
    assert get_material(
        alice, private_uid, KeyFormatType.EC_PRIVATE_KEY
    ).value == crypto.export_private_key(pkcs8, KeyFormatType.EC_PRIVATE_KEY)
    alice.fails(
        Operation.GET,
        [uid_item(private_uid), fmt_item(KeyFormatType.PKCS_1)],
        ResultReason.KEY_FORMAT_TYPE_NOT_SUPPORTED,
    )
    # A transparent EC public key registers back to the same key.
    again = register(
        alice,
        ObjectType.PUBLIC_KEY,
        ttlv.structure(
            T.PUBLIC_KEY.value,
            [
                key_block(
                    KeyFormatType.TRANSPARENT_EC_PUBLIC_KEY,
                    ec_public.retag(T.KEY_MATERIAL.value),
                )
            ],
        ),
    )
    assert key_material(get(alice, again)).value == spki


def self_signed_certificate(subject: x509.Name | None = None, issuer: x509.Name | None = None, serial: int = 4711) -> bytes:
    """A one-day EC certificate (DER); subject and issuer default to CN=kms test."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kms test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject or name)
        .issuer_name(issuer or subject or name)
        .public_key(key.public_key())
        .serial_number(serial)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


def test_register_and_get_certificate(alice):
    der = self_signed_certificate()
    certificate = ttlv.structure(
        T.CERTIFICATE.value,
        [
            ttlv.enumeration(T.CERTIFICATE_TYPE.value, 1),
            ttlv.byte_string(T.CERTIFICATE_VALUE.value, der),
        ],
    )
    uid = register(alice, ObjectType.CERTIFICATE, certificate)
    payload = get(alice, uid)
    assert payload.get(T.OBJECT_TYPE.value) == ObjectType.CERTIFICATE.value
    assert payload.find(T.CERTIFICATE.value).get(T.CERTIFICATE_VALUE.value) == der
    attributes = alice.ok(Operation.GET_ATTRIBUTES, [uid_item(uid)])
    values = {
        a.get(T.ATTRIBUTE_NAME.value): a.find(T.ATTRIBUTE_VALUE.value)
        for a in attributes.find_all(T.ATTRIBUTE.value)
    }
    assert values["Certificate Length"].value == len(der)
    assert values["Cryptographic Algorithm"].value == CryptographicAlgorithm.EC.value
    assert values["X.509 Certificate Identifier"].get(
        T.CERTIFICATE_SERIAL_NUMBER.value
    ) == (4711).to_bytes(2, "big")
    subject = x509.load_der_x509_certificate(der).subject.public_bytes()
    assert (
        values["X.509 Certificate Subject"].get(T.SUBJECT_DISTINGUISHED_NAME.value)
        == subject
    )
    digest = values["Digest"]
    assert digest.get(T.HASHING_ALGORITHM.value) == HashingAlgorithm.SHA_256.value
    assert digest.get(T.DIGEST_VALUE.value) == crypto.digest(
        HashingAlgorithm.SHA_256, der
    )


def certificate_item(der: bytes) -> Item:
    return ttlv.structure(
        T.CERTIFICATE.value,
        [
            ttlv.enumeration(T.CERTIFICATE_TYPE.value, CertificateType.X_509.value),
            ttlv.byte_string(T.CERTIFICATE_VALUE.value, der),
        ],
    )


def test_register_certificate_with_its_certificate_type_restated(alice):
    """BL-M-10-21: a client may restate the Certificate Type the certificate
    implies (1.x and 2.x); another type is refused, not stored."""
    der = self_signed_certificate()
    given = ttlv.enumeration(T.CERTIFICATE_TYPE.value, CertificateType.X_509.value)
    for version in (None, V2_0):
        uid = register(alice, ObjectType.CERTIFICATE, certificate_item(der), given, version=version)
        assert get(alice, uid).find(T.CERTIFICATE.value).get(T.CERTIFICATE_VALUE.value) == der
    wrong = ttlv.enumeration(T.CERTIFICATE_TYPE.value, CertificateType.PGP.value)
    message = alice.fails(
        Operation.REGISTER,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.CERTIFICATE.value),
            ttlv.structure(T.ATTRIBUTES.value, [wrong]),
            certificate_item(der),
        ],
        ResultReason.INVALID_FIELD,
        V2_0,
    )
    assert "Certificate Type" in message
    # Attributes the server sets and the material does not imply stay refused.
    alice.fails(
        Operation.REGISTER,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.CERTIFICATE.value),
            ttlv.structure(T.ATTRIBUTES.value, [ttlv.enumeration(T.STATE.value, State.ACTIVE.value)]),
            certificate_item(der),
        ],
        ResultReason.ATTRIBUTE_READ_ONLY,
        V2_0,
    )


def test_certificate_subject_and_issuer_fields_for_2_x_clients(alice):
    """KMIP 2.0 Certificate Subject/Issuer CN, O, OU, ... are set at Register
    from the certificate (each value of a repeated field), shown to 2.x
    clients and never to 1.x ones, and the server's to keep."""
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Ops"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "KMS"),
            x509.NameAttribute(NameOID.COMMON_NAME, "esx-01.example"),
        ]
    )
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Example CA")])
    der = self_signed_certificate(subject, issuer, serial=7)
    uid = register(alice, ObjectType.CERTIFICATE, certificate_item(der), version=V2_0)
    names = [
        T.CERTIFICATE_SUBJECT_CN, T.CERTIFICATE_SUBJECT_O, T.CERTIFICATE_SUBJECT_OU,
        T.CERTIFICATE_SUBJECT_C, T.CERTIFICATE_ISSUER_CN, T.CERTIFICATE_ISSUER_O,
    ]  # fmt: skip
    payload = alice.ok(
        Operation.GET_ATTRIBUTES,
        [uid_item(uid), *(ttlv.enumeration(T.ATTRIBUTE_REFERENCE.value, t.value) for t in names)],
        V2_0,
    )
    found: dict[int, list] = {}
    for item in payload.find(T.ATTRIBUTES.value).value:
        found.setdefault(item.tag, []).append(item.value)
    assert found == {
        T.CERTIFICATE_SUBJECT_CN.value: ["esx-01.example"],
        T.CERTIFICATE_SUBJECT_O.value: ["Example"],
        T.CERTIFICATE_SUBJECT_OU.value: ["Ops", "KMS"],
        T.CERTIFICATE_SUBJECT_C.value: ["DE"],
        T.CERTIFICATE_ISSUER_CN.value: ["Example CA"],
    }
    v1 = alice.ok(Operation.GET_ATTRIBUTES, [uid_item(uid)], V1_4)
    shown = {a.get(T.ATTRIBUTE_NAME.value) for a in v1.find_all(T.ATTRIBUTE.value)}
    assert "X.509 Certificate Subject" in shown
    assert not any(name.startswith(("Certificate Subject", "Certificate Issuer")) for name in shown)
    alice.fails(
        Operation.MODIFY_ATTRIBUTE,
        [uid_item(uid), ttlv.structure(T.NEW_ATTRIBUTE.value, [ttlv.text(T.CERTIFICATE_SUBJECT_CN.value, "x")])],
        ResultReason.ATTRIBUTE_READ_ONLY,
        V2_0,
    )


def test_register_and_get_secret_data(alice):
    secret = b"correct horse battery staple"
    obj = ttlv.structure(
        T.SECRET_DATA.value,
        [
            ttlv.enumeration(T.SECRET_DATA_TYPE.value, SecretDataType.PASSWORD.value),
            key_block(KeyFormatType.OPAQUE, secret),
        ],
    )
    uid = register(alice, ObjectType.SECRET_DATA, obj)
    payload = get(alice, uid)
    secret_data = payload.find(T.SECRET_DATA.value)
    assert secret_data.get(T.SECRET_DATA_TYPE.value) == SecretDataType.PASSWORD.value
    block = secret_data.find(T.KEY_BLOCK.value)
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.OPAQUE.value
    assert block.find(T.KEY_VALUE.value).get(T.KEY_MATERIAL.value) == secret
    assert block.find(T.CRYPTOGRAPHIC_ALGORITHM.value) is None


def test_secret_data_comes_back_in_the_format_it_was_registered_in(alice):
    """BL-M-4-21: a Get that names no Key Format Type answers secret data
    in its registered format (Raw or Opaque); either can still be asked for."""
    secret = b"s3cret"
    for fmt, other in ((KeyFormatType.RAW, KeyFormatType.OPAQUE), (KeyFormatType.OPAQUE, KeyFormatType.RAW)):
        obj = ttlv.structure(
            T.SECRET_DATA.value,
            [ttlv.enumeration(T.SECRET_DATA_TYPE.value, SecretDataType.PASSWORD.value), key_block(fmt, secret)],
        )
        for version in (None, V2_0):
            uid = register(alice, ObjectType.SECRET_DATA, obj, version=version)
            block = get(alice, uid, version=version).find(T.SECRET_DATA.value).find(T.KEY_BLOCK.value)
            assert block.get(T.KEY_FORMAT_TYPE.value) == fmt.value
            assert block.find(T.KEY_VALUE.value).get(T.KEY_MATERIAL.value) == secret
            asked = get(alice, uid, fmt_item(other), version=version).find(T.SECRET_DATA.value)
            assert asked.find(T.KEY_BLOCK.value).get(T.KEY_FORMAT_TYPE.value) == other.value


def test_get_of_a_missing_object_is_object_not_found_at_2_1(alice):
    missing = [uid_item("AAABBBCCC")]
    alice.fails(Operation.GET, missing, ResultReason.ITEM_NOT_FOUND, V1_4)
    alice.fails(Operation.GET, missing, ResultReason.ITEM_NOT_FOUND, V2_0)
    alice.fails(Operation.GET, missing, ResultReason.OBJECT_NOT_FOUND, (2, 1))


def test_quantum_safe_is_granted_only_to_large_symmetric_keys(alice):
    """QS-M-2: a Create that asks for Quantum Safe gets it with AES-256 and
    is refused (General Failure, NOT_SAFE) with AES-128; Protection Level
    and Period are kept as asked; Quantum Safe cannot be changed later."""

    def create(bits: int, *extra: Item):
        return [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            ttlv.structure(
                T.ATTRIBUTES.value,
                [algorithm(CryptographicAlgorithm.AES), length(bits), usage(12), *extra],
            ),
        ]

    safe = ttlv.boolean(T.QUANTUM_SAFE.value, True)
    level = ttlv.enumeration(T.PROTECTION_LEVEL.value, ProtectionLevel.HIGH.value)
    period = ttlv.interval(T.PROTECTION_PERIOD.value, 409968000)
    message = alice.fails(Operation.CREATE, create(128, level, period, safe), ResultReason.GENERAL_FAILURE, V2_0)
    assert message.startswith("NOT_SAFE") and "AES-128" in message
    uid = alice.ok(Operation.CREATE, create(256, level, period, safe), V2_0).get(T.UNIQUE_IDENTIFIER.value)
    names = [T.QUANTUM_SAFE, T.PROTECTION_LEVEL, T.PROTECTION_PERIOD]
    got = alice.ok(
        Operation.GET_ATTRIBUTES,
        [uid_item(uid), *(ttlv.enumeration(T.ATTRIBUTE_REFERENCE.value, t.value) for t in names)],
        V2_0,
    ).find(T.ATTRIBUTES.value)
    assert {i.tag: i.value for i in got.value} == {
        T.QUANTUM_SAFE.value: True,
        T.PROTECTION_LEVEL.value: ProtectionLevel.HIGH.value,
        T.PROTECTION_PERIOD.value: 409968000,
    }
    alice.fails(
        Operation.MODIFY_ATTRIBUTE,
        [uid_item(uid), ttlv.structure(T.NEW_ATTRIBUTE.value, [ttlv.boolean(T.QUANTUM_SAFE.value, False)])],
        ResultReason.ATTRIBUTE_READ_ONLY,
        V2_0,
    )
    # Without Quantum Safe, AES-128 is made as before.
    alice.ok(Operation.CREATE, create(128, level), V2_0)


def test_register_and_get_opaque_object(alice):
    obj = ttlv.structure(
        T.OPAQUE_OBJECT.value,
        [
            ttlv.enumeration(T.OPAQUE_DATA_TYPE.value, 0),
            ttlv.byte_string(T.OPAQUE_DATA_VALUE.value, b"\x00blob"),
        ],
    )
    uid = register(alice, ObjectType.OPAQUE_DATA, obj)
    payload = get(alice, uid)
    assert payload.find(T.OPAQUE_OBJECT.value) == obj


def test_register_2_0_with_attributes_and_the_oasis_gcm_vector(alice):
    """CS-BC-M-GCM-1-20: a registered all-zero AES-128 key, Active through
    its Activation Date, encrypts 16 zero bytes under a zero IV to the
    published ciphertext and tag."""
    uid = register(
        alice,
        ObjectType.SYMMETRIC_KEY,
        symmetric_key(bytes(16), bits=128),
        usage(U.ENCRYPT.value | U.DECRYPT.value),
        ttlv.date_time(T.ACTIVATION_DATE.value, 1),
        ttlv.structure(
            T.ATTRIBUTE.value,
            [
                ttlv.text(T.VENDOR_IDENTIFICATION.value, "x"),
                ttlv.text(T.ATTRIBUTE_NAME.value, "ID"),
                ttlv.text(T.ATTRIBUTE_VALUE.value, "CS-BC-M-GCM-1-20"),
            ],
        ),
        version=V2_0,
    )
    payload = alice.ok(
        Operation.ENCRYPT,
        [
            uid_item(uid),
            params(mode=BlockCipherMode.GCM, tag_length=16),
            ttlv.byte_string(T.DATA.value, bytes(16)),
            ttlv.byte_string(T.IV_COUNTER_NONCE.value, bytes(12)),
        ],
        V2_0,
    )
    assert [c.tag for c in payload.children()] == [
        T.UNIQUE_IDENTIFIER.value,
        T.DATA.value,
        T.AUTHENTICATED_ENCRYPTION_TAG.value,
    ]
    assert payload.get(T.DATA.value).hex() == "0388dace60b6a392f328c2b971b2fe78"
    assert (
        payload.get(T.AUTHENTICATED_ENCRYPTION_TAG.value).hex()
        == "ab6e47d42cec13bdf53a67b21257bddf"
    )


def test_create_2_0_with_attributes_then_get(alice):
    payload = alice.ok(
        Operation.CREATE,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            ttlv.structure(
                T.ATTRIBUTES.value,
                [
                    algorithm(CryptographicAlgorithm.AES),
                    length(128),
                    usage(U.ENCRYPT.value),
                ],
            ),
        ],
        V2_0,
    )
    uid = payload.get(T.UNIQUE_IDENTIFIER.value)
    got = get(alice, uid, version=V2_0)
    assert len(key_material(got).value) == 16


# ---------------------------------------------------------------------------
# Get with key wrapping
# ---------------------------------------------------------------------------


def wrapping_spec(
    wrapping_uid: str, *params_items: Item, encoding: EncodingOption | None = None
) -> Item:
    return ttlv.structure(
        T.KEY_WRAPPING_SPECIFICATION.value,
        [
            ttlv.enumeration(T.WRAPPING_METHOD.value, WrappingMethod.ENCRYPT.value),
            ttlv.structure(
                T.ENCRYPTION_KEY_INFORMATION.value,
                [uid_item(wrapping_uid), *params_items],
            ),
            ttlv.enumeration(T.ENCODING_OPTION.value, encoding.value)
            if encoding is not None
            else None,
        ],
    )


def wrapped_block(payload: Item) -> Item:
    return payload.children()[2].find(T.KEY_BLOCK.value)


def test_get_wrapped_with_aes_key_wrap(alice):
    kek = create_aes(alice, mask=U.WRAP_KEY.value)
    uid = create_aes(alice)
    plain = key_material(get(alice, uid)).value
    kek_bytes = key_material(get(alice, kek)).value

    payload = get(
        alice, uid, wrapping_spec(kek, params(mode=BlockCipherMode.NIST_KEY_WRAP))
    )
    block = wrapped_block(payload)
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.RAW.value
    wrapped = block.find(T.KEY_VALUE.value)
    assert wrapped.type == ttlv.ItemType.BYTE_STRING
    # Default encoding: the TTLV Key Value structure is what was wrapped.
    key_value = ttlv.decode(
        crypto.unwrap_key(kek_bytes, wrapped.value, BlockCipherMode.NIST_KEY_WRAP)
    )
    assert key_value.get(T.KEY_MATERIAL.value) == plain
    data = block.find(T.KEY_WRAPPING_DATA.value)
    assert data.get(T.WRAPPING_METHOD.value) == WrappingMethod.ENCRYPT.value
    assert (
        data.find(T.ENCRYPTION_KEY_INFORMATION.value).get(T.UNIQUE_IDENTIFIER.value)
        == kek
    )

    payload = get(alice, uid, wrapping_spec(kek, encoding=EncodingOption.NO_ENCODING))
    wrapped = wrapped_block(payload).find(T.KEY_VALUE.value).value
    assert crypto.unwrap_key(kek_bytes, wrapped) == plain


def test_get_wrapped_with_rsa_oaep(alice):
    payload = alice.ok(
        Operation.CREATE_KEY_PAIR,
        key_pair_request(
            CryptographicAlgorithm.RSA, 2048, public_mask=U.WRAP_KEY.value
        ),
    )
    private_uid = payload.get(T.PRIVATE_KEY_UNIQUE_IDENTIFIER.value)
    public_uid = payload.get(T.PUBLIC_KEY_UNIQUE_IDENTIFIER.value)
    alice.ok(Operation.ACTIVATE, [uid_item(public_uid)])
    uid = create_aes(alice)
    plain = key_material(get(alice, uid)).value
    private = get_material(alice, private_uid, KeyFormatType.PKCS_8).value

    payload = get(
        alice,
        uid,
        wrapping_spec(
            public_uid,
            params(padding=PaddingMethod.OAEP, hashing=HashingAlgorithm.SHA_256),
            encoding=EncodingOption.NO_ENCODING,
        ),
    )
    wrapped = wrapped_block(payload).find(T.KEY_VALUE.value).value
    assert (
        crypto.rsa_unwrap(
            private, wrapped, PaddingMethod.OAEP, HashingAlgorithm.SHA_256
        )
        == plain
    )


def test_wrapping_key_needs_wrap_usage_and_active_state(alice, bob):
    kek_no_wrap = create_aes(alice, mask=U.ENCRYPT.value)
    kek_inactive = create_aes(alice, mask=U.WRAP_KEY.value, activate=False)
    uid = create_aes(alice)
    alice.fails(
        Operation.GET,
        [uid_item(uid), wrapping_spec(kek_no_wrap)],
        ResultReason.PERMISSION_DENIED,
    )
    alice.fails(
        Operation.GET,
        [uid_item(uid), wrapping_spec(kek_inactive)],
        ResultReason.ILLEGAL_OPERATION,
    )
    bobs_kek = create_aes(bob, mask=U.WRAP_KEY.value)
    alice.fails(
        Operation.GET,
        [uid_item(uid), wrapping_spec(bobs_kek)],
        ResultReason.ITEM_NOT_FOUND,
    )


# ---------------------------------------------------------------------------
# CreateKeyPair, Sign, Signature Verify
# ---------------------------------------------------------------------------


def key_pair_request(
    alg, bits=None, curve=None, private_mask=None, public_mask=None, version=V1_4
) -> list[Item]:
    shared = [algorithm(alg)]
    if bits is not None:
        shared.append(length(bits))
    if curve is not None:
        shared.append(
            ttlv.structure(
                T.CRYPTOGRAPHIC_DOMAIN_PARAMETERS.value,
                [ttlv.enumeration(T.RECOMMENDED_CURVE.value, curve.value)],
            )
        )
    private = [usage(private_mask)] if private_mask is not None else []
    public = [usage(public_mask)] if public_mask is not None else []
    if version >= V2_0:
        return [
            ttlv.structure(T.COMMON_ATTRIBUTES.value, shared),
            ttlv.structure(T.PRIVATE_KEY_ATTRIBUTES.value, private),
            ttlv.structure(T.PUBLIC_KEY_ATTRIBUTES.value, public),
        ]
    return [
        v1_attributes(*shared, tag=T.COMMON_TEMPLATE_ATTRIBUTE),
        v1_attributes(*private, tag=T.PRIVATE_KEY_TEMPLATE_ATTRIBUTE),
        v1_attributes(*public, tag=T.PUBLIC_KEY_TEMPLATE_ATTRIBUTE),
    ]


def create_pair(client, *args, version=V1_4, **kwargs) -> tuple[str, str]:
    payload = client.ok(
        Operation.CREATE_KEY_PAIR,
        key_pair_request(*args, version=version, **kwargs),
        version,
    )
    private_uid = payload.get(T.PRIVATE_KEY_UNIQUE_IDENTIFIER.value)
    public_uid = payload.get(T.PUBLIC_KEY_UNIQUE_IDENTIFIER.value)
    client.ok(Operation.ACTIVATE, [uid_item(private_uid)])
    client.ok(Operation.ACTIVATE, [uid_item(public_uid)])
    return private_uid, public_uid


def attribute_values(client, uid, name) -> list[Item]:
    payload = client.ok(
        Operation.GET_ATTRIBUTES,
        [uid_item(uid), ttlv.text(T.ATTRIBUTE_NAME.value, name)],
    )
    return [
        a.find(T.ATTRIBUTE_VALUE.value) for a in payload.find_all(T.ATTRIBUTE.value)
    ]


def sign(client, uid, data, **p) -> bytes:
    payload = client.ok(
        Operation.SIGN,
        [uid_item(uid), params(**p), ttlv.byte_string(T.DATA.value, data)],
    )
    return payload.get(T.SIGNATURE_DATA.value)


def verify(client, uid, data, signature_data, **p) -> int:
    payload = client.ok(
        Operation.SIGNATURE_VERIFY,
        [
            uid_item(uid),
            params(**p),
            ttlv.byte_string(T.DATA.value, data),
            ttlv.byte_string(T.SIGNATURE_DATA.value, signature_data),
        ],
    )
    return payload.get(T.VALIDITY_INDICATOR.value)


def test_create_rsa_key_pair_links_and_defaults(alice):
    private_uid, public_uid = create_pair(alice, CryptographicAlgorithm.RSA, 2048)
    (link,) = attribute_values(alice, private_uid, "Link")
    assert link.get(T.LINK_TYPE.value) == LinkType.PUBLIC_KEY_LINK.value
    assert link.get(T.LINKED_OBJECT_IDENTIFIER.value) == public_uid
    (link,) = attribute_values(alice, public_uid, "Link")
    assert link.get(T.LINK_TYPE.value) == LinkType.PRIVATE_KEY_LINK.value
    assert link.get(T.LINKED_OBJECT_IDENTIFIER.value) == private_uid
    assert (
        attribute_values(alice, private_uid, "Cryptographic Usage Mask")[0].value
        == U.SIGN.value
    )
    assert (
        attribute_values(alice, public_uid, "Cryptographic Usage Mask")[0].value
        == U.VERIFY.value
    )
    # 1.x default format for RSA keys is PKCS#1, as PyKMIP's server gives.
    block = get(alice, private_uid).children()[2].find(T.KEY_BLOCK.value)
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.PKCS_1.value
    assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == 2048


@pytest.mark.parametrize(
    "scheme",
    [
        {"signature": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION},
        {
            "signature": DigitalSignatureAlgorithm.RSASSA_PSS,
            "hashing": HashingAlgorithm.SHA_256,
        },
        {
            "algorithm": CryptographicAlgorithm.RSA,
            "padding": PaddingMethod.PKCS1v15,
            "hashing": HashingAlgorithm.SHA_384,
        },
    ],
)
def test_rsa_sign_and_verify(alice, scheme):
    private_uid, public_uid = create_pair(alice, CryptographicAlgorithm.RSA, 2048)
    data = b"the quick brown fox"
    signature = sign(alice, private_uid, data, **scheme)
    assert (
        verify(alice, public_uid, data, signature, **scheme)
        == ValidityIndicator.VALID.value
    )
    assert (
        verify(alice, public_uid, data + b"!", signature, **scheme)
        == ValidityIndicator.INVALID.value
    )
    tampered = bytes([signature[0] ^ 1]) + signature[1:]
    assert (
        verify(alice, public_uid, data, tampered, **scheme)
        == ValidityIndicator.INVALID.value
    )


def test_create_key_pair_gives_both_keys_version_7_uids(alice):
    """As Create does (kms_server/keystore/uids.py): ordered by time."""
    private_uid, public_uid = create_pair(alice, CryptographicAlgorithm.EC, 256)
    assert private_uid != public_uid
    for uid in (private_uid, public_uid):
        parsed = uuid.UUID(uid)
        assert str(parsed) == uid and parsed.version == 7 and parsed.variant == uuid.RFC_4122


@pytest.mark.parametrize("version", [V1_4, V2_0])
def test_ec_key_pair_sign_and_verify(alice, version):
    private_uid, public_uid = create_pair(
        alice,
        CryptographicAlgorithm.ECDSA,
        curve=RecommendedCurve.P_384,
        version=version,
    )
    assert attribute_values(alice, private_uid, "Cryptographic Length")[0].value == 384
    data = b"message"
    signature = sign(
        alice, private_uid, data, signature=DigitalSignatureAlgorithm.ECDSA_WITH_SHA384
    )
    scheme = {"signature": DigitalSignatureAlgorithm.ECDSA_WITH_SHA384}
    assert (
        verify(alice, public_uid, data, signature, **scheme)
        == ValidityIndicator.VALID.value
    )
    assert (
        verify(alice, public_uid, b"massage", signature, **scheme)
        == ValidityIndicator.INVALID.value
    )


def test_create_ec_pair_by_length(alice):
    private_uid, _ = create_pair(alice, CryptographicAlgorithm.EC, 256)
    block = get(alice, private_uid).children()[2].find(T.KEY_BLOCK.value)
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.PKCS_8.value


def test_create_key_pair_with_unsupported_size(alice):
    alice.fails(
        Operation.CREATE_KEY_PAIR,
        key_pair_request(CryptographicAlgorithm.RSA, 1024),
        ResultReason.INVALID_FIELD,
    )
    alice.fails(
        Operation.CREATE_KEY_PAIR,
        key_pair_request(CryptographicAlgorithm.RSA),
        ResultReason.INVALID_FIELD,
    )


def test_sign_needs_the_sign_usage_bit(alice):
    private_uid, _ = create_pair(
        alice, CryptographicAlgorithm.RSA, 2048, private_mask=U.DECRYPT.value
    )
    alice.fails(
        Operation.SIGN,
        [
            uid_item(private_uid),
            params(signature=DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION),
            ttlv.byte_string(T.DATA.value, b"x"),
        ],
        ResultReason.PERMISSION_DENIED,
    )


def test_rsa_encrypt_and_decrypt(alice):
    private_uid, public_uid = create_pair(
        alice,
        CryptographicAlgorithm.RSA,
        2048,
        private_mask=U.DECRYPT.value,
        public_mask=U.ENCRYPT.value,
    )
    oaep = params(padding=PaddingMethod.OAEP, hashing=HashingAlgorithm.SHA_256)
    payload = alice.ok(
        Operation.ENCRYPT,
        [uid_item(public_uid), oaep, ttlv.byte_string(T.DATA.value, b"secret")],
    )
    ciphertext = payload.get(T.DATA.value)
    payload = alice.ok(
        Operation.DECRYPT,
        [uid_item(private_uid), oaep, ttlv.byte_string(T.DATA.value, ciphertext)],
    )
    assert payload.get(T.DATA.value) == b"secret"


# ---------------------------------------------------------------------------
# Encrypt, Decrypt
# ---------------------------------------------------------------------------


def encrypt(client, uid, data, *extra, version=None) -> Item:
    return client.ok(
        Operation.ENCRYPT,
        [uid_item(uid), *extra, ttlv.byte_string(T.DATA.value, data)],
        version,
    )


def test_gcm_round_trip_with_additional_data(alice):
    uid = create_aes(alice)
    aad = ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA.value, b"header")
    gcm = params(mode=BlockCipherMode.GCM)
    payload = encrypt(alice, uid, b"attack at dawn", gcm, aad)
    iv = payload.get(T.IV_COUNTER_NONCE.value)
    tag = payload.get(T.AUTHENTICATED_ENCRYPTION_TAG.value)
    assert len(iv) == 12 and len(tag) == 16
    request = [
        uid_item(uid),
        gcm,
        ttlv.byte_string(T.DATA.value, payload.get(T.DATA.value)),
        ttlv.byte_string(T.IV_COUNTER_NONCE.value, iv),
        aad,
    ]
    decrypted = alice.ok(
        Operation.DECRYPT,
        request + [ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, tag)],
    )
    assert decrypted.get(T.DATA.value) == b"attack at dawn"
    bad_tag = bytes([tag[0] ^ 0x80]) + tag[1:]
    alice.fails(
        Operation.DECRYPT,
        request + [ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, bad_tag)],
        ResultReason.CRYPTOGRAPHIC_FAILURE,
    )
    alice.fails(Operation.DECRYPT, request, ResultReason.MISSING_DATA)


def test_cbc_round_trip_with_parameters_from_the_key(alice):
    cbc = params(mode=BlockCipherMode.CBC, padding=PaddingMethod.PKCS5)
    uid = create_aes(alice, extra=(cbc,))
    payload = encrypt(alice, uid, b"seventeen bytes!!")
    ciphertext, iv = payload.get(T.DATA.value), payload.get(T.IV_COUNTER_NONCE.value)
    assert len(ciphertext) == 32 and len(iv) == 16
    decrypted = alice.ok(
        Operation.DECRYPT,
        [
            uid_item(uid),
            ttlv.byte_string(T.DATA.value, ciphertext),
            ttlv.byte_string(T.IV_COUNTER_NONCE.value, iv),
        ],
    )
    assert decrypted.get(T.DATA.value) == b"seventeen bytes!!"


def test_encrypt_with_a_client_iv_does_not_return_it(alice):
    uid = create_aes(alice)
    payload = encrypt(
        alice,
        uid,
        bytes(16),
        params(mode=BlockCipherMode.CBC),
        ttlv.byte_string(T.IV_COUNTER_NONCE.value, bytes(16)),
    )
    assert payload.find(T.IV_COUNTER_NONCE.value) is None


@pytest.mark.parametrize(
    "version, reason",
    [
        (V1_4, ResultReason.ILLEGAL_OPERATION),
        (V2_0, ResultReason.WRONG_KEY_LIFECYCLE_STATE),
    ],
)
def test_encrypt_with_a_pre_active_key(alice, version, reason):
    uid = create_aes(alice, activate=False)
    alice.fails(
        Operation.ENCRYPT,
        [
            uid_item(uid),
            params(mode=BlockCipherMode.GCM),
            ttlv.byte_string(T.DATA.value, b"x"),
        ],
        reason,
        version,
    )


def test_encrypt_without_the_encrypt_usage_bit(alice):
    uid = create_aes(alice, mask=U.DECRYPT.value)
    message = alice.fails(
        Operation.ENCRYPT,
        [
            uid_item(uid),
            params(mode=BlockCipherMode.GCM),
            ttlv.byte_string(T.DATA.value, b"x"),
        ],
        ResultReason.PERMISSION_DENIED,
    )
    assert "ENCRYPT" in message


def test_decrypt_with_a_deactivated_key(alice):
    uid = create_aes(alice)
    payload = encrypt(alice, uid, b"old data", params(mode=BlockCipherMode.GCM))
    alice.ok(
        Operation.REVOKE,
        [
            uid_item(uid),
            ttlv.structure(
                T.REVOCATION_REASON.value,
                [ttlv.enumeration(T.REVOCATION_REASON_CODE.value, 5)],
            ),
        ],
    )
    alice.fails(
        Operation.ENCRYPT,
        [
            uid_item(uid),
            params(mode=BlockCipherMode.GCM),
            ttlv.byte_string(T.DATA.value, b"x"),
        ],
        ResultReason.ILLEGAL_OPERATION,
    )
    decrypted = alice.ok(
        Operation.DECRYPT,
        [
            uid_item(uid),
            params(mode=BlockCipherMode.GCM),
            ttlv.byte_string(T.DATA.value, payload.get(T.DATA.value)),
            ttlv.byte_string(
                T.IV_COUNTER_NONCE.value, payload.get(T.IV_COUNTER_NONCE.value)
            ),
            ttlv.byte_string(
                T.AUTHENTICATED_ENCRYPTION_TAG.value,
                payload.get(T.AUTHENTICATED_ENCRYPTION_TAG.value),
            ),
        ],
    )
    assert decrypted.get(T.DATA.value) == b"old data"


def test_rsa_oaep_with_a_label(alice):
    """The P Source is the OAEP label (CS-AC-M-OAEP-9/10)."""
    private_uid, public_uid = create_pair(
        alice, CryptographicAlgorithm.RSA, 2048, private_mask=U.DECRYPT.value, public_mask=U.ENCRYPT.value
    )
    labelled = params(padding=PaddingMethod.OAEP, p_source=b"label")
    ciphertext = encrypt(alice, public_uid, b"secret", labelled).get(T.DATA.value)
    data = ttlv.byte_string(T.DATA.value, ciphertext)
    assert alice.ok(Operation.DECRYPT, [uid_item(private_uid), labelled, data]).get(T.DATA.value) == b"secret"
    other = params(padding=PaddingMethod.OAEP, p_source=b"other")
    alice.fails(Operation.DECRYPT, [uid_item(private_uid), other, data], ResultReason.CRYPTOGRAPHIC_FAILURE)


def test_decrypt_without_the_iv_the_mode_needs_is_an_invalid_message(alice):
    """As the profiles' CS-BC-M-11 to 13 answer, at every version."""
    uid = create_aes(alice)
    cbc = params(mode=BlockCipherMode.CBC, padding=PaddingMethod.PKCS5)
    alice.fails(
        Operation.DECRYPT, [uid_item(uid), cbc, ttlv.byte_string(T.DATA.value, bytes(16))], ResultReason.INVALID_MESSAGE
    )


@pytest.mark.parametrize("tag_length", [1, 32])
def test_encrypt_with_an_impossible_gcm_tag_length(alice, tag_length):
    """As the profiles' CS-BC-M-GCM-1 answers: General Failure."""
    uid = create_aes(alice)
    gcm = params(mode=BlockCipherMode.GCM, tag_length=tag_length)
    alice.fails(Operation.ENCRYPT, [uid_item(uid), gcm, ttlv.byte_string(T.DATA.value, b"x")], ResultReason.GENERAL_FAILURE)


def test_encrypt_without_a_mode(alice):
    uid = create_aes(alice)
    alice.fails(
        Operation.ENCRYPT,
        [uid_item(uid), ttlv.byte_string(T.DATA.value, b"x")],
        ResultReason.MISSING_DATA,
    )


def test_nist_key_wrap_as_encrypt(alice):
    uid = create_aes(alice)
    wrap = params(mode=BlockCipherMode.NIST_KEY_WRAP)
    payload = encrypt(alice, uid, bytes(range(32)), wrap)
    assert payload.find(T.IV_COUNTER_NONCE.value) is None
    decrypted = alice.ok(
        Operation.DECRYPT,
        [
            uid_item(uid),
            wrap,
            ttlv.byte_string(T.DATA.value, payload.get(T.DATA.value)),
        ],
    )
    assert decrypted.get(T.DATA.value) == bytes(range(32))


# ---------------------------------------------------------------------------
# MAC
# ---------------------------------------------------------------------------


def create_hmac_key(
    client, alg=CryptographicAlgorithm.HMAC_SHA256, mask=U.MAC_GENERATE.value
) -> str:
    key = os.urandom(32)
    uid = register(
        client, ObjectType.SYMMETRIC_KEY, symmetric_key(key, alg=alg), usage(mask)
    )
    client.ok(Operation.ACTIVATE, [uid_item(uid)])
    return uid, key


@pytest.mark.parametrize(
    "alg, name",
    [
        (CryptographicAlgorithm.HMAC_SHA256, "sha256"),
        (CryptographicAlgorithm.HMAC_SHA384, "sha384"),
        (CryptographicAlgorithm.HMAC_SHA512, "sha512"),
    ],
)
def test_mac(alice, alg, name):
    import hashlib
    import hmac

    uid, key = create_hmac_key(alice, alg)
    payload = alice.ok(
        Operation.MAC, [uid_item(uid), ttlv.byte_string(T.DATA.value, b"data")]
    )
    assert (
        payload.get(T.MAC_DATA.value)
        == hmac.new(key, b"data", getattr(hashlib, name)).digest()
    )
    # The algorithm may also be named in the Cryptographic Parameters.
    payload = alice.ok(
        Operation.MAC,
        [
            uid_item(uid),
            params(algorithm=CryptographicAlgorithm.HMAC_SHA512),
            ttlv.byte_string(T.DATA.value, b"data"),
        ],
    )
    assert (
        payload.get(T.MAC_DATA.value) == hmac.new(key, b"data", hashlib.sha512).digest()
    )


def test_mac_needs_the_mac_generate_bit(alice):
    uid, _ = create_hmac_key(alice, mask=U.MAC_VERIFY.value)
    alice.fails(
        Operation.MAC,
        [uid_item(uid), ttlv.byte_string(T.DATA.value, b"d")],
        ResultReason.PERMISSION_DENIED,
    )


# ---------------------------------------------------------------------------
# ReKey
# ---------------------------------------------------------------------------


def name_item(text: str) -> Item:
    return ttlv.structure(
        T.NAME.value,
        [ttlv.text(T.NAME_VALUE.value, text), ttlv.enumeration(T.NAME_TYPE.value, 1)],
    )


def test_rekey_links_and_carries_attributes_over(alice):
    old = create_aes(alice, extra=(name_item("vm-key"),))
    alice.ok(
        Operation.ADD_ATTRIBUTE,
        [uid_item(old), attribute("x-Vendor", ttlv.text(0, "VMware"))],
    )
    old_key = key_material(get(alice, old)).value

    payload = alice.ok(Operation.REKEY, [uid_item(old)])
    new = payload.get(T.UNIQUE_IDENTIFIER.value)
    assert new != old
    assert key_material(get(alice, new)).value != old_key

    (link,) = attribute_values(alice, old, "Link")
    assert link.get(T.LINK_TYPE.value) == LinkType.REPLACEMENT_OBJECT_LINK.value
    assert link.get(T.LINKED_OBJECT_IDENTIFIER.value) == new
    (link,) = attribute_values(alice, new, "Link")
    assert link.get(T.LINK_TYPE.value) == LinkType.REPLACED_OBJECT_LINK.value
    assert link.get(T.LINKED_OBJECT_IDENTIFIER.value) == old

    assert (
        attribute_values(alice, new, "State")[0].value == 2
    )  # Active, as the old key was
    assert attribute_values(alice, new, "x-Vendor")[0].value == "VMware"
    assert attribute_values(alice, new, "Name")[0].get(T.NAME_VALUE.value) == "vm-key"
    assert attribute_values(alice, old, "Name") == []
    assert attribute_values(alice, new, "Cryptographic Length")[0].value == 256


def test_rekey_with_an_offset(alice):
    old = create_aes(alice)
    payload = alice.ok(
        Operation.REKEY, [uid_item(old), ttlv.interval(T.OFFSET.value, 3600)]
    )
    new = payload.get(T.UNIQUE_IDENTIFIER.value)
    assert attribute_values(alice, new, "State")[0].value == 1  # Pre-Active until then
    activation = attribute_values(alice, new, "Activation Date")[0].value
    initial = attribute_values(alice, new, "Initial Date")[0].value
    assert activation - initial == 3600


def test_rekey_of_a_pre_active_key_stays_pre_active(alice):
    old = create_aes(alice, activate=False)
    new = alice.ok(Operation.REKEY, [uid_item(old)]).get(T.UNIQUE_IDENTIFIER.value)
    assert attribute_values(alice, new, "State")[0].value == 1


def test_usage_limits_count_down_and_refuse_past_the_budget(alice):
    """KMIP 1.4, 3.21 (CS-BC-M-7): 16 bytes allowed, then Permission Denied."""
    limits = ttlv.structure(
        T.USAGE_LIMITS.value,
        [
            ttlv.long_integer(T.USAGE_LIMITS_TOTAL.value, 16),
            ttlv.enumeration(T.USAGE_LIMITS_UNIT.value, UsageLimitsUnit.BYTE.value),
        ],
    )
    ecb = params(mode=BlockCipherMode.ECB)
    uid = create_aes(alice, extra=(limits,))
    encrypt(alice, uid, bytes(16), ecb)
    alice.fails(
        Operation.ENCRYPT, [uid_item(uid), ecb, ttlv.byte_string(T.DATA.value, bytes(16))], ResultReason.PERMISSION_DENIED
    )


def test_rng_seed_is_mixed_into_the_os_pool_and_counted(alice, monkeypatch, tmp_path):
    """RNG Seed takes the seed (at most SEED_MAX_BYTES) into the operating
    system's pool and says how much it took; an empty seed is refused; a
    pool that cannot be written takes none."""
    pool = tmp_path / "urandom"
    pool.write_bytes(b"")
    monkeypatch.setattr(crypto.rng, "_URANDOM", str(pool))
    seed = os.urandom(32)
    payload = alice.ok(Operation.RNG_SEED, [ttlv.byte_string(T.DATA.value, seed)])
    assert payload.get(T.DATA_LENGTH.value) == 32 and pool.read_bytes() == seed
    big = os.urandom(crypto.SEED_MAX_BYTES + 100)
    payload = alice.ok(Operation.RNG_SEED, [ttlv.byte_string(T.DATA.value, big)])
    assert payload.get(T.DATA_LENGTH.value) == crypto.SEED_MAX_BYTES
    alice.fails(Operation.RNG_SEED, [ttlv.byte_string(T.DATA.value, b"")], ResultReason.INVALID_FIELD)
    alice.fails(Operation.RNG_SEED, [], ResultReason.MISSING_DATA)
    monkeypatch.setattr(crypto.rng, "_URANDOM", str(tmp_path / "missing" / "urandom"))
    payload = alice.ok(Operation.RNG_SEED, [ttlv.byte_string(T.DATA.value, seed)])
    assert payload.get(T.DATA_LENGTH.value) == 0


@pytest.mark.skipif(not os.access("/dev/urandom", os.W_OK), reason="/dev/urandom is not writable here")
def test_rng_seed_reaches_the_real_pool(alice):
    payload = alice.ok(Operation.RNG_SEED, [ttlv.byte_string(T.DATA.value, os.urandom(16))])
    assert payload.get(T.DATA_LENGTH.value) == 16


# ---------------------------------------------------------------------------
# Keys of algorithms no operation computes with (issue 14)
# ---------------------------------------------------------------------------


def create_symmetric(client, alg, bits, mask=U.ENCRYPT.value | U.DECRYPT.value, version=None) -> Item:
    return client.call(
        Operation.CREATE,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            v1_attributes(algorithm(alg), length(bits), usage(mask)),
        ],
        version,
    )


@pytest.mark.parametrize(
    "alg,bits",
    [
        (CryptographicAlgorithm.IDEA, 128),
        (CryptographicAlgorithm.TRIPLE_DES, 168),
        (CryptographicAlgorithm.BLOWFISH, 128),
        (CryptographicAlgorithm.CAMELLIA, 256),
        (CryptographicAlgorithm.RC4, 128),
        (CryptographicAlgorithm.SKIPJACK, 80),
    ],
)
def test_create_a_key_of_an_algorithm_we_do_not_compute_with(alice, alg, bits):
    """Create is random bytes of a length the algorithm allows; Get returns
    them with the algorithm and length asked for."""
    item = create_symmetric(alice, alg, bits)
    assert item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value, item.get(T.RESULT_MESSAGE.value)
    uid = item.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    payload = get(alice, uid)
    block = payload.children()[2].find(T.KEY_BLOCK.value)
    assert block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == alg.value
    assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == bits
    assert len(key_material(payload).value) == (24 if alg == CryptographicAlgorithm.TRIPLE_DES else bits // 8)


def test_create_refuses_a_length_the_algorithm_does_not_allow(alice):
    for alg, bits in ((CryptographicAlgorithm.IDEA, 64), (CryptographicAlgorithm.SKIPJACK, 128), (CryptographicAlgorithm.RC4, 20)):
        item = create_symmetric(alice, alg, bits)
        assert item.get(T.RESULT_REASON.value) == ResultReason.INVALID_FIELD.value, (alg, bits)
        assert "key length must be" in item.get(T.RESULT_MESSAGE.value)


def test_computing_with_such_a_key_is_feature_not_supported(alice):
    """Encrypt, Decrypt and MAC with a key of an algorithm that is kept but
    not computed with: Feature Not Supported, not Cryptographic Failure."""
    item = create_symmetric(alice, CryptographicAlgorithm.IDEA, 128)
    uid = item.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    alice.ok(Operation.ACTIVATE, [uid_item(uid)])
    cbc = params(mode=BlockCipherMode.CBC, padding=PaddingMethod.PKCS5)
    data = ttlv.byte_string(T.DATA.value, b"sixteen bytes!!!")
    message = alice.fails(Operation.ENCRYPT, [uid_item(uid), cbc, data], ResultReason.FEATURE_NOT_SUPPORTED)
    assert "IDEA" in message
    iv = ttlv.byte_string(T.IV_COUNTER_NONCE.value, bytes(8))
    alice.fails(Operation.DECRYPT, [uid_item(uid), cbc, data, iv], ResultReason.FEATURE_NOT_SUPPORTED)
    mac_key = create_symmetric(alice, CryptographicAlgorithm.HMAC_MD5, 128, mask=U.MAC_GENERATE.value)
    mac_uid = mac_key.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    alice.ok(Operation.ACTIVATE, [uid_item(mac_uid)])
    alice.fails(Operation.MAC, [uid_item(mac_uid), data], ResultReason.FEATURE_NOT_SUPPORTED)


# ---------------------------------------------------------------------------
# Register checks the material against its stated length only (issue 14)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "alg,key_bytes",
    [(CryptographicAlgorithm.AES, 20), (CryptographicAlgorithm.IDEA, 24), (CryptographicAlgorithm.HMAC_SHA256, 8)],
)
def test_register_takes_key_material_of_an_unusual_length(alice, alg, key_bytes):
    key = os.urandom(key_bytes)
    uid = register(alice, ObjectType.SYMMETRIC_KEY, symmetric_key(key, alg=alg, bits=key_bytes * 8), length(key_bytes * 8))
    assert key_material(get(alice, uid)).value == key


def test_a_key_of_an_unusual_length_is_refused_by_the_operation_that_uses_it(alice):
    uid = register(
        alice,
        ObjectType.SYMMETRIC_KEY,
        symmetric_key(os.urandom(20)),
        usage(U.ENCRYPT.value | U.DECRYPT.value),
    )
    alice.ok(Operation.ACTIVATE, [uid_item(uid)])
    message = alice.fails(
        Operation.ENCRYPT,
        [uid_item(uid), params(mode=BlockCipherMode.CBC, padding=PaddingMethod.PKCS5), ttlv.byte_string(T.DATA.value, b"x")],
        ResultReason.CRYPTOGRAPHIC_FAILURE,
    )
    assert "AES key must be 128, 192 or 256 bits" in message


def test_register_still_refuses_material_that_contradicts_its_stated_length(alice):
    alice.fails(
        Operation.REGISTER,
        [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value), symmetric_key(os.urandom(20), bits=128)],
        ResultReason.INVALID_FIELD,
    )


def test_register_des_keys_stated_without_their_parity_bits(alice):
    uid = register(alice, ObjectType.SYMMETRIC_KEY, symmetric_key(os.urandom(8), alg=CryptographicAlgorithm.DES, bits=56))
    attributes = alice.ok(Operation.GET_ATTRIBUTES, [uid_item(uid), ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Length")])
    assert attributes.find(T.ATTRIBUTE.value).get(T.ATTRIBUTE_VALUE.value) == 56


# ---------------------------------------------------------------------------
# Operations on a destroyed object (issue 14)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version,reason",
    [
        (V1_1, ResultReason.ITEM_NOT_FOUND),
        (V1_4, ResultReason.ITEM_NOT_FOUND),
        (V2_0, ResultReason.OBJECT_DESTROYED),
        ((2, 1), ResultReason.OBJECT_DESTROYED),
    ],
)
def test_a_destroyed_key_is_not_found_at_1x_and_destroyed_at_2x(alice, version, reason):
    """Get, the cryptographic operations, Activate, Revoke, Destroy again,
    Check, Obtain Lease and ReKey on a destroyed key: Item Not Found at 1.x,
    Object Destroyed at 2.x. Its metadata stays readable (GetAttributes, as
    the OASIS flows SKLC-O-1, AKLC-O-1 and BL-M-9 read it) and Locate leaves
    it out unless asked for destroyed objects."""
    cessation = ttlv.structure(
        T.REVOCATION_REASON.value,
        [ttlv.enumeration(T.REVOCATION_REASON_CODE.value, RevocationReasonCode.CESSATION_OF_OPERATION.value)],
    )
    uid = create_aes(alice)
    alice.ok(Operation.REVOKE, [uid_item(uid), cessation])
    alice.ok(Operation.DESTROY, [uid_item(uid)])
    data = ttlv.byte_string(T.DATA.value, bytes(16))
    ecb = params(mode=BlockCipherMode.ECB)
    refused = {
        "Get": (Operation.GET, [uid_item(uid)]),
        "Encrypt": (Operation.ENCRYPT, [uid_item(uid), ecb, data]),
        "Decrypt": (Operation.DECRYPT, [uid_item(uid), ecb, data]),
        "Activate": (Operation.ACTIVATE, [uid_item(uid)]),
        "Revoke": (Operation.REVOKE, [uid_item(uid), cessation]),
        "Destroy": (Operation.DESTROY, [uid_item(uid)]),
        "Check": (Operation.CHECK, [uid_item(uid)]),
        "ReKey": (Operation.REKEY, [uid_item(uid)]),
    }
    for label, (op, payload) in refused.items():
        item = alice.call(op, payload, version)
        assert item.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value, label
        assert item.get(T.RESULT_REASON.value) == reason.value, (label, ResultReason(item.get(T.RESULT_REASON.value)))
    item = alice.call(Operation.GET_ATTRIBUTES, [uid_item(uid)], version)
    assert item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value


def test_a_destroyed_key_found_compromised_is_still_revoked(alice):
    """Revoke for Key Compromise moves a destroyed key to Destroyed
    Compromised (KMIP 1.4, 3.22): the one change a destroyed key takes."""
    uid = create_aes(alice, activate=False)
    alice.ok(Operation.DESTROY, [uid_item(uid)])
    compromise = ttlv.structure(
        T.REVOCATION_REASON.value,
        [ttlv.enumeration(T.REVOCATION_REASON_CODE.value, RevocationReasonCode.KEY_COMPROMISE.value)],
    )
    alice.ok(Operation.REVOKE, [uid_item(uid), compromise])
    payload = alice.ok(Operation.GET_ATTRIBUTES, [uid_item(uid), ttlv.text(T.ATTRIBUTE_NAME.value, "State")])
    assert payload.find(T.ATTRIBUTE.value).get(T.ATTRIBUTE_VALUE.value) == State.DESTROYED_COMPROMISED.value


def test_locate_leaves_out_destroyed_keys_unless_asked(alice):
    kept, gone = create_aes(alice, activate=False), create_aes(alice, activate=False)
    alice.ok(Operation.DESTROY, [uid_item(gone)])
    found = alice.ok(Operation.LOCATE, []).find_all(T.UNIQUE_IDENTIFIER.value)
    assert [i.value for i in found] == [kept]
    by_state = alice.ok(Operation.LOCATE, [attribute("State", ttlv.enumeration(0, State.DESTROYED.value))])
    assert [i.value for i in by_state.find_all(T.UNIQUE_IDENTIFIER.value)] == [gone]


@pytest.fixture
def located_queries(monkeypatch) -> list:
    """Every LocateQuery the SQL storage is asked, in order, from now on."""
    asked: list = []
    real = sql.locate_statement

    def spy(query, dialect="sqlite"):
        asked.append(query)
        return real(query, dialect)

    monkeypatch.setattr(sql, "locate_statement", spy)
    return asked


def test_locate_by_unique_identifier_reads_that_object_only(tmp_path, located_queries):
    """A Locate by Unique Identifier (four OASIS 1.4 flows ask it alone)
    finds that key, for its owner only, and the storage is told the uid:
    it reads that object's row, not every object's, which it would
    otherwise, as the lookup index leaves Unique Identifier out (issue 15)."""
    storage = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    asked = located_queries
    try:
        dispatcher = Dispatcher(Keystore(storage, Barrier(os.urandom(32))), OPERATIONS)
        alice, bob = Client(dispatcher, "alice"), Client(dispatcher, "bob")
        uids = [create_aes(alice, activate=False) for _ in range(3)]

        def located(client: Client, *conditions: Item) -> list[str]:
            payload = client.ok(Operation.LOCATE, list(conditions))
            return [i.value for i in payload.find_all(T.UNIQUE_IDENTIFIER.value)]

        def by_uid(uid: str) -> Item:
            return attribute("Unique Identifier", ttlv.text(0, uid))

        assert located(alice, by_uid(uids[1])) == [uids[1]]
        assert asked[-1].uid == uids[1]
        kind = attribute("Object Type", ttlv.enumeration(0, ObjectType.SYMMETRIC_KEY.value))
        assert located(alice, kind, by_uid(uids[2])) == [uids[2]]
        assert asked[-1].uid == uids[2]
        secret = attribute("Object Type", ttlv.enumeration(0, ObjectType.SECRET_DATA.value))
        assert located(alice, by_uid(uids[2]), secret) == []
        assert located(alice, by_uid(str(uuid.uuid4()))) == []
        assert located(bob, by_uid(uids[1])) == []  # not bob's key
        # Without a Unique Identifier condition the storage is told no uid.
        assert located(alice, kind) == uids
        assert asked[-1].uid is None
    finally:
        storage.close()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_locate_by_a_condition_leaves_out_destroyed_keys_in_one_lookup(tmp_path, located_queries, backend):
    """A Locate with conditions leaves out destroyed and destroyed
    compromised keys in the one statement that finds the others (the
    storage checks each candidate's State), and finds them when the
    Storage Status Mask or the State asked for says so; a Locate without
    conditions leaves them out too."""
    storage = open_storage("memory://" if backend == "memory" else f"sqlite:///{tmp_path / 'kms.db'}")
    statements = located_queries
    try:
        alice = Client(Dispatcher(Keystore(storage, Barrier(os.urandom(32))), OPERATIONS), "alice")
        tag = attribute("x-Identifier", ttlv.text(0, "vm-42"))
        kept, gone, compromised, other = (create_aes(alice, activate=False) for _ in range(4))
        for uid in (kept, gone, compromised):
            alice.ok(Operation.ADD_ATTRIBUTE, [uid_item(uid), tag])
        alice.ok(Operation.DESTROY, [uid_item(gone)])
        alice.ok(Operation.DESTROY, [uid_item(compromised)])
        compromise = ttlv.structure(
            T.REVOCATION_REASON.value,
            [ttlv.enumeration(T.REVOCATION_REASON_CODE.value, RevocationReasonCode.KEY_COMPROMISE.value)],
        )
        alice.ok(Operation.REVOKE, [uid_item(compromised), compromise])

        def located(*conditions: Item) -> list[str]:
            return [i.value for i in alice.ok(Operation.LOCATE, list(conditions)).find_all(T.UNIQUE_IDENTIFIER.value)]

        statements.clear()
        assert located(tag) == [kept]
        if backend == "sqlite":
            assert len(statements) == 1, statements
            assert [name for name, _ in statements[0].excluded] == ["State", "State"]
        every = ttlv.integer(
            T.STORAGE_STATUS_MASK.value,
            StorageStatusMask.ONLINE_STORAGE.value | StorageStatusMask.DESTROYED_STORAGE.value,
        )
        assert located(tag, every) == [kept, gone, compromised]
        destroyed = attribute("State", ttlv.enumeration(0, State.DESTROYED.value))
        assert located(tag, destroyed) == [gone]
        assert located() == [kept, other]
    finally:
        storage.close()


# ---------------------------------------------------------------------------
# Split Key objects (issue 14)
# ---------------------------------------------------------------------------


def split_key(part: bytes, parts=3, identifier=2, threshold=2, method=SplitKeyMethod.XOR, prime=None, bits=None) -> Item:
    return ttlv.structure(
        T.SPLIT_KEY.value,
        [
            ttlv.integer(T.SPLIT_KEY_PARTS.value, parts),
            ttlv.integer(T.KEY_PART_IDENTIFIER.value, identifier),
            ttlv.integer(T.SPLIT_KEY_THRESHOLD.value, threshold),
            ttlv.enumeration(T.SPLIT_KEY_METHOD.value, method.value),
            ttlv.big_integer(T.PRIME_FIELD_SIZE.value, prime) if prime is not None else None,
            key_block(KeyFormatType.RAW, part, CryptographicAlgorithm.AES, bits),
        ],
    )


@pytest.mark.parametrize("version", [V1_4, V2_0])
def test_split_key_register_get_locate_destroy(alice, version):
    part = os.urandom(32)
    prime = 2**127 - 1
    uid = register(
        alice, ObjectType.SPLIT_KEY, split_key(part, method=SplitKeyMethod.POLYNOMIAL_SHARING_PRIME_FIELD, prime=prime), version=version
    )
    payload = get(alice, uid, version=version)
    assert payload.get(T.OBJECT_TYPE.value) == ObjectType.SPLIT_KEY.value
    obj = payload.find(T.SPLIT_KEY.value)
    assert obj.get(T.SPLIT_KEY_PARTS.value) == 3
    assert obj.get(T.KEY_PART_IDENTIFIER.value) == 2
    assert obj.get(T.SPLIT_KEY_THRESHOLD.value) == 2
    assert obj.get(T.SPLIT_KEY_METHOD.value) == SplitKeyMethod.POLYNOMIAL_SHARING_PRIME_FIELD.value
    assert obj.get(T.PRIME_FIELD_SIZE.value) == prime
    block = obj.find(T.KEY_BLOCK.value)
    assert block.get(T.KEY_FORMAT_TYPE.value) == KeyFormatType.RAW.value
    assert block.find(T.KEY_VALUE.value).get(T.KEY_MATERIAL.value) == part
    assert block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == CryptographicAlgorithm.AES.value
    assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == 256
    located = alice.ok(
        Operation.LOCATE,
        [attribute("Object Type", ttlv.enumeration(0, ObjectType.SPLIT_KEY.value))] if version < V2_0 else
        [ttlv.structure(T.ATTRIBUTES.value, [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SPLIT_KEY.value)])],
        version,
    )
    assert [i.value for i in located.find_all(T.UNIQUE_IDENTIFIER.value)] == [uid]
    alice.ok(Operation.DESTROY, [uid_item(uid)], version)
    alice.fails(
        Operation.GET,
        [uid_item(uid)],
        ResultReason.OBJECT_DESTROYED if version >= V2_0 else ResultReason.ITEM_NOT_FOUND,
        version,
    )


@pytest.mark.parametrize(
    "fields",
    [
        {"identifier": 4},
        {"threshold": 0},
        {"parts": 0, "identifier": 0, "threshold": 0},
        {"method": SplitKeyMethod.POLYNOMIAL_SHARING_PRIME_FIELD},
        {"bits": 128},
    ],
)
def test_split_key_with_inconsistent_parameters_is_refused(alice, fields):
    alice.fails(
        Operation.REGISTER,
        [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SPLIT_KEY.value), split_key(os.urandom(32), **fields)],
        ResultReason.INVALID_FIELD,
    )


# ---------------------------------------------------------------------------
# DeriveKey (issue 14)
# ---------------------------------------------------------------------------


def derivation_parameters(**fields) -> Item:
    items = []
    if "params" in fields:
        items.append(fields["params"])
    for key, t in (("data", T.DERIVATION_DATA), ("salt", T.SALT), ("iv", T.INITIALIZATION_VECTOR)):
        if key in fields:
            items.append(ttlv.byte_string(t.value, fields[key]))
    if "iterations" in fields:
        items.append(ttlv.integer(T.ITERATION_COUNT.value, fields["iterations"]))
    return ttlv.structure(T.DERIVATION_PARAMETERS.value, items)


def derive(client, base_uids, method, parameters, *template, object_type=ObjectType.SYMMETRIC_KEY, version=None):
    if version is not None and version >= V2_0:
        attributes = ttlv.structure(T.ATTRIBUTES.value, template)
    else:
        attributes = v1_attributes(*template)
    return client.call(
        Operation.DERIVE_KEY,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, object_type.value),
            *(uid_item(u) for u in base_uids),
            ttlv.enumeration(T.DERIVATION_METHOD.value, method.value),
            parameters,
            attributes,
        ],
        version,
    )


def derived_uid(item: Item) -> str:
    assert item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value, item.get(T.RESULT_MESSAGE.value)
    return item.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)


def base_key(client, key: bytes, object_type=ObjectType.SYMMETRIC_KEY, mask=U.DERIVE_KEY.value) -> str:
    if object_type == ObjectType.SYMMETRIC_KEY:
        obj = symmetric_key(key)
    else:
        obj = ttlv.structure(
            T.SECRET_DATA.value,
            [ttlv.enumeration(T.SECRET_DATA_TYPE.value, SecretDataType.PASSWORD.value), key_block(KeyFormatType.OPAQUE, key)],
        )
    uid = register(client, object_type, obj, usage(mask))
    client.ok(Operation.ACTIVATE, [uid_item(uid)])
    return uid


def _kbkdf_counter(key: bytes, fixed: bytes, length: int) -> bytes:
    import hashlib
    import hmac

    out = b""
    counter = 1
    while len(out) < length:
        out += hmac.new(key, counter.to_bytes(4, "big") + fixed, hashlib.sha256).digest()
        counter += 1
    return out[:length]


@pytest.mark.parametrize("version", [V1_4, V2_0])
def test_derive_key_every_method(alice, version):
    """Each Derivation Method gives what an independent implementation of
    its definition gives, and the new key has the template's attributes."""
    import hashlib
    import hmac

    from cryptography.hazmat.primitives import hashes as h
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = os.urandom(32)
    uid = base_key(alice, key)
    password = base_key(alice, b"correct horse battery staple", ObjectType.SECRET_DATA)
    sha256 = params(hashing=HashingAlgorithm.SHA_256)
    data, salt = b"derivation data", os.urandom(16)
    template = (algorithm(CryptographicAlgorithm.AES), length(256), usage(U.ENCRYPT.value), name_item(f"derived-{version}"))
    D = DerivationMethod
    cases = [
        ([password], D.PBKDF2, derivation_parameters(params=sha256, salt=salt, iterations=1000),
         hashlib.pbkdf2_hmac("sha256", b"correct horse battery staple", salt, 1000, 32)),
        ([uid], D.HMAC, derivation_parameters(params=sha256, data=data), hmac.new(key, data, hashlib.sha256).digest()),
        ([uid], D.HKDF, derivation_parameters(params=sha256, data=data, salt=salt),
         HKDF(h.SHA256(), 32, salt, data).derive(key)),
        ([uid], D.HASH, derivation_parameters(params=sha256, data=data), hashlib.sha256(data).digest()),
        ([uid], D.NIST800_108_C, derivation_parameters(params=sha256, data=data), _kbkdf_counter(key, data, 32)),
        ([uid], D.ENCRYPT, derivation_parameters(params=params(mode=BlockCipherMode.ECB), data=bytes(range(32))),
         (lambda e: e.update(bytes(range(32))) + e.finalize())(Cipher(algorithms.AES(key), modes.ECB()).encryptor())),
    ]
    for bases, method, parameters, expected in cases:
        new = derived_uid(derive(alice, bases, method, parameters, *template, version=version))
        payload = get(alice, new, version=version)
        assert key_material(payload).value == expected, method
        block = payload.children()[2].find(T.KEY_BLOCK.value)
        assert block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == CryptographicAlgorithm.AES.value
        assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == 256
    named = alice.ok(Operation.LOCATE, [attribute("Name", name_item(f"derived-{version}"))] if version < V2_0 else
                     [ttlv.structure(T.ATTRIBUTES.value, [name_item(f"derived-{version}")])], version)
    assert len(named.find_all(T.UNIQUE_IDENTIFIER.value)) == len(cases)


def test_derive_secret_data_and_data_from_a_second_object(alice):
    """Secret data is derived too (its length from the template); without
    Derivation Data, a second base object that is secret data gives it."""
    import hashlib
    import hmac

    key = os.urandom(32)
    uid = base_key(alice, key)
    info = base_key(alice, b"context from a secret", ObjectType.SECRET_DATA)
    item = derive(
        alice, [uid, info], DerivationMethod.HMAC, derivation_parameters(params=params(hashing=HashingAlgorithm.SHA_256)),
        length(128), object_type=ObjectType.SECRET_DATA,
    )
    payload = get(alice, derived_uid(item))
    assert payload.get(T.OBJECT_TYPE.value) == ObjectType.SECRET_DATA.value
    assert key_material(payload).value == hmac.new(key, b"context from a secret", hashlib.sha256).digest()[:16]


def test_derive_key_refusals(alice):
    key_uid = base_key(alice, os.urandom(32))
    no_bit = base_key(alice, os.urandom(32), mask=U.ENCRYPT.value)
    sha256 = params(hashing=HashingAlgorithm.SHA_256)
    aes256 = (algorithm(CryptographicAlgorithm.AES), length(256))
    hmac_params = derivation_parameters(params=sha256, data=b"d")

    def reason(item):
        return ResultReason(item.get(T.RESULT_REASON.value))

    assert reason(derive(alice, [no_bit], DerivationMethod.HMAC, hmac_params, *aes256)) == ResultReason.PERMISSION_DENIED
    assert reason(derive(alice, [key_uid], DerivationMethod.HMAC, hmac_params, algorithm(CryptographicAlgorithm.AES))) == ResultReason.MISSING_DATA
    assert reason(derive(alice, [key_uid], DerivationMethod.HMAC, hmac_params, length(256))) == ResultReason.MISSING_DATA
    # HMAC-SHA-256 gives 32 bytes at most.
    assert reason(derive(alice, [key_uid], DerivationMethod.HMAC, hmac_params, algorithm(CryptographicAlgorithm.AES), length(512))) == ResultReason.INVALID_FIELD
    assert reason(derive(alice, [key_uid], DerivationMethod.PBKDF2, derivation_parameters(params=sha256), *aes256)) == ResultReason.MISSING_DATA
    assert reason(derive(alice, [key_uid], DerivationMethod.ASYMMETRIC_KEY, hmac_params, *aes256)) == ResultReason.FEATURE_NOT_SUPPORTED
    assert reason(derive(alice, ["no-such-object"], DerivationMethod.HMAC, hmac_params, *aes256)) == ResultReason.ITEM_NOT_FOUND


# ---------------------------------------------------------------------------
# Register of a wrapped key (issue 14)
# ---------------------------------------------------------------------------


def wrapped_symmetric_key(wrapped: bytes, kek: str, *info: Item, encoding=None, bits=256) -> Item:
    return ttlv.structure(
        T.SYMMETRIC_KEY.value,
        [
            ttlv.structure(
                T.KEY_BLOCK.value,
                [
                    ttlv.enumeration(T.KEY_FORMAT_TYPE.value, KeyFormatType.RAW.value),
                    ttlv.byte_string(T.KEY_VALUE.value, wrapped),
                    algorithm(CryptographicAlgorithm.AES),
                    length(bits),
                    ttlv.structure(
                        T.KEY_WRAPPING_DATA.value,
                        [
                            ttlv.enumeration(T.WRAPPING_METHOD.value, WrappingMethod.ENCRYPT.value),
                            ttlv.structure(T.ENCRYPTION_KEY_INFORMATION.value, [uid_item(kek), *info]),
                            ttlv.enumeration(T.ENCODING_OPTION.value, encoding.value) if encoding is not None else None,
                        ],
                    ),
                ],
            )
        ],
    )


def key_wrap_type(value: KeyWrapType) -> Item:
    return ttlv.enumeration(T.KEY_WRAP_TYPE.value, value.value)


@pytest.mark.parametrize("encoding", [None, EncodingOption.NO_ENCODING], ids=["ttlv", "no-encoding"])
def test_register_a_key_wrapped_with_aes_key_wrap(alice, encoding):
    kek = create_aes(alice, mask=U.WRAP_KEY.value | U.UNWRAP_KEY.value)
    kek_bytes = key_material(get(alice, kek)).value
    key = os.urandom(32)
    if encoding is None:
        inner = ttlv.encode(ttlv.structure(T.KEY_VALUE.value, [ttlv.byte_string(T.KEY_MATERIAL.value, key)]))
    else:
        inner = key
    wrapped = crypto.wrap_key(kek_bytes, inner, BlockCipherMode.AES_KEY_WRAP_PADDING)
    registered = wrapped_symmetric_key(wrapped, kek, params(mode=BlockCipherMode.AES_KEY_WRAP_PADDING), encoding=encoding)
    uid = register(alice, ObjectType.SYMMETRIC_KEY, registered, usage(U.ENCRYPT.value | U.DECRYPT.value))
    # Unwrapped by default and with Not Wrapped.
    assert key_material(get(alice, uid)).value == key
    assert key_material(get(alice, uid, key_wrap_type(KeyWrapType.NOT_WRAPPED))).value == key
    # As Registered: the Key Block byte for byte.
    payload = get(alice, uid, key_wrap_type(KeyWrapType.AS_REGISTERED))
    assert payload.children()[2] == registered
    # The key is used like any other.
    alice.ok(Operation.ACTIVATE, [uid_item(uid)])
    out = alice.ok(
        Operation.ENCRYPT,
        [uid_item(uid), params(algorithm=CryptographicAlgorithm.AES, mode=BlockCipherMode.ECB, padding=PaddingMethod.NONE), ttlv.byte_string(T.DATA.value, bytes(16))],
    )
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert out.get(T.DATA.value) == encryptor.update(bytes(16)) + encryptor.finalize()


def test_register_a_key_wrapped_with_rsa_oaep(alice):
    payload = alice.ok(
        Operation.CREATE_KEY_PAIR,
        [
            v1_attributes(
                algorithm(CryptographicAlgorithm.RSA),
                length(2048),
                usage(U.WRAP_KEY.value | U.UNWRAP_KEY.value),
                tag=T.COMMON_TEMPLATE_ATTRIBUTE,
            )
        ],
    )
    private_uid = payload.get(T.PRIVATE_KEY_UNIQUE_IDENTIFIER.value)
    public_uid = payload.get(T.PUBLIC_KEY_UNIQUE_IDENTIFIER.value)
    for uid in (private_uid, public_uid):
        alice.ok(Operation.ACTIVATE, [uid_item(uid)])
    public = key_material(get(alice, public_uid, fmt_item(KeyFormatType.X_509))).value
    key = os.urandom(16)
    wrapped = crypto.rsa_wrap(public, key, PaddingMethod.OAEP, HashingAlgorithm.SHA_256)
    registered = wrapped_symmetric_key(
        wrapped, private_uid, params(padding=PaddingMethod.OAEP, hashing=HashingAlgorithm.SHA_256), encoding=EncodingOption.NO_ENCODING, bits=128
    )
    uid = register(alice, ObjectType.SYMMETRIC_KEY, registered)
    assert key_material(get(alice, uid)).value == key
    assert get(alice, uid, key_wrap_type(KeyWrapType.AS_REGISTERED)).children()[2] == registered


def test_register_of_a_wrapped_key_refusals(alice, bob):
    kek = create_aes(alice, mask=U.WRAP_KEY.value | U.UNWRAP_KEY.value)
    kek_bytes = key_material(get(alice, kek)).value
    key = os.urandom(32)
    wrapped = crypto.wrap_key(kek_bytes, key)

    def refused(obj: Item, reason: ResultReason, client: Client = alice) -> str:
        return client.fails(
            Operation.REGISTER,
            [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value), v1_attributes(), obj],
            reason,
        )

    # A wrapping key without Unwrap Key, another client's, a wrong key.
    no_unwrap = create_aes(alice, mask=U.WRAP_KEY.value)
    refused(wrapped_symmetric_key(crypto.wrap_key(key_material(get(alice, no_unwrap)).value, key), no_unwrap, encoding=EncodingOption.NO_ENCODING), ResultReason.PERMISSION_DENIED)
    refused(wrapped_symmetric_key(wrapped, kek, encoding=EncodingOption.NO_ENCODING), ResultReason.ITEM_NOT_FOUND, bob)
    refused(wrapped_symmetric_key(os.urandom(40), kek, encoding=EncodingOption.NO_ENCODING), ResultReason.CRYPTOGRAPHIC_FAILURE)
    # Bytes that unwrap but are no TTLV Key Value, with the default encoding.
    refused(wrapped_symmetric_key(wrapped, kek), ResultReason.INVALID_FIELD)
    # A Key Value structure without a byte-string Key Material holds no
    # wrapped bytes.
    def with_key_value(key_value: Item) -> Item:
        block = wrapped_symmetric_key(wrapped, kek).find(T.KEY_BLOCK.value)
        return ttlv.structure(
            T.SYMMETRIC_KEY.value,
            [ttlv.structure(T.KEY_BLOCK.value, [key_value if c.tag == T.KEY_VALUE.value else c for c in block.children()])],
        )

    refused(
        with_key_value(ttlv.structure(T.KEY_VALUE.value, [ttlv.structure(T.KEY_MATERIAL.value, [ttlv.byte_string(T.KEY.value, key)])])),
        ResultReason.INVALID_FIELD,
    )
    # PyKMIP's form: the wrapped key material as the Key Material of a Key
    # Value structure; kept as registered.
    pykmip_form = with_key_value(ttlv.structure(T.KEY_VALUE.value, [ttlv.byte_string(T.KEY_MATERIAL.value, wrapped)]))
    uid = register(alice, ObjectType.SYMMETRIC_KEY, pykmip_form)
    assert key_material(get(alice, uid)).value == key
    assert get(alice, uid, key_wrap_type(KeyWrapType.AS_REGISTERED)).children()[2] == pykmip_form
    # As Registered and a Key Wrapping Specification exclude each other.
    alice.fails(Operation.GET, [uid_item(uid), key_wrap_type(KeyWrapType.AS_REGISTERED), wrapping_spec(kek)], ResultReason.INVALID_FIELD)
    # A key registered in clear: As Registered returns it unwrapped.
    uid = register(alice, ObjectType.SYMMETRIC_KEY, symmetric_key(key))
    assert key_material(get(alice, uid, key_wrap_type(KeyWrapType.AS_REGISTERED))).value == key
