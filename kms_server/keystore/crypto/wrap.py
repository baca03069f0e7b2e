"""AES key wrap (RFC 3394, RFC 5649) for Key Wrapping Specifications and
the key-wrap modes of Encrypt and Decrypt."""

from __future__ import annotations

from cryptography.hazmat.primitives import keywrap
from kmip.core.enums import BlockCipherMode, CryptographicAlgorithm

from kms_server.keystore.crypto.base import (
    _AES_KEY_LENGTHS,
    _LIBRARY_ERRORS,
    CryptoError,
    _bytes,
    _name,
)

_KEY_WRAP_MODES = (BlockCipherMode.NIST_KEY_WRAP, BlockCipherMode.AES_KEY_WRAP_PADDING)


def _aes_wrapping_key(key: bytes, algorithm: CryptographicAlgorithm | None) -> bytes:
    if algorithm not in (None, CryptographicAlgorithm.AES):
        raise CryptoError("key wrap modes are only for AES")
    if len(key) not in _AES_KEY_LENGTHS:
        raise CryptoError("AES key must be 128, 192 or 256 bits")
    return key



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
    candidates: tuple[BlockCipherMode, ...]
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
