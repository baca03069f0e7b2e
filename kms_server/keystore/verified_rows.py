"""The rows this process has authenticated, kept to spare a later read of
the same row its MAC check, and, while no object has changed anywhere,
the read itself (issue 15).

The invalidation rule (docs/process-model.md): an entry is used only when
the request's own transaction shows it current, in one of two ways:

- the object's row and attribute rows, read in that transaction as
  without the cache, are the entry's byte for byte (version, MAC, owner,
  sealed material, every attribute's name, index and value: storage
  compares them, `Transaction.get_object(held=...)`); or
- in a transaction whose reads see one snapshot (`Transaction.snapshot_reads`:
  SQLite's read transactions), the store digest it reads is the one the
  entry was authenticated under, less than `RECHECK_SECONDS` ago
  (`get_current`). Every write of an object, by any process or node, moves
  the store digest in its own transaction (keystore/row_auth.py): the
  digest sums a keyed hash of each row's uid, version and MAC, and a write
  raises the row's version. An unchanged digest is an unchanged set of
  rows.

A change made by any process or node (a new State, a destroyed key,
another owner) changes the rows and the digest, so the read misses and the
row is authenticated whole. Nothing needs to be told of a change, so no
message can be missed. An edit made outside the server that leaves the
store digest as it was is read whole, and refused, within
`RECHECK_SECONDS`, or at once after any write: until then the node answers
from the row as it authenticated it, never from the edit.

An entry holds only what the row holds: the material stays sealed. Entries
come from rows read and verified, and from rows this process wrote and
signed itself (those with no digest: the first read after the write reads
the row whole); an entry for a write that was then rolled back is
harmless, as no stored row holds its bytes. A held row whose MAC names a
data key the keyring no longer holds is authenticated again (and so
refused).
"""

from __future__ import annotations

import functools
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from kms_server.storage.base import StoredAttribute, StoredObject

# How long a row read whole stays current while the store digest does not
# move: an edit made outside the server that leaves the digest as it was
# (docs/at-rest-sealing.md) is found by the process holding the row at
# most this long after its last whole read. A key read a hundred times a
# second is read whole once a second.
RECHECK_SECONDS = 1.0

# Entries per process by default: about 4 KB each for a key with 18
# attributes (measured with tracemalloc), so about 33 MB per process when
# full.
DEFAULT_SIZE = 8192

# An entry: (owner, sealed material, version, sequence, row MAC, attributes
# as (name, index, value) in (name, index) order, the store digest the row
# was read whole under or None, when it was read whole or written). Tuples
# of str, int, float and bytes only: CPython's collector stops tracking such
# a tuple once it finds everything in it untracked (one level of tuples per
# collection, three in all, while the entry is still young), so a full cache
# adds nothing to the pauses of full collections. Kept as objects (the
# StoredObject, its attribute objects, the decoded attribute items), an
# entry was about 40 tracked objects, 330,000 for a full cache, and a full
# collection walks every tracked object, about 0.3 us each, with the GIL
# held: a stall of about 100 ms for every request in flight (issue 15).
_Entry = tuple[str, bytes | None, int, int, bytes, tuple[tuple[str, int, bytes], ...], bytes | None, float]


# An attribute row of an entry's (name, index, value) tuple: tuple.__new__
# called from C, where StoredAttribute._make is a Python call per row.
_ATTRIBUTE = functools.partial(tuple.__new__, StoredAttribute)


def _name_index(a: StoredAttribute) -> tuple[str, int]:
    return a.name, a.index


class VerifiedRows:
    """A bounded map, least recently used first out, from unique identifier
    to the row last authenticated for it. Shared by the threads of one
    process (the reactor and the pool)."""

    def __init__(self, size: int = DEFAULT_SIZE, clock: Callable[[], float] = time.monotonic):
        if size < 0:
            raise ValueError("the size of the verified rows' cache cannot be negative")
        self.size = size
        self._clock = clock
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
        return self.get_current(uid, None)[0]

    def get_current(self, uid: str, digest: bytes | None) -> tuple[StoredObject | None, bool]:
        """The row held for `uid` (as `get`), and whether it was read whole
        under the store digest `digest` less than RECHECK_SECONDS ago
        (never for None, nor for a row held as written here): with that
        digest read in the same snapshot, the row held is the stored one."""
        with self._lock:
            entry = self._rows.get(uid)
            if entry is None:
                return None, False
            self._rows.move_to_end(uid)
        current = digest is not None and entry[6] == digest and self._clock() - entry[7] < RECHECK_SECONDS
        return self._object(uid, entry), current

    @staticmethod
    def _object(uid: str, entry: _Entry) -> StoredObject:
        owner, sealed, version, sequence, row_mac, attributes, _, _ = entry
        return StoredObject(
            uid=uid,
            owner=owner,
            sealed_material=sealed,
            attributes=list(map(_ATTRIBUTE, attributes)),
            version=version,
            sequence=sequence,
            row_mac=row_mac,
        )

    def put(self, stored: StoredObject, digest: bytes | None = None) -> None:
        """Keep `stored`, authenticated (verified or signed here) at its
        version: its bytes are copied, so later changes to it are not kept.
        `digest`: the store digest read in the same snapshot as the row (a
        read transaction's; never one a write transaction may still roll
        back), or None."""
        if self.size == 0 or stored.row_mac is None:
            return
        # In (name, index) order, as a row read is: storage compares them
        # in that order (`Transaction.get_object(held=...)`).
        attributes = tuple([(a.name, a.index, a.value) for a in sorted(stored.attributes, key=_name_index)])
        entry = (
            stored.owner,
            stored.sealed_material,
            stored.version,
            stored.sequence,
            stored.row_mac,
            attributes,
            digest,
            self._clock(),
        )
        with self._lock:
            self._rows[stored.uid] = entry
            self._rows.move_to_end(stored.uid)
            while len(self._rows) > self.size:
                self._rows.popitem(last=False)

    def retag(self, stored: StoredObject, digest: bytes) -> None:
        """`stored`, held and read whole again under the store digest
        `digest` in one snapshot, is current under it (from now): the
        entry is kept as it is, if it is still that row (its version and
        MAC; another thread may have replaced it meanwhile)."""
        with self._lock:
            entry = self._rows.get(stored.uid)
            if entry is not None and entry[2] == stored.version and entry[4] == stored.row_mac:
                self._rows[stored.uid] = (*entry[:6], digest, self._clock())

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
