"""Key rotation of a VM, the management instance's side (docs/broker-design.md,
"Key rotation").

The broker makes the keys (it is the KMS's KMIP client); this instance owns
the datastore and writes the .vmx. One rotation, every write atomic and made
under the VM's `.vmx.lck`:

1. ``begin``: the broker makes the new KEK and key safe (pending).
2. ``write_beside``: `encryption.keySafe.pending` (and `encryption.rekey.pending`)
   beside the key safe in use. A deep rekey stops here: the host re-seals
   the .nvram under the new DEK at the VM's next power-on (or power-off),
   switches the .vmx and tells the broker.
3. ``switch``: the new key safe in use, the old one kept as
   `encryption.keySafe.previous`.
4. ``commit``: the .vmx is read back and its key safe sent to the broker,
   which unwraps through it (the test unwrap), makes it the VM's and only
   then revokes the old KEK.
5. ``drop_previous``: the old key safe leaves the .vmx.

A crash between any two steps leaves a .vmx whose key safe in use opens
(the broker lets the VM's host unwrap with the old and the pending KEK until
the commit), and running the command again finishes the rotation from the
state the .vmx and the broker show; ``abort`` rolls a pending one back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker import nvram, vmx
from broker.keysafe import KeySafeError, parse_key_safe
from broker.mgmt.client import BrokerClient, BrokerError, BrokerRefused
from broker.mgmt.state import MgmtError

__all__ = ["RekeyOutcome", "abort_vm", "rekey_vm"]


@dataclass
class RekeyOutcome:
    path: Path
    name: str = ""
    vm_uuid: str = ""
    kind: str = ""
    # "rekeyed", "pending" (deep: waits for the next power-on), "finished"
    # (an interrupted rotation was completed), "aborted".
    result: str = ""
    kms_key_id: str | None = None
    retired_kms_key_id: str | None = None
    error: str | None = None

    def describe(self) -> str:
        who = f"VM {self.name} ({self.vm_uuid})"
        if self.error is not None:
            return f"{who}: {self.error}"
        if self.result == "pending":
            return (
                f"{who}: deep rekey pending, new KEK {self.kms_key_id}; the host re-seals the .nvram under the "
                "new DEK at the VM's next power-on (or power-off) and then retires the old KEK"
            )
        if self.result == "aborted":
            return f"{who}: pending rekey rolled back; the key safe in use is unchanged"
        done = "interrupted rekey finished" if self.result == "finished" else f"{self.kind} rekey done"
        retired = f", old KEK {self.retired_kms_key_id} deactivated" if self.retired_kms_key_id else ""
        return f"{who}: {done}: KEK {self.kms_key_id}{retired}"


# The steps (each one atomic; tests interrupt between them) -------------------------------------


def begin(client: BrokerClient, vm_uuid: str, kind: str, key_safe: str) -> dict:
    answer = client.rekey_vm(vm_uuid, kind, key_safe)
    rekey = answer.get("rekey") if isinstance(answer, dict) else None
    if not isinstance(rekey, dict) or rekey.get("state") != "pending" or not isinstance(rekey.get("key_safe"), str):
        raise MgmtError(f"the broker began no rekey of VM {vm_uuid}; its answer has no pending key safe")
    try:
        parse_key_safe(rekey["key_safe"])
    except KeySafeError as exc:
        raise MgmtError(f"the broker's new key safe for VM {vm_uuid} does not parse ({exc})") from None
    return rekey


def write_beside(path: Path, key_safe: str, kind: str) -> None:
    config = vmx.read(path)
    config.set(vmx.PENDING_KEY_SAFE, key_safe)
    config.set(vmx.PENDING_REKEY, kind)
    vmx.write(path, config)


def switch(path: Path, key_safe: str) -> None:
    config = vmx.read(path)
    if config.pending_key_safe != key_safe:
        raise MgmtError(f"{path} changed during the rekey (its pending key safe is another); run the rekey again")
    config.set(vmx.PREVIOUS_KEY_SAFE, config.key_safe)
    config.set(vmx.KEY_SAFE, key_safe)
    config.remove(vmx.PENDING_KEY_SAFE, vmx.PENDING_REKEY)
    # The .nvram is untouched: its header names the KEK it was last sealed
    # under until the next power-off (same DEK); vm check reads this.
    new = parse_key_safe(key_safe)
    try:
        sealed_under = nvram.read_header((path.parent / config.nvram_name).read_bytes()).key_safe_ref
    except (OSError, nvram.NvramError, vmx.VmxError):
        sealed_under = None
    if sealed_under is not None and sealed_under != f"{new.provider}/{new.kms_key_id}":
        config.set(vmx.NVRAM_KEY_REF, sealed_under)
    else:
        config.remove(vmx.NVRAM_KEY_REF)
    vmx.write(path, config)


def commit(client: BrokerClient, path: Path, vm_uuid: str) -> dict:
    """Read the switched .vmx back and have the broker unwrap through its key safe, then retire the old KEK."""
    config = vmx.read(path)
    parse_key_safe(config.key_safe)
    return client.commit_rekey(vm_uuid, config.key_safe)


def drop_previous(path: Path, key_safe: str) -> None:
    config = vmx.read(path)
    if config.key_safe == key_safe and config.previous_key_safe is not None:
        config.remove(vmx.PREVIOUS_KEY_SAFE)
        vmx.write(path, config)


def drop_pending(path: Path) -> None:
    config = vmx.read(path)
    config.remove(vmx.PENDING_KEY_SAFE, vmx.PENDING_REKEY)
    vmx.write(path, config)


# One VM ----------------------------------------------------------------------------------------------


def rekey_vm(client: BrokerClient, path: Path, deep: bool) -> RekeyOutcome:
    """Rotate the keys of the VM whose .vmx is `path`, or finish its interrupted rotation."""
    kind = "deep" if deep else "shallow"
    outcome = RekeyOutcome(Path(path), name=Path(path).stem, kind=kind)
    try:
        with vmx.locked(path):
            _rekey_locked(client, outcome, kind)
    except BrokerRefused as exc:
        outcome.error = f"the broker refused: {exc.error} (HTTP {exc.status})"
    except (vmx.VmxError, KeySafeError, MgmtError, BrokerError) as exc:
        outcome.error = str(exc)
    return outcome


def _rekey_locked(client: BrokerClient, outcome: RekeyOutcome, kind: str) -> None:
    path = outcome.path
    config = vmx.read(path)
    outcome.name = config.name or path.stem
    outcome.vm_uuid = vm_uuid = config.vm_uuid
    current = config.key_safe
    parse_key_safe(current)
    pending, pending_kind = config.pending_key_safe, config.pending_rekey
    if config.previous_key_safe is not None:
        # Switched, not committed (or committed, previous not dropped): finish.
        outcome.kind = "interrupted"
        _finish(client, outcome, current, resumed=True)
        return
    if pending is not None and pending_kind == "deep":
        rekey = begin(client, vm_uuid, "deep", current)
        if rekey["key_safe"] != pending:
            write_beside(path, rekey["key_safe"], "deep")
        if kind != "deep":
            raise MgmtError(
                "a deep rekey is pending until the VM's next power-on; power it on (or run "
                f"'vtpm-mgmt vm rekey {outcome.name} --abort'), then rekey again"
            )
        outcome.result, outcome.kms_key_id = "pending", rekey["kms_key_id"]
        return
    if pending is not None:
        # A shallow rotation written beside, not switched: resume it.
        kind = outcome.kind = "shallow"
        rekey = begin(client, vm_uuid, "shallow", current)
        if rekey["key_safe"] != pending:
            write_beside(path, rekey["key_safe"], "shallow")
        resumed = True
    else:
        rekey = begin(client, vm_uuid, kind, current)
        write_beside(path, rekey["key_safe"], kind)
        resumed = False
        if kind == "deep":
            outcome.result, outcome.kms_key_id = "pending", rekey["kms_key_id"]
            return
    switch(path, rekey["key_safe"])
    _finish(client, outcome, rekey["key_safe"], resumed=resumed)


def _finish(client: BrokerClient, outcome: RekeyOutcome, key_safe: str, *, resumed: bool) -> None:
    answer = commit(client, outcome.path, outcome.vm_uuid)
    if answer.get("key_safe") != key_safe:
        raise MgmtError(
            f"the broker did not make the .vmx's key safe VM {outcome.vm_uuid}'s; register the .vmx and rekey again"
        )
    drop_previous(outcome.path, key_safe)
    outcome.result = "finished" if resumed else "rekeyed"
    outcome.kms_key_id = answer.get("kms_key_id")
    outcome.retired_kms_key_id = answer.get("retired_kms_key_id")


def abort_vm(client: BrokerClient, path: Path) -> RekeyOutcome:
    """Roll back a pending (not yet switched) rotation."""
    outcome = RekeyOutcome(Path(path), name=Path(path).stem, kind="abort")
    try:
        with vmx.locked(path):
            config = vmx.read(path)
            outcome.name = config.name or path.stem
            outcome.vm_uuid = config.vm_uuid
            if config.previous_key_safe is not None:
                raise MgmtError("the rekey is switched already; run 'vtpm-mgmt vm rekey' to finish it")
            pending = config.pending_key_safe
            if pending is not None and config.pending_rekey == "deep":
                _refuse_if_resealed(path, config, pending)
            if pending is not None:
                drop_pending(path)
            client.abort_rekey(outcome.vm_uuid)
            outcome.result = "aborted"
    except BrokerRefused as exc:
        outcome.error = f"the broker refused: {exc.error} (HTTP {exc.status})"
    except (vmx.VmxError, KeySafeError, MgmtError, BrokerError) as exc:
        outcome.error = str(exc)
    return outcome


def _refuse_if_resealed(path: Path, config: vmx.Vmx, pending: str) -> None:
    """A host may have re-sealed the .nvram under the pending DEK already
    (and crashed before switching the .vmx): then only finishing is safe."""
    new = parse_key_safe(pending)
    try:
        header = nvram.read_header((path.parent / config.nvram_name).read_bytes())
    except (OSError, nvram.NvramError):
        return
    if header.key_safe_ref == f"{new.provider}/{new.kms_key_id}":
        raise MgmtError(
            "the .nvram is re-sealed under the pending deep rekey's new DEK already; power the VM on to finish it"
        )
