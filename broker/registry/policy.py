"""The unwrap policy: a host may unwrap with a KEK, or act for a VM, only if
the host is registered by a trusted instance, the VM is that instance's, and
the VM is placed on that host."""

from __future__ import annotations

from sqlalchemy import and_, bindparam, or_, select

from broker.db import hosts, instances, nvram_generations, vms
from broker.registry.attestation import Attestation, AttestationCheck
from broker.registry.model import Decision

# The unwrap policy's one read (the gateway's and a power-on's hot path): the
# host by certificate, its instance's state, and the VM by KMS key or by
# UUID, with the VM's last .nvram generation. kms_key_id, vm_uuid and
# cert_fingerprint are unique, so there is at most one row; none when the
# host is unknown.
_PLACEMENT_COLUMNS = (
    hosts.c.name.label("host"),
    hosts.c.instance.label("instance"),
    instances.c.state.label("state"),
    vms.c.vm_uuid.label("vm_uuid"),
    vms.c.instance.label("vm_instance"),
    vms.c.host.label("vm_host"),
)
_PLACEMENT_BY_KEY = (
    select(*_PLACEMENT_COLUMNS)
    .select_from(
        hosts.outerjoin(instances, instances.c.name == hosts.c.instance).outerjoin(
            vms,
            # The VM's KEK, or the new KEK of its pending rotation: until the
            # .vmx is switched, a host may hold either key safe.
            or_(
                vms.c.kms_key_id == bindparam("key"),
                and_(vms.c.rekey_kms_key_id == bindparam("key"), vms.c.rekey_state == "pending"),
            ),
        )
    )
    .where(hosts.c.cert_fingerprint == bindparam("fp"))
)
_PLACEMENT_BY_VM = (
    select(*_PLACEMENT_COLUMNS, nvram_generations.c.generation)
    .select_from(
        hosts.outerjoin(instances, instances.c.name == hosts.c.instance)
        .outerjoin(vms, vms.c.vm_uuid == bindparam("vm"))
        .outerjoin(nvram_generations, nvram_generations.c.vm_uuid == vms.c.vm_uuid)
    )
    .where(hosts.c.cert_fingerprint == bindparam("fp"))
)


def _placement_decision(row, no_vm: str) -> Decision:
    """The unwrap policy applied to one `_PLACEMENT_*` row (None: the
    host's certificate is not registered). `no_vm` is the reason when the
    row names no VM."""
    if row is None:
        return Decision(False, "host certificate is not registered", None, None, None)
    own_vm = row.vm_uuid is not None and row.vm_instance == row.instance
    vm_uuid = row.vm_uuid if own_vm else None
    if row.state != "trusted":
        return Decision(
            False, f"instance {row.instance} of the host is {row.state or 'unknown'}", row.host, row.instance, vm_uuid
        )
    if row.vm_uuid is None:
        return Decision(False, no_vm, row.host, row.instance, None)
    if not own_vm:
        return Decision(False, "key belongs to a VM of another instance", row.host, row.instance, None)
    if row.vm_host != row.host:
        where = f"host {row.vm_host}" if row.vm_host else "no host"
        return Decision(False, f"VM is placed on {where}, not on this host", row.host, row.instance, vm_uuid)
    return Decision(True, "VM is placed on this host by its trusted instance", row.host, row.instance, vm_uuid)


class UnwrapPolicy(Attestation):
    """The unwrap policy's reads (the caller records the decision)."""

    def authorize_unwrap(self, host_fingerprint: str, kms_key_id: str) -> Decision:
        """May the host with this certificate unwrap with this KMS key?
        Only if the host is registered by a trusted instance, the key is the
        KEK of a VM that instance registered, and the VM is placed on that
        host. Reads only: the caller records the decision (record_audit)."""
        with self.db.read() as conn:
            row = conn.execute(_PLACEMENT_BY_KEY, {"fp": host_fingerprint, "key": kms_key_id}).first()
        return _placement_decision(row, "key is not the KEK of any registered VM")

    def authorize_gateway_unwrap(
        self, host_fingerprint: str, kms_key_id: str, ticket: bytes | None
    ) -> tuple[Decision, AttestationCheck | None]:
        """`authorize_unwrap` and, when the placement allows, the host's
        attestation (`check_attestation`, with the request's token), in one
        read: the gateway's question for every unwrap. The attestation is
        None when the placement refuses."""
        with self.db.read() as conn:
            row = conn.execute(_PLACEMENT_BY_KEY, {"fp": host_fingerprint, "key": kms_key_id}).first()
            decision = _placement_decision(row, "key is not the KEK of any registered VM")
            if not decision.allowed or decision.host is None:
                return decision, None
            return decision, self._check_attestation_in(conn, decision.host, str(decision.instance), ticket)

    def authorize_vm_for_host(self, host_fingerprint: str, vm_uuid: str) -> Decision:
        """The same rule by VM: may this host act for this VM (its vTPM's
        EK certificate, say)?"""
        return self.nvram_generation_for_host(host_fingerprint, vm_uuid)[0]

    def nvram_generation_for_host(self, host_fingerprint: str, vm_uuid: str) -> tuple[Decision, int]:
        """`authorize_vm_for_host` and, when allowed, `nvram_generation`
        (else 0), read in one query: a power-on asks for both."""
        with self.db.read() as conn:
            row = conn.execute(_PLACEMENT_BY_VM, {"fp": host_fingerprint, "vm": vm_uuid}).first()
        if row is None or row.vm_uuid is None:
            host, instance = (row.host, row.instance) if row is not None else (None, None)
            return Decision(False, "no such VM", host, instance, None), 0
        decision = _placement_decision(row, "no such VM")
        generation = row.generation if decision.allowed and row.generation is not None else 0
        return decision, int(generation)
