"""VMs: an instance creates or registers its VMs (a VM found on a datastore,
a cold migration's receiving end), places them on its hosts, releases them
to another instance, and removes them."""

from __future__ import annotations

from sqlalchemy import select, update

from broker.db import instances, nvram_generations, vms
from broker.registry.audit import AuditTrail
from broker.registry.enrollment import require_trusted
from broker.registry.hosts import own_host
from broker.registry.model import Conflict, InvalidRequest, NotFound, VmRecord, check_host_name, check_instance_name
from broker.registry.nvram import check_no_history

# A VM with the last .nvram generation a host reported for it (NULL: none),
# built once: SQLAlchemy then only binds the parameters.
VM_WITH_GENERATION = select(vms, nvram_generations.c.generation).select_from(
    vms.outerjoin(nvram_generations, nvram_generations.c.vm_uuid == vms.c.vm_uuid)
)


def vm_record(row) -> VmRecord:
    generation = row._mapping.get("generation")
    return VmRecord(
        row.vm_uuid,
        row.name,
        row.instance,
        row.kms_key_id,
        row.key_safe,
        row.host,
        int(generation or 0),
        row._mapping.get("released_to"),
        row._mapping.get("rekey_kind"),
        row._mapping.get("rekey_state"),
        row._mapping.get("rekey_kms_key_id"),
        row._mapping.get("rekey_key_safe"),
    )


def vm_in(conn, vm_uuid: str) -> VmRecord:
    return vm_record(conn.execute(VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first())


def insert_vm(conn, record: VmRecord, now: float) -> None:
    conn.execute(
        vms.insert().values(
            vm_uuid=record.vm_uuid,
            name=record.name,
            instance=record.instance,
            kms_key_id=record.kms_key_id,
            key_safe=record.key_safe,
            host=record.host,
            created_at=now,
            changed_at=now,
        )
    )


class Vms(AuditTrail):
    """Creating, registering, placing, releasing and removing VMs."""

    def check_new_vm(self, instance: str, vm_uuid: str, host: str | None, *, actor: str | None = None) -> None:
        """Refuse (audited), before a KEK is made, a VM that could not be recorded."""
        with self._refusals_audited(actor or f"instance:{instance}", "vm.create", vm_uuid):
            with self.db.read() as conn:
                require_trusted(conn, instance)
                if conn.execute(select(vms.c.vm_uuid).where(vms.c.vm_uuid == vm_uuid)).first() is not None:
                    raise Conflict(f"VM {vm_uuid} is already registered; use POST /v1/vms/register to re-register it")
                check_no_history(conn, vm_uuid)
                if host is not None:
                    own_host(conn, instance, host)

    def add_vm(
        self,
        instance: str,
        vm_uuid: str,
        name: str,
        kms_key_id: str,
        key_safe: str,
        host: str | None,
        *,
        actor: str | None = None,
    ) -> VmRecord:
        actor = actor or f"instance:{instance}"
        now = self.clock()
        with self._refusals_audited(actor, "vm.create", vm_uuid), self._audit_lock, self.db.begin() as conn:
            require_trusted(conn, instance)
            if conn.execute(select(vms.c.vm_uuid).where(vms.c.vm_uuid == vm_uuid)).first() is not None:
                raise Conflict(f"VM {vm_uuid} is already registered")
            check_no_history(conn, vm_uuid)
            if host is not None:
                own_host(conn, instance, host)
            record = VmRecord(vm_uuid, name, instance, kms_key_id, key_safe, host)
            insert_vm(conn, record, now)
            for_whom = "" if actor == f"instance:{instance}" else f" for instance {instance}"
            self._append_audit(conn, actor, "vm.create", vm_uuid, True, f"KEK {kms_key_id}{for_whom}")
        return record

    def register_vm(
        self, instance: str, vm_uuid: str, name: str, kms_key_id: str, key_safe: str, *, actor: str | None = None
    ) -> VmRecord:
        """Bind a VM found on a datastore to `instance`: recovery and the
        receiving end of a cold migration. A VM held by another trusted
        instance is a Conflict unless it was released to `instance`; one held
        by a revoked instance is taken over. Either way it comes unplaced,
        and its .nvram generation and audit history stay (both are kept by
        VM UUID). Refusals are audited."""
        actor = actor or f"instance:{instance}"
        now = self.clock()
        with self._refusals_audited(actor, "vm.register", vm_uuid), self._audit_lock, self.db.begin() as conn:
            require_trusted(conn, instance)
            existing = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            by_key = conn.execute(select(vms).where(vms.c.kms_key_id == kms_key_id)).first()
            if by_key is not None and by_key.vm_uuid != vm_uuid:
                raise Conflict(f"KMS key {kms_key_id} belongs to another VM")
            host = None
            was = "new"
            if existing is not None:
                if existing.instance != instance:
                    owner_state = conn.execute(
                        select(instances.c.state).where(instances.c.name == existing.instance)
                    ).scalar()
                    if owner_state == "trusted":
                        if existing.released_to is not None and existing.released_to != instance:
                            raise Conflict(
                                f"VM {vm_uuid} is registered by another trusted instance and released to "
                                f"instance {existing.released_to}, not to {instance}"
                            )
                        if existing.released_to is None:
                            raise Conflict(
                                f"VM {vm_uuid} is registered by another trusted instance; its owner releases it "
                                f"('vtpm-mgmt vm release VM --to {instance}') or an administrator transfers it"
                            )
                        was = f"migrated from {existing.instance}, released by {existing.released_by}"
                    else:
                        was = f"taken over from {owner_state or 'unknown'} instance {existing.instance}"
                else:
                    if existing.released_to is not None:
                        raise Conflict(
                            f"VM {vm_uuid} is released to instance {existing.released_to}; release it to "
                            f"{instance} to cancel that first"
                        )
                    host = existing.host
                    was = "re-registered"
                conn.execute(vms.delete().where(vms.c.vm_uuid == vm_uuid))
            # Kept by VM UUID: the vTPM's rollback protection survives the re-registration.
            generation = conn.execute(
                select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)
            ).scalar()
            record = VmRecord(vm_uuid, name, instance, kms_key_id, key_safe, host, int(generation or 0))
            insert_vm(conn, record, now)
            if actor != f"instance:{instance}":
                was += f", for instance {instance}"
            self._append_audit(
                conn,
                actor,
                "vm.register",
                vm_uuid,
                True,
                f"KEK {kms_key_id} ({was}; .nvram generation {generation or 0})",
            )
        return record

    def place_vm(self, instance: str | None, vm_uuid: str, host: str, *, actor: str | None = None) -> None:
        """Place the VM on one of its instance's hosts. `instance` limits it
        to that instance's VMs (None: an administrator, any VM, on a host of
        the VM's own instance)."""
        actor = actor or f"instance:{instance}"
        now = self.clock()
        with self._refusals_audited(actor, "vm.place", vm_uuid), self._audit_lock, self.db.begin() as conn:
            check_host_name(host)
            if instance is not None:
                require_trusted(conn, instance)
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            if instance is None:
                require_trusted(conn, vm.instance)
            if vm.released_to is not None:
                raise Conflict(
                    f"VM {vm_uuid} is released to instance {vm.released_to}: it is placed once {vm.released_to} "
                    "registers it (or after the release is cancelled)"
                )
            own_host(conn, vm.instance, host)
            conn.execute(update(vms).where(vms.c.vm_uuid == vm_uuid).values(host=host, changed_at=now))
            self._append_audit(conn, actor, "vm.place", vm_uuid, True, f"on host {host}")

    def release_vm(self, vm_uuid: str, to: str, actor: str, instance: str | None) -> VmRecord:
        """Cold migration, the sending end: hand the VM over to the trusted
        instance `to`, which then registers it from the datastore. From now
        on the VM is placed on no host, so no host of the old instance can
        unwrap it. `instance` is the owner releasing its own VM; None is an
        administrator's transfer of any VM. Releasing to the owner itself
        cancels a pending release. Refusals are audited; the .nvram
        generation and the trail stay with the VM UUID."""
        action = "vm.release" if instance is not None else "vm.transfer"
        now = self.clock()
        with self._refusals_audited(actor, action, vm_uuid), self._audit_lock, self.db.begin() as conn:
            check_instance_name(to)
            if instance is not None:
                require_trusted(conn, instance)
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            if to == vm.instance:
                if vm.released_to is None:
                    raise InvalidRequest(f"VM {vm_uuid} is instance {to}'s already; name the instance it goes to")
                conn.execute(
                    update(vms)
                    .where(vms.c.vm_uuid == vm_uuid)
                    .values(released_to=None, released_by=None, released_at=None, changed_at=now)
                )
                self._append_audit(
                    conn, actor, action, vm_uuid, True, f"release to instance {vm.released_to} cancelled"
                )
                return vm_in(conn, vm_uuid)
            state = conn.execute(select(instances.c.state).where(instances.c.name == to)).scalar()
            if state is None:
                raise NotFound(f"no instance named {to}; release to a trusted instance ('vtpm-broker admin list')")
            if state != "trusted":
                raise Conflict(f"instance {to} is {state}, not trusted; release to a trusted instance")
            if vm.released_to == to:
                raise Conflict(f"VM {vm_uuid} is already released to instance {to}")
            conn.execute(
                update(vms)
                .where(vms.c.vm_uuid == vm_uuid)
                .values(released_to=to, released_by=actor, released_at=now, host=None, changed_at=now)
            )
            reason = f"to instance {to} from instance {vm.instance}"
            if vm.host:
                reason += f", no longer placed on host {vm.host}"
            if vm.released_to:
                reason += f" (was released to {vm.released_to})"
            self._append_audit(conn, actor, action, vm_uuid, True, reason)
            return vm_in(conn, vm_uuid)

    def remove_vm(self, vm_uuid: str, actor: str, instance: str | None) -> VmRecord:
        """Forget a VM's registration (its vTPM can no longer be unwrapped
        through the broker until its .vmx is registered again). `instance`
        limits it to that instance's VMs. The KEK stays in the KMS, and the
        .nvram generation and the trail stay with the VM UUID, so a stale
        .nvram is still refused after a re-registration. Refusals are
        audited."""
        with self._refusals_audited(actor, "vm.remove", vm_uuid), self._audit_lock, self.db.begin() as conn:
            vm = conn.execute(VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            conn.execute(vms.delete().where(vms.c.vm_uuid == vm_uuid))
            self._append_audit(
                conn,
                actor,
                "vm.remove",
                vm_uuid,
                True,
                f"KEK {vm.kms_key_id} (instance {vm.instance}); .nvram generation {vm.generation or 0} kept",
            )
        return vm_record(vm)

    def get_vm(self, vm_uuid: str, instance: str | None = None) -> VmRecord:
        with self.db.read() as conn:
            vm = conn.execute(VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first()
        if vm is None or (instance is not None and vm.instance != instance):
            raise NotFound(f"no VM {vm_uuid}")
        return vm_record(vm)

    def list_vms(self, instance: str | None = None) -> list[VmRecord]:
        """The VMs (of one instance), each with its last reported .nvram generation."""
        stmt = VM_WITH_GENERATION.order_by(vms.c.vm_uuid)
        if instance is not None:
            stmt = stmt.where(vms.c.instance == instance)
        with self.db.read() as conn:
            return [vm_record(r) for r in conn.execute(stmt).all()]
