"""Key generation and key format conversion (Create, Create Key Pair,
Register and Get with a Key Format Type). Private keys travel as PKCS#8
DER, public keys as SubjectPublicKeyInfo DER."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from kmip.core.enums import (
    CryptographicAlgorithm,
    KeyFormatType,
    RecommendedCurve,
)

from kms_server.keystore.crypto.base import (
    _AES_KEY_LENGTHS,
    _HMAC_HASHES,
    _LIBRARY_ERRORS,
    GENERATE_ONLY_LENGTHS,
    CryptoError,
    _bytes,
    _curve,
    _describe,
    _is_pem,
    _load_private,
    _load_public,
    _name,
    _private_pkcs8,
    _public_spki,
    _recommended_curve,
)
from kms_server.keystore.crypto.ciphers import CHACHA_ALGORITHMS

# Curves we generate keys on, and the key length that selects each.
_GENERATION_CURVES_BY_LENGTH: dict[int, RecommendedCurve] = {
    256: RecommendedCurve.P_256,
    384: RecommendedCurve.P_384,
    521: RecommendedCurve.P_521,
}
_RSA_GENERATION_LENGTHS = (2048, 3072, 4096)
_EC_ALGORITHMS = (
    CryptographicAlgorithm.EC,
    CryptographicAlgorithm.ECDSA,
    CryptographicAlgorithm.ECDH,
)

_HMAC_MIN_BITS = 112
_HMAC_MAX_BITS = 4096


# -- key generation ----------------------------------------------------------


def _set_des_parity(key: bytes) -> bytes:
    # DES keys carry odd parity in the low bit of every byte.
    out = bytearray()
    for byte in key:
        byte &= 0xFE
        if byte.bit_count() % 2 == 0:
            byte |= 1
        out.append(byte)
    return bytes(out)


def _describe_lengths(allowed: frozenset[int]) -> str:
    ordered = sorted(allowed)
    steps = {b - a for a, b in zip(ordered, ordered[1:], strict=False)}
    if len(ordered) > 3 and len(steps) == 1:
        return f"a multiple of {steps.pop()} from {ordered[0]} to {ordered[-1]}"
    return " or ".join(str(b) for b in ordered)


def generate_symmetric_key(
    algorithm: CryptographicAlgorithm, length_bits: int
) -> bytes:
    """Generate a symmetric key (KMIP 1.4, 4.1 Create).

    AES takes 128, 192 or 256 bits; HMAC keys a multiple of 8 bits from 112
    to 4096; Triple DES 168 or 192 bits (both give a 24-byte key with DES
    parity bits set); ChaCha20 256; the algorithms of GENERATE_ONLY_LENGTHS the lengths listed there.
    """
    if isinstance(length_bits, bool) or not isinstance(length_bits, int):
        raise CryptoError("cryptographic length must be an integer")
    if algorithm == CryptographicAlgorithm.AES:
        if length_bits // 8 not in _AES_KEY_LENGTHS or length_bits % 8:
            raise CryptoError("AES key length must be 128, 192 or 256 bits")
        return secrets.token_bytes(length_bits // 8)
    if algorithm in _HMAC_HASHES:
        if length_bits % 8 or not _HMAC_MIN_BITS <= length_bits <= _HMAC_MAX_BITS:
            raise CryptoError(
                f"HMAC key length must be a multiple of 8 bits from "
                f"{_HMAC_MIN_BITS} to {_HMAC_MAX_BITS}"
            )
        return secrets.token_bytes(length_bits // 8)
    if algorithm in CHACHA_ALGORITHMS:
        if length_bits != 256:
            raise CryptoError(f"a {_name(algorithm)} key is 256 bits")
        return secrets.token_bytes(32)
    if algorithm == CryptographicAlgorithm.TRIPLE_DES:
        if length_bits not in (168, 192):
            raise CryptoError("Triple DES key length must be 168 or 192 bits")
        return _set_des_parity(secrets.token_bytes(24))
    if algorithm in GENERATE_ONLY_LENGTHS:
        allowed = GENERATE_ONLY_LENGTHS[algorithm]
        if length_bits not in allowed:
            raise CryptoError(f"{_name(algorithm)} key length must be {_describe_lengths(allowed)} bits")
        if algorithm == CryptographicAlgorithm.DES:
            return _set_des_parity(secrets.token_bytes(8))
        return secrets.token_bytes(length_bits // 8)
    raise CryptoError(f"symmetric algorithm {_name(algorithm)} is not supported")


def generate_key_pair(
    algorithm: CryptographicAlgorithm,
    length_bits: int | None = None,
    curve: RecommendedCurve | None = None,
) -> tuple[bytes, bytes, int]:
    """Generate a key pair (KMIP 1.4, 4.2 Create Key Pair).

    Returns ``(private PKCS#8 DER, public SubjectPublicKeyInfo DER, length)``.
    RSA takes 2048, 3072 or 4096 bits with public exponent 65537. EC, ECDSA
    and ECDH take a Recommended Curve (P-256, P-384, P-521) or the matching
    length 256, 384 or 521.
    """
    if algorithm == CryptographicAlgorithm.RSA:
        if curve is not None:
            raise CryptoError("RSA keys take no curve")
        if length_bits not in _RSA_GENERATION_LENGTHS:
            raise CryptoError("RSA key length must be 2048, 3072 or 4096 bits")
        key: Any = rsa.generate_private_key(public_exponent=65537, key_size=length_bits)
    elif algorithm in _EC_ALGORITHMS:
        if curve is None:
            if length_bits not in _GENERATION_CURVES_BY_LENGTH:
                raise CryptoError("EC key length must be 256, 384 or 521 bits")
            curve = _GENERATION_CURVES_BY_LENGTH[length_bits]
        if curve not in _GENERATION_CURVES_BY_LENGTH.values():
            raise CryptoError(
                f"curve {_name(curve)} is not supported for key generation"
            )
        ec_curve = _curve(curve)
        if length_bits is not None and length_bits != ec_curve.key_size:
            raise CryptoError("cryptographic length does not match the curve")
        key = ec.generate_private_key(ec_curve)
    else:
        raise CryptoError(f"asymmetric algorithm {_name(algorithm)} is not supported")
    return _private_pkcs8(key), _public_spki(key.public_key()), _describe(key)[1]


# -- format conversion (KMIP Get / Register with a Key Format Type) ----------


def public_from_private(pkcs8_der: bytes) -> bytes:
    """Return the SubjectPublicKeyInfo DER of a PKCS#8 private key."""
    return _public_spki(_load_private(pkcs8_der).public_key())


def export_private_key(pkcs8_der: bytes, fmt: KeyFormatType) -> bytes:
    """Encode a private key as PKCS_8, PKCS_1 (RSA) or EC_PRIVATE_KEY (RFC 5915).

    Transparent formats are structures, not bytes: use
    :func:`transparent_private_key`.
    """
    key = _load_private(pkcs8_der)
    if fmt == KeyFormatType.PKCS_8:
        return _private_pkcs8(key)
    if fmt == KeyFormatType.PKCS_1:
        if not isinstance(key, rsa.RSAPrivateKey):
            raise CryptoError("PKCS_1 format is only for RSA keys")
    elif fmt == KeyFormatType.EC_PRIVATE_KEY:
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CryptoError("EC_PRIVATE_KEY format is only for EC keys")
    elif _name(fmt).startswith("TRANSPARENT_"):
        raise CryptoError("transparent formats are built with transparent_private_key")
    else:
        raise CryptoError(f"key format {_name(fmt)} is not supported for private keys")
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def export_public_key(spki_der: bytes, fmt: KeyFormatType) -> bytes:
    """Encode a public key as X_509 (SubjectPublicKeyInfo) or PKCS_1 (RSA).

    Transparent formats are structures, not bytes: use
    :func:`transparent_public_key`.
    """
    key = _load_public(spki_der)
    if fmt == KeyFormatType.X_509:
        return _public_spki(key)
    if fmt == KeyFormatType.PKCS_1:
        if not isinstance(key, rsa.RSAPublicKey):
            raise CryptoError("PKCS_1 format is only for RSA keys")
        return key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.PKCS1
        )
    if _name(fmt).startswith("TRANSPARENT_"):
        raise CryptoError("transparent formats are built with transparent_public_key")
    raise CryptoError(f"key format {_name(fmt)} is not supported for public keys")


def transparent_private_key(pkcs8_der: bytes) -> dict[str, Any]:
    """Return the fields of a Transparent RSA or EC Private Key structure.

    RSA: modulus, private_exponent, public_exponent, p, q, prime_exponent_p,
    prime_exponent_q, crt_coefficient (all ints). EC: recommended_curve
    (RecommendedCurve) and d (int).
    """
    key = _load_private(pkcs8_der)
    if isinstance(key, rsa.RSAPrivateKey):
        numbers = key.private_numbers()
        return {
            "modulus": numbers.public_numbers.n,
            "private_exponent": numbers.d,
            "public_exponent": numbers.public_numbers.e,
            "p": numbers.p,
            "q": numbers.q,
            "prime_exponent_p": numbers.dmp1,
            "prime_exponent_q": numbers.dmq1,
            "crt_coefficient": numbers.iqmp,
        }
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return {
            "recommended_curve": _recommended_curve(key.curve),
            "d": key.private_numbers().private_value,
        }
    raise CryptoError("transparent format is only for RSA and EC keys")


def transparent_public_key(spki_der: bytes) -> dict[str, Any]:
    """Return the fields of a Transparent RSA or EC Public Key structure.

    RSA: modulus, public_exponent (ints). EC: recommended_curve
    (RecommendedCurve) and q_string (the uncompressed point, bytes).
    """
    key = _load_public(spki_der)
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        return {"modulus": numbers.n, "public_exponent": numbers.e}
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {
            "recommended_curve": _recommended_curve(key.curve),
            "q_string": key.public_bytes(
                serialization.Encoding.X962,
                serialization.PublicFormat.UncompressedPoint,
            ),
        }
    raise CryptoError("transparent format is only for RSA and EC keys")


def _der_children(data: bytes) -> list[int]:
    """The tags of the elements of a DER SEQUENCE, in order (only as far as
    telling key layouts apart needs: two elements)."""

    def header(pos: int) -> tuple[int, int, int]:
        if pos + 2 > len(data):
            raise CryptoError("key material is not DER")
        tag, first = data[pos], data[pos + 1]
        pos += 2
        if first < 0x80:
            return tag, pos, first
        count = first & 0x7F
        if not 1 <= count <= 4 or pos + count > len(data):
            raise CryptoError("key material is not DER")
        return tag, pos + count, int.from_bytes(data[pos : pos + count], "big")

    tag, pos, length = header(0)
    if tag != 0x30 or pos + length != len(data):
        raise CryptoError("key material is not a DER SEQUENCE")
    tags: list[int] = []
    while pos < len(data) and len(tags) < 2:
        tag, start, length = header(pos)
        tags.append(tag)
        pos = start + length
    return tags


def private_key_layout(data: bytes) -> KeyFormatType:
    """Which DER layout a private key given as Raw bytes has: PKCS_8
    (PrivateKeyInfo: version, then an AlgorithmIdentifier SEQUENCE), PKCS_1
    (RSAPrivateKey: version, then the modulus INTEGER) or EC_PRIVATE_KEY
    (RFC 5915: version, then the private key OCTET STRING)."""
    tags = _der_children(_bytes(data, "key material"))
    if len(tags) == 2 and tags[0] == 0x02:
        layout = {0x30: KeyFormatType.PKCS_8, 0x02: KeyFormatType.PKCS_1, 0x04: KeyFormatType.EC_PRIVATE_KEY}.get(tags[1])
        if layout is not None:
            return layout
    raise CryptoError("private key is not PKCS#8, PKCS#1 or RFC 5915 DER")


def public_key_layout(data: bytes) -> KeyFormatType:
    """Which DER layout a public key given as Raw bytes has: X_509
    (SubjectPublicKeyInfo: an AlgorithmIdentifier SEQUENCE, then a BIT
    STRING) or PKCS_1 (RSAPublicKey: modulus and exponent INTEGERs)."""
    tags = _der_children(_bytes(data, "key material"))
    if tags == [0x30, 0x03]:
        return KeyFormatType.X_509
    if tags == [0x02, 0x02]:
        return KeyFormatType.PKCS_1
    raise CryptoError("public key is not SubjectPublicKeyInfo or PKCS#1 DER")


def import_private_key(
    data: bytes, fmt: KeyFormatType
) -> tuple[bytes, CryptographicAlgorithm, int]:
    """Normalize a registered private key to PKCS#8 DER.

    Accepts PKCS_8, PKCS_1 (RSA) or EC_PRIVATE_KEY, as DER or PEM; encrypted
    keys are refused. Returns ``(pkcs8_der, algorithm, length_bits)`` where
    elliptic curve keys report CryptographicAlgorithm.EC.
    """
    data = _bytes(data, "key material")
    if fmt not in (
        KeyFormatType.PKCS_8,
        KeyFormatType.PKCS_1,
        KeyFormatType.EC_PRIVATE_KEY,
    ):
        raise CryptoError(f"key format {_name(fmt)} is not supported for private keys")
    try:
        if _is_pem(data):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except TypeError:
        raise CryptoError("encrypted private keys are not supported") from None
    except _LIBRARY_ERRORS:
        raise CryptoError("private key is malformed or not supported") from None
    if fmt == KeyFormatType.PKCS_1 and not isinstance(key, rsa.RSAPrivateKey):
        raise CryptoError("PKCS_1 format is only for RSA keys")
    if fmt == KeyFormatType.EC_PRIVATE_KEY and not isinstance(
        key, ec.EllipticCurvePrivateKey
    ):
        raise CryptoError("EC_PRIVATE_KEY format is only for EC keys")
    algorithm, length = _describe(key)
    return _private_pkcs8(key), algorithm, length


def import_public_key(
    data: bytes, fmt: KeyFormatType
) -> tuple[bytes, CryptographicAlgorithm, int]:
    """Normalize a registered public key to SubjectPublicKeyInfo DER.

    Accepts X_509 (SubjectPublicKeyInfo) or PKCS_1 (RSA), as DER or PEM.
    Returns ``(spki_der, algorithm, length_bits)``.
    """
    data = _bytes(data, "key material")
    if fmt not in (KeyFormatType.X_509, KeyFormatType.PKCS_1):
        raise CryptoError(f"key format {_name(fmt)} is not supported for public keys")
    try:
        if _is_pem(data):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_der_public_key(data)
    except _LIBRARY_ERRORS:
        raise CryptoError("public key is malformed or not supported") from None
    if fmt == KeyFormatType.PKCS_1 and not isinstance(key, rsa.RSAPublicKey):
        raise CryptoError("PKCS_1 format is only for RSA keys")
    algorithm, length = _describe(key)
    return _public_spki(key), algorithm, length


def _int_field(values: Mapping[str, Any], name: str) -> int:
    value = values.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CryptoError(f"transparent key field {name} is missing or invalid")
    return value


def import_transparent_private_key(
    values: Mapping[str, Any],
) -> tuple[bytes, CryptographicAlgorithm, int]:
    """Build a PKCS#8 private key from Transparent RSA or EC Private Key fields.

    Takes the dictionary shape of :func:`transparent_private_key`. For RSA
    only modulus, public_exponent and private_exponent are required; the
    primes and CRT values are recovered when absent.
    """
    try:
        if "recommended_curve" in values:
            curve = _curve(values["recommended_curve"])
            key: Any = ec.derive_private_key(_int_field(values, "d"), curve)
        else:
            n = _int_field(values, "modulus")
            e = _int_field(values, "public_exponent")
            d = _int_field(values, "private_exponent")
            if values.get("p") is not None and values.get("q") is not None:
                p, q = _int_field(values, "p"), _int_field(values, "q")
            else:
                p, q = rsa.rsa_recover_prime_factors(n, e, d)
            numbers = rsa.RSAPrivateNumbers(
                p=p,
                q=q,
                d=d,
                dmp1=values.get("prime_exponent_p") or rsa.rsa_crt_dmp1(d, p),
                dmq1=values.get("prime_exponent_q") or rsa.rsa_crt_dmq1(d, q),
                iqmp=values.get("crt_coefficient") or rsa.rsa_crt_iqmp(p, q),
                public_numbers=rsa.RSAPublicNumbers(e=e, n=n),
            )
            key = numbers.private_key()
    except _LIBRARY_ERRORS:
        raise CryptoError(
            "transparent private key is inconsistent or not supported"
        ) from None
    algorithm, length = _describe(key)
    return _private_pkcs8(key), algorithm, length


def import_transparent_public_key(
    values: Mapping[str, Any],
) -> tuple[bytes, CryptographicAlgorithm, int]:
    """Build a SubjectPublicKeyInfo from Transparent RSA or EC Public Key fields."""
    try:
        if "recommended_curve" in values:
            curve = _curve(values["recommended_curve"])
            q_string = _bytes(values.get("q_string"), "q_string")
            key: Any = ec.EllipticCurvePublicKey.from_encoded_point(curve, q_string)
        else:
            key = rsa.RSAPublicNumbers(
                e=_int_field(values, "public_exponent"), n=_int_field(values, "modulus")
            ).public_key()
    except _LIBRARY_ERRORS:
        raise CryptoError(
            "transparent public key is invalid or not supported"
        ) from None
    algorithm, length = _describe(key)
    return _public_spki(key), algorithm, length

