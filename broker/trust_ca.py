"""The broker's trust CA: issues management-instance, host, user and the
broker's own server certificates, and keeps its private key sealed in the
broker database under the master key (AAD = purpose, "ca:trust").

The CA decides what a certificate may do: from a CSR only the public key is
taken; subject, validity and extensions are the broker's. Leaves are built
by ``kmip_core.pki`` (the same profile the KMS's own PKI issues).
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.db import Database
from kmip_core import pki
from kmip_core.sealing.barrier import Barrier, BarrierError

__all__ = [
    "TRUST_CA_PURPOSE",
    "CaMissing",
    "CertificateRequestError",
    "TrustCa",
    "cert_pem",
    "create_trust_ca",
    "fingerprint",
    "load_active_ca",
    "load_certificate_pem",
    "load_csr_pem",
    "store_ca",
]

TRUST_CA_PURPOSE = "ca:trust"
CA_DAYS = 3650
LEAF_DAYS = 730
MAX_PEM_CHARS = 16384


class CertificateRequestError(ValueError):
    """A CSR or certificate given by a caller cannot be used; one line."""


class CaMissing(Exception):
    """No CA of that purpose in the database (run `vtpm-broker init`)."""


def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER certificate (as kmip_core.tls)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _check_public_key(public_key, what: str) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        if public_key.key_size < 2048:
            raise CertificateRequestError(f"{what} has a {public_key.key_size}-bit RSA key; use at least 2048 bits")
    elif isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise CertificateRequestError(f"{what} uses curve {public_key.curve.name}; use P-256, P-384 or P-521")
    elif not isinstance(public_key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)):
        raise CertificateRequestError(f"{what} has an unsupported key type; use an RSA or EC key")


def load_csr_pem(text: str, what: str = "csr_pem") -> x509.CertificateSigningRequest:
    """A PEM CSR with a valid signature and an acceptable key, or
    CertificateRequestError."""
    if not isinstance(text, str) or "-----BEGIN CERTIFICATE REQUEST-----" not in text:
        raise CertificateRequestError(f"{what} is not a PEM certificate signing request")
    if len(text) > MAX_PEM_CHARS:
        raise CertificateRequestError(f"{what} is longer than {MAX_PEM_CHARS} characters")
    try:
        csr = x509.load_pem_x509_csr(text.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        raise CertificateRequestError(f"{what} is not a valid PEM certificate signing request") from None
    if not csr.is_signature_valid:
        raise CertificateRequestError(f"{what} has an invalid signature; make a new CSR")
    _check_public_key(csr.public_key(), what)
    return csr


def load_certificate_pem(text: str | bytes, what: str = "certificate") -> x509.Certificate:
    """Exactly one PEM certificate, or CertificateRequestError."""
    data = text.encode("ascii", "replace") if isinstance(text, str) else text
    if len(data) > MAX_PEM_CHARS:
        raise CertificateRequestError(f"{what} is longer than {MAX_PEM_CHARS} characters")
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateRequestError(f"{what} is not a valid PEM certificate") from None
    if len(certs) != 1:
        raise CertificateRequestError(f"{what} holds {len(certs)} certificates; give exactly one")
    return certs[0]


@dataclass(frozen=True)
class TrustCa:
    cert: x509.Certificate
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:  # Never the key.
        return f"TrustCa({self.cert.subject.rfc4514_string()!r})"

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    def _pki_ca(self):
        return pki.Ca(self.cert, self.key)

    def issue_client(self, common_name: str, public_key, days: int = LEAF_DAYS) -> x509.Certificate:
        """A clientAuth certificate, CN = common_name."""
        _check_public_key(public_key, "the public key")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        return pki.issue(self._pki_ca(), subject, public_key, ExtendedKeyUsageOID.CLIENT_AUTH, [], days)

    def issue_server(self, names: list[str], public_key, days: int = LEAF_DAYS) -> x509.Certificate:
        """A serverAuth certificate for names + localhost + 127.0.0.1."""
        sans = pki.server_sans(names)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0] if names else "localhost")])
        return pki.issue(self._pki_ca(), subject, public_key, ExtendedKeyUsageOID.SERVER_AUTH, sans, days)


def create_trust_ca(provider_name: str) -> TrustCa:
    key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vtpm-broker"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"vtpm-broker trust CA ({provider_name})"[:64]),
        ]
    )
    return TrustCa(pki.self_signed_ca(key, name, CA_DAYS), key)


def _key_der(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def store_ca(db: Database, barrier: Barrier, purpose: str, cert: x509.Certificate, key) -> None:
    """Make (cert, key) the active CA of `purpose`; earlier ones are retired.
    The key is sealed (AAD = purpose) before it reaches the database."""
    db.put_ca(purpose, cert_pem(cert), barrier.seal(purpose, _key_der(key)))


def load_active_ca(db: Database, barrier: Barrier, purpose: str) -> tuple[x509.Certificate, object]:
    """(certificate, private key) of the active CA of `purpose`."""
    row = db.get_ca(purpose)
    if row is None:
        raise CaMissing(f"no {purpose} CA in the broker database; run 'vtpm-broker init' first")
    try:
        der = barrier.unseal(purpose, row.sealed_key)
    except BarrierError:
        raise BarrierError(
            f"the {purpose} CA key does not open under this master key (wrong master key file?)"
        ) from None
    key = serialization.load_der_private_key(der, password=None)
    return x509.load_pem_x509_certificate(row.cert_pem.encode("ascii")), key


def load_trust_ca(db: Database, barrier: Barrier) -> TrustCa:
    cert, key = load_active_ca(db, barrier, TRUST_CA_PURPOSE)
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise BarrierError(f"the trust CA key in the database is a {type(key).__name__}, not an RSA or EC key")
    return TrustCa(cert, key)
