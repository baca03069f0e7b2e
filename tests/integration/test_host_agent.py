"""`vtpm-host` against the real thing: a kms-server, a vtpm-broker (set up with the operator's commands), a
management instance enrolled with a token and approved, hosts initialized with `vtpm-host init` and registered
with their CSR, VMs created through the API; real swtpm, swtpm_setup and tpm2-tools as the guest.

The first power-on manufactures the vTPM with EK certificates from the broker's EK CA; the guest keeps a secret
in NV; power-off seals the next generation; the next power-on brings back the same secret and the same EK
certificate. A damaged .nvram, an old copy (rollback) and hosts that may not have the key are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import broker_harness
import pytest
from broker_harness import call, create_vm, ek_ca_pem, enroll, register_host, write_vmx
from cryptography import x509

from broker import nvram, vmx
from broker.drill.processes import run
from broker.host.swtpm import SwtpmInstance, wipe
from broker.vtpm_ca import verify_ek_certificate

TOOLS = ("swtpm", "swtpm_setup", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs Debian's swtpm, swtpm-tools and tpm2-tools; missing: {', '.join(MISSING)}"
)

PROVIDER = "kms-host-test"
RSA_EK_CERT = "0x01c00002"
NV_SECRET = "0x1500030"
TIMINGS: dict[str, list[float]] = {}


# The shared module-scoped fixtures (tests/broker_harness.py); pytest finds them by these names.
kms = broker_harness.kms
broker = broker_harness.broker


class Host:
    """A host's state directory, driven through the `vtpm-host` command."""

    def __init__(self, state_dir: Path):
        self.state_dir = state_dir

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return run("vtpm-host", "--state-dir", self.state_dir, *args, check=check)

    def timed(self, label: str, *args: str | Path) -> dict:
        """Run with --json; record the wall time of the process and the time the agent itself reports."""
        started = time.monotonic()
        result = json.loads(self.run(*args, "--json").stdout)
        TIMINGS.setdefault(f"{label}, process wall time", []).append(time.monotonic() - started)
        TIMINGS.setdefault(f"{label}, inside the agent", []).append(result["seconds"])
        return result

    def power_on(self, vmx_path: Path, label: str = "power-on") -> str:
        result = self.timed(label, "power-on", vmx_path)
        assert result["manufactured"] == ("manufacture" in label) or label == "power-on"
        return result["tcti"]

    def power_off(self, vmx_path: Path) -> int:
        return self.timed("power-off", "power-off", vmx_path)["generation"]

    def refused(self, *args: str | Path) -> str:
        result = self.run(*args, check=False)
        assert result.returncode == 2, result.stderr
        err = result.stderr
        assert err.startswith("vtpm-host: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    def status(self) -> list[dict]:
        return json.loads(self.run("status", "--json").stdout)

    def kill_all(self) -> None:
        """Finalizer: no swtpm and no clear state survives a test, whatever happened."""
        for path in (self.state_dir / "running").glob("*.json"):
            record = json.loads(path.read_text())
            SwtpmInstance.attach(record["state_dir"], record["socket_dir"], record["pid"]).kill()
            wipe(record["workdir"])


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, broker):
    """make(instance identity, name): a host initialized by vtpm-host, registered by the instance with the CSR
    vtpm-host wrote, its certificate installed by vtpm-host."""
    made: list[Host] = []
    base = tmp_path_factory.mktemp("hosts")

    def make(identity, name: str) -> Host:
        host = Host(base / name)
        init = host.run(
            "init", "--name", name, "--gateway", broker.gateway, "--api", broker.url, "--ca", broker.trust_ca
        )
        csr_path = Path(init.stdout.strip())
        assert (host.state_dir / "host.key").stat().st_mode & 0o777 == 0o600
        cert = base / f"{name}.pem"
        cert.write_text(register_host(broker, identity, name, csr_path.read_text()))
        host.run("install-cert", "--cert", cert)
        made.append(host)
        return host

    yield make
    for host in made:
        host.kill_all()


@pytest.fixture(scope="module")
def instance_a(broker, tmp_path_factory):
    return enroll(broker, "vc-a", tmp_path_factory.mktemp("vc-a"))


@pytest.fixture(scope="module")
def esx1(hosts, instance_a):
    return hosts(instance_a, "esx-1")


@pytest.fixture
def datastore(tmp_path):
    path = tmp_path / "datastore"
    path.mkdir()
    return path


def tpm2(tool: str, tcti: str, *args: str) -> bytes:
    done = subprocess.run([tool, "-T", tcti, *args], capture_output=True, timeout=30)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def guest_writes_secret(tcti: str, secret: bytes, scratch: Path) -> None:
    scratch.write_bytes(secret)
    tpm2("tpm2_nvdefine", tcti, NV_SECRET, "-C", "o", "-s", str(len(secret)), "-a", "ownerread|ownerwrite")
    tpm2("tpm2_nvwrite", tcti, NV_SECRET, "-C", "o", "-i", str(scratch))


def generation_at_broker(broker, host: Host, vm_uuid: str) -> int:
    identity = (str(host.state_dir / "host.pem"), str(host.state_dir / "host.key"))
    answer = call(broker, "GET", f"/v1/vms/{vm_uuid}/nvram-generation", identity)
    assert answer.status_code == 200, answer.text
    return answer.json()["generation"]


def test_vtpm_keeps_its_secret_and_ek_certificate_across_power_cycles(broker, instance_a, esx1, datastore, tmp_path):
    """Power-on manufactures the vTPM with EK certificates from the broker's EK CA; a guest writes an NV secret
    and reads the EK certificate; power-off seals generation 2 (the broker records it); the next power-on gives
    back the identical secret and the byte-identical EK certificate."""
    vm = create_vm(broker, instance_a, "web-1", host="esx-1")
    vmx_path = write_vmx(datastore, "web-1", vm)
    nvram_path = vmx_path.parent / "web-1.nvram"

    tcti = esx1.power_on(vmx_path, "power-on (manufacture)")
    assert tcti.startswith("swtpm:path=")
    assert nvram.read_header(nvram_path.read_bytes()).generation == 1
    assert generation_at_broker(broker, esx1, vm["vm_uuid"]) == 1
    ek_cert = tpm2("tpm2_nvread", tcti, RSA_EK_CERT)
    info = verify_ek_certificate(ek_cert, ek_ca_pem(broker))
    assert info.tpm_model == "swtpm"
    assert (
        x509.load_der_x509_certificate(ek_cert).issuer
        == x509.load_pem_x509_certificate(ek_ca_pem(broker).encode()).subject
    )
    secret = os.urandom(32)
    guest_writes_secret(tcti, secret, tmp_path / "secret")
    [running] = [r for r in esx1.status() if r["vm_uuid"] == vm["vm_uuid"]]
    assert running["tcti"] == tcti and running["running"] and running["generation"] == 1

    assert esx1.power_off(vmx_path) == 2
    header = nvram.read_header(nvram_path.read_bytes())
    assert header.generation == 2 and str(header.vm_uuid) == vm["vm_uuid"]
    assert header.key_safe_ref == f"{PROVIDER}/{vm['kms_key_id']}"
    assert generation_at_broker(broker, esx1, vm["vm_uuid"]) == 2
    assert all(r["vm_uuid"] != vm["vm_uuid"] for r in esx1.status())

    tcti = esx1.power_on(vmx_path, "power-on (unseal)")
    assert tpm2("tpm2_nvread", tcti, NV_SECRET, "-C", "o") == secret
    assert tpm2("tpm2_nvread", tcti, RSA_EK_CERT) == ek_cert
    esx1.power_off(vmx_path)
    assert nvram.read_header(nvram_path.read_bytes()).generation == 3

    # The broker's audit trail shows the unwraps, the EK certificates and the generations.
    trail = run("vtpm-broker", "--config", broker.config, "admin", "audit", "--json").stdout
    records = [r for r in json.loads(trail)["records"] if vm["vm_uuid"] in r["target"]]
    actions = {(r["action"], r["allowed"]) for r in records}
    assert {("ek.issue", True), ("nvram.generation", True)} <= actions
    assert ("gateway.unwrap", True) in actions


def test_damaged_nvram_and_rollback_are_refused(broker, instance_a, esx1, datastore):
    """A flipped bit in the .nvram is a clear error and no swtpm starts; an older copy put back after a later
    power-off is refused as a rollback; the newest file still powers on."""
    vm = create_vm(broker, instance_a, "db-1", host="esx-1")
    vmx_path = write_vmx(datastore, "db-1", vm)
    nvram_path = vmx_path.parent / "db-1.nvram"
    esx1.power_on(vmx_path, "power-on (manufacture)")
    esx1.power_off(vmx_path)
    old_copy = nvram_path.read_bytes()  # generation 2
    esx1.power_on(vmx_path, "power-on (unseal)")
    esx1.power_off(vmx_path)
    newest = nvram_path.read_bytes()  # generation 3

    flipped = bytearray(newest)
    flipped[len(flipped) // 2] ^= 0x01
    nvram_path.write_bytes(bytes(flipped))
    err = esx1.refused("power-on", vmx_path)
    assert "corrupt or was encrypted with another key" in err and "not started" in err
    assert all(r["vm_uuid"] != vm["vm_uuid"] for r in esx1.status())

    nvram_path.write_bytes(newest[:-1])
    assert "truncated" in esx1.refused("power-on", vmx_path)

    nvram_path.write_bytes(old_copy)
    err = esx1.refused("power-on", vmx_path)
    assert "rollback" in err and "generation 2" in err and "generation 3" in err
    assert all(r["vm_uuid"] != vm["vm_uuid"] for r in esx1.status())

    nvram_path.write_bytes(newest)
    esx1.power_on(vmx_path)
    esx1.power_off(vmx_path)


def test_hosts_that_may_not_unwrap_are_refused_with_the_reason(broker, instance_a, esx1, hosts, datastore, tmp_path):
    """A host of another instance, a host of the same instance the VM is not placed on, and the host of a revoked
    instance are each refused the VM's DEK, with a message that says which, and nothing starts."""
    vm = create_vm(broker, instance_a, "app-1", host="esx-1")
    vmx_path = write_vmx(datastore, "app-1", vm)
    esx1.power_on(vmx_path, "power-on (manufacture)")
    esx1.power_off(vmx_path)

    other = enroll(broker, "vc-b", tmp_path)
    esx_b = hosts(other, "esx-b")
    err = esx_b.refused("power-on", vmx_path)
    assert "refused to unwrap" in err and "not a VM of host esx-b's management instance" in err
    assert esx_b.status() == []

    esx2 = hosts(instance_a, "esx-2")
    err = esx2.refused("power-on", vmx_path)
    assert "refused to unwrap" in err and "not placed on host esx-2" in err

    doomed = enroll(broker, "vc-doomed", tmp_path)
    esx_d = hosts(doomed, "esx-d")
    vm_d = create_vm(broker, doomed, "doomed-1", host="esx-d")
    vmx_d = write_vmx(datastore, "doomed-1", vm_d)
    esx_d.power_on(vmx_d, "power-on (manufacture)")
    esx_d.power_off(vmx_d)
    broker.admin("revoke", "vc-doomed")
    err = esx_d.refused("power-on", vmx_d)
    assert "no longer accepts host esx-d's certificate" in err
    assert esx_d.status() == []
    assert nvram.read_header((vmx_d.parent / "doomed-1.nvram").read_bytes()).generation == 2


def test_two_vms_power_on_at_the_same_time(broker, instance_a, esx1, datastore):
    """Two `vtpm-host power-on` processes for different VMs of one host run side by side."""
    paths = [write_vmx(datastore, f"par-{i}", create_vm(broker, instance_a, f"par-{i}", host="esx-1")) for i in (1, 2)]
    from broker.drill.processes import command

    procs = [
        subprocess.Popen(
            command("vtpm-host", "--state-dir", esx1.state_dir, "power-on", p),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for p in paths
    ]
    outputs = [p.communicate(timeout=180) for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    tctis = [out.strip() for out, _ in outputs]
    assert len(set(tctis)) == 2
    for tcti in tctis:
        assert tpm2("tpm2_nvread", tcti, RSA_EK_CERT)
    for p in paths:
        esx1.power_off(p)
    assert all(vmx.read(p).vm_uuid not in {r["vm_uuid"] for r in esx1.status()} for p in paths)


def test_zz_report_timings():
    """Not a check: the wall times of the vtpm-host commands above (each a fresh process), for the report."""
    for label, values in sorted(TIMINGS.items()):
        print(f"{label}: n={len(values)} min={min(values):.2f}s median={sorted(values)[len(values) // 2]:.2f}s")
