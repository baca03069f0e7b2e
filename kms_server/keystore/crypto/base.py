"""What every part of the keystore's crypto shares: the errors, the hash
and curve tables, and the small helpers that load and describe keys.

Every failure raises :class:`CryptoError` with a short reason that never
contains key material or data, so it is safe to return to a client and to
log.
"""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from kmip.core.enums import (
    CryptographicAlgorithm,
    HashingAlgorithm,
    PaddingMethod,
    RecommendedCurve,
)


class CryptoError(Exception):
    """A cryptographic operation failed; maps to KMIP Cryptographic Failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.message = reason


class SignatureInvalid(CryptoError):
    """A signature did not verify."""


class MacInvalid(CryptoError):
    """A MAC did not verify."""


class NotSupported(CryptoError):
    """The computation is one this server does not implement (a cipher or
    MAC with a key of an algorithm it only generates and stores); maps to
    KMIP Feature Not Supported."""


# Errors that cryptography raises for bad input; all become CryptoError.
_LIBRARY_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, OverflowError)

_HASHES: dict[HashingAlgorithm, type[hashes.HashAlgorithm]] = {
    HashingAlgorithm.SHA_1: hashes.SHA1,
    HashingAlgorithm.SHA_224: hashes.SHA224,
    HashingAlgorithm.SHA_256: hashes.SHA256,
    HashingAlgorithm.SHA_384: hashes.SHA384,
    HashingAlgorithm.SHA_512: hashes.SHA512,
    HashingAlgorithm.SHA_512_224: hashes.SHA512_224,
    HashingAlgorithm.SHA_512_256: hashes.SHA512_256,
    HashingAlgorithm.SHA3_224: hashes.SHA3_224,
    HashingAlgorithm.SHA3_256: hashes.SHA3_256,
    HashingAlgorithm.SHA3_384: hashes.SHA3_384,
    HashingAlgorithm.SHA3_512: hashes.SHA3_512,
}

_HMAC_HASHES: dict[CryptographicAlgorithm, HashingAlgorithm] = {
    CryptographicAlgorithm.HMAC_SHA1: HashingAlgorithm.SHA_1,
    CryptographicAlgorithm.HMAC_SHA224: HashingAlgorithm.SHA_224,
    CryptographicAlgorithm.HMAC_SHA256: HashingAlgorithm.SHA_256,
    CryptographicAlgorithm.HMAC_SHA384: HashingAlgorithm.SHA_384,
    CryptographicAlgorithm.HMAC_SHA512: HashingAlgorithm.SHA_512,
    CryptographicAlgorithm.HMAC_SHA3_224: HashingAlgorithm.SHA3_224,
    CryptographicAlgorithm.HMAC_SHA3_256: HashingAlgorithm.SHA3_256,
    CryptographicAlgorithm.HMAC_SHA3_384: HashingAlgorithm.SHA3_384,
    CryptographicAlgorithm.HMAC_SHA3_512: HashingAlgorithm.SHA3_512,
}

# Curves we can describe (import, certificates); keyed by cryptography's name.
_CURVES: dict[RecommendedCurve, type[ec.EllipticCurve]] = {
    RecommendedCurve.P_224: ec.SECP224R1,
    RecommendedCurve.P_256: ec.SECP256R1,
    RecommendedCurve.P_384: ec.SECP384R1,
    RecommendedCurve.P_521: ec.SECP521R1,
    RecommendedCurve.SECP256K1: ec.SECP256K1,
    RecommendedCurve.BRAINPOOLP256R1: ec.BrainpoolP256R1,
    RecommendedCurve.BRAINPOOLP384R1: ec.BrainpoolP384R1,
    RecommendedCurve.BRAINPOOLP512R1: ec.BrainpoolP512R1,
}
_CURVE_BY_NAME: dict[str, RecommendedCurve] = {c().name: rc for rc, c in _CURVES.items()}

_AES_KEY_LENGTHS = (16, 24, 32)


def _bit_range(low: int, high: int, step: int = 8) -> frozenset[int]:
    return frozenset(range(low, high + 1, step))


# Symmetric algorithms whose keys are generated and kept here but that no
# operation computes with, and the key lengths (bits) each allows. A key is
# random bytes of that length; Encrypt, Decrypt and MAC with one answer
# NotSupported.
GENERATE_ONLY_LENGTHS: dict[CryptographicAlgorithm, frozenset[int]] = {
    CryptographicAlgorithm.DES: frozenset({56, 64}),
    CryptographicAlgorithm.BLOWFISH: _bit_range(32, 448),
    CryptographicAlgorithm.CAMELLIA: frozenset({128, 192, 256}),
    CryptographicAlgorithm.CAST5: _bit_range(40, 128),
    CryptographicAlgorithm.IDEA: frozenset({128}),
    CryptographicAlgorithm.MARS: _bit_range(128, 448, 32),
    CryptographicAlgorithm.RC2: _bit_range(8, 1024),
    CryptographicAlgorithm.RC4: _bit_range(40, 2048),
    CryptographicAlgorithm.RC5: _bit_range(8, 2040),
    CryptographicAlgorithm.SKIPJACK: frozenset({80}),
    CryptographicAlgorithm.TWOFISH: frozenset({128, 192, 256}),
    CryptographicAlgorithm.ARIA: frozenset({128, 192, 256}),
    CryptographicAlgorithm.SEED: frozenset({128}),
    CryptographicAlgorithm.SM4: frozenset({128}),
    CryptographicAlgorithm.GOST_28147_89: frozenset({256}),
    CryptographicAlgorithm.GOST_R_34_13_2015: frozenset({256}),
    CryptographicAlgorithm.HMAC_MD5: _bit_range(112, 4096),
}


def _refuse_generate_only(algorithm: Any) -> None:
    if algorithm in GENERATE_ONLY_LENGTHS:
        raise NotSupported(f"{_name(algorithm)} keys are generated and stored here; computing with them is not supported")


# -- small helpers -----------------------------------------------------------


def _bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise CryptoError(f"{what} must be bytes")


def _optional_bytes(value: Any, what: str) -> bytes | None:
    return None if value is None else _bytes(value, what)


def _hash(hashing: HashingAlgorithm | None) -> hashes.HashAlgorithm:
    try:
        return _HASHES[hashing]()
    except (KeyError, TypeError):
        raise CryptoError(
            f"hashing algorithm {_name(hashing)} is not supported"
        ) from None


def _name(value: Any) -> str:
    return getattr(value, "name", repr(value))


def _no_padding(padding: PaddingMethod | None) -> bool:
    return padding is None or padding == PaddingMethod.NONE


def _is_pem(data: bytes) -> bool:
    return data.lstrip().startswith(b"-----BEGIN")


def _load_private(pkcs8_der: Any) -> Any:
    data = _bytes(pkcs8_der, "private key")
    try:
        return serialization.load_der_private_key(data, password=None)
    except _LIBRARY_ERRORS:
        raise CryptoError("private key is malformed or not supported") from None


def _load_public(spki_der: Any) -> Any:
    data = _bytes(spki_der, "public key")
    try:
        return serialization.load_der_public_key(data)
    except _LIBRARY_ERRORS:
        raise CryptoError("public key is malformed or not supported") from None


def _private_pkcs8(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _public_spki(key: Any) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _describe(key: Any) -> tuple[CryptographicAlgorithm, int]:
    """Return the KMIP algorithm and length of an asymmetric key."""
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return CryptographicAlgorithm.RSA, key.key_size
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        _recommended_curve(key.curve)
        return CryptographicAlgorithm.EC, key.curve.key_size
    if isinstance(key, (ed25519.Ed25519PrivateKey, ed25519.Ed25519PublicKey)):
        return CryptographicAlgorithm.ED25519, 256
    if isinstance(key, (ed448.Ed448PrivateKey, ed448.Ed448PublicKey)):
        return CryptographicAlgorithm.ED448, 456
    raise CryptoError("key algorithm is not supported")


def _recommended_curve(curve: ec.EllipticCurve) -> RecommendedCurve:
    try:
        return _CURVE_BY_NAME[curve.name]
    except KeyError:
        raise CryptoError("elliptic curve is not supported") from None


def _curve(recommended_curve: Any) -> ec.EllipticCurve:
    try:
        return _CURVES[recommended_curve]()
    except (KeyError, TypeError):
        raise CryptoError(
            f"curve {_name(recommended_curve)} is not supported"
        ) from None
