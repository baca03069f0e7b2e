"""The cryptography of `kms-admin backup` (docs/backup-format.md), next to
the barrier: the keystore is where `cryptography` is used."""

from __future__ import annotations

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HKDF_INFO = b"kms-server backup v1"
_KIND_CHUNK, _KIND_FINAL_CHUNK, _KIND_KEY_CHECK, _KIND_HEADER = 0x00, 0x01, 0x02, 0x03
_KEY_CHECK_AAD = b"kms-server backup key check"


class ChunkInvalid(Exception):
    """A chunk, the key check or the header tag does not authenticate."""


class BackupCipher:
    """AES-256-GCM under HKDF-SHA256(master key, salt, "kms-server backup v1").

    The key is new for every backup (fresh salt), so nonces are counters:
    kind || 000000 || index. The kind says data chunk, final data chunk, key
    check or header tag, so no two uses of the key share a nonce.
    """

    def __init__(self, master_key: bytes, salt: bytes):
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=HKDF_INFO).derive(master_key)
        self._aead = AESGCM(key)

    @staticmethod
    def _nonce(kind: int, index: int) -> bytes:
        return bytes([kind, 0, 0, 0]) + index.to_bytes(8, "big")

    def key_check(self) -> bytes:
        """A tag that depends on the key alone: tells a wrong master key
        apart from an altered header."""
        return self._aead.encrypt(self._nonce(_KIND_KEY_CHECK, 0), b"", _KEY_CHECK_AAD)

    def header_tag(self, header: bytes) -> bytes:
        return self._aead.encrypt(self._nonce(_KIND_HEADER, 0), b"", header)

    def seal(self, index: int, final: bool, plaintext: bytes, aad: bytes) -> bytes:
        kind = _KIND_FINAL_CHUNK if final else _KIND_CHUNK
        return self._aead.encrypt(self._nonce(kind, index), plaintext, aad)

    def open(self, index: int, final: bool, sealed: bytes, aad: bytes) -> bytes:
        kind = _KIND_FINAL_CHUNK if final else _KIND_CHUNK
        try:
            return self._aead.decrypt(self._nonce(kind, index), sealed, aad)
        except InvalidTag:
            raise ChunkInvalid from None
