"""Digests (KMIP Hash) and constant-time comparison."""

from __future__ import annotations

import hmac as _std_hmac

from cryptography.hazmat.primitives import hashes
from kmip.core.enums import HashingAlgorithm

from kms_server.keystore.crypto.base import _bytes, _hash


def digest(hashing: HashingAlgorithm, data: bytes) -> bytes:
    """Hash ``data`` with a KMIP Hashing Algorithm."""
    h = hashes.Hash(_hash(hashing))
    h.update(_bytes(data, "data"))
    return h.finalize()


def constant_time_eq(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time independent of where they differ."""
    return _std_hmac.compare_digest(_bytes(a, "value"), _bytes(b, "value"))
