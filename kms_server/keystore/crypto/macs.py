"""HMAC (KMIP MAC and MAC Verify)."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hmac as _crypto_hmac
from kmip.core.enums import CryptographicAlgorithm

from kms_server.keystore.crypto.base import (
    _HMAC_HASHES,
    CryptoError,
    MacInvalid,
    _bytes,
    _hash,
    _name,
    _refuse_generate_only,
)

# -- MAC (KMIP 1.4, 4.33 MAC / 4.34 MAC Verify) ------------------------------


def _hmac(key: Any, algorithm: CryptographicAlgorithm, data: Any) -> Any:
    _refuse_generate_only(algorithm)
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
