"""Key operations (Get, Register, CreateKeyPair, ReKey, Encrypt, Decrypt,
MAC, Sign, Signature Verify) through the real Dispatcher, over the
in-memory storage and a barrier with a random master key."""

from __future__ import annotations

import os

import pytest
from kmip.core.enums import (
    CryptographicAlgorithm,
    CryptographicUsageMask,
    KeyFormatType,
    ObjectType,
    Operation,
    ResultReason,
    ResultStatus,
    Tags,
)

from kms_server.dispatch.dispatcher import ConnectionInfo, Dispatcher
from kms_server.keystore.barrier import Barrier
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.policy import Principal, Role
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage
from kms_server.wire import ttlv
from kms_server.wire.ttlv import Item

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
    alice.fails(Operation.GET, [uid_item(uid)], ResultReason.KEY_VALUE_NOT_PRESENT)


def test_get_of_another_clients_key_is_not_found(alice, bob):
    uid = create_aes(alice)
    bob.fails(Operation.GET, [uid_item(uid)], ResultReason.ITEM_NOT_FOUND)


def test_no_crypto_administrator_may_not_get(alice, dispatcher):
    uid = create_aes(alice)
    admin = Client(dispatcher, "ops", Role.NO_CRYPTO_ADMINISTRATOR)
    admin.ok(Operation.GET_ATTRIBUTES, [uid_item(uid)])
    admin.fails(Operation.GET, [uid_item(uid)], ResultReason.PERMISSION_DENIED)
