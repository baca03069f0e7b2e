"""X.509 certificates: the attributes KMIP derives from one."""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from kms_server.keystore.crypto.base import (
    _LIBRARY_ERRORS,
    CryptoError,
    _bytes,
    _describe,
    _is_pem,
    _public_spki,
)

# The Name attribute types KMIP 2.0 gives attributes of their own
# (4.x Certificate Subject CN ... DN Qualifier, and the same for the issuer):
# suffix of the attribute name -> X.509 attribute type.
CERTIFICATE_NAME_FIELDS = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "Email": NameOID.EMAIL_ADDRESS,
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "UID": NameOID.USER_ID,
    "Serial Number": NameOID.SERIAL_NUMBER,
    "Title": NameOID.TITLE,
    "DC": NameOID.DOMAIN_COMPONENT,
    "DN Qualifier": NameOID.DN_QUALIFIER,
}


def _name_fields(name: x509.Name) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for suffix, oid in CERTIFICATE_NAME_FIELDS.items():
        values = [a.value for a in name.get_attributes_for_oid(oid) if isinstance(a.value, str)]
        if values:
            fields[suffix] = values
    return fields


def parse_certificate(der: bytes) -> dict[str, Any]:
    """Read the attributes KMIP derives from an X.509 certificate.

    Returns subject and issuer (RFC 4514 strings), subject_der and
    issuer_der (the DER Names), subject_fields and issuer_fields (each
    attribute type of CERTIFICATE_NAME_FIELDS present in the Name -> its
    values, in order), serial_number (int) and serial_der (the
    content octets of its DER INTEGER), not_before and not_after (aware UTC datetimes), public_key_spki_der,
    algorithm, length_bits and digest_sha256 (of the DER encoding). PEM
    input is tolerated.
    """
    data = _bytes(der, "certificate")
    try:
        if _is_pem(data):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
        public_key = cert.public_key()
        result = {
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "subject_der": cert.subject.public_bytes(),
            "issuer_der": cert.issuer.public_bytes(),
            "serial_number": cert.serial_number,
            "serial_der": cert.serial_number.to_bytes(
                (cert.serial_number.bit_length() + 8) // 8, "big", signed=True
            ),
            "not_before": cert.not_valid_before_utc,
            "not_after": cert.not_valid_after_utc,
            "digest_sha256": cert.fingerprint(hashes.SHA256()),
            "subject_fields": _name_fields(cert.subject),
            "issuer_fields": _name_fields(cert.issuer),
        }
    except _LIBRARY_ERRORS:
        raise CryptoError("certificate is malformed or not supported") from None
    algorithm, length = _describe(public_key)
    result["public_key_spki_der"] = _public_spki(public_key)
    result["algorithm"] = algorithm
    result["length_bits"] = length
    return result
