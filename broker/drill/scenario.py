"""The drill's story, step by step (issue 6, item 4).

Every step is an operator's command or a guest's tpm2-tools call; the drill
only sequences them, keeps what each VM showed before the disaster, and
compares after the recovery. The per-VM work (power-on, guest, power-off)
runs in `runner.ToolPool` workers.

With `attest` (issue 18, item 5) every host has its own TPM (swtpm), enrolls
it at the broker and attests; a default policy is captured from the first
host. After the recovery the last host reboots into a tampered boot (one
unexpected measurement more in PCR 7): its VMs' power-ons must be refused,
every other VM recovers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from broker import vmx
from broker.drill import guest
from broker.drill.processes import Broker, Kms, StepFailed, restore_broker, run, start_broker, start_kms
from broker.drill.runner import ToolPool, run_forked
from broker.host.host_tpm import HostTpm, HostTpmError, HostTpmProcess, measure_boot
from broker.keysafe import parse_key_safe

__all__ = ["Drill", "VmReport"]

PROVIDER = "kms-prod"
INSTANCE_A = "vcenter-a"
INSTANCE_B = "vcenter-b"
SECRET_BYTES = 32
# What the tampered host's boot measures into PCR 7 on top of the golden boot.
TAMPERED_MEASUREMENT = hashlib.sha256(b"an unexpected boot component").digest()
# What vtpm-host says when the broker refuses its host's attestation (broker/host/broker_client.py).
ATTESTATION_REFUSED = "refused this host's attestation"


@dataclass
class VmReport:
    """What one VM showed before the disaster and after the recovery."""

    name: str
    vmx: Path
    vm_uuid: str = ""
    kek_before: str = ""
    kek_after: str = ""
    host_before: str = ""
    host_after: str = ""
    secret: bytes = b""
    secret_after: bytes | None = None
    ek_before: bytes | None = None
    ek_after: bytes | None = None
    ek_chains: bool = False
    kek_in_kms: bool = False
    # A copy of the .nvram at generation 1 (--lose broker): must be refused after the restore.
    stale: Path | None = None
    rollback_refused: bool = False
    # --attest: its host after the recovery booted tampered, and its power-on was refused (as it must be).
    attestation_refused: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def nv_match(self) -> bool:
        return self.secret_after is not None and self.secret_after == self.secret

    @property
    def ek_match(self) -> bool:
        return self.ek_before is not None and self.ek_after == self.ek_before

    @property
    def kek_match(self) -> bool:
        return bool(self.kek_before) and self.kek_after == self.kek_before and self.kek_in_kms

    @property
    def recovered(self) -> bool:
        return not self.errors and self.nv_match and self.ek_match and self.ek_chains and self.kek_match


# --- Per-VM jobs (run in pool workers; module-level so they pickle) -------------------------------


def vm_cycle(job: dict) -> dict:
    """Power on, the guest's step, power off; never leaves the vTPM running."""
    started = time.monotonic()
    answer: dict = {"name": job["name"], "error": None, "secret": None, "ek": None}
    on = run_forked("vtpm-host", "--state-dir", job["host_state"], "power-on", job["vmx"])
    if on.returncode != 0:
        answer["error"] = f"power-on on {job['host']} failed: {_last_line(on.stderr)}"
        answer["seconds"] = time.monotonic() - started
        return answer
    tcti = on.stdout.strip().splitlines()[-1] if on.stdout.strip() else ""
    try:
        if job.get("stale_copy"):
            # The manufactured vTPM, sealed as generation 1: an old copy for the rollback check.
            nvram = Path(job["vmx"]).with_name(vmx.read(Path(job["vmx"])).nvram_name)
            shutil.copyfile(nvram, job["stale_copy"])
        if job.get("write") is not None:
            guest.write_secret(tcti, job["write"])
        answer["secret"] = guest.read_secret(tcti, job["size"])
        answer["ek"] = guest.read_ek_certificate(tcti)
    except guest.GuestError as exc:
        answer["error"] = f"guest: {exc}"
    finally:
        off = run_forked("vtpm-host", "--state-dir", job["host_state"], "power-off", job["vmx"])
        if off.returncode != 0 and answer["error"] is None:
            answer["error"] = f"power-off on {job['host']} failed: {_last_line(off.stderr)}"
    answer["seconds"] = time.monotonic() - started
    return answer


def power_on_only(job: dict) -> dict:
    """The disaster's proof: a power-on that must be refused (powered off again if not)."""
    on = run_forked("vtpm-host", "--state-dir", job["host_state"], "power-on", job["vmx"])
    if on.returncode == 0:
        run_forked("vtpm-host", "--state-dir", job["host_state"], "power-off", job["vmx"])
    return {"returncode": on.returncode, "error": _last_line(on.stderr)}


def vm_create(job: dict) -> dict:
    names = [arg for name in job["names"] for arg in ("--name", name)]
    hosts = [arg for host in job["hosts"] for arg in ("--host", host)]
    done = run_forked(
        "vtpm-mgmt",
        "--state-dir",
        job["state"],
        "vm",
        "create",
        *names,
        "--datastore",
        job["datastore"],
        "--vtpm",
        *hosts,
    )
    return {"returncode": done.returncode, "error": _last_line(done.stderr), "stdout": done.stdout}


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""


# --- The drill -----------------------------------------------------------------------------------


class Drill:
    def __init__(
        self,
        workdir: Path,
        vms: int,
        hosts: int,
        pool: ToolPool,
        jobs: int,
        say: Callable[[str], None],
        progress: Callable[[str, int], Callable[[], None]],
        lose: frozenset[str] = frozenset({"management"}),
        ticker: Callable[[str], contextlib.AbstractContextManager[object]] | None = None,
        kms_port: int = 0,
        attest: bool = False,
    ):
        self.workdir = workdir
        # Host attestation: a TPM per host, a default policy, one tampered host after the recovery.
        self.attest = attest
        self.host_tpms: dict[str, HostTpmProcess] = {}
        self.attested_hosts = 0
        self.tampered_host: str | None = None
        self.tampered_error = ""
        # "management" always; "broker": the broker host too, restored from its backup.
        self.lose_broker = "broker" in lose
        self.broker_restored = False
        self.before_loss: dict = {}
        self.vm_count = vms
        self.host_count = hosts
        self.pool = pool
        self.jobs = jobs
        self.say = say
        self.progress = progress
        # Around every step: says it is still running (kmip_core.progress in vtpm-drill).
        self.ticker = ticker or (lambda title: contextlib.nullcontext())
        self.kms_port = kms_port  # 0: a free port
        self.kms: Kms | None = None
        self.broker: Broker | None = None
        self.datastore = workdir / "datastore"
        self.hosts = [f"esx-{i + 1:02d}" for i in range(hosts)]
        self.vms: list[VmReport] = []
        self.disaster: dict = {}
        self.audit: dict = {}
        self.steps: list[tuple[str, float]] = []
        # (title, wall-clock start, end): where each step's audit records fall.
        self.windows: list[tuple[str, float, float]] = []

    def host_state(self, host: str) -> Path:
        return self.workdir / "hosts" / host

    def host_tpm_dir(self, host: str) -> Path:
        return self.workdir / "host-tpms" / host

    def instance_state(self, name: str) -> Path:
        return self.workdir / "mgmt" / name

    # The story ------------------------------------------------------------------------------

    def run(self) -> None:
        self.set_up()
        self.create_vms()
        self._step("first power-on: manufacture, guest writes its secret", self._first_boot)
        if self.lose_broker:
            self._step("broker backup", self._backup_broker)
        self._step("disaster", self._disaster)
        if self.lose_broker:
            self._step("broker host lost", self._lose_broker)
            self._step("broker restored from its backup", self._restore_broker)
        self._step(f"management instance {INSTANCE_B}", lambda: self._enroll(INSTANCE_B))
        self._step("hosts re-registered", lambda: self._add_hosts(INSTANCE_B, again=True))
        self._step("vm register --datastore", self._register)
        if self.lose_broker:
            if self.attest:
                # The restored broker serves on new ports: the hosts' cached tokens were for the old one.
                self._step("hosts attest to the restored broker", self._attest_all)
            self._step("stale .nvram refused after the restore", self._stale_refused)
        if self.attest:
            self.tampered_host = self.hosts[-1]
            self._step(f"tampered boot of {self.tampered_host}", self._tamper)
            self._step("hosts attest after the recovery", self._attest_all)
        self._step("power-on after recovery, guest reads back", self._second_boot)
        self._step("verification", self._verify)
        self._step("audit trail", self._read_audit)

    def set_up(self, *, kms_audit: bool = True) -> None:
        """The world before any VM: a KMS (its audit trail on unless
        `kms_audit` is False), the broker, management instance A enrolled
        and approved, and its hosts (with `attest`: each with its own TPM,
        enrolled, and attested under a default policy captured from the
        first). Also the start of bench/boot_storm.py."""
        self._step("KMS", lambda: self._start_kms(audit=kms_audit))
        self._step("broker", self._start_broker)
        self._step(f"management instance {INSTANCE_A}", lambda: self._enroll(INSTANCE_A))
        if self.attest:
            self._step(f"{self.host_count} host TPMs", self._start_host_tpms)
        self._step(f"{self.host_count} hosts", lambda: self._add_hosts(INSTANCE_A))
        if self.attest:
            self._step("host TPMs enrolled", self._enroll_host_tpms)
            self._step(f"attestation policy captured from {self.hosts[0]}", self._capture_policy)
            self._step("every host attests", self._first_attestation)

    def create_vms(self) -> None:
        """Instance A creates the drill's VMs through the broker API."""
        self._step(f"{self.vm_count} VMs with a vTPM", self._create_vms)

    def _step(self, title: str, action: Callable[[], str | None]) -> None:
        started, wall = time.monotonic(), time.time()
        with self.ticker(title):
            detail = action()
        seconds = time.monotonic() - started
        self.steps.append((title, seconds))
        self.windows.append((title, wall, time.time()))
        self.say(f"[bold]{title}[/bold] ({seconds:.1f} s)" + (f": {detail}" if detail else ""))

    def _start_kms(self, audit: bool = True) -> str:
        self.kms = start_kms(self.workdir / "kms", runner=self.pool.run, audit=audit, port=self.kms_port)
        return f"kms-admin pki init + master-key new; kms-server on 127.0.0.1:{self.kms.port}"

    def _start_broker(self) -> str:
        assert self.kms is not None
        self.broker = start_broker(self.workdir / "broker", self.kms, PROVIDER, runner=self.pool.run)
        return (
            f"vtpm-broker init, kms-admin pki sign-csr of its KMS client CSR; API {self.broker.url}, "
            f"gateway {self.broker.gateway}, key provider {PROVIDER}"
        )

    def _mgmt(self, instance: str, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess:
        return self.pool.run("vtpm-mgmt", "--state-dir", self.instance_state(instance), *args, check=check)

    def _enroll(self, instance: str) -> str:
        broker = self.broker
        assert broker is not None
        self._mgmt(
            instance,
            "init",
            "--name",
            instance,
            "--broker",
            broker.url,
            "--ca",
            broker.trust_ca,
            "--provider",
            PROVIDER,
        )
        # A secret goes in a file, not on a command line.
        token_file = self.workdir / f"{instance}.token"
        token_file.touch(mode=0o600)
        token_file.write_text(broker.token(instance) + "\n")
        self._mgmt(instance, "enroll", "--token-file", token_file)
        token_file.unlink()
        broker.admin("approve", instance)
        self._mgmt(instance, "enroll", "--wait", "30")
        return "vtpm-mgmt init; vtpm-broker admin token; vtpm-mgmt enroll; vtpm-broker admin approve; enrolled"

    def _add_hosts(self, instance: str, again: bool = False) -> str:
        broker = self.broker
        assert broker is not None
        certs = self.workdir / "host-certs" / instance
        certs.mkdir(parents=True, exist_ok=True)
        for host in self.hosts:
            state = self.host_state(host)
            # Again on the same host: same key, a new CSR for the new instance.
            tpm = ["--tpm", self.host_tpms[host].tcti] if self.attest else []
            self.pool.run(
                "vtpm-host", "--state-dir", state, "init", "--name", host,
                "--gateway", broker.gateway, "--api", broker.url, "--ca", broker.trust_ca, *tpm,
            )  # fmt: skip
            self._mgmt(
                instance, "host", "add", "--name", host, "--csr", state / "host.csr", "--out", certs / f"{host}.pem"
            )
            self.pool.run("vtpm-host", "--state-dir", state, "install-cert", "--cert", certs / f"{host}.pem")
        verb = "re-registered by" if again else "registered by"
        init = "vtpm-host init --tpm" if self.attest else "vtpm-host init"
        return f"{', '.join(self.hosts)} {verb} {instance} ({init}, vtpm-mgmt host add, vtpm-host install-cert)"

    # Host attestation (--attest) ----------------------------------------------------------------

    def _host(self, host: str, *args: str | os.PathLike[str], check: bool = True) -> subprocess.CompletedProcess:
        return self.pool.run("vtpm-host", "--state-dir", self.host_state(host), *args, check=check)

    def _boot_host_tpm(self, host: str, tampered: bool = False) -> None:
        """What the host's firmware does at power-on: measure the boot into PCRs 0-7; a tampered
        boot measures one thing more into PCR 7."""
        tpm = HostTpm(self.host_tpms[host].tcti, self.host_tpm_dir(host) / "scratch")
        try:
            measure_boot(tpm)
            if tampered:
                tpm.pcr_extend(7, "sha256", TAMPERED_MEASUREMENT)
        except HostTpmError as exc:
            raise StepFailed(f"the boot of {host}'s TPM failed: {exc}") from None

    def _start_host_tpms(self) -> str:
        for host in self.hosts:
            tpm = HostTpmProcess(self.host_tpm_dir(host) / "state")
            self.host_tpms[host] = tpm
            try:
                tpm.start()
            except HostTpmError as exc:
                raise StepFailed(f"the TPM of {host} did not start: {exc}") from None
            self._boot_host_tpm(host)
        return (
            f"a TPM per host (swtpm, manufactured with an EK), each booted: the same measurements "
            f"into PCRs 0-7, so every host has the same golden values ({self.workdir.name}/host-tpms/)"
        )

    def _enroll_host_tpms(self) -> str:
        broker = self.broker
        assert broker is not None
        eks = self.workdir / "host-eks"
        eks.mkdir(exist_ok=True)
        for host in self.hosts:
            ek = eks / f"{host}-ek.pem"
            self._host(host, "attest", "ek-pub", "--out", ek)
            broker.admin("attest", "pin-ek", host, "--ek-pub", str(ek))
            self._host(host, "attest", "enroll")
        return (
            "per host: vtpm-host attest ek-pub (EK and AK made persistent), vtpm-broker admin attest pin-ek, "
            "vtpm-host attest enroll (the AK proven by MakeCredential/ActivateCredential)"
        )

    def _capture_policy(self) -> str:
        broker = self.broker
        assert broker is not None
        first = self.hosts[0]
        # No policy covers it yet: its verified quote is kept as its evidence, the capture's source.
        self._host(first, "attest", "now", "--json")
        captured = broker.admin("attest-policy", "capture", "--default", "--from-host", first)
        return (
            f"vtpm-host attest now on {first}; vtpm-broker admin attest-policy capture --default --from-host {first}: "
            f"{_first_line(captured.stdout)}"
        )

    def _first_attestation(self) -> str:
        attested, refused = self._attest_hosts(self.hosts)
        self.attested_hosts = len(attested)
        shown = "".join(f"; {host} REFUSED: {error}" for host, error in refused.items())
        return f"vtpm-host attest now: {len(attested)}/{len(self.hosts)} hosts got a token{shown}"

    def _attest_hosts(self, hosts: list[str]) -> tuple[list[str], dict[str, str]]:
        """`vtpm-host attest now` on each host: (the hosts that got a token, {refused host: its error})."""
        attested: list[str] = []
        refused: dict[str, str] = {}
        for host in hosts:
            done = self._host(host, "attest", "now", "--json", check=False)
            if done.returncode != 0:
                refused[host] = _last_line(done.stderr).removeprefix("vtpm-host: error: ")
                continue
            try:
                token = json.loads(done.stdout).get("attested") is True
            except ValueError:
                token = False
            if token:
                attested.append(host)
            else:
                refused[host] = "attested, but no policy covers it: no token"
        return attested, refused

    def _tamper(self) -> str:
        host = self.tampered_host
        assert host is not None
        try:
            self.host_tpms[host].reboot()
        except HostTpmError as exc:
            raise StepFailed(f"{host}'s TPM did not reboot: {exc}") from None
        self._boot_host_tpm(host, tampered=True)
        return (
            f"{host} rebooted into something else: its TPM reset, the same boot measured into PCRs 0-7 "
            f"and one unexpected measurement more into PCR 7 (sha256 {TAMPERED_MEASUREMENT.hex()[:16]}...)"
        )

    def _attest_all(self) -> str:
        """Every host attests now: a good one gets a fresh token for the power-ons that follow, the
        tampered one (if any yet) must be refused."""
        attested, refused = self._attest_hosts(self.hosts)
        tampered = self.tampered_host
        if tampered is not None and tampered in attested:
            raise StepFailed(f"{tampered} booted tampered and still got an attestation token")
        if tampered in refused:
            self.tampered_error = refused[tampered]
        shown = "".join(
            f"; {host} refused{' (tampered, as it must be)' if host == tampered else ''}: {error}"
            for host, error in refused.items()
        )
        return f"vtpm-host attest now: {len(attested)}/{len(self.hosts)} hosts got a token{shown}"

    def _create_vms(self) -> str:
        self.datastore.mkdir(parents=True, exist_ok=True)
        names = [f"vm-{i + 1:03d}" for i in range(self.vm_count)]
        # A few vtpm-mgmt processes side by side, each round-robin over the hosts.
        chunks = max(1, min(self.jobs, len(names) // 10 or 1))
        jobs = [
            {
                "state": str(self.instance_state(INSTANCE_A)),
                "names": names[i::chunks],
                "hosts": self.hosts[i % len(self.hosts) :] + self.hosts[: i % len(self.hosts)],
                "datastore": str(self.datastore),
            }
            for i in range(chunks)
        ]
        for answer in self.pool.map(vm_create, jobs):
            if answer["returncode"] != 0:
                raise StepFailed(f"vtpm-mgmt vm create failed: {answer['error']}")
        listed = self._vm_list(INSTANCE_A)
        for name in names:
            path = self.datastore / name / f"{name}.vmx"
            config = vmx.read(path)
            report = VmReport(name=name, vmx=path, vm_uuid=config.vm_uuid)
            report.kek_before = parse_key_safe(config.key_safe).kms_key_id
            report.host_before = listed[config.vm_uuid]["host"] or ""
            report.secret = os.urandom(SECRET_BYTES)
            self.vms.append(report)
        return f"vtpm-mgmt vm create --vtpm: {len(names)} .vmx files on {self.datastore}"

    def _vm_list(self, instance: str) -> dict[str, dict]:
        listed = json.loads(self._mgmt(instance, "vm", "list", "--json").stdout)
        return {vm["vm_uuid"]: vm for vm in listed}

    def _cycle_all(self, label: str, host_of: Callable[[VmReport], str], write: bool) -> list[dict]:
        if write and self.lose_broker:
            (self.workdir / "stale").mkdir(exist_ok=True)
            for vm in self.vms:
                vm.stale = self.workdir / "stale" / f"{vm.name}.nvram"
        jobs = [
            {
                "name": vm.name,
                "vmx": str(vm.vmx),
                "host": host_of(vm),
                "host_state": str(self.host_state(host_of(vm))),
                "write": vm.secret if write else None,
                "size": SECRET_BYTES,
                "stale_copy": str(vm.stale) if write and vm.stale else None,
            }
            for vm in self.vms
        ]
        advance = self.progress(label, len(jobs))
        answers = []
        for answer in self.pool.map(vm_cycle, jobs):
            answers.append(answer)
            advance()
        return answers

    def _first_boot(self) -> str:
        by_name = {vm.name: vm for vm in self.vms}
        answers = self._cycle_all("first power-on", lambda vm: vm.host_before, write=True)
        for answer in answers:
            vm = by_name[answer["name"]]
            if answer["error"]:
                vm.errors.append(f"before the disaster: {answer['error']}")
                continue
            vm.ek_before = answer["ek"]
            if answer["secret"] != vm.secret:
                vm.errors.append("before the disaster: the NV secret read back differs from the one written")
        ok = sum(1 for a in answers if not a["error"])
        slowest = max((a["seconds"] for a in answers), default=0.0)
        return (
            f"{ok}/{len(answers)} VMs: vtpm-host power-on (swtpm_setup with EK certificates from the broker), "
            f"tpm2_nvdefine + tpm2_nvwrite a secret, tpm2_nvread the EK certificate, power-off "
            f"(slowest VM {slowest:.1f} s)"
        )

    def _disaster(self) -> str:
        broker = self.broker
        assert broker is not None
        shutil.rmtree(self.instance_state(INSTANCE_A))
        broker.admin("revoke", INSTANCE_A)
        vm = self.vms[0]
        answer = next(
            self.pool.map(
                power_on_only,
                [{"vmx": str(vm.vmx), "host_state": str(self.host_state(vm.host_before)), "host": vm.host_before}],
            )
        )
        self.disaster = {"vm": vm.name, "refused": answer["returncode"] != 0, "error": answer["error"]}
        if answer["returncode"] == 0:
            raise StepFailed(f"VM {vm.name} still powered on after {INSTANCE_A} was revoked")
        return (
            f"{INSTANCE_A}'s state directory deleted, vtpm-broker admin revoke {INSTANCE_A}; "
            f"power-on of {vm.name} now fails: {answer['error']}"
        )

    # Losing the broker host (--lose management,broker) -----------------------------------------

    def _backup_broker(self) -> str:
        """The operator's routine: a backup while the broker serves, and the
        master key kept elsewhere (here: a 'vault' directory)."""
        broker = self.broker
        assert broker is not None
        backups, vault = self.workdir / "backups", self.workdir / "vault"
        backups.mkdir(mode=0o700)
        vault.mkdir(mode=0o700)
        self.backup_file = backups / "broker.vtbak"
        self.vault_key = vault / "broker-master.key"
        self.vault_key.touch(mode=0o600)
        self.vault_key.write_bytes((broker.data_dir / "master.key").read_bytes())
        self.pool.run("vtpm-broker", "--config", broker.config, "backup", "--out", self.backup_file)
        self.before_loss = self._broker_view()
        size = self.backup_file.stat().st_size
        return (
            f"vtpm-broker backup --out {self.backup_file.relative_to(self.workdir)} ({size} bytes) while it serves; "
            f"its master key copied to {self.vault_key.relative_to(self.workdir)}, apart from the backups"
        )

    def _broker_view(self) -> dict:
        """What must survive the broker host: instances with their hosts and
        VMs, and the EK CA (`vtpm-broker admin list --json`, `ca show`)."""
        broker = self.broker
        assert broker is not None
        listed = json.loads(broker.admin("list", "--json").stdout)
        instances = {i["name"]: (i["hosts"], i["vms"], i["cert_fingerprint"]) for i in listed}
        ca = self.pool.run("vtpm-broker", "--config", broker.config, "ca", "show").stdout
        return {"instances": instances, "ek_ca": ca}

    def _lose_broker(self) -> str:
        broker = self.broker
        assert broker is not None
        broker.kill()
        shutil.rmtree(broker.workdir)
        port = broker.api_port
        self.broker = None
        return (
            f"vtpm-broker (API port {port}) killed, its directory {broker.workdir.name}/ deleted: database, CAs, keys"
        )

    def _restore_broker(self) -> str:
        assert self.kms is not None
        self.broker = restore_broker(
            self.workdir / "broker-restored", self.kms, PROVIDER, self.backup_file, self.vault_key,
            runner=self.pool.run,
        )  # fmt: skip
        after = self._broker_view()
        if after != self.before_loss:
            raise StepFailed(
                f"the restored broker differs from the one backed up: {after} instead of {self.before_loss}"
            )
        # The backup predates the disaster: trust decisions made since are made again.
        self.broker.admin("revoke", INSTANCE_A)
        self.broker_restored = True
        return (
            f"new directory, master key from the vault, vtpm-broker restore --from {self.backup_file.name}, "
            f"vtpm-broker run on new ports (API {self.broker.url}); instances, hosts, VMs and EK CA as backed up; "
            f"vtpm-broker admin revoke {INSTANCE_A} again (the backup predates the revoke)"
        )

    def _stale_refused(self) -> str:
        """Every VM's generation-1 copy put back in place of its .nvram: the
        restored broker's generation record must make each power-on fail as a
        rollback. The current .nvram is put back afterwards."""
        todo = [vm for vm in self.vms if vm.stale is not None and vm.stale.exists() and vm.host_after]
        current = {}
        for vm in todo:
            assert vm.stale is not None  # todo holds the VMs with a stale copy
            nvram = vm.vmx.with_name(vmx.read(vm.vmx).nvram_name)
            current[vm.name] = (nvram, nvram.read_bytes())
            shutil.copyfile(vm.stale, nvram)
        jobs = [{"vmx": str(vm.vmx), "host_state": str(self.host_state(vm.host_after)), "host": vm.host_after}
                for vm in todo]  # fmt: skip
        try:
            answers = list(self.pool.map(power_on_only, jobs))
        finally:
            for nvram, data in current.values():
                nvram.write_bytes(data)
        shown = ""
        for vm, answer in zip(todo, answers, strict=True):
            if answer["returncode"] != 0 and "rollback" in answer["error"]:
                vm.rollback_refused = True
                shown = shown or answer["error"]
            else:
                vm.errors.append(
                    "a .nvram of generation 1 was not refused as a rollback after the restore: "
                    + (answer["error"] or "it powered on")
                )
        refused = sum(1 for vm in self.vms if vm.rollback_refused)
        return f"{refused}/{len(todo)} power-ons of a generation-1 copy refused: {shown}"

    def _register(self) -> str:
        # The hosts in the other order: most VMs now run on another host than
        # before, which unseals the .nvram that travelled with the VM.
        hosts = [arg for host in reversed(self.hosts) for arg in ("--host", host)]
        done = self._mgmt(INSTANCE_B, "vm", "register", "--datastore", self.datastore, *hosts, check=False)
        summary = next((line for line in done.stdout.splitlines() if "registered" in line), "")
        if done.returncode != 0:
            failures = [line for line in done.stdout.splitlines() if line.startswith("FAILED")]
            for line in failures:
                for vm in self.vms:
                    if f"/{vm.name}/" in line:
                        vm.errors.append(f"vm register: {line}")
            if not failures:
                raise StepFailed(f"vtpm-mgmt vm register failed: {_last_line(done.stderr)}")
        listed = self._vm_list(INSTANCE_B)
        for vm in self.vms:
            record = listed.get(vm.vm_uuid)
            if record is None:
                if not vm.errors:
                    vm.errors.append(f"not registered to {INSTANCE_B}")
                continue
            vm.host_after = record["host"] or ""
            vm.kek_after = record["kms_key_id"] or ""
        return summary

    def _second_boot(self) -> str:
        by_name = {vm.name: vm for vm in self.vms}
        todo = [vm for vm in self.vms if vm.host_after]
        saved, self.vms = self.vms, todo
        try:
            answers = self._cycle_all("power-on after recovery", lambda vm: vm.host_after, write=False)
        finally:
            self.vms = saved
        for answer in answers:
            vm = by_name[answer["name"]]
            if self.tampered_host is not None and vm.host_after == self.tampered_host:
                # Its host booted tampered: the power-on must be refused for the host's attestation.
                if answer["error"] and ATTESTATION_REFUSED in answer["error"]:
                    vm.attestation_refused = True
                    self.tampered_error = self.tampered_error or answer["error"].replace("vtpm-host: error: ", "")
                else:
                    vm.errors.append(
                        f"after recovery: its host {vm.host_after} booted tampered, yet "
                        + (f"its power-on failed for another reason: {answer['error']}" if answer["error"]
                           else "it powered on")
                    )  # fmt: skip
                continue
            if answer["error"]:
                vm.errors.append(f"after recovery: {answer['error']}")
                continue
            vm.secret_after = answer["secret"]
            vm.ek_after = answer["ek"]
        ok = sum(1 for vm in self.vms if vm.secret_after is not None and not vm.attestation_refused)
        tampered = self.tampered_vms()
        others = len(self.vms) - len(tampered)
        text = f"{ok}/{others} VMs powered on by their new hosts; tpm2_nvread of the secret and the EK certificate"
        if self.tampered_host is not None:
            refused = sum(1 for vm in tampered if vm.attestation_refused)
            text += f"; {refused}/{len(tampered)} power-ons on the tampered host {self.tampered_host} refused" + (
                f": {self.tampered_error}" if self.tampered_error else ""
            )
        return text

    def tampered_vms(self) -> list[VmReport]:
        """The VMs placed on the tampered host by the recovery (--attest): their power-ons must be refused."""
        if self.tampered_host is None:
            return []
        return [vm for vm in self.vms if vm.host_after == self.tampered_host]

    def _verify(self) -> str:
        anchors = self._ek_ca_certificates()
        for vm in self.vms:
            if vm.ek_after is not None:
                vm.ek_chains = _chains(vm.ek_after, anchors)
            # The .vmx on the datastore still names the same KEK.
            if parse_key_safe(vmx.read(vm.vmx).key_safe).kms_key_id != vm.kek_before:
                vm.errors.append("the .vmx names another KEK than before the disaster")
        self._check_keks_in_kms()
        ok = sum(1 for vm in self.vms if vm.recovered)
        tampered = self.tampered_vms()
        text = (
            f"{ok}/{len(self.vms) - len(tampered)} VMs: same NV secret, byte-identical EK certificate chaining to "
            "the broker's EK CA, same KEK (in the .vmx, at the broker and in the KMS)"
        )
        if tampered:
            refused = sum(1 for vm in tampered if vm.attestation_refused)
            text += (
                f"; the {len(tampered)} VMs of the tampered host {self.tampered_host}: {refused} refused as expected"
            )
        return text

    def _ek_ca_certificates(self) -> list[x509.Certificate]:
        """The broker's EK CA certificates (active and retired), public data.

        Read from the broker's database through its own repository, on the
        broker host, as `vtpm-broker ca show` does: the broker has no command
        that prints the certificate itself yet.
        """
        from broker.config import load_config
        from broker.db import Database

        assert self.broker is not None
        cfg = load_config(str(self.broker.config))
        db = Database(cfg.storage.db_url)
        try:
            rows = db.list_cas("ca:ek")
        finally:
            db.close()
        certificates = []
        for row in rows:
            certificates.extend(x509.load_pem_x509_certificates(row.cert_pem.encode("ascii")))
        if not certificates:
            raise StepFailed("the broker has no EK CA")
        return certificates

    def _check_keks_in_kms(self) -> None:
        """Each KEK still exists in the KMS and names its VM (KMIP GetAttributes as the KMS administrator)."""
        from kmip_core.client import KmipClient

        kms = self.kms
        assert kms is not None
        with KmipClient([f"127.0.0.1:{kms.port}"], kms.pki / "admin.pem", kms.pki / "admin.key", kms.ca) as client:
            for vm in self.vms:
                if not vm.kek_before:
                    continue
                try:
                    attributes = client.get_attributes(vm.kek_before)
                except Exception as exc:  # The KMIP client's own errors; one line into the report.
                    vm.errors.append(f"KEK {vm.kek_before} not readable in the KMS: {exc}")
                    continue
                vm.kek_in_kms = attributes.get("x-Identifier") == [vm.vm_uuid]

    def _read_audit(self) -> str:
        """Both trails: the broker's (trust decisions, unwraps) and the
        KMS's (every KMIP request, the broker's included), each verified,
        and what each step left in them."""
        assert self.broker is not None and self.kms is not None
        advance = self.progress("audit trails: broker's read and verified, KMS's read, KMS's verified", 3)
        trail = json.loads(self.broker.admin("audit", "--json", check=False).stdout or "{}")
        advance()
        records = trail.get("records", [])
        counts: dict[str, int] = {}
        refused = 0
        attest_refused: list[dict] = []
        for record in records:
            counts[record["action"]] = counts.get(record["action"], 0) + 1
            refused += 0 if record["allowed"] else 1
            if record["action"] == "host.attest" and not record["allowed"]:
                attest_refused.append({"host": record["target"], "reason": record["reason"]})
        shown = run("kms-admin", "audit", "show", "--config", self.kms.config, "--json", check=False)
        kms_records = [json.loads(line) for line in shown.stdout.splitlines() if line.strip()]
        advance()
        verified = run("kms-admin", "audit", "verify", "--config", self.kms.config, check=False)
        advance()
        kms_ops: dict[str, int] = {}
        for record in kms_records:
            kms_ops[record["operation"]] = kms_ops.get(record["operation"], 0) + 1
        self.audit = {
            "records": len(records),
            "refused": refused,
            "problems": trail.get("problems", []),
            "actions": counts,
            "kms": {
                "records": len(kms_records),
                "refused": sum(1 for r in kms_records if r["result"]["status"] != "SUCCESS"),
                "intact": verified.returncode == 0,
                "verify": (verified.stdout or verified.stderr).strip().splitlines()[:1],
                "operations": kms_ops,
            },
            "steps": self._per_step(records, kms_records),
            "attest_refused": attest_refused,
        }
        for step in self.audit["steps"]:
            broker_part = ", ".join(f"{a} {n}" for a, n in sorted(step["broker"].items())) or "-"
            kms_part = ", ".join(f"{o} {n}" for o, n in sorted(step["kms"].items())) or "-"
            self.say(f"  audit, {step['step']}: broker: {broker_part} | KMS: {kms_part}")
        chain = "hash chain intact" if not self.audit["problems"] else f"PROBLEMS: {self.audit['problems'][0]}"
        kms_chain = "chain and checkpoints intact" if verified.returncode == 0 else "VERIFY FAILED"
        broker_shown = ", ".join(f"{action} {n}" for action, n in sorted(counts.items()))
        if self.attest:
            # The attestations the broker refused, with the PCR that differed (its audit record's reason).
            hosts = sorted({r["host"] for r in attest_refused})
            self.say(f"  audit: host.attest refused {len(attest_refused)} times ({', '.join(hosts) or 'no host'})")
            for reason in dict.fromkeys(r["reason"] for r in attest_refused):
                self.say(f"  audit: host.attest refused: {reason}")
        return (
            f"broker: {len(records)} records ({refused} refused), {chain}: {broker_shown}; "
            f"KMS: {len(kms_records)} records ({self.audit['kms']['refused']} refused), {kms_chain}"
        )

    def _per_step(self, broker_records: list[dict], kms_records: list[dict]) -> list[dict]:
        def parse_time(text: str) -> float:
            return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()

        steps = []
        for title, start, end in self.windows:
            broker_counts: dict[str, int] = {}
            for r in broker_records:
                if start <= float(r.get("at", 0)) <= end:
                    key = r["action"] + ("" if r["allowed"] else " (refused)")
                    broker_counts[key] = broker_counts.get(key, 0) + 1
            kms_counts: dict[str, int] = {}
            for r in kms_records:
                if start <= parse_time(r["time"]) <= end:
                    key = r["operation"] + ("" if r["result"]["status"] == "SUCCESS" else " (refused)")
                    kms_counts[key] = kms_counts.get(key, 0) + 1
            steps.append({"step": title, "broker": broker_counts, "kms": kms_counts})
        return steps

    # Cleanup ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """Power off whatever still runs, then stop the host TPMs, the broker and the KMS."""
        try:
            for host in self.hosts:
                state = self.host_state(host)
                if not (state / "config.toml").exists():
                    continue
                status = run("vtpm-host", "--state-dir", state, "status", "--json", check=False)
                try:
                    running = json.loads(status.stdout or "[]")
                except ValueError:
                    running = []
                for record in running:
                    run("vtpm-host", "--state-dir", state, "power-off", record["vmx"], check=False)
        finally:
            for tpm in self.host_tpms.values():
                tpm.stop()
            if self.broker is not None:
                self.broker.stop()
            if self.kms is not None:
                self.kms.stop()


def _chains(der: bytes, anchors: list[x509.Certificate]) -> bool:
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return False
    for anchor in anchors:
        try:
            cert.verify_directly_issued_by(anchor)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False
