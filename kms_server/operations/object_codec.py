"""The managed object structures on the wire (KMIP 1.4, 2.2 and 2.1.3-2.1.7;
KMIP 2.0, 2.2): Symmetric Key, Public Key, Private Key, Certificate,
Secret Data and Opaque Object, with the Key Block, Key Value and Key
Wrapping Data inside them.

`decode_object` turns what a client registers into the keystore's one
canonical `Material` per object type (raw bytes, PKCS#8, SubjectPublicKeyInfo,
certificate DER) plus the attributes the material implies.
`encode_object` does the reverse for Get, in the Key Format Type asked for,
optionally wrapped. Both go through `keystore.crypto` for every conversion,
so this module never handles library key objects.

The Cryptographic Parameters are in `crypto_params`, the checks on a key
used by a cryptographic operation in `key_use`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable
from dataclasses import dataclass, field

from kmip.core.enums import (
    CertificateType,
    CryptographicAlgorithm,
    HashingAlgorithm,
    KeyCompressionType,
    KeyFormatType,
    ObjectType,
    OpaqueDataType,
    RecommendedCurve,
    RNGAlgorithm,
    SecretDataType,
    SplitKeyMethod,
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.server.payload import child_item, enum_field
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import attributes as attrs
from kms_server.keystore import crypto
from kms_server.keystore.objects import ManagedObject, Material
from kms_server.operations.crypto_params import algorithm_family

T = Tags
KFT = KeyFormatType

OBJECT_TAGS: dict[ObjectType, Tags] = {
    ObjectType.SYMMETRIC_KEY: T.SYMMETRIC_KEY,
    ObjectType.PUBLIC_KEY: T.PUBLIC_KEY,
    ObjectType.PRIVATE_KEY: T.PRIVATE_KEY,
    ObjectType.CERTIFICATE: T.CERTIFICATE,
    ObjectType.SECRET_DATA: T.SECRET_DATA,
    ObjectType.OPAQUE_DATA: T.OPAQUE_OBJECT,
    ObjectType.SPLIT_KEY: T.SPLIT_KEY,
}
KEY_BLOCK_TYPES = (
    ObjectType.SYMMETRIC_KEY,
    ObjectType.PUBLIC_KEY,
    ObjectType.PRIVATE_KEY,
    ObjectType.SECRET_DATA,
    ObjectType.SPLIT_KEY,
)

_TRANSPARENT_EC_PRIVATE = (
    KFT.TRANSPARENT_EC_PRIVATE_KEY,
    KFT.TRANSPARENT_ECDSA_PRIVATE_KEY,
    KFT.TRANSPARENT_ECDH_PRIVATE_KEY,
    KFT.TRANSPARENT_ECMQV_PRIVATE_KEY,
)
_TRANSPARENT_EC_PUBLIC = (
    KFT.TRANSPARENT_EC_PUBLIC_KEY,
    KFT.TRANSPARENT_ECDSA_PUBLIC_KEY,
    KFT.TRANSPARENT_ECDH_PUBLIC_KEY,
    KFT.TRANSPARENT_ECMQV_PUBLIC_KEY,
)
# Byte-string formats whose choice at Register is remembered (in
# Material.subtype) so that a Get without a Key Format Type returns the key
# as it was registered, as PyKMIP's server does.
_REMEMBERED_PRIVATE = (KFT.PKCS_1, KFT.PKCS_8, KFT.EC_PRIVATE_KEY)
_REMEMBERED_PUBLIC = (KFT.PKCS_1, KFT.X_509)
# A private or public key registered in Raw (DER bytes, as PyKMIP's client
# sends them) remembers Raw and the DER layout it came in: Raw in the low
# byte of Material.subtype, the layout's Key Format Type above it.
_RAW_LAYOUT_SHIFT = 8
# (algorithm, stated length, material length): DES keys whose length is
# stated without the parity bit of each byte.
_PARITY_LENGTHS = {
    (CryptographicAlgorithm.TRIPLE_DES, 168, 192),
    (CryptographicAlgorithm.DES, 56, 64),
}


def _raw_subtype(layout: KeyFormatType) -> int:
    return layout.value << _RAW_LAYOUT_SHIFT | KFT.RAW.value


def registered_format(material: Material) -> tuple[KeyFormatType, KeyFormatType] | None:
    """For a private or public key: the Key Format Type it was registered
    in and the DER layout of those bytes (the same but for Raw), or None
    when it was generated here or registered in a transparent format."""
    subtype = material.subtype
    if subtype is None:
        return None
    try:
        if subtype >> _RAW_LAYOUT_SHIFT and subtype & 0xFF == KFT.RAW.value:
            return KFT.RAW, KFT(subtype >> _RAW_LAYOUT_SHIFT)
        fmt = KFT(subtype)
    except ValueError:
        return None
    return fmt, fmt


def _der_layout(object_type: ObjectType, material: Material, key_format: KeyFormatType) -> KeyFormatType:
    """The DER layout of a private or public key's bytes in `key_format`:
    Raw is the layout the key was registered in, and only for a key
    registered in Raw (any other has no Raw form of its own)."""
    if key_format != KFT.RAW:
        return key_format
    registered = registered_format(material)
    if registered is None or registered[0] != KFT.RAW:
        raise _not_supported(object_type, key_format)
    return registered[1]

_RSA_TRANSPARENT_PRIVATE_FIELDS = (
    ("modulus", T.MODULUS),
    ("private_exponent", T.PRIVATE_EXPONENT),
    ("public_exponent", T.PUBLIC_EXPONENT),
    ("p", T.P),
    ("q", T.Q),
    ("prime_exponent_p", T.PRIME_EXPONENT_P),
    ("prime_exponent_q", T.PRIME_EXPONENT_Q),
    ("crt_coefficient", T.CRT_COEFFICIENT),
)



# ---------------------------------------------------------------------------
# Decoding (Register)
# ---------------------------------------------------------------------------

# The attributes a registered object's material implies, by name: one value,
# or every value of a multi-valued attribute (a certificate's name fields).
Implied = dict[str, Item | list[Item]]


@dataclass
class _KeyBlock:
    format: KeyFormatType
    material: Item  # Key Material: byte string or transparent structure
    algorithm: CryptographicAlgorithm | None
    length: int | None


def _read_key_block(holder: Item) -> _KeyBlock:
    block = child_item(holder, T.KEY_BLOCK, ItemType.STRUCTURE)
    key_format = enum_field(
        child_item(block, T.KEY_FORMAT_TYPE), KeyFormatType, T.KEY_FORMAT_TYPE
    )
    compression = enum_field(
        block.find(TAG.KEY_COMPRESSION_TYPE),
        KeyCompressionType,
        T.KEY_COMPRESSION_TYPE,
    )
    if compression not in (None, KeyCompressionType.EC_PUBLIC_KEY_TYPE_UNCOMPRESSED):
        raise errors.FeatureNotSupported(
            f"Key Compression Type {compression.name} is not supported"
        )
    if block.find(TAG.KEY_WRAPPING_DATA) is not None:
        raise errors.FeatureNotSupported(
            "registering a wrapped key is not supported; register it unwrapped"
        )
    value = child_item(block, T.KEY_VALUE, (ItemType.STRUCTURE, ItemType.BYTE_STRING))
    if value.type == ItemType.BYTE_STRING:
        raise errors.InvalidField(
            "Key Value is a byte string only in a wrapped key; this key has no Key Wrapping Data"
        )
    # Attributes carried inside the Key Value are informational; the
    # object's attributes come from the Template-Attribute (2.0: Attributes).
    material = child_item(value, T.KEY_MATERIAL, (ItemType.BYTE_STRING, ItemType.STRUCTURE))
    algorithm = enum_field(
        block.find(TAG.CRYPTOGRAPHIC_ALGORITHM),
        CryptographicAlgorithm,
        T.CRYPTOGRAPHIC_ALGORITHM,
    )
    length_item = child_item(
        block, T.CRYPTOGRAPHIC_LENGTH, ItemType.INTEGER, required=False
    )
    length = None if length_item is None else length_item.value
    if length is not None and length <= 0:
        raise errors.InvalidField("Cryptographic Length must be positive")
    return _KeyBlock(key_format, material, algorithm, length)


def _bytes_material(block: _KeyBlock) -> bytes:
    if block.material.type != ItemType.BYTE_STRING:
        raise errors.InvalidField(
            f"Key Material must be a byte string in format {block.format.name}"
        )
    if not block.material.value:
        raise errors.InvalidField("Key Material is empty")
    return block.material.value


def _transparent_fields(block: _KeyBlock) -> Item:
    if block.material.type != ItemType.STRUCTURE:
        raise errors.InvalidField(
            f"Key Material must be a structure in format {block.format.name}"
        )
    return block.material


def _int_field(structure: Item, t: Tags, required: bool = True) -> int | None:
    item = child_item(
        structure,
        t,
        (ItemType.BIG_INTEGER, ItemType.INTEGER, ItemType.LONG_INTEGER),
        required,
    )
    return None if item is None else item.value


def _implied_crypto(
    algorithm: CryptographicAlgorithm | None, length: int | None
) -> Implied:
    implied: Implied = {}
    if algorithm is not None:
        implied["Cryptographic Algorithm"] = attrs.make(
            "Cryptographic Algorithm", algorithm.value
        )
    if length is not None:
        implied["Cryptographic Length"] = attrs.make("Cryptographic Length", length)
    return implied


def _decode_symmetric(holder: Item) -> tuple[Material, Implied]:
    block = _read_key_block(holder)
    if block.format == KFT.RAW:
        key = _bytes_material(block)
    elif block.format == KFT.TRANSPARENT_SYMMETRIC_KEY:
        key_item = child_item(_transparent_fields(block), T.KEY, ItemType.BYTE_STRING)
        key = key_item.value
        if not key:
            raise errors.InvalidField("Key is empty")
    else:
        raise errors.KeyFormatTypeNotSupported(
            f"a symmetric key cannot be registered in format {block.format.name}"
        )
    # The one check on the material: it is as long as the Cryptographic
    # Length says (DES keys may state their length without the parity
    # bits). Whether the algorithm takes that length is for the operations
    # that use the key (issue 14).
    bits = len(key) * 8
    length = block.length
    if length is None:
        length = bits
    elif length != bits and (block.algorithm, length, bits) not in _PARITY_LENGTHS:
        raise errors.InvalidField(
            f"Cryptographic Length {length} does not match the {bits}-bit key material"
        )
    # A key registered Transparent is returned so by a Get that names no
    # format (BL-M-3); Raw, the usual case, needs no note.
    subtype = KFT.TRANSPARENT_SYMMETRIC_KEY.value if block.format == KFT.TRANSPARENT_SYMMETRIC_KEY else None
    return Material(key, subtype), _implied_crypto(block.algorithm, length)


def _check_asymmetric(
    block: _KeyBlock, algorithm: CryptographicAlgorithm, length: int
) -> Implied:
    """The key block's algorithm may name the family more precisely (ECDSA
    for an EC key) but not contradict the material."""
    if block.algorithm is not None and algorithm_family(
        block.algorithm
    ) != algorithm_family(algorithm):
        raise errors.InvalidField(
            f"Cryptographic Algorithm {block.algorithm.name} does not match the {algorithm.name} key material"
        )
    if block.length is not None and block.length != length:
        raise errors.InvalidField(
            f"Cryptographic Length {block.length} does not match the {length}-bit key material"
        )
    return _implied_crypto(block.algorithm or algorithm, length)


def _decode_private(holder: Item) -> tuple[Material, Implied]:
    block = _read_key_block(holder)
    try:
        if block.format in _REMEMBERED_PRIVATE:
            der, algorithm, length = crypto.import_private_key(
                _bytes_material(block), block.format
            )
        elif block.format == KFT.RAW:
            data = _bytes_material(block)
            layout = crypto.private_key_layout(data)
            der, algorithm, length = crypto.import_private_key(data, layout)
        elif block.format == KFT.TRANSPARENT_RSA_PRIVATE_KEY:
            fields = _transparent_fields(block)
            values = {
                name: _int_field(
                    fields,
                    t,
                    required=name in ("modulus", "private_exponent", "public_exponent"),
                )
                for name, t in _RSA_TRANSPARENT_PRIVATE_FIELDS
            }
            der, algorithm, length = crypto.import_transparent_private_key(values)
        elif block.format in _TRANSPARENT_EC_PRIVATE:
            fields = _transparent_fields(block)
            curve = enum_field(
                child_item(fields, T.RECOMMENDED_CURVE),
                RecommendedCurve,
                T.RECOMMENDED_CURVE,
            )
            der, algorithm, length = crypto.import_transparent_private_key(
                {"recommended_curve": curve, "d": _int_field(fields, T.D)}
            )
        else:
            raise errors.KeyFormatTypeNotSupported(
                f"a private key cannot be registered in format {block.format.name}"
            )
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None
    subtype = block.format.value if block.format in _REMEMBERED_PRIVATE else None
    if block.format == KFT.RAW:
        subtype = _raw_subtype(layout)
    return Material(der, subtype), _check_asymmetric(block, algorithm, length)


def _decode_public(holder: Item) -> tuple[Material, Implied]:
    block = _read_key_block(holder)
    try:
        if block.format in _REMEMBERED_PUBLIC:
            der, algorithm, length = crypto.import_public_key(
                _bytes_material(block), block.format
            )
        elif block.format == KFT.RAW:
            data = _bytes_material(block)
            layout = crypto.public_key_layout(data)
            der, algorithm, length = crypto.import_public_key(data, layout)
        elif block.format == KFT.TRANSPARENT_RSA_PUBLIC_KEY:
            fields = _transparent_fields(block)
            der, algorithm, length = crypto.import_transparent_public_key(
                {
                    "modulus": _int_field(fields, T.MODULUS),
                    "public_exponent": _int_field(fields, T.PUBLIC_EXPONENT),
                }
            )
        elif block.format in _TRANSPARENT_EC_PUBLIC:
            fields = _transparent_fields(block)
            curve = enum_field(
                child_item(fields, T.RECOMMENDED_CURVE),
                RecommendedCurve,
                T.RECOMMENDED_CURVE,
            )
            q = child_item(fields, T.Q_STRING, ItemType.BYTE_STRING).value
            der, algorithm, length = crypto.import_transparent_public_key(
                {"recommended_curve": curve, "q_string": q}
            )
        else:
            raise errors.KeyFormatTypeNotSupported(
                f"a public key cannot be registered in format {block.format.name}"
            )
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None
    subtype = block.format.value if block.format in _REMEMBERED_PUBLIC else None
    if block.format == KFT.RAW:
        subtype = _raw_subtype(layout)
    return Material(der, subtype), _check_asymmetric(block, algorithm, length)


def _decode_secret_data(holder: Item) -> tuple[Material, Implied]:
    secret_type = enum_field(
        child_item(holder, T.SECRET_DATA_TYPE), SecretDataType, T.SECRET_DATA_TYPE
    )
    block = _read_key_block(holder)
    if block.format not in (KFT.OPAQUE, KFT.RAW):
        raise errors.KeyFormatTypeNotSupported(
            f"secret data cannot be registered in format {block.format.name}"
        )
    data = _bytes_material(block)
    # A Get that names no format answers in the one the secret was
    # registered in (default_format): the Digest names it, or, for a secret
    # that gets no Digest, the Key Format Type attribute.
    if secret_type != SecretDataType.SEED:
        # An unsalted SHA-256 of a password (or of a vendor type the server
        # cannot tell is random) lets whoever reads the database or an
        # attribute listing test guesses offline. A Seed is random by
        # definition and keeps its Digest. See docs/conformance.md.
        return Material(data, secret_type.value), {"Key Format Type": attrs.make("Key Format Type", block.format.value)}
    return Material(data, secret_type.value), {"Digest": _digest(data, block.format)}


# A Split Key (KMIP 1.4, 2.2.5; 2.0, 2.2.5): one part of a key split
# among several holders. Its material is kept as one TTLV structure: the
# split parameters in the order of the object, then the part's Raw bytes.
_SPLIT_FIELDS = (T.SPLIT_KEY_PARTS, T.KEY_PART_IDENTIFIER, T.SPLIT_KEY_THRESHOLD, T.SPLIT_KEY_METHOD, T.PRIME_FIELD_SIZE)


def _decode_split_key(holder: Item) -> tuple[Material, Implied]:
    parts = child_item(holder, T.SPLIT_KEY_PARTS, ItemType.INTEGER).value
    identifier = child_item(holder, T.KEY_PART_IDENTIFIER, ItemType.INTEGER).value
    threshold = child_item(holder, T.SPLIT_KEY_THRESHOLD, ItemType.INTEGER).value
    method = enum_field(child_item(holder, T.SPLIT_KEY_METHOD), SplitKeyMethod, T.SPLIT_KEY_METHOD)
    prime = child_item(holder, T.PRIME_FIELD_SIZE, ItemType.BIG_INTEGER, required=False)
    if parts < 1:
        raise errors.InvalidField("Split Key Parts must be at least 1")
    if not 1 <= identifier <= parts:
        raise errors.InvalidField(f"Key Part Identifier must be from 1 to the Split Key Parts ({parts})")
    if not 1 <= threshold <= parts:
        raise errors.InvalidField(f"Split Key Threshold must be from 1 to the Split Key Parts ({parts})")
    if method == SplitKeyMethod.POLYNOMIAL_SHARING_PRIME_FIELD and (prime is None or prime.value <= 1):
        raise errors.InvalidField("Split Key Method Polynomial Sharing Prime Field needs a Prime Field Size")
    block = _read_key_block(holder)
    if block.format != KFT.RAW:
        raise errors.KeyFormatTypeNotSupported(f"a split key cannot be registered in format {block.format.name}")
    key = _bytes_material(block)
    bits = len(key) * 8
    if block.length is not None and block.length != bits:
        raise errors.InvalidField(f"Cryptographic Length {block.length} does not match the {bits}-bit key part")
    stored = ttlv.structure(
        TAG.SPLIT_KEY,
        [
            ttlv.integer(TAG.SPLIT_KEY_PARTS, parts),
            ttlv.integer(TAG.KEY_PART_IDENTIFIER, identifier),
            ttlv.integer(TAG.SPLIT_KEY_THRESHOLD, threshold),
            ttlv.enumeration(TAG.SPLIT_KEY_METHOD, method.value),
            ttlv.big_integer(TAG.PRIME_FIELD_SIZE, prime.value) if prime is not None else None,
            ttlv.byte_string(TAG.KEY_MATERIAL, key),
        ],
    )
    return Material(ttlv.encode(stored)), _implied_crypto(block.algorithm, bits)


def _split_key_parts(material: Material) -> tuple[list[Item], Material]:
    """The split parameters of a stored Split Key, as Get returns them, and
    the part's own key bytes."""
    stored = ttlv.decode(material.data)
    fields = [stored.find(t.value) for t in _SPLIT_FIELDS]
    return [f for f in fields if f is not None], Material(stored.get(TAG.KEY_MATERIAL))


def _decode_opaque(holder: Item) -> tuple[Material, Implied]:
    # The specification defines no Opaque Data Types, only the extension
    # range, so any enumeration value is kept as given.
    opaque_type = child_item(holder, T.OPAQUE_DATA_TYPE, ItemType.ENUMERATION)
    value = child_item(holder, T.OPAQUE_DATA_VALUE, ItemType.BYTE_STRING).value
    if not value:
        raise errors.InvalidField("Opaque Data Value is empty")
    return Material(value, opaque_type.value), {}


def _pem_to_der(data: bytes) -> bytes:
    if not data.lstrip().startswith(b"-----BEGIN"):
        return data
    lines = [line.strip() for line in data.strip().splitlines()]
    body = b"".join(line for line in lines if line and not line.startswith(b"-----"))
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise errors.InvalidField("Certificate Value is not valid PEM") from None


def _decode_certificate(holder: Item) -> tuple[Material, Implied]:
    cert_type = enum_field(
        child_item(holder, T.CERTIFICATE_TYPE), CertificateType, T.CERTIFICATE_TYPE
    )
    if cert_type != CertificateType.X_509:
        raise errors.FeatureNotSupported(
            f"Certificate Type {cert_type.name} is not supported; only X_509"
        )
    der = _pem_to_der(child_item(holder, T.CERTIFICATE_VALUE, ItemType.BYTE_STRING).value)
    try:
        info = crypto.parse_certificate(der)
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None
    issuer, serial, subject = info["issuer_der"], info["serial_der"], info["subject_der"]
    implied = _implied_crypto(info["algorithm"], info["length_bits"])
    implied.update(
        {
            "Certificate Type": attrs.make(
                "Certificate Type", CertificateType.X_509.value
            ),
            "Certificate Length": attrs.make("Certificate Length", len(der)),
            "X.509 Certificate Identifier": attrs.make(
                "X.509 Certificate Identifier",
                [
                    ttlv.byte_string(TAG.ISSUER_DISTINGUISHED_NAME, issuer),
                    ttlv.byte_string(TAG.CERTIFICATE_SERIAL_NUMBER, serial),
                ],
            ),
            "X.509 Certificate Subject": attrs.make(
                "X.509 Certificate Subject",
                [ttlv.byte_string(TAG.SUBJECT_DISTINGUISHED_NAME, subject)],
            ),
            "X.509 Certificate Issuer": attrs.make(
                "X.509 Certificate Issuer",
                [ttlv.byte_string(TAG.ISSUER_DISTINGUISHED_NAME, issuer)],
            ),
            "Digest": attrs.make(
                "Digest",
                [
                    ttlv.enumeration(
                        TAG.HASHING_ALGORITHM, HashingAlgorithm.SHA_256.value
                    ),
                    ttlv.byte_string(TAG.DIGEST_VALUE, info["digest_sha256"]),
                ],
            ),
        }
    )
    for who in ("subject", "issuer"):
        for part, values in info[f"{who}_fields"].items():
            name = attrs.CERTIFICATE_NAME_ATTRIBUTES[(who, part)]
            implied[name] = [attrs.make(name, value) for value in values]
    return Material(der), implied


_DECODERS: dict[ObjectType, Callable[[Item], tuple[Material, Implied]]] = {
    ObjectType.SYMMETRIC_KEY: _decode_symmetric,
    ObjectType.PRIVATE_KEY: _decode_private,
    ObjectType.PUBLIC_KEY: _decode_public,
    ObjectType.SECRET_DATA: _decode_secret_data,
    ObjectType.OPAQUE_DATA: _decode_opaque,
    ObjectType.CERTIFICATE: _decode_certificate,
    ObjectType.SPLIT_KEY: _decode_split_key,
}


def decode_object(
    object_type: ObjectType, item: Item
) -> tuple[Material, Implied]:
    """The canonical material of a registered object and the attributes its
    material implies (name -> attribute value item): Cryptographic Algorithm
    and Length for keys (the algorithm only where the key block or the
    material tells it), and for certificates the X.509 attributes,
    Certificate Type and Length and a SHA-256 Digest."""
    decoder = _DECODERS.get(object_type)
    if decoder is None:
        raise errors.FeatureNotSupported(
            f"{object_type.name} objects are not supported"
        )
    if item.tag != OBJECT_TAGS[object_type].value or item.type != ItemType.STRUCTURE:
        raise errors.InvalidField(
            f"the object does not match Object Type {object_type.name}"
        )
    return decoder(item)


# ---------------------------------------------------------------------------
# Encoding (Get)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Wrapping:
    """How Get wraps a Key Value (KMIP 1.4, 2.1.5 and 2.1.6): `wrap` encrypts
    the bytes with the wrapping key, `key_wrapping_data` is the Key Wrapping
    Data structure to return with the wrapped key. With TTLV encoding (the
    default) the whole Key Value structure is wrapped, with `attributes`
    inside it; with No Encoding only the Key Material bytes are."""

    wrap: Callable[[bytes], bytes]
    key_wrapping_data: Item
    ttlv_encoding: bool = True
    attributes: tuple[Item, ...] = field(default=())


def default_format(
    obj: ManagedObject, material: Material, v2: bool
) -> KeyFormatType | None:
    """The Key Format Type of a Get that names none: Raw for symmetric keys
    (what vCenter reads; at 2.x, Transparent if registered so), for secret
    data the format it was registered in (Opaque or Raw), and for asymmetric
    keys the format they were registered in; otherwise PKCS#1 for RSA keys in 1.x,
    as PyKMIP's server does, and PKCS#8 / X.509 SubjectPublicKeyInfo for EC
    keys and in 2.0."""
    object_type = obj.object_type
    if object_type == ObjectType.SPLIT_KEY:
        return KFT.RAW
    if object_type == ObjectType.SYMMETRIC_KEY:
        if v2 and material.subtype == KFT.TRANSPARENT_SYMMETRIC_KEY.value:
            return KFT.TRANSPARENT_SYMMETRIC_KEY
        return KFT.RAW
    if object_type == ObjectType.SECRET_DATA:
        digest = obj.first("Digest")
        registered = digest.get(TAG.KEY_FORMAT_TYPE) if digest is not None else obj.value("Key Format Type")
        return KFT.RAW if registered == KFT.RAW.value else KFT.OPAQUE
    if object_type in (ObjectType.PRIVATE_KEY, ObjectType.PUBLIC_KEY):
        registered = registered_format(material)
        if registered is not None:
            return registered[0]
        rsa = obj.value("Cryptographic Algorithm") == CryptographicAlgorithm.RSA.value
        if rsa and not v2:
            return KFT.PKCS_1
        return KFT.PKCS_8 if object_type == ObjectType.PRIVATE_KEY else KFT.X_509
    return None


def _not_supported(
    object_type: ObjectType, key_format: KeyFormatType
) -> errors.KmsError:
    return errors.KeyFormatTypeNotSupported(
        f"a {object_type.name.replace('_', ' ').lower()} cannot be returned in format {key_format.name}"
    )


def _big(t: Tags, value: int) -> Item:
    return ttlv.big_integer(t.value, value)


def _key_material(
    obj: ManagedObject, material: Material, key_format: KeyFormatType
) -> Item:
    object_type = obj.object_type
    tag = TAG.KEY_MATERIAL
    try:
        if object_type == ObjectType.SPLIT_KEY:
            if key_format == KFT.RAW:
                return ttlv.byte_string(tag, material.data)
        elif object_type == ObjectType.SYMMETRIC_KEY:
            if key_format == KFT.RAW:
                return ttlv.byte_string(tag, material.data)
            if key_format == KFT.TRANSPARENT_SYMMETRIC_KEY:
                return ttlv.structure(
                    tag, [ttlv.byte_string(TAG.KEY, material.data)]
                )
        elif object_type == ObjectType.SECRET_DATA:
            if key_format in (KFT.OPAQUE, KFT.RAW):
                return ttlv.byte_string(tag, material.data)
        elif object_type == ObjectType.PRIVATE_KEY:
            if key_format in _REMEMBERED_PRIVATE or key_format == KFT.RAW:
                return ttlv.byte_string(
                    tag, crypto.export_private_key(material.data, _der_layout(object_type, material, key_format))
                )
            if (
                key_format == KFT.TRANSPARENT_RSA_PRIVATE_KEY
                or key_format in _TRANSPARENT_EC_PRIVATE
            ):
                fields = crypto.transparent_private_key(material.data)
                is_ec = "recommended_curve" in fields
                if is_ec != (key_format in _TRANSPARENT_EC_PRIVATE):
                    raise _not_supported(object_type, key_format)
                if is_ec:
                    return ttlv.structure(
                        tag,
                        [
                            ttlv.enumeration(
                                TAG.RECOMMENDED_CURVE,
                                fields["recommended_curve"].value,
                            ),
                            _big(T.D, fields["d"]),
                        ],
                    )
                return ttlv.structure(
                    tag,
                    [
                        _big(t, fields[name])
                        for name, t in _RSA_TRANSPARENT_PRIVATE_FIELDS
                    ],
                )
        elif object_type == ObjectType.PUBLIC_KEY:
            if key_format in _REMEMBERED_PUBLIC or key_format == KFT.RAW:
                return ttlv.byte_string(
                    tag, crypto.export_public_key(material.data, _der_layout(object_type, material, key_format))
                )
            if (
                key_format == KFT.TRANSPARENT_RSA_PUBLIC_KEY
                or key_format in _TRANSPARENT_EC_PUBLIC
            ):
                fields = crypto.transparent_public_key(material.data)
                is_ec = "recommended_curve" in fields
                if is_ec != (key_format in _TRANSPARENT_EC_PUBLIC):
                    raise _not_supported(object_type, key_format)
                if is_ec:
                    return ttlv.structure(
                        tag,
                        [
                            ttlv.enumeration(
                                TAG.RECOMMENDED_CURVE,
                                fields["recommended_curve"].value,
                            ),
                            ttlv.byte_string(TAG.Q_STRING, fields["q_string"]),
                        ],
                    )
                return ttlv.structure(
                    tag,
                    [
                        _big(T.MODULUS, fields["modulus"]),
                        _big(T.PUBLIC_EXPONENT, fields["public_exponent"]),
                    ],
                )
    except crypto.CryptoError:
        # The format does not fit this key (PKCS#1 for an EC key, ...).
        raise _not_supported(object_type, key_format) from None
    raise _not_supported(object_type, key_format)


def _key_block(
    obj: ManagedObject,
    material: Material,
    key_format: KeyFormatType,
    wrapping: Wrapping | None,
) -> Item:
    key_material = _key_material(obj, material, key_format)
    key_value = ttlv.structure(
        TAG.KEY_VALUE, [key_material, *(wrapping.attributes if wrapping else ())]
    )
    wrapping_data = None
    if wrapping is not None:
        if wrapping.ttlv_encoding:
            plaintext = ttlv.encode(key_value)
        elif key_material.type == ItemType.BYTE_STRING and not wrapping.attributes:
            plaintext = key_material.value
        else:
            raise errors.InvalidField(
                "Encoding Option No Encoding needs a byte-string Key Material and no attributes"
            )
        key_value = ttlv.byte_string(TAG.KEY_VALUE, wrapping.wrap(plaintext))
        wrapping_data = wrapping.key_wrapping_data
    algorithm = length = None
    if obj.object_type != ObjectType.SECRET_DATA:
        algorithm = obj.value("Cryptographic Algorithm")
        length = obj.value("Cryptographic Length")
    return ttlv.structure(
        TAG.KEY_BLOCK,
        [
            ttlv.enumeration(TAG.KEY_FORMAT_TYPE, key_format.value),
            key_value,
            ttlv.enumeration(TAG.CRYPTOGRAPHIC_ALGORITHM, algorithm)
            if algorithm is not None
            else None,
            ttlv.integer(TAG.CRYPTOGRAPHIC_LENGTH, length)
            if length is not None
            else None,
            wrapping_data,
        ],
    )


def encode_object(
    obj: ManagedObject,
    material: Material,
    key_format_type: KeyFormatType | None,
    wrapping: Wrapping | None = None,
) -> Item:
    """The object's structure for a Get response. Keys and secret data are
    returned in `key_format_type` (None: `default_format` for 1.x), wrapped
    if `wrapping` is given; certificates and opaque objects have no Key
    Block and take neither."""
    object_type = obj.object_type
    tag = OBJECT_TAGS.get(object_type)
    if tag is None:
        raise errors.FeatureNotSupported(
            f"{object_type.name} objects are not supported"
        )
    if object_type not in KEY_BLOCK_TYPES:
        if wrapping is not None:
            raise errors.InvalidField(
                f"a {object_type.name} has no Key Block and cannot be wrapped"
            )
        if object_type == ObjectType.CERTIFICATE:
            if key_format_type not in (None, KFT.X_509):
                raise _not_supported(object_type, key_format_type)
            return ttlv.structure(
                tag.value,
                [
                    ttlv.enumeration(
                        TAG.CERTIFICATE_TYPE, CertificateType.X_509.value
                    ),
                    ttlv.byte_string(TAG.CERTIFICATE_VALUE, material.data),
                ],
            )
        if key_format_type not in (None, KFT.OPAQUE):
            raise _not_supported(object_type, key_format_type)
        return ttlv.structure(
            tag.value,
            [
                ttlv.enumeration(
                    TAG.OPAQUE_DATA_TYPE,
                    OpaqueDataType.NONE.value
                    if material.subtype is None
                    else material.subtype,
                ),
                ttlv.byte_string(TAG.OPAQUE_DATA_VALUE, material.data),
            ],
        )
    key_format = key_format_type or default_format(obj, material, v2=False)
    if object_type == ObjectType.SPLIT_KEY:
        fields, part = _split_key_parts(material)
        return ttlv.structure(tag.value, [*fields, _key_block(obj, part, key_format, wrapping)])
    block = _key_block(obj, material, key_format, wrapping)
    if object_type == ObjectType.SECRET_DATA:
        secret_type = (
            material.subtype
            if material.subtype is not None
            else SecretDataType.PASSWORD.value
        )
        return ttlv.structure(
            tag.value, [ttlv.enumeration(TAG.SECRET_DATA_TYPE, secret_type), block]
        )
    return ttlv.structure(tag.value, [block])


def digest_attribute(
    object_type: ObjectType, material: Material, algorithm: int | None
) -> Item | None:
    """The Digest attribute a new object gets (KMIP 1.4, 3.17; 2.0, 4.10):
    SHA-256 of the key material in the Key Format Type the object holds it
    in (Raw for a symmetric key, the registered format of an asymmetric key,
    else PKCS#1 for RSA and PKCS#8 / SubjectPublicKeyInfo otherwise); of
    the value for an opaque object. Certificates and secret data get theirs
    from decode_object (secret data's names the format it was registered
    in, Opaque or Raw)."""
    key_format: KeyFormatType | None
    data = material.data
    try:
        if object_type == ObjectType.SYMMETRIC_KEY:
            key_format = KFT.RAW
        elif object_type == ObjectType.OPAQUE_DATA:
            key_format = None
        elif object_type in (ObjectType.PRIVATE_KEY, ObjectType.PUBLIC_KEY):
            key_format = _stored_format(object_type, material, algorithm)
            export = crypto.export_private_key if object_type == ObjectType.PRIVATE_KEY else crypto.export_public_key
            data = export(material.data, _der_layout(object_type, material, key_format))
        else:
            return None
    except crypto.CryptoError:
        return None
    return _digest(data, key_format)


def _digest(data: bytes, key_format: KeyFormatType | None) -> Item:
    return attrs.make(
        "Digest",
        [
            ttlv.enumeration(TAG.HASHING_ALGORITHM, HashingAlgorithm.SHA_256.value),
            ttlv.byte_string(TAG.DIGEST_VALUE, crypto.digest(HashingAlgorithm.SHA_256, data)),
            ttlv.enumeration(TAG.KEY_FORMAT_TYPE, key_format.value) if key_format is not None else None,
        ],
    )


def _stored_format(object_type: ObjectType, material: Material, algorithm: int | None) -> KeyFormatType:
    registered = registered_format(material)
    if registered is not None and not registered[0].name.startswith("TRANSPARENT_"):
        return registered[0]
    if algorithm == CryptographicAlgorithm.RSA.value:
        return KFT.PKCS_1
    return KFT.PKCS_8 if object_type == ObjectType.PRIVATE_KEY else KFT.X_509


def random_number_generator() -> Item:
    """The Random Number Generator attribute of keys this server generates
    (KMIP 1.4, 3.44; 2.0, 4.46): the operating system's generator through
    `cryptography`, which KMIP has no closer name for than Unspecified."""
    return attrs.make(
        "Random Number Generator",
        [ttlv.enumeration(TAG.RNG_ALGORITHM, RNGAlgorithm.UNSPECIFIED.value)],
    )


def server_attributes(
    object_type: ObjectType, material: Material, algorithm: int | None, generated: bool
) -> dict[str, list[Item]]:
    """What the server adds to a new object: its Digest, and for key
    material it generated, the Random Number Generator."""
    out: dict[str, list[Item]] = {}
    digest = digest_attribute(object_type, material, algorithm)
    if digest is not None:
        out["Digest"] = [digest]
    if generated:
        out["Random Number Generator"] = [random_number_generator()]
    return out

