"""Signatures (KMIP Sign and Signature Verify): RSA-PSS, RSA PKCS#1 v1.5
and ECDSA."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as _asym_padding
from kmip.core.enums import (
    CryptographicAlgorithm,
    DigitalSignatureAlgorithm,
    HashingAlgorithm,
    PaddingMethod,
)

from kms_server.keystore.crypto.base import (
    _LIBRARY_ERRORS,
    CryptoError,
    SignatureInvalid,
    _bytes,
    _hash,
    _load_private,
    _load_public,
    _name,
    _no_padding,
)

_RSA, _EC = "RSA", "EC"

# Digital Signature Algorithm -> (key family, padding, hash); a None hash
# means the hash comes from the Cryptographic Parameters.
_SIGNATURE_ALGORITHMS: dict[
    DigitalSignatureAlgorithm, tuple[str, PaddingMethod | None, HashingAlgorithm | None]
] = {
    DigitalSignatureAlgorithm.SHA1_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA_1,
    ),
    DigitalSignatureAlgorithm.SHA224_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA_224,
    ),
    DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA_256,
    ),
    DigitalSignatureAlgorithm.SHA384_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA_384,
    ),
    DigitalSignatureAlgorithm.SHA512_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA_512,
    ),
    DigitalSignatureAlgorithm.SHA3_256_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA3_256,
    ),
    DigitalSignatureAlgorithm.SHA3_384_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA3_384,
    ),
    DigitalSignatureAlgorithm.SHA3_512_WITH_RSA_ENCRYPTION: (
        _RSA,
        PaddingMethod.PKCS1v15,
        HashingAlgorithm.SHA3_512,
    ),
    DigitalSignatureAlgorithm.RSASSA_PSS: (_RSA, PaddingMethod.PSS, None),
    DigitalSignatureAlgorithm.ECDSA_WITH_SHA1: (_EC, None, HashingAlgorithm.SHA_1),
    DigitalSignatureAlgorithm.ECDSA_WITH_SHA224: (_EC, None, HashingAlgorithm.SHA_224),
    DigitalSignatureAlgorithm.ECDSA_WITH_SHA256: (_EC, None, HashingAlgorithm.SHA_256),
    DigitalSignatureAlgorithm.ECDSA_WITH_SHA384: (_EC, None, HashingAlgorithm.SHA_384),
    DigitalSignatureAlgorithm.ECDSA_WITH_SHA512: (_EC, None, HashingAlgorithm.SHA_512),
}

# RSASSA-PSS names no hash of its own; SHA-256 is the common profile choice.
_PSS_DEFAULT_HASH = HashingAlgorithm.SHA_256


# -- signatures (KMIP 1.4, 4.31 Sign / 4.32 Signature Verify) ----------------


def _key_family(key: Any) -> str:
    if isinstance(key, (rsa.RSAPrivateKey, rsa.RSAPublicKey)):
        return _RSA
    if isinstance(key, (ec.EllipticCurvePrivateKey, ec.EllipticCurvePublicKey)):
        return _EC
    raise CryptoError("signatures are only supported with RSA and EC keys")


def _algorithm_family(algorithm: CryptographicAlgorithm) -> str:
    if algorithm == CryptographicAlgorithm.RSA:
        return _RSA
    if algorithm in (CryptographicAlgorithm.EC, CryptographicAlgorithm.ECDSA):
        return _EC
    raise CryptoError(f"signature algorithm {_name(algorithm)} is not supported")


def _signature_scheme(
    key: Any,
    digital_signature_algorithm: DigitalSignatureAlgorithm | None,
    cryptographic_algorithm: CryptographicAlgorithm | None,
    hashing: HashingAlgorithm | None,
    padding: PaddingMethod | None,
) -> tuple[str, PaddingMethod | None, hashes.HashAlgorithm]:
    """Resolve KMIP signature parameters to (family, padding, hash).

    A Digital Signature Algorithm wins, but parameters that contradict it
    are refused rather than silently ignored.
    """
    key_family = _key_family(key)
    if digital_signature_algorithm is not None:
        try:
            family, scheme_padding, scheme_hash = _SIGNATURE_ALGORITHMS[
                digital_signature_algorithm
            ]
        except (KeyError, TypeError):
            raise CryptoError(
                f"digital signature algorithm {_name(digital_signature_algorithm)} "
                "is not supported"
            ) from None
        if (
            cryptographic_algorithm is not None
            and _algorithm_family(cryptographic_algorithm) != family
        ):
            raise CryptoError(
                "cryptographic algorithm contradicts the signature algorithm"
            )
        if scheme_hash is None:
            scheme_hash = hashing or _PSS_DEFAULT_HASH
        elif hashing is not None and hashing != scheme_hash:
            raise CryptoError("hashing algorithm contradicts the signature algorithm")
        if not _no_padding(padding) and padding != scheme_padding:
            raise CryptoError("padding method contradicts the signature algorithm")
        hashing, padding = scheme_hash, scheme_padding
    else:
        family = (
            key_family
            if cryptographic_algorithm is None
            else _algorithm_family(cryptographic_algorithm)
        )
        if hashing is None:
            raise CryptoError(
                "a hashing algorithm or digital signature algorithm is required"
            )
        if family == _RSA and padding not in (
            PaddingMethod.PSS,
            PaddingMethod.PKCS1v15,
        ):
            raise CryptoError("RSA signatures need padding PSS or PKCS1v15")
        if family == _EC and not _no_padding(padding):
            raise CryptoError("ECDSA takes no padding")
    if family != key_family:
        raise CryptoError("key does not match the signature algorithm")
    return family, padding, _hash(hashing)


def _signature_hash(
    hash_algorithm: hashes.HashAlgorithm, data: bytes, prehashed: bool
) -> Any:
    if not prehashed:
        return hash_algorithm
    if len(data) != hash_algorithm.digest_size:
        raise CryptoError("prehashed data does not match the digest length")
    return utils.Prehashed(hash_algorithm)


def sign(
    pkcs8_der: bytes,
    data: bytes,
    *,
    digital_signature_algorithm: DigitalSignatureAlgorithm | None = None,
    cryptographic_algorithm: CryptographicAlgorithm | None = None,
    hashing: HashingAlgorithm | None = None,
    padding: PaddingMethod | None = None,
    prehashed: bool = False,
) -> bytes:
    """Sign with RSA-PSS (salt = digest length, MGF1 with the same hash),
    RSA PKCS#1 v1.5 or ECDSA (DER-encoded signature).

    Give a Digital Signature Algorithm, or the Cryptographic Parameters
    triple (algorithm, padding, hashing). ``prehashed`` means ``data`` is
    already the digest.
    """
    key = _load_private(pkcs8_der)
    data = _bytes(data, "data")
    family, scheme_padding, hash_algorithm = _signature_scheme(
        key, digital_signature_algorithm, cryptographic_algorithm, hashing, padding
    )
    algorithm = _signature_hash(hash_algorithm, data, prehashed)
    try:
        if family == _EC:
            return key.sign(data, ec.ECDSA(algorithm))
        if scheme_padding == PaddingMethod.PSS:
            pss = _asym_padding.PSS(
                mgf=_asym_padding.MGF1(hash_algorithm),
                salt_length=hash_algorithm.digest_size,
            )
            return key.sign(data, pss, algorithm)
        return key.sign(data, _asym_padding.PKCS1v15(), algorithm)
    except _LIBRARY_ERRORS:
        raise CryptoError("signing failed") from None


def verify_signature(
    spki_der: bytes,
    data: bytes,
    signature: bytes,
    *,
    digital_signature_algorithm: DigitalSignatureAlgorithm | None = None,
    cryptographic_algorithm: CryptographicAlgorithm | None = None,
    hashing: HashingAlgorithm | None = None,
    padding: PaddingMethod | None = None,
    prehashed: bool = False,
) -> None:
    """Verify a signature made by :func:`sign`; raises SignatureInvalid.

    PSS signatures are accepted with any salt length, for signers that use
    the maximum rather than the digest length.
    """
    key = _load_public(spki_der)
    data = _bytes(data, "data")
    signature = _bytes(signature, "signature")
    family, scheme_padding, hash_algorithm = _signature_scheme(
        key, digital_signature_algorithm, cryptographic_algorithm, hashing, padding
    )
    algorithm = _signature_hash(hash_algorithm, data, prehashed)
    try:
        if family == _EC:
            key.verify(signature, data, ec.ECDSA(algorithm))
        elif scheme_padding == PaddingMethod.PSS:
            pss = _asym_padding.PSS(
                mgf=_asym_padding.MGF1(hash_algorithm),
                salt_length=_asym_padding.PSS.AUTO,
            )
            key.verify(signature, data, pss, algorithm)
        else:
            key.verify(signature, data, _asym_padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise SignatureInvalid("signature is invalid") from None
    except _LIBRARY_ERRORS:
        raise CryptoError("signature verification failed") from None
