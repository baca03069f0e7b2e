"""Managed objects as the keystore sees them (KMIP 1.4 section 2.2)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

from kmip.core.enums import ObjectType, State

from kmip_core import ttlv
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.storage.base import StoredAttribute, StoredObject


@dataclass(frozen=True)
class Material:
    """The secret part of an object, in one canonical encoding per object
    type: raw bytes for symmetric keys, secret data and opaque objects,
    PKCS#8 DER for private keys, SubjectPublicKeyInfo DER for public keys,
    DER for certificates. `subtype` is the Secret Data Type or Opaque Data
    Type where the object has one, and for private and public keys the Key
    Format Type they were registered in (Get returns that format by default).
    Only ever held in memory."""

    data: bytes = field(repr=False)
    subtype: int | None = None
    # A key registered wrapped (issue 14): the Key Block as the client
    # registered it (TTLV), returned for Key Wrap Type As Registered; `data`
    # is the key unwrapped at registration.
    registered_block: bytes | None = field(default=None, repr=False)

    def to_bytes(self) -> bytes:
        return ttlv.encode(
            ttlv.structure(
                TAG.KEY_VALUE,
                [
                    ttlv.byte_string(TAG.KEY_MATERIAL, self.data),
                    _subtype_item(self.subtype) if self.subtype is not None else None,
                    ttlv.byte_string(TAG.KEY_BLOCK, self.registered_block)
                    if self.registered_block is not None
                    else None,
                ],
            )
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Material:
        item = ttlv.decode(data)
        return cls(
            item.get(TAG.KEY_MATERIAL),
            item.get(TAG.ATTRIBUTE_INDEX),
            item.get(TAG.KEY_BLOCK),
        )


def _subtype_item(subtype: int) -> Item:
    # Vendor extension values (Opaque Data Type 0x80000001) do not fit a
    # signed 32-bit Integer; those are kept as a Long Integer.
    if -(2**31) <= subtype < 2**31:
        return ttlv.integer(TAG.ATTRIBUTE_INDEX, subtype)
    return ttlv.long_integer(TAG.ATTRIBUTE_INDEX, subtype)


_OBJECT_TYPES = {t.value: t for t in ObjectType}
_STATES = {s.value: s for s in State}


@dataclass
class ManagedObject:
    uid: str
    owner: str
    attributes: dict[str, list[Item]]
    sealed_material: bytes | None = field(default=None, repr=False)
    version: int = 0
    sequence: int = 0
    # The MAC of the row as loaded (keystore/row_auth.py).
    row_mac: bytes | None = field(default=None, repr=False)

    # Typed accessors for the attributes the keystore reasons about.
    def first(self, name: str) -> Item | None:
        values = self.attributes.get(name)
        return values[0] if values else None

    def value(self, name: str, default=None):
        item = self.first(name)
        return default if item is None else item.value

    def set(self, name: str, value: Item) -> None:
        self.attributes[name] = [attrs.as_value(value)]

    def set_value(self, name: str, python_value) -> None:
        self.set(name, attrs.make(name, python_value))

    def remove(self, name: str) -> None:
        self.attributes.pop(name, None)

    # By number, as a dict lookup: the enums' own call path cost a Get
    # about 2 us, for the five times it asks (issue 15); a number with no
    # member goes there, and raises as it did.
    @property
    def object_type(self) -> ObjectType:
        value = self.value("Object Type")
        return _OBJECT_TYPES.get(value) or ObjectType(value)

    @property
    def state(self) -> State | None:
        value = self.value("State")
        return None if value is None else _STATES.get(value) or State(value)

    @property
    def usage_mask(self) -> int:
        return self.value("Cryptographic Usage Mask", 0)

    # Storage mapping.
    def to_stored(self) -> StoredObject:
        stored = []
        for name, values in self.attributes.items():
            for index, value in enumerate(values):
                stored.append(StoredAttribute(name, index, attrs.encode_value(value)))
        return StoredObject(
            uid=self.uid,
            owner=self.owner,
            sealed_material=self.sealed_material,
            attributes=stored,
            version=self.version,
            sequence=self.sequence,
            row_mac=self.row_mac,
        )

    @classmethod
    def from_stored(cls, stored: StoredObject) -> ManagedObject:
        """The object of a stored row."""
        return cls(
            uid=stored.uid,
            owner=stored.owner,
            attributes=decode_attributes(stored),
            sealed_material=stored.sealed_material,
            version=stored.version,
            sequence=stored.sequence,
            row_mac=stored.row_mac,
        )


def decode_attributes(stored: StoredObject) -> dict[str, list[Item]]:
    """A stored row's attributes by name, each name's values in index
    order, the names in sorted order."""
    attributes: dict[str, list[Item]] = {}
    decode = attrs.decode_value
    for name, _index, value in sorted(stored.attributes, key=_NAME_INDEX):
        values = attributes.get(name)
        if values is None:
            attributes[name] = [decode(value)]
        else:
            values.append(decode(value))
    return attributes


# (name, index) of a StoredAttribute, from C: every load sorts an object's
# twenty-odd rows by it.
_NAME_INDEX = operator.itemgetter(0, 1)
