"""Attribute definitions (KMIP 1.4 section 3, KMIP 2.0 section 4).

Inside the keystore an object's attributes are a dict from attribute name
(the 1.x spelling, e.g. "Cryptographic Algorithm", or a custom "x-..."/"y-"
name) to a list of values. Each value is a TTLV item tagged Attribute
Value, so one representation serves 1.x (Attribute Name + Attribute Value)
and 2.0 (the attribute's own tag inside Attributes) and the encoding of a
value is the key under which storage indexes it.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import TypedDict

from kmip.core import enums
from kmip.core.enums import ObjectType as OT
from kmip.core.enums import Tags

from kmip_core import errors, ttlv
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore.crypto import CERTIFICATE_NAME_FIELDS

VALUE_TAG = TAG.ATTRIBUTE_VALUE

KEYS = (OT.SYMMETRIC_KEY, OT.PUBLIC_KEY, OT.PRIVATE_KEY, OT.SPLIT_KEY)
CRYPTO_OBJECTS = KEYS + (OT.CERTIFICATE,)
# Objects whose value may be secret: they carry Sensitive, Extractable and
# Fresh (KMIP 1.4, 3.34, 3.45-3.48).
FLAGGED = KEYS + (OT.SECRET_DATA,)
# Objects a client holds under a lease (KMIP 1.4, 3.15).
LEASED = CRYPTO_OBJECTS + (OT.SECRET_DATA,)
# The Lease Time the server grants (KMIP 1.4, 3.15 and 4.16 Obtain Lease):
# how long a client may keep using an object before it asks again.
LEASE_TIME = 3600
ALL = tuple(OT)


@dataclass(frozen=True)
class AttributeSpec:
    name: str
    type: ItemType
    # Several values per object (KMIP "multiple instances permitted").
    multi: bool = False
    # The client may give it at creation/registration.
    client_initial: bool = True
    # The client may add, modify or delete it afterwards.
    client_modifiable: bool = True
    client_deletable: bool = True
    applies_to: tuple = ALL
    # Defined from KMIP 2.0 on: never shown to a 1.x client.
    v2_only: bool = False

    @property
    def tag(self) -> int:
        return enums.convert_attribute_name_to_tag(self.name).value


S, INT, E, B, T, D, IV = (
    ItemType.STRUCTURE,
    ItemType.INTEGER,
    ItemType.ENUMERATION,
    ItemType.BOOLEAN,
    ItemType.TEXT_STRING,
    ItemType.DATE_TIME,
    ItemType.INTERVAL,
)

# (subject or issuer, field) -> the KMIP 2.0 attribute name; the fields are
# those of crypto.CERTIFICATE_NAME_FIELDS.
CERTIFICATE_NAME_ATTRIBUTES = {
    (who, field): f"Certificate {who.capitalize()} {field}"
    for who in ("subject", "issuer")
    for field in CERTIFICATE_NAME_FIELDS
}

class _ClientRights(TypedDict, total=False):
    client_initial: bool
    client_modifiable: bool
    client_deletable: bool


_SERVER = _ClientRights(client_initial=False, client_modifiable=False, client_deletable=False)
_INITIAL_ONLY = _ClientRights(client_modifiable=False, client_deletable=False)

SPECS: dict[str, AttributeSpec] = {
    s.name: s
    for s in [
        AttributeSpec("Unique Identifier", T, **_SERVER),
        AttributeSpec("Name", S, multi=True),
        AttributeSpec("Object Type", E, **_SERVER),
        AttributeSpec("Cryptographic Algorithm", E, applies_to=CRYPTO_OBJECTS, **_INITIAL_ONLY),
        AttributeSpec("Cryptographic Length", INT, applies_to=CRYPTO_OBJECTS, **_INITIAL_ONLY),
        AttributeSpec("Cryptographic Parameters", S, multi=True, applies_to=KEYS),
        AttributeSpec("Cryptographic Domain Parameters", S, applies_to=KEYS, **_INITIAL_ONLY),
        AttributeSpec("Certificate Type", E, applies_to=(OT.CERTIFICATE,), **_SERVER),
        AttributeSpec("Certificate Length", INT, applies_to=(OT.CERTIFICATE,), **_SERVER),
        AttributeSpec("X.509 Certificate Identifier", S, applies_to=(OT.CERTIFICATE,), **_SERVER),
        AttributeSpec("X.509 Certificate Subject", S, applies_to=(OT.CERTIFICATE,), **_SERVER),
        AttributeSpec("X.509 Certificate Issuer", S, applies_to=(OT.CERTIFICATE,), **_SERVER),
        AttributeSpec("Digital Signature Algorithm", E, multi=True, applies_to=(OT.CERTIFICATE,), **_SERVER),
        AttributeSpec("Digest", S, multi=True, **_SERVER),
        AttributeSpec("Operation Policy Name", T),
        AttributeSpec("Cryptographic Usage Mask", INT, client_deletable=False),
        AttributeSpec("Lease Time", IV, applies_to=LEASED, **_SERVER),
        AttributeSpec("Usage Limits", S, applies_to=KEYS),
        AttributeSpec("State", E, **_SERVER),
        AttributeSpec("Initial Date", D, **_SERVER),
        AttributeSpec("Activation Date", D, client_deletable=False),
        AttributeSpec("Process Start Date", D, client_deletable=False),
        AttributeSpec("Protect Stop Date", D, client_deletable=False),
        AttributeSpec("Deactivation Date", D, client_deletable=False),
        AttributeSpec("Destroy Date", D, **_SERVER),
        AttributeSpec("Compromise Occurrence Date", D, **_SERVER),
        AttributeSpec("Compromise Date", D, **_SERVER),
        AttributeSpec("Revocation Reason", S, **_SERVER),
        AttributeSpec("Archive Date", D, **_SERVER),
        AttributeSpec("Object Group", T, multi=True),
        AttributeSpec("Fresh", B, client_deletable=False),
        AttributeSpec("Link", S, multi=True),
        AttributeSpec("Application Specific Information", S, multi=True),
        AttributeSpec("Contact Information", T),
        AttributeSpec("Last Change Date", D, **_SERVER),
        AttributeSpec("Alternative Name", S, multi=True),
        AttributeSpec("Key Value Present", B, **_SERVER),
        AttributeSpec("Key Value Location", S, multi=True),
        AttributeSpec("Original Creation Date", D, **_SERVER),
        AttributeSpec("Random Number Generator", S, **_INITIAL_ONLY),
        AttributeSpec("PKCS#12 Friendly Name", T),
        AttributeSpec("Description", T),
        AttributeSpec("Comment", T),
        AttributeSpec("Sensitive", B, client_deletable=False, applies_to=FLAGGED),
        AttributeSpec("Always Sensitive", B, applies_to=FLAGGED, **_SERVER),
        AttributeSpec("Extractable", B, client_deletable=False, applies_to=FLAGGED),
        AttributeSpec("Never Extractable", B, applies_to=FLAGGED, **_SERVER),
        # Derived when read (see `derived_v2`), never stored.
        AttributeSpec("Short Unique Identifier", ItemType.BYTE_STRING, v2_only=True, **_SERVER),
        AttributeSpec("Key Format Type", E, applies_to=KEYS + (OT.SECRET_DATA,), v2_only=True, **_SERVER),
        AttributeSpec("Protection Storage Mask", INT, v2_only=True, **_SERVER),
        # 2.0, 4.41-4.42 and 4.46: what the client asks of the object's
        # protection. Quantum Safe is checked when the object is made
        # (check_quantum_safe) and cannot be set later.
        AttributeSpec("Protection Level", E, v2_only=True),
        AttributeSpec("Protection Period", IV, v2_only=True),
        AttributeSpec("Quantum Safe", B, v2_only=True, **_INITIAL_ONLY),
        # 2.0, 4.8: a certificate's subject and issuer fields, one attribute
        # per field type ("Certificate Subject CN", "Certificate Issuer O",
        # ...), set at Register from the certificate.
        *(
            AttributeSpec(name, T, multi=True, applies_to=(OT.CERTIFICATE,), v2_only=True, **_SERVER)
            for name in CERTIFICATE_NAME_ATTRIBUTES.values()
        ),
    ]
}

# Names PyKMIP's table spells differently from the specification's text.
_NAME_ALIASES = {"X.509 Certificate Identifier": "X.509 Certificate Identifier"}


def is_custom(name: str) -> bool:
    return name.startswith(("x-", "y-"))


def spec_for(name: str) -> AttributeSpec | None:
    return SPECS.get(name)


def check_known(name: str) -> AttributeSpec | None:
    """The spec of a standard attribute, None for a custom one; an unknown
    non-custom name is an invalid field."""
    spec = SPECS.get(name)
    if spec is None and not is_custom(name):
        raise errors.InvalidField(f"unknown attribute name {name!r}")
    return spec


def check_value_type(name: str, value: Item) -> None:
    spec = SPECS.get(name)
    if spec is not None and value.type != spec.type:
        raise errors.InvalidField(
            f"attribute {name!r} takes a {spec.type.name.lower()}, not a {value.type.name.lower()}"
        )


def as_value(item: Item) -> Item:
    """Normalize a value item to the internal tag."""
    return item.retag(VALUE_TAG)


# Stored attribute values repeat (algorithms, lengths, states, flags), and
# every load decodes and every save encodes all of an object's ~20 values:
# small ones are memoized. Items are immutable, so sharing them is safe.
_MEMO_MAX_BYTES = 128


@functools.lru_cache(maxsize=8192)
def _encode_small(value: Item) -> bytes:
    return ttlv.encode(value)


@functools.lru_cache(maxsize=8192)
def _decode_small(data: bytes) -> Item:
    return ttlv.decode(data)


def encode_value(value: Item) -> bytes:
    value = as_value(value)
    if value.type != ttlv.ItemType.STRUCTURE and not (
        isinstance(value.value, (str, bytes)) and len(value.value) > _MEMO_MAX_BYTES
    ):
        return _encode_small(value)
    return ttlv.encode(value)


def decode_value(data: bytes) -> Item:
    if len(data) <= _MEMO_MAX_BYTES:
        return _decode_small(bytes(data))
    return ttlv.decode(data)


# Wire conversions, 1.x: Attribute {Attribute Name, Attribute Index?, Attribute Value}.
def from_attribute_v1(item: Item) -> tuple[str, int | None, Item | None]:
    name = item.get(TAG.ATTRIBUTE_NAME)
    if not isinstance(name, str):
        raise errors.InvalidField("Attribute without an Attribute Name")
    index = item.get(TAG.ATTRIBUTE_INDEX)
    value = item.find(VALUE_TAG)
    return name, index, value


def to_attribute_v1(name: str, value: Item, index: int | None = None) -> Item:
    return ttlv.structure(
        TAG.ATTRIBUTE,
        [
            ttlv.text(TAG.ATTRIBUTE_NAME, name),
            ttlv.integer(TAG.ATTRIBUTE_INDEX, index) if index else None,
            as_value(value),
        ],
    )


# Wire conversions, 2.0: the attribute's own tag, or for a custom attribute
# Attribute {Vendor Identification, Attribute Name, Attribute Value}, where
# 1.x's "x-Name" is vendor "x", name "Name".
def from_item_v2(item: Item) -> tuple[str, Item | None]:
    if item.tag == TAG.ATTRIBUTE:
        vendor = item.get(TAG.VENDOR_IDENTIFICATION)
        name = item.get(TAG.ATTRIBUTE_NAME)
        if not isinstance(vendor, str) or not isinstance(name, str):
            raise errors.InvalidField("vendor Attribute needs Vendor Identification and Attribute Name")
        return f"{vendor}-{name}", item.find(VALUE_TAG)
    try:
        name = enums.convert_attribute_tag_to_name(Tags(item.tag))
    except ValueError:
        raise errors.InvalidField(f"{ttlv.tag_name(item.tag)} is not an attribute") from None
    return name, as_value(item)


def to_item_v2(name: str, value: Item) -> Item:
    if is_custom(name) or name not in SPECS:
        vendor, _, short = name.partition("-")
        return ttlv.structure(
            TAG.ATTRIBUTE,
            [
                ttlv.text(TAG.VENDOR_IDENTIFICATION, vendor),
                ttlv.text(TAG.ATTRIBUTE_NAME, short),
                as_value(value),
            ],
        )
    return value.retag(SPECS[name].tag)


def name_from_reference_v2(item: Item) -> str:
    """Attribute Reference (2.0): an enumeration holding the attribute's tag,
    or a structure naming a vendor attribute."""
    if item.type == ItemType.STRUCTURE:
        vendor = item.get(TAG.VENDOR_IDENTIFICATION)
        name = item.get(TAG.ATTRIBUTE_NAME)
        if not isinstance(vendor, str) or not isinstance(name, str):
            raise errors.InvalidField("Attribute Reference needs Vendor Identification and Attribute Name")
        return f"{vendor}-{name}"
    try:
        return enums.convert_attribute_tag_to_name(Tags(item.value))
    except ValueError:
        raise errors.InvalidField(f"Attribute Reference {item.value:#x} names no attribute") from None


def enum_value(value: Item | None) -> int | None:
    return None if value is None else value.value


def make(name: str, value) -> Item:
    """A value item for a standard attribute from a Python value."""
    spec = SPECS[name]
    if spec.type == ItemType.STRUCTURE:
        return ttlv.structure(VALUE_TAG, value)
    return Item(VALUE_TAG, spec.type, value)


def name_value(text_value: str, name_type: int = enums.NameType.UNINTERPRETED_TEXT_STRING.value) -> Item:
    return ttlv.structure(
        VALUE_TAG,
        [
            ttlv.text(TAG.NAME_VALUE, text_value),
            ttlv.enumeration(TAG.NAME_TYPE, name_type),
        ],
    )


def link_value(link_type: int, uid: str) -> Item:
    return ttlv.structure(
        VALUE_TAG,
        [
            ttlv.enumeration(TAG.LINK_TYPE, link_type),
            ttlv.text(TAG.LINKED_OBJECT_IDENTIFIER, uid),
        ],
    )


def set_initial_defaults(object_type: OT, attributes: dict[str, list[Item]]) -> None:
    """The attributes the server sets on every new object of a type they
    apply to (KMIP 1.4, 3.15, 3.34, 3.45-3.48; 2.0, 4.29, 4.22, 4.50-4.53):
    Sensitive defaults to False and Extractable to True; Always Sensitive
    and Never Extractable start as what those say; a new object is Fresh;
    the Lease Time is the server's."""
    if object_type in LEASED:
        attributes["Lease Time"] = [make("Lease Time", LEASE_TIME)]
    if attributes.get("Usage Limits"):
        attributes["Usage Limits"] = [usage_limits_with_count(attributes["Usage Limits"][0])]
    if object_type not in FLAGGED:
        return
    sensitive = attributes.setdefault("Sensitive", [make("Sensitive", False)])[0].value
    extractable = attributes.setdefault("Extractable", [make("Extractable", True)])[0].value
    attributes["Always Sensitive"] = [make("Always Sensitive", bool(sensitive))]
    attributes["Never Extractable"] = [make("Never Extractable", not extractable)]
    attributes["Fresh"] = [make("Fresh", True)]


# Symmetric algorithms whose 256-bit keys keep 128 bits of security against
# a quantum computer (Grover's search halves the exponent); public-key
# algorithms of today (RSA, DSA, DH, elliptic curves) keep none (Shor).
_QUANTUM_SAFE_SYMMETRIC = frozenset(
    a.value
    for a in (
        enums.CryptographicAlgorithm.AES,
        enums.CryptographicAlgorithm.CHACHA20,
        enums.CryptographicAlgorithm.CHACHA20_POLY1305,
        enums.CryptographicAlgorithm.HMAC_SHA256,
        enums.CryptographicAlgorithm.HMAC_SHA384,
        enums.CryptographicAlgorithm.HMAC_SHA512,
    )
)


def check_quantum_safe(object_type: OT, attributes: dict[str, list[Item]]) -> None:
    """A new object whose client asked for Quantum Safe must be one: a
    symmetric key of 256 bits or more of an algorithm above. Anything else
    is refused (General Failure, as the OASIS QS profile expects) rather
    than stored with a promise it does not keep."""
    asked = attributes.get("Quantum Safe")
    if not asked or asked[0].value is not True:
        return
    algorithm = attributes.get("Cryptographic Algorithm")
    length = attributes.get("Cryptographic Length")
    if (
        object_type == OT.SYMMETRIC_KEY
        and algorithm
        and algorithm[0].value in _QUANTUM_SAFE_SYMMETRIC
        and length
        and length[0].value >= 256
    ):
        return
    what = object_type.name.replace("_", " ").lower()
    if algorithm and length:
        what = f"{enums.CryptographicAlgorithm(algorithm[0].value).name}-{length[0].value} {what}"
    raise errors.GeneralFailure(
        f"NOT_SAFE: a {what} is not quantum safe; ask for a symmetric key of 256 bits or more (AES-256)"
    )


def track_flag_history(attributes: dict[str, list[Item]]) -> None:
    """After a client changed Sensitive or Extractable: Always Sensitive
    stays True only while Sensitive has always been True, Never Extractable
    only while Extractable has never been True (KMIP 1.4, 3.46 and 3.48)."""
    sensitive = attributes.get("Sensitive")
    if "Always Sensitive" in attributes and (not sensitive or sensitive[0].value is not True):
        attributes["Always Sensitive"] = [make("Always Sensitive", False)]
    extractable = attributes.get("Extractable")
    if "Never Extractable" in attributes and (not extractable or extractable[0].value is True):
        attributes["Never Extractable"] = [make("Never Extractable", False)]


def derived_v2(uid: str, attributes: dict[str, list[Item]]) -> dict[str, list[Item]]:
    """Attributes KMIP 2.0 added that follow from what the object already
    holds, computed when read: Short Unique Identifier (2.0, 4.46: the
    SHA-256 of the Unique Identifier), Protection Storage Mask, and Key
    Format Type (2.0, 4.27: the format the server holds the key in, the one
    its Digest is taken of)."""
    out = {
        "Short Unique Identifier": [make("Short Unique Identifier", hashlib.sha256(uid.encode()).digest())],
        # 2.0, 4.43: where the object is kept. Objects are sealed under the
        # master key and stored by software, never inside an HSM.
        "Protection Storage Mask": [make("Protection Storage Mask", enums.ProtectionStorageMask.SOFTWARE.value)],
    }
    digest = attributes.get("Digest")
    if digest:
        key_format = digest[0].get(TAG.KEY_FORMAT_TYPE)
        if key_format is not None:
            out["Key Format Type"] = [make("Key Format Type", key_format)]
    return out


def visible(uid: str, attributes: dict[str, list[Item]], v2: bool) -> dict[str, list[Item]]:
    """An object's attributes as a client of that version sees them: 2.x
    adds the derived ones, 1.x never sees an attribute it has no name for."""
    if v2:
        out = dict(attributes)
        for name, values in derived_v2(uid, attributes).items():
            out.setdefault(name, values)
        return out
    return {n: v for n, v in attributes.items() if not (n in SPECS and SPECS[n].v2_only)}


def usage_limits_with_count(value):
    """A client's Usage Limits as stored: the Usage Limits Count starts at
    the Total; a Count the client gives is ignored (KMIP 1.4, 3.21: it is
    the server's to keep)."""
    total = value.get(TAG.USAGE_LIMITS_TOTAL)
    if not isinstance(total, int) or total < 0:
        raise errors.InvalidField("Usage Limits needs a non-negative Usage Limits Total")
    unit = value.get(TAG.USAGE_LIMITS_UNIT)
    try:
        enums.UsageLimitsUnit(unit)
    except ValueError:
        raise errors.InvalidField("Usage Limits needs a Usage Limits Unit (Byte or Object)") from None
    return usage_limits(total, total, unit)


def usage_limits(total: int, count: int, unit: int):
    return make(
        "Usage Limits",
        [
            ttlv.long_integer(TAG.USAGE_LIMITS_TOTAL, total),
            ttlv.long_integer(TAG.USAGE_LIMITS_COUNT, count),
            ttlv.enumeration(TAG.USAGE_LIMITS_UNIT, unit),
        ],
    )
