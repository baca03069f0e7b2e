"""Key rotation's state (broker/rotation.py drives the rotation; these
record it): a pending new KEK a host may already unwrap with, the switch to
it, and the old KEK's retirement."""

from __future__ import annotations

from sqlalchemy import select, update

from broker.db import vms
from broker.registry.audit import AuditTrail
from broker.registry.enrollment import require_trusted
from broker.registry.model import Conflict, NotFound, VmRecord
from broker.registry.vms import VM_WITH_GENERATION, vm_in, vm_record


class Rekeys(AuditTrail):
    """A VM's key rotation: its target, begin, switch, finish and abort."""

    def rekey_target(self, vm_uuid: str, instance: str | None, actor: str) -> VmRecord:
        """The VM a rotation may act on: `instance`'s own (None: any), not
        being handed over. Refusals are audited."""
        with self._refusals_audited(actor, "vm.rekey", vm_uuid), self.db.read() as conn:
            if instance is not None:
                require_trusted(conn, instance)
            vm = conn.execute(VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            if vm.released_to is not None:
                raise Conflict(f"VM {vm_uuid} is released to instance {vm.released_to}; rekey it after the migration")
            return vm_record(vm)

    def begin_rekey(
        self, vm_uuid: str, kind: str, old_kms_key_id: str, new_kms_key_id: str, new_key_safe: str, actor: str
    ) -> None:
        """Record a pending rotation: from now on the VM's host may unwrap
        with the new KEK too. Conflict if the VM changed meanwhile."""
        now = self.clock()
        with self._refusals_audited(actor, "vm.rekey", vm_uuid), self._audit_lock, self.db.begin() as conn:
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or vm.kms_key_id != old_kms_key_id or vm.rekey_state is not None:
                raise Conflict(f"VM {vm_uuid} changed while its rekey began (another rekey?); run it again")
            conn.execute(
                update(vms)
                .where(vms.c.vm_uuid == vm_uuid)
                .values(
                    rekey_kind=kind,
                    rekey_state="pending",
                    rekey_kms_key_id=new_kms_key_id,
                    rekey_key_safe=new_key_safe,
                    rekey_at=now,
                    changed_at=now,
                )
            )
            self._append_audit(
                conn,
                actor,
                "vm.rekey",
                vm_uuid,
                True,
                f"{kind} rekey begun: new KEK {new_kms_key_id} (was {old_kms_key_id})",
            )

    def switch_rekey(self, vm_uuid: str, new_key_safe: str, actor: str) -> VmRecord:
        """The pending rotation's key safe becomes the VM's; the old KEK is
        kept in the record (state "retiring") until it is deactivated."""
        now = self.clock()
        with self._refusals_audited(actor, "vm.rekey", vm_uuid), self._audit_lock, self.db.begin() as conn:
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or vm.rekey_state != "pending" or vm.rekey_key_safe != new_key_safe:
                raise Conflict(f"VM {vm_uuid} has no pending rekey to this key safe")
            conn.execute(
                update(vms)
                .where(vms.c.vm_uuid == vm_uuid)
                .values(
                    kms_key_id=vm.rekey_kms_key_id,
                    key_safe=vm.rekey_key_safe,
                    rekey_state="retiring",
                    rekey_kms_key_id=vm.kms_key_id,
                    rekey_key_safe=vm.key_safe,
                    rekey_at=now,
                    changed_at=now,
                )
            )
            self._append_audit(
                conn,
                actor,
                "vm.rekey",
                vm_uuid,
                True,
                f"{vm.rekey_kind} rekey switched: KEK {vm.rekey_kms_key_id} is the VM's, old KEK {vm.kms_key_id} to retire",
            )
            return vm_in(conn, vm_uuid)

    def finish_rekey(self, vm_uuid: str, old_kms_key_id: str, actor: str, outcome: str) -> None:
        """The old KEK is deactivated: the rotation is over. `outcome` says
        how (for the trail)."""
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            done = self._end_rekey(conn, vm_uuid, "retiring", old_kms_key_id, now)
            if done:
                self._append_audit(conn, actor, "vm.rekey.retire", vm_uuid, True, f"old KEK {old_kms_key_id} {outcome}")

    def abort_rekey(self, vm_uuid: str, new_kms_key_id: str, actor: str) -> None:
        """Forget a pending rotation whose key safe is in no .vmx."""
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            done = self._end_rekey(conn, vm_uuid, "pending", new_kms_key_id, now)
            if done:
                self._append_audit(
                    conn, actor, "vm.rekey.abort", vm_uuid, True, f"pending rekey to KEK {new_kms_key_id} rolled back"
                )

    @staticmethod
    def _end_rekey(conn, vm_uuid: str, state: str, kms_key_id: str, now: float) -> int:
        """Clear the VM's rotation if it is still in `state` with `kms_key_id`
        (a concurrent change wins); the number of rows cleared."""
        return conn.execute(
            update(vms)
            .where(vms.c.vm_uuid == vm_uuid, vms.c.rekey_state == state, vms.c.rekey_kms_key_id == kms_key_id)
            .values(
                rekey_kind=None,
                rekey_state=None,
                rekey_kms_key_id=None,
                rekey_key_safe=None,
                rekey_at=None,
                changed_at=now,
            )
        ).rowcount
