"""Where the master key lives.

The master key never seals objects itself: it wraps the keyring (the data
keys that do, `sealing/barrier.py`) and a backup's key. So whatever holds
it only has to wrap and unwrap short secrets:

- `AesMasterKey`: 32 bytes from a key file (64 hex characters) or derived
  from a passphrase file with scrypt (salt kept in storage); AES-256-GCM.
- a PKCS#11 token (`sealing/pkcs11_key.py`): an AES key that never leaves
  the token; wrapping runs inside it.

`sealing/opener.py`'s `open_master_key` is the single opener used by the
server, `kms-admin` (backup, restore, db verify, master-key rotate), the
broker and the tests.
"""

from __future__ import annotations

import abc
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

__all__ = [
    "AesMasterKey",
    "MasterKey",
    "MasterKeyError",
    "SALT_META",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "derive_from_passphrase",
    "read_key_file",
    "read_passphrase_file",
]

NONCE_SIZE = 12
SALT_META = "barrier.scrypt_salt"
# scrypt cost: 2**16 * 8 * 128 bytes = 64 MiB per derivation, done once at start.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**16, 8, 1


class MasterKeyError(Exception):
    """The master key is missing, malformed, unreachable or wrong."""


class MasterKey(abc.ABC):
    """A key that wraps short secrets (the keyring, a backup key).

    `key_id` names the key stably across restarts without revealing it; it
    labels what the key wrapped so that a store can hold copies wrapped
    under an old and a new master key during a rotation."""

    key_id: str
    # Shown to operators ("key file /etc/kms/master.key", "token kms/master").
    description: str

    @abc.abstractmethod
    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        """Authenticated encryption of `plaintext`, bound to `context`."""

    @abc.abstractmethod
    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        """The plaintext; raises MasterKeyError if `blob` was not wrapped by
        this key with this context, or was altered."""

    def close(self) -> None:  # noqa: B027 - optional: only a token has something to let go of
        """Let go of whatever holds the key (a token session); a no-op for
        a key held in memory."""

    def legacy_key(self) -> bytes | None:
        """The raw key, for stores made before the keyring existed (their
        objects were sealed under the master key itself). None where the
        key cannot leave its holder (a token): no such store exists."""
        return None


class AesMasterKey(MasterKey):
    """A 32-byte master key held in memory (key file or passphrase)."""

    def __init__(self, key: bytes, description: str):
        if len(key) != 32:
            raise MasterKeyError("master key must be 32 bytes")
        self._key = key
        self._aead = AESGCM(key)
        self.description = description
        self.key_id = "aes:" + hashlib.sha256(b"kms-master-key-id\x00" + key).hexdigest()[:16]

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, context)

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        if len(blob) < NONCE_SIZE + 16:
            raise MasterKeyError(f"a blob wrapped by {self.description} is truncated")
        try:
            return self._aead.decrypt(blob[:NONCE_SIZE], blob[NONCE_SIZE:], context)
        except InvalidTag:
            raise MasterKeyError(f"{self.description} does not open this blob (wrong master key, or altered)") from None

    def legacy_key(self) -> bytes | None:
        return self._key


def read_key_file(path: str | Path) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise MasterKeyError(f"cannot read master key file {path}: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise MasterKeyError(
            f"master key file {path} must hold 64 hex characters; make one with 'kms-admin master-key new --out {path}'"
        )
    return key


def read_passphrase_file(path: str | Path) -> bytes:
    """The passphrase in a file (one trailing newline ignored), at least 12
    bytes long."""
    try:
        passphrase = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise MasterKeyError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    if len(passphrase) < 12:
        raise MasterKeyError(f"passphrase in {path} is shorter than 12 characters")
    return passphrase


def derive_from_passphrase(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)
