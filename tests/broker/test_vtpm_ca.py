"""Unit tests of broker.vtpm_ca: the TCG EK certificate profile, the API handler, and CA replacement."""

from __future__ import annotations

import base64
import datetime as dt
import os
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID, ObjectIdentifier

from broker.vtpm_ca import (
    EK_CERT_MAX_DER,
    EkCa,
    EkCaError,
    EkRequestError,
    handle_ek_certificate_request,
    issue_ek_certificate,
    read_ek_certificate,
    recertify,
    verify_ek_certificate,
)
from kmip_core.sealing.barrier import Barrier

TPM = dict(
    tpm_manufacturer="id:00001014",
    tpm_model="swtpm",
    tpm_version="id:20191023",
    spec_family="2.0",
    spec_level=0,
    spec_revision=164,
)
# SEQUENCE { SEQUENCE { OID 2.23.133.2.16, SET { SEQUENCE { UTF8String "2.0", INTEGER 0, INTEGER 164 } } } },
# written out by hand from X.690 so the test does not trust the module's own DER writer.
SPEC_2_0_0_164 = bytes.fromhex("3019301706056781050210310e300c0c03322e30020100020200a4")

OID = ObjectIdentifier
VM = uuid.UUID("6f1c0e02-51a3-4a8e-9f4b-2f3c5d9e7a10")


def spki(key) -> bytes:
    public = key.public_key() if hasattr(key, "public_key") else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def ca() -> EkCa:
    return EkCa.create()


@pytest.fixture(scope="module")
def rsa_ca() -> EkCa:
    return EkCa.create("vtpm-broker EK CA (RSA)", key_type="rsa-3072")


@pytest.fixture(scope="module")
def eks() -> dict[str, object]:
    return {
        "rsa-2048": rsa.generate_private_key(65537, 2048),
        "ecc-p256": ec.generate_private_key(ec.SECP256R1()),
        "ecc-p384": ec.generate_private_key(ec.SECP384R1()),
    }


def make_ca_cert(
    cn: str,
    *,
    issuer: tuple[x509.Certificate, object] | None = None,
    key=None,
    ca: bool = True,
    key_cert_sign: bool = True,
    days: int = 365,
    extra_names: int = 0,
):
    """A third party's CA certificate (self-signed, or issued by ``issuer``)."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Third Party PKI")]
    attributes += [
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"unit {i:02d} " + "x" * 50) for i in range(extra_names)
    ]
    name = x509.Name([*attributes, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_cert.subject if issuer_cert else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not key_cert_sign,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=key_cert_sign,
                crl_sign=key_cert_sign,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    )
    return builder.sign(issuer_key, hashes.SHA256()), key


def sign_ca_csr(csr_pem: bytes, issuer: tuple[x509.Certificate, object]) -> x509.Certificate:
    """What a third-party CA does with the broker's CSR: issue a CA certificate for its key."""
    csr = x509.load_pem_x509_csr(csr_pem)
    assert csr.is_signature_valid
    issuer_cert, issuer_key = issuer
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(csr.subject)
        .issuer_name(issuer_cert.subject)
        .public_key(csr.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(csr.extensions.get_extension_for_class(x509.BasicConstraints).value, critical=True)
        .add_extension(csr.extensions.get_extension_for_class(x509.KeyUsage).value, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(csr.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def issue(ca: EkCa, ek, cert_type: str = "ek", **overrides) -> bytes:
    key_type = "rsa" if isinstance(ek, rsa.RSAPrivateKey) else "ecc"
    fields = {**TPM, **overrides}
    return issue_ek_certificate(ca, spki(ek), key_type, VM, cert_type=cert_type, **fields)


def request_for(ek, **overrides) -> dict:
    body = {
        "vm_uuid": str(VM),
        "type": "ek",
        "key_type": "rsa" if isinstance(ek, rsa.RSAPrivateKey) else "ecc",
        "public_key_pem": spki(ek).decode(),
        "tpm_manufacturer": "id:00001014",
        "tpm_model": "swtpm",
        "tpm_version": "id:20191023",
        "tpm_spec_family": "2.0",
        "tpm_spec_level": 0,
        "tpm_spec_revision": 164,
    }
    body.update(overrides)
    return body


# --- The profile -------------------------------------------------------------------------


@pytest.mark.parametrize("ca_name", ["ca", "rsa_ca"])
@pytest.mark.parametrize("ek_name", ["rsa-2048", "ecc-p256", "ecc-p384"])
def test_ek_certificate_follows_the_tcg_profile(request, ca_name, ek_name, eks):
    """Every field the TCG EK Credential Profile (TPM 2.0) asks for, parsed back with cryptography."""
    ek_ca: EkCa = request.getfixturevalue(ca_name)
    ek = eks[ek_name]
    der = issue(ek_ca, ek)
    cert = x509.load_der_x509_certificate(der)

    assert len(der) <= EK_CERT_MAX_DER
    assert cert.version == x509.Version.v3
    assert 0 < cert.serial_number < 2**159
    assert cert.issuer == ek_ca.cert.subject
    assert len(cert.subject) == 0
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == ek.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject => critical subjectAltName
    (directory,) = san.value.get_values_for_type(x509.DirectoryName)
    values = {attr.oid.dotted_string: attr for attr in directory}
    assert {k: v.value for k, v in values.items()} == {
        "2.23.133.2.1": "id:00001014",
        "2.23.133.2.2": "swtpm",
        "2.23.133.2.3": "id:20191023",
    }
    assert all(attr._type == x509.name._ASN1Type.UTF8String for attr in directory)
    assert len(directory.rdns) == 3

    sda = cert.extensions.get_extension_for_oid(OID("2.5.29.9"))
    assert not sda.critical
    assert sda.value.value == SPEC_2_0_0_164

    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    is_rsa = ek_name.startswith("rsa")
    assert usage.value.key_encipherment is is_rsa
    assert usage.value.key_agreement is (not is_rsa)
    assert not usage.value.digital_signature and not usage.value.key_cert_sign
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [OID("2.23.133.8.1")]
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ek_ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert cert.not_valid_after_utc <= ek_ca.cert.not_valid_after_utc

    # The signature verifies with the CA's public key, not just by cryptography's helper.
    ca_public = ek_ca.key.public_key()
    if isinstance(ca_public, rsa.RSAPublicKey):
        ca_public.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    else:
        ca_public.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))

    info = verify_ek_certificate(der, ek_ca.ca_pem, public_key_pem=spki(ek))
    assert (info.cert_type, info.key_type) == ("ek", "rsa" if is_rsa else "ecc")
    assert (info.spec_family, info.spec_level, info.spec_revision) == ("2.0", 0, 164)


def test_platform_certificate_is_the_simplified_x509_form(ca, eks):
    """type platform: same EK public key, EKU tcg-kp-PlatformCertificate, platform attributes in the SAN."""
    ek = eks["rsa-2048"]
    der = issue(ca, ek, "platform", platform=("ACME", "Hyper 9", "2.1"))
    cert = x509.load_der_x509_certificate(der)
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [OID("2.23.133.8.2")]
    dirs = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DirectoryName
    )
    assert [{a.oid.dotted_string: a.value for a in d} for d in dirs] == [
        {"2.23.133.2.1": "id:00001014", "2.23.133.2.2": "swtpm", "2.23.133.2.3": "id:20191023"},
        {"2.23.133.5.1.1": "ACME", "2.23.133.5.1.4": "Hyper 9", "2.23.133.5.1.5": "2.1"},
    ]
    info = verify_ek_certificate(der, ca.ca_pem, public_key_pem=spki(ek))
    assert info.cert_type == "platform" and info.platform == ("ACME", "Hyper 9", "2.1")


@pytest.mark.parametrize(
    ("level", "revision", "tail"),
    [
        (0, 0, "020100020100"),
        (127, 128, "02017f02020080"),
        (255, 256, "020200ff02020100"),
        (2**31 - 1, 1, "02047fffffff020101"),
    ],
)
def test_tpm_specification_integers_are_minimal_der(ca, eks, level, revision, tail):
    der = issue(ca, eks["ecc-p256"], spec_level=level, spec_revision=revision)
    value = x509.load_der_x509_certificate(der).extensions.get_extension_for_oid(OID("2.5.29.9")).value.value
    assert value.endswith(bytes.fromhex("0c03322e30" + tail))
    assert read_ek_certificate(der).spec_level == level and read_ek_certificate(der).spec_revision == revision


@pytest.mark.parametrize(
    ("key", "key_type", "message"),
    [
        (lambda: rsa.generate_private_key(65537, 1024), "rsa", "2048 or 3072 bits"),
        (lambda: rsa.generate_private_key(3, 2048), "rsa", "exponent 65537"),
        (lambda: ec.generate_private_key(ec.SECP521R1()), "ecc", "P-256 or P-384"),
        (lambda: ec.generate_private_key(ec.SECP256R1()), "rsa", "not an RSA key"),
        (lambda: rsa.generate_private_key(65537, 2048), "ecc", "not an ECC key"),
    ],
)
def test_ek_keys_outside_the_profile_are_refused(ca, key, key_type, message):
    with pytest.raises(EkCaError, match=message):
        issue_ek_certificate(ca, spki(key()), key_type, VM, **TPM)


def test_bad_tpm_attributes_are_refused(ca, eks):
    with pytest.raises(EkCaError, match="tpm_manufacturer"):
        issue(ca, eks["ecc-p256"], tpm_manufacturer="IBM")
    with pytest.raises(EkCaError, match="tpm_spec_level"):
        issue(ca, eks["ecc-p256"], spec_level=-1)
    with pytest.raises(EkCaError, match="VM UUID"):
        issue_ek_certificate(ca, spki(eks["ecc-p256"]), "ecc", "vm-1", **TPM)


def test_certificate_over_2048_bytes_is_refused(eks):
    """A CA whose subject is long enough pushes the EK certificate past what an NV index holds."""
    cert, key = make_ca_cert("Verbose CA", extra_names=30)
    verbose = EkCa.import_ca(cert_pem(cert), key_pem(key))
    with pytest.raises(EkCaError, match="more than the 2048"):
        issue(verbose, eks["rsa-2048"])


def test_not_after_defaults_to_and_is_capped_at_the_ca_expiry(ca, eks):
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)
    cert = x509.load_der_x509_certificate(issue(ca, eks["ecc-p256"], not_after=soon))
    assert abs(cert.not_valid_after_utc - soon) < dt.timedelta(seconds=1)
    far = x509.load_der_x509_certificate(issue(ca, eks["ecc-p256"], not_after=soon.replace(year=9999)))
    assert far.not_valid_after_utc == ca.cert.not_valid_after_utc


# --- The handler ----------------------------------------------------------------------------


def test_handler_issues_and_answers_the_contract(ca, eks):
    calls = []
    answer = handle_ek_certificate_request(
        ca, request_for(eks["ecc-p384"]), "esx1", authorize=lambda host, vm: calls.append((host, vm))
    )
    assert set(answer) == {"certificate_der_b64", "ca_pem"}
    assert calls == [("esx1", VM)]
    der = base64.b64decode(answer["certificate_der_b64"])
    assert answer["ca_pem"].encode() == ca.ca_pem
    verify_ek_certificate(der, answer["ca_pem"], public_key_pem=spki(eks["ecc-p384"]))


@pytest.mark.parametrize(
    ("mutate", "status", "message"),
    [
        (lambda r: ["not", "an", "object"], 400, "JSON object"),
        (lambda r: {**r, "extra": 1}, 400, "unknown field 'extra'"),
        (lambda r: {k: v for k, v in r.items() if k != "tpm_model"}, 400, "missing field 'tpm_model'"),
        (lambda r: {**r, "vm_uuid": "vm-1"}, 400, "vm_uuid"),
        (lambda r: {**r, "vm_uuid": 7}, 400, "vm_uuid"),
        (lambda r: {**r, "type": "aik"}, 400, "type"),
        (lambda r: {**r, "key_type": "dsa"}, 400, "key_type"),
        (lambda r: {**r, "public_key_pem": "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"}, 400, "PEM"),
        (lambda r: {**r, "public_key_pem": "x" * 5000}, 400, "at most"),
        (lambda r: {**r, "tpm_manufacturer": "IBM"}, 400, "tpm_manufacturer"),
        (lambda r: {**r, "tpm_version": "id:xyz"}, 400, "tpm_version"),
        (lambda r: {**r, "tpm_model": "bad\nmodel"}, 400, "tpm_model"),
        (lambda r: {**r, "tpm_spec_family": 2.0}, 400, "tpm_spec_family"),
        (lambda r: {**r, "tpm_spec_level": True}, 400, "tpm_spec_level"),
        (lambda r: {**r, "tpm_spec_revision": "164"}, 400, "tpm_spec_revision"),
        (lambda r: {**r, "tpm_spec_revision": 2**40}, 400, "tpm_spec_revision"),
        (lambda r: {**r, "key_type": "rsa"}, 422, "not an RSA key"),
        (
            lambda r: {**r, "public_key_pem": spki(ec.generate_private_key(ec.SECP521R1())).decode()},
            422,
            "P-256 or P-384",
        ),
    ],
)
def test_handler_refuses_bad_requests(ca, eks, mutate, status, message):
    called = []
    with pytest.raises(EkRequestError, match=message) as caught:
        handle_ek_certificate_request(
            ca, mutate(request_for(eks["ecc-p256"])), "esx1", authorize=lambda *a: called.append(a)
        )
    assert caught.value.status == status
    assert "\n" not in caught.value.message
    assert called == [] or status == 422  # policy runs only on a well-formed request


def test_handler_refusal_by_policy_signs_nothing(ca, eks, monkeypatch):
    import broker.vtpm_ca as module

    def policy(host, vm):
        raise EkRequestError(404, f"no VM {vm} on host {host}")

    monkeypatch.setattr(module, "issue_ek_certificate", lambda *a, **k: pytest.fail("signed despite the refusal"))
    with pytest.raises(EkRequestError, match="no VM") as caught:
        handle_ek_certificate_request(ca, request_for(eks["ecc-p256"]), "esx2", authorize=policy)
    assert caught.value.status == 404


# --- Replacing the CA ---------------------------------------------------------------------


def test_import_third_party_ca_with_chain(eks):
    root = make_ca_cert("Third Party Root")
    intermediate = make_ca_cert("Third Party vTPM EK CA", issuer=root)
    imported = EkCa.import_ca(cert_pem(intermediate[0]), key_pem(intermediate[1]), chain_pem=cert_pem(root[0]))
    assert imported.chain == (root[0],)
    der = issue(imported, eks["rsa-2048"])
    verify_ek_certificate(der, imported.ca_pem, public_key_pem=spki(eks["rsa-2048"]))
    # The chain may also follow the certificate in the same PEM.
    same = EkCa.import_ca(cert_pem(intermediate[0]) + cert_pem(root[0]), key_pem(intermediate[1]))
    assert same.ca_pem == imported.ca_pem


def test_import_refuses_what_is_not_a_usable_ca():
    cert, key = make_ca_cert("Third Party EK CA")
    other = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(EkCaError, match="does not match"):
        EkCa.import_ca(cert_pem(cert), key_pem(other))
    leaf, leaf_key = make_ca_cert("not a CA", ca=False)
    with pytest.raises(EkCaError, match="not a CA certificate"):
        EkCa.import_ca(cert_pem(leaf), key_pem(leaf_key))
    no_sign, no_sign_key = make_ca_cert("CA without keyCertSign", key_cert_sign=False)
    with pytest.raises(EkCaError, match="keyCertSign"):
        EkCa.import_ca(cert_pem(no_sign), key_pem(no_sign_key))
    expired, expired_key = make_ca_cert("expired CA", days=-1)
    with pytest.raises(EkCaError, match="not valid now"):
        EkCa.import_ca(cert_pem(expired), key_pem(expired_key))
    stranger, _ = make_ca_cert("someone else's root")
    with pytest.raises(EkCaError, match="chain is broken"):
        EkCa.import_ca(cert_pem(cert), key_pem(key), chain_pem=cert_pem(stranger))
    encrypted = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.BestAvailableEncryption(b"pw")
    )
    with pytest.raises(EkCaError, match="encrypted"):
        EkCa.import_ca(cert_pem(cert), encrypted)
    with pytest.raises(EkCaError, match="PEM"):
        EkCa.import_ca(b"garbage", key_pem(key))


def test_csr_signed_by_a_third_party_becomes_the_ca(eks):
    """A new key: its CSR goes to the third party, and the certificate that comes back is installed."""
    root = make_ca_cert("Third Party Root")
    pending = EkCa.create("vtpm-broker EK CA 2")
    csr = x509.load_pem_x509_csr(pending.make_csr())
    assert csr.subject == pending.cert.subject
    assert csr.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert csr.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign

    signed = sign_ca_csr(pending.make_csr(), root)
    installed = pending.install_signed(cert_pem(signed), chain_pem=cert_pem(root[0]))
    assert installed.cert == signed and installed.chain == (root[0],)
    der = issue(installed, eks["ecc-p384"])
    verify_ek_certificate(der, installed.ca_pem, public_key_pem=spki(eks["ecc-p384"]))
    assert x509.load_der_x509_certificate(der).issuer == signed.subject

    # A certificate for another key (not the CSR's) is refused.
    stranger = sign_ca_csr(EkCa.create("stranger").make_csr(), root)
    with pytest.raises(EkCaError, match="does not match the CSR"):
        pending.install_signed(cert_pem(stranger), chain_pem=cert_pem(root[0]))


def test_csr_for_the_current_key_keeps_old_ek_certificates_valid(ca, eks):
    """Same key and subject signed by a third party: EK certificates already issued verify under the new chain."""
    old = issue(ca, eks["rsa-2048"])
    root = make_ca_cert("Third Party Root")
    installed = ca.install_signed(cert_pem(sign_ca_csr(ca.make_csr(), root)), chain_pem=cert_pem(root[0]))
    verify_ek_certificate(old, installed.ca_pem, public_key_pem=spki(eks["rsa-2048"]))


@pytest.mark.parametrize("cert_type", ["ek", "platform"])
def test_recertify_keeps_key_and_attributes_under_the_new_ca(ca, eks, cert_type):
    ek = eks["ecc-p384"]
    old = issue(ca, ek, cert_type, tpm_model="swtpm-x", spec_revision=159)
    root = make_ca_cert("Third Party Root")
    intermediate = make_ca_cert("Third Party vTPM EK CA", issuer=root)
    new_ca = EkCa.import_ca(cert_pem(intermediate[0]), key_pem(intermediate[1]), chain_pem=cert_pem(root[0]))

    new = recertify(new_ca, old, issued_by=[ca.cert])
    before, after = read_ek_certificate(old), read_ek_certificate(new)
    assert after.public_key_pem == before.public_key_pem == spki(ek)
    for field in ("cert_type", "key_type", "tpm_manufacturer", "tpm_model", "tpm_version", "spec_family"):
        assert getattr(after, field) == getattr(before, field)
    assert (after.spec_level, after.spec_revision, after.platform) == (before.spec_level, 159, before.platform)
    assert after.serial_number != before.serial_number
    verify_ek_certificate(new, new_ca.ca_pem, public_key_pem=spki(ek))
    verify_ek_certificate(old, ca.ca_pem, public_key_pem=spki(ek))  # the old one stays valid under the old chain
    with pytest.raises(EkCaError, match="not issued by"):
        verify_ek_certificate(new, ca.ca_pem)
    with pytest.raises(EkCaError, match="not issued by the expected CA"):
        recertify(new_ca, old, issued_by=[root[0]])


def test_verify_refuses_another_key_and_non_ek_certificates(ca, eks):
    der = issue(ca, eks["ecc-p256"])
    with pytest.raises(EkCaError, match="another public key"):
        verify_ek_certificate(der, ca.ca_pem, public_key_pem=spki(eks["ecc-p384"]))
    with pytest.raises(EkCaError, match="not an EK certificate"):
        read_ek_certificate(ca.cert.public_bytes(serialization.Encoding.DER))
    with pytest.raises(EkCaError, match="not a DER"):
        read_ek_certificate(b"\x30\x03\x02\x01\x00")


def ek_with_directory_attributes(ca: EkCa, ek, value: bytes) -> bytes:
    """An EK certificate of the profile but for its subjectDirectoryAttributes, which is `value`."""
    good = x509.load_der_x509_certificate(issue(ca, ek))
    builder = (
        x509.CertificateBuilder()
        .issuer_name(good.issuer)
        .subject_name(good.subject)
        .public_key(good.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(good.not_valid_before_utc)
        .not_valid_after(good.not_valid_after_utc)
    )
    for extension in good.extensions:
        if extension.oid == OID("2.5.29.9"):
            extension = x509.Extension(extension.oid, False, x509.UnrecognizedExtension(extension.oid, value))
        builder = builder.add_extension(extension.value, critical=extension.critical)
    return builder.sign(ca.key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (SPEC_2_0_0_164, None),
        (SPEC_2_0_0_164[:-1], "truncated DER in subjectDirectoryAttributes"),
        (bytes.fromhex("3085000000000100"), "bad DER length in subjectDirectoryAttributes"),
        (bytes.fromhex("3100"), "subjectDirectoryAttributes is not a SEQUENCE"),
        (SPEC_2_0_0_164 + b"\x00", "subjectDirectoryAttributes is not a SEQUENCE"),
        (bytes.fromhex("3000"), "no tcg-at-tpmSpecification in subjectDirectoryAttributes"),
    ],
)
def test_a_malformed_tpm_specification_is_refused_in_one_line(ca, eks, value, message):
    cert = ek_with_directory_attributes(ca, eks["ecc-p256"], value)
    if message is None:
        info = read_ek_certificate(cert)
        assert (info.spec_family, info.spec_level, info.spec_revision) == ("2.0", 0, 164)
        return
    with pytest.raises(EkCaError) as refused:
        read_ek_certificate(cert)
    assert str(refused.value).endswith(message) and "\n" not in str(refused.value)


# --- Sealing ------------------------------------------------------------------------------


@pytest.mark.parametrize("ca_name", ["ca", "rsa_ca"])
def test_sealed_round_trip_never_holds_the_key_in_the_clear(request, ca_name, eks):
    ek_ca: EkCa = request.getfixturevalue(ca_name)
    barrier = Barrier(os.urandom(32))
    blobs = ek_ca.to_sealed(barrier)
    assert set(blobs) == {"key_sealed", "cert_pem", "chain_pem"}
    pkcs8 = ek_ca.key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem = key_pem(ek_ca.key)
    if isinstance(ek_ca.key, rsa.RSAPrivateKey):
        secret = ek_ca.key.private_numbers().d
    else:
        secret = ek_ca.key.private_numbers().private_value
    secret_bytes = secret.to_bytes((secret.bit_length() + 7) // 8, "big")
    for value in blobs.values():
        assert pkcs8 not in value and pem not in value and secret_bytes not in value
        assert b"PRIVATE KEY" not in value

    restored = EkCa.from_sealed(barrier, blobs)
    assert restored.fingerprint == ek_ca.fingerprint
    der = issue(restored, eks["rsa-2048"])
    verify_ek_certificate(der, ek_ca.ca_pem, public_key_pem=spki(eks["rsa-2048"]))

    with pytest.raises(EkCaError, match="does not open under this master key"):
        EkCa.from_sealed(Barrier(os.urandom(32)), blobs)
    # The sealed key is bound to its purpose: a blob sealed for another purpose does not open as the EK CA key.
    with pytest.raises(EkCaError, match="does not open"):
        EkCa.from_sealed(barrier, {**blobs, "key_sealed": barrier.seal("ca:trust", pkcs8)})


def test_sealed_round_trip_keeps_the_chain(eks):
    root = make_ca_cert("Third Party Root")
    intermediate = make_ca_cert("Third Party vTPM EK CA", issuer=root)
    imported = EkCa.import_ca(cert_pem(intermediate[0]), key_pem(intermediate[1]), chain_pem=cert_pem(root[0]))
    barrier = Barrier(os.urandom(32))
    restored = EkCa.from_sealed(barrier, imported.to_sealed(barrier))
    assert restored.ca_pem == imported.ca_pem


def test_create_refuses_unknown_key_types():
    with pytest.raises(EkCaError, match="ecc-p384, rsa-3072"):
        EkCa.create(key_type="dsa-1024")
    ca = EkCa.create("x")
    assert "PRIVATE" not in repr(ca)
    with pytest.raises(AttributeError):
        ca.key = None  # type: ignore[misc]
