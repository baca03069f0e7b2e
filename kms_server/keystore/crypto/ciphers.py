"""Symmetric encryption (Encrypt, Decrypt): AES and Triple DES block
modes, ChaCha20 and ChaCha20-Poly1305, and the multi-part CipherStream."""

from __future__ import annotations

import hmac as _std_hmac
import secrets
from collections.abc import Callable
from typing import Any, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import padding as _sym_padding
from cryptography.hazmat.primitives.ciphers import (
    AEADDecryptionContext,
    AEADEncryptionContext,
    BlockCipherAlgorithm,
    Cipher,
    algorithms,
    modes,
)
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    PaddingMethod,
)

from kms_server.keystore.crypto.base import (
    _AES_KEY_LENGTHS,
    _LIBRARY_ERRORS,
    CryptoError,
    _bytes,
    _name,
    _no_padding,
    _optional_bytes,
    _refuse_generate_only,
)
from kms_server.keystore.crypto.wrap import _KEY_WRAP_MODES, _aes_wrapping_key, unwrap_key, wrap_key

_TripleDES: Callable[[bytes], BlockCipherAlgorithm]
try:
    # Triple DES moved to the "decrepit" namespace in cryptography 43.
    from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES as _DecrepitTripleDES

    _TripleDES = _DecrepitTripleDES
except ImportError:  # pragma: no cover - cryptography < 43
    _TripleDES = algorithms.TripleDES

_GCM_DEFAULT_IV_LENGTH = 12
_GCM_TAG_LENGTHS = range(12, 17)


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
    _refuse_generate_only(algorithm)
    raise CryptoError(f"cipher {_name(algorithm)} is not supported")



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

    _refuse_generate_only(algorithm)
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

    _refuse_generate_only(algorithm)
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
        _refuse_generate_only(algorithm)
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
                padder = _padder(padding, _block_bytes(key, algorithm) * 8)
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
                # A GCM decryption's context (__init__).
                return cast(AEADDecryptionContext, self._context).finalize_with_tag(tag), None
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
            # A GCM encryption's context (__init__; a decryption returned above).
            return out, cast(AEADEncryptionContext, self._context).tag[: self.tag_length]
        return out, None


def _block_bytes(key: bytes, algorithm: CryptographicAlgorithm) -> int:
    return _block_algorithm(key, algorithm).block_size // 8


def _check_gcm_iv(iv: bytes) -> None:
    if not 8 <= len(iv) <= 128:
        raise CryptoError("GCM IV must be 8 to 128 bytes")
