"""`vtpm-host attest ...` and an attesting power-on against the real thing (issue 18): a kms-server, a
vtpm-broker, hosts set up with `vtpm-host init --tpm`, each host's own TPM a real swtpm driven with
tpm2-tools, the broker's administrator pinning EKs and capturing policies with `vtpm-broker admin`.

The host side only goes through the `vtpm-host` command, as an operator would: ek-pub, enroll, now,
status; power-on presents the cached token as a KMIP Ticket, attests again when the gateway refuses
it, and a tampered boot is refused in one line. The broker's own checks (replay, another TPM, a forged
AK, audit records) are tests/integration/test_host_attestation.py's."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import broker_harness
import pytest
from broker_harness import create_vm, enroll, register_host, write_vmx

from broker.drill.processes import run
from broker.host.host_tpm import HostTpm, HostTpmProcess, measure_boot

TOOLS = ("swtpm", "swtpm_setup", "tpm2_quote", "tpm2_createak", "tpm2_activatecredential")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs Debian's swtpm, swtpm-tools and tpm2-tools; missing: {', '.join(MISSING)}"
)

PROVIDER = "kms-host-attest-cli"

kms = broker_harness.kms
broker = broker_harness.broker


@dataclass
class Host:
    """A host's state directory (driven through `vtpm-host`) and its own TPM (a swtpm)."""

    name: str
    state_dir: Path
    tpm: HostTpmProcess
    scratch: Path

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return run("vtpm-host", "--state-dir", self.state_dir, *args, check=check)

    def json(self, *args: str | Path) -> dict:
        return json.loads(self.run(*args, "--json").stdout)

    def refused(self, *args: str | Path) -> str:
        result = self.run(*args, check=False)
        err = result.stderr
        assert result.returncode == 2, (result.returncode, err)
        assert err.startswith("vtpm-host: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
        return err

    def boot(self, tampered: bool = False) -> None:
        """What firmware does at power-on: measure the boot into PCRs 0-7 (one more extension: tampered)."""
        tpm = HostTpm(self.tpm.tcti, self.scratch)
        measure_boot(tpm)
        if tampered:
            tpm.pcr_extend(7, "sha256", b"\xee" * 32)

    def token(self) -> str | None:
        path = self.state_dir / "attestation" / "token.json"
        return json.loads(path.read_text())["token"] if path.exists() else None

    def kill_vms(self) -> None:
        from broker.host.swtpm import SwtpmInstance, wipe

        for path in (self.state_dir / "running").glob("*.json"):
            record = json.loads(path.read_text())
            SwtpmInstance.attach(record["state_dir"], record["socket_dir"], record["pid"]).kill()
            wipe(record["workdir"])


@pytest.fixture(scope="module")
def instance(broker, tmp_path_factory):
    return enroll(broker, "vc-hattest", tmp_path_factory.mktemp("vc-hattest"))


@pytest.fixture
def make_host(broker, instance, tmp_path) -> Iterator:
    """make(name, tpm=True): a host initialized by vtpm-host (with --tpm, its TPM booted), registered with
    its CSR and its certificate installed; its TPM and any VM swtpm are stopped at the end."""
    made: list[Host] = []

    def make(name: str, tpm: bool = True) -> Host:
        (tmp_path / f"{name}-tpm").mkdir(mode=0o700)
        (tmp_path / f"{name}-scratch").mkdir(mode=0o700)
        host = Host(name, tmp_path / name, HostTpmProcess(tmp_path / f"{name}-tpm"), tmp_path / f"{name}-scratch")
        made.append(host)
        host.tpm.start()
        host.boot()
        extra = ["--tpm", host.tpm.tcti] if tpm else []
        init = host.run(
            "init", "--name", name, "--gateway", broker.gateway, "--api", broker.url, "--ca", broker.trust_ca, *extra
        )
        cert = tmp_path / f"{name}.pem"
        cert.write_text(register_host(broker, instance, name, Path(init.stdout.strip()).read_text()))
        host.run("install-cert", "--cert", cert)
        return host

    yield make
    for host in made:
        host.kill_vms()
        host.tpm.stop()


def pin_and_enroll(broker, host: Host, tmp_path: Path) -> str:
    ek = tmp_path / f"{host.name}-ek.pem"
    host.run("attest", "ek-pub", "--out", ek)
    broker.admin("attest", "pin-ek", host.name, "--ek-pub", str(ek))
    enrolled = host.run("attest", "enroll").stdout
    assert f"host {host.name}'s TPM is enrolled at the broker" in enrolled
    return enrolled.rsplit(" ", 1)[-1].strip()


def test_enroll_attest_and_power_on_through_vtpm_host(broker, instance, make_host, tmp_path):
    """ek-pub, pin, enroll and status through the commands; with a policy captured from the host, `attest now`
    keeps a 0600 token that power-on presents without quoting again; a re-captured policy voids it and the
    next power-on attests once more on the gateway's refusal and unwraps."""
    host = make_host("esx-ha1")
    ek_pem = host.run("attest", "ek-pub").stdout
    assert ek_pem.startswith("-----BEGIN PUBLIC KEY-----")
    before = host.json("attest", "status")
    assert before["enrolled"] is False and before["tcti"] == host.tpm.tcti

    ak_name = pin_and_enroll(broker, host, tmp_path)
    status = host.json("attest", "status")
    assert status["enrolled"] is True and status["ak_name_hex"] == ak_name
    assert status["ek_fingerprint"] == before["ek_fingerprint"]

    # No policy covers the host yet: it attests, and needs no token.
    assert host.json("attest", "now") == {"attested": False, "expires_at": None, "policy": None}
    assert host.token() is None

    broker.admin("attest-policy", "capture", "--host", host.name, "--from-host", host.name)
    now = host.json("attest", "now")
    assert now["attested"] is True and now["policy"] == f"host:{host.name}"
    token_file = host.state_dir / "attestation" / "token.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    first = host.token()
    assert first is not None and first not in json.dumps(now)
    assert host.json("attest", "status")["token_valid"] is True

    vm = create_vm(broker, instance, "vm-ha1", host=host.name)
    vmx_path = write_vmx(tmp_path / "datastore", "vm-ha1", vm)
    host.run("power-on", vmx_path)
    assert host.token() == first  # the cached token, presented as it was
    host.run("power-off", vmx_path)

    # A new policy (PCRs 0-6 only) voids the tokens issued under the old one: the gateway refuses the
    # cached token, the agent attests once more (the PCRs still match) and the power-on goes through.
    broker.admin("attest-policy", "capture", "--host", host.name, "--from-host", host.name, "--pcrs", "0-6")
    host.run("power-on", vmx_path)
    second = host.token()
    assert second is not None and second != first
    assert host.json("attest", "status")["policy"] == f"host:{host.name}"
    host.run("power-off", vmx_path)


def test_a_tampered_boot_is_refused_in_one_line(broker, instance, make_host, tmp_path):
    """After a reboot that measured one thing more into PCR 7, `attest now` and power-on each fail with one line
    naming the PCR; the token from before the reboot is not used."""
    host = make_host("esx-ha2")
    pin_and_enroll(broker, host, tmp_path)
    host.json("attest", "now")  # the known-good quote the policy is captured from
    broker.admin("attest-policy", "capture", "--host", host.name, "--from-host", host.name)
    assert host.json("attest", "now")["attested"] is True
    vm = create_vm(broker, instance, "vm-ha2", host=host.name)
    vmx_path = write_vmx(tmp_path / "datastore", "vm-ha2", vm)
    host.run("power-on", vmx_path)
    host.run("power-off", vmx_path)

    host.tpm.reboot()
    host.boot(tampered=True)
    err = host.refused("attest", "now")
    assert "the broker refused this host's attestation: attestation failed: sha256 PCR 7 differs" in err
    assert host.token() is None
    err = host.refused("power-on", vmx_path)
    assert "the broker refused this host's attestation: attestation failed: sha256 PCR 7 differs" in err
    assert host.json("attest", "status")["token_valid"] is False

    # A clean boot again: the host attests and its VM powers on.
    host.tpm.reboot()
    host.boot()
    host.run("power-on", vmx_path)
    host.run("power-off", vmx_path)


def test_a_host_without_a_tpm_is_told_how_to_attest(broker, instance, make_host, tmp_path):
    """A policy covers the host but its config has no [attestation]: power-on says what to set up."""
    host = make_host("esx-ha3", tpm=False)
    zero = "00" * 32
    broker.admin("attest-policy", "set", "--host", host.name, "--pcr", f"0={zero}")
    vm = create_vm(broker, instance, "vm-ha3", host=host.name)
    vmx_path = write_vmx(tmp_path / "datastore", "vm-ha3", vm)
    err = host.refused("power-on", vmx_path)
    assert f"the broker requires host {host.name} to attest with its TPM" in err and "--tpm TCTI" in err
    err = host.refused("attest", "now")
    assert "has no host TPM configured" in err
