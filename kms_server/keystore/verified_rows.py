"""The rows this process has authenticated, kept to spare a later read of
the same row its MAC check (issue 15).

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

import functools
import threading
from collections import OrderedDict
from collections.abc import Callable

from kms_server.storage.base import StoredAttribute, StoredObject

# Entries per process by default: about 4 KB each for a key with 18
# attributes (measured with tracemalloc), so about 33 MB per process when
# full.
DEFAULT_SIZE = 8192

# An entry: (owner, sealed material, version, sequence, row MAC, attributes
# as (name, index, value) in (name, index) order). Tuples of str, int and
# bytes only: CPython's collector stops tracking such a tuple once it finds
# everything in it untracked (one level of tuples per collection, three in
# all, while the entry is still young), so a full cache adds nothing to the
# pauses of full collections. Kept as objects (the StoredObject, its
# attribute objects, the decoded attribute items), an entry was about 40
# tracked objects, 330,000 for a full cache, and a full collection walks
# every tracked object, about 0.3 us each, with the GIL held: a stall of
# about 100 ms for every request in flight (issue 15).
_Entry = tuple[str, bytes | None, int, int, bytes, tuple[tuple[str, int, bytes], ...]]


# An attribute row of an entry's (name, index, value) tuple: tuple.__new__
# called from C, where StoredAttribute._make is a Python call per row.
_ATTRIBUTE = functools.partial(tuple.__new__, StoredAttribute)


def _name_index(a: StoredAttribute) -> tuple[str, int]:
    return a.name, a.index


class VerifiedRows:
    """A bounded map, least recently used first out, from unique identifier
    to the row last authenticated for it. Shared by the threads of one
    process (the reactor and the pool)."""

    def __init__(self, size: int = DEFAULT_SIZE):
        if size < 0:
            raise ValueError("the size of the verified rows' cache cannot be negative")
        self.size = size
        self._rows: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        # Called with True for a read the cache served, False for one that
        # read the row whole (the node's metrics).
        self.on_read: Callable[[bool], None] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def get(self, uid: str) -> StoredObject | None:
        """The row held for `uid`, as an object of the caller's own (built
        anew at each call: nothing the caller does to it reaches the cache)."""
        with self._lock:
            entry = self._rows.get(uid)
            if entry is None:
                return None
            self._rows.move_to_end(uid)
        owner, sealed, version, sequence, row_mac, attributes = entry
        return StoredObject(
            uid=uid,
            owner=owner,
            sealed_material=sealed,
            attributes=list(map(_ATTRIBUTE, attributes)),
            version=version,
            sequence=sequence,
            row_mac=row_mac,
        )

    def put(self, stored: StoredObject) -> None:
        """Keep `stored`, authenticated (verified or signed here) at its
        version: its bytes are copied, so later changes to it are not kept."""
        if self.size == 0 or stored.row_mac is None:
            return
        # In (name, index) order, as a row read is: storage compares them
        # in that order (`Transaction.get_object(held=...)`).
        attributes = tuple([(a.name, a.index, a.value) for a in sorted(stored.attributes, key=_name_index)])
        entry = (stored.owner, stored.sealed_material, stored.version, stored.sequence, stored.row_mac, attributes)
        with self._lock:
            self._rows[stored.uid] = entry
            self._rows.move_to_end(stored.uid)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def value(self, uid: str, name: str) -> bytes | None:
        """The stored bytes of attribute `name`'s first value in the row held
        for `uid`, None if no row or no such attribute is held. A hint of
        what the row was, not of what it is now: nothing that decides
        access or answers may rest on it."""
        with self._lock:
            entry = self._rows.get(uid)
        if entry is not None:
            for attribute in entry[5]:
                if attribute[0] == name and attribute[1] == 0:
                    return attribute[2]
        return None

    def count(self, hit: bool) -> None:
        if self.on_read is not None:
            self.on_read(hit)

    def forget(self, uid: str) -> None:
        with self._lock:
            self._rows.pop(uid, None)
