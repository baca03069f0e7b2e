"""The host agent's identity and settings in its state directory.

Layout of the state directory (``vtpm-host --state-dir D``, mode 0700)::

    config.toml         name, gateway(s), API URL (written by `init`); an optional
                        [attestation] table: the host TPM's TCTI (`init --tpm`)
    host.key            the host's private key (P-256, PKCS#8 PEM, mode 0600)
    host.csr            its CSR, CN = host:<name>, for POST /v1/hosts
    host.pem            the host certificate (`install-cert`), from the broker's trust CA
    trust-ca.pem        the broker's trust CA (copied from --ca at `init`)
    running/<uuid>.json what a power-off needs (pid, sockets, workdir, generation; never a key)
    locks/<uuid>.lock   per-VM lock: power-on and power-off of one VM never overlap
    attestation/        host attestation (broker/host/attest.py), mode 0700:
                        token.json (the broker's token, mode 0600), enrolled.json,
                        tpm/ (tpm2-tools' scratch files)

At each manufacture the agent writes swtpm_setup.conf and the certificate
tool's wrapper into the VM's private run directory, not here
(broker/host/ek_relay.py).

The settings are read once into a frozen dataclass (`load_config`).
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.host.errors import HostError
from kmip_core.files import write_atomic
from kmip_core.names import check_name

__all__ = [
    "CONFIG_FILE",
    "TCTI_KINDS",
    "HostConfig",
    "check_tcti",
    "init_state_dir",
    "install_certificate",
    "load_config",
    "toml_string",
    "write_private",
    "write_public",
]

CONFIG_FILE = "config.toml"
KEY_FILE = "host.key"
CSR_FILE = "host.csr"
CERT_FILE = "host.pem"
CA_FILE = "trust-ca.pem"
DEFAULT_TIMEOUT = 30.0

_KEYS = {"name", "gateway", "api", "timeout", "attestation"}
_ATTESTATION_KEYS = {"tcti"}
# The TCTIs tpm2-tools can reach a host TPM through: the kernel's resource
# manager (device:/dev/tpmrm0), a swtpm or the simulator, the tabrmd daemon.
TCTI_KINDS = ("device", "swtpm", "mssim", "tabrmd")


@dataclass(frozen=True)
class HostConfig:
    state_dir: Path
    name: str
    gateway: tuple[str, ...]
    api: str
    timeout: float = DEFAULT_TIMEOUT
    # The host TPM's TCTI for host attestation; None: this host does not attest.
    attestation_tcti: str | None = None

    @property
    def key(self) -> Path:
        return self.state_dir / KEY_FILE

    @property
    def csr(self) -> Path:
        return self.state_dir / CSR_FILE

    @property
    def cert(self) -> Path:
        return self.state_dir / CERT_FILE

    @property
    def ca(self) -> Path:
        return self.state_dir / CA_FILE

    @property
    def running_dir(self) -> Path:
        return self.state_dir / "running"

    @property
    def locks_dir(self) -> Path:
        return self.state_dir / "locks"

    @property
    def attestation_dir(self) -> Path:
        return self.state_dir / "attestation"

    def require_certificate(self) -> None:
        if not self.cert.is_file():
            raise HostError(
                f"host {self.name} has no certificate yet; have its management instance POST {self.csr} "
                f"to /v1/hosts and run 'vtpm-host --state-dir {self.state_dir} install-cert --cert host.pem'"
            )


def _check_name(name: str) -> str:
    # The broker's rule for host names (broker.trust.check_host_name).
    return check_name(name, lambda rule: HostError(f"host name {name!r} is not valid; use {rule}"))


def _check_gateway(node: str) -> str:
    host, sep, port = node.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise HostError(f"gateway {node!r} is not HOST:PORT; give the broker's gateway address, e.g. 127.0.0.1:5697")
    return node


def _check_api(url: str) -> str:
    if not isinstance(url, str) or not url.startswith("https://") or len(url) <= len("https://"):
        raise HostError(f"api {url!r} is not an https:// URL; give the broker's management API, e.g. https://host:8443")
    return url.rstrip("/")


def check_tcti(tcti: object) -> str:
    """A TCTI string for tpm2-tools (`KIND` or `KIND:OPTIONS`, KIND one of TCTI_KINDS)."""
    kind = tcti.partition(":")[0] if isinstance(tcti, str) else ""
    if (
        not isinstance(tcti, str)
        or kind not in TCTI_KINDS
        or len(tcti) > 1024
        or any(c.isspace() or not c.isprintable() for c in tcti)
    ):
        raise HostError(
            f"TPM {tcti!r} is not a TCTI of {', '.join(TCTI_KINDS)}; give the host TPM as e.g. "
            "device:/dev/tpmrm0 or swtpm:path=/run/swtpm/host.sock"
        )
    return tcti


def _attestation_tcti(path: Path, table: object) -> str | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise HostError(f'{path}: attestation must be a table ([attestation] with tcti = "...")')
    unknown = sorted(set(table) - _ATTESTATION_KEYS)
    if unknown:
        raise HostError(
            f"{path}: unknown key {unknown[0]!r} in [attestation]; the keys are {', '.join(sorted(_ATTESTATION_KEYS))}"
        )
    if "tcti" not in table:
        raise HostError(f"{path}: [attestation] needs tcti, the host TPM (e.g. device:/dev/tpmrm0)")
    try:
        return check_tcti(table["tcti"])
    except HostError as exc:
        raise HostError(f"{path}: [attestation] {exc}") from None


def load_config(state_dir: str | os.PathLike[str]) -> HostConfig:
    """Read D/config.toml and check every value; HostError names what is wrong."""
    state_dir = Path(state_dir)
    path = state_dir / CONFIG_FILE
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HostError(
            f"{state_dir} is not a vtpm-host state directory (no {CONFIG_FILE}); "
            f"run 'vtpm-host --state-dir {state_dir} init --name H --gateway HOST:PORT --api URL --ca FILE'"
        ) from None
    except OSError as exc:
        raise HostError(f"cannot read {path} ({exc.strerror}); check --state-dir and its permissions") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise HostError(f"{path} is not valid TOML ({exc}); fix it or run init again") from None
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise HostError(f"{path}: unknown key {unknown[0]!r}; the keys are {', '.join(sorted(_KEYS))}")
    gateway = data.get("gateway")
    if isinstance(gateway, str):
        gateway = [gateway]
    if not isinstance(gateway, list) or not gateway or not all(isinstance(g, str) for g in gateway):
        raise HostError(f"{path}: gateway must be a list of HOST:PORT strings")
    timeout = data.get("timeout", DEFAULT_TIMEOUT)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= 600:
        raise HostError(f"{path}: timeout must be a number of seconds from 0 to 600")
    return HostConfig(
        state_dir=state_dir,
        name=_check_name(data.get("name", "")),
        gateway=tuple(_check_gateway(g) for g in gateway),
        api=_check_api(data.get("api", "")),
        timeout=float(timeout),
        attestation_tcti=_attestation_tcti(path, data.get("attestation")),
    )


def toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_private(path: Path, data: bytes) -> None:
    """Atomically (kmip_core.files), mode 0600 from the start."""
    write_atomic(path, data, 0o600)


def write_public(path: Path, data: bytes) -> None:
    write_atomic(path, data, 0o644)


def _load_ca_bundle(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise HostError(f"cannot read the CA file {path} ({exc.strerror}); give the broker's trust-ca.pem") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise HostError(f"{path} holds no PEM certificate; give the broker's trust-ca.pem")
    return certs


def init_state_dir(
    state_dir: str | os.PathLike[str],
    name: str,
    gateway: list[str],
    api: str,
    ca: str | os.PathLike[str],
    tpm: str | None = None,
) -> Path:
    """Make the host key (once) and its CSR, copy the CA, write the config. Returns the CSR's path.

    Running it again for the same host name keeps the key (and so any
    certificate already installed); another name is refused. `tpm`, the host
    TPM's TCTI, turns host attestation on ([attestation] tcti); without it a
    TCTI the config already holds is kept, so that running init again never
    turns attestation off unnoticed.
    """
    state_dir = Path(state_dir)
    name = _check_name(name)
    if not gateway:
        raise HostError("give the broker's gateway with --gateway HOST:PORT")
    gateway = [_check_gateway(g) for g in gateway]
    api = _check_api(api)
    if tpm is not None:
        tpm = check_tcti(tpm)
    ca_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in _load_ca_bundle(Path(ca)))

    if (state_dir / CONFIG_FILE).exists():
        previous = load_config(state_dir)
        if previous.name != name:
            raise HostError(f"{state_dir} already holds host {previous.name}; use another --state-dir for host {name}")
        if tpm is None:
            tpm = previous.attestation_tcti
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    key_path = state_dir / KEY_FILE
    if key_path.exists():
        key = _load_key(key_path)
    else:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
            handle.flush()
            os.fsync(handle.fileno())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"host:{name}")]))
        .sign(key, hashes.SHA256())
    )
    csr_path = state_dir / CSR_FILE
    write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    write_public(state_dir / CA_FILE, ca_pem)
    text = (
        "# vtpm-host settings (written by 'vtpm-host init').\n"
        f"name = {toml_string(name)}\n"
        f"gateway = [{', '.join(toml_string(g) for g in gateway)}]\n"
        f"api = {toml_string(api)}\n"
        f"timeout = {DEFAULT_TIMEOUT:g}\n"
    )
    if tpm is not None:
        text += f"\n# Host attestation: the host TPM (tpm2-tools TCTI).\n[attestation]\ntcti = {toml_string(tpm)}\n"
    write_public(state_dir / CONFIG_FILE, text.encode("utf-8"))
    return csr_path


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise HostError(f"cannot load the host key {path} ({exc}); restore it or use a new --state-dir") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise HostError(f"{path} is not the EC key vtpm-host makes; use a new --state-dir")
    return key


def install_certificate(state_dir: str | os.PathLike[str], cert_file: str | os.PathLike[str]) -> x509.Certificate:
    """Check the certificate the broker issued for this host's CSR and store it as D/host.pem.

    It must be for this host's key and name, issued by the broker's trust
    CA (D/trust-ca.pem), and valid now.
    """
    config = load_config(state_dir)
    try:
        data = Path(cert_file).read_bytes()
    except OSError as exc:
        raise HostError(
            f"cannot read {cert_file} ({exc.strerror}); give the certificate_pem POST /v1/hosts returned"
        ) from None
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        raise HostError(
            f"{cert_file} holds no PEM certificate; give the certificate_pem POST /v1/hosts returned"
        ) from None
    key = _load_key(config.key)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(serialization.Encoding.DER, spki) != key.public_key().public_bytes(
        serialization.Encoding.DER, spki
    ):
        raise HostError(
            f"{cert_file} is not for this host's key ({config.key}); register {config.csr} (POST /v1/hosts) "
            "and install the certificate it returns"
        )
    names = [a.value for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if names != [f"host:{config.name}"]:
        raise HostError(f"{cert_file} is for {names[0] if names else 'no name'!r}, not host:{config.name}")
    for ca in _load_ca_bundle(config.ca):
        try:
            cert.verify_directly_issued_by(ca)
            break
        except (ValueError, TypeError, InvalidSignature):
            continue
    else:
        raise HostError(f"{cert_file} was not issued by the broker's trust CA in {config.ca}; check --ca at init")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise HostError(
            f"{cert_file} is not valid now (valid {cert.not_valid_before_utc} to {cert.not_valid_after_utc})"
        )
    write_public(config.cert, cert.public_bytes(serialization.Encoding.PEM))
    return cert
