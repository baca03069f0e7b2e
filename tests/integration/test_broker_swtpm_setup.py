"""swtpm_setup (Debian's swtpm and swtpm-tools) gets a vTPM's EK certificates
from the real, running vtpm-broker, through vtpm-ek-certtool in remote mode
(mutual TLS with the host certificate the broker issued), and the chain is
checked in Python against the TPM's own EK public keys; then the EK CA is
swapped for a third party's and `vtpm-broker ca recertify` re-issues the same
EKs under it.

Real processes on 127.0.0.1: a kms-server, a vtpm-broker (SQLite), swtpm
on Unix sockets in private directories, tpm2-tools.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from broker_process import assert_error, create_vm, enroll, register_host, set_up, write_config
from conftest import start_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID, ObjectIdentifier

from broker.host.swtpm import SwtpmError, SwtpmInstance, manufacture
from kmip_core.pki import CA_KEY_USAGE

TOOLS = ("swtpm", "swtpm_setup", "tpm2_nvread", "tpm2_readpublic", "tpm2_nvdefine", "tpm2_nvundefine", "tpm2_nvwrite")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason="needs Debian's swtpm, swtpm-tools and tpm2-tools; missing: " + ", ".join(MISSING),
)

# swtpm_setup 0.7.1: RSA-2048 EK 0x81010001 (certificate at NV 0x01c00002), ECC P-384 EK 0x81010016
# (certificate at NV 0x01c00016), platform certificate for the RSA EK at NV 0x01c08000.
RSA_EK, ECC_EK = 0x81010001, 0x81010016
NV_RSA, NV_ECC, NV_PLATFORM = 0x01C00002, 0x01C00016, 0x01C08000
CERT_FLAGS = ("--create-ek-cert", "--create-platform-cert")
TCG_KP_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
TCG_KP_PLATFORM_CERTIFICATE = ObjectIdentifier("2.23.133.8.2")
TCG_AT_TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
NV_ATTRIBUTES = "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate"


# --- Fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kms(tmp_path_factory, pki_dir):
    server = start_server(tmp_path_factory.mktemp("kms"), pki_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, pki_dir, kms):
    workdir = tmp_path_factory.mktemp("broker")
    b = set_up(workdir, write_config(workdir, kms.port, pki_dir), pki_dir)
    b.start()
    yield b
    b.stop()


# --- Helpers ------------------------------------------------------------------------------------


def certtool_command() -> str:
    script = Path(sys.executable).parent / "vtpm-ek-certtool"
    assert script.exists(), "vtpm-ek-certtool is not installed in the venv (pip install -e .)"
    return str(script)


def swtpm_setup_conf(directory: Path, broker, host: tuple[str, str]) -> Path:
    """The host's swtpm_setup.conf and vtpm-ek-certtool.toml: remote mode, this
    broker's API, the host certificate, the broker's trust CA."""
    directory.mkdir(parents=True, exist_ok=True)
    tool_config = directory / "vtpm-ek-certtool.toml"
    tool_config.write_text(
        'mode = "remote"\n\n[remote]\n'
        f'url = "{broker.url()}"\n'
        f'client_cert = "{host[0]}"\n'
        f'client_key = "{host[1]}"\n'
        f'ca_bundle = "{broker.ca}"\n'
        "timeout = 30\n"
    )
    conf = directory / "swtpm_setup.conf"
    conf.write_text(
        f"create_certs_tool = {certtool_command()}\n"
        f"create_certs_tool_config = {tool_config}\n"
        "active_pcr_banks = sha256\n"
    )
    return conf


def tpm2(tool: str, tpm: SwtpmInstance, *args: str, input: bytes | None = None) -> bytes:
    done = subprocess.run([tool, "-T", tpm.tcti, *args], input=input, capture_output=True, timeout=20)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def start_tpm(work: Path, swtpms: list[SwtpmInstance]) -> SwtpmInstance:
    tpm = SwtpmInstance(work / "state", work / "run")
    swtpms.append(tpm)
    tpm.start()
    return tpm


def tpm_ek_spki(tpm: SwtpmInstance, handle: int, scratch: Path) -> bytes:
    """`tpm2_readpublic -c <handle>`: the EK public key the TPM itself reports, as DER SPKI."""
    out = scratch / f"ek-{handle:x}.pem"
    tpm2("tpm2_readpublic", tpm, "-c", hex(handle), "-f", "pem", "-o", str(out))
    return spki(serialization.load_pem_public_key(out.read_bytes()))


def spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def broker_ek_ca(broker) -> x509.Certificate:
    """The broker's active EK CA certificate, from its database (public part)."""
    from broker.config import load_config
    from broker.db import Database

    db = Database(load_config(broker.config).storage.db_url)
    try:
        return x509.load_pem_x509_certificate(db.get_ca("ca:ek").cert_pem.encode())
    finally:
        db.close()


def check_chain(der: bytes, issuer: x509.Certificate, ek_spki: bytes, eku: ObjectIdentifier) -> x509.Certificate:
    """The certificate in NV is issued and signed by `issuer`, valid now, of the
    expected kind (EKU), and for exactly the EK the TPM holds."""
    assert len(der) <= 2048
    cert = x509.load_der_x509_certificate(der)
    cert.verify_directly_issued_by(issuer)  # issuer name and signature
    now = dt.datetime.now(dt.UTC)
    assert cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    assert issuer.not_valid_before_utc <= now <= issuer.not_valid_after_utc
    assert spki(cert.public_key()) == ek_spki
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [eku]
    assert cert.subject == x509.Name([])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical
    tpm_name = san.value.get_values_for_type(x509.DirectoryName)[0]
    assert tpm_name.get_attributes_for_oid(TCG_AT_TPM_MANUFACTURER)[0].value == "id:00001014"
    return cert


def make_ca(cn: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None):
    """A third party's CA (certificate, key), made with cryptography alone."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])  # fmt: skip
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if issuer is None else 0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA384()), key


def write_pem(path: Path, cert: x509.Certificate, key=None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        key_path.chmod(0o600)
    return path


# --- Tests --------------------------------------------------------------------------------------


def test_swtpm_setup_gets_ek_certificates_from_the_broker_then_ca_swap(broker, workdir, swtpms, tmp_path):
    """An instance enrolls, registers a host and creates a VM placed on it;
    swtpm_setup --createek --create-ek-cert --create-platform-cert on that
    host gets every certificate from the running broker; the RSA and ECC
    P-384 EK certificates read back from NV chain to the broker's EK CA and
    carry exactly the EKs `tpm2_readpublic` shows. Then a third-party CA is
    imported, `vtpm-broker ca recertify --vm` re-issues the same EKs under
    it, and the re-issued certificates, written into NV, chain to it."""
    identity = enroll(broker, "vc-swtpm")
    host = register_host(broker, identity, "esx-swtpm-1")
    vm = create_vm(broker, identity, host="esx-swtpm-1")
    conf = swtpm_setup_conf(tmp_path / "esx-swtpm-1", broker, host)

    work = workdir()
    made = manufacture(work / "state", vm["vm_uuid"], config=conf, extra_args=CERT_FLAGS)
    assert (made.rsa_ek_handle, made.ecc_ek_handle) == (RSA_EK, ECC_EK)
    assert "NVRAM area 0x1c00002 for RSA 2048 EK certificate" in made.output
    assert "NVRAM area 0x1c00016 for ECC EK certificate" in made.output

    old_ca = broker_ek_ca(broker)
    tpm = start_tpm(work, swtpms)
    rsa_spki, ecc_spki = tpm_ek_spki(tpm, RSA_EK, work / "run"), tpm_ek_spki(tpm, ECC_EK, work / "run")
    old = {index: tpm2("tpm2_nvread", tpm, hex(index)) for index in (NV_RSA, NV_ECC, NV_PLATFORM)}
    check_chain(old[NV_RSA], old_ca, rsa_spki, TCG_KP_EK_CERTIFICATE)
    ecc_cert = check_chain(old[NV_ECC], old_ca, ecc_spki, TCG_KP_EK_CERTIFICATE)
    assert ecc_cert.public_key().curve.name == "secp384r1"
    check_chain(old[NV_PLATFORM], old_ca, rsa_spki, TCG_KP_PLATFORM_CERTIFICATE)

    # The broker's audit trail has the three issues for this VM, to this host.
    trail = broker.cli("admin", "audit", "--json").stdout
    issues = [
        (r["actor"], r["allowed"]) for r in json.loads(trail)["records"]
        if r["action"] == "ek.issue" and r["target"] == vm["vm_uuid"]
    ]  # fmt: skip
    assert issues == [("host:esx-swtpm-1", True)] * 3

    # --- CA swap: a third party's intermediate (with its root as chain) replaces the EK CA.
    root = make_ca("Example Root CA")
    intermediate = make_ca("Example vTPM EK CA", issuer=root)
    ca_dir = tmp_path / "third-party"
    ca_dir.mkdir()
    cert_file = write_pem(ca_dir / "ek-ca.pem", *intermediate)
    chain_file = write_pem(ca_dir / "root.pem", root[0])
    imported = broker.cli(
        "ca", "import", "--cert", str(cert_file), "--key", str(ca_dir / "ek-ca.key"), "--chain", str(chain_file)
    )
    assert "Example vTPM EK CA" in imported.stdout
    assert broker_ek_ca(broker) == intermediate[0]
    out = tmp_path / "recertified"
    done = broker.cli("ca", "recertify", "--vm", vm["vm_uuid"], "--out-dir", str(out))
    assert "0x01c00002" in done.stdout and "0x01c00016" in done.stdout and "0x01c08000" in done.stdout
    new = {
        NV_RSA: (out / "ek-rsa.cert").read_bytes(),
        NV_ECC: (out / "ek-ecc.cert").read_bytes(),
        NV_PLATFORM: (out / "platform-rsa.cert").read_bytes(),
    }
    intermediate[0].verify_directly_issued_by(root[0])
    check_chain(new[NV_RSA], intermediate[0], rsa_spki, TCG_KP_EK_CERTIFICATE)
    check_chain(new[NV_ECC], intermediate[0], ecc_spki, TCG_KP_EK_CERTIFICATE)
    check_chain(new[NV_PLATFORM], intermediate[0], rsa_spki, TCG_KP_PLATFORM_CERTIFICATE)
    # The old certificates still chain to the old CA (existing VMs keep working).
    check_chain(old[NV_RSA], old_ca, rsa_spki, TCG_KP_EK_CERTIFICATE)

    # The host installs them (platform hierarchy, before any guest firmware); the EKs never change.
    for index, der in new.items():
        tpm2("tpm2_nvundefine", tpm, hex(index), "-C", "p")
        tpm2("tpm2_nvdefine", tpm, hex(index), "-C", "p", "-s", str(len(der)), "-a", NV_ATTRIBUTES)
        tpm2("tpm2_nvwrite", tpm, hex(index), "-C", "p", "-i", "-", input=der)
    assert tpm.shutdown() == 0
    tpm = start_tpm(work, swtpms)
    assert {index: tpm2("tpm2_nvread", tpm, hex(index)) for index in new} == new
    assert tpm_ek_spki(tpm, RSA_EK, work / "run") == rsa_spki
    assert tpm_ek_spki(tpm, ECC_EK, work / "run") == ecc_spki
    assert tpm.shutdown() == 0


def test_ek_certificate_refused_to_other_hosts(broker, workdir, tmp_path):
    """A host of another instance, and a host of the same instance the VM is
    not placed on, are refused an EK certificate: a 4xx with one line from the
    API, and swtpm_setup fails with the broker's reason."""
    a = enroll(broker, "vc-ek-a")
    b = enroll(broker, "vc-ek-b")
    placed = register_host(broker, a, "esx-a-1")
    sibling = register_host(broker, a, "esx-a-2")
    foreign = register_host(broker, b, "esx-b-1")
    vm = create_vm(broker, a, host="esx-a-1")

    body = {
        "vm_uuid": vm["vm_uuid"], "type": "ek", "key_type": "ecc",
        "public_key_pem": ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "tpm_manufacturer": "id:00001014", "tpm_model": "swtpm", "tpm_version": "id:20191023",
        "tpm_spec_family": "2.0", "tpm_spec_level": 0, "tpm_spec_revision": 164,
    }  # fmt: skip
    # Another instance's host may not even learn that the VM exists.
    assert_error(broker.call("POST", "/v1/vtpm/ek-certificates", foreign, json=body), 404, f"no VM {vm['vm_uuid']}")
    assert_error(broker.call("POST", "/v1/vtpm/ek-certificates", sibling, json=body), 403, "may not act for VM")
    assert broker.call("POST", "/v1/vtpm/ek-certificates", placed, json=body).status_code == 201

    # The same refusals through swtpm_setup on those hosts: it fails, saying why in one line.
    for name, host, words in (("esx-b-1", foreign, "HTTP 404"), ("esx-a-2", sibling, "HTTP 403")):
        conf = swtpm_setup_conf(tmp_path / name, broker, host)
        work = workdir()
        with pytest.raises(SwtpmError) as failure:
            manufacture(work / "state", vm["vm_uuid"], config=conf, extra_args=CERT_FLAGS)
        message = str(failure.value)
        assert "\n" not in message and words in message and "the broker refused the certificate" in message
    # And a VM the broker does not know at all.
    conf = swtpm_setup_conf(tmp_path / "esx-a-1", broker, placed)
    with pytest.raises(SwtpmError, match="HTTP 404"):
        manufacture(workdir() / "state", uuid.uuid4(), config=conf, extra_args=CERT_FLAGS)
