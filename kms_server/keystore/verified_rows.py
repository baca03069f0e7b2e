"""The rows this process has authenticated, kept to spare a later read of
the same row its MAC check, its building and its decoding (issue 15).

The invalidation rule (docs/process-model.md): an entry is used only when
the object's row and attribute rows, read in the request's own transaction
as without the cache, are the entry's byte for byte (version, MAC, owner,
sealed material, every attribute's name, index and value: storage compares
them, `Transaction.get_object(held=...)`). A change made by any process or
node (a new State, a destroyed key, another owner) changes the rows, so the
read misses and the row is authenticated whole. Nothing needs to be told of
a change, so no message can be missed; and an edit made outside the server
is refused as before, since the rows read are no longer the entry's.

An entry holds only what the row holds: the material stays sealed. Entries
come from rows read and verified, and from rows this process wrote and
signed itself; an entry for a write that was then rolled back is harmless,
as no stored row holds its bytes. A held row whose MAC names a data key the
keyring no longer holds is authenticated again (and so refused).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from kmip_core.ttlv import Item
from kms_server.keystore.objects import decode_attributes
from kms_server.storage.base import StoredObject

# Entries per process by default: about 4.5 KB each for a key with 16
# attributes, stored and decoded (measured with tracemalloc), so about
# 37 MB per process when full.
DEFAULT_SIZE = 8192


def _name_index(a: Any) -> tuple[str, int]:
    return a.name, a.index


class VerifiedRows:
    """A bounded map, least recently used first out, from unique identifier
    to the row last authenticated for it. Shared by the threads of one
    process (the reactor and the pool)."""

    def __init__(self, size: int = DEFAULT_SIZE):
        if size < 0:
            raise ValueError("the size of the verified rows' cache cannot be negative")
        self.size = size
        self._rows: OrderedDict[str, tuple[StoredObject, dict[str, tuple[Item, ...]] | None]] = OrderedDict()
        self._lock = threading.Lock()
        # Called with True for a read the cache served, False for one that
        # read the row whole (the node's metrics).
        self.on_read: Callable[[bool], None] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, uid: str) -> StoredObject | None:
        with self._lock:
            entry = self._rows.get(uid)
            if entry is None:
                return None
            self._rows.move_to_end(uid)
            return entry[0]

    def put(self, stored: StoredObject) -> None:
        """Keep `stored`, authenticated (verified or signed here) at its
        version. It must not be changed afterwards: callers hand over a row
        they no longer write to."""
        if self.size == 0 or stored.row_mac is None:
            return
        # In (name, index) order, as a row read is (a written one is in
        # the order of its attributes): storage compares them in that order.
        stored.attributes.sort(key=_name_index)
        with self._lock:
            self._rows[stored.uid] = (stored, None)
            self._rows.move_to_end(stored.uid)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def count(self, hit: bool) -> None:
        if self.on_read is not None:
            self.on_read(hit)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._rows.pop(uid, None)

    def attributes(self, stored: StoredObject) -> dict[str, list[Item]]:
        """`stored`'s attributes decoded, as ManagedObject.from_stored
        decodes them, in lists of the caller's own; decoded once per entry."""
        with self._lock:
            entry = self._rows.get(stored.uid)
        decoded = entry[1] if entry is not None and entry[0] is stored else None
        if decoded is None:
            decoded = {name: tuple(values) for name, values in decode_attributes(stored).items()}
            with self._lock:
                entry = self._rows.get(stored.uid)
                if entry is not None and entry[0] is stored:
                    self._rows[stored.uid] = (stored, decoded)
        return {name: list(values) for name, values in decoded.items()}
