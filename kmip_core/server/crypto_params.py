"""The Cryptographic Parameters structure (KMIP 1.4, 3.6): how a request's
is read, and the key's algorithm family it is checked against. Both
services' handlers read it (the KMS's Get, Encrypt, Decrypt, MAC, Sign and
Signature Verify; the broker gateway's Decrypt)."""

from __future__ import annotations

from dataclasses import dataclass

from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    DigitalSignatureAlgorithm,
    HashingAlgorithm,
    PaddingMethod,
    Tags,
)

from kmip_core import errors
from kmip_core.server.payload import child_item, enum_field, label
from kmip_core.ttlv import TAG, Item, ItemType

__all__ = ["CryptoParameters", "algorithm_family", "crypto_parameters"]

T = Tags

_EC_ALGORITHMS = (
    CryptographicAlgorithm.EC,
    CryptographicAlgorithm.ECDSA,
    CryptographicAlgorithm.ECDH,
    CryptographicAlgorithm.ECMQV,
)


def algorithm_family(algorithm: CryptographicAlgorithm | None) -> str | None:
    """RSA, EC (for EC, ECDSA, ECDH and ECMQV keys, which share one key
    format), or the algorithm's own name."""
    if algorithm == CryptographicAlgorithm.RSA:
        return "RSA"
    if algorithm in _EC_ALGORITHMS:
        return "EC"
    return None if algorithm is None else algorithm.name



@dataclass(frozen=True)
class CryptoParameters:
    block_cipher_mode: BlockCipherMode | None = None
    padding_method: PaddingMethod | None = None
    hashing_algorithm: HashingAlgorithm | None = None
    digital_signature_algorithm: DigitalSignatureAlgorithm | None = None
    cryptographic_algorithm: CryptographicAlgorithm | None = None
    random_iv: bool | None = None
    iv_length: int | None = None  # bits
    tag_length: int | None = None  # bytes
    salt_length: int | None = None  # bytes
    mask_generator_hashing_algorithm: HashingAlgorithm | None = None
    p_source: bytes | None = None


def crypto_parameters(item: Item | None) -> CryptoParameters | None:
    """Read a Cryptographic Parameters structure (request field or attribute
    value); fields this server does not use (Key Role Type, counter and
    invocation field layout, Trailer Field) are ignored."""
    if item is None:
        return None
    if item.type != ItemType.STRUCTURE:
        raise errors.InvalidField("Cryptographic Parameters must be a structure")

    def integer(t: Tags) -> int | None:
        child = child_item(item, t, ItemType.INTEGER, required=False)
        if child is not None and child.value < 0:
            raise errors.InvalidField(f"{label(t)} must not be negative")
        return None if child is None else child.value

    random_iv = child_item(item, T.RANDOM_IV, ItemType.BOOLEAN, required=False)
    p_source = child_item(item, T.P_SOURCE, ItemType.BYTE_STRING, required=False)
    return CryptoParameters(
        block_cipher_mode=enum_field(
            item.find(TAG.BLOCK_CIPHER_MODE), BlockCipherMode, T.BLOCK_CIPHER_MODE
        ),
        padding_method=enum_field(
            item.find(TAG.PADDING_METHOD), PaddingMethod, T.PADDING_METHOD
        ),
        hashing_algorithm=enum_field(
            item.find(TAG.HASHING_ALGORITHM), HashingAlgorithm, T.HASHING_ALGORITHM
        ),
        digital_signature_algorithm=enum_field(
            item.find(TAG.DIGITAL_SIGNATURE_ALGORITHM),
            DigitalSignatureAlgorithm,
            T.DIGITAL_SIGNATURE_ALGORITHM,
        ),
        cryptographic_algorithm=enum_field(
            item.find(TAG.CRYPTOGRAPHIC_ALGORITHM),
            CryptographicAlgorithm,
            T.CRYPTOGRAPHIC_ALGORITHM,
        ),
        random_iv=None if random_iv is None else random_iv.value,
        iv_length=integer(T.IV_LENGTH),
        tag_length=integer(T.TAG_LENGTH),
        salt_length=integer(T.SALT_LENGTH),
        mask_generator_hashing_algorithm=enum_field(
            item.find(TAG.MASK_GENERATOR_HASHING_ALGORITHM),
            HashingAlgorithm,
            T.MASK_GENERATOR_HASHING_ALGORITHM,
        ),
        p_source=None if p_source is None else p_source.value,
    )
