"""Key derivation (KMIP 1.4, 4.6 Derive Key): PBKDF2, HMAC, HKDF, a hash,
and NIST SP 800-108 in counter mode. Derivation by Encrypt is the ciphers'
`encrypt` of the Derivation Data; the operation does that itself."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from kmip.core.enums import HashingAlgorithm

from kms_server.keystore.crypto.base import _LIBRARY_ERRORS, CryptoError, _bytes, _hash, _optional_bytes

# The most a derivation may ask: 8192-bit output, a million PBKDF2
# iterations (about a second of one core with SHA-256).
MAX_DERIVED_BYTES = 1024
MAX_ITERATIONS = 1_000_000
# RFC 8018, A.2: PBKDF2's default pseudorandom function is HMAC-SHA-1.
PBKDF2_DEFAULT_HASH = HashingAlgorithm.SHA_1


def _check_length(length: int) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= MAX_DERIVED_BYTES:
        raise CryptoError(f"a derived key is 1 to {MAX_DERIVED_BYTES} bytes")


def pbkdf2(password: bytes, length: int, salt: bytes, iterations: int, hashing: HashingAlgorithm | None = None) -> bytes:
    """PBKDF2 (RFC 8018) with HMAC of `hashing` (default SHA-1)."""
    _check_length(length)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or not 1 <= iterations <= MAX_ITERATIONS:
        raise CryptoError(f"the Iteration Count must be from 1 to {MAX_ITERATIONS}")
    kdf = PBKDF2HMAC(_hash(hashing or PBKDF2_DEFAULT_HASH), length, _bytes(salt, "salt"), iterations)
    try:
        return kdf.derive(_bytes(password, "base key"))
    except _LIBRARY_ERRORS:
        raise CryptoError("PBKDF2 failed") from None


def hmac_derive(key: bytes, data: bytes, length: int, hashing: HashingAlgorithm) -> bytes:
    """HMAC(key, data), its first `length` bytes; no more than the digest."""
    _check_length(length)
    algorithm = _hash(hashing)
    if length > algorithm.digest_size:
        raise CryptoError(f"HMAC derivation gives at most {algorithm.digest_size} bytes with {hashing.name}")
    key = _bytes(key, "base key")
    if not key:
        raise CryptoError("the base key is empty")
    mac = _crypto_hmac.HMAC(key, algorithm)
    mac.update(_bytes(data, "derivation data"))
    return mac.finalize()[:length]


def hkdf(key: bytes, length: int, hashing: HashingAlgorithm, salt: bytes | None = None, info: bytes | None = None) -> bytes:
    """HKDF (RFC 5869): extract with `salt`, expand with `info`."""
    _check_length(length)
    kdf = HKDF(_hash(hashing), length, _optional_bytes(salt, "salt"), _optional_bytes(info, "derivation data"))
    try:
        return kdf.derive(_bytes(key, "base key"))
    except _LIBRARY_ERRORS:
        raise CryptoError(f"HKDF gives at most {255 * _hash(hashing).digest_size} bytes") from None


def hash_derive(data: bytes, length: int, hashing: HashingAlgorithm) -> bytes:
    """The digest of `data`, its first `length` bytes."""
    _check_length(length)
    digest = hashes.Hash(_hash(hashing))
    digest.update(_bytes(data, "derivation data"))
    out = digest.finalize()
    if length > len(out):
        raise CryptoError(f"hash derivation gives at most {len(out)} bytes with {hashing.name}")
    return out[:length]


def kbkdf_counter(key: bytes, length: int, hashing: HashingAlgorithm, fixed: bytes) -> bytes:
    """NIST SP 800-108 in counter mode with HMAC of `hashing`: a 32-bit
    counter before the fixed input data, which is the Derivation Data."""
    _check_length(length)
    fixed = _bytes(fixed, "derivation data")
    if not fixed:
        raise CryptoError("NIST SP 800-108 derivation needs Derivation Data (its fixed input)")
    kdf = KBKDFHMAC(_hash(hashing), Mode.CounterMode, length, 4, None, CounterLocation.BeforeFixed, None, None, fixed)
    try:
        return kdf.derive(_bytes(key, "base key"))
    except _LIBRARY_ERRORS:
        raise CryptoError("NIST SP 800-108 derivation failed") from None
