"""The attribute operations, Locate and the lifecycle operations through the
Dispatcher, at KMIP 1.1 (Attribute Name / Attribute Value) and 2.0 (the
attribute's own tag, vendor attributes as Vendor Identification + Attribute
Name), with the in-memory storage. Access rules come from
kmip_core.policy: a client sees its own objects, administrators
see all, a no-crypto administrator manages but never touches key material,
an auditor has no key operation."""

from __future__ import annotations

import os
import time
import types

import pytest
from kmip.core import enums
from kmip.core.enums import (
    CryptographicAlgorithm,
    NameType,
    ObjectType,
    Operation,
    ResultReason,
    ResultStatus,
    RevocationReasonCode,
    State,
)
from kmip.core.enums import Tags as T

from kmip_core import ttlv
from kmip_core.policy import Action, Principal, Role
from kmip_core.sealing.barrier import Barrier
from kmip_core.server import dispatcher as dispatcher_module
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher
from kmip_core.ttlv import Item, ItemType
from kms_server.keystore.attributes import SPECS
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage

V11, V20 = (1, 1), (2, 0)
VALUE = T.ATTRIBUTE_VALUE.value

ALICE = Principal("alice")
BOB = Principal("bob")
ADMIN = Principal("admin", Role.ADMINISTRATOR)
NOCRYPTO = Principal("nocrypto", Role.NO_CRYPTO_ADMINISTRATOR)
AUDITOR = Principal("auditor", Role.AUDITOR)


class Refused(Exception):
    def __init__(self, reason: ResultReason, message: str):
        super().__init__(f"{reason.name}: {message}")
        self.reason = reason
        self.message = message


# Values. The tag is irrelevant: each builder retags what it sends.
def text(v: str) -> Item:
    return ttlv.text(VALUE, v)


def integer(v: int) -> Item:
    return ttlv.integer(VALUE, v)


def date(v: int) -> Item:
    return ttlv.date_time(VALUE, v)


def octets(v: bytes) -> Item:
    return ttlv.byte_string(VALUE, v)


def enum(v) -> Item:
    return ttlv.enumeration(VALUE, v.value)


def name(v: str) -> Item:
    return ttlv.structure(
        VALUE,
        [
            ttlv.text(T.NAME_VALUE.value, v),
            ttlv.enumeration(
                T.NAME_TYPE.value, NameType.UNINTERPRETED_TEXT_STRING.value
            ),
        ],
    )


def is_custom(attribute_name: str) -> bool:
    return attribute_name.startswith(("x-", "y-"))


class Client:
    """One client speaking one protocol version to the dispatcher."""

    def __init__(
        self, dispatcher: Dispatcher, principal: Principal, version: tuple[int, int]
    ):
        self.dispatcher = dispatcher
        self.principal = principal
        self.version = version

    @property
    def v2(self) -> bool:
        return self.version >= (2, 0)

    # Transport.
    def call(self, operation: Operation, payload: list[Item]) -> Item:
        header = ttlv.structure(
            T.REQUEST_HEADER.value,
            [
                ttlv.structure(
                    T.PROTOCOL_VERSION.value,
                    [
                        ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, self.version[0]),
                        ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, self.version[1]),
                    ],
                ),
                ttlv.integer(T.BATCH_COUNT.value, 1),
            ],
        )
        item = ttlv.structure(
            T.BATCH_ITEM.value,
            [
                ttlv.enumeration(T.OPERATION.value, operation.value),
                ttlv.structure(T.REQUEST_PAYLOAD.value, payload),
            ],
        )
        data = ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, item]))
        raw = self.dispatcher.handle(
            data, ConnectionInfo(self.principal, "127.0.0.1:1")
        )
        response = ttlv.decode(raw)
        (out,) = response.find_all(T.BATCH_ITEM.value)
        if out.get(T.RESULT_STATUS.value) != ResultStatus.SUCCESS.value:
            raise Refused(
                ResultReason(out.get(T.RESULT_REASON.value)),
                out.get(T.RESULT_MESSAGE.value, ""),
            )
        return out.find(T.RESPONSE_PAYLOAD.value)

    def refused(self, operation: Operation, payload: list[Item]) -> ResultReason:
        with pytest.raises(Refused) as info:
            self.call(operation, payload)
        return info.value.reason

    # Request forms.
    def attribute(self, attribute_name: str, value: Item) -> Item:
        if not self.v2:
            return ttlv.structure(
                T.ATTRIBUTE.value,
                [ttlv.text(T.ATTRIBUTE_NAME.value, attribute_name), value.retag(VALUE)],
            )
        if is_custom(attribute_name):
            vendor, _, short = attribute_name.partition("-")
            return ttlv.structure(
                T.ATTRIBUTE.value,
                [
                    ttlv.text(T.VENDOR_IDENTIFICATION.value, vendor),
                    ttlv.text(T.ATTRIBUTE_NAME.value, short),
                    value.retag(VALUE),
                ],
            )
        return value.retag(enums.convert_attribute_name_to_tag(attribute_name).value)

    def reference(self, attribute_name: str) -> Item:
        if is_custom(attribute_name):
            vendor, _, short = attribute_name.partition("-")
            return ttlv.structure(
                T.ATTRIBUTE_REFERENCE.value,
                [
                    ttlv.text(T.VENDOR_IDENTIFICATION.value, vendor),
                    ttlv.text(T.ATTRIBUTE_NAME.value, short),
                ],
            )
        return ttlv.enumeration(
            T.ATTRIBUTE_REFERENCE.value,
            enums.convert_attribute_name_to_tag(attribute_name).value,
        )

    def attributes_holder(self, attributes: list[tuple[str, Item]]) -> Item:
        items = [self.attribute(n, v) for n, v in attributes]
        tag = T.ATTRIBUTES if self.v2 else T.TEMPLATE_ATTRIBUTE
        return ttlv.structure(tag.value, items)

    @staticmethod
    def uid_item(uid: str) -> Item:
        return ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)

    # Operations.
    def create(self, *extra: tuple[str, Item]) -> str:
        return self.call(Operation.CREATE, self.create_payload(*extra)).get(
            T.UNIQUE_IDENTIFIER.value
        )

    def create_payload(self, *extra: tuple[str, Item]) -> list[Item]:
        attributes = [
            ("Cryptographic Algorithm", enum(CryptographicAlgorithm.AES)),
            ("Cryptographic Length", integer(256)),
            ("Cryptographic Usage Mask", integer(12)),
            *extra,
        ]
        return [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            self.attributes_holder(attributes),
        ]

    def add_payload(self, uid: str, attribute_name: str, value: Item) -> list[Item]:
        attribute = self.attribute(attribute_name, value)
        if self.v2:
            return [
                self.uid_item(uid),
                ttlv.structure(T.NEW_ATTRIBUTE.value, [attribute]),
            ]
        return [self.uid_item(uid), attribute]

    def add(self, uid: str, attribute_name: str, value: Item) -> Item:
        return self.call(
            Operation.ADD_ATTRIBUTE, self.add_payload(uid, attribute_name, value)
        )

    def modify_payload(
        self, uid, attribute_name, value, index: int = 0, current: Item | None = None
    ) -> list[Item]:
        if self.v2:
            payload = [self.uid_item(uid)]
            if current is not None:
                payload.append(
                    ttlv.structure(
                        T.CURRENT_ATTRIBUTE.value,
                        [self.attribute(attribute_name, current)],
                    )
                )
            payload.append(
                ttlv.structure(
                    T.NEW_ATTRIBUTE.value, [self.attribute(attribute_name, value)]
                )
            )
            return payload
        attribute = ttlv.structure(
            T.ATTRIBUTE.value,
            [
                ttlv.text(T.ATTRIBUTE_NAME.value, attribute_name),
                ttlv.integer(T.ATTRIBUTE_INDEX.value, index) if index else None,
                value.retag(VALUE),
            ],
        )
        return [self.uid_item(uid), attribute]

    def modify(
        self, uid, attribute_name, value, index: int = 0, current: Item | None = None
    ) -> Item:
        return self.call(
            Operation.MODIFY_ATTRIBUTE,
            self.modify_payload(uid, attribute_name, value, index, current),
        )

    def delete_payload(
        self, uid, attribute_name, index: int | None = None, current: Item | None = None
    ) -> list[Item]:
        if self.v2:
            if current is not None:
                return [
                    self.uid_item(uid),
                    ttlv.structure(
                        T.CURRENT_ATTRIBUTE.value,
                        [self.attribute(attribute_name, current)],
                    ),
                ]
            return [self.uid_item(uid), self.reference(attribute_name)]
        payload = [
            self.uid_item(uid),
            ttlv.text(T.ATTRIBUTE_NAME.value, attribute_name),
        ]
        if index is not None:
            payload.append(ttlv.integer(T.ATTRIBUTE_INDEX.value, index))
        return payload

    def delete(
        self, uid, attribute_name, index: int | None = None, current: Item | None = None
    ) -> Item:
        return self.call(
            Operation.DELETE_ATTRIBUTE,
            self.delete_payload(uid, attribute_name, index, current),
        )

    def set(self, uid: str, attribute_name: str, value: Item) -> Item:
        return self.call(
            Operation.SET_ATTRIBUTE, self.set_payload(uid, attribute_name, value)
        )

    def set_payload(self, uid: str, attribute_name: str, value: Item) -> list[Item]:
        return [
            self.uid_item(uid),
            ttlv.structure(
                T.NEW_ATTRIBUTE.value, [self.attribute(attribute_name, value)]
            ),
        ]

    def get_payload(self, uid: str, *names: str) -> list[Item]:
        if self.v2:
            return [self.uid_item(uid), *[self.reference(n) for n in names]]
        return [
            self.uid_item(uid),
            *[ttlv.text(T.ATTRIBUTE_NAME.value, n) for n in names],
        ]

    def get(self, uid: str, *names: str) -> dict[str, list[Item]]:
        """Attribute name -> values (as Attribute Value items), in order."""
        payload = self.call(Operation.GET_ATTRIBUTES, self.get_payload(uid, *names))
        assert payload.get(T.UNIQUE_IDENTIFIER.value) == uid
        out: dict[str, list[Item]] = {}
        if self.v2:
            holder = payload.find(T.ATTRIBUTES.value)
            assert holder is not None
            for item in holder.children():
                if item.tag == T.ATTRIBUTE.value:
                    key = f"{item.get(T.VENDOR_IDENTIFICATION.value)}-{item.get(T.ATTRIBUTE_NAME.value)}"
                    value = item.find(VALUE)
                else:
                    key = enums.convert_attribute_tag_to_name(T(item.tag))
                    value = item.retag(VALUE)
                out.setdefault(key, []).append(value)
        else:
            for item in payload.find_all(T.ATTRIBUTE.value):
                out.setdefault(item.get(T.ATTRIBUTE_NAME.value), []).append(
                    item.find(VALUE)
                )
        return out

    def values(self, uid: str, attribute_name: str) -> list:
        return [
            v if v.type == ItemType.STRUCTURE else v.value
            for v in self.get(uid, attribute_name).get(attribute_name, [])
        ]

    def attribute_list(self, uid: str) -> list[str]:
        payload = self.call(Operation.GET_ATTRIBUTE_LIST, [self.uid_item(uid)])
        if not self.v2:
            return [i.value for i in payload.find_all(T.ATTRIBUTE_NAME.value)]
        names = []
        for ref in payload.find_all(T.ATTRIBUTE_REFERENCE.value):
            if ref.type == ItemType.STRUCTURE:
                names.append(
                    f"{ref.get(T.VENDOR_IDENTIFICATION.value)}-{ref.get(T.ATTRIBUTE_NAME.value)}"
                )
            else:
                names.append(enums.convert_attribute_tag_to_name(T(ref.value)))
        return names

    def locate_payload(self, *attributes, maximum=None, offset=None) -> list[Item]:
        payload = [
            ttlv.integer(T.MAXIMUM_ITEMS.value, maximum)
            if maximum is not None
            else None,
            ttlv.integer(T.OFFSET_ITEMS.value, offset) if offset is not None else None,
        ]
        if self.v2:
            payload.append(
                ttlv.structure(
                    T.ATTRIBUTES.value, [self.attribute(n, v) for n, v in attributes]
                )
            )
        else:
            payload += [self.attribute(n, v) for n, v in attributes]
        return [p for p in payload if p is not None]

    def locate_full(
        self, *attributes, maximum=None, offset=None
    ) -> tuple[int | None, list[str]]:
        payload = self.call(
            Operation.LOCATE,
            self.locate_payload(*attributes, maximum=maximum, offset=offset),
        )
        return payload.get(T.LOCATED_ITEMS.value), [
            i.value for i in payload.find_all(T.UNIQUE_IDENTIFIER.value)
        ]

    def locate(self, *attributes, **paging) -> list[str]:
        return self.locate_full(*attributes, **paging)[1]

    def activate(self, uid: str) -> Item:
        return self.call(Operation.ACTIVATE, [self.uid_item(uid)])

    def revoke_payload(
        self, uid: str, code=RevocationReasonCode.CESSATION_OF_OPERATION
    ) -> list[Item]:
        reason = ttlv.structure(
            T.REVOCATION_REASON.value,
            [ttlv.enumeration(T.REVOCATION_REASON_CODE.value, code.value)],
        )
        return [self.uid_item(uid), reason]

    def revoke(
        self, uid: str, code=RevocationReasonCode.CESSATION_OF_OPERATION
    ) -> Item:
        return self.call(Operation.REVOKE, self.revoke_payload(uid, code))

    def destroy(self, uid: str) -> Item:
        return self.call(Operation.DESTROY, [self.uid_item(uid)])


@pytest.fixture
def keystore():
    return Keystore(open_storage("memory://"), Barrier(os.urandom(32)))


@pytest.fixture
def dispatcher(keystore):
    return Dispatcher(keystore, OPERATIONS)


@pytest.fixture(params=[V11, V20], ids=["1.1", "2.0"])
def version(request):
    return request.param


@pytest.fixture
def alice(dispatcher, version):
    return Client(dispatcher, ALICE, version)


@pytest.fixture
def bob(dispatcher, version):
    return Client(dispatcher, BOB, version)


def reason_for(client: Client, v1: ResultReason, v2: ResultReason) -> ResultReason:
    return v2 if client.v2 else v1


# Create.
def test_create_aes_256(alice):
    before = int(time.time())
    uid = alice.create(("Name", name("disk-key")))
    attributes = alice.get(uid)
    assert attributes["Unique Identifier"][0].value == uid
    assert attributes["Object Type"][0].value == ObjectType.SYMMETRIC_KEY.value
    assert (
        attributes["Cryptographic Algorithm"][0].value
        == CryptographicAlgorithm.AES.value
    )
    assert attributes["Cryptographic Length"][0].value == 256
    assert attributes["Cryptographic Usage Mask"][0].value == 12
    assert attributes["State"][0].value == State.PRE_ACTIVE.value
    assert attributes["Name"][0].find(T.NAME_VALUE.value).value == "disk-key"
    assert before <= attributes["Initial Date"][0].value <= int(time.time())
    assert attributes["Initial Date"][0].type == ItemType.DATE_TIME


def test_create_response_names_the_object(alice):
    payload = alice.call(Operation.CREATE, alice.create_payload())
    assert payload.get(T.OBJECT_TYPE.value) == ObjectType.SYMMETRIC_KEY.value
    assert isinstance(payload.get(T.UNIQUE_IDENTIFIER.value), str)


def test_key_material_is_sealed_in_storage(alice, keystore):
    uid = alice.create()
    with keystore.transaction() as txn:
        stored = txn.get_object(uid)
    assert stored.owner == "alice"
    assert stored.sealed_material is not None
    material = keystore.material(keystore_object(keystore, uid))
    assert len(material.data) == 32
    assert material.data not in stored.sealed_material


def keystore_object(keystore, uid):
    with keystore.transaction() as txn:
        return ManagedObject.from_stored(txn.get_object(uid))


# Add Attribute with custom attributes.
CUSTOM = [
    ("x-vcenter-owner", text("vm-42 on esx-1")),
    ("x-generation", integer(7)),
    ("x-rotated", date(1_700_000_123)),
    ("x-fingerprint", octets(bytes.fromhex("00ff10ee"))),
]


def test_add_custom_attributes_of_several_types(alice):
    uid = alice.create()
    for attribute_name, value in CUSTOM:
        response = alice.add(uid, attribute_name, value)
        assert response.get(T.UNIQUE_IDENTIFIER.value) == uid
    attributes = alice.get(uid)
    for attribute_name, value in CUSTOM:
        assert attributes[attribute_name] == [value], attribute_name


def test_add_attribute_response_in_1_x_echoes_the_attribute_with_its_index(dispatcher):
    alice = Client(dispatcher, ALICE, V11)
    uid = alice.create()
    first = alice.add(uid, "x-tag", text("a")).find(T.ATTRIBUTE.value)
    second = alice.add(uid, "x-tag", text("b")).find(T.ATTRIBUTE.value)
    assert (
        first.get(T.ATTRIBUTE_NAME.value),
        first.get(T.ATTRIBUTE_INDEX.value),
        first.get(VALUE),
    ) == ("x-tag", None, "a")
    assert (
        second.get(T.ATTRIBUTE_NAME.value),
        second.get(T.ATTRIBUTE_INDEX.value),
        second.get(VALUE),
    ) == ("x-tag", 1, "b")


def test_several_values_per_name_keep_their_order(alice):
    uid = alice.create()
    for v in ("a", "b", "c"):
        alice.add(uid, "x-multi", text(v))
    assert alice.values(uid, "x-multi") == ["a", "b", "c"]


def test_values_of_different_types_under_one_name(alice):
    uid = alice.create()
    alice.add(uid, "x-mixed", text("t"))
    alice.add(uid, "x-mixed", integer(3))
    assert alice.get(uid, "x-mixed")["x-mixed"] == [text("t"), integer(3)]


def test_custom_attribute_is_the_same_attribute_in_1_x_and_2_0(dispatcher):
    old, new = Client(dispatcher, ALICE, V11), Client(dispatcher, ALICE, V20)
    uid = old.create()
    old.add(uid, "x-shared", text("from 1.1"))
    new.add(uid, "x-shared", text("from 2.0"))
    assert new.values(uid, "x-shared") == ["from 1.1", "from 2.0"]
    assert old.values(uid, "x-shared") == ["from 1.1", "from 2.0"]


def test_add_a_second_value_to_a_single_valued_attribute_is_refused(alice):
    uid = alice.create()
    alice.add(uid, "Contact Information", text("ops@example.com"))
    assert alice.refused(
        Operation.ADD_ATTRIBUTE,
        alice.add_payload(uid, "Contact Information", text("other")),
    ) == reason_for(
        alice, ResultReason.INVALID_FIELD, ResultReason.ATTRIBUTE_SINGLE_VALUED
    )
    assert alice.values(uid, "Contact Information") == ["ops@example.com"]


def test_add_a_value_of_the_wrong_type_is_refused(alice):
    uid = alice.create()
    assert alice.refused(
        Operation.ADD_ATTRIBUTE,
        alice.add_payload(uid, "Contact Information", integer(1)),
    ) == (ResultReason.INVALID_FIELD)


def test_add_an_unknown_standard_name_is_refused(dispatcher):
    alice = Client(dispatcher, ALICE, V11)
    uid = alice.create()
    assert alice.refused(
        Operation.ADD_ATTRIBUTE, alice.add_payload(uid, "Colour", text("red"))
    ) == (ResultReason.INVALID_FIELD)


# Modify Attribute.
def test_modify_a_custom_attribute(alice):
    uid = alice.create()
    for v in ("a", "b", "c"):
        alice.add(uid, "x-multi", text(v))
    if alice.v2:
        alice.modify(uid, "x-multi", text("B"), current=text("b"))
    else:
        alice.modify(uid, "x-multi", text("B"), index=1)
    assert alice.values(uid, "x-multi") == ["a", "B", "c"]
    # Without an index (1.x) or a current value (2.0) the first value changes.
    alice.modify(uid, "x-multi", text("A"))
    assert alice.values(uid, "x-multi") == ["A", "B", "c"]


@pytest.mark.parametrize(
    "value",
    [integer(8), date(1_800_000_000), octets(b"\x01\x02\x03\x04")],
    ids=["int", "date", "bytes"],
)
def test_modify_keeps_the_type_given(alice, value):
    uid = alice.create()
    alice.add(uid, "x-typed", text("before"))
    alice.modify(uid, "x-typed", value)
    assert alice.get(uid, "x-typed")["x-typed"] == [value]


def test_modify_a_missing_attribute_is_refused(alice):
    uid = alice.create()
    assert alice.refused(
        Operation.MODIFY_ATTRIBUTE, alice.modify_payload(uid, "x-absent", text("v"))
    ) == reason_for(
        alice, ResultReason.ITEM_NOT_FOUND, ResultReason.ATTRIBUTE_NOT_FOUND
    )


def test_modify_at_an_index_past_the_end_is_refused(dispatcher):
    alice = Client(dispatcher, ALICE, V11)
    uid = alice.create()
    alice.add(uid, "x-one", text("v"))
    assert alice.refused(
        Operation.MODIFY_ATTRIBUTE,
        alice.modify_payload(uid, "x-one", text("w"), index=3),
    ) == (ResultReason.INDEX_OUT_OF_BOUNDS)
    assert alice.values(uid, "x-one") == ["v"]


def test_modify_with_a_current_value_the_object_lacks_is_refused(dispatcher):
    alice = Client(dispatcher, ALICE, V20)
    uid = alice.create()
    alice.add(uid, "x-one", text("v"))
    payload = alice.modify_payload(uid, "x-one", text("w"), current=text("not-there"))
    assert (
        alice.refused(Operation.MODIFY_ATTRIBUTE, payload)
        == ResultReason.ATTRIBUTE_NOT_FOUND
    )
    assert alice.values(uid, "x-one") == ["v"]


def test_modify_a_standard_modifiable_attribute(alice):
    uid = alice.create(("Name", name("old")))
    alice.modify(uid, "Name", name("new"))
    assert [n.find(T.NAME_VALUE.value).value for n in alice.values(uid, "Name")] == [
        "new"
    ]


# Delete Attribute.
def test_delete_one_value_of_a_custom_attribute(alice):
    uid = alice.create()
    for v in ("a", "b", "c"):
        alice.add(uid, "x-multi", text(v))
    if alice.v2:
        alice.delete(uid, "x-multi", current=text("b"))
    else:
        alice.delete(uid, "x-multi", index=1)
    assert alice.values(uid, "x-multi") == ["a", "c"]


def test_delete_every_value_removes_the_name(alice):
    uid = alice.create()
    alice.add(uid, "x-multi", text("a"))
    alice.add(uid, "x-multi", text("b"))
    if alice.v2:
        alice.delete(uid, "x-multi")  # By Attribute Reference: all values.
    else:
        alice.delete(uid, "x-multi", index=1)
        alice.delete(uid, "x-multi")
    assert alice.values(uid, "x-multi") == []
    assert "x-multi" not in alice.attribute_list(uid)


@pytest.mark.parametrize("attribute_name,value", CUSTOM, ids=[n for n, _ in CUSTOM])
def test_delete_custom_attribute_of_each_type(alice, attribute_name, value):
    uid = alice.create()
    alice.add(uid, attribute_name, value)
    if alice.v2:
        alice.delete(uid, attribute_name, current=value)
    else:
        alice.delete(uid, attribute_name)
    assert alice.values(uid, attribute_name) == []


def test_delete_a_missing_attribute_is_refused(alice):
    uid = alice.create()
    assert alice.refused(
        Operation.DELETE_ATTRIBUTE, alice.delete_payload(uid, "x-absent")
    ) == reason_for(
        alice, ResultReason.ITEM_NOT_FOUND, ResultReason.ATTRIBUTE_NOT_FOUND
    )


def test_delete_at_an_index_past_the_end_is_refused(dispatcher):
    alice = Client(dispatcher, ALICE, V11)
    uid = alice.create()
    alice.add(uid, "x-one", text("v"))
    assert alice.refused(
        Operation.DELETE_ATTRIBUTE, alice.delete_payload(uid, "x-one", index=1)
    ) == (ResultReason.INDEX_OUT_OF_BOUNDS)


# Modify and Delete Attribute at 1.x answer with the Attribute Index
# (issue 14): 1.x clients read it, PyKMIP's server gives it.
def _answered_attribute(response: Item) -> tuple:
    attribute = response.find(T.ATTRIBUTE.value)
    return (
        attribute.get(T.ATTRIBUTE_NAME.value),
        attribute.get(T.ATTRIBUTE_INDEX.value),
        attribute.find(VALUE),
    )


def test_modify_attribute_1_x_answers_the_index_also_when_it_is_0(dispatcher):
    alice = Client(dispatcher, ALICE, V11)
    uid = alice.create()
    for v in ("a", "b"):
        alice.add(uid, "x-multi", text(v))
    assert _answered_attribute(alice.modify(uid, "x-multi", text("A"))) == ("x-multi", 0, text("A"))
    assert _answered_attribute(alice.modify(uid, "x-multi", text("B"), index=1)) == ("x-multi", 1, text("B"))
    uid = alice.create(("Name", name("old")))
    assert _answered_attribute(alice.modify(uid, "Name", name("new")))[:2] == ("Name", 0)


def test_delete_attribute_1_x_answers_the_removed_value_and_its_index(dispatcher):
    alice = Client(dispatcher, ALICE, V11)
    uid = alice.create()
    for v in ("a", "b", "c"):
        alice.add(uid, "x-multi", text(v))
    assert _answered_attribute(alice.delete(uid, "x-multi", index=2)) == ("x-multi", 2, text("c"))
    assert _answered_attribute(alice.delete(uid, "x-multi")) == ("x-multi", 0, text("a"))
    assert alice.values(uid, "x-multi") == ["b"]


def test_a_single_instance_attribute_has_no_index_to_answer(dispatcher):
    alice = Client(dispatcher, ALICE, V11)
    uid = alice.create(("Contact Information", text("ops")))
    assert _answered_attribute(alice.modify(uid, "Contact Information", text("sec"))) == (
        "Contact Information",
        None,
        text("sec"),
    )
    assert _answered_attribute(alice.delete(uid, "Contact Information"))[:2] == ("Contact Information", None)


def test_modify_and_delete_attribute_2_0_answer_the_identifier_only(dispatcher):
    alice = Client(dispatcher, ALICE, V20)
    uid = alice.create()
    alice.add(uid, "x-multi", text("a"))
    for response in (alice.modify(uid, "x-multi", text("A")), alice.delete(uid, "x-multi")):
        assert [c.tag for c in response.children()] == [T.UNIQUE_IDENTIFIER.value]


def test_a_2_0_attribute_reference_without_vendor_names_a_standard_attribute(dispatcher):
    """PyKMIP's client sends Attribute Reference as the structure, with an
    empty Vendor Identification, for a standard attribute too."""
    alice = Client(dispatcher, ALICE, V20)
    uid = alice.create(("Name", name("n")))
    reference = ttlv.structure(
        T.ATTRIBUTE_REFERENCE.value,
        [ttlv.text(T.VENDOR_IDENTIFICATION.value, ""), ttlv.text(T.ATTRIBUTE_NAME.value, "Name")],
    )
    alice.call(Operation.DELETE_ATTRIBUTE, [alice.uid_item(uid), reference])
    assert alice.values(uid, "Name") == []
    unknown = ttlv.structure(
        T.ATTRIBUTE_REFERENCE.value,
        [ttlv.text(T.VENDOR_IDENTIFICATION.value, ""), ttlv.text(T.ATTRIBUTE_NAME.value, "No Such")],
    )
    assert alice.refused(Operation.DELETE_ATTRIBUTE, [alice.uid_item(uid), unknown]) == ResultReason.INVALID_FIELD


# Get Attributes / Get Attribute List.
def test_get_attributes_of_one_custom_name(alice):
    uid = alice.create()
    for attribute_name, value in CUSTOM:
        alice.add(uid, attribute_name, value)
    alice.add(uid, "x-generation", integer(8))
    assert alice.get(uid, "x-generation") == {"x-generation": [integer(7), integer(8)]}


def test_get_attributes_of_a_name_the_object_lacks_is_empty(alice):
    uid = alice.create()
    assert alice.get(uid, "x-absent") == {}


def test_get_attributes_of_several_names(alice):
    uid = alice.create()
    alice.add(uid, "x-a", text("1"))
    alice.add(uid, "x-b", text("2"))
    got = alice.get(uid, "x-a", "State", "x-b")
    assert got == {
        "x-a": [text("1")],
        "State": [enum(State.PRE_ACTIVE)],
        "x-b": [text("2")],
    }


def test_get_attribute_list(alice):
    uid = alice.create(("Name", name("listed")))
    alice.add(uid, "x-one", text("1"))
    alice.add(uid, "x-two", integer(2))
    names = alice.attribute_list(uid)
    assert len(names) == len(set(names))
    expected = {
        "Unique Identifier",
        "Object Type",
        "Cryptographic Algorithm",
        "Cryptographic Length",
        "Cryptographic Usage Mask",
        "State",
        "Initial Date",
        "Name",
        "x-one",
        "x-two",
    }
    assert expected <= set(names)
    assert set(names) <= set(SPECS) | {"x-one", "x-two"}
    # The list and the attributes agree.
    assert set(names) == set(alice.get(uid))


# Set Attribute (2.0).
@pytest.fixture
def alice20(dispatcher):
    return Client(dispatcher, ALICE, V20)


def test_set_attribute_gives_a_value_whether_or_not_one_exists(alice20):
    uid = alice20.create()
    alice20.set(uid, "x-single", text("one"))
    assert alice20.values(uid, "x-single") == ["one"]
    alice20.set(uid, "x-single", text("two"))
    assert alice20.values(uid, "x-single") == ["two"]
    alice20.set(uid, "Contact Information", text("ops@example.com"))
    alice20.set(uid, "Contact Information", text("sec@example.com"))
    assert alice20.values(uid, "Contact Information") == ["sec@example.com"]


def test_set_attribute_of_a_multi_valued_attribute_is_refused(alice20):
    uid = alice20.create()
    assert alice20.refused(
        Operation.SET_ATTRIBUTE, alice20.set_payload(uid, "Name", name("n"))
    ) == (ResultReason.INVALID_FIELD)


@pytest.mark.parametrize(
    "attribute_name,value",
    [
        ("State", enum(State.ACTIVE)),
        ("Object Type", enum(ObjectType.SECRET_DATA)),
        ("Cryptographic Length", integer(128)),
    ],
)
def test_set_attribute_of_a_read_only_attribute_is_refused(
    alice20, attribute_name, value
):
    uid = alice20.create()
    before = alice20.get(uid)
    assert alice20.refused(
        Operation.SET_ATTRIBUTE, alice20.set_payload(uid, attribute_name, value)
    ) == (ResultReason.ATTRIBUTE_READ_ONLY)
    assert alice20.get(uid) == before


# Read-only attributes.
READ_ONLY_CHANGES = [
    ("add", "State", enum(State.ACTIVE)),
    ("add", "Initial Date", date(1)),
    ("modify", "Cryptographic Algorithm", enum(CryptographicAlgorithm.HMAC_SHA256)),
    ("modify", "Object Type", enum(ObjectType.SECRET_DATA)),
    ("modify", "Unique Identifier", text("hijacked")),
    ("delete", "Unique Identifier", None),
    ("delete", "State", None),
    ("delete", "Cryptographic Usage Mask", None),
]


@pytest.mark.parametrize(
    "operation,attribute_name,value",
    READ_ONLY_CHANGES,
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_read_only_attributes_are_refused(alice, operation, attribute_name, value):
    uid = alice.create()
    before = alice.get(uid)
    if operation == "add":
        op, payload = (
            Operation.ADD_ATTRIBUTE,
            alice.add_payload(uid, attribute_name, value),
        )
    elif operation == "modify":
        op, payload = (
            Operation.MODIFY_ATTRIBUTE,
            alice.modify_payload(uid, attribute_name, value),
        )
    else:
        op, payload = (
            Operation.DELETE_ATTRIBUTE,
            alice.delete_payload(uid, attribute_name),
        )
    assert alice.refused(op, payload) == reason_for(
        alice, ResultReason.PERMISSION_DENIED, ResultReason.ATTRIBUTE_READ_ONLY
    )
    assert alice.get(uid) == before


def test_server_set_attribute_at_create_is_refused(alice):
    assert alice.refused(
        Operation.CREATE, alice.create_payload(("State", enum(State.ACTIVE)))
    ) == reason_for(
        alice, ResultReason.PERMISSION_DENIED, ResultReason.ATTRIBUTE_READ_ONLY
    )
    assert alice.locate() == []


# Locate.
def test_locate_by_custom_attribute(alice):
    tagged = [alice.create() for _ in range(2)]
    other = alice.create()
    for uid in tagged:
        alice.add(uid, "x-vm", text("vm-1"))
    alice.add(other, "x-vm", text("vm-2"))
    assert alice.locate(("x-vm", text("vm-1"))) == tagged
    assert alice.locate(("x-vm", text("vm-2"))) == [other]
    assert alice.locate(("x-vm", text("vm-3"))) == []


@pytest.mark.parametrize(
    "value",
    [integer(7), date(1_700_000_123), octets(b"\x00\xff\x10\xee")],
    ids=["int", "date", "bytes"],
)
def test_locate_by_custom_attribute_of_other_types(alice, value):
    uid = alice.create()
    alice.create()
    alice.add(uid, "x-typed", value)
    assert alice.locate(("x-typed", value)) == [uid]


def test_locate_by_several_custom_attributes_needs_all(alice):
    both, one = alice.create(), alice.create()
    for uid in (both, one):
        alice.add(uid, "x-a", text("1"))
    alice.add(both, "x-b", text("2"))
    assert alice.locate(("x-a", text("1")), ("x-b", text("2"))) == [both]


def test_locate_matches_any_of_several_values(alice):
    uid = alice.create()
    alice.add(uid, "x-multi", text("a"))
    alice.add(uid, "x-multi", text("b"))
    assert alice.locate(("x-multi", text("b"))) == [uid]


def test_locate_by_name(alice):
    first = alice.create(("Name", name("disk-1")))
    alice.create(("Name", name("disk-2")))
    assert alice.locate(("Name", name("disk-1"))) == [first]
    assert alice.locate(("Name", name("disk-3"))) == []


def test_locate_by_object_type_and_algorithm(alice):
    aes = [alice.create(), alice.create()]
    hmac = alice.call(
        Operation.CREATE,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            alice.attributes_holder(
                [
                    (
                        "Cryptographic Algorithm",
                        enum(CryptographicAlgorithm.HMAC_SHA256),
                    ),
                    ("Cryptographic Length", integer(256)),
                ]
            ),
        ],
    ).get(T.UNIQUE_IDENTIFIER.value)
    symmetric = ("Object Type", enum(ObjectType.SYMMETRIC_KEY))
    assert (
        alice.locate(
            symmetric, ("Cryptographic Algorithm", enum(CryptographicAlgorithm.AES))
        )
        == aes
    )
    assert alice.locate(
        symmetric, ("Cryptographic Algorithm", enum(CryptographicAlgorithm.HMAC_SHA256))
    ) == [hmac]
    assert alice.locate(("Object Type", enum(ObjectType.PRIVATE_KEY))) == []
    assert alice.locate(symmetric) == aes + [hmac]


def test_locate_by_state(alice):
    pre, active, revoked = alice.create(), alice.create(), alice.create()
    alice.activate(active)
    alice.activate(revoked)
    alice.revoke(revoked)
    assert alice.locate(("State", enum(State.PRE_ACTIVE))) == [pre]
    assert alice.locate(("State", enum(State.ACTIVE))) == [active]
    assert alice.locate(("State", enum(State.DEACTIVATED))) == [revoked]


def test_locate_by_state_sees_an_activation_date_that_has_passed(alice, monkeypatch):
    """A key created with a future Activation Date becomes Active when that
    date passes (KMIP 1.4, 3.24). Get Attributes reports it Active; Locate
    by State must agree."""
    clock = [int(time.time())]
    monkeypatch.setattr(
        dispatcher_module,
        "time",
        # The request clock is moved; latencies (monotonic) still run.
        types.SimpleNamespace(time=lambda: clock[0], monotonic=time.monotonic),
    )
    uid = alice.create(("Activation Date", date(clock[0] + 100)))
    assert alice.values(uid, "State") == [State.PRE_ACTIVE.value]
    clock[0] += 200
    assert alice.values(uid, "State") == [State.ACTIVE.value]
    assert alice.locate(("State", enum(State.ACTIVE))) == [uid]
    assert alice.locate(("State", enum(State.PRE_ACTIVE))) == []


def test_locate_paging_with_maximum_items(alice):
    uids = [alice.create() for _ in range(5)]
    located, page = alice.locate_full(maximum=2)
    assert page == uids[:2]
    if alice.v2:
        assert located == 5
    else:
        assert located is None  # Located Items is a 1.3 field.


def test_locate_paging_with_offset_items(dispatcher):
    alice = Client(dispatcher, ALICE, V20)
    uids = [alice.create(("x-batch", text("p"))) for _ in range(5)]
    alice.create()  # Not in the batch.
    pages = [
        alice.locate_full(("x-batch", text("p")), maximum=2, offset=o)
        for o in (0, 2, 4, 6)
    ]
    assert [p[1] for p in pages] == [uids[0:2], uids[2:4], uids[4:5], []]
    assert {p[0] for p in pages} == {5}
    assert alice.locate_full(("x-batch", text("p")), offset=3) == (5, uids[3:])
    assert alice.locate_full(maximum=0) == (6, [])


@pytest.mark.parametrize("field", [T.MAXIMUM_ITEMS, T.OFFSET_ITEMS])
def test_locate_refuses_negative_paging(alice20, field):
    payload = [ttlv.integer(field.value, -1)]
    assert alice20.refused(Operation.LOCATE, payload) == ResultReason.INVALID_FIELD


def test_locate_with_no_attributes_finds_every_own_object_in_creation_order(alice):
    uids = [alice.create() for _ in range(3)]
    assert alice.locate() == uids


# Ownership and roles.
def test_locate_shows_only_the_callers_own_objects(alice, bob, dispatcher, version):
    mine = alice.create(("x-shared-tag", text("t")))
    theirs = bob.create(("x-shared-tag", text("t")))
    assert alice.locate(("x-shared-tag", text("t"))) == [mine]
    assert bob.locate(("x-shared-tag", text("t"))) == [theirs]
    assert alice.locate() == [mine]
    admin = Client(dispatcher, ADMIN, version)
    assert admin.locate(("x-shared-tag", text("t"))) == [mine, theirs]
    nocrypto = Client(dispatcher, NOCRYPTO, version)
    assert nocrypto.locate() == [mine, theirs]


def operations_on(client: Client, uid: str) -> dict[str, tuple[Operation, list[Item]]]:
    ops = {
        "get_attributes": (Operation.GET_ATTRIBUTES, client.get_payload(uid)),
        "get_attribute_list": (Operation.GET_ATTRIBUTE_LIST, [client.uid_item(uid)]),
        "add_attribute": (
            Operation.ADD_ATTRIBUTE,
            client.add_payload(uid, "x-probe", text("p")),
        ),
        "modify_attribute": (
            Operation.MODIFY_ATTRIBUTE,
            client.modify_payload(uid, "x-tag", text("changed")),
        ),
        "delete_attribute": (
            Operation.DELETE_ATTRIBUTE,
            client.delete_payload(uid, "x-tag"),
        ),
        "activate": (Operation.ACTIVATE, [client.uid_item(uid)]),
        "revoke": (Operation.REVOKE, client.revoke_payload(uid)),
        "destroy": (Operation.DESTROY, [client.uid_item(uid)]),
    }
    if client.v2:
        ops["set_attribute"] = (
            Operation.SET_ATTRIBUTE,
            client.set_payload(uid, "x-tag", text("set")),
        )
    return ops


def test_another_clients_object_is_not_found_for_every_operation(alice, bob):
    """Bob gets exactly what he would get for an object that does not exist,
    so a refusal never reveals that Alice's object exists."""
    uid = alice.create(("x-tag", text("t")))
    before = alice.get(uid)
    missing = "00000000-0000-0000-0000-000000000000"
    assert len(missing) == len(uid)
    for label, (op, payload) in operations_on(bob, uid).items():
        with pytest.raises(Refused) as seen:
            bob.call(op, payload)
        with pytest.raises(Refused) as absent:
            bob.call(*operations_on(bob, missing)[label])
        assert seen.value.reason == ResultReason.ITEM_NOT_FOUND, label
        assert seen.value.message.replace(uid, "<uid>") == absent.value.message.replace(
            missing, "<uid>"
        ), label
    assert alice.get(uid) == before


def test_administrator_may_manage_any_object(alice, dispatcher, version):
    uid = alice.create()
    admin = Client(dispatcher, ADMIN, version)
    admin.add(uid, "x-by-admin", text("yes"))
    admin.activate(uid)
    admin.revoke(uid)
    admin.destroy(uid)
    assert alice.values(uid, "State") == [State.DESTROYED.value]


def test_no_crypto_administrator_manages_but_may_not_destroy(
    alice, dispatcher, version
):
    uid = alice.create()
    nocrypto = Client(dispatcher, NOCRYPTO, version)
    nocrypto.add(uid, "x-by-nocrypto", text("yes"))
    nocrypto.activate(uid)
    assert alice.values(uid, "x-by-nocrypto") == ["yes"]
    assert alice.values(uid, "State") == [State.ACTIVE.value]
    nocrypto.revoke(uid)
    assert (
        nocrypto.refused(Operation.DESTROY, [nocrypto.uid_item(uid)])
        == ResultReason.PERMISSION_DENIED
    )
    assert alice.values(uid, "State") == [State.DEACTIVATED.value]


def test_no_crypto_administrator_may_not_create(dispatcher, version):
    nocrypto = Client(dispatcher, NOCRYPTO, version)
    assert (
        nocrypto.refused(Operation.CREATE, nocrypto.create_payload())
        == ResultReason.PERMISSION_DENIED
    )


def test_auditor_may_not_create(dispatcher, version, keystore):
    auditor = Client(dispatcher, AUDITOR, version)
    assert (
        auditor.refused(Operation.CREATE, auditor.create_payload())
        == ResultReason.PERMISSION_DENIED
    )
    assert Client(dispatcher, ADMIN, version).locate() == []


def test_auditor_does_not_see_other_objects(alice, dispatcher, version):
    uid = alice.create()
    auditor = Client(dispatcher, AUDITOR, version)
    assert (
        auditor.refused(Operation.GET_ATTRIBUTES, auditor.get_payload(uid))
        == ResultReason.ITEM_NOT_FOUND
    )


# Activate, Revoke, Destroy.
def test_activate_revoke_destroy(alice, keystore):
    uid = alice.create()
    assert alice.activate(uid).get(T.UNIQUE_IDENTIFIER.value) == uid
    assert alice.values(uid, "State") == [State.ACTIVE.value]
    # 2.0 answers as the 2.0 profile's AKLC-M-2 does (see the tests below).
    assert alice.refused(Operation.DESTROY, [alice.uid_item(uid)]) == reason_for(
        alice, ResultReason.ILLEGAL_OPERATION, ResultReason.PERMISSION_DENIED
    )
    alice.revoke(uid)
    assert alice.values(uid, "State") == [State.DEACTIVATED.value]
    assert alice.values(uid, "Revocation Reason")[0].get(
        T.REVOCATION_REASON_CODE.value
    ) == (RevocationReasonCode.CESSATION_OF_OPERATION.value)
    alice.destroy(uid)
    assert alice.values(uid, "State") == [State.DESTROYED.value]
    assert len(alice.values(uid, "Destroy Date")) == 1
    with keystore.transaction() as txn:
        assert txn.get_object(uid).sealed_material is None


def test_a_key_activated_between_destroys_read_and_its_write_is_not_destroyed(alice, keystore, monkeypatch):
    """Destroy checks the row it read and writes it back only if no other
    request changed it since. Another request activates the key in
    between: the write is refused by its version check, Destroy checks the
    row again under lock, and refuses an Active key as it would have."""
    uid = alice.create()
    real = Keystore.save_if_unchanged

    def activated_meanwhile(self, obj, now):
        alice.activate(uid)
        return real(self, obj, now)

    monkeypatch.setattr(Keystore, "save_if_unchanged", activated_meanwhile)
    assert alice.refused(Operation.DESTROY, [alice.uid_item(uid)]) == reason_for(
        alice, ResultReason.ILLEGAL_OPERATION, ResultReason.PERMISSION_DENIED
    )
    monkeypatch.undo()
    assert alice.values(uid, "State") == [State.ACTIVE.value]
    with keystore.transaction() as txn:
        assert txn.get_object(uid).sealed_material is not None


def test_a_key_changed_between_destroys_read_and_its_write_is_destroyed_with_the_change(alice, keystore, monkeypatch):
    uid = alice.create()
    real = Keystore.save_if_unchanged
    outcomes = []

    def changed_meanwhile(self, obj, now):
        with keystore.transaction() as txn:
            other = keystore.load(txn, ALICE, uid, Action.MANAGE, now, for_update=True)
            other.set_value("Contact Information", "changed meanwhile")
            keystore.save(txn, other, now)
        outcomes.append(real(self, obj, now))
        return outcomes[-1]

    monkeypatch.setattr(Keystore, "save_if_unchanged", changed_meanwhile)
    alice.destroy(uid)
    monkeypatch.undo()
    assert outcomes == [False]  # the first write was refused; the locked path destroyed it
    assert alice.values(uid, "State") == [State.DESTROYED.value]
    assert alice.values(uid, "Contact Information") == ["changed meanwhile"]
    with keystore.transaction() as txn:
        assert txn.get_object(uid).sealed_material is None


def test_revoke_for_compromise(alice):
    uid = alice.create()
    alice.activate(uid)
    alice.revoke(uid, RevocationReasonCode.KEY_COMPROMISE)
    assert alice.values(uid, "State") == [State.COMPROMISED.value]
    alice.destroy(uid)
    assert alice.values(uid, "State") == [State.DESTROYED_COMPROMISED.value]


def test_activate_twice_is_a_lifecycle_error(alice):
    uid = alice.create()
    alice.activate(uid)
    assert alice.refused(Operation.ACTIVATE, [alice.uid_item(uid)]) == reason_for(
        alice, ResultReason.ILLEGAL_OPERATION, ResultReason.WRONG_KEY_LIFECYCLE_STATE
    )


def test_revoke_without_a_reason_is_refused(alice):
    uid = alice.create()
    assert (
        alice.refused(Operation.REVOKE, [alice.uid_item(uid)])
        == ResultReason.MISSING_DATA
    )


def test_operation_without_unique_identifier_is_missing_data(alice):
    assert alice.refused(Operation.GET_ATTRIBUTES, []) == ResultReason.MISSING_DATA


# Attributes the server sets on a new key (KMIP 1.4, 3.15, 3.34, 3.45-3.48).
def test_new_key_carries_sensitivity_extractability_fresh_and_lease(alice):
    uid = alice.create()
    attributes = alice.get(uid)
    assert attributes["Sensitive"][0].value is False
    assert attributes["Always Sensitive"][0].value is False
    assert attributes["Extractable"][0].value is True
    assert attributes["Never Extractable"][0].value is False
    assert attributes["Fresh"][0].value is True
    assert attributes["Lease Time"][0].type == ItemType.INTERVAL


def test_a_key_is_no_longer_fresh_once_served(alice):
    uid = alice.create()
    alice.call(Operation.GET, [alice.uid_item(uid)])
    assert alice.values(uid, "Fresh") == [False]


def test_a_key_changed_between_its_first_get_and_the_fresh_write_keeps_both(alice, keystore, monkeypatch):
    """The first Get writes Fresh back from the row it read; if another
    request changed that row in between, the write is refused by its
    version check and the Get clears Fresh on the row as it now is: the
    other change is not lost, and the Get still answers."""
    uid = alice.create()
    real = Keystore.save_if_unchanged

    def changed_meanwhile(self, obj, now):
        with keystore.transaction() as txn:
            other = keystore.load(txn, ALICE, uid, Action.MANAGE, now, for_update=True)
            other.set_value("Contact Information", "changed meanwhile")
            keystore.save(txn, other, now)
        written = real(self, obj, now)
        assert written is False  # the row moved on: nothing written
        return written

    monkeypatch.setattr(Keystore, "save_if_unchanged", changed_meanwhile)
    answer = alice.call(Operation.GET, [alice.uid_item(uid)])
    assert answer.get(T.UNIQUE_IDENTIFIER.value) == uid
    assert alice.values(uid, "Fresh") == [False]
    assert alice.values(uid, "Contact Information") == ["changed meanwhile"]


def test_always_sensitive_drops_when_sensitive_is_cleared(alice):
    uid = alice.create(("Sensitive", ttlv.boolean(VALUE, True)))
    assert alice.values(uid, "Always Sensitive") == [True]
    alice.modify(uid, "Sensitive", ttlv.boolean(VALUE, False))
    assert alice.values(uid, "Always Sensitive") == [False]


def test_2_0_attributes_are_derived_for_2_0_clients_only(dispatcher):
    v1, v2 = Client(dispatcher, ALICE, V11), Client(dispatcher, ALICE, V20)
    uid = v1.create()
    derived = {"Short Unique Identifier", "Key Format Type", "Protection Storage Mask"}
    assert not derived & set(v1.get(uid)) and not derived & set(v1.attribute_list(uid))
    attributes = v2.get(uid)
    assert derived <= set(attributes) and derived <= set(v2.attribute_list(uid))
    assert attributes["Key Format Type"][0].value == enums.KeyFormatType.RAW.value
    assert len(attributes["Short Unique Identifier"][0].value) == 32


def test_obtain_lease_grants_the_lease_time_of_an_active_key(alice):
    uid = alice.create()
    assert alice.refused(Operation.OBTAIN_LEASE, [alice.uid_item(uid)]) == reason_for(
        alice, ResultReason.ILLEGAL_OPERATION, ResultReason.WRONG_KEY_LIFECYCLE_STATE
    )
    alice.activate(uid)
    payload = alice.call(Operation.OBTAIN_LEASE, [alice.uid_item(uid)])
    assert payload.get(T.LEASE_TIME.value) == alice.values(uid, "Lease Time")[0]
    assert payload.find(T.LAST_CHANGE_DATE.value) is not None


# Lifecycle refusals answered per version as the OASIS profile test cases do
# (AKLC-M-2/3, SKLC-M-2/3, CS-BC-M-14): Permission Denied at 1.4 and 2.0,
# Wrong Key Lifecycle State at 2.1; 1.0-1.3 keep Illegal Operation for a
# Destroy of an Active object.
@pytest.mark.parametrize(
    "version, reason",
    [
        ((1, 2), ResultReason.ILLEGAL_OPERATION),
        ((1, 4), ResultReason.PERMISSION_DENIED),
        ((2, 0), ResultReason.PERMISSION_DENIED),
        ((2, 1), ResultReason.WRONG_KEY_LIFECYCLE_STATE),
    ],
)
def test_destroy_of_an_active_key_is_refused_per_version(dispatcher, version, reason):
    client = Client(dispatcher, ALICE, version)
    uid = client.create()
    client.activate(uid)
    assert client.refused(Operation.DESTROY, [client.uid_item(uid)]) == reason


@pytest.mark.parametrize(
    "version, reason",
    [
        ((1, 2), ResultReason.PERMISSION_DENIED),
        ((1, 4), ResultReason.PERMISSION_DENIED),
        ((2, 0), ResultReason.PERMISSION_DENIED),
        ((2, 1), ResultReason.WRONG_KEY_LIFECYCLE_STATE),
    ],
)
def test_activation_date_is_fixed_once_active(dispatcher, version, reason):
    client = Client(dispatcher, ALICE, version)
    uid = client.create(("Activation Date", date(int(time.time()) + 3600)))
    client.modify(uid, "Activation Date", date(int(time.time()) + 7200))
    client.activate(uid)
    assert client.refused(Operation.MODIFY_ATTRIBUTE, client.modify_payload(uid, "Activation Date", date(0))) == reason
    client.add(uid, "Deactivation Date", date(int(time.time()) + 7200))


def test_check_answers_whether_a_use_is_allowed(alice):
    """KMIP 1.4, 4.13 Check: nothing changes; a mask the key lacks is refused."""
    uid = alice.create()
    assert alice.call(Operation.CHECK, [alice.uid_item(uid), ttlv.integer(T.CRYPTOGRAPHIC_USAGE_MASK.value, 4)])
    assert alice.refused(
        Operation.CHECK, [alice.uid_item(uid), ttlv.integer(T.CRYPTOGRAPHIC_USAGE_MASK.value, 1)]
    ) == reason_for(alice, ResultReason.PERMISSION_DENIED, ResultReason.INCOMPATIBLE_CRYPTOGRAPHIC_USAGE_MASK)


def test_the_same_name_twice_on_one_object_is_refused(alice):
    uid = alice.create(("Name", name("once")))
    assert alice.refused(Operation.ADD_ATTRIBUTE, alice.add_payload(uid, "Name", name("once"))) == reason_for(
        alice, ResultReason.INVALID_FIELD, ResultReason.NON_UNIQUE_NAME_ATTRIBUTE
    )


@pytest.mark.parametrize(
    "version, reason",
    [
        # Issue 14: 1.x Item Not Found (Key Value Not Present before), 2.x
        # Object Destroyed (2.0 answered Key Value Not Present before).
        (V11, ResultReason.ITEM_NOT_FOUND),
        (V20, ResultReason.OBJECT_DESTROYED),
        ((2, 1), ResultReason.OBJECT_DESTROYED),
    ],
)
def test_get_of_a_destroyed_key(dispatcher, version, reason):
    client = Client(dispatcher, ALICE, version)
    uid = client.create()
    client.destroy(uid)
    assert client.refused(Operation.GET, [client.uid_item(uid)]) == reason


def test_log_and_interop_are_2_0_operations(alice):
    log = [ttlv.text(T.LOG_MESSAGE.value, "hello")]
    interop = [
        ttlv.enumeration(T.INTEROP_FUNCTION.value, enums.InteropFunction.BEGIN.value),
        ttlv.text(T.INTEROP_IDENTIFIER.value, "BL-M-1-21"),
    ]
    if not alice.v2:
        assert alice.refused(Operation.LOG, log) == ResultReason.OPERATION_NOT_SUPPORTED
        assert alice.refused(Operation.INTEROP, interop) == ResultReason.OPERATION_NOT_SUPPORTED
        return
    alice.call(Operation.LOG, log)
    alice.call(Operation.INTEROP, interop)
    reset = [ttlv.enumeration(T.INTEROP_FUNCTION.value, enums.InteropFunction.RESET.value), interop[1]]
    assert alice.refused(Operation.INTEROP, reset) == ResultReason.FEATURE_NOT_SUPPORTED


# Locate with two values of one date attribute: an inclusive range (KMIP 1.x,
# 4.9), on every storage.
@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def any_storage_dispatcher(request, tmp_path):
    urls = {"memory": lambda: "memory://", "sqlite": lambda: f"sqlite:///{tmp_path / 'kms.db'}"}
    url = urls.get(request.param, lambda: request.getfixturevalue("postgres_url"))()
    store = open_storage(url)
    yield Dispatcher(Keystore(store, Barrier(os.urandom(32))), OPERATIONS)
    store.close()


@pytest.mark.parametrize("v", [V11, V20], ids=["1.1", "2.0"])
def test_locate_date_range_is_inclusive_on_every_storage(any_storage_dispatcher, v):
    alice = Client(any_storage_dispatcher, ALICE, v)
    base = 4_000_000_000
    uids = [alice.create(("Activation Date", date(base + 100 * i))) for i in range(4)]
    undated = alice.create()
    assert alice.locate(("Activation Date", date(base + 100)), ("Activation Date", date(base + 200))) == uids[1:3]
    assert alice.locate(("Activation Date", date(base + 200)), ("Activation Date", date(base + 100))) == uids[1:3]
    assert alice.locate(("Activation Date", date(base + 1)), ("Activation Date", date(base + 99))) == []
    assert alice.locate(("Activation Date", date(base + 300))) == uids[3:]  # One value: equality.
    now = int(time.time())
    assert set(alice.locate(("Initial Date", date(now - 600)), ("Initial Date", date(now + 600)))) == {*uids, undated}
    assert alice.locate(("Initial Date", date(now - 3600)), ("Initial Date", date(now - 3000))) == []
    # With another filter, both apply.
    assert alice.locate(
        ("State", enum(State.PRE_ACTIVE)), ("Activation Date", date(base)), ("Activation Date", date(base + 100))
    ) == uids[:2]


def test_locate_by_name_type_and_state_returns_every_match(alice):
    """Every object that matches, in creation order, however many (issue
    14): one Name on many keys, their Object Type, their State."""
    shared = [alice.create(("Name", name("shared"))) for _ in range(30)]
    other = alice.create(("Name", name("other")))
    assert alice.locate(("Name", name("shared"))) == shared
    assert alice.locate(("Object Type", enum(ObjectType.SYMMETRIC_KEY))) == [*shared, other]
    for uid in shared[::2]:
        alice.activate(uid)
    assert alice.locate(("State", enum(State.ACTIVE))) == shared[::2]
    assert alice.locate(("State", enum(State.PRE_ACTIVE))) == [*shared[1::2], other]
    assert alice.locate(("Name", name("shared")), ("State", enum(State.PRE_ACTIVE))) == shared[1::2]
