"""`vtpm-host install-ek-certs` and `vtpm-broker ca show --pem` against the real thing (issue 13, item 7): a
kms-server, a vtpm-broker, a host agent with real swtpm and tpm2-tools. After the EK CA is replaced and
`vtpm-broker ca recertify` re-issues a VM's EK certificates, install-ek-certs writes them into the vTPM's NV
indices (stopped: sealed as the next generation; running: through its swtpm), and the guest reads back the
re-certified certificates, which chain to the CA `ca show --pem` prints. An unknown VM and an unreachable
broker are one-line errors."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import broker_harness
import pytest
from broker_harness import create_vm, enroll, write_vmx
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from broker import nvram
from broker.drill.processes import run
from broker.vtpm_ca import EkCa, verify_ek_certificate
from tests.integration.test_host_agent import MISSING, Host, tpm2

pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs Debian's swtpm, swtpm-tools and tpm2-tools; missing: {', '.join(MISSING)}"
)

PROVIDER = "kms-ek-install"
NV_RSA, NV_ECC = "0x01c00002", "0x01c00016"


# The shared module-scoped fixtures (tests/broker_harness.py); pytest finds them by these names.
kms = broker_harness.kms
broker = broker_harness.broker


@pytest.fixture(scope="module")
def host(tmp_path_factory, broker):
    from broker_harness import register_host

    base = tmp_path_factory.mktemp("hosts")
    instance = enroll(broker, "vc-ek", tmp_path_factory.mktemp("vc-ek"))
    made = Host(base / "esx-ek")
    init = made.run(
        "init", "--name", "esx-ek", "--gateway", broker.gateway, "--api", broker.url, "--ca", broker.trust_ca
    )
    cert = base / "esx-ek.pem"
    cert.write_text(register_host(broker, instance, "esx-ek", Path(init.stdout.strip()).read_text()))
    made.run("install-cert", "--cert", cert)
    made.instance = instance
    yield made
    made.kill_all()


def ca_show_pem(broker) -> list[x509.Certificate]:
    out = run("vtpm-broker", "--config", broker.config, "ca", "show", "--pem").stdout
    return x509.load_pem_x509_certificates(out.encode())


def swap_ca(broker, directory: Path, name: str) -> x509.Certificate:
    """A third party's EK CA (certificate and key) imported into the broker."""
    ca = EkCa.create(name)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.pem").write_bytes(ca.cert_pem)
    key = ca.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (directory / "ca.key").write_bytes(key)
    (directory / "ca.key").chmod(0o600)
    run(
        "vtpm-broker",
        "--config",
        broker.config,
        "ca",
        "import",
        "--cert",
        directory / "ca.pem",
        "--key",
        directory / "ca.key",
    )
    return ca.cert


def recertify(broker, vm_uuid: str, out: Path) -> dict[str, bytes]:
    run("vtpm-broker", "--config", broker.config, "ca", "recertify", "--vm", vm_uuid, "--out-dir", out)
    return {NV_RSA: (out / "ek-rsa.cert").read_bytes(), NV_ECC: (out / "ek-ecc.cert").read_bytes()}


def test_ca_show_pem_prints_the_active_ek_ca(broker):
    """`ca show --pem` parses as a certificate: the broker's active EK CA, a CA."""
    [cert] = ca_show_pem(broker)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert "EK CA" in cert.subject.rfc4514_string()


def test_install_ek_certs_writes_the_recertified_certificates_into_nv(broker, host, tmp_path):
    """A VM's vTPM is manufactured (EK certificates from the original EK CA) and powered off; the EK CA is
    replaced and the VM re-certified; install-ek-certs on the stopped VM writes the new certificates and seals
    the next generation; the guest then reads from NV exactly the re-certified certificates, which chain to
    the CA that `ca show --pem` prints. A second re-certification is installed into the running vTPM, and
    a repeated install changes nothing."""
    datastore = tmp_path / "datastore"
    vm = create_vm(broker, host.instance, "ek-web", host="esx-ek")
    vmx_path = write_vmx(datastore, "ek-web", vm)
    nvram_path = vmx_path.parent / "ek-web.nvram"
    tcti = host.power_on(vmx_path, "power-on (manufacture)")
    original = tpm2("tpm2_nvread", tcti, NV_RSA)
    assert host.power_off(vmx_path) == 2

    new_ca = swap_ca(broker, tmp_path / "ca-2", "Example vTPM EK CA 2")
    [shown] = ca_show_pem(broker)
    assert shown == new_ca
    new = recertify(broker, vm["vm_uuid"], tmp_path / "recert-1")

    done = host.run("install-ek-certs", vmx_path)
    assert "0x01c00002" in done.stdout and "0x01c00016" in done.stdout and "generation 3" in done.stdout
    assert nvram.read_header(nvram_path.read_bytes()).generation == 3

    tcti = host.power_on(vmx_path)
    shown_pem = run("vtpm-broker", "--config", broker.config, "ca", "show", "--pem").stdout
    for index, der in new.items():
        read = tpm2("tpm2_nvread", tcti, index)
        assert read == der and read != original
        info = verify_ek_certificate(read, shown_pem)
        assert (
            info.issuer == new_ca.subject.rfc4514_string()
            or x509.load_der_x509_certificate(read).issuer == new_ca.subject
        )

    # Re-certified again (new serial numbers), installed while the vTPM runs; the seal comes at power-off.
    newer = recertify(broker, vm["vm_uuid"], tmp_path / "recert-2")
    result = json.loads(host.run("install-ek-certs", vmx_path, "--json").stdout)
    assert result["running"] is True
    assert {c["nv_index"]: c["written"] for c in result["certificates"]} == {
        NV_RSA: True,
        NV_ECC: True,
        "0x01c08000": True,
    }
    for index, der in newer.items():
        assert tpm2("tpm2_nvread", tcti, index) == der
    again = json.loads(host.run("install-ek-certs", vmx_path, "--json").stdout)
    assert not any(c["written"] for c in again["certificates"])
    assert host.power_off(vmx_path) == 4
    tcti = host.power_on(vmx_path)
    assert {index: tpm2("tpm2_nvread", tcti, index) for index in newer} == newer
    host.power_off(vmx_path)

    # The host's fetches are in the broker's trail.
    trail = json.loads(broker.admin("audit", "--vm", vm["vm_uuid"], "--json").stdout)["records"]
    assert [r["allowed"] for r in trail if r["action"] == "ek.read"] == [True, True, True]


def test_install_ek_certs_refusals_are_one_line(broker, host, tmp_path):
    """A .vmx of a VM the broker does not know and a broker that cannot be reached: one line each, exit 2,
    and nothing changes."""
    datastore = tmp_path / "datastore"
    vm = create_vm(broker, host.instance, "ek-other", host="esx-ek")
    ghost = write_vmx(datastore, "ghost", {**vm, "vm_uuid": str(uuid.uuid4())})
    err = host.refused("install-ek-certs", ghost)
    assert "HTTP 404" in err and "ek-certificates" in err

    # The same host's state, pointed at an API port where nothing listens.
    lost = Host(tmp_path / "esx-ek-lost")
    shutil.copytree(host.state_dir, lost.state_dir, symlinks=True)
    config = lost.state_dir / "config.toml"
    config.write_text(config.read_text().replace(broker.url, "https://127.0.0.1:9"))
    vmx_path = write_vmx(datastore, "ek-other", vm)
    err = lost.refused("install-ek-certs", vmx_path)
    assert "cannot reach the broker" in err
    assert not (vmx_path.parent / "ek-other.nvram").exists()
