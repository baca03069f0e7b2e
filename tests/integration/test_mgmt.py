"""`vtpm-mgmt` against a real kms-server and a real vtpm-broker on
127.0.0.1, each set up with the operator's commands (broker.drill.processes):
enrollment with a token and the admin's approval, hosts, encrypted VMs
whose KEK lives in the KMS, and the recovery by a second instance from the
datastore alone after the first is revoked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import broker_harness
import pg_cluster
import requests
from broker_harness import mgmt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker import nvram, vmx
from broker.drill.processes import command
from broker.keysafe import KeySafe, format_key_safe, parse_key_safe

PROVIDER = "kms-prod"

# The shared module-scoped fixtures (tests/broker_harness.py); pytest finds them by these names.
kms = broker_harness.kms
broker = broker_harness.broker
kms_admin = broker_harness.kms_admin


def host_csr(directory: Path, name: str) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def enroll_with_approval(broker, state: Path, name: str) -> None:
    """`enroll --wait` runs while the security administrator approves."""
    token = broker.token(name)
    proc = subprocess.Popen(
        command("vtpm-mgmt", "--state-dir", state, "enroll", f"--token={token}", "--wait", "60"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            listing = json.loads(broker.admin("list", "--json").stdout)
            if any(i["name"] == name and i["pending_enrollment"] for i in listing):
                break
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the enrollment never reached the broker"
            time.sleep(0.2)
        assert proc.poll() is None  # still waiting for the approval
        broker.admin("approve", name)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"{name} is enrolled" in out
    assert (state / "instance.pem").exists() and not (state / "enrollment.json").exists()


def init(broker, state: Path, name: str) -> None:
    mgmt(state, "init", "--name", name, "--broker", broker.url, "--ca", str(broker.trust_ca), "--provider", PROVIDER)


def vms_of(state: Path) -> dict[str, dict]:
    return {vm["vm_uuid"]: vm for vm in json.loads(mgmt(state, "vm", "list", "--json").stdout)}


def test_enroll_hosts_vms_then_recovery_by_a_second_instance(tmp_path, broker, kms_admin):
    """Instance A enrolls (token + approval while `enroll --wait` polls),
    adds a host and creates VMs whose .vmx key safe names the provider and a
    KEK that exists in the KMS. A is revoked; B enrolls, takes the host over
    and `vm register`s the datastore: every VM is B's, with the same KEK."""
    a = tmp_path / "vcenter-a"
    init(broker, a, "vcenter-a")
    assert (a / "instance.key").stat().st_mode & 0o777 == 0o600
    enroll_with_approval(broker, a, "vcenter-a")

    hosts = tmp_path / "hosts"
    hosts.mkdir()
    out = mgmt(
        a, "host", "add", "--name", "esx-1", "--csr", str(host_csr(hosts, "esx-1")), "--out", str(hosts / "esx-1.pem")
    )
    assert "esx-1 registered" in out.stdout
    cert = x509.load_pem_x509_certificate((hosts / "esx-1.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((hosts / "trust-ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host:esx-1"
    assert (hosts / "trust-ca.pem").read_bytes() == broker.trust_ca.read_bytes()

    datastore = tmp_path / "datastore"
    datastore.mkdir()
    created = mgmt(a, "vm", "create", "--name", "web-01", "--name", "db-01", "--datastore", str(datastore),
                   "--vtpm", "--host", "esx-1").stdout  # fmt: skip
    assert created.count("created on host esx-1") == 2
    kek_of = {}
    for name in ("web-01", "db-01"):
        config = vmx.read(datastore / name / f"{name}.vmx")
        assert config.has_vtpm and config.name == name
        key_safe = parse_key_safe(config.key_safe)
        assert key_safe.provider == PROVIDER
        attributes = kms_admin.get_attributes(key_safe.kms_key_id)
        assert attributes["x-Identifier"] == [config.vm_uuid]
        kek_of[config.vm_uuid] = key_safe.kms_key_id

    listed = vms_of(a)
    assert set(listed) == set(kek_of)
    assert {vm["host"] for vm in listed.values()} == {"esx-1"}
    assert {u: vm["kms_key_id"] for u, vm in listed.items()} == kek_of
    table = mgmt(a, "vm", "list").stdout
    assert "web-01" in table and "db-01" in table

    # Not yet powered on: no .nvram, so `vm check` warns before anyone needs it.
    check = mgmt(a, "vm", "check", "--datastore", str(datastore), check=False)
    assert check.returncode == 1 and check.stdout.count("PROBLEM") == 2 and "missing" in check.stdout
    assert "not checked" not in check.stdout  # A is enrolled: the broker's generations were read.

    # An old .nvram put back after its host sealed a newer one is found
    # before a power-on refuses it: the broker's record (here: esx-1 reports
    # generation 3) against the datastore's generation 1.
    web = datastore / "web-01"
    web_uuid = vmx.read(web / "web-01.vmx").vm_uuid
    web_ks = parse_key_safe(vmx.read(web / "web-01.vmx").key_safe)
    ref = f"{web_ks.provider}/{web_ks.kms_key_id}"
    (web / "web-01.nvram").write_bytes(nvram.seal({"tpm2-00.permall": b"x" * 100}, os.urandom(64), web_uuid, 1, ref))
    reported = requests.put(
        f"{broker.url}/v1/vms/{web_uuid}/nvram-generation",
        json={"generation": 3},
        cert=(str(hosts / "esx-1.pem"), str(hosts / "esx-1.key")),
        verify=str(broker.trust_ca),
        timeout=30,
    )
    assert reported.status_code == 200, reported.text
    check = mgmt(a, "vm", "check", "--datastore", str(datastore), "--json", check=False)
    found = {r["name"]: r for r in json.loads(check.stdout)["results"]}
    assert found["web-01"]["generation"] == 1 and found["web-01"]["broker_generation"] == 3
    assert any("rollback" in p and "generation 3" in p for p in found["web-01"]["problems"])
    offline = json.loads(mgmt(a, "vm", "check", "--datastore", str(datastore), "--offline", "--json", check=False).stdout)
    assert not any("rollback" in p for r in offline["results"] for p in r["problems"])
    (web / "web-01.nvram").write_bytes(nvram.seal({"tpm2-00.permall": b"x" * 100}, os.urandom(64), web_uuid, 3, ref))
    check = mgmt(a, "vm", "check", "--datastore", str(datastore), check=False)
    assert check.stdout.count("PROBLEM") == 1 and "db-01" in check.stdout and "rollback" not in check.stdout
    # A broker that does not answer: one line that names --offline, not a silent skip.
    gone = tmp_path / "vcenter-a-copy"
    shutil.copytree(a, gone)
    settings = json.loads((gone / "instance.json").read_text())
    (gone / "instance.json").write_text(json.dumps({**settings, "broker": f"https://127.0.0.1:{pg_cluster.free_port()}"}))
    unreachable = mgmt(gone, "vm", "check", "--datastore", str(datastore), check=False)
    assert unreachable.returncode == 2 and unreachable.stderr.count("\n") == 1
    assert "--offline" in unreachable.stderr and "Traceback" not in unreachable.stderr

    # The disaster: A is lost and revoked.
    broker.admin("revoke", "vcenter-a")
    refused = mgmt(a, "vm", "list", check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "not trusted" in refused.stderr and "Traceback" not in refused.stderr

    b = tmp_path / "vcenter-b"
    init(broker, b, "vcenter-b")
    enroll_with_approval(broker, b, "vcenter-b")
    # Before B adds the host, placing on it is refused per VM, with a reason.
    early = mgmt(b, "vm", "register", "--datastore", str(datastore), "--host", "esx-1", check=False)
    assert early.returncode == 1
    assert early.stdout.count("FAILED") == 2 and "no host named esx-1" in early.stdout
    mgmt(
        b, "host", "add", "--name", "esx-1", "--csr", str(host_csr(hosts, "esx-1b")), "--out", str(hosts / "esx-1.pem")
    )
    done = mgmt(b, "vm", "register", "--datastore", str(datastore), "--host", "esx-1")
    assert "2 of 2 VMs registered to vcenter-b" in done.stdout and "FAILED" not in done.stdout
    recovered = vms_of(b)
    assert {u: vm["kms_key_id"] for u, vm in recovered.items()} == kek_of
    assert {vm["host"] for vm in recovered.values()} == {"esx-1"}
    listing = {i["name"]: i for i in json.loads(broker.admin("list", "--json").stdout)}
    assert listing["vcenter-a"]["state"] == "revoked" and listing["vcenter-b"]["vms"] == 2


def test_register_reports_each_failure_in_one_line(tmp_path, broker):
    """A datastore with a VM of another key provider, a broken .vmx and a
    key safe naming a key the KMS does not have: each failure is one line
    naming the VM and why; the good VM is registered; exit status 1."""
    c = tmp_path / "vcenter-c"
    init(broker, c, "vcenter-c")
    enroll_with_approval(broker, c, "vcenter-c")
    datastore = tmp_path / "datastore"
    datastore.mkdir()
    mgmt(c, "vm", "create", "--name", "good", "--datastore", str(datastore), "--vtpm")
    good = parse_key_safe(vmx.read(datastore / "good" / "good.vmx").key_safe)

    def write(name: str, key_safe: str) -> None:
        import uuid

        (datastore / name).mkdir()
        vmx.write(datastore / name / f"{name}.vmx", vmx.Vmx.new(name, str(uuid.uuid4()), key_safe, True))

    write("foreign", format_key_safe(KeySafe("kms-other", "1", good.iv, good.tag, good.wrapped_dek)))
    write("nokey", format_key_safe(KeySafe(PROVIDER, "no-such-key", good.iv, good.tag, good.wrapped_dek)))
    (datastore / "broken").mkdir()
    (datastore / "broken" / "broken.vmx").write_text("garbage\n")

    result = mgmt(c, "vm", "register", "--datastore", str(datastore), check=False)
    assert result.returncode == 1
    failed = {
        line.split()[1].rsplit("/", 2)[-2]: line for line in result.stdout.splitlines() if line.startswith("FAILED")
    }
    assert set(failed) == {"foreign", "nokey", "broken"}
    assert "key provider 'kms-other'" in failed["foreign"]
    assert "HTTP 422" in failed["nokey"]
    assert "line 1" in failed["broken"]
    assert "1 of 4 VMs registered" in result.stdout
    assert "Traceback" not in result.stderr
