"""The at-rest barrier: key material is sealed before it reaches storage.

Format of a sealed blob (docs/at-rest-sealing.md): version byte 0x01, a 12-byte
random nonce, then AES-256-GCM ciphertext and 16-byte tag. The associated
data binds the blob to its object's unique identifier, so a blob copied onto
another object's row does not open.

The master key comes from a key file (64 hex characters, `kms-admin
master-key new`) or from a passphrase file through scrypt, a memory-hard KDF,
with a salt kept in storage. A check record sealed at first start detects a
wrong master key before any request is served.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from kms_server.storage.base import Storage

VERSION = 1
NONCE_SIZE = 12
SALT_META = "barrier.scrypt_salt"
CHECK_META = "barrier.check"
_CHECK_ID = "barrier-check"
_CHECK_PLAINTEXT = b"kms-server master key check v1"
# scrypt cost: 2**16 * 8 * 128 bytes = 64 MiB per derivation, done once at start.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**16, 8, 1


class BarrierError(Exception):
    """The master key is missing, malformed or wrong, or a blob is corrupt."""


def _aad(uid: str) -> bytes:
    return b"kms-object:" + uid.encode("utf-8")


class Barrier:
    def __init__(self, master_key: bytes):
        if len(master_key) != 32:
            raise BarrierError("master key must be 32 bytes")
        self._aead = AESGCM(master_key)

    def seal(self, uid: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return bytes([VERSION]) + nonce + self._aead.encrypt(nonce, plaintext, _aad(uid))

    def unseal(self, uid: str, blob: bytes) -> bytes:
        if len(blob) < 1 + NONCE_SIZE + 16 or blob[0] != VERSION:
            raise BarrierError(f"sealed material of object {uid} is malformed")
        nonce, body = blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :]
        try:
            return self._aead.decrypt(nonce, body, _aad(uid))
        except InvalidTag:
            raise BarrierError(f"sealed material of object {uid} does not open under this master key") from None


def read_key_file(path: str | Path) -> bytes:
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise BarrierError(f"cannot read master key file {path}: {exc.strerror}") from None
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise BarrierError(
            f"master key file {path} must hold 64 hex characters; make one with 'kms-admin master-key new --out {path}'"
        )
    return key


def read_passphrase_file(path: str | Path) -> bytes:
    """The passphrase in a file (one trailing newline ignored), at least 12
    bytes long."""
    try:
        passphrase = Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as exc:
        raise BarrierError(f"cannot read passphrase file {path}: {exc.strerror}") from None
    if len(passphrase) < 12:
        raise BarrierError(f"passphrase in {path} is shorter than 12 characters")
    return passphrase


def opens_check_record(barrier: Barrier, check: bytes) -> bool:
    """True if `barrier`'s master key is the one that sealed the store's
    check record."""
    try:
        return barrier.unseal(_CHECK_ID, check) == _CHECK_PLAINTEXT
    except BarrierError:
        return False


def derive_from_passphrase(passphrase: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase)


def open_barrier(storage: Storage, key_file: str | None = None, passphrase_file: str | None = None) -> Barrier:
    """The barrier for this store; on first use records the salt and the
    check record, afterwards verifies that the master key is the same."""
    with storage.transaction() as txn:
        if key_file:
            key = read_key_file(key_file)
        elif passphrase_file:
            passphrase = read_passphrase_file(passphrase_file)
            salt = txn.get_meta(SALT_META)
            if salt is None:
                salt = os.urandom(16)
                txn.set_meta(SALT_META, salt)
            key = derive_from_passphrase(passphrase, salt)
        else:
            raise BarrierError("no master key configured: set master_key.file or master_key.passphrase_file")
        barrier = Barrier(key)
        check = txn.get_meta(CHECK_META)
        if check is None:
            txn.set_meta(CHECK_META, barrier.seal(_CHECK_ID, _CHECK_PLAINTEXT))
        else:
            if not opens_check_record(barrier, check):
                raise BarrierError("the master key does not open this database (wrong key file or passphrase)")
    return barrier
