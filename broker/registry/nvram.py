""".nvram generations (rollback protection): the last generation a host
reported for each VM, kept by VM UUID across re-registrations; an older one
is refused."""

from __future__ import annotations

from sqlalchemy import select, update

from broker.db import nvram_generations
from broker.registry.audit import AuditTrail
from broker.registry.model import Conflict, InvalidRequest

# .nvram generations are u64 in the file; the database column is a signed 64-bit integer.
MAX_NVRAM_GENERATION = 2**63 - 1


def check_no_history(conn, vm_uuid: str) -> None:
    """A UUID whose vTPM a host has sealed comes back only through its own
    .vmx (register): a new vTPM under it would reset rollback protection."""
    seen = conn.execute(select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)).scalar()
    if seen is not None:
        raise Conflict(
            f"VM {vm_uuid} had a vTPM (its .nvram reached generation {seen}); register its .vmx "
            "(POST /v1/vms/register) to bring it back, or create the VM under a new UUID"
        )


class NvramGenerations(AuditTrail):
    """The .nvram generation reported for each VM."""

    def nvram_generation(self, vm_uuid: str) -> int:
        """The last .nvram generation reported for the VM; 0 when none was."""
        with self.db.read() as conn:
            value = conn.execute(
                select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)
            ).scalar()
        return int(value) if value is not None else 0

    def record_nvram_generation(self, vm_uuid: str, generation: int, actor: str) -> int:
        """Remember a newer .nvram generation for the VM. A lower one than
        recorded is a Conflict (a host wrote an old state back); the same one
        again is accepted, so a repeated report is harmless."""
        if (
            isinstance(generation, bool)
            or not isinstance(generation, int)
            or not 0 <= generation <= MAX_NVRAM_GENERATION
        ):
            raise InvalidRequest(f"generation must be an integer from 0 to {MAX_NVRAM_GENERATION}")
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            stored = conn.execute(
                select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)
            ).scalar()
            if stored is not None and generation < stored:
                reason = f"generation {generation} is older than generation {stored} already recorded"
                refused = True
            else:
                refused = False
                values = dict(generation=generation, reported_by=actor, reported_at=now)
                if stored is None:
                    conn.execute(nvram_generations.insert().values(vm_uuid=vm_uuid, **values))
                else:
                    conn.execute(
                        update(nvram_generations).where(nvram_generations.c.vm_uuid == vm_uuid).values(**values)
                    )
                self._append_audit(
                    conn, actor, "nvram.generation", vm_uuid, True, f"generation {generation} (was {stored or 0})"
                )
        if refused:
            # Recorded after the refused transaction, as enroll does.
            self.record_audit(actor, "nvram.generation", vm_uuid, False, reason)
            raise Conflict(f"{reason}: a rollback of the vTPM state")
        return generation
