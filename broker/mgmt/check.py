"""`vtpm-mgmt vm check`: find the VMs whose vTPM could not come back,
before anyone needs them.

A vTPM is its `.nvram`: a backup that lacks it, or holds a damaged one, or
one copied from another VM, loses the vTPM's keys and identity for good.
This reads the datastore (no key): each `.vmx`, its key safe, and the clear
header of its `.nvram` (structure, lengths, owner). The `.nvram`'s tag needs
the DEK; the host verifies it at every power-on. With the broker's record of
the last generation each VM's host sealed (`compare_generations`, fed from
the instance's VM list), an older `.nvram` - a backup restored over a newer
state - is found too: a power-on would refuse it as a rollback.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from broker import nvram, vmx
from broker.keysafe import KeySafeError, parse_key_safe

__all__ = ["VmCheck", "check_datastore", "compare_generations"]

# A .nvram is a few KiB to a few hundred KiB; read_header is given the whole
# file, so refuse to read something absurd into memory.
MAX_NVRAM = nvram.MAX_PLAINTEXT + 64 * 1024


@dataclass
class VmCheck:
    vmx_path: Path
    name: str = ""
    vm_uuid: str = ""
    kms_key_id: str = ""
    has_vtpm: bool = False
    generation: int | None = None
    # The last generation a host sealed, as the broker recorded it (None:
    # not asked, or the VM is not this instance's).
    broker_generation: int | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_json(self) -> dict:
        return {
            "vmx": str(self.vmx_path),
            "name": self.name,
            "vm_uuid": self.vm_uuid,
            "kms_key_id": self.kms_key_id,
            "vtpm": self.has_vtpm,
            "generation": self.generation,
            "broker_generation": self.broker_generation,
            "ok": self.ok,
            "problems": list(self.problems),
        }


def check_datastore(datastore: Path, provider: str | None) -> list[VmCheck]:
    """One VmCheck per `.vmx` found; `provider` None skips the provider check."""
    results = [check_vm(path, provider) for path in vmx.find_vms(datastore)]
    # A VM copied as a whole (same uuid.bios, same key) is two VMs that
    # recovery cannot tell apart: the broker registers a UUID once.
    for attribute, what in (("vm_uuid", "UUID"), ("kms_key_id", "KMS key")):
        seen: dict[str, VmCheck] = {}
        for result in results:
            value = getattr(result, attribute)
            if not value:
                continue
            first = seen.setdefault(value, result)
            if first is not result:
                result.problems.append(
                    f"has the same {what} as {first.vmx_path} (a copy?); recovery registers only one"
                )
    return results


def compare_generations(results: list[VmCheck], recorded: dict[str, int]) -> list[VmCheck]:
    """Flag each vTPM whose `.nvram` is older than the generation its host
    last sealed (`recorded`: VM UUID -> generation, 0 for none yet).
    Returns the vTPMs with a readable `.nvram` that `recorded` does not
    cover (VMs the instance has not registered), whose rollback was not
    checked."""
    unchecked = []
    for result in results:
        if not result.has_vtpm or result.generation is None:
            continue
        if result.vm_uuid not in recorded:
            unchecked.append(result)
            continue
        result.broker_generation = recorded[result.vm_uuid]
        if result.generation < result.broker_generation:
            result.problems.append(
                f"its .nvram is generation {result.generation}, older than generation "
                f"{result.broker_generation} that its host last sealed (an old copy put back?): "
                "a power-on refuses it as a rollback; restore the newest .nvram"
            )
    return unchecked


def check_vm(path: Path, provider: str | None) -> VmCheck:
    result = VmCheck(vmx_path=path, name=path.stem)
    try:
        config = vmx.read(path)
    except vmx.VmxError as exc:
        result.problems.append(f"the .vmx does not parse: {_strip_path(str(exc), path)}")
        return result
    result.name = config.name or path.stem
    result.has_vtpm = config.has_vtpm
    try:
        result.vm_uuid = config.vm_uuid
    except vmx.VmxError as exc:
        result.problems.append(str(exc))
    key_safe = None
    if config.get("encryption.keySafe") or result.has_vtpm:
        try:
            key_safe = parse_key_safe(config.key_safe)
        except (vmx.VmxError, KeySafeError) as exc:
            result.problems.append(f"its key safe does not parse ({exc}): the DEK cannot be found again")
        else:
            result.kms_key_id = key_safe.kms_key_id
            if provider is not None and key_safe.provider != provider:
                result.problems.append(
                    f"its key safe names key provider {key_safe.provider!r}, not {provider!r}: "
                    "this instance's broker cannot unwrap it"
                )
    if result.has_vtpm:
        _check_nvram(result, config, path, key_safe)
    return result


def _check_nvram(result: VmCheck, config: vmx.Vmx, vmx_path: Path, key_safe) -> None:
    try:
        name = config.nvram_name
    except vmx.VmxError as exc:
        result.problems.append(str(exc))
        return
    path = vmx_path.parent / name
    try:
        info = os.stat(path)
    except FileNotFoundError:
        result.problems.append(
            f"{name} is missing: a vTPM without its .nvram cannot be recovered (never powered on, or the backup lacks it)"
        )
        return
    except OSError as exc:
        result.problems.append(f"{name} is unreadable ({exc.strerror})")
        return
    if not stat.S_ISREG(info.st_mode):
        result.problems.append(f"{name} is not a regular file")
        return
    if info.st_size > MAX_NVRAM:
        result.problems.append(f"{name} is {info.st_size} bytes, larger than any vTPM state (corrupt)")
        return
    try:
        blob = path.read_bytes()
    except OSError as exc:
        result.problems.append(f"{name} is unreadable ({exc.strerror})")
        return
    try:
        header = nvram.read_header(blob)
    except nvram.NvramError as exc:
        result.problems.append(f"{name}: {exc}")
        return
    result.generation = header.generation
    if result.vm_uuid and str(header.vm_uuid) != result.vm_uuid:
        result.problems.append(f"{name} belongs to another VM ({header.vm_uuid}), not {result.vm_uuid}")
    if key_safe is not None and not _same_key(header.key_safe_ref, key_safe) and not _rotated(header, config):
        result.problems.append(
            f"{name} was sealed under key {header.key_safe_ref!r}, but the .vmx names "
            f"{key_safe.provider}/{key_safe.kms_key_id}"
        )


def _rotated(header, config: vmx.Vmx) -> bool:
    """A key rotation explains the header's KEK (docs/broker-design.md, "Key
    rotation"): a shallow rekey left the .nvram sealed under the old KEK with
    the same DEK, or a host re-sealed it under a pending deep rekey's new
    DEK before switching the .vmx."""
    if header.key_safe_ref == config.get(vmx.NVRAM_KEY_REF):
        return True
    try:
        pending = config.pending_key_safe
        return pending is not None and _same_key(header.key_safe_ref, parse_key_safe(pending))
    except KeySafeError:
        return False


def _same_key(reference: str, key_safe) -> bool:
    """The .nvram's key-safe reference names the .vmx's KEK
    (docs/nvram-format.md: `<provider>/<kms key id>`; a whole key safe is
    accepted too)."""
    if reference == f"{key_safe.provider}/{key_safe.kms_key_id}":
        return True
    try:
        return parse_key_safe(reference).kms_key_id == key_safe.kms_key_id
    except KeySafeError:
        return False


def _strip_path(message: str, path: Path) -> str:
    prefix = f"{path}: "
    return message[len(prefix) :] if message.startswith(prefix) else message
