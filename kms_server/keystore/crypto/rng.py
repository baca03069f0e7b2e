"""Randomness: the operating system's CSPRNG, and RNG Seed into its pool."""

from __future__ import annotations

import secrets

from kms_server.keystore.crypto.base import CryptoError, _bytes

_RANDOM_MAX_BYTES = 1 << 20


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
