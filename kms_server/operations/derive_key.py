"""KMIP 1.4, 4.6 Derive Key / 2.0, 6.1.10: a new symmetric key or secret
data derived from a base key or secret data the caller may use (Derive
Key in its Cryptographic Usage Mask, in a state that allows use).

Derivation Methods: PBKDF2 (the base object is the password; Salt and
Iteration Count; the PRF's hash from the Cryptographic Parameters, HMAC-SHA-1
by default), HMAC (HMAC of the Derivation Data under the base key), HKDF
(RFC 5869; Salt, and the Derivation Data as its info), Hash (of the
Derivation Data, or of the base object when there is none), NIST SP 800-108
in counter mode (HMAC; the Derivation Data is the fixed input) and Encrypt
(the Derivation Data encrypted under the base key with the Cryptographic
Parameters and Initialization Vector). The new object's length is the
template's Cryptographic Length; its attributes are the template's. A
second base object that is secret data gives the Derivation Data when the
request has none."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kmip.core.enums import (
    CryptographicAlgorithm,
    CryptographicUsageMask,
    DerivationMethod,
    ObjectType,
    Operation,
    SecretDataType,
    Tags,
)

from kmip_core import errors
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import attributes as attrs
from kms_server.keystore import crypto
from kms_server.keystore.objects import ManagedObject, Material
from kms_server.operations import common, crypto_params, key_use, object_codec

if TYPE_CHECKING:
    from kms_server.keystore.keystore import Keystore

OPERATION = Operation.DERIVE_KEY
T = Tags

_DERIVED_TYPES = (ObjectType.SYMMETRIC_KEY, ObjectType.SECRET_DATA)
_BASE_TYPES = (ObjectType.SYMMETRIC_KEY, ObjectType.SECRET_DATA)
_LENGTH = "Cryptographic Length"
_ALGORITHM = "Cryptographic Algorithm"


def _bytes_field(parameters: Item, t: Tags) -> bytes | None:
    item = parameters.find(t.value)
    if item is None:
        return None
    if item.type != ItemType.BYTE_STRING:
        raise errors.InvalidField(f"{t.name.replace('_', ' ').title()} must be a byte string")
    return item.value


def _length_bytes(given: list[tuple[str, Item]]) -> int:
    lengths = [item.value for name, item in given if name == _LENGTH]
    if not lengths:
        raise errors.MissingData("Cryptographic Length is required: it is the length of the derived key")
    bits = lengths[0]
    if not isinstance(bits, int) or bits <= 0 or bits % 8:
        raise errors.InvalidField("Cryptographic Length must be a positive multiple of 8")
    return bits // 8


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    object_type = common.optional_enum(payload, T.OBJECT_TYPE, ObjectType)
    if object_type is None:
        raise errors.MissingData("Object Type is required")
    if object_type not in _DERIVED_TYPES:
        raise errors.InvalidField(f"Derive Key makes a symmetric key or secret data, not a {object_type.name}")
    uids = [item.value for item in payload.find_all(TAG.UNIQUE_IDENTIFIER)]
    if not uids:
        uids = [common.unique_identifier(ctx, payload)]
    if not all(isinstance(uid, str) for uid in uids):
        raise errors.InvalidField("Unique Identifier must be a text string")
    method = common.optional_enum(payload, T.DERIVATION_METHOD, DerivationMethod)
    if method is None:
        raise errors.MissingData("Derivation Method is required")
    parameters = common.require(payload, T.DERIVATION_PARAMETERS, ItemType.STRUCTURE)
    params = crypto_params.crypto_parameters(parameters.find(TAG.CRYPTOGRAPHIC_PARAMETERS))
    params = params or crypto_params.CryptoParameters()
    data = _bytes_field(parameters, T.DERIVATION_DATA)
    salt = _bytes_field(parameters, T.SALT)
    iv = _bytes_field(parameters, T.INITIALIZATION_VECTOR)
    iterations = parameters.find(TAG.ITERATION_COUNT)
    if iterations is not None and iterations.type != ItemType.INTEGER:
        raise errors.InvalidField("Iteration Count must be an integer")

    given = common.client_attributes(payload, T.TEMPLATE_ATTRIBUTE, T.ATTRIBUTES)
    length = _length_bytes(given)
    if object_type == ObjectType.SECRET_DATA:
        # Secret data has no Cryptographic Length or Algorithm of its own:
        # the length only says how much to derive.
        given = [(name, item) for name, item in given if name not in (_LENGTH, _ALGORITHM)]
    attributes = keystore.validate_client_attributes(object_type, given)
    algorithm = None
    if object_type == ObjectType.SYMMETRIC_KEY:
        if not attributes.get(_ALGORITHM):
            raise errors.MissingData("Cryptographic Algorithm is required to derive a symmetric key")
        algorithm = CryptographicAlgorithm(attributes[_ALGORITHM][0].value)

    with keystore.transaction(read_only=True) as txn:
        bases = [
            key_use.usable_key(
                keystore, txn, ctx, uid, CryptographicUsageMask.DERIVE_KEY, protect=True, object_types=_BASE_TYPES
            )
            for uid in uids
        ]
    base = keystore.material(bases[0]).data
    if data is None and len(bases) > 1 and bases[1].object_type == ObjectType.SECRET_DATA:
        data = keystore.material(bases[1]).data

    try:
        derived = _derive(method, base, length, params, data, salt, iterations, iv, bases[0])
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None

    if object_type == ObjectType.SYMMETRIC_KEY:
        material = Material(derived)
    else:
        material = Material(derived, SecretDataType.SEED.value)
    attributes.update(
        object_codec.server_attributes(object_type, material, algorithm.value if algorithm else None, generated=False)
    )
    attrs.set_initial_defaults(object_type, attributes)
    with keystore.transaction() as txn:
        obj = keystore.new_object(txn, ctx.principal, object_type, attributes, material, ctx.now)
    ctx.batch.id_placeholder = obj.uid
    return [common.uid_item(obj.uid)]


def _derive(
    method: DerivationMethod,
    base: bytes,
    length: int,
    params: crypto_params.CryptoParameters,
    data: bytes | None,
    salt: bytes | None,
    iterations: Item | None,
    iv: bytes | None,
    base_obj: ManagedObject,
) -> bytes:
    hashing = params.hashing_algorithm
    if method == DerivationMethod.PBKDF2:
        if salt is None or iterations is None:
            raise errors.MissingData("PBKDF2 needs a Salt and an Iteration Count")
        return crypto.derive.pbkdf2(base, length, salt, iterations.value, hashing)
    if method == DerivationMethod.ENCRYPT:
        return _by_encryption(base, length, params, data, iv, base_obj)
    if method not in (
        DerivationMethod.HMAC,
        DerivationMethod.HKDF,
        DerivationMethod.HASH,
        DerivationMethod.NIST800_108_C,
    ):
        raise errors.FeatureNotSupported(f"Derivation Method {method.name} is not supported")
    if hashing is None:
        raise errors.MissingData(f"Derivation Method {method.name} needs a Hashing Algorithm in the Cryptographic Parameters")
    if method == DerivationMethod.HASH:
        return crypto.derive.hash_derive(base if data is None else data, length, hashing)
    if method == DerivationMethod.HKDF:
        return crypto.derive.hkdf(base, length, hashing, salt, data)
    if data is None:
        raise errors.MissingData(f"Derivation Method {method.name} needs Derivation Data")
    if method == DerivationMethod.HMAC:
        return crypto.derive.hmac_derive(base, data, length, hashing)
    return crypto.derive.kbkdf_counter(base, length, hashing, data)


def _by_encryption(
    base: bytes,
    length: int,
    params: crypto_params.CryptoParameters,
    data: bytes | None,
    iv: bytes | None,
    base_obj: ManagedObject,
) -> bytes:
    if data is None:
        raise errors.MissingData("Derivation Method ENCRYPT needs Derivation Data (what is encrypted)")
    if base_obj.object_type != ObjectType.SYMMETRIC_KEY:
        raise errors.InvalidField("Derivation Method ENCRYPT needs a symmetric base key")
    algorithm = crypto_params.key_algorithm(base_obj, params)
    if algorithm is None:
        raise errors.InvalidField("the base key has no Cryptographic Algorithm to encrypt with")
    if params.block_cipher_mode is None and algorithm not in crypto.CHACHA_ALGORITHMS:
        raise errors.MissingData("Derivation Method ENCRYPT needs a Block Cipher Mode in the Cryptographic Parameters")
    try:
        ciphertext, _, _ = crypto.encrypt(
            base, algorithm, params.block_cipher_mode, data, iv=iv, padding=params.padding_method
        )
    except crypto.NotSupported as exc:
        raise errors.FeatureNotSupported(exc.message) from None
    if len(ciphertext) < length:
        raise errors.InvalidField(
            f"encrypting the Derivation Data gives {len(ciphertext)} bytes, fewer than the {length} asked for"
        )
    return ciphertext[:length]
