"""Cryptographic primitives for the keystore, in KMIP vocabulary.

This module and the at-rest barrier are the only places that import
``cryptography``. Every function here takes and returns plain bytes (keys as
raw symmetric bytes, PKCS#8 DER private keys, SubjectPublicKeyInfo DER public
keys) and KMIP enumerations for parameters, so that the layers above never
handle library key objects.

Every failure raises :class:`CryptoError` with a short reason that never
contains key material or data, so it is safe to return to a client and to
log. Verification raises instead of returning False (the pyca rule):
:class:`SignatureInvalid` for a bad signature and :class:`MacInvalid` for a
bad MAC, so the MAC Verify and Signature Verify operations can tell "invalid"
apart from "could not check".
"""

from __future__ import annotations

import hmac as _std_hmac
import secrets
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, keywrap, serialization
from cryptography.hazmat.primitives import hmac as _crypto_hmac
from cryptography.hazmat.primitives import padding as _sym_padding
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa, utils
from cryptography.hazmat.primitives.asymmetric import padding as _asym_padding
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.x509.oid import NameOID
from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    DigitalSignatureAlgorithm,
    HashingAlgorithm,
    KeyFormatType,
    PaddingMethod,
    RecommendedCurve,
)

try:
    # Triple DES moved to the "decrepit" namespace in cryptography 43.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES as _TripleDES
except ImportError:  # pragma: no cover - cryptography < 43
    _TripleDES = algorithms.TripleDES

__all__ = [
    "CipherStream",
    "CryptoError",
    "MacInvalid",
    "SignatureInvalid",
    "constant_time_eq",
    "mix_seed",
    "decrypt",
    "digest",
    "encrypt",
    "export_private_key",
    "export_public_key",
    "generate_key_pair",
    "generate_symmetric_key",
    "import_private_key",
    "import_public_key",
    "import_transparent_private_key",
    "import_transparent_public_key",
    "mac",
    "mac_verify",
    "parse_certificate",
    "public_from_private",
    "random_bytes",
    "rsa_decrypt",
    "rsa_encrypt",
    "rsa_unwrap",
    "rsa_wrap",
    "sign",
    "transparent_private_key",
    "transparent_public_key",
    "unwrap_key",
    "verify_signature",
    "wrap_key",
]


class CryptoError(Exception):
    """A cryptographic operation failed; maps to KMIP Cryptographic Failure."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.message = reason


class SignatureInvalid(CryptoError):
    """A signature did not verify."""


class MacInvalid(CryptoError):
    """A MAC did not verify."""


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
_CURVE_BY_NAME: dict[str, RecommendedCurve] = {c.name: rc for rc, c in _CURVES.items()}

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

_AES_KEY_LENGTHS = (16, 24, 32)
_HMAC_MIN_BITS = 112
_HMAC_MAX_BITS = 4096
_GCM_DEFAULT_IV_LENGTH = 12
_GCM_TAG_LENGTHS = range(12, 17)
_RANDOM_MAX_BYTES = 1 << 20

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
# KMIP and PKCS#1 default OAEP to SHA-1 for both the label hash and MGF1.
_OAEP_DEFAULT_HASH = HashingAlgorithm.SHA_1


# -- small helpers -----------------------------------------------------------


def _bytes(value: Any, what: str) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise CryptoError(f"{what} must be bytes")


def _optional_bytes(value: Any, what: str) -> bytes | None:
    return None if value is None else _bytes(value, what)


def _hash(hashing: HashingAlgorithm | None) -> hashes.HashAlgorithm:
    try:
        return _HASHES[hashing]()  # type: ignore[index]
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


# -- randomness, digests, comparison ----------------------------------------


def random_bytes(n: int) -> bytes:
    """Return ``n`` bytes from the operating system's CSPRNG."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0 or n > _RANDOM_MAX_BYTES:
        raise CryptoError(
            f"random length must be between 0 and {_RANDOM_MAX_BYTES} bytes"
        )
    return secrets.token_bytes(n)


# The most seed one RNG Seed request mixes in; the rest is not taken.
SEED_MAX_BYTES = 4096
_URANDOM = "/dev/urandom"


def mix_seed(data: bytes) -> int:
    """Mix client-supplied seed into the operating system's random pool and
    return how many bytes were taken. Written to /dev/urandom, the bytes
    are stirred into the pool without being credited as entropy: they can
    add unpredictability, never take any away, so any client may give
    them. 0 when the pool cannot be written here."""
    data = _bytes(data, "seed")[:SEED_MAX_BYTES]
    try:
        with open(_URANDOM, "wb", buffering=0) as pool:
            return pool.write(data) or 0
    except OSError:
        return 0


def digest(hashing: HashingAlgorithm, data: bytes) -> bytes:
    """Hash ``data`` with a KMIP Hashing Algorithm."""
    h = hashes.Hash(_hash(hashing))
    h.update(_bytes(data, "data"))
    return h.finalize()


def constant_time_eq(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time independent of where they differ."""
    return _std_hmac.compare_digest(_bytes(a, "value"), _bytes(b, "value"))


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


def generate_symmetric_key(
    algorithm: CryptographicAlgorithm, length_bits: int
) -> bytes:
    """Generate a symmetric key (KMIP 1.4, 4.1 Create).

    AES takes 128, 192 or 256 bits; HMAC keys a multiple of 8 bits from 112
    to 4096; Triple DES 168 or 192 bits (both give a 24-byte key with DES
    parity bits set).
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


# The Name attribute types KMIP 2.0 gives attributes of their own
# (4.x Certificate Subject CN ... DN Qualifier, and the same for the issuer):
# suffix of the attribute name -> X.509 attribute type.
CERTIFICATE_NAME_FIELDS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "Email": NameOID.EMAIL_ADDRESS,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "UID": NameOID.USER_ID,
    "Serial Number": NameOID.SERIAL_NUMBER,
    "Title": NameOID.TITLE,
    "DC": NameOID.DOMAIN_COMPONENT,
    "DN Qualifier": NameOID.DN_QUALIFIER,
}


def _name_fields(name: x509.Name) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for suffix, oid in CERTIFICATE_NAME_FIELDS.items():
        values = [a.value for a in name.get_attributes_for_oid(oid) if isinstance(a.value, str)]
        if values:
            fields[suffix] = values
    return fields


def parse_certificate(der: bytes) -> dict[str, Any]:
    """Read the attributes KMIP derives from an X.509 certificate.

    Returns subject and issuer (RFC 4514 strings), subject_der and
    issuer_der (the DER Names), subject_fields and issuer_fields (each
    attribute type of CERTIFICATE_NAME_FIELDS present in the Name -> its
    values, in order), serial_number (int) and serial_der (the
    content octets of its DER INTEGER), not_before and not_after (aware UTC datetimes), public_key_spki_der,
    algorithm, length_bits and digest_sha256 (of the DER encoding). PEM
    input is tolerated.
    """
    data = _bytes(der, "certificate")
    try:
        if _is_pem(data):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        public_key = cert.public_key()
        result = {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "subject_der": cert.subject.public_bytes(),
            "issuer_der": cert.issuer.public_bytes(),
            "serial_number": cert.serial_number,
            "serial_der": cert.serial_number.to_bytes(
                (cert.serial_number.bit_length() + 8) // 8, "big", signed=True
            ),
            "not_before": cert.not_valid_before_utc,
            "not_after": cert.not_valid_after_utc,
            "digest_sha256": cert.fingerprint(hashes.SHA256()),
            "subject_fields": _name_fields(cert.subject),
            "issuer_fields": _name_fields(cert.issuer),
        }
    except _LIBRARY_ERRORS:
        raise CryptoError("certificate is malformed or not supported") from None
    algorithm, length = _describe(public_key)
    result["public_key_spki_der"] = _public_spki(public_key)
    result["algorithm"] = algorithm
    result["length_bits"] = length
    return result


# -- symmetric encryption (KMIP 1.4, 4.29 Encrypt / 4.30 Decrypt) ------------


def _block_algorithm(key: bytes, algorithm: CryptographicAlgorithm) -> Any:
    if algorithm == CryptographicAlgorithm.AES:
        if len(key) not in _AES_KEY_LENGTHS:
            raise CryptoError("AES key must be 128, 192 or 256 bits")
        return algorithms.AES(key)
    if algorithm == CryptographicAlgorithm.TRIPLE_DES:
        if len(key) != 24:
            raise CryptoError("Triple DES key must be 192 bits")
        return _TripleDES(key)
    raise CryptoError(f"cipher {_name(algorithm)} is not supported")


def _aes_wrapping_key(key: bytes, algorithm: CryptographicAlgorithm | None) -> bytes:
    if algorithm not in (None, CryptographicAlgorithm.AES):
        raise CryptoError("key wrap modes are only for AES")
    if len(key) not in _AES_KEY_LENGTHS:
        raise CryptoError("AES key must be 128, 192 or 256 bits")
    return key


def _padder(padding: PaddingMethod | None, block_bits: int) -> Any:
    if _no_padding(padding):
        return None
    if padding == PaddingMethod.PKCS5:
        # PKCS#5 is defined for 8-byte blocks; PKCS#7 is its generalization.
        return _sym_padding.PKCS7(block_bits)
    if padding == PaddingMethod.ANSI_X923:
        return _sym_padding.ANSIX923(block_bits)
    raise CryptoError(f"padding method {_name(padding)} is not supported")


# Modes that use an IV (or counter block, or tweak) of one block.
_IV_MODES: dict[BlockCipherMode, Any] = {
    BlockCipherMode.CBC: modes.CBC,
    BlockCipherMode.CTR: modes.CTR,
    BlockCipherMode.XTS: modes.XTS,
}
_PADDED_MODES = (BlockCipherMode.CBC, BlockCipherMode.ECB)
_KEY_WRAP_MODES = (BlockCipherMode.NIST_KEY_WRAP, BlockCipherMode.AES_KEY_WRAP_PADDING)


def _check_unused(
    mode: BlockCipherMode, aad: bytes | None, tag_length: Any = None
) -> None:
    if aad:
        raise CryptoError(f"{_name(mode)} takes no additional authenticated data")
    if tag_length is not None:
        raise CryptoError(f"{_name(mode)} takes no authentication tag")


def _mode_cipher(
    key: bytes,
    algorithm: CryptographicAlgorithm,
    mode: BlockCipherMode,
    iv: bytes | None,
) -> Cipher:
    if mode == BlockCipherMode.XTS:
        if algorithm != CryptographicAlgorithm.AES:
            raise CryptoError("XTS is only for AES")
        if len(key) not in (32, 64):
            raise CryptoError("AES-XTS key must be 256 or 512 bits")
        cipher_algorithm: Any = algorithms.AES(key)
    else:
        cipher_algorithm = _block_algorithm(key, algorithm)
    if mode == BlockCipherMode.ECB:
        if iv:
            raise CryptoError("ECB takes no IV")
        mode_object: Any = modes.ECB()
    else:
        if iv is None or len(iv) != cipher_algorithm.block_size // 8:
            raise CryptoError(
                f"{_name(mode)} needs a {cipher_algorithm.block_size // 8}-byte IV"
            )
        mode_object = _IV_MODES[mode](iv)
    try:
        return Cipher(cipher_algorithm, mode_object)
    except _LIBRARY_ERRORS:
        raise CryptoError(
            f"{_name(mode)} is not supported with {_name(algorithm)}"
        ) from None


# -- ChaCha20 and ChaCha20-Poly1305 (KMIP 2.0 algorithms) --------------------

CHACHA_ALGORITHMS = (CryptographicAlgorithm.CHACHA20, CryptographicAlgorithm.CHACHA20_POLY1305)
# Poly1305 gives 16 bytes; like GCM's, a tag may be truncated to 12.
_AEAD_TAG_LENGTHS = range(12, 17)
_CHACHA_NONCE_DEFAULT = 12


def _chacha20_stream(key: bytes, nonce: bytes, data: bytes) -> bytes:
    """ChaCha20 from block counter 0: a 12-byte nonce as RFC 8439 has it
    (32-bit counter), or an 8-byte one as the original ChaCha20 has it
    (64-bit counter), which is what the KMIP profile test cases use."""
    if len(key) != 32:
        raise CryptoError("a ChaCha20 key is 256 bits")
    if len(nonce) == 12:
        counter_and_nonce = bytes(4) + nonce
    elif len(nonce) == 8:
        counter_and_nonce = bytes(8) + nonce
    else:
        raise CryptoError("a ChaCha20 nonce is 8 or 12 bytes")
    encryptor = Cipher(algorithms.ChaCha20(key, counter_and_nonce), mode=None).encryptor()
    return encryptor.update(data) + encryptor.finalize()


def _chacha_encrypt(key, algorithm, mode, data, iv, padding, aad, tag_length):
    if not _no_padding(padding):
        raise CryptoError(f"{_name(algorithm)} takes no padding")
    if iv is None:
        iv = secrets.token_bytes(_CHACHA_NONCE_DEFAULT)
    if algorithm == CryptographicAlgorithm.CHACHA20:
        if mode is not None or aad is not None or tag_length is not None:
            raise CryptoError("ChaCha20 is a stream cipher: no Block Cipher Mode, additional data or tag")
        return _chacha20_stream(key, iv, data), iv, None
    if mode not in (None, BlockCipherMode.AEAD):
        raise CryptoError("ChaCha20-Poly1305 takes Block Cipher Mode AEAD or none")
    tag_length = 16 if tag_length is None else tag_length
    if tag_length not in _AEAD_TAG_LENGTHS:
        raise CryptoError("a ChaCha20-Poly1305 tag is 12 to 16 bytes")
    if len(key) != 32 or len(iv) != 12:
        raise CryptoError("ChaCha20-Poly1305 takes a 256-bit key and a 12-byte nonce")
    sealed = ChaCha20Poly1305(key).encrypt(iv, data, aad)
    return sealed[:-16], iv, sealed[-16:][:tag_length]


def _chacha_decrypt(key, algorithm, mode, data, iv, padding, aad, tag):
    if not _no_padding(padding):
        raise CryptoError(f"{_name(algorithm)} takes no padding")
    if iv is None:
        raise CryptoError(f"{_name(algorithm)} needs the nonce used to encrypt")
    if algorithm == CryptographicAlgorithm.CHACHA20:
        if mode is not None or aad is not None or tag is not None:
            raise CryptoError("ChaCha20 is a stream cipher: no Block Cipher Mode, additional data or tag")
        return _chacha20_stream(key, iv, data)
    if mode not in (None, BlockCipherMode.AEAD):
        raise CryptoError("ChaCha20-Poly1305 takes Block Cipher Mode AEAD or none")
    if tag is None or len(tag) not in _AEAD_TAG_LENGTHS:
        raise CryptoError("a ChaCha20-Poly1305 tag is 12 to 16 bytes")
    if len(key) != 32 or len(iv) != 12:
        raise CryptoError("ChaCha20-Poly1305 takes a 256-bit key and a 12-byte nonce")
    aead = ChaCha20Poly1305(key)
    if len(tag) == 16:
        try:
            return aead.decrypt(iv, data + tag, aad)
        except InvalidTag:
            raise CryptoError("authentication failed: wrong key, nonce, data or tag") from None
    # A truncated tag: recover the candidate plaintext (RFC 8439 2.8: the
    # keystream starts at block 1), recompute the full tag over the same
    # ciphertext and compare its prefix; nothing is released unless it holds.
    stream = Cipher(algorithms.ChaCha20(key, (1).to_bytes(4, "little") + iv), mode=None).encryptor()
    plaintext = stream.update(data) + stream.finalize()
    expected = aead.encrypt(iv, plaintext, aad)[-16:]
    if not _std_hmac.compare_digest(expected[: len(tag)], tag):
        raise CryptoError("authentication failed: wrong key, nonce, data or tag")
    return plaintext


def encrypt(
    key: bytes,
    algorithm: CryptographicAlgorithm,
    mode: BlockCipherMode,
    data: bytes,
    iv: bytes | None = None,
    padding: PaddingMethod | None = None,
    aad: bytes | None = None,
    tag_length: int | None = None,
) -> tuple[bytes, bytes | None, bytes | None]:
    """Encrypt with a symmetric key; returns ``(ciphertext, iv_used, tag)``.

    Modes: GCM (AES; 12-byte IV generated when absent; tag 12 to 16 bytes,
    default 16), CBC and ECB (padding PKCS5, ANSI_X923 or none; no padding
    needs block-aligned data), CTR, XTS (AES, 256- or 512-bit key,
    16-byte tweak as the IV), NIST_KEY_WRAP (RFC 3394) and
    AES_KEY_WRAP_PADDING (RFC 5649). A missing IV is generated at random and
    returned; a missing padding method means no padding. ``iv_used`` is None
    for modes without one, ``tag`` is None except for GCM.
    """
    key = _bytes(key, "key")
    data = _bytes(data, "data")
    iv = _optional_bytes(iv, "IV")
    aad = _optional_bytes(aad, "additional data")

    if algorithm in CHACHA_ALGORITHMS:
        return _chacha_encrypt(key, algorithm, mode, data, iv, padding, aad, tag_length)
    if mode in _KEY_WRAP_MODES:
        _check_unused(mode, aad, tag_length)
        if iv or not _no_padding(padding):
            raise CryptoError(f"{_name(mode)} takes no IV and no padding")
        return wrap_key(_aes_wrapping_key(key, algorithm), data, mode), None, None

    if mode in STREAM_MODES:
        # GCM, CTR, CBC and ECB: the multi-part cipher, in one part.
        if mode in _PADDED_MODES and _no_padding(padding) and len(data) % _block_bytes(key, algorithm):
            raise CryptoError("data length is not a multiple of the block size")
        stream = CipherStream(
            key, algorithm, mode, decrypting=False, iv=iv, padding=padding, aad=aad, tag_length=tag_length
        )
        ciphertext = stream.update(data)
        rest, tag = stream.finalize()
        return ciphertext + rest, stream.iv, tag

    if mode not in _IV_MODES:
        raise CryptoError(f"block cipher mode {_name(mode)} is not supported")
    # XTS: a whole sector at a time.
    _check_unused(mode, aad, tag_length)
    if not _no_padding(padding):
        raise CryptoError(f"{_name(mode)} takes no padding")
    if iv is None:
        iv = secrets.token_bytes(16)
    cipher = _mode_cipher(key, algorithm, mode, iv)
    try:
        encryptor = cipher.encryptor()
        ciphertext = encryptor.update(data) + encryptor.finalize()
    except _LIBRARY_ERRORS:
        raise CryptoError(f"{_name(mode)} encryption failed") from None
    return ciphertext, iv, None


def decrypt(
    key: bytes,
    algorithm: CryptographicAlgorithm,
    mode: BlockCipherMode,
    data: bytes,
    iv: bytes | None = None,
    padding: PaddingMethod | None = None,
    aad: bytes | None = None,
    tag: bytes | None = None,
) -> bytes:
    """Decrypt what :func:`encrypt` produced; GCM and key wrap authenticate.

    Raises CryptoError on a wrong tag, a failed unwrap integrity check, bad
    padding, or a missing IV.
    """
    key = _bytes(key, "key")
    data = _bytes(data, "data")
    iv = _optional_bytes(iv, "IV")
    aad = _optional_bytes(aad, "additional data")
    tag = _optional_bytes(tag, "tag")

    if algorithm in CHACHA_ALGORITHMS:
        return _chacha_decrypt(key, algorithm, mode, data, iv, padding, aad, tag)
    if mode in _KEY_WRAP_MODES:
        _check_unused(mode, aad, tag)
        if iv or not _no_padding(padding):
            raise CryptoError(f"{_name(mode)} takes no IV and no padding")
        return unwrap_key(_aes_wrapping_key(key, algorithm), data, mode)

    if mode in STREAM_MODES:
        # GCM, CTR, CBC and ECB: the multi-part cipher, in one part.
        if mode != BlockCipherMode.GCM:
            _check_unused(mode, aad, tag)
        if mode in _PADDED_MODES and len(data) % _block_bytes(key, algorithm):
            raise CryptoError("data length is not a multiple of the block size")
        if mode == BlockCipherMode.GCM and (tag is None or len(tag) not in _GCM_TAG_LENGTHS):
            raise CryptoError("GCM tag must be 12 to 16 bytes")
        stream = CipherStream(key, algorithm, mode, decrypting=True, iv=iv, padding=padding, aad=aad)
        plaintext = stream.update(data)
        return plaintext + stream.finalize(tag)[0]

    if mode not in _IV_MODES:
        raise CryptoError(f"block cipher mode {_name(mode)} is not supported")
    # XTS: a whole sector at a time.
    _check_unused(mode, aad, tag)
    if iv is None:
        raise CryptoError(f"{_name(mode)} needs the IV used to encrypt")
    if not _no_padding(padding):
        raise CryptoError(f"{_name(mode)} takes no padding")
    cipher = _mode_cipher(key, algorithm, mode, iv)
    try:
        decryptor = cipher.decryptor()
        return decryptor.update(data) + decryptor.finalize()
    except _LIBRARY_ERRORS:
        raise CryptoError(f"{_name(mode)} decryption failed") from None


# Modes a multi-part (streaming) Encrypt or Decrypt may use: those whose
# cipher context takes the data in parts. XTS and the key wraps work on a
# whole message; ChaCha20-Poly1305 is one-shot in this library.
STREAM_MODES = (BlockCipherMode.GCM, BlockCipherMode.CTR, BlockCipherMode.CBC, BlockCipherMode.ECB)


class CipherStream:
    """One multi-part symmetric encryption or decryption (KMIP 1.3+ Init
    Indicator, Correlation Value, Final Indicator): `update` takes each
    part and returns what it can already give, `finalize` the rest and, for
    GCM encryption, the tag. The same ciphertext as `encrypt` of the whole
    data, part by part. A GCM decryption checks its tag only in `finalize`:
    the plaintext of earlier parts is not authenticated yet when it leaves.
    """

    def __init__(
        self,
        key: bytes,
        algorithm: CryptographicAlgorithm,
        mode: BlockCipherMode,
        *,
        decrypting: bool,
        iv: bytes | None = None,
        padding: PaddingMethod | None = None,
        aad: bytes | None = None,
        tag_length: int | None = None,
    ):
        key = _bytes(key, "key")
        iv = _optional_bytes(iv, "IV")
        aad = _optional_bytes(aad, "additional data")
        if algorithm in CHACHA_ALGORITHMS or mode not in STREAM_MODES:
            raise CryptoError(
                f"multi-part {'decryption' if decrypting else 'encryption'} in "
                f"{_name(mode) if mode is not None else algorithm.name} is not supported; "
                "use GCM, CTR, CBC or ECB"
            )
        self.decrypting = decrypting
        self._padder = self._unpadder = None
        self.tag_length = None
        if mode == BlockCipherMode.GCM:
            if algorithm != CryptographicAlgorithm.AES:
                raise CryptoError("GCM is only for AES")
            if not _no_padding(padding):
                raise CryptoError("GCM takes no padding")
            if iv is None:
                if decrypting:
                    raise CryptoError("GCM needs the IV used to encrypt")
                iv = secrets.token_bytes(_GCM_DEFAULT_IV_LENGTH)
            _check_gcm_iv(iv)
            self.tag_length = 16 if tag_length is None else tag_length
            if self.tag_length not in _GCM_TAG_LENGTHS:
                raise CryptoError("GCM tag length must be 12 to 16 bytes")
            cipher = Cipher(_block_algorithm(key, algorithm), modes.GCM(iv, min_tag_length=12))
        else:
            _check_unused(mode, aad, tag_length)
            if mode != BlockCipherMode.ECB and iv is None:
                if decrypting:
                    raise CryptoError(f"{_name(mode)} needs the IV used to encrypt")
                iv = secrets.token_bytes(_block_bytes(key, algorithm))
            cipher = _mode_cipher(key, algorithm, mode, iv)
            if mode in _PADDED_MODES:
                padder = _padder(padding, cipher.algorithm.block_size)
                if padder is not None:
                    if decrypting:
                        self._unpadder = padder.unpadder()
                    else:
                        self._padder = padder.padder()
            elif not _no_padding(padding):
                raise CryptoError(f"{_name(mode)} takes no padding")
        self.mode = mode
        self.iv = iv if mode != BlockCipherMode.ECB else None
        try:
            self._context = cipher.decryptor() if decrypting else cipher.encryptor()
        except _LIBRARY_ERRORS:
            raise CryptoError(f"{_name(mode)} set-up failed") from None
        if aad:
            self._context.authenticate_additional_data(aad)

    def update(self, data: bytes) -> bytes:
        data = _bytes(data, "data")
        try:
            if self._padder is not None:
                data = self._padder.update(data)
            out = self._context.update(data)
            return self._unpadder.update(out) if self._unpadder is not None else out
        except _LIBRARY_ERRORS:
            raise CryptoError(f"{_name(self.mode)} {'decryption' if self.decrypting else 'encryption'} failed") from None

    def finalize(self, tag: bytes | None = None) -> tuple[bytes, bytes | None]:
        """The last output and, for GCM encryption, the tag. A GCM
        decryption needs `tag`; a wrong one raises CryptoError."""
        tag = _optional_bytes(tag, "tag")
        try:
            if self.mode == BlockCipherMode.GCM and self.decrypting:
                if tag is None or len(tag) not in _GCM_TAG_LENGTHS:
                    raise CryptoError("GCM tag must be 12 to 16 bytes")
                return self._context.finalize_with_tag(tag), None
            out = b""
            if self._padder is not None:
                out = self._context.update(self._padder.finalize())
            out += self._context.finalize()
            if self._unpadder is not None:
                out = self._unpadder.update(out) + self._unpadder.finalize()
        except InvalidTag:
            raise CryptoError("authentication failed") from None
        except ValueError:
            if self._unpadder is not None:
                raise CryptoError("invalid padding, or the data does not end on a whole block") from None
            raise CryptoError("the data does not end on a whole block") from None
        except _LIBRARY_ERRORS:
            raise CryptoError(f"{_name(self.mode)} {'decryption' if self.decrypting else 'encryption'} failed") from None
        if self.mode == BlockCipherMode.GCM:
            return out, self._context.tag[: self.tag_length]
        return out, None


def _block_bytes(key: bytes, algorithm: CryptographicAlgorithm) -> int:
    return _block_algorithm(key, algorithm).block_size // 8


def _check_gcm_iv(iv: bytes) -> None:
    if not 8 <= len(iv) <= 128:
        raise CryptoError("GCM IV must be 8 to 128 bytes")


# -- key wrapping (KMIP 1.4, 2.1.5 Key Wrapping Specification) ---------------


def wrap_key(
    wrapping_key: bytes, key_to_wrap: bytes, mode: BlockCipherMode | None = None
) -> bytes:
    """Wrap key bytes with an AES key.

    NIST_KEY_WRAP is RFC 3394 (input a multiple of 8 bytes, at least 16);
    AES_KEY_WRAP_PADDING is RFC 5649. Without a mode, RFC 3394 is used when
    the input allows it and RFC 5649 otherwise.
    """
    wrapping_key = _aes_wrapping_key(_bytes(wrapping_key, "wrapping key"), None)
    key_to_wrap = _bytes(key_to_wrap, "key to wrap")
    if mode is None:
        aligned = len(key_to_wrap) >= 16 and len(key_to_wrap) % 8 == 0
        mode = (
            BlockCipherMode.NIST_KEY_WRAP
            if aligned
            else BlockCipherMode.AES_KEY_WRAP_PADDING
        )
    try:
        if mode == BlockCipherMode.NIST_KEY_WRAP:
            return keywrap.aes_key_wrap(wrapping_key, key_to_wrap)
        if mode == BlockCipherMode.AES_KEY_WRAP_PADDING:
            if not key_to_wrap:
                raise CryptoError("key to wrap is empty")
            return keywrap.aes_key_wrap_with_padding(wrapping_key, key_to_wrap)
    except _LIBRARY_ERRORS:
        raise CryptoError(
            "key to wrap must be a multiple of 8 bytes, at least 16"
        ) from None
    raise CryptoError(f"key wrap mode {_name(mode)} is not supported")


def unwrap_key(
    wrapping_key: bytes, wrapped_key: bytes, mode: BlockCipherMode | None = None
) -> bytes:
    """Unwrap key bytes wrapped by :func:`wrap_key`; raises if the check fails.

    Without a mode both RFC 3394 and RFC 5649 are tried; their integrity
    check values differ, so at most one can succeed.
    """
    wrapping_key = _aes_wrapping_key(_bytes(wrapping_key, "wrapping key"), None)
    wrapped_key = _bytes(wrapped_key, "wrapped key")
    if mode is None:
        candidates = _KEY_WRAP_MODES
    elif mode in _KEY_WRAP_MODES:
        candidates = (mode,)
    else:
        raise CryptoError(f"key wrap mode {_name(mode)} is not supported")
    for candidate in candidates:
        unwrap = (
            keywrap.aes_key_unwrap
            if candidate == BlockCipherMode.NIST_KEY_WRAP
            else keywrap.aes_key_unwrap_with_padding
        )
        try:
            return unwrap(wrapping_key, wrapped_key)
        except (keywrap.InvalidUnwrap, *_LIBRARY_ERRORS):
            continue
    raise CryptoError("key unwrap failed")


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


# -- MAC (KMIP 1.4, 4.33 MAC / 4.34 MAC Verify) ------------------------------


def _hmac(key: Any, algorithm: CryptographicAlgorithm, data: Any) -> Any:
    try:
        hashing = _HMAC_HASHES[algorithm]
    except (KeyError, TypeError):
        raise CryptoError(
            f"MAC algorithm {_name(algorithm)} is not supported"
        ) from None
    key = _bytes(key, "key")
    if not key:
        raise CryptoError("MAC key is empty")
    h = _crypto_hmac.HMAC(key, _hash(hashing))
    h.update(_bytes(data, "data"))
    return h


def mac(key: bytes, algorithm: CryptographicAlgorithm, data: bytes) -> bytes:
    """Compute an HMAC (HMAC_SHA1, _SHA224, _SHA256, _SHA384, _SHA512, SHA-3)."""
    return _hmac(key, algorithm, data).finalize()


def mac_verify(
    key: bytes, algorithm: CryptographicAlgorithm, data: bytes, mac_data: bytes
) -> None:
    """Check an HMAC in constant time; raises MacInvalid on mismatch."""
    h = _hmac(key, algorithm, data)
    try:
        h.verify(_bytes(mac_data, "MAC data"))
    except InvalidSignature:
        raise MacInvalid("MAC does not match") from None


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
