"""The host agent: power a VM's vTPM on and off (issue 6, item 2).

Power-on::

    .vmx -> key safe -> DEK (broker gateway, KMIP Decrypt, host certificate)
         -> no .nvram yet: swtpm_setup manufactures the vTPM, its EK certificates
            from the broker's EK CA (swtpm_setup's certificate tool is a thin
            client of this process's relay, broker/host/ek_relay.py); sealed at once
            as generation 1, so the vTPM's identity is on the datastore before it runs
         -> else: unseal the .nvram (tag first; the VM, and the generation against
            the broker's record: rollback) into a private working directory
         -> swtpm on a Unix socket; the TCTI string for the guest (tpm2-tools)

Power-off: DEK again through the gateway (the VM keeps running if refused),
orderly TPM shutdown, seal with generation + 1, atomic write of the .nvram,
then the broker is told the new generation (after the rename: a crash in
between leaves a file newer than the record, never older), the clear copy is
wiped.

The DEK lives in this process's memory only, for the length of one command:
it is never written (the running record holds pid, sockets, work directory
and generation), never logged and never put into a message.

Deep rekey (docs/broker-design.md, "Key rotation"): while the .vmx holds a
pending deep rekey (`encryption.keySafe.pending`, `encryption.rekey.pending =
"deep"`), power-on unseals the .nvram with the DEK its header names (old or
new), re-seals it under the new DEK as the next generation, and power-off
seals under the new DEK directly; then the .vmx is switched (new key safe in
use, the old one as `encryption.keySafe.previous`), the broker is told
(it unwraps through the new key safe and retires the old KEK) and the old
key safe leaves the .vmx. Each step is atomic, and a power-on that finds a
step undone finishes it; a broker that cannot be reached only delays the
retirement (a warning), never the VM.

Commands for one VM hold its lock (``locks/<uuid>.lock``, flock) from start to
end; commands for different VMs run side by side, in separate processes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import time
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from broker import nvram, vmx
from broker.host import ek_relay, swtpm
from broker.host.broker_client import Broker, BrokerClient
from broker.host.config import HostConfig, load_config, write_public
from broker.host.ek_relay import EkCertificateRelay
from broker.host.errors import (
    AlreadyRunning,
    BrokerRefused,
    BrokerUnavailable,
    HostError,
    NotRunning,
    NvramRefused,
    RollbackRefused,
    SwtpmFailed,
)
from broker.keysafe import KeySafe, KeySafeError, parse_key_safe
from kmip_core.files import flock_within, write_atomic

__all__ = ["Agent", "InstallEkResult", "PowerOffResult", "PowerOnResult", "RunningVm"]

RECORD_VERSION = 1
EK_CERT_FLAGS = ("--create-ek-cert", "--create-platform-cert")


@dataclass(frozen=True)
class PowerOnResult:
    vm_uuid: str
    name: str
    tcti: str
    generation: int
    manufactured: bool
    pid: int
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class PowerOffResult:
    vm_uuid: str
    name: str
    nvram: str
    generation: int
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class InstallEkResult:
    vm_uuid: str
    name: str
    running: bool
    generation: int
    certificates: tuple[dict, ...]
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunningVm:
    vm_uuid: str
    name: str
    tcti: str
    generation: int
    since: float
    pid: int
    running: bool
    vmx: str


@dataclass(frozen=True)
class _Vm:
    """What a .vmx says about the VM, checked."""

    path: Path
    name: str
    vm_uuid: str
    key_safe: KeySafe
    has_vtpm: bool
    nvram_name: str
    # A deep rekey in progress: the new key safe (and its text) written beside
    # the one in use; `previous`: a switched rotation not yet retired.
    pending_key_safe: KeySafe | None = None
    pending_text: str | None = None
    previous: bool = False
    problem: str | None = None

    @property
    def nvram_path(self) -> Path:
        return self.path.parent / self.nvram_name

    @property
    def key_safe_ref(self) -> str:
        return f"{self.key_safe.provider}/{self.key_safe.kms_key_id}"

    @property
    def pending_ref(self) -> str:
        assert self.pending_key_safe is not None
        return f"{self.pending_key_safe.provider}/{self.pending_key_safe.kms_key_id}"


class Agent:
    """One host's agent, working in its state directory.

    ``broker`` is the way to the broker (`BrokerClient` over the network by
    default; a fake in unit tests). ``setup_config`` replaces the generated
    swtpm_setup.conf (for a local EK CA in tests).
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        *,
        broker: Broker | None = None,
        swtpm_binary: str = "swtpm",
        swtpm_setup: str = "swtpm_setup",
        setup_config: str | os.PathLike[str] | None = None,
        workdir_base: str | os.PathLike[str] | None = None,
        lock_timeout: float = 120.0,
    ):
        self.state_dir = Path(state_dir)
        self._broker = broker
        self._config: HostConfig | None = None
        self.swtpm_binary = swtpm_binary
        self.swtpm_setup = swtpm_setup
        self.setup_config = Path(setup_config) if setup_config is not None else None
        self.workdir_base = workdir_base
        self.lock_timeout = lock_timeout

    @property
    def config(self) -> HostConfig:
        if self._config is None:
            self._config = load_config(self.state_dir)
        return self._config

    @property
    def broker(self) -> Broker:
        if self._broker is None:
            self._broker = BrokerClient(self.config)
        return self._broker

    # Power-on -----------------------------------------------------------------------------

    def power_on(self, vmx_path: str | os.PathLike[str]) -> PowerOnResult:
        started = time.monotonic()
        self.config.require_certificate()
        vm = _read_vmx(vmx_path)
        if not vm.has_vtpm:
            raise HostError(f"VM {vm.name} has no vTPM (vtpm.present is not TRUE in {vm.path}); nothing to power on")
        warnings: list[str] = []
        with self._vm_lock(vm):
            record = self._read_record(vm.vm_uuid)
            if record is not None:
                if not self._stale(vm, record, warnings):
                    raise self._already(vm, record)
            dek = self.broker.unwrap(vm.key_safe, vm.vm_uuid, vm.name)
            new_dek = self._pending_dek(vm, warnings)
            last_seen = self.broker.nvram_generation(vm.vm_uuid)
            work = swtpm.private_workdir(prefix=f"vtpm-{vm.vm_uuid[:8]}-", base=self.workdir_base)
            instance: swtpm.SwtpmInstance | None = None
            try:
                state_dir, socket_dir = work / "state", work / "run"
                state_dir.mkdir(mode=0o700)
                socket_dir.mkdir(mode=0o700)
                if vm.nvram_path.exists() or vm.nvram_path.is_symlink():
                    generation, under_new = self._unseal_into(vm, dek, last_seen, state_dir, new_dek)
                    manufactured = False
                    if generation > last_seen:
                        # A power-off whose report did not reach the broker: catch up now.
                        self._report(vm, generation, warnings)
                    if new_dek is not None and not under_new:
                        generation = self._reseal(vm, new_dek, state_dir, generation + 1, warnings)
                elif new_dek is not None and last_seen == 0:
                    # A vTPM that never ran: manufactured under the new DEK at once.
                    generation = self._manufacture(vm, new_dek, state_dir, socket_dir, vm.pending_ref)
                    manufactured = True
                    self._report(vm, generation, warnings)
                else:
                    if last_seen > 0:
                        raise NvramRefused(
                            f"{vm.nvram_path} is missing, but the broker saw generation {last_seen} of VM {vm.name}'s "
                            "vTPM: its EK and NV secrets are in that file; restore it from a backup (a new vTPM "
                            "would have a new identity)"
                        )
                    generation = self._manufacture(vm, dek, state_dir, socket_dir)
                    manufactured = True
                    self._report(vm, generation, warnings)
                del dek
                if new_dek is not None:
                    del new_dek
                    self._finish_rekey(vm, warnings, switch=True)
                elif vm.previous:
                    self._finish_rekey(vm, warnings, switch=False)
                instance = swtpm.SwtpmInstance(state_dir, socket_dir, swtpm=self.swtpm_binary)
                try:
                    instance.start()
                except swtpm.SwtpmError as exc:
                    raise SwtpmFailed(
                        f"swtpm did not start for VM {vm.name}: {_one_line(exc)}; check the swtpm package"
                    ) from None
                assert instance.pid is not None
                now = time.time()
                self._write_record(
                    vm,
                    {
                        "version": RECORD_VERSION,
                        "vm_uuid": vm.vm_uuid,
                        "name": vm.name,
                        "vmx": str(vm.path),
                        "nvram": str(vm.nvram_path),
                        "pid": instance.pid,
                        "workdir": str(work),
                        "state_dir": str(state_dir),
                        "socket_dir": str(socket_dir),
                        "server_socket": str(instance.server_socket),
                        "ctrl_socket": str(instance.ctrl_socket),
                        "tcti": instance.tcti,
                        "generation": generation,
                        "manufactured": manufactured,
                        "since": now,
                    },
                )
            except BaseException:
                if instance is not None:
                    instance.kill()
                swtpm.wipe(work)
                raise
        return PowerOnResult(
            vm_uuid=vm.vm_uuid,
            name=vm.name,
            tcti=instance.tcti,
            generation=generation,
            manufactured=manufactured,
            pid=instance.pid,
            seconds=time.monotonic() - started,
            warnings=tuple(warnings),
        )

    def _already(self, vm: _Vm, record: dict) -> HostError:
        if self._attach(record).running:
            return AlreadyRunning(f"VM {vm.name} is already powered on here (TCTI {record.get('tcti')})")
        return HostError(
            f"VM {vm.name} did not power off cleanly: its swtpm (pid {record.get('pid')}) is gone and its clear "
            f"state is still in {record.get('workdir')}; run 'vtpm-host power-off {vm.path}' to seal it first"
        )

    def _stale(self, vm: _Vm, record: dict, warnings: list[str]) -> bool:
        """A record whose swtpm and clear state are both gone (the host restarted, /dev/shm was emptied) is
        dropped: there is nothing left to seal, and the .nvram holds the generation the VM was started from."""
        if self._attach(record).running or Path(record["state_dir"]).exists():
            return False
        self._record_path(vm.vm_uuid).unlink(missing_ok=True)
        warnings.append(
            f"VM {vm.name} was left powered on and its swtpm and clear state are gone (host restarted?); changes "
            f"since it started are lost, {vm.nvram_path.name} keeps generation {record.get('generation')}"
        )
        return True

    def _unseal_into(
        self, vm: _Vm, dek: bytes, last_seen: int, state_dir: Path, new_dek: bytes | None = None
    ) -> tuple[int, bool]:
        """Unseal into `state_dir`: (generation, whether it was sealed under
        the pending deep rekey's `new_dek`). With two DEKs, the one the
        header's key-safe reference names is tried first."""
        path = vm.nvram_path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as handle:
                blob = handle.read(nvram.MAX_PLAINTEXT + 2 * 1024 * 1024)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NvramRefused(f"{path} is a symbolic link; put the VM's .nvram file itself there") from None
            raise NvramRefused(f"cannot read {path} ({exc.strerror})") from None
        candidates = [(dek, False)]
        if new_dek is not None:
            try:
                names_new = nvram.read_header(blob).key_safe_ref == vm.pending_ref
            except nvram.NvramError:
                names_new = False
            candidates = [(new_dek, True), (dek, False)] if names_new else [(dek, False), (new_dek, True)]
        try:
            for index, (key, is_new) in enumerate(candidates):
                try:
                    contents = nvram.unseal(blob, key, expected_vm_uuid=vm.vm_uuid, min_generation=last_seen)
                    under_new = is_new
                    break
                except nvram.NvramCorrupt:
                    if index == len(candidates) - 1:
                        raise
        except nvram.NvramRollback as exc:
            raise RollbackRefused(
                f"{path}: {exc}; the vTPM was not started. Put back the newest copy of the file "
                f"(generation {last_seen} or later)"
            ) from None
        except nvram.NvramWrongVm as exc:
            raise NvramRefused(
                f"{path}: {exc}; the vTPM was not started. Put VM {vm.name}'s own .nvram beside {vm.path.name}"
            ) from None
        except nvram.NvramError as exc:
            raise NvramRefused(
                f"{path}: {exc}; the vTPM was not started. Restore the file from a backup "
                f"(or the .vmx, if its key safe is not this VM's)"
            ) from None
        nvram.write_state_dir(state_dir, contents.files)
        return contents.header.generation, under_new

    # Deep rekey ------------------------------------------------------------------------------

    def _pending_dek(self, vm: _Vm, warnings: list[str]) -> bytes | None:
        """The new DEK of a pending deep rekey (None: none, or refused: the VM
        then runs on, and is sealed, under its current DEK)."""
        if vm.problem is not None:
            warnings.append(vm.problem)
        if vm.pending_key_safe is None:
            return None
        try:
            return self.broker.unwrap(vm.pending_key_safe, vm.vm_uuid, vm.name)
        except (BrokerRefused, BrokerUnavailable) as exc:
            warnings.append(
                f"VM {vm.name} has a deep rekey pending, but its new key could not be unwrapped "
                f"({_one_line(exc)}); the .nvram stays under its current DEK until the next power-on or power-off"
            )
            return None

    def _reseal(self, vm: _Vm, new_dek: bytes, state_dir: Path, generation: int, warnings: list[str]) -> int:
        """The unsealed state, sealed under the deep rekey's new DEK as the next generation."""
        blob = nvram.seal(state_dir, new_dek, vm.vm_uuid, generation, vm.pending_ref)
        _write_nvram(vm, blob)
        self._report(vm, generation, warnings)
        return generation

    def _finish_rekey(self, vm: _Vm, warnings: list[str], *, switch: bool) -> None:
        """After a deep re-seal (`switch`): the new key safe goes into use in
        the .vmx; then (also for a switched rotation found in the .vmx) the
        broker retires the old KEK and the old key safe leaves the .vmx. A
        failure here is a warning: the .vmx in use opens, and the next
        power-on (or 'vtpm-mgmt vm rekey') finishes."""
        try:
            with vmx.locked(vm.path):
                if switch:
                    assert vm.pending_text is not None
                    self._switch_vmx(vm)
                    key_safe = vm.pending_text
                else:
                    key_safe = vmx.read(vm.path).key_safe
                if self._commit_rekey(vm, key_safe, warnings):
                    self._drop_previous(vm, key_safe)
        except vmx.VmxError as exc:
            warnings.append(
                f"the rekey of VM {vm.name} is not finished ({_one_line(exc)}); the next power-on finishes it"
            )

    def _switch_vmx(self, vm: _Vm) -> None:
        assert vm.pending_text is not None  # switched only with a pending key safe (the caller)
        config = vmx.read(vm.path)
        if config.pending_key_safe != vm.pending_text:
            raise vmx.VmxError(f"{vm.path} changed meanwhile (its pending key safe is another)")
        config.set(vmx.PREVIOUS_KEY_SAFE, config.key_safe)
        config.set(vmx.KEY_SAFE, vm.pending_text)
        # Just sealed under the new key safe: no older KEK to name.
        config.remove(vmx.PENDING_KEY_SAFE, vmx.PENDING_REKEY, vmx.NVRAM_KEY_REF)
        vmx.write(vm.path, config)

    def _commit_rekey(self, vm: _Vm, key_safe: str, warnings: list[str]) -> bool:
        try:
            self.broker.commit_rekey(vm.vm_uuid, key_safe)
            return True
        except HostError as exc:
            warnings.append(
                f"VM {vm.name} runs under its new key safe, but the broker has not retired the old KEK yet "
                f"({_one_line(exc)}); the next power-on or 'vtpm-mgmt vm rekey {vm.name}' finishes it"
            )
            return False

    def _drop_previous(self, vm: _Vm, key_safe: str) -> None:
        config = vmx.read(vm.path)
        if config.key_safe == key_safe and config.previous_key_safe is not None:
            config.remove(vmx.PREVIOUS_KEY_SAFE)
            vmx.write(vm.path, config)

    def _manufacture(self, vm: _Vm, dek: bytes, state_dir: Path, run_dir: Path, ref: str | None = None) -> int:
        """A new vTPM with EK certificates from the broker, sealed at once as generation 1.

        swtpm_setup's certificate tool is a thin client that hands each
        request to this process's relay (`broker.host.ek_relay`), which asks
        the broker on the kept connection. A `setup_config` given to the
        Agent (tests with a local EK CA) is used as it is."""
        relay: contextlib.AbstractContextManager[object]
        if self.setup_config is not None:
            config, relay = self.setup_config, contextlib.nullcontext()
        else:
            config = self._swtpm_setup_conf(run_dir)
            relay = EkCertificateRelay(run_dir, vm.vm_uuid, self.broker.ek_certificate, self.config.timeout)
        try:
            with relay:
                swtpm.manufacture(
                    state_dir, vm.vm_uuid, config=config, extra_args=EK_CERT_FLAGS, swtpm_setup=self.swtpm_setup
                )
        except swtpm.SwtpmError as exc:
            raise SwtpmFailed(f"manufacturing the vTPM of VM {vm.name} failed: {_setup_failure(exc)}") from None
        generation = 1
        blob = nvram.seal(state_dir, dek, vm.vm_uuid, generation, ref or vm.key_safe_ref)
        _write_nvram(vm, blob)
        return generation

    def _swtpm_setup_conf(self, run_dir: Path) -> Path:
        """swtpm_setup.conf for one run, in the VM's private run directory:
        create_certs_tool is the thin tool that hands each request to this
        process's relay (beside it: ek-relay.sock)."""
        tool = run_dir / ek_relay.TOOL_NAME
        write_atomic(tool, ek_relay.tool_wrapper(run_dir / ek_relay.SOCKET_NAME), 0o700)
        conf = run_dir / "swtpm_setup.conf"
        write_public(conf, f"create_certs_tool = {tool}\nactive_pcr_banks = sha256\n".encode())
        return conf

    # Power-off ----------------------------------------------------------------------------

    def power_off(self, vmx_path: str | os.PathLike[str]) -> PowerOffResult:
        started = time.monotonic()
        self.config.require_certificate()
        vm = _read_vmx(vmx_path)
        warnings: list[str] = []
        with self._vm_lock(vm):
            record = self._read_record(vm.vm_uuid)
            if record is None:
                raise NotRunning(f"VM {vm.name} ({vm.vm_uuid}) is not powered on on this host; nothing to power off")
            work = Path(record["workdir"])
            state_dir = Path(record["state_dir"])
            if self._stale(vm, record, warnings):
                return PowerOffResult(
                    vm_uuid=vm.vm_uuid,
                    name=vm.name,
                    nvram=str(vm.nvram_path),
                    generation=int(record["generation"]),
                    seconds=time.monotonic() - started,
                    warnings=tuple(warnings),
                )
            try:
                dek = self.broker.unwrap(vm.key_safe, vm.vm_uuid, vm.name)
            except (BrokerRefused, BrokerUnavailable) as exc:
                raise type(exc)(f"{exc} (VM {vm.name} keeps running; power it off again once this is fixed)") from None
            new_dek = self._pending_dek(vm, warnings)
            instance = self._attach(record)
            if not instance.running:
                warnings.append(f"swtpm of VM {vm.name} was no longer running; sealing the state it last wrote")
            try:
                instance.shutdown()
            except swtpm.SwtpmError as exc:
                warnings.append(f"swtpm of VM {vm.name} did not stop cleanly ({_one_line(exc)}); sealing its state")
            generation = int(record["generation"]) + 1
            try:
                files = nvram.read_state_dir(state_dir)
                if new_dek is not None:  # A pending deep rekey: sealed under the new DEK.
                    blob = nvram.seal(files, new_dek, vm.vm_uuid, generation, vm.pending_ref)
                else:
                    blob = nvram.seal(files, dek, vm.vm_uuid, generation, vm.key_safe_ref)
            except (nvram.NvramError, OSError) as exc:
                raise HostError(
                    f"cannot seal the vTPM state of VM {vm.name} ({_one_line(exc)}); the clear state stays in "
                    f"{state_dir}: fix that and run power-off again"
                ) from None
            del dek
            del files
            _write_nvram(vm, blob)
            self._report(vm, generation, warnings)
            if new_dek is not None:
                del new_dek
                self._finish_rekey(vm, warnings, switch=True)
            elif vm.previous:
                self._finish_rekey(vm, warnings, switch=False)
            swtpm.wipe(work)
            self._record_path(vm.vm_uuid).unlink(missing_ok=True)
        return PowerOffResult(
            vm_uuid=vm.vm_uuid,
            name=vm.name,
            nvram=str(vm.nvram_path),
            generation=generation,
            seconds=time.monotonic() - started,
            warnings=tuple(warnings),
        )

    # EK certificates after a CA swap --------------------------------------------------------

    def install_ek_certs(self, vmx_path: str | os.PathLike[str]) -> InstallEkResult:
        """Write the broker's newest EK certificates for the VM (re-issued by
        `vtpm-broker ca recertify`) into its vTPM's NV indices
        (broker/host/ek_install.py). A running vTPM is written through its
        swtpm (sealed at power-off as usual); a stopped one is unsealed into a
        private directory, written through a swtpm of its own, and sealed as
        the next generation (the broker is told), all or nothing."""
        from broker.host import ek_install

        started = time.monotonic()
        self.config.require_certificate()
        vm = _read_vmx(vmx_path)
        if not vm.has_vtpm:
            raise HostError(f"VM {vm.name} has no vTPM (vtpm.present is not TRUE in {vm.path}); nothing to install")
        certificates = self.broker.ek_certificates(vm.vm_uuid)
        if not certificates:
            raise HostError(
                f"the broker has issued no EK certificate for VM {vm.name} ({vm.vm_uuid}); power it on once "
                f"(which manufactures its vTPM), or re-certify it with 'vtpm-broker ca recertify --vm {vm.vm_uuid}'"
            )
        warnings: list[str] = []
        with self._vm_lock(vm):
            record = self._read_record(vm.vm_uuid)
            if record is not None and not self._stale(vm, record, warnings):
                if not self._attach(record).running:
                    raise self._already(vm, record)
                tcti = record["tcti"]
                planned = ek_install.check(certificates, ek_install.ek_public_keys(tcti), vm.name)
                installed = ek_install.install(tcti, planned, running=True)
                generation, running = int(record["generation"]), True
            else:
                if not (vm.nvram_path.exists() or vm.nvram_path.is_symlink()):
                    raise NvramRefused(
                        f"{vm.nvram_path} does not exist: VM {vm.name} has no vTPM yet; power it on once"
                    )
                if vm.pending_key_safe is not None:
                    raise HostError(
                        f"a deep rekey of VM {vm.name} is pending; power it on once (which finishes it), "
                        "then run install-ek-certs"
                    )
                dek = self.broker.unwrap(vm.key_safe, vm.vm_uuid, vm.name)
                last_seen = self.broker.nvram_generation(vm.vm_uuid)
                work = swtpm.private_workdir(prefix=f"vtpm-{vm.vm_uuid[:8]}-", base=self.workdir_base)
                try:
                    state_dir, socket_dir = work / "state", work / "run"
                    state_dir.mkdir(mode=0o700)
                    socket_dir.mkdir(mode=0o700)
                    generation, _ = self._unseal_into(vm, dek, last_seen, state_dir)
                    instance = swtpm.SwtpmInstance(state_dir, socket_dir, swtpm=self.swtpm_binary)
                    try:
                        instance.start()
                        planned = ek_install.check(certificates, ek_install.ek_public_keys(instance.tcti), vm.name)
                        installed = ek_install.install(instance.tcti, planned)
                        instance.shutdown()
                    except swtpm.SwtpmError as exc:
                        raise SwtpmFailed(f"swtpm failed for VM {vm.name}: {_one_line(exc)}") from None
                    finally:
                        instance.kill()
                    if any(i.changed for i in installed):
                        generation += 1
                        blob = nvram.seal(nvram.read_state_dir(state_dir), dek, vm.vm_uuid, generation, vm.key_safe_ref)
                        _write_nvram(vm, blob)
                        self._report(vm, generation, warnings)
                    del dek
                finally:
                    swtpm.wipe(work)
                running = False
        return InstallEkResult(
            vm_uuid=vm.vm_uuid,
            name=vm.name,
            running=running,
            generation=generation,
            certificates=tuple(
                {
                    "nv_index": f"{i.index:#010x}",
                    "type": i.cert_type,
                    "key_type": i.key_type,
                    "size": i.size,
                    "issuer": i.issuer,
                    "written": i.changed,
                }  # fmt: skip
                for i in installed
            ),
            seconds=time.monotonic() - started,
            warnings=tuple(warnings),
        )

    # Status ----------------------------------------------------------------------------------

    def status(self) -> list[RunningVm]:
        self.config  # noqa: B018 - a state directory that is not one is an error, not an empty list
        out: list[RunningVm] = []
        directory = self.state_dir / "running"
        if not directory.is_dir():
            return out
        for path in sorted(directory.glob("*.json")):
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
                out.append(
                    RunningVm(
                        vm_uuid=record["vm_uuid"],
                        name=record["name"],
                        tcti=record["tcti"],
                        generation=int(record["generation"]),
                        since=float(record["since"]),
                        pid=int(record["pid"]),
                        running=self._attach(record).running,
                        vmx=record["vmx"],
                    )
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue  # A record being written or damaged: status only reports.
        return sorted(out, key=lambda r: (r.name, r.vm_uuid))

    # Internals ----------------------------------------------------------------------------------

    def _attach(self, record: dict) -> swtpm.SwtpmInstance:
        return swtpm.SwtpmInstance.attach(
            record["state_dir"], record["socket_dir"], int(record["pid"]), swtpm=self.swtpm_binary
        )

    def _report(self, vm: _Vm, generation: int, warnings: list[str]) -> None:
        """Tell the broker; a broker that cannot be reached only delays rollback protection."""
        try:
            self.broker.report_generation(vm.vm_uuid, generation)
        except BrokerUnavailable as exc:
            warnings.append(
                f"{vm.nvram_path.name} is saved as generation {generation}, but the broker was not told "
                f"({_one_line(exc)}); the next power-on reports it"
            )

    def _record_path(self, vm_uuid: str) -> Path:
        return self.state_dir / "running" / f"{vm_uuid}.json"

    def _read_record(self, vm_uuid: str) -> dict | None:
        try:
            return json.loads(self._record_path(vm_uuid).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise HostError(
                f"the running record {self._record_path(vm_uuid)} is unreadable ({exc}); remove it"
            ) from None

    def _write_record(self, vm: _Vm, record: dict) -> None:
        directory = self.state_dir / "running"
        directory.mkdir(mode=0o700, exist_ok=True)
        # Atomic but not fsynced: a running record means nothing after a
        # crash of the host (its swtpm and clear state are gone with it;
        # docs/host-agent.md), and the fsync was a sixth of a power-on's
        # time in the agent.
        write_atomic(self._record_path(vm.vm_uuid), json.dumps(record, indent=2).encode() + b"\n", 0o600, durable=False)

    @contextlib.contextmanager
    def _vm_lock(self, vm: _Vm) -> Iterator[None]:
        directory = self.state_dir / "locks"
        directory.mkdir(mode=0o700, exist_ok=True)
        fd = os.open(directory / f"{vm.vm_uuid}.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            if not flock_within(fd, self.lock_timeout, poll=0.01):
                raise HostError(
                    f"another vtpm-host command has been working on VM {vm.name} for over "
                    f"{self.lock_timeout:g} s; wait for it to finish and try again"
                )
            yield
        finally:
            os.close(fd)  # Releases the lock.


def _read_vmx(path: str | os.PathLike[str]) -> _Vm:
    path = Path(path).absolute()
    try:
        parsed = vmx.read(path)
        vm_uuid = parsed.vm_uuid
        key_safe_text = parsed.key_safe
        nvram_name = parsed.nvram_name
    except vmx.VmxError as exc:
        raise HostError(f"{_one_line(exc)}; give the VM's .vmx file") from None
    try:
        key_safe = parse_key_safe(key_safe_text)
    except KeySafeError as exc:
        raise HostError(f"{path}: encryption.keySafe does not parse ({exc}); restore the .vmx from a backup") from None
    pending, pending_text, problem = None, None, None
    try:
        if parsed.pending_rekey == "deep":
            pending_text = parsed.pending_key_safe
            pending = parse_key_safe(pending_text)
    except (vmx.VmxError, KeySafeError) as exc:
        pending, pending_text = None, None
        problem = f"{path}: the pending deep rekey is ignored ({_one_line(exc)}); run 'vtpm-mgmt vm rekey --abort'"
    return _Vm(
        path=path,
        name=parsed.name or vm_uuid,
        vm_uuid=str(uuid_module.UUID(vm_uuid)),
        key_safe=key_safe,
        has_vtpm=parsed.has_vtpm,
        nvram_name=nvram_name,
        pending_key_safe=pending,
        pending_text=pending_text if pending is not None else None,
        previous=parsed.previous_key_safe is not None,
        problem=problem,
    )


def _write_nvram(vm: _Vm, blob: bytes) -> None:
    try:
        nvram.write_atomic(vm.nvram_path, blob)
    except OSError as exc:
        raise HostError(f"cannot write {vm.nvram_path} ({exc.strerror}); check the datastore") from None


def _setup_failure(exc: Exception) -> str:
    """swtpm_setup's output is long; the certificate tool's own line says why, when it is the cause."""
    text = str(exc)
    for part in text.split(" | "):
        if "vtpm-ek-certtool:" in part and ("refused" in part or "cannot" in part or "error" in part):
            return " ".join(part.split()) + "; check that the VM is placed on this host and the broker's API URL"
    return _one_line(exc)[:600]


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())
