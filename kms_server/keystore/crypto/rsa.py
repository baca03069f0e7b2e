"""RSA encryption and key transport (OAEP, PKCS#1 v1.5)."""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric import padding as _asym_padding
from cryptography.hazmat.primitives.asymmetric import rsa
from kmip.core.enums import HashingAlgorithm, PaddingMethod

from kms_server.keystore.crypto.base import (
    _LIBRARY_ERRORS,
    CryptoError,
    _bytes,
    _hash,
    _load_private,
    _load_public,
    _name,
)

# KMIP and PKCS#1 default OAEP to SHA-1 for both the label hash and MGF1.
_OAEP_DEFAULT_HASH = HashingAlgorithm.SHA_1


# -- RSA encryption and key transport ----------------------------------------


def _rsa_padding(
    padding: PaddingMethod | None,
    hashing: HashingAlgorithm | None,
    mgf_hash: HashingAlgorithm | None,
    label: bytes | None = None,
) -> Any:
    if padding is None or padding == PaddingMethod.OAEP:
        label_hash = hashing or _OAEP_DEFAULT_HASH
        return _asym_padding.OAEP(
            mgf=_asym_padding.MGF1(_hash(mgf_hash or label_hash)),
            algorithm=_hash(label_hash),
            # KMIP's P Source (RFC 8017 7.1: the label L); empty if none.
            label=label or None,
        )
    if label:
        raise CryptoError("a label (P Source) is only defined for OAEP")
    if padding == PaddingMethod.PKCS1v15:
        return _asym_padding.PKCS1v15()
    raise CryptoError(f"padding method {_name(padding)} is not supported for RSA")


def rsa_encrypt(
    spki_der: bytes,
    data: bytes,
    padding: PaddingMethod | None = PaddingMethod.OAEP,
    hashing: HashingAlgorithm | None = None,
    mgf_hash: HashingAlgorithm | None = None,
    label: bytes | None = None,
) -> bytes:
    """Encrypt with an RSA public key: OAEP (hash default SHA-1, MGF1 hash
    default the OAEP hash, optional label) or PKCS1v15."""
    key = _load_public(spki_der)
    if not isinstance(key, rsa.RSAPublicKey):
        raise CryptoError("RSA encryption needs an RSA key")
    scheme = _rsa_padding(padding, hashing, mgf_hash, label)
    try:
        return key.encrypt(_bytes(data, "data"), scheme)
    except _LIBRARY_ERRORS:
        raise CryptoError("data is too long for the RSA key and padding") from None


def rsa_decrypt(
    pkcs8_der: bytes,
    data: bytes,
    padding: PaddingMethod | None = PaddingMethod.OAEP,
    hashing: HashingAlgorithm | None = None,
    mgf_hash: HashingAlgorithm | None = None,
    label: bytes | None = None,
) -> bytes:
    """Decrypt with an RSA private key; same parameters as :func:`rsa_encrypt`."""
    key = _load_private(pkcs8_der)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise CryptoError("RSA decryption needs an RSA key")
    scheme = _rsa_padding(padding, hashing, mgf_hash, label)
    try:
        return key.decrypt(_bytes(data, "data"), scheme)
    except _LIBRARY_ERRORS:
        raise CryptoError("decryption failed") from None


def rsa_wrap(
    spki_der: bytes,
    key_to_wrap: bytes,
    padding: PaddingMethod | None = PaddingMethod.OAEP,
    hashing: HashingAlgorithm | None = None,
    mgf_hash: HashingAlgorithm | None = None,
) -> bytes:
    """Wrap key bytes with an RSA public key (OAEP with SHA-1 by default)."""
    return rsa_encrypt(spki_der, key_to_wrap, padding, hashing, mgf_hash)


def rsa_unwrap(
    pkcs8_der: bytes,
    wrapped_key: bytes,
    padding: PaddingMethod | None = PaddingMethod.OAEP,
    hashing: HashingAlgorithm | None = None,
    mgf_hash: HashingAlgorithm | None = None,
) -> bytes:
    """Unwrap key bytes wrapped by :func:`rsa_wrap`."""
    return rsa_decrypt(pkcs8_der, wrapped_key, padding, hashing, mgf_hash)
