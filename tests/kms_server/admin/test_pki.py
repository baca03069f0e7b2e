"""Tests for kmip_core.pki: the development PKI, pinning, master keys."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kmip_core import pki
from kmip_core.pki import PkiError, PkiWarning


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate, cls):
    return cert.extensions.get_extension_for_class(cls)


def self_signed(
    tmp_path: Path,
    name: str,
    eku: list | None = None,
    days: float = 30,
    start_days: float = -1,
    der: bool = False,
) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=start_days))
        .not_valid_after(now + dt.timedelta(days=days))
    )
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    path = tmp_path / f"{name}.{'der' if der else 'pem'}"
    encoding = serialization.Encoding.DER if der else serialization.Encoding.PEM
    path.write_bytes(cert.public_bytes(encoding))
    return path


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory) -> Path:
    """One default (RSA) PKI shared by the read-only tests."""
    directory = tmp_path_factory.mktemp("pki") / "dev"
    pki.init_pki(directory, ["kms.example.com", "10.0.0.5"], ["alice", "bob"])
    return directory


def test_init_writes_every_file_with_safe_modes(rsa_pki):
    names = {p.name for p in rsa_pki.iterdir()}
    expected = {"ca", "server", "alice", "bob"}
    assert names == {f"{n}.{e}" for n in expected for e in ("pem", "key")}
    for n in expected:
        assert mode(rsa_pki / f"{n}.key") == 0o600
        assert mode(rsa_pki / f"{n}.pem") == 0o644
    assert mode(rsa_pki) == 0o700


def test_ca_certificate(rsa_pki):
    ca = load(rsa_pki / "ca.pem")
    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(ca, x509.KeyUsage).value
    assert ku.key_cert_sign and ku.crl_sign
    lifetime = ca.not_valid_after_utc - ca.not_valid_before_utc
    assert dt.timedelta(days=3649) < lifetime < dt.timedelta(days=3651)
    assert ca.subject == ca.issuer


def test_server_certificate(rsa_pki):
    ca = load(rsa_pki / "ca.pem")
    server = load(rsa_pki / "server.pem")
    server.verify_directly_issued_by(ca)
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "kms.example.com"
    )
    assert list(ext(server, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.SERVER_AUTH
    ]
    sans = ext(server, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["kms.example.com", "localhost"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == [
        "10.0.0.5",
        "127.0.0.1",
    ]
    assert ext(server, x509.BasicConstraints).value.ca is False
    # RSA key transport (AES128-SHA256 for vCenter 7) needs keyEncipherment.
    assert isinstance(server.public_key(), rsa.RSAPublicKey)
    assert server.public_key().key_size == 2048
    assert ext(server, x509.KeyUsage).value.key_encipherment
    lifetime = server.not_valid_after_utc - server.not_valid_before_utc
    assert dt.timedelta(days=729) < lifetime < dt.timedelta(days=731)
    key = serialization.load_pem_private_key(
        (rsa_pki / "server.key").read_bytes(), None
    )
    assert key.public_key() == server.public_key()


def test_client_certificate(rsa_pki):
    ca = load(rsa_pki / "ca.pem")
    alice = load(rsa_pki / "alice.pem")
    alice.verify_directly_issued_by(ca)
    assert alice.subject.rfc4514_string() == "CN=alice"
    assert list(ext(alice, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]


def test_ec_key_type(tmp_path):
    pki.init_pki(tmp_path / "ec", [], ["c1"], key_type="ec")
    for stem in ("ca", "server", "c1"):
        assert isinstance(
            load(tmp_path / "ec" / f"{stem}.pem").public_key(),
            ec.EllipticCurvePublicKey,
        )
    server = load(tmp_path / "ec" / "server.pem")
    assert server.subject.rfc4514_string() == "CN=localhost"
    with pytest.raises(PkiError, match="unknown key type 'dsa'"):
        pki.init_pki(tmp_path / "x", [], [], key_type="dsa")


def test_init_is_idempotent_and_only_adds_missing(tmp_path):
    directory = tmp_path / "dev"
    first = pki.init_pki(directory, [], ["alice"], key_type="ec")
    assert len(first.written) == 6 and first.kept == ()
    before = {p.name: p.read_bytes() for p in directory.iterdir()}

    second = pki.init_pki(directory, [], ["alice", "carol"], key_type="ec")
    assert {p.name for p in second.written} == {"carol.pem", "carol.key"}
    assert {p.name for p in second.kept} == set(before)
    for name, data in before.items():
        assert (directory / name).read_bytes() == data
    load(directory / "carol.pem").verify_directly_issued_by(load(directory / "ca.pem"))


def test_force_reissues_leaves_but_never_the_ca(tmp_path):
    directory = tmp_path / "dev"
    pki.init_pki(directory, [], ["alice"], key_type="ec")
    ca_before = (directory / "ca.key").read_bytes()
    server_before = (directory / "server.pem").read_bytes()
    result = pki.init_pki(
        directory, ["new.example"], ["alice"], key_type="ec", force=True
    )
    assert (directory / "ca.key").read_bytes() == ca_before
    assert (directory / "server.pem").read_bytes() != server_before
    assert directory / "server.pem" in result.written
    sans = ext(load(directory / "server.pem"), x509.SubjectAlternativeName).value
    assert "new.example" in sans.get_values_for_type(x509.DNSName)


def test_kept_server_cert_lacking_new_names_is_an_error(tmp_path):
    directory = tmp_path / "dev"
    pki.init_pki(directory, [], [], key_type="ec")
    with pytest.raises(
        PkiError, match=r"lacks the name\(s\) kms2.example; pass --force"
    ):
        pki.init_pki(directory, ["kms2.example"], [], key_type="ec")


def test_half_present_pairs_are_refused(tmp_path):
    directory = tmp_path / "dev"
    pki.init_pki(directory, [], ["alice"], key_type="ec")
    (directory / "alice.key").unlink()
    with pytest.raises(PkiError, match="alice.pem exists but .*alice.key does not"):
        pki.init_pki(directory, [], ["alice"], key_type="ec")
    (directory / "ca.key").unlink()
    with pytest.raises(PkiError, match="ca.pem exists but .*ca.key does not"):
        pki.init_pki(directory, [], [], key_type="ec")


def test_foreign_leaf_is_not_kept_silently(tmp_path):
    pki.init_pki(tmp_path / "a", [], [], key_type="ec")
    pki.init_pki(tmp_path / "b", [], [], key_type="ec")
    for name in ("server.pem", "server.key"):
        (tmp_path / "a" / name).write_bytes((tmp_path / "b" / name).read_bytes())
    with pytest.raises(PkiError, match="was not issued by the CA"):
        pki.init_pki(tmp_path / "a", [], [], key_type="ec")


@pytest.mark.parametrize("name", ["../evil", "ca", "server", "", "a b", "-x"])
def test_bad_client_names(tmp_path, name):
    with pytest.raises(PkiError, match="cannot be used as a file name"):
        pki.init_pki(tmp_path / "dev", [], [name], key_type="ec")
    assert not (tmp_path / "dev").exists()


def test_bad_server_name(tmp_path):
    with pytest.raises(PkiError, match="neither an IP address nor a DNS name"):
        pki.init_pki(tmp_path / "dev", ["bad name!"], [], key_type="ec")


def test_issue_client(tmp_path):
    directory = tmp_path / "dev"
    with pytest.raises(PkiError, match="run 'kms-admin pki init"):
        pki.issue_client(directory, "dave")
    pki.init_pki(directory, [], [], key_type="ec")
    cert_path, key_path = pki.issue_client(directory, "dave", key_type="ec")
    cert = load(cert_path)
    cert.verify_directly_issued_by(load(directory / "ca.pem"))
    assert cert.subject.rfc4514_string() == "CN=dave"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in ext(cert, x509.ExtendedKeyUsage).value
    assert mode(key_path) == 0o600
    with pytest.raises(PkiError, match="already has dave.pem"):
        pki.issue_client(directory, "dave")


def make_csr(tmp_path: Path, key=None) -> Path:
    key = key or ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example VC"),
                    x509.NameAttribute(NameOID.COMMON_NAME, "vcenter01"),
                ]
            )
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("vc01.example.com")]),
            critical=False,
        )
        # A client must not get a CA or server certificate by asking for it.
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "vc.csr"
    path.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    return path


def test_sign_csr_copies_subject_and_sans_only(tmp_path):
    ca_dir = tmp_path / "dev"
    pki.init_pki(ca_dir, [], [], key_type="ec")
    out = tmp_path / "vc.pem"
    pki.sign_csr(ca_dir, make_csr(tmp_path), out, days=90)
    cert = load(out)
    cert.verify_directly_issued_by(load(ca_dir / "ca.pem"))
    assert cert.subject.rfc4514_string() == "CN=vcenter01,O=Example VC"
    sans = ext(cert, x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["vc01.example.com"]
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [
        ExtendedKeyUsageOID.CLIENT_AUTH
    ]
    assert ext(cert, x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=89) < lifetime < dt.timedelta(days=91)
    with pytest.raises(PkiError, match="already exists"):
        pki.sign_csr(ca_dir, tmp_path / "vc.csr", out)


def test_sign_csr_rejects_bad_signature(tmp_path):
    ca_dir = tmp_path / "dev"
    pki.init_pki(ca_dir, [], [], key_type="ec")
    csr = x509.load_pem_x509_csr(make_csr(tmp_path).read_bytes())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    # Change one letter of the subject: the DER still parses, the signature fails.
    index = der.index(b"vcenter01")
    der[index] ^= 0x01
    bad = tmp_path / "bad.csr"
    bad.write_bytes(bytes(der))
    with pytest.raises(PkiError, match="invalid signature"):
        pki.sign_csr(ca_dir, bad, tmp_path / "out.pem")
    assert not (tmp_path / "out.pem").exists()

    (tmp_path / "junk.csr").write_text("not a csr")
    with pytest.raises(PkiError, match="not a certificate signing request"):
        pki.sign_csr(ca_dir, tmp_path / "junk.csr", tmp_path / "out.pem")


def test_sign_csr_rejects_weak_key_and_bad_days(tmp_path):
    ca_dir = tmp_path / "dev"
    pki.init_pki(ca_dir, [], [], key_type="ec")
    weak = make_csr(
        tmp_path, rsa.generate_private_key(public_exponent=65537, key_size=1024)
    )
    with pytest.raises(PkiError, match="1024-bit RSA key"):
        pki.sign_csr(ca_dir, weak, tmp_path / "out.pem")
    with pytest.raises(PkiError, match="days must be between 1 and 3650"):
        pki.sign_csr(ca_dir, weak, tmp_path / "out.pem", days=0)


def test_trust_list_untrust(tmp_path):
    trusted = tmp_path / "var" / "trusted-clients"
    cert_path = self_signed(tmp_path, "vc01", [ExtendedKeyUsageOID.CLIENT_AUTH])
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    fingerprint = pki.trust_client_cert(cert_path, trusted)
    assert fingerprint == hashlib.sha256(der).hexdigest()
    pinned = trusted / f"{fingerprint}.pem"
    assert load(pinned).public_bytes(serialization.Encoding.DER) == der
    assert mode(pinned) == 0o644
    assert mode(trusted) == 0o700
    # Pinning again is harmless.
    assert pki.trust_client_cert(cert_path, trusted) == fingerprint

    listed = pki.list_trusted(trusted)
    assert [(t.fingerprint_sha256, t.subject, t.path) for t in listed] == [
        (fingerprint, "CN=vc01", pinned)
    ]
    colon_form = ":".join(fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    assert pki.untrust(colon_form, trusted) == pinned
    assert not pinned.exists()
    assert pki.list_trusted(trusted) == []
    with pytest.raises(
        PkiError, match="no trusted client certificate with fingerprint"
    ):
        pki.untrust(fingerprint, trusted)
    with pytest.raises(PkiError, match="is not a SHA-256 fingerprint"):
        pki.untrust("abc", trusted)


def test_trust_accepts_der(tmp_path):
    path = self_signed(
        tmp_path, "derclient", [ExtendedKeyUsageOID.CLIENT_AUTH], der=True
    )
    fingerprint = pki.trust_client_cert(path, tmp_path / "t")
    assert fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (
        (tmp_path / "t" / f"{fingerprint}.pem").read_bytes().startswith(b"-----BEGIN")
    )


def test_trust_without_eku_warns(tmp_path):
    path = self_signed(tmp_path, "noeku", None)
    with pytest.warns(PkiWarning, match="has no extended key usage"):
        pki.trust_client_cert(path, tmp_path / "t")
    assert len(pki.list_trusted(tmp_path / "t")) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eku": [ExtendedKeyUsageOID.SERVER_AUTH]}, "lacks clientAuth"),
        (
            {"eku": [ExtendedKeyUsageOID.CLIENT_AUTH], "days": -1, "start_days": -10},
            "expired",
        ),
        (
            {"eku": [ExtendedKeyUsageOID.CLIENT_AUTH], "start_days": 5},
            "is not valid before",
        ),
    ],
)
def test_trust_refuses(tmp_path, kwargs, message):
    path = self_signed(tmp_path, "c", **kwargs)
    with pytest.raises(PkiError, match=message):
        pki.trust_client_cert(path, tmp_path / "t")
    assert not (tmp_path / "t").exists()


def test_trust_refuses_non_certificates(tmp_path):
    (tmp_path / "x.pem").write_text("hello")
    with pytest.raises(PkiError, match="neither a PEM nor a DER X.509 certificate"):
        pki.trust_client_cert(tmp_path / "x.pem", tmp_path / "t")
    with pytest.raises(PkiError, match="does not exist"):
        pki.trust_client_cert(tmp_path / "missing.pem", tmp_path / "t")


def test_new_master_key(tmp_path):
    old_umask = os.umask(0)
    try:
        path = pki.new_master_key(tmp_path / "master.key")
    finally:
        os.umask(old_umask)
    data = path.read_bytes()
    assert len(data) == 65 and data.endswith(b"\n")
    assert len(bytes.fromhex(data[:64].decode())) == 32
    assert mode(path) == 0o600
    assert pki.new_master_key(tmp_path / "other.key").read_bytes() != data

    with pytest.raises(
        PkiError, match="already exists; a master key is never overwritten"
    ):
        pki.new_master_key(path)
    assert path.read_bytes() == data
    with pytest.raises(PkiError, match="does not exist; create it first"):
        pki.new_master_key(tmp_path / "nope" / "master.key")
