"""vtpm-ek-certtool as swtpm_setup's create_certs_tool, with the real swtpm_setup, swtpm and tpm2-tools.

The certificates are read back from the running TPM's NV indices and checked
in Python against the TPM's own EK public keys. Unix sockets live in private
temporary directories only; every swtpm is killed in a finalizer.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from broker import ek_certtool
from broker.ek_certtool import CerttoolError, ek_public_key_pem, load_config, write_local_ca
from broker.host.swtpm import SwtpmError, SwtpmInstance, manufacture
from broker.vtpm_ca import (
    EkCa,
    EkRequestError,
    handle_ek_certificate_request,
    read_ek_certificate,
    recertify,
    verify_ek_certificate,
)

TOOLS = ("swtpm", "swtpm_setup", "tpm2_nvread", "tpm2_readpublic", "tpm2_nvdefine", "tpm2_nvundefine", "tpm2_nvwrite")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
needs_swtpm = pytest.mark.skipif(
    bool(MISSING),
    reason="needs Debian's swtpm, swtpm-tools and tpm2-tools (apt-get install swtpm swtpm-tools tpm2-tools); "
    f"missing: {', '.join(MISSING)}",
)

# What swtpm_setup 0.7.1 makes: an RSA-2048 EK at 0x81010001 with its certificate at NV 0x01c00002, an
# ECC NIST P-384 EK at 0x81010016 with its certificate at 0x01c00016 (the TCG "high range" index for
# P-384; 0x01c0000a would be P-256), and the platform certificate at 0x01c08000.
RSA_EK, ECC_EK = 0x81010001, 0x81010016
NV_RSA_EK_CERT, NV_ECC_EK_CERT, NV_PLATFORM_CERT = 0x01C00002, 0x01C00016, 0x01C08000
TPM_FIELDS = dict(tpm_manufacturer="id:00001014", tpm_model="swtpm", tpm_version="id:20191023")
CERT_FLAGS = ("--create-ek-cert", "--create-platform-cert")


# --- Fixtures and helpers ---------------------------------------------------------------------


def certtool_command(scratch: Path) -> str:
    """The installed console script, or a wrapper that runs the module with this interpreter."""
    script = Path(sys.executable).parent / "vtpm-ek-certtool"
    if script.exists():
        return str(script)
    wrapper = scratch / "vtpm-ek-certtool"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m broker.ek_certtool "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


def swtpm_setup_conf(scratch: Path, certtool_config: str) -> Path:
    """A swtpm_setup.conf that names our certificate tool and its configuration file."""
    config = scratch / "ek-certtool.toml"
    config.write_text(certtool_config)
    conf = scratch / "swtpm_setup.conf"
    conf.write_text(
        f"create_certs_tool = {certtool_command(scratch)}\n"
        f"create_certs_tool_config = {config}\n"
        "active_pcr_banks = sha256\n"
    )
    return conf


def start(work: Path, swtpms: list[SwtpmInstance]) -> SwtpmInstance:
    instance = SwtpmInstance(work / "state", work / "run")
    swtpms.append(instance)
    instance.start()
    return instance


def tpm2(tool: str, tpm: SwtpmInstance, *args: str, input: bytes | None = None) -> bytes:
    done = subprocess.run([tool, "-T", tpm.tcti, *args], input=input, capture_output=True, timeout=10)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def nv_read(tpm: SwtpmInstance, index: int) -> bytes:
    return tpm2("tpm2_nvread", tpm, hex(index))


def ek_public_pem(tpm: SwtpmInstance, handle: int, scratch: Path) -> bytes:
    out = scratch / f"ek-{handle:x}.pem"
    tpm2("tpm2_readpublic", tpm, "-c", hex(handle), "-f", "pem", "-o", str(out))
    return out.read_bytes()


def spki_der(pem: bytes) -> bytes:
    return serialization.load_pem_public_key(pem).public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_tpm_certificates(tpm: SwtpmInstance, ca_pem: bytes, scratch: Path) -> dict[int, bytes]:
    """Each certificate in NV chains to ca_pem and is for the EK the TPM itself reports."""
    rsa_pem, ecc_pem = ek_public_pem(tpm, RSA_EK, scratch), ek_public_pem(tpm, ECC_EK, scratch)
    certs = {index: nv_read(tpm, index) for index in (NV_RSA_EK_CERT, NV_ECC_EK_CERT, NV_PLATFORM_CERT)}
    expected = {
        NV_RSA_EK_CERT: ("ek", "rsa", rsa_pem),
        NV_ECC_EK_CERT: ("ek", "ecc", ecc_pem),
        NV_PLATFORM_CERT: ("platform", "rsa", rsa_pem),
    }
    for index, der in certs.items():
        cert_type, key_type, public_pem = expected[index]
        info = verify_ek_certificate(der, ca_pem, public_key_pem=public_pem)
        assert (info.cert_type, info.key_type) == (cert_type, key_type), hex(index)
        assert spki_der(info.public_key_pem) == spki_der(public_pem)
        assert (info.tpm_manufacturer, info.tpm_model, info.tpm_version) == tuple(TPM_FIELDS.values())
        assert (info.spec_family, info.spec_level, info.spec_revision) == ("2.0", 0, 164)
        assert len(der) <= 2048
    assert serialization.load_pem_public_key(ecc_pem).curve.name == "secp384r1"
    return certs


def local_ca(scratch: Path) -> tuple[EkCa, str]:
    ca = EkCa.create("vtpm-broker EK CA (test)")
    write_local_ca(ca, scratch / "ek-ca")
    return ca, 'mode = "local"\n\n[local]\nca_dir = "ek-ca"\n'


def make_ca_cert(cn: str, issuer: tuple[x509.Certificate, object] | None = None):
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Third Party"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(issuer_key, hashes.SHA384())
    )
    return cert, key


def pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# --- A minimal broker endpoint: HTTPS, mutual TLS, the real handler --------------------------


class FakeBroker:
    """POST /v1/vtpm/ek-certificates on 127.0.0.1 with mutual TLS, served by handle_ek_certificate_request.

    The broker core mounts the same handler in the real API; here the policy
    is a set of (host CN, VM UUID) placements.
    """

    def __init__(self, ca: EkCa, pki: Path):
        self.ca = ca
        self.placements: set[tuple[str, uuid.UUID]] = set()
        self.calls: list[tuple[str, dict, int]] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(pki / "server.pem", pki / "server.key")
        context.load_verify_locations(pki / "ca.pem")
        context.verify_mode = ssl.CERT_REQUIRED
        broker = self

        class Handler(BaseHTTPRequestHandler):
            def setup(self):
                self.request = context.wrap_socket(self.request, server_side=True)
                super().setup()

            def finish(self):
                try:
                    super().finish()
                finally:
                    self.request.close()  # the server closes only the raw socket, which the TLS one detached

            def log_message(self, *args):
                pass

            def do_POST(self):
                subject = dict(pair[0] for pair in self.connection.getpeercert()["subject"])
                host = subject["commonName"]
                length = int(self.headers.get("Content-Length", "0"))
                body: object = {}
                status, answer = 413, {"error": "body too large"}
                if self.path != "/v1/vtpm/ek-certificates":
                    status, answer = 404, {"error": "no such endpoint"}
                elif length <= 64 * 1024:
                    try:
                        body = json.loads(self.rfile.read(length))
                        answer = handle_ek_certificate_request(broker.ca, body, host, authorize=broker.authorize)
                        status = 201
                    except ValueError:
                        status, answer = 400, {"error": "malformed JSON"}
                    except EkRequestError as exc:
                        status, answer = exc.status, {"error": exc.message}
                broker.calls.append((host, body, status))
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # a client that fails the TLS handshake is refused, not a test failure

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"https://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def authorize(self, host: str, vm: uuid.UUID) -> None:
        if (host, vm) not in self.placements:
            raise EkRequestError(404, f"VM {vm} is not placed on host {host}")

    def __enter__(self) -> FakeBroker:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    from kmip_core.pki import init_pki

    directory = tmp_path_factory.mktemp("broker-pki")
    init_pki(directory, server_names=["127.0.0.1"], clients=["esx1", "esx2"], key_type="ec")
    return directory


def remote_config(url: str, pki: Path, host: str = "esx1") -> str:
    return (
        'mode = "remote"\n\n[remote]\n'
        f'url = "{url}"\n'
        f'client_cert = "{pki / (host + ".pem")}"\n'
        f'client_key = "{pki / (host + ".key")}"\n'
        f'ca_bundle = "{pki / "ca.pem"}"\n'
        "timeout = 10\n"
    )


# --- With the real swtpm_setup ------------------------------------------------------------------


@needs_swtpm
def test_local_mode_certificates_land_in_the_tpm_nv(workdir, swtpms, tmp_path):
    """swtpm_setup --create-ek-cert --create-platform-cert with the certtool in local mode: the RSA and ECC EK
    certificates and the platform certificate are in NV, chain to the CA and carry the TPM's own EK keys."""
    ca, config = local_ca(tmp_path)
    conf = swtpm_setup_conf(tmp_path, config)
    work = workdir()
    made = manufacture(work / "state", uuid.uuid4(), config=conf, extra_args=CERT_FLAGS)
    assert (made.rsa_ek_handle, made.ecc_ek_handle) == (RSA_EK, ECC_EK)
    assert "NVRAM area 0x1c00002 for RSA 2048 EK certificate" in made.output
    assert "NVRAM area 0x1c00016 for ECC EK certificate" in made.output

    tpm = start(work, swtpms)
    certs = check_tpm_certificates(tpm, ca.ca_pem, work / "run")
    assert all(x509.load_der_x509_certificate(der).issuer == ca.cert.subject for der in certs.values())
    assert tpm.shutdown() == 0


@needs_swtpm
def test_remote_mode_gets_certificates_from_the_broker_over_mutual_tls(workdir, swtpms, tmp_path, pki):
    """The certtool POSTs each EK to the broker endpoint with the host certificate; the VM must be placed on that
    host, and a refusal fails swtpm_setup with the broker's one-line reason."""
    ca = EkCa.create("vtpm-broker EK CA (remote test)")
    vm, elsewhere = uuid.uuid4(), uuid.uuid4()
    with FakeBroker(ca, pki) as broker:
        broker.placements = {("esx1", vm), ("esx2", elsewhere)}
        conf = swtpm_setup_conf(tmp_path, remote_config(broker.url, pki))
        work = workdir()
        manufacture(work / "state", vm, config=conf, extra_args=CERT_FLAGS)
        assert [(host, body["type"], body["key_type"], status) for host, body, status in broker.calls] == [
            ("esx1", "ek", "rsa", 201),
            ("esx1", "platform", "rsa", 201),
            ("esx1", "ek", "ecc", 201),
        ]
        assert {body["vm_uuid"] for _, body, _ in broker.calls} == {str(vm)}
        tpm = start(work, swtpms)
        check_tpm_certificates(tpm, ca.ca_pem, work / "run")
        assert tpm.shutdown() == 0

        # esx1 may not certify a VM placed on esx2: swtpm_setup fails and says why.
        other = workdir()
        with pytest.raises(SwtpmError, match=f"HTTP 404.*VM {elsewhere} is not placed on host esx1"):
            manufacture(other / "state", elsewhere, config=conf, extra_args=CERT_FLAGS)


@needs_swtpm
def test_ca_swap_recertifies_the_same_ek_under_a_third_party_ca(workdir, swtpms, tmp_path):
    """Import a third-party CA (intermediate + root), re-certify the vTPM's EK: same public key and TPM
    attributes, chained to the new CA; the old certificate still verifies under the old CA. The host then
    replaces the certificate in NV (platform hierarchy) and the TPM presents the new one after a restart."""
    old_ca, config = local_ca(tmp_path)
    conf = swtpm_setup_conf(tmp_path, config)
    work = workdir()
    manufacture(work / "state", uuid.uuid4(), config=conf, extra_args=CERT_FLAGS)
    tpm = start(work, swtpms)
    old_certs = check_tpm_certificates(tpm, old_ca.ca_pem, work / "run")

    root = make_ca_cert("Third Party Root CA")
    intermediate = make_ca_cert("Third Party vTPM EK CA", issuer=root)
    new_ca = EkCa.import_ca(pem(intermediate[0]), key_pem(intermediate[1]), chain_pem=pem(root[0]))

    new_certs = {index: recertify(new_ca, der, issued_by=[old_ca.cert]) for index, der in old_certs.items()}
    for index, der in new_certs.items():
        before, after = read_ek_certificate(old_certs[index]), read_ek_certificate(der)
        verify_ek_certificate(der, new_ca.ca_pem, public_key_pem=before.public_key_pem)
        verify_ek_certificate(old_certs[index], old_ca.ca_pem, public_key_pem=before.public_key_pem)
        assert (after.cert_type, after.tpm_manufacturer, after.tpm_model, after.tpm_version) == (
            before.cert_type,
            before.tpm_manufacturer,
            before.tpm_model,
            before.tpm_version,
        )
        assert (after.spec_family, after.spec_level, after.spec_revision) == ("2.0", 0, 164)

    # Host side of the swap: redefine each index at the new size and write the new certificate.
    attributes = "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate"
    for index, der in new_certs.items():
        tpm2("tpm2_nvundefine", tpm, hex(index), "-C", "p")
        tpm2("tpm2_nvdefine", tpm, hex(index), "-C", "p", "-s", str(len(der)), "-a", attributes)
        tpm2("tpm2_nvwrite", tpm, hex(index), "-C", "p", "-i", "-", input=der)
    assert tpm.shutdown() == 0
    tpm = start(work, swtpms)
    assert check_tpm_certificates(tpm, new_ca.ca_pem, work / "run") == new_certs
    assert tpm.shutdown() == 0


# --- The tool on its own (no swtpm needed) -------------------------------------------------------


def test_ek_argument_rebuilds_rsa_and_ecc_keys():
    rsa_key = rsa.generate_private_key(65537, 2048).public_key()
    modulus = format(rsa_key.public_numbers().n, "x")
    pem_bytes, key_type = ek_public_key_pem(modulus)
    assert key_type == "rsa" and spki_der(pem_bytes) == spki_der(
        rsa_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    for curve, suffix in ((ec.SECP384R1(), ",id=secp384r1"), (ec.SECP256R1(), "")):
        numbers = ec.generate_private_key(curve).public_key().public_numbers()
        size = curve.key_size // 4
        pem_bytes, key_type = ek_public_key_pem(f"x={numbers.x:0{size}x},y={numbers.y:0{size}x}{suffix}")
        assert key_type == "ecc"
        assert serialization.load_pem_public_key(pem_bytes).public_numbers() == numbers
    for bad, message in (
        ("x=01,y=02,id=secp384r1", "not on secp384r1"),
        ("x=01,y=02,id=brainpool", "not supported"),
        ("x=01", "both x= and y="),
        ("x=01,z=02", "expected x="),
        ("zz", "not hex"),
    ):
        with pytest.raises(CerttoolError, match=message):
            ek_public_key_pem(bad)


def test_config_file_is_checked(tmp_path):
    path = tmp_path / "c.toml"
    for text, message in (
        ('mode = "cloud"\n', "mode must be"),
        ('mode = "local"\nsecret = 1\n', "unknown key 'secret'"),
        ('mode = "local"\n[local]\n', "local.ca_dir is required"),
        ('mode = "local"\n[local]\nca_dir = "d"\nca_key = "k"\n', "unknown key local.ca_key"),
        ('mode = "remote"\n[remote]\nurl = "http://broker"\n', "https://"),
        ('mode = "remote"\n[remote]\nurl = "https://b"\nclient_cert = "c"\n', "remote.client_key is required"),
        ('mode = "remote\n', "not valid TOML"),
    ):
        path.write_text(text)
        with pytest.raises(CerttoolError, match=message):
            load_config(path)
    with pytest.raises(CerttoolError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    path.write_text('mode = "local"\n[local]\nca_dir = "ca"\n')
    assert load_config(path).ca_dir == tmp_path / "ca"


SWTPM_ARGS = [
    "--type",
    "ek",
    "--vmid",
    "6f1c0e02-51a3-4a8e-9f4b-2f3c5d9e7a10",
    "--tpm-spec-family",
    "2.0",
    "--tpm-spec-level",
    "0",
    "--tpm-spec-revision",
    "164",
    "--tpm-manufacturer",
    "id:00001014",
    "--tpm-model",
    "swtpm",
    "--tpm-version",
    "id:20191023",
    "--tpm2",
]


def test_tool_writes_the_certificate_and_fails_in_one_line(tmp_path, capsys):
    """Direct runs of main(): ek.cert written in local mode; errors are one stderr line and exit 1."""
    ca, config = local_ca(tmp_path)
    (tmp_path / "c.toml").write_text(config)
    numbers = ec.generate_private_key(ec.SECP384R1()).public_key().public_numbers()
    ek = f"x={numbers.x:096x},y={numbers.y:096x},id=secp384r1"
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "setup.log"
    argv = ["--ek", ek, "--dir", str(out), "--configfile", str(tmp_path / "c.toml"), "--logfile", str(log)]
    argv += ["--optsfile", "/nonexistent", *SWTPM_ARGS, "--future-option", "1"]
    assert ek_certtool.main(argv) == 0
    info = verify_ek_certificate((out / "ek.cert").read_bytes(), ca.ca_pem)
    assert info.key_type == "ecc"
    assert "ignoring arguments" in log.read_text() and "wrote" in log.read_text()
    capsys.readouterr()

    for change, message in (
        (lambda a: [x for x in a if x != "--tpm2"], "only TPM 2.0"),
        (lambda a: [*a[: a.index("--vmid")], *a[a.index("--vmid") + 2 :]], "--vmid is required"),
        (lambda a: [*a, "--vmid", "myvm"], "is not a UUID"),
        (lambda a: [*a, "--tpm-spec-level", "zero"], "invalid int value"),
        (lambda a: [*a, "--tpm-manufacturer", "IBM"], r"refused the request \(400\)"),
        (lambda a: [*a, "--dir", str(tmp_path / "nowhere")], "not a directory"),
    ):
        assert ek_certtool.main(change(list(argv))) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("vtpm-ek-certtool: "), err
        assert re.search(message, err), err

    (tmp_path / "ek-ca" / "ek-ca.key").chmod(0o644)
    assert ek_certtool.main(argv) == 1
    assert "chmod 600" in capsys.readouterr().err


def test_remote_refusals_and_tls_failures_are_one_line(tmp_path, pki, capsys):
    ca = EkCa.create("vtpm-broker EK CA (remote unit)")
    key = rsa.generate_private_key(65537, 2048).public_key()
    out = tmp_path / "out"
    out.mkdir()
    with FakeBroker(ca, pki) as broker:
        broker.placements = {("esx1", uuid.UUID("6f1c0e02-51a3-4a8e-9f4b-2f3c5d9e7a10"))}
        argv = ["--ek", format(key.public_numbers().n, "x"), "--dir", str(out), *SWTPM_ARGS]

        config = tmp_path / "esx1.toml"
        config.write_text(remote_config(broker.url, pki, "esx1"))
        assert ek_certtool.main([*argv, "--configfile", str(config)]) == 0
        assert read_ek_certificate((out / "ek.cert").read_bytes()).key_type == "rsa"

        config.write_text(remote_config(broker.url, pki, "esx2"))
        assert ek_certtool.main([*argv, "--configfile", str(config)]) == 1
        assert "HTTP 404" in capsys.readouterr().err

        # A broker whose certificate the host does not trust is never sent the request.
        stranger = EkCa.create("stranger")
        (tmp_path / "other-ca.pem").write_bytes(stranger.cert_pem)
        config.write_text(
            remote_config(broker.url, pki, "esx1").replace(str(pki / "ca.pem"), str(tmp_path / "other-ca.pem"))
        )
        calls = len(broker.calls)
        assert ek_certtool.main([*argv, "--configfile", str(config)]) == 1
        err = capsys.readouterr().err
        assert "cannot reach the broker" in err and "CERTIFICATE_VERIFY_FAILED" in err and err.count("\n") == 1
        assert len(broker.calls) == calls


def test_init_local_ca_refuses_to_replace_a_ca(tmp_path, capsys):
    assert ek_certtool.main(["--init-local-ca", str(tmp_path / "ca")]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "ca" / "ek-ca.pem").read_bytes())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert (tmp_path / "ca" / "ek-ca.key").stat().st_mode & 0o777 == 0o600
    assert ek_certtool.main(["--init-local-ca", str(tmp_path / "ca")]) == 1
    assert "already holds an EK CA" in capsys.readouterr().err


# --- vtpm-host's runs: the thin tool hands its arguments to the agent's relay -------------------------


def relay_setup_conf(run: Path) -> Path:
    """What the agent writes for one swtpm_setup run (Agent._swtpm_setup_conf)."""
    from broker.host.ek_relay import SOCKET_NAME, TOOL_NAME, tool_wrapper

    tool = run / TOOL_NAME
    tool.write_bytes(tool_wrapper(run / SOCKET_NAME))
    tool.chmod(0o700)
    conf = run / "swtpm_setup.conf"
    conf.write_text(f"create_certs_tool = {tool}\nactive_pcr_banks = sha256\n")
    return conf


def local_issuer(ca: EkCa, calls: list[dict]):
    """The relay's `issue`: the broker's EK CA handler, in-process, recording each request."""

    def issue(request: dict) -> dict:
        calls.append(request)
        try:
            return handle_ek_certificate_request(ca, request, "host:esx1")
        except EkRequestError as exc:
            from broker.host.errors import BrokerRefused

            raise BrokerRefused(f"the broker refused the EK certificate ({exc.status}): {exc.message}") from None

    return issue


def run_dir(workdir) -> tuple[Path, Path]:
    work = workdir()
    run = work / "run"
    run.mkdir(mode=0o700, exist_ok=True)
    return work, run


@needs_swtpm
def test_relay_certificates_land_in_the_tpm_nv(workdir, swtpms, tmp_path):
    """swtpm_setup runs the thin tool three times; each request reaches the relay, which asks the CA
    once per certificate and writes it; the certificates land in NV, chain to the CA and carry the
    TPM's own EKs, exactly as with the full tool in local and remote mode."""
    from broker.host.ek_relay import EkCertificateRelay

    ca = EkCa.create("vtpm-broker EK CA (relay test)")
    vm = uuid.uuid4()
    work, run = run_dir(workdir)
    calls: list[dict] = []
    with EkCertificateRelay(run, str(vm), local_issuer(ca, calls)) as relay:
        made = manufacture(work / "state", vm, config=relay_setup_conf(run), extra_args=CERT_FLAGS)
    assert relay.served == 3 and not relay.path.exists()
    assert "via the host agent" in made.output
    assert sorted((c["type"], c["key_type"]) for c in calls) == [("ek", "ecc"), ("ek", "rsa"), ("platform", "rsa")]
    assert {c["vm_uuid"] for c in calls} == {str(vm)}
    tpm = start(work, swtpms)
    check_tpm_certificates(tpm, ca.ca_pem, tmp_path)
    assert tpm.shutdown() == 0


@needs_swtpm
def test_relay_refusal_fails_swtpm_setup_with_the_reason(workdir):
    """The broker refuses (a VM not placed on this host, say): the thin tool exits 1 with the relay's
    one line, and swtpm_setup fails with it."""
    from broker.host.ek_relay import EkCertificateRelay
    from broker.host.errors import BrokerRefused

    def refuse(request: dict) -> dict:
        raise BrokerRefused(f"the broker refused POST /v1/vtpm/ek-certificates (HTTP 404): no VM {request['vm_uuid']}")

    vm = uuid.uuid4()
    work, run = run_dir(workdir)
    with EkCertificateRelay(run, str(vm), refuse), pytest.raises(SwtpmError, match=f"HTTP 404.*no VM {vm}"):
        manufacture(work / "state", vm, config=relay_setup_conf(run), extra_args=CERT_FLAGS)


def tool(run: Path, *args: str) -> subprocess.CompletedProcess:
    """The wrapper the agent writes, run as swtpm_setup runs it."""
    relay_setup_conf(run)
    return subprocess.run([str(run / "vtpm-ek-certtool"), *args], capture_output=True, text=True, timeout=60)


def test_thin_tool_through_the_relay(tmp_path):
    """The thin tool: the relay writes the certificate and the tool prints its line; a request for
    another VM, a missing relay, and something else on the socket are each one stderr line, exit 1."""
    from broker.host.ek_relay import EkCertificateRelay

    ca = EkCa.create("vtpm-broker EK CA (thin tool)")
    key = rsa.generate_private_key(65537, 2048).public_key()
    out = tmp_path / "out"
    out.mkdir()
    log = tmp_path / "setup.log"
    argv = ["--ek", f"{key.public_numbers().n:x}", "--dir", str(out), "--logfile", str(log), *SWTPM_ARGS]
    vm = SWTPM_ARGS[SWTPM_ARGS.index("--vmid") + 1]
    calls: list[dict] = []
    with EkCertificateRelay(tmp_path, vm, local_issuer(ca, calls)) as relay:
        done = tool(tmp_path, *argv, "--future-option", "1")
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"wrote {out / 'ek.cert'} (ek, RSA EK") and "via the host agent" in done.stdout
        info = verify_ek_certificate((out / "ek.cert").read_bytes(), ca.ca_pem)
        assert (info.cert_type, info.key_type) == ("ek", "rsa") and len(calls) == 1
        assert "ignoring arguments" in log.read_text() and "wrote" in log.read_text()

        for extra, message in (
            (["--vmid", str(uuid.uuid4())], "is manufacturing VM"),
            (["--tpm-manufacturer", "IBM"], r"refused the EK certificate \(400\)"),
            (["--dir", str(tmp_path / "nowhere")], "not a directory"),
            (["--help"], "serves certificate requests only"),
        ):
            done = tool(tmp_path, *argv, *extra)
            assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
            assert done.stderr.startswith("vtpm-ek-certtool: ") and re.search(message, done.stderr), done.stderr
        assert relay.served == 1
    done = tool(tmp_path, *argv)
    assert done.returncode == 1 and "cannot reach the host agent" in done.stderr and done.stderr.count("\n") == 1

    # Something else listening on the socket: its answer is not taken for the relay's.
    import socket as socket_module

    with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as fake:
        fake.bind(str(tmp_path / "ek-relay.sock"))
        fake.listen(1)

        def answer_garbage():
            conn, _ = fake.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"<html>")

        threading.Thread(target=answer_garbage, daemon=True).start()
        done = tool(tmp_path, *argv)
    assert done.returncode == 1 and "not what its relay sends" in done.stderr


def test_relay_refuses_requests_that_are_not_the_tool(tmp_path):
    """Raw connections: not JSON, other keys, non-string arguments: each answered with an error and
    no CA call; the socket is the owner's only."""
    import socket as socket_module

    from broker.host.ek_relay import EkCertificateRelay

    calls: list[dict] = []

    def ask(payload: bytes) -> dict:
        with socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM) as sock:
            sock.connect(str(tmp_path / "ek-relay.sock"))
            sock.sendall(payload)
            sock.shutdown(socket_module.SHUT_WR)
            return json.loads(sock.recv(65536))

    with EkCertificateRelay(tmp_path, str(uuid.uuid4()), local_issuer(EkCa.create("x"), calls)) as relay:
        assert oct(relay.path.stat().st_mode & 0o777) == "0o600"
        for payload in (
            b"GET / HTTP/1.0\r\n\r\n",
            json.dumps({"argv": ["--type", "ek"], "cmd": "sh"}).encode(),
            json.dumps({"argv": [1, 2]}).encode(),
        ):
            assert "not a certificate tool request" in ask(payload + b"\n")["error"]
    assert calls == [] and relay.served == 0


def test_thin_tool_and_full_tool_start_light():
    """The thin tool runs in an isolated interpreter without site-packages: it imports nothing but the
    standard library. The full tool's module, too, loads cryptography, ssl, urllib and the CA code
    only when a mode needs them."""
    from broker.host import ek_tool

    code = (
        "import sys, runpy; runpy.run_path(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('broker', 'kms_server', 'cryptography')))"
    )
    done = subprocess.run([sys.executable, "-I", "-S", "-c", code, ek_tool.__file__], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    code = (
        "import sys, broker.ek_certtool; "
        "print(sorted(m for m in ('cryptography', 'ssl', 'urllib.request', 'broker.vtpm_ca', 'sqlalchemy') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
