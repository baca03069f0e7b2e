"""The audit signing key: Ed25519, separate from the master key, used only
to sign checkpoints of the audit trail (docs/audit-trail.md). Next to the
barrier: the keystore is where `cryptography` is used.

Files are PEM: PKCS#8 for the private key (mode 0600), SubjectPublicKeyInfo
for the public key that auditors keep to verify offline.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey


class AuditKeyError(Exception):
    """A key file is missing, unreadable, or not an Ed25519 key."""


def key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    def __init__(self, private: Ed25519PrivateKey):
        self._private = private
        self.public = Verifier(private.public_key())
        self.key_id = self.public.key_id

    def sign(self, message: bytes) -> str:
        return self._private.sign(message).hex()


class Verifier:
    def __init__(self, public: Ed25519PublicKey):
        self._public = public
        self.key_id = key_id(public)

    def check(self, message: bytes, signature_hex: str) -> bool:
        try:
            self._public.verify(bytes.fromhex(signature_hex), message)
            return True
        except (InvalidSignature, ValueError):
            return False

    def pem(self) -> bytes:
        return self._public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def generate(private_path: Path, public_path: Path) -> Verifier:
    """Write a new key pair; refuses to overwrite either file."""
    for path in (private_path, public_path):
        if path.exists():
            raise AuditKeyError(f"{path} exists; choose another path or remove it first")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    verifier = Verifier(private.public_key())
    public_path.write_bytes(verifier.pem())
    return verifier


def load_signer(path: Path) -> Signer:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit signing key {path}: {exc.strerror}") from None
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise AuditKeyError(f"{path} is not a PEM private key (make one with: kms-admin audit key new)") from None
    if not isinstance(private, Ed25519PrivateKey):
        raise AuditKeyError(f"{path} is not an Ed25519 key (make one with: kms-admin audit key new)")
    return Signer(private)


def load_verifier(path: Path) -> Verifier:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise AuditKeyError(f"cannot read the audit public key {path}: {exc.strerror}") from None
    try:
        public = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            return load_signer(path).public
        except AuditKeyError:
            raise AuditKeyError(f"{path} is not a PEM Ed25519 public key") from None
    if not isinstance(public, Ed25519PublicKey):
        raise AuditKeyError(f"{path} is not an Ed25519 public key")
    return Verifier(public)
