"""The vTPM EK CA: issues Endorsement Key certificates to the TCG EK Credential Profile for TPM 2.0.

docs/vtpm-ca.md has the field table. In short: X.509 v3, random serial,
issuer = the CA's subject, an EMPTY subject, so the subjectAltName (a
directoryName with tcg-at-tpmManufacturer, tcg-at-tpmModel and
tcg-at-tpmVersion) is critical; subjectDirectoryAttributes with
tcg-at-tpmSpecification; basicConstraints CA:FALSE, keyUsage keyEncipherment
(RSA EK) or keyAgreement (ECC EK), extendedKeyUsage tcg-kp-EKCertificate,
authorityKeyIdentifier. The DER must fit the TPM's NV index: 2048 bytes at
most, refused otherwise.

The CA is replaceable: ``EkCa.import_ca`` takes a third-party CA's
certificate and key, ``make_csr``/``install_signed`` have the broker's key
signed by a third party, and ``recertify`` re-issues an existing EK
certificate (same public key, same TPM attributes) under the current CA.

``handle_ek_certificate_request`` is the pure handler behind
``POST /v1/vtpm/ek-certificates`` (docs/broker-design.md); ``vtpm-ek-certtool``
calls the same handler in its local mode, so both paths share one profile.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID, ObjectIdentifier

from broker import der as der_codec
from broker.tpm_fields import TPM_FIELDS
from kmip_core import pki
from kmip_core.sealing.barrier import Barrier, BarrierError

__all__ = [
    "EK_CA_PURPOSE",
    "EK_CERT_MAX_DER",
    "EkCa",
    "EkCaError",
    "EkCertificateInfo",
    "EkRequestError",
    "handle_ek_certificate_request",
    "issue_ek_certificate",
    "read_ek_certificate",
    "recertify",
    "verify_ek_certificate",
]

log = logging.getLogger(__name__)

# The EK CA's row in broker_cas (beside trust_ca.TRUST_CA_PURPOSE).
EK_CA_PURPOSE = "ca:ek"

# TCG EK Credential Profile for TPM 2.0: the certificate goes into an NV index
# (0x01c00002 RSA, 0x01c0000a ECC P-256, 0x01c00016 ECC P-384) that
# PC Client platforms size at 2 KiB.
EK_CERT_MAX_DER = 2048

SEAL_PURPOSE = "ca:ek"  # Barrier AAD for the EK CA private key (docs/broker-design.md, "Two CAs").
CA_DAYS = 7305  # 20 years: an EK certificate lives as long as the vTPM, which may be long.
BACKDATE = dt.timedelta(minutes=5)

# OIDs (TCG EK Credential Profile 2.0, section 3.2; TCG Platform Certificate Profile).
OID_TPM_MANUFACTURER = ObjectIdentifier("2.23.133.2.1")
OID_TPM_MODEL = ObjectIdentifier("2.23.133.2.2")
OID_TPM_VERSION = ObjectIdentifier("2.23.133.2.3")
OID_TPM_SPECIFICATION = ObjectIdentifier("2.23.133.2.16")
OID_PLATFORM_MANUFACTURER = ObjectIdentifier("2.23.133.5.1.1")
OID_PLATFORM_MODEL = ObjectIdentifier("2.23.133.5.1.4")
OID_PLATFORM_VERSION = ObjectIdentifier("2.23.133.5.1.5")
OID_EK_CERTIFICATE = ObjectIdentifier("2.23.133.8.1")
OID_PLATFORM_CERTIFICATE = ObjectIdentifier("2.23.133.8.2")
OID_SUBJECT_DIRECTORY_ATTRIBUTES = ObjectIdentifier("2.5.29.9")

CERT_TYPES = {"ek": OID_EK_CERTIFICATE, "platform": OID_PLATFORM_CERTIFICATE}
# The platform attributes of the simplified platform certificate (see issue_ek_certificate).
DEFAULT_PLATFORM = ("vtpm-broker", "vTPM", "1.0")

_RSA_EK_BITS = (2048, 3072)
_ECC_EK_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}
_CA_KEY_TYPES = ("ecc-p384", "rsa-3072")

_MANUFACTURER = re.compile(r"^id:[0-9A-Fa-f]{8}\Z")
_VERSION = re.compile(r"^id:[0-9A-Fa-f]{1,16}\Z")
_PRINTABLE = re.compile(r"^[\x20-\x7e]{1,64}\Z")
_SPEC_FAMILY = re.compile(r"^[0-9]{1,3}\.[0-9]{1,3}\Z")
_INT31 = 2**31 - 1

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class EkCaError(Exception):
    """A CA operation or a certificate request was refused; the message is one line: problem; fix."""


class EkRequestError(Exception):
    """A request to ``POST /v1/vtpm/ek-certificates`` is refused with an HTTP status (400, 403, 404, 422)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# --- The CA ---------------------------------------------------------------------------


class EkCa:
    """The EK CA: its certificate, the chain above it (issuer first, may be empty) and its private key.

    Immutable: the operations that change the CA (``install_signed``) return
    a new object.
    """

    __slots__ = ("cert", "chain", "key")
    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...]

    def __init__(self, cert: x509.Certificate, key: PrivateKey, chain: tuple[x509.Certificate, ...] = ()):
        _check_ca(cert, key, tuple(chain))
        object.__setattr__(self, "cert", cert)
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "chain", tuple(chain))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("EkCa is immutable")

    def __repr__(self) -> str:
        return f"EkCa(subject={self.cert.subject.rfc4514_string()!r}, fingerprint={self.fingerprint[:16]}..)"

    # -- construction

    @classmethod
    def create(cls, subject_cn: str = "vtpm-broker EK CA", key_type: str = "ecc-p384", *, days: int = CA_DAYS) -> EkCa:
        """A new self-signed EK CA (``key_type`` "ecc-p384" or "rsa-3072")."""
        if key_type == "ecc-p384":
            key: PrivateKey = ec.generate_private_key(ec.SECP384R1())
        elif key_type == "rsa-3072":
            key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        else:
            raise EkCaError(f"unknown CA key type {key_type!r}; use one of {', '.join(_CA_KEY_TYPES)}")
        if not isinstance(subject_cn, str) or not _PRINTABLE.match(subject_cn):
            raise EkCaError("the CA's common name must be 1-64 printable ASCII characters")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(pki.CA_KEY_USAGE, critical=True)
            .add_extension(ski, critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(key, _hash_for(key))
        )
        return cls(cert, key)

    @classmethod
    def import_ca(cls, cert_pem: bytes | str, key_pem: bytes | str, chain_pem: bytes | str | None = None) -> EkCa:
        """A third-party CA: its certificate (PEM; further certificates in the file are its chain), its
        unencrypted private key (PEM) and optionally the chain above it (PEM, issuer first).

        Refused unless the key matches the certificate, the certificate is a
        CA with keyCertSign and currently valid, and each chain certificate
        signed the one before it.
        """
        certs = _load_pem_certs(cert_pem, "CA certificate")
        chain = certs[1:] + (_load_pem_certs(chain_pem, "CA chain") if chain_pem else [])
        ca = cls(certs[0], _load_private_key(key_pem), tuple(chain))
        _check_current(ca.cert)
        return ca

    @classmethod
    def from_sealed(cls, barrier: Barrier, blobs: Mapping[str, bytes]) -> EkCa:
        """The CA stored by ``to_sealed``; the key opens only under the same master key."""
        try:
            sealed, cert_pem, chain_pem = blobs["key_sealed"], blobs["cert_pem"], blobs.get("chain_pem", b"")
        except KeyError as exc:
            raise EkCaError(f"the stored EK CA lacks {exc.args[0]!r}; restore the broker database") from None
        try:
            pkcs8 = barrier.unseal(SEAL_PURPOSE, sealed)
        except BarrierError:
            raise EkCaError(
                "the stored EK CA key does not open under this master key; start the broker with its own master key"
            ) from None
        key = serialization.load_der_private_key(pkcs8, password=None)
        if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
            raise EkCaError("the stored EK CA key is neither RSA nor ECC; restore the broker database")
        certs = _load_pem_certs(cert_pem, "stored EK CA certificate")
        chain = _load_pem_certs(chain_pem, "stored EK CA chain") if chain_pem else []
        return cls(certs[0], key, tuple(chain))

    def to_sealed(self, barrier: Barrier) -> dict[str, bytes]:
        """``{"key_sealed", "cert_pem", "chain_pem"}``: the PKCS#8 key sealed under the broker's master key
        (AAD purpose "ca:ek"), the certificates in the clear."""
        pkcs8 = self.key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return {
            "key_sealed": barrier.seal(SEAL_PURPOSE, pkcs8),
            "cert_pem": _pem(self.cert),
            "chain_pem": b"".join(_pem(c) for c in self.chain),
        }

    # -- third-party signature of the broker's own key

    def make_csr(self) -> bytes:
        """A PEM CSR for this CA's key and subject, asking for CA:TRUE (pathlen 0) and keyCertSign.

        For a new key, make one first: ``pending = EkCa.create(...)``, keep
        ``pending.to_sealed(...)`` until the signed certificate comes back,
        then ``pending.install_signed(cert_pem, chain_pem)``.
        """
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(self.cert.subject)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(pki.CA_KEY_USAGE, critical=True)
            .sign(self.key, _hash_for(self.key))
        )
        return csr.public_bytes(serialization.Encoding.PEM)

    def install_signed(self, cert_pem: bytes | str, chain_pem: bytes | str | None = None) -> EkCa:
        """This key with the certificate a third-party CA issued for ``make_csr``'s CSR: a new EkCa.

        Refused unless the certificate's public key is this key (the CSR's),
        it is a valid CA certificate with keyCertSign, and the chain verifies.
        """
        certs = _load_pem_certs(cert_pem, "signed CA certificate")
        if not _same_key(certs[0].public_key(), self.key.public_key()):
            raise EkCaError(
                "the signed certificate is not for this CA's key (it does not match the CSR); "
                "give the certificate issued for the CSR from make_csr"
            )
        chain = certs[1:] + (_load_pem_certs(chain_pem, "CA chain") if chain_pem else [])
        ca = EkCa(certs[0], self.key, tuple(chain))
        _check_current(ca.cert)
        return ca

    # -- views

    @property
    def cert_pem(self) -> bytes:
        return _pem(self.cert)

    @property
    def ca_pem(self) -> bytes:
        """The CA certificate followed by its chain: what relying parties need to verify an EK certificate."""
        return self.cert_pem + b"".join(_pem(c) for c in self.chain)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the CA certificate's DER, lowercase hex."""
        return self.cert.fingerprint(hashes.SHA256()).hex()


# --- Issuing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class EkCertificateInfo:
    """What an EK (or simplified platform) certificate says, read back from its DER."""

    cert_type: str  # "ek" or "platform"
    key_type: str  # "rsa" or "ecc"
    public_key_pem: bytes
    tpm_manufacturer: str
    tpm_model: str
    tpm_version: str
    spec_family: str
    spec_level: int
    spec_revision: int
    platform: tuple[str, str, str] | None  # (manufacturer, model, version) of a platform certificate
    serial_number: int
    issuer: str
    not_valid_after: dt.datetime


def issue_ek_certificate(
    ca: EkCa,
    public_key_pem: bytes | str,
    key_type: str,
    vm_uuid: uuid.UUID | str | None,
    tpm_manufacturer: str,
    tpm_model: str,
    tpm_version: str,
    spec_family: str,
    spec_level: int,
    spec_revision: int,
    not_after: dt.datetime | None = None,
    *,
    cert_type: str = "ek",
    platform: tuple[str, str, str] = DEFAULT_PLATFORM,
) -> bytes:
    """An EK certificate (DER) for the EK public key, by the TCG EK Credential Profile for TPM 2.0.

    ``key_type`` is "rsa" (RSA 2048 or 3072, exponent 65537) or "ecc" (NIST
    P-256 or P-384) and must match the key. ``vm_uuid`` is checked but not
    written into the certificate: the profile leaves the subject empty, and an
    EK certificate should not tell every verifier which VM it belongs to; the
    broker records which VM holds which certificate. ``not_after`` defaults to
    (and is capped at) the CA certificate's own expiry.

    ``cert_type="platform"`` (swtpm_setup --create-platform-cert) issues a
    *simplified* platform certificate: an X.509 certificate for the same EK
    public key with EKU tcg-kp-PlatformCertificate, whose subjectAltName adds
    a second directoryName with the platform's manufacturer, model and version
    (``platform``) -- as swtpm's own swtpm_cert does -- instead of the TCG
    Platform Certificate Profile's attribute certificate.

    Raises EkCaError with a one-line reason for anything outside the profile,
    including a result over EK_CERT_MAX_DER bytes.
    """
    if not isinstance(cert_type, str) or cert_type not in CERT_TYPES:
        raise EkCaError(f"certificate type {cert_type!r} is unknown; use 'ek' or 'platform'")
    if vm_uuid is not None and not isinstance(vm_uuid, uuid.UUID):
        _parse_uuid(vm_uuid)
    public_key = _load_ek_public_key(public_key_pem, key_type)
    _check_tpm_attributes(tpm_manufacturer, tpm_model, tpm_version, spec_family, spec_level, spec_revision)
    if cert_type == "platform":
        for what, value in zip(("manufacturer", "model", "version"), platform, strict=True):
            if not isinstance(value, str) or not _PRINTABLE.match(value):
                raise EkCaError(f"platform {what} must be 1-64 printable ASCII characters")

    now = _now()
    latest = ca.cert.not_valid_after_utc
    if latest <= now:
        raise EkCaError("the EK CA certificate has expired; install a new EK CA (docs/vtpm-ca.md, CA swap)")
    end = latest if not_after is None else min(_aware(not_after), latest)
    if end <= now:
        raise EkCaError("not_after is in the past; give a future expiry")

    names = [x509.DirectoryName(_tpm_name(tpm_manufacturer, tpm_model, tpm_version))]
    if cert_type == "platform":
        names.append(x509.DirectoryName(_platform_name(*platform)))
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    cert = (
        x509.CertificateBuilder()
        .issuer_name(ca.cert.subject)
        .subject_name(x509.Name([]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_ek_key_usage(is_rsa), critical=True)
        # RFC 5280 4.2.1.6: with an empty subject the subjectAltName is critical.
        .add_extension(x509.SubjectAlternativeName(names), critical=True)
        .add_extension(
            x509.UnrecognizedExtension(
                OID_SUBJECT_DIRECTORY_ATTRIBUTES, _tpm_specification_der(spec_family, spec_level, spec_revision)
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([CERT_TYPES[cert_type]]), critical=False)
        .add_extension(_authority_key_identifier(ca), critical=False)
        .sign(ca.key, _hash_for(ca.key))
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    if len(der) > EK_CERT_MAX_DER:
        raise EkCaError(
            f"the {cert_type} certificate would be {len(der)} bytes, more than the {EK_CERT_MAX_DER} an NV index "
            "holds; use an EK CA with a shorter subject or an ECC key"
        )
    return der


def read_ek_certificate(cert_der: bytes) -> EkCertificateInfo:
    """Read the profile's fields back from an EK or platform certificate; EkCaError if they are not there."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except (ValueError, TypeError):
        raise EkCaError("not a DER X.509 certificate; give the EK certificate as read from the TPM") from None
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sda = cert.extensions.get_extension_for_oid(OID_SUBJECT_DIRECTORY_ATTRIBUTES).value
    except x509.ExtensionNotFound as exc:
        raise EkCaError(f"not an EK certificate: it lacks the {exc.oid.dotted_string} extension") from None
    cert_type = next((t for t, oid in CERT_TYPES.items() if oid in eku), None)
    if cert_type is None:
        raise EkCaError("not an EK certificate: its extended key usage is neither tcg-kp-EKCertificate nor platform")
    dirs = san.get_values_for_type(x509.DirectoryName)
    tpm = _name_values(dirs, (OID_TPM_MANUFACTURER, OID_TPM_MODEL, OID_TPM_VERSION))
    if tpm is None:
        raise EkCaError("not an EK certificate: its subjectAltName lacks the TPM manufacturer, model or version")
    platform = _name_values(dirs, (OID_PLATFORM_MANUFACTURER, OID_PLATFORM_MODEL, OID_PLATFORM_VERSION))
    der = sda.value if isinstance(sda, x509.UnrecognizedExtension) else b""
    family, level, revision = _parse_tpm_specification(der)
    public_key = cert.public_key()
    if not isinstance(public_key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise EkCaError("the certificate's key is neither RSA nor ECC")
    return EkCertificateInfo(
        cert_type=cert_type,
        key_type="rsa" if isinstance(public_key, rsa.RSAPublicKey) else "ecc",
        public_key_pem=public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        tpm_manufacturer=tpm[0],
        tpm_model=tpm[1],
        tpm_version=tpm[2],
        spec_family=family,
        spec_level=level,
        spec_revision=revision,
        platform=platform if cert_type == "platform" else None,
        serial_number=cert.serial_number,
        issuer=cert.issuer.rfc4514_string(),
        not_valid_after=cert.not_valid_after_utc,
    )


def recertify(
    ca: EkCa, old_cert_der: bytes, *, issued_by: list[x509.Certificate] | tuple[x509.Certificate, ...] | None = None
) -> bytes:
    """The same EK public key and TPM attributes (and certificate type) under ``ca``: the CA swap.

    ``issued_by``: when given, the old certificate must have been issued by
    one of these certificates (for instance the previous EK CA), so nothing
    but a certificate this broker issued gets re-signed.
    """
    if issued_by is not None:
        old = x509.load_der_x509_certificate(old_cert_der)
        if not any(_directly_issued(old, issuer) for issuer in issued_by):
            raise EkCaError("the old EK certificate was not issued by the expected CA; re-certify only our own")
    info = read_ek_certificate(old_cert_der)
    return issue_ek_certificate(
        ca,
        info.public_key_pem,
        info.key_type,
        None,
        info.tpm_manufacturer,
        info.tpm_model,
        info.tpm_version,
        info.spec_family,
        info.spec_level,
        info.spec_revision,
        cert_type=info.cert_type,
        platform=info.platform or DEFAULT_PLATFORM,
    )


def verify_ek_certificate(
    cert_der: bytes, ca_pem: bytes | str, *, public_key_pem: bytes | str | None = None
) -> EkCertificateInfo:
    """Check that ``cert_der`` is an EK certificate of this profile, issued by the first certificate in
    ``ca_pem`` and chained through the rest, valid now, and (if given) for ``public_key_pem``.

    The last certificate of ``ca_pem`` is the trust anchor: the caller
    decides that it trusts it. Raises EkCaError; returns the fields.
    """
    info = read_ek_certificate(cert_der)
    cert = x509.load_der_x509_certificate(cert_der)
    chain = _load_pem_certs(ca_pem, "CA bundle")
    now = _now()
    for current, issuer in zip([cert, *chain], chain, strict=False):
        if not _directly_issued(current, issuer):
            raise EkCaError(
                f"{current.subject.rfc4514_string() or 'the EK certificate'} was not issued by "
                f"{issuer.subject.rfc4514_string()}"
            )
    for c in [cert, *chain]:
        if not c.not_valid_before_utc <= now <= c.not_valid_after_utc:
            raise EkCaError(f"{c.subject.rfc4514_string() or 'the EK certificate'} is not valid now")
    if public_key_pem is not None:
        expected = serialization.load_pem_public_key(_bytes(public_key_pem))
        if not _same_key(cert.public_key(), expected):
            raise EkCaError("the EK certificate is for another public key than the TPM's EK")
    return info


# --- The API handler ---------------------------------------------------------------------

REQUEST_FIELDS = ("vm_uuid", "type", "key_type", "public_key_pem", *TPM_FIELDS)
_MAX_PUBLIC_KEY_PEM = 4096

Authorize = Callable[[str, uuid.UUID], None]


def handle_ek_certificate_request(
    ca: EkCa, request: object, caller_host: str, *, authorize: Authorize | None = None
) -> dict[str, str]:
    """``POST /v1/vtpm/ek-certificates``: validate, authorize, issue; answer ``{"certificate_der_b64", "ca_pem"}``
    (the API answers it with 201).

    Raises EkRequestError: 400 for a body that is not an object, an unknown
    or missing field, or a malformed value; 422 for a well-formed request
    the profile refuses (an RSA-1024 or P-521 key, a key_type that does not
    match the key, a certificate that would not fit the NV index).
    ``authorize(caller_host, vm_uuid)`` is the broker's policy (the VM must
    be placed on the calling host); it raises EkRequestError(403 or 404) to
    refuse, and runs after validation and before anything is signed.
    """
    if not isinstance(request, dict):
        raise EkRequestError(400, "the body must be a JSON object")
    unknown = sorted(set(request) - set(REQUEST_FIELDS))
    if unknown:
        raise EkRequestError(400, f"unknown field {unknown[0]!r}")
    missing = [f for f in REQUEST_FIELDS if f not in request]
    if missing:
        raise EkRequestError(400, f"missing field {missing[0]!r}")

    def text(field: str, pattern: re.Pattern[str], what: str) -> str:
        value = request[field]
        if not isinstance(value, str) or not pattern.match(value):
            raise EkRequestError(400, f"{field} must be {what}")
        return value

    def integer(field: str) -> int:
        value = request[field]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT31:
            raise EkRequestError(400, f"{field} must be an integer from 0 to {_INT31}")
        return value

    vm_uuid_text = request["vm_uuid"]
    try:
        if not isinstance(vm_uuid_text, str):
            raise ValueError
        vm_uuid = uuid.UUID(vm_uuid_text)
    except ValueError:
        raise EkRequestError(400, "vm_uuid must be a UUID string") from None
    cert_type = request["type"]
    if not isinstance(cert_type, str) or cert_type not in CERT_TYPES:
        raise EkRequestError(400, "type must be 'ek' or 'platform'")
    key_type = request["key_type"]
    if key_type not in ("rsa", "ecc"):
        raise EkRequestError(400, "key_type must be 'rsa' or 'ecc'")
    public_key_pem = request["public_key_pem"]
    if not isinstance(public_key_pem, str) or len(public_key_pem) > _MAX_PUBLIC_KEY_PEM:
        raise EkRequestError(
            400, f"public_key_pem must be a PEM public key of at most {_MAX_PUBLIC_KEY_PEM} characters"
        )
    try:
        serialization.load_pem_public_key(public_key_pem.encode("ascii"))
    except (ValueError, UnicodeEncodeError, TypeError):
        raise EkRequestError(400, "public_key_pem is not a PEM public key (SubjectPublicKeyInfo)") from None
    manufacturer = text("tpm_manufacturer", _MANUFACTURER, "'id:' and 8 hex digits, such as 'id:00001014'")
    model = text("tpm_model", _PRINTABLE, "1-64 printable ASCII characters")
    version = text("tpm_version", _VERSION, "'id:' and 1-16 hex digits, such as 'id:20191023'")
    family = text("tpm_spec_family", _SPEC_FAMILY, "a string such as '2.0'")
    level = integer("tpm_spec_level")
    revision = integer("tpm_spec_revision")

    if authorize is not None:
        authorize(caller_host, vm_uuid)
    try:
        der = issue_ek_certificate(
            ca,
            public_key_pem,
            key_type,
            vm_uuid,
            manufacturer,
            model,
            version,
            family,
            level,
            revision,
            cert_type=cert_type,
        )
    except EkCaError as exc:
        raise EkRequestError(422, str(exc)) from None
    serial = x509.load_der_x509_certificate(der).serial_number
    log.info("issued %s certificate serial %x for VM %s to host %s", cert_type, serial, vm_uuid, caller_host)
    return {"certificate_der_b64": base64.b64encode(der).decode("ascii"), "ca_pem": ca.ca_pem.decode("ascii")}


# --- Internals ----------------------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _bytes(data: bytes | str) -> bytes:
    return data.encode("ascii") if isinstance(data, str) else bytes(data)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _parse_uuid(value: object) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise EkCaError(f"{value!r} is not a VM UUID") from None


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _ek_key_usage(is_rsa: bool) -> x509.KeyUsage:
    # TCG EK Credential Profile: an RSA EK decrypts (keyEncipherment), an ECC EK does ECDH (keyAgreement).
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=is_rsa,
        data_encipherment=False,
        key_agreement=not is_rsa,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _authority_key_identifier(ca: EkCa) -> x509.AuthorityKeyIdentifier:
    # A third-party CA may compute its key identifier another way (RFC 7093); use the one it states.
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())


def _tpm_name(manufacturer: str, model: str, version: str) -> x509.Name:
    # One RDN per attribute, as swtpm_cert writes TPMManufacturerInfo; UTF8String values.
    return x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(OID_TPM_MANUFACTURER, manufacturer)]),
            x509.RelativeDistinguishedName([x509.NameAttribute(OID_TPM_MODEL, model)]),
            x509.RelativeDistinguishedName([x509.NameAttribute(OID_TPM_VERSION, version)]),
        ]
    )


def _platform_name(manufacturer: str, model: str, version: str) -> x509.Name:
    return x509.Name(
        [
            x509.RelativeDistinguishedName([x509.NameAttribute(OID_PLATFORM_MANUFACTURER, manufacturer)]),
            x509.RelativeDistinguishedName([x509.NameAttribute(OID_PLATFORM_MODEL, model)]),
            x509.RelativeDistinguishedName([x509.NameAttribute(OID_PLATFORM_VERSION, version)]),
        ]
    )


def _name_values(
    dirs: list[x509.Name], oids: tuple[ObjectIdentifier, ObjectIdentifier, ObjectIdentifier]
) -> tuple[str, str, str] | None:
    for name in dirs:
        values = [name.get_attributes_for_oid(oid) for oid in oids]
        if all(len(v) == 1 for v in values):
            first, second, third = (str(v[0].value) for v in values)
            return first, second, third
    return None


def _check_tpm_attributes(
    manufacturer: object, model: object, version: object, family: object, level: object, revision: object
) -> None:
    checks = (
        ("tpm_manufacturer", manufacturer, _MANUFACTURER, "'id:' and 8 hex digits"),
        ("tpm_model", model, _PRINTABLE, "1-64 printable ASCII characters"),
        ("tpm_version", version, _VERSION, "'id:' and 1-16 hex digits"),
        ("tpm_spec_family", family, _SPEC_FAMILY, "a string such as '2.0'"),
    )
    for field, value, pattern, what in checks:
        if not isinstance(value, str) or not pattern.match(value):
            raise EkCaError(f"{field} must be {what}, not {value!r}")
    for field, value in (("tpm_spec_level", level), ("tpm_spec_revision", revision)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT31:
            raise EkCaError(f"{field} must be an integer from 0 to {_INT31}, not {value!r}")


def _load_ek_public_key(public_key_pem: bytes | str, key_type: str) -> PublicKey:
    try:
        key = serialization.load_pem_public_key(_bytes(public_key_pem))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise EkCaError("the EK public key is not a PEM SubjectPublicKeyInfo") from None
    if key_type == "rsa":
        if not isinstance(key, rsa.RSAPublicKey):
            raise EkCaError("key_type is 'rsa' but the EK public key is not an RSA key")
        if key.key_size not in _RSA_EK_BITS or key.public_numbers().e != 65537:
            raise EkCaError(
                f"an RSA EK must be 2048 or 3072 bits with exponent 65537, not {key.key_size} bits, "
                f"e={key.public_numbers().e}"
            )
        return key
    if key_type == "ecc":
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise EkCaError("key_type is 'ecc' but the EK public key is not an ECC key")
        if key.curve.name not in _ECC_EK_CURVES:
            raise EkCaError(f"an ECC EK must be on NIST P-256 or P-384, not {key.curve.name}")
        return key
    raise EkCaError(f"key_type must be 'rsa' or 'ecc', not {key_type!r}")


def _same_key(a: PublicKeyTypes, b: PublicKeyTypes) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        return a.public_bytes(*fmt) == b.public_bytes(*fmt)
    except (AttributeError, ValueError):
        return False


def _directly_issued(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_current(cert: x509.Certificate) -> None:
    now = _now()
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        raise EkCaError(
            f"the CA certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d}); give a current certificate"
        )


def _load_pem_certs(data: bytes | str, what: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_bytes(data))
    except (ValueError, TypeError, UnicodeEncodeError):
        raise EkCaError(f"the {what} is not PEM X.509; give certificates in PEM") from None
    if not certs:
        raise EkCaError(f"the {what} holds no certificate")
    return certs


def _load_private_key(key_pem: bytes | str) -> PrivateKey:
    try:
        key = serialization.load_pem_private_key(_bytes(key_pem), password=None)
    except TypeError:
        raise EkCaError("the CA private key is encrypted; give it unencrypted (it is sealed at rest here)") from None
    except (ValueError, UnicodeEncodeError):
        raise EkCaError("the CA private key is not a PEM private key") from None
    if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey)):
        raise EkCaError("the CA private key must be RSA or ECC")
    return key


def _check_ca(cert: x509.Certificate, key: PrivateKey, chain: tuple[x509.Certificate, ...]) -> None:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise EkCaError(f"the CA key is RSA-{key.key_size}; use at least 2048 bits")
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in ("secp256r1", "secp384r1", "secp521r1"):
            raise EkCaError(f"the CA key is on {key.curve.name}; use P-256, P-384 or P-521")
    else:
        raise EkCaError("the CA key must be RSA or ECC")
    if not _same_key(cert.public_key(), key.public_key()):
        raise EkCaError("the private key does not match the CA certificate; give the key of that certificate")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise EkCaError("the certificate is not a CA certificate (basicConstraints CA:TRUE); give a CA certificate")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is None or not usage.key_cert_sign:
        raise EkCaError("the CA certificate does not allow certificate signing (keyUsage keyCertSign)")
    for current, issuer in zip((cert, *chain), chain, strict=False):
        if not _directly_issued(current, issuer):
            raise EkCaError(
                f"the chain is broken: {current.subject.rfc4514_string()} was not issued by "
                f"{issuer.subject.rfc4514_string()}; give the chain issuer first"
            )


# --- subjectDirectoryAttributes (written and read with broker/der.py) --------------------
# SEQUENCE OF Attribute { type OID, values SET OF TPMSpecification }, where
# TPMSpecification ::= SEQUENCE { family UTF8String, level INTEGER, revision INTEGER }.


def _tpm_specification_der(family: str, level: int, revision: int) -> bytes:
    spec = der_codec.encode(
        der_codec.SEQUENCE,
        der_codec.encode(der_codec.UTF8_STRING, family.encode("utf-8"))
        + der_codec.encode_integer(level)
        + der_codec.encode_integer(revision),
    )
    attribute = der_codec.encode(
        der_codec.SEQUENCE,
        der_codec.encode_oid(OID_TPM_SPECIFICATION.dotted_string) + der_codec.encode(der_codec.SET, spec),
    )
    return der_codec.encode(der_codec.SEQUENCE, attribute)


def _parse_tpm_specification(value: bytes) -> tuple[str, int, int]:
    try:
        return _read_tpm_specification(value)
    except der_codec.DerError as exc:
        raise EkCaError(f"{exc} in subjectDirectoryAttributes") from None


def _read_tpm_specification(value: bytes) -> tuple[str, int, int]:
    try:
        attributes = der_codec.expect(value, der_codec.SEQUENCE)
    except der_codec.DerTagError:
        raise EkCaError("subjectDirectoryAttributes is not a SEQUENCE") from None
    wanted = der_codec.encode_oid(OID_TPM_SPECIFICATION.dotted_string)
    for tag, attribute in der_codec.read_items(attributes):
        parts = der_codec.read_items(attribute)
        if tag != der_codec.SEQUENCE or len(parts) != 2 or der_codec.encode(*parts[0]) != wanted:
            continue
        values_tag, values = parts[1]
        specs = der_codec.read_items(values) if values_tag == der_codec.SET else []
        if len(specs) != 1 or specs[0][0] != der_codec.SEQUENCE:
            break
        fields = der_codec.read_items(specs[0][1])
        if [t for t, _ in fields] != [der_codec.UTF8_STRING, der_codec.INTEGER, der_codec.INTEGER]:
            break
        return (
            fields[0][1].decode("utf-8"),
            int.from_bytes(fields[1][1], "big", signed=True),
            int.from_bytes(fields[2][1], "big", signed=True),
        )
    raise EkCaError("not an EK certificate: no tcg-at-tpmSpecification in subjectDirectoryAttributes")
