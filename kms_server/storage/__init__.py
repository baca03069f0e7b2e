"""Storage backends behind one contract (see base.py)."""

from __future__ import annotations

from kms_server.storage.base import (
    AuditQuery,
    ConcurrentModification,
    LocateQuery,
    ObjectExists,
    Storage,
    StorageError,
    StoredAttribute,
    StoredAuditRecord,
    StoredCheckpoint,
    StoredObject,
    Transaction,
)

__all__ = [
    "AuditQuery",
    "ConcurrentModification",
    "LocateQuery",
    "ObjectExists",
    "Storage",
    "StorageError",
    "StoredAttribute",
    "StoredAuditRecord",
    "StoredCheckpoint",
    "StoredObject",
    "Transaction",
    "open_storage",
]

MEMORY_URL = "memory://"


def open_storage(db_url: str, schema: str = "upgrade") -> Storage:
    """The backend a URL names: `memory://` (the in-process fake, empty on
    every call), `sqlite:///path/to/file.db` or
    `postgresql+psycopg://user@host/dbname`."""
    if db_url == MEMORY_URL:
        from kms_server.storage.memory import MemoryStorage

        return MemoryStorage()
    # Imported here so that the fake works without a database driver.
    from kms_server.storage.sql import SqlStorage

    return SqlStorage(db_url, schema=schema)
