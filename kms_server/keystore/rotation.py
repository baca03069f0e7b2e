"""Master-key rotation while nodes serve (docs/at-rest-sealing.md).

1. `begin`: a new data key (term) joins the keyring and becomes active; the
   keyring is stored wrapped under both the old and the new master key, so
   nodes still configured with the old one keep opening it (they re-read
   it within keystore/barrier.REFRESH_SECONDS and seal new material under
   the new term from then on).
2. `reseal_batch`, until it reports nothing left: objects still under the
   old term are re-sealed under the new one in small transactions (the
   material is decrypted and encrypted again in memory only; a row MAC is
   made under the new term). A crash loses nothing: rows carry their term,
   so running the command again goes on where it stopped.
3. `finish`, once every node runs with the new master key: the old term and
   the keyring copy under the old master key are dropped. Backups made
   before keep their own keyring, so the old master key still restores them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from kmip_core.sealing.barrier import Barrier, BarrierError, Keyring, read_keyring, write_keyring
from kmip_core.sealing.master_key import MasterKey
from kms_server.keystore import row_auth
from kms_server.storage.base import ConcurrentModification, Storage, iter_objects

__all__ = ["RotationError", "RotationState", "begin", "finish", "pending", "reseal_batch"]


class RotationError(Exception):
    """The rotation cannot go on; the message says why and what to do."""


@dataclass(frozen=True)
class RotationState:
    keyring: Keyring
    old_term: int | None
    new_term: int
    resumed: bool


def _open(txn, old: MasterKey, new: MasterKey) -> Keyring:
    errors = []
    for master in (old, new):
        try:
            ring = read_keyring(txn, master)
        except BarrierError as exc:
            errors.append(str(exc))
            continue
        if ring is None:
            raise RotationError("the database has no keyring yet: start kms-server on it once, then rotate")
        return ring
    raise RotationError(errors[0])


def begin(storage: Storage, old: MasterKey, new: MasterKey) -> RotationState:
    """Start a rotation to `new`, or resume the one in progress."""
    if old.key_id == new.key_id:
        raise RotationError("the new master key is the one configured now; give a different key")
    with storage.transaction() as txn:
        ring = _open(txn, old, new)
        if ring.rotating_from is not None:
            # Resumed: make sure both masters open the keyring.
            write_keyring(txn, ring, [old, new])
            return RotationState(ring, ring.rotating_from, ring.active, resumed=True)
        term = max(ring.terms) + 1
        ring.terms[term] = os.urandom(32)
        ring.rotating_from, ring.active = ring.active, term
        write_keyring(txn, ring, [old, new])
        return RotationState(ring, ring.rotating_from, term, resumed=False)


def pending(storage: Storage, barrier: Barrier) -> list[str]:
    """Objects whose material or row MAC is under a term other than the
    active one."""
    with storage.transaction(read_only=True) as txn:
        return [stored.uid for stored in iter_objects(txn) if _needs_reseal(barrier, stored)]


def _needs_reseal(barrier: Barrier, stored) -> bool:
    active = barrier.active_term
    if stored.row_mac is not None and barrier.mac_term(stored.row_mac) != active:
        return True
    return stored.sealed_material is not None and barrier.blob_term(stored.sealed_material) != active


def reseal_batch(storage: Storage, barrier: Barrier, uids: list[str]) -> tuple[int, list[tuple[str, str]]]:
    """Re-seal `uids` in one transaction. Returns (re-sealed, refused):
    a row that fails its integrity check is never re-sealed (that would
    launder it) but reported."""
    done, refused = 0, []
    with storage.transaction() as txn:
        for uid in uids:
            stored = txn.get_object(uid, for_update=True)
            if stored is None or not _needs_reseal(barrier, stored):
                continue
            try:
                mac = row_auth.verify(barrier, stored)
                material = None if stored.sealed_material is None else barrier.unseal(uid, stored.sealed_material)
            except (row_auth.RowIntegrityError, BarrierError) as exc:
                refused.append((uid, getattr(exc, "problem", str(exc))))
                continue
            before = row_auth.element(barrier, uid, stored.version, mac)
            if material is not None:
                stored.sealed_material = barrier.seal(uid, material)
            version = stored.version + 1
            mac = row_auth.sign(barrier, stored, version)
            try:
                txn.update_object(stored)
            except ConcurrentModification:
                continue  # A node changed it meanwhile; the next pass sees it again.
            row_auth.apply(txn, barrier, [before], [row_auth.element(barrier, uid, version, mac)])
            done += 1
    return done, refused


def finish(storage: Storage, master: MasterKey, barrier_for: Callable[[Keyring], Barrier]) -> Keyring:
    """End the rotation: refuse while an object is still under the old
    term; otherwise keep only the active term, wrapped under `master`."""
    with storage.transaction() as txn:
        ring = read_keyring(txn, master)
        if ring is None:
            raise RotationError("the database has no keyring")
        if ring.rotating_from is None:
            raise RotationError("no master-key rotation is in progress")
    left = pending(storage, barrier_for(ring))
    if left:
        raise RotationError(
            f"{len(left)} objects are still under the old data key; run 'kms-admin master-key rotate' again first"
        )
    with storage.transaction() as txn:
        ring = read_keyring(txn, master)
        if ring is None:
            raise RotationError("the database has no keyring")
        old = ring.rotating_from
        ring.terms = {t: k for t, k in ring.terms.items() if t == ring.active}
        ring.rotating_from = None
        if ring.legacy_term == old:
            ring.legacy_term = None
        write_keyring(txn, ring, [master])
    return ring
