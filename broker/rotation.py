"""Key rotation of a VM: the broker's side (docs/broker-design.md, "Key
rotation").

The broker is the KMS's KMIP client and the management instance owns the
datastore, so a rotation is split between them: the broker makes keys and
keeps the rotation's state (`broker_vms.rekey_*`), the instance (or, for a
deep rekey, the host that re-seals the .nvram) writes the .vmx.

- ``begin``: a new KEK (KMIP Create + Activate, named and tagged like the
  VM's first one) and the new key safe: shallow, the same DEK (Decrypt
  under the old KEK, Encrypt under the new one, both at the KMS); deep, a
  fresh DEK. Recorded as *pending*: the VM's host may now unwrap with
  either KEK. Begun again, a pending rotation of the same kind is handed
  back as it is (an interrupted run resumes), so no second KEK is made.
- ``commit``: called with the key safe read back from the switched .vmx.
  Its wrapped DEK must open at the KMS (and, shallow, be the old DEK); then
  the record names the new KEK (*retiring*) and the old KEK is revoked
  (Cessation of Operation). Called again, it finishes a revocation that did
  not happen and otherwise answers that the rotation is done.
- ``abort``: a pending rotation whose key safe is in no .vmx is rolled
  back: its new KEK is revoked and the record forgets it.

Every step is in the broker's audit trail (``vm.rekey``,
``vm.rekey.retire``, ``vm.rekey.abort``).
"""

from __future__ import annotations

import logging

from broker.keysafe import format_key_safe, parse_key_safe
from broker.trust import Conflict, InvalidRequest, Registry, Unprocessable, VmRecord
from broker.vmkeys import KmsUnavailable, VmKeys

__all__ = ["KINDS", "Rotation"]

log = logging.getLogger("broker.rotation")

KINDS = ("shallow", "deep")


class Rotation:
    def __init__(self, registry: Registry, vmkeys: VmKeys):
        self.registry = registry
        self.vmkeys = vmkeys

    def begin(self, vm_uuid: str, kind: str, key_safe: str, actor: str, instance: str | None) -> dict:
        """Start (or resume) a rotation of `kind` of the VM whose .vmx holds `key_safe`."""
        if kind not in KINDS:
            raise InvalidRequest(f"kind must be one of {', '.join(KINDS)}")
        vm = self.registry.rekey_target(vm_uuid, instance, actor)
        if vm.rekey_state == "retiring":
            vm = self._retire(vm, actor)
        if vm.rekey_state == "pending":
            if vm.rekey_kind != kind:
                self._refuse(
                    vm_uuid,
                    actor,
                    f"a {vm.rekey_kind} rekey of VM {vm_uuid} is under way; finish it first "
                    f"('vtpm-mgmt vm rekey{' --deep' if vm.rekey_kind == 'deep' else ''}')",
                )
            if key_safe not in (vm.key_safe, vm.rekey_key_safe):
                self._refuse(vm_uuid, actor, f"the key safe given is not VM {vm_uuid}'s; give the one in its .vmx")
            return self._answer(vm, resumed=True)
        if key_safe != vm.key_safe:
            self._refuse(
                vm_uuid,
                actor,
                f"the key safe given is not the one the broker has for VM {vm_uuid}; register the VM's .vmx first",
            )
        current = parse_key_safe(vm.key_safe)
        if kind == "shallow":
            new = self.vmkeys.rewrap(current, vm.vm_uuid, vm.name)
        else:
            new = self.vmkeys.create(vm.vm_uuid, vm.name)
        text = format_key_safe(new)
        try:
            self.registry.begin_rekey(vm_uuid, kind, current.kms_key_id, new.kms_key_id, text, actor)
        except Conflict:
            self._revoke_quietly(new.kms_key_id)
            raise
        return self._answer(self.registry.get_vm(vm_uuid), resumed=False)

    def commit(self, vm_uuid: str, key_safe: str, actor: str, instance: str | None) -> dict:
        """Make the switched key safe the VM's and deactivate the old KEK."""
        vm = self.registry.rekey_target(vm_uuid, instance, actor)
        if vm.key_safe == key_safe:
            if vm.rekey_state == "retiring":
                retired = vm.rekey_kms_key_id
                return self._answer(self._retire(vm, actor), resumed=True, retired=retired)
            if vm.rekey_state is None:
                return self._answer(vm, resumed=True)
        if vm.rekey_state != "pending" or vm.rekey_key_safe != key_safe:
            self._refuse(
                vm_uuid,
                actor,
                f"VM {vm_uuid} has no rekey pending to this key safe; run 'vtpm-mgmt vm rekey' to start one",
            )
        assert vm.rekey_key_safe is not None
        new, old = parse_key_safe(vm.rekey_key_safe), parse_key_safe(vm.key_safe)
        # The test unwrap through the new key safe, at the KMS.
        if vm.rekey_kind == "shallow":
            if not self.vmkeys.same_dek(old, new):
                self._refuse(vm_uuid, actor, "the new key safe does not hold the VM's DEK", Unprocessable)
        else:
            self.vmkeys.unwrap(new, check_only=True)
        vm = self.registry.switch_rekey(vm_uuid, key_safe, actor)
        return self._answer(self._retire(vm, actor), resumed=False, retired=old.kms_key_id)

    def abort(self, vm_uuid: str, actor: str, instance: str | None) -> dict:
        """Roll back a pending rotation (its key safe must be in no .vmx)."""
        vm = self.registry.rekey_target(vm_uuid, instance, actor)
        if vm.rekey_state == "retiring":
            self._refuse(vm_uuid, actor, f"the rekey of VM {vm_uuid} is switched already; run 'vtpm-mgmt vm rekey'")
        if vm.rekey_state == "pending":
            assert vm.rekey_kms_key_id is not None
            self._revoke_quietly(vm.rekey_kms_key_id)
            self.registry.abort_rekey(vm_uuid, vm.rekey_kms_key_id, actor)
        return self._answer(self.registry.get_vm(vm_uuid), resumed=False)

    # Internals ---------------------------------------------------------------------------------

    def _retire(self, vm: VmRecord, actor: str) -> VmRecord:
        assert vm.rekey_state == "retiring" and vm.rekey_kms_key_id is not None
        outcome = self.vmkeys.retire(vm.rekey_kms_key_id)
        self.registry.finish_rekey(vm.vm_uuid, vm.rekey_kms_key_id, actor, outcome)
        return self.registry.get_vm(vm.vm_uuid)

    def _revoke_quietly(self, uid: str) -> None:
        try:
            self.vmkeys.retire(uid)
        except KmsUnavailable as exc:
            log.warning("could not deactivate the unused KEK %s: %s", uid, exc)

    def _refuse(self, vm_uuid: str, actor: str, message: str, kind: type[Exception] = Conflict) -> None:
        self.registry.record_audit(actor, "vm.rekey", vm_uuid, False, message)
        raise kind(message)

    @staticmethod
    def _answer(vm: VmRecord, *, resumed: bool, retired: str | None = None) -> dict:
        answer: dict[str, object] = {
            "vm_uuid": vm.vm_uuid,
            "kms_key_id": vm.kms_key_id,
            "key_safe": vm.key_safe,
            "rekey": None,
            "resumed": resumed,
            "retired_kms_key_id": retired,
        }
        if vm.rekey_state is not None:
            answer["rekey"] = {
                "kind": vm.rekey_kind,
                "state": vm.rekey_state,
                "kms_key_id": vm.rekey_kms_key_id,
                "key_safe": vm.rekey_key_safe if vm.rekey_state == "pending" else None,
            }
        return answer
