"""`vtpm-drill` end to end, as `make demo` runs it (with 3 VMs): a real KMS,
broker, hosts with swtpm and tpm2-tools; the management plane is lost and
every vTPM must come back with the same NV secret, EK certificate and KEK."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from broker.drill.processes import command

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("swtpm", "swtpm_setup", "tpm2_nvread")),
    reason="needs swtpm, swtpm-tools and tpm2-tools (apt-get install swtpm swtpm-tools tpm2-tools)",
)


def test_drill_recovers_every_vm(tmp_path):
    """Three VMs on two hosts: the drill exits 0 and its JSON says every VM
    recovered, with the same NV secret, EK certificate and KEK; the
    disaster's refused power-on is shown in the narrative."""
    workdir = tmp_path / "drill"
    result = subprocess.run(
        command("vtpm-drill", "--vms", "3", "--hosts", "2", "--workdir", workdir, "--json"),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["vms"] == 3
    assert summary["recovered"] == summary["nv_match"] == summary["ek_match"] == summary["kek_match"] == 3
    assert summary["failures"] == []
    assert isinstance(summary["seconds"], (int, float)) and summary["seconds"] > 0
    narrative = " ".join(result.stderr.split())
    assert "power-on of vm-001 now fails" in narrative and "refused" in narrative
    assert "3 of 3 VMs registered to vcenter-b" in narrative
    assert "hash chain intact" in narrative
    # Both audit trails verify, and show each step: the refused unwrap of
    # the disaster in the broker's trail, the recovery's unwraps in both.
    audit = summary["audit"]
    assert audit["broker_intact"] and audit["kms_intact"] and audit["kms_records"] > 0
    steps = {step["step"]: step for step in audit["steps"]}
    assert any("refused" in action for action in steps["disaster"]["broker"]), steps["disaster"]
    recovery = steps["power-on after recovery, guest reads back"]
    assert recovery["broker"] and recovery["kms"], recovery
    assert "chain and checkpoints intact" in narrative
    disaster = steps["disaster"]["broker"]
    assert disaster.get("gateway.unwrap (refused)") == 1 and disaster.get("revoke") == 1, disaster
    assert "audit, disaster: broker: gateway.unwrap (refused) 1," in narrative
    assert "Traceback" not in result.stderr
    # Nothing left running: the hosts report no VM powered on.
    for host in ("esx-01", "esx-02"):
        status = subprocess.run(
            command("vtpm-host", "--state-dir", workdir / "hosts" / host, "status", "--json"),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert json.loads(status.stdout) == []


def test_drill_loses_the_broker_host_too(tmp_path):
    """--lose management,broker: the broker is backed up while it serves,
    killed and its directory deleted after instance A is lost, and restored
    from the backup in a new directory on new ports; every VM recovers with
    the same NV secret, EK certificate and KEK, and each VM's generation-1
    copy of its .nvram is refused as a rollback by the restored broker."""
    workdir = tmp_path / "drill"
    result = subprocess.run(
        command(
            "vtpm-drill", "--vms", "2", "--hosts", "1", "--lose", "management,broker", "--workdir", workdir, "--json"
        ),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["vms"] == 2
    assert summary["recovered"] == summary["nv_match"] == summary["ek_match"] == summary["kek_match"] == 2
    assert summary["broker_restored"] is True
    assert summary["rollback_refused"] == 2
    assert summary["failures"] == []
    narrative = " ".join(result.stderr.split())
    assert "vtpm-broker backup --out backups/broker.vtbak" in narrative
    assert "killed, its directory broker/ deleted" in narrative
    assert "vtpm-broker restore --from broker.vtbak" in narrative
    assert "2/2 power-ons of a generation-1 copy refused" in narrative and "(rollback)" in narrative
    assert "Traceback" not in result.stderr
    # The old broker's directory is gone; the master key lived apart from the backup.
    assert not (workdir / "broker").exists()
    assert (workdir / "vault" / "broker-master.key").stat().st_mode & 0o777 == 0o600
    master_key = bytes.fromhex((workdir / "vault" / "broker-master.key").read_text().strip())
    backup = (workdir / "backups" / "broker.vtbak").read_bytes()
    assert master_key not in backup and master_key.hex().encode() not in backup


def test_drill_with_host_attestation_refuses_the_tampered_host(tmp_path):
    """--attest with 4 VMs on 2 hosts: both hosts enroll their own swtpm TPM and
    attest; after the recovery esx-02 reboots with one unexpected measurement in
    PCR 7, the power-on of each VM the recovery placed on it is refused for its
    attestation (the audit names PCR 7), the VMs on esx-01 recover, exit 0, and
    every host TPM is stopped."""
    workdir = tmp_path / "drill"
    result = subprocess.run(
        command("vtpm-drill", "--attest", "--vms", "4", "--hosts", "2", "--workdir", workdir, "--json"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["attest"] is True
    assert summary["attested_hosts"] == 2
    assert summary["tampered_host"] == "esx-02"
    # vm register places round-robin on esx-02, esx-01: two VMs on each host.
    assert summary["tampered_vms"] == summary["tampered_refused"] == 2
    assert summary["recovered"] == summary["nv_match"] == summary["ek_match"] == 2
    assert summary["kek_match"] == 4
    assert summary["failures"] == []
    refusals = summary["audit"]["attest_refused"]
    assert refusals and {r["host"] for r in refusals} == {"esx-02"}
    # Concurrent power-ons on esx-02 each quote; one whose quote reaches the broker after a newer one is
    # refused as older instead, so not every record need name the PCR.
    assert any("sha256 PCR 7 differs from policy default" in r["reason"] for r in refusals), refusals
    steps = {step["step"]: step for step in summary["audit"]["steps"]}
    assert steps["every host attests"]["broker"] == {"host.attest": 2}
    recovery = steps["power-on after recovery, guest reads back"]["broker"]
    # Each refused power-on is one refused attestation; it never reaches the gateway.
    assert recovery.get("host.attest (refused)") == 2, recovery
    assert recovery.get("gateway.unwrap") and "gateway.unwrap (refused)" not in recovery, recovery
    narrative = " ".join(result.stderr.split())
    assert "2/2 power-ons on the tampered host esx-02 refused" in narrative
    assert "2/2 VMs recovered" in narrative and "2/2 hosts attested" in narrative
    assert "Traceback" not in result.stderr
    # The host TPMs were stopped: a host's attestation now cannot reach its TPM.
    status = subprocess.run(
        command("vtpm-host", "--state-dir", workdir / "hosts" / "esx-01", "attest", "status", "--json"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    host_tpm = json.loads(status.stdout)
    assert host_tpm["tpm_error"], host_tpm
    assert not Path(host_tpm["tcti"].removeprefix("swtpm:path=")).parent.exists(), host_tpm


def test_drill_refuses_attest_with_one_host(tmp_path):
    """--attest needs a tampered host and a good one: --hosts 1 is refused in one line, before anything runs."""
    workdir = tmp_path / "drill"
    result = subprocess.run(
        command("vtpm-drill", "--attest", "--hosts", "1", "--workdir", workdir),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr == (
        "vtpm-drill: error: --attest needs --hosts 2 or more: "
        "the last host boots tampered, the others must recover their VMs\n"
    )
    assert not workdir.exists()
