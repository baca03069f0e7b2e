"""The Unique Identifiers the keystore gives new objects.

A UUID of version 7 (RFC 9562, 5.7): 48 bits of Unix time in milliseconds,
then 74 random bits (`os.urandom`), in the canonical 36-character form.
Identifiers made later sort after those made earlier (those made within one
millisecond in any order), so a new object's rows go next to the newest
ones in every index keyed by its identifier (the objects' `uid`, the
attribute rows' `(uid, name, value_digest)`, the audit trail's `uid`)
rather than at a random place in each: fewer pages written per Create and
fewer read into the cache (docs/storage-schema.md, "Unique Identifiers").
Until 2026-12 they were random (version 4); both kinds are stored alike,
and nothing reads the time back out of one.

74 random bits a millisecond keep identifiers unique beyond any chance of
collision between a node's processes or a cluster's nodes; the database's
unique index refuses one anyway. What an identifier tells whoever holds it
is when its object was made, to the millisecond: that is in the object's
Initial Date too (to the second), which anyone allowed to read it sees.
"""

from __future__ import annotations

import os
import time
import uuid

__all__ = ["new_uid"]

_VERSION = 7
_VARIANT = 0b10  # RFC 9562, 4.1


def new_uid(unix_ms: int | None = None) -> str:
    """A new object's Unique Identifier, made at `unix_ms` (milliseconds
    since 1970; now by default)."""
    ms = time.time_ns() // 1_000_000 if unix_ms is None else unix_ms
    if not 0 <= ms < 1 << 48:
        raise ValueError(f"time {ms} ms is outside what a version 7 UUID holds")
    random = int.from_bytes(os.urandom(10), "big")  # 80 bits, 74 used
    rand_a = random >> 68  # 12 bits
    rand_b = random & ((1 << 62) - 1)  # 62 bits
    value = (ms << 80) | (_VERSION << 76) | (rand_a << 64) | (_VARIANT << 62) | rand_b
    return str(uuid.UUID(int=value))
