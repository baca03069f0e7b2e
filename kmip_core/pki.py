"""A small development PKI and client-certificate pinning for kms_server.

Everything here is for operators at a terminal: each failure raises
:class:`PkiError` with one line saying what is wrong and how to fix it.
Private keys are written with mode 0600 from the moment they exist (no
window where another user could read them), and every file is written
atomically so an interrupted run never leaves half a key behind.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import secrets
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmip_core.files import write_atomic
from kmip_core.names import check_name

__all__ = [
    "Ca",
    "InitResult",
    "PkiError",
    "PkiWarning",
    "TrustedCert",
    "fingerprint_sha256",
    "init_pki",
    "issue",
    "issue_client",
    "list_trusted",
    "new_master_key",
    "server_sans",
    "sign_csr",
    "trust_client_cert",
    "untrust",
]

CA_DAYS = 3650
LEAF_DAYS = 730
RSA_BITS = 2048
# Certificates start a little in the past so a peer with a slow clock
# does not reject a certificate that was just issued.
BACKDATE = dt.timedelta(minutes=5)
CA_COMMON_NAME = "kms_server development CA"

_DNS_NAME = re.compile(
    r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
# Client names become file names beside these (ca.pem, server.pem).
_RESERVED_NAMES = frozenset({"ca", "server"})


class PkiError(Exception):
    """A PKI operation failed; the message is one line: problem; fix."""


class PkiWarning(UserWarning):
    """Something was done but deserves the operator's attention."""


@dataclass(frozen=True)
class InitResult:
    """What init_pki did: files it wrote and files it left as they were."""

    written: tuple[Path, ...]
    kept: tuple[Path, ...]


@dataclass(frozen=True)
class TrustedCert:
    """One pinned client certificate in the trusted-clients directory."""

    fingerprint_sha256: str
    subject: str
    issuer: str
    not_valid_after: dt.datetime
    path: Path


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


# --- Small helpers --------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def fingerprint_sha256(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER certificate, no separators."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _new_key(key_type: str) -> PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise PkiError(f"unknown key type {key_type!r}; use 'rsa' or 'ec'")


def _key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write data to path atomically with ``mode`` from the start (kmip_core.files):
    a private key is never readable by others, even for an instant."""
    try:
        write_atomic(path, data, mode)
    except OSError as exc:
        if exc.filename == str(path.parent):
            raise PkiError(
                f"cannot write in {path.parent} ({exc.strerror}); check that it exists and is writable"
            ) from None
        raise PkiError(
            f"cannot write {path} ({exc.strerror}); check the directory's permissions"
        ) from None


def _make_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise PkiError(
            f"cannot create directory {path} ({exc.strerror}); choose a writable location"
        ) from None
    if not path.is_dir():
        raise PkiError(f"{path} is not a directory; choose a directory path")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PkiError(f"{what} {path} does not exist; check the path") from None
    except OSError as exc:
        raise PkiError(
            f"cannot read {what} {path} ({exc.strerror}); check the path and permissions"
        ) from None


def _load_cert_file(path: Path, what: str = "certificate") -> x509.Certificate:
    data = _read(path, what)
    if b"-----BEGIN" in data:
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise PkiError(
                f"{path} is not a valid PEM certificate; give an X.509 certificate in PEM or DER"
            ) from None
        if len(certs) != 1:
            raise PkiError(
                f"{path} holds {len(certs)} certificates; give a file with exactly one"
            )
        return certs[0]
    try:
        return x509.load_der_x509_certificate(data)
    except ValueError:
        raise PkiError(
            f"{path} is neither a PEM nor a DER X.509 certificate; export the certificate itself"
        ) from None


def _load_key_file(path: Path) -> PrivateKey:
    data = _read(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise PkiError(
            f"{path} is an encrypted private key; give an unencrypted key (development PKI only)"
        ) from None
    except ValueError:
        raise PkiError(f"{path} is not a PEM private key; check the file") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise PkiError(f"{path} holds an unsupported key type; use an RSA or EC key")
    return key


def _same_public_key(key: PrivateKey, cert: x509.Certificate) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*fmt) == cert.public_key().public_bytes(*fmt)


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    if not _DNS_NAME.match(name) or len(name) > 253:
        raise PkiError(
            f"server name {name!r} is neither an IP address nor a DNS name; "
            "use ASCII host names (punycode for international names) or IP addresses"
        )
    return x509.DNSName(name.rstrip(".").lower())


def _check_client_name(name: str) -> None:
    check_name(
        name,
        lambda rule: PkiError(
            f"client name {name!r} cannot be used as a file name here; use {rule} (not 'ca' or 'server')"
        ),
        reserved=_RESERVED_NAMES,
    )


# --- The CA ----------------------------------------------------------------------


@dataclass(frozen=True)
class Ca:
    """A certificate authority: its certificate and private key."""

    cert: x509.Certificate
    key: PrivateKey


def _create_ca(key_type: str) -> Ca:
    key = _new_key(key_type)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kms_server"),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    return Ca(self_signed_ca(key, name, CA_DAYS), key)


CA_KEY_USAGE = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


def self_signed_ca(key: PrivateKey, name: x509.Name, days: int) -> x509.Certificate:
    """A root CA certificate that signs leaf certificates only (path length
    0), backdated by BACKDATE; used by the KMS PKI and the broker's trust CA."""
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(CA_KEY_USAGE, critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def _load_ca(directory: Path) -> Ca:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if not cert_path.exists() or not key_path.exists():
        missing = cert_path if not cert_path.exists() else key_path
        raise PkiError(
            f"CA file {missing} is missing; run 'kms-admin pki init --dir {directory}' first "
            "(or restore the file)"
        )
    cert = _load_cert_file(cert_path, "CA certificate")
    key = _load_key_file(key_path)
    if not _same_public_key(key, cert):
        raise PkiError(
            f"{key_path} does not match {cert_path}; restore the matching pair "
            "or start over in an empty directory"
        )
    try:
        constraints = cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise PkiError(
            f"{cert_path} is not a CA certificate; use the ca.pem made by pki init"
        )
    if cert.not_valid_after_utc <= _now():
        raise PkiError(
            f"CA certificate {cert_path} has expired; create a new PKI directory"
        )
    return Ca(cert, key)


def _get_or_create_ca(
    directory: Path, key_type: str, written: list[Path]
) -> tuple[Ca, bool]:
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() != key_path.exists():
        present, missing = (
            (cert_path, key_path) if cert_path.exists() else (key_path, cert_path)
        )
        raise PkiError(
            f"{present} exists but {missing} does not; restore {missing.name} "
            "or start over in an empty directory"
        )
    if cert_path.exists():
        return _load_ca(directory), False
    ca = _create_ca(key_type)
    # Key first: a ca.pem without its key would be useless and block a rerun.
    _write_atomic(key_path, _key_pem(ca.key), 0o600)
    _write_atomic(cert_path, _cert_pem(ca.cert), 0o644)
    written.extend([cert_path, key_path])
    return ca, True


# --- Leaves ----------------------------------------------------------------------


def _leaf_key_usage(public_key: object) -> x509.KeyUsage:
    # RSA key transport suites (TLS_RSA_WITH_AES_128_CBC_SHA256, which
    # vCenter 7 negotiates) need keyEncipherment on the server's RSA key.
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def issue(
    ca: Ca,
    subject: x509.Name,
    public_key: CertificatePublicKeyTypes,
    usage: x509.ObjectIdentifier,
    sans: Sequence[x509.GeneralName],
    days: int,
) -> x509.Certificate:
    """A leaf certificate for `public_key` signed by `ca`, for one extended
    key usage, capped at the CA's own expiry."""
    now = _now()
    # A leaf that outlives its CA would fail verification anyway; cap it.
    not_after = min(now + dt.timedelta(days=days), ca.cert.not_valid_after_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_leaf_key_usage(public_key), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(list(sans)), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256())


def server_sans(server_names: Iterable[str]) -> list[x509.GeneralName]:
    """Subject alternative names of a server certificate: the given names
    plus localhost and 127.0.0.1."""
    sans: list[x509.GeneralName] = []
    for name in [*server_names, "localhost", "127.0.0.1"]:
        general = _general_name(name)
        if general not in sans:
            sans.append(general)
    return sans


def _leaf_state(cert_path: Path, key_path: Path, force: bool) -> str:
    """'new', 'keep' or 'replace'; refuses half-present pairs."""
    have_cert, have_key = cert_path.exists(), key_path.exists()
    if not have_cert and not have_key:
        return "new"
    if force:
        return "replace"
    if have_cert != have_key:
        present, missing = (cert_path, key_path) if have_cert else (key_path, cert_path)
        raise PkiError(
            f"{present} exists but {missing} does not; remove {present.name} "
            "or pass --force to issue a new pair"
        )
    return "keep"


def _check_kept_leaf(
    ca: Ca, cert_path: Path, wanted_sans: Sequence[x509.GeneralName]
) -> None:
    cert = _load_cert_file(cert_path)
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        raise PkiError(
            f"{cert_path} was not issued by the CA in {cert_path.parent}; "
            "pass --force to re-issue it"
        ) from None
    if wanted_sans:
        try:
            have = cert.extensions.get_extension_for_class(
                x509.SubjectAlternativeName
            ).value
        except x509.ExtensionNotFound:
            have = x509.SubjectAlternativeName([])
        missing = [str(g.value) for g in wanted_sans if g not in have]
        if missing:
            raise PkiError(
                f"{cert_path} lacks the name(s) {', '.join(missing)}; "
                "pass --force to re-issue it with the new names"
            )


def _write_leaf(cert_path: Path, key_path: Path, cert: x509.Certificate, key: PrivateKey) -> None:
    _write_atomic(key_path, _key_pem(key), 0o600)
    _write_atomic(cert_path, _cert_pem(cert), 0o644)


def init_pki(
    directory: str | os.PathLike[str],
    server_names: Sequence[str] = (),
    clients: Sequence[str] = (),
    key_type: str = "rsa",
    force: bool = False,
) -> InitResult:
    """Create (or complete) a development PKI in ``directory``.

    Writes ca.pem/ca.key, server.pem/server.key and <client>.pem/.key.
    An existing CA is reused, never replaced, so running this again only
    adds what is missing. Existing leaves are kept unless ``force``; a kept
    server certificate must already carry every requested name.
    RSA is the default because vCenter 7 negotiates
    TLS_RSA_WITH_AES_128_CBC_SHA256, which needs an RSA server key.
    """
    if key_type not in ("rsa", "ec"):
        raise PkiError(f"unknown key type {key_type!r}; use 'rsa' or 'ec'")
    directory = Path(directory)
    for client in clients:
        _check_client_name(client)
    sans = server_sans(server_names)
    common_name = server_names[0] if server_names else "localhost"

    _make_dir(directory)
    written: list[Path] = []
    kept: list[Path] = []
    ca, ca_is_new = _get_or_create_ca(directory, key_type, written)
    if not ca_is_new:
        kept.extend([directory / "ca.pem", directory / "ca.key"])

    leaves: list[tuple[str, str, x509.ObjectIdentifier, list[x509.GeneralName]]] = [
        ("server", common_name, ExtendedKeyUsageOID.SERVER_AUTH, sans)
    ]
    leaves += [
        (c, c, ExtendedKeyUsageOID.CLIENT_AUTH, []) for c in dict.fromkeys(clients)
    ]
    for stem, cn, usage, leaf_sans in leaves:
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        state = _leaf_state(cert_path, key_path, force)
        if state == "keep":
            _check_kept_leaf(ca, cert_path, leaf_sans)
            kept.extend([cert_path, key_path])
            continue
        key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        cert = issue(ca, subject, key.public_key(), usage, leaf_sans, LEAF_DAYS)
        _write_leaf(cert_path, key_path, cert, key)
        written.extend([cert_path, key_path])
    return InitResult(tuple(written), tuple(kept))


def issue_client(
    directory: str | os.PathLike[str],
    name: str,
    key_type: str = "rsa",
    force: bool = False,
) -> tuple[Path, Path]:
    """Issue DIR/<name>.pem and DIR/<name>.key (clientAuth, CN=name) from DIR's CA."""
    _check_client_name(name)
    directory = Path(directory)
    ca = _load_ca(directory)
    cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if (cert_path.exists() or key_path.exists()) and not force:
        raise PkiError(
            f"client {name!r} already has {cert_path.name}; choose another name or pass --force"
        )
    key = _new_key(key_type)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = issue(
        ca, subject, key.public_key(), ExtendedKeyUsageOID.CLIENT_AUTH, [], LEAF_DAYS
    )
    _write_leaf(cert_path, key_path, cert, key)
    return cert_path, key_path


def _load_csr(path: Path) -> x509.CertificateSigningRequest:
    data = _read(path, "CSR")
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise PkiError(
            f"{path} is not a certificate signing request (PEM or DER); check the file"
        ) from None


def _check_csr_key(path: Path, public_key: CertificatePublicKeyTypes) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise PkiError(
                f"{path} has a {public_key.key_size}-bit RSA key; make a new CSR with "
                "at least 2048 bits"
            )
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise PkiError(
                f"{path} uses curve {public_key.curve.name}; use P-256, P-384 or P-521"
            )
    elif not isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise PkiError(f"{path} has an unsupported key type; use an RSA or EC key")


def sign_csr(
    ca_dir: str | os.PathLike[str],
    csr_path: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    days: int = LEAF_DAYS,
    force: bool = False,
) -> x509.Certificate:
    """Issue a client certificate for a CSR: subject and SANs copied, clientAuth only.

    Other extensions the CSR asks for (CA:TRUE, serverAuth, ...) are
    ignored on purpose: the CA decides what a client certificate may do.
    """
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= CA_DAYS:
        raise PkiError(
            f"days must be between 1 and {CA_DAYS} (got {days!r}); pick a validity"
        )
    csr_path, out_path = Path(csr_path), Path(out_path)
    ca = _load_ca(Path(ca_dir))
    csr = _load_csr(csr_path)
    if not csr.is_signature_valid:
        raise PkiError(
            f"{csr_path} has an invalid signature (corrupt or tampered); ask for a new CSR"
        )
    if len(csr.subject) == 0:
        raise PkiError(f"{csr_path} has an empty subject; make a CSR with a CN")
    public_key = csr.public_key()
    _check_csr_key(csr_path, public_key)
    try:
        sans = list(
            csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        )
    except x509.ExtensionNotFound:
        sans = []
    if out_path.exists() and not force:
        raise PkiError(f"{out_path} already exists; choose another --out or remove it")
    cert = issue(
        ca, csr.subject, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, sans, days
    )
    _write_atomic(out_path, _cert_pem(cert), 0o644)
    return cert


# --- Pinned client certificates ------------------------------------------------------


def _normalize_fingerprint(fingerprint: str) -> str:
    value = fingerprint.strip().lower()
    value = value.removeprefix("sha256:")
    value = value.replace(":", "")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise PkiError(
            f"{fingerprint!r} is not a SHA-256 fingerprint; give the 64 hex digits "
            "shown by 'kms-admin clients list'"
        )
    return value


def trust_client_cert(
    cert_path: str | os.PathLike[str], trusted_dir: str | os.PathLike[str]
) -> str:
    """Pin one client certificate; returns its SHA-256 fingerprint (hex).

    The certificate is copied as PEM to ``trusted_dir/<fingerprint>.pem``.
    A certificate without an extended key usage is accepted with a
    :class:`PkiWarning`; one whose EKU lacks clientAuth, or that is not
    currently valid, is refused.
    """
    cert_path, trusted_dir = Path(cert_path), Path(trusted_dir)
    cert = _load_cert_file(cert_path)
    now = _now()
    if cert.not_valid_after_utc <= now:
        raise PkiError(
            f"{cert_path} expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
            "ask the client for a current certificate"
        )
    if cert.not_valid_before_utc > now:
        raise PkiError(
            f"{cert_path} is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; "
            "check this host's clock or wait"
        )
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None:
        warnings.warn(
            f"{cert_path} has no extended key usage; it is trusted for client "
            "authentication, but a certificate with clientAuth is better",
            PkiWarning,
            stacklevel=2,
        )
    elif ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
        raise PkiError(
            f"{cert_path} is not for client authentication (its extended key usage lacks "
            "clientAuth); issue it with clientAuth"
        )
    fingerprint = fingerprint_sha256(cert)
    _make_dir(trusted_dir)
    target = trusted_dir / f"{fingerprint}.pem"
    if not target.exists():
        _write_atomic(target, _cert_pem(cert), 0o644)
    return fingerprint


def list_trusted(trusted_dir: str | os.PathLike[str]) -> list[TrustedCert]:
    """The pinned certificates, sorted by subject; an absent directory is empty."""
    trusted_dir = Path(trusted_dir)
    if not trusted_dir.exists():
        return []
    if not trusted_dir.is_dir():
        raise PkiError(f"{trusted_dir} is not a directory; fix tls.trusted_clients_dir")
    result = []
    for path in sorted(trusted_dir.glob("*.pem")):
        cert = _load_cert_file(path)
        result.append(
            TrustedCert(
                fingerprint_sha256=fingerprint_sha256(cert),
                subject=cert.subject.rfc4514_string(),
                issuer=cert.issuer.rfc4514_string(),
                not_valid_after=cert.not_valid_after_utc,
                path=path,
            )
        )
    result.sort(key=lambda t: (t.subject, t.fingerprint_sha256))
    return result


def untrust(fingerprint: str, trusted_dir: str | os.PathLike[str]) -> Path:
    """Remove a pinned certificate by fingerprint; returns the removed path."""
    value = _normalize_fingerprint(fingerprint)
    trusted_dir = Path(trusted_dir)
    path = trusted_dir / f"{value}.pem"
    if not path.exists():
        # Also find a pin whose file was renamed by hand.
        matches = [
            t.path for t in list_trusted(trusted_dir) if t.fingerprint_sha256 == value
        ]
        if not matches:
            raise PkiError(
                f"no trusted client certificate with fingerprint {value} in {trusted_dir}; "
                "run 'kms-admin clients list' to see them"
            )
        path = matches[0]
    try:
        path.unlink()
    except OSError as exc:
        raise PkiError(
            f"cannot remove {path} ({exc.strerror}); check permissions"
        ) from None
    return path


# --- Master key ----------------------------------------------------------------------


def new_master_key(out_path: str | os.PathLike[str]) -> Path:
    """Write 32 random bytes as 64 hex digits and a newline, mode 0600.

    O_CREAT|O_EXCL makes creation atomic and refuses to replace an existing
    key: overwriting a master key would make every stored key unreadable.
    """
    out_path = Path(out_path)
    material = secrets.token_bytes(32).hex().encode("ascii") + b"\n"
    try:
        fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(
            f"{out_path} already exists; a master key is never overwritten, choose another path"
        ) from None
    except FileNotFoundError:
        raise PkiError(
            f"directory {out_path.parent} does not exist; create it first (mode 0700)"
        ) from None
    except OSError as exc:
        raise PkiError(
            f"cannot create {out_path} ({exc.strerror}); check permissions"
        ) from None
    try:
        # umask may have narrowed the mode further; make it exactly 0600.
        os.fchmod(fd, 0o600)
        view = memoryview(material)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        out_path.unlink(missing_ok=True)
        raise PkiError(
            f"cannot write {out_path} ({exc.strerror}); check the disk"
        ) from None
    os.close(fd)
    return out_path
