"""Tests for kmip_core.tls: real TLS handshakes against the server context.

The server side is a pyOpenSSL connection on a thread listening on a free
port of 127.0.0.1; the clients are Python's own ``ssl`` module, an
independent TLS implementation binding. The outcome is read on the server
side, which is where the policy is enforced (with TLS 1.3 a client learns
that its certificate was refused only after its side of the handshake).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import socket
import ssl
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols.tls import TLSMemoryBIOFactory

from kmip_core import pki
from kmip_core.config import ConfigError, TlsConfig
from kmip_core.tls import (
    ClientIdentity,
    PeerIdentityError,
    TlsConfigError,
    build_context,
    client_verify_callback,
    peer_identity,
    server_context_factory,
)

CLIENT_AUTH = [ExtendedKeyUsageOID.CLIENT_AUTH]


# --- Certificates ----------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


def _write_pair(directory: Path, stem: str, cert: x509.Certificate, key) -> Pair:
    pair = Pair(directory / f"{stem}.pem", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


def make_cert(
    directory: Path,
    stem: str,
    *,
    subject: x509.Name | None = None,
    issuer: tuple[x509.Certificate, object] | None = None,
    eku=CLIENT_AUTH,
    ca: bool = False,
    days: float = 30,
) -> Pair:
    """A certificate signed by ``issuer`` (cert, key), or self-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)])
    issuer_cert, issuer_key = issuer if issuer else (None, key)
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(
            now - dt.timedelta(days=1) + dt.timedelta(days=min(days, 0) * 2)
        )
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    return _write_pair(directory, stem, cert, key)


def load_pair(pair: Pair):
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    key = serialization.load_pem_private_key(pair.key.read_bytes(), None)
    return cert, key


@dataclass(frozen=True)
class World:
    dir: Path
    cfg: TlsConfig
    alice: Pair
    foreign: Pair
    server_auth_only: Pair
    no_cn: Pair
    expired: Pair
    pinned: Pair
    impostor: Pair
    pinned_ca: Pair
    child_of_pinned_ca: Pair
    pinned_foreign: Pair


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    base = tmp_path_factory.mktemp("tls")
    dev = base / "dev"
    # The default (RSA) server key: AES128-SHA256 needs RSA key transport.
    pki.init_pki(dev, [], ["alice"])
    other = base / "other"
    pki.init_pki(other, [], ["mallory"], key_type="ec")
    ca = load_pair(Pair(dev / "ca.pem", dev / "ca.key"))
    other_ca = load_pair(Pair(other / "ca.pem", other / "ca.key"))
    certs = base / "certs"
    certs.mkdir()
    pinned_ca = make_cert(certs, "pinned-ca", ca=True)
    world = World(
        dir=base,
        cfg=TlsConfig(
            cert=dev / "server.pem",
            key=dev / "server.key",
            ca=dev / "ca.pem",
            trusted_clients_dir=base / "trusted-clients",
            identity="cn",
            min_version="1.2",
        ),
        alice=Pair(dev / "alice.pem", dev / "alice.key"),
        foreign=Pair(other / "mallory.pem", other / "mallory.key"),
        server_auth_only=make_cert(
            certs, "server-only", issuer=ca, eku=[ExtendedKeyUsageOID.SERVER_AUTH]
        ),
        no_cn=make_cert(
            certs,
            "no-cn",
            issuer=ca,
            subject=x509.Name(
                [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NoName")]
            ),
        ),
        expired=make_cert(certs, "expired", issuer=ca, days=-1),
        pinned=make_cert(certs, "pinned-client"),
        impostor=make_cert(
            certs,
            "pinned-client-impostor",
            subject=x509.Name(
                [x509.NameAttribute(NameOID.COMMON_NAME, "pinned-client")]
            ),
        ),
        pinned_ca=pinned_ca,
        child_of_pinned_ca=make_cert(certs, "child", issuer=load_pair(pinned_ca)),
        pinned_foreign=make_cert(certs, "vcenter", issuer=other_ca),
    )
    for pair in (world.pinned, world.pinned_ca, world.pinned_foreign):
        pki.trust_client_cert(pair.cert, world.cfg.trusted_clients_dir)
    return world


# --- Handshake harness -------------------------------------------------------------------


@dataclass
class Outcome:
    server_error: str | None = None
    identity: ClientIdentity | None = None
    version: str | None = None
    cipher: str | None = None
    client_error: str | None = None
    client_got: bytes | None = None

    @property
    def accepted(self) -> bool:
        return self.server_error is None and self.client_got == b"ok"


def handshake(
    context: SSL.Context, client: ssl.SSLContext, mode: str = "cn"
) -> Outcome:
    """One connection over 127.0.0.1: server thread vs. Python ssl client."""
    outcome = Outcome()
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        sock, _ = listener.accept()
        sock.settimeout(None)
        conn = SSL.Connection(context, sock)
        conn.set_accept_state()
        try:
            conn.do_handshake()
            outcome.version = conn.get_protocol_version_name()
            outcome.cipher = conn.get_cipher_name()
            outcome.identity = peer_identity(conn.get_peer_certificate(), mode)
            conn.sendall(b"ok")
            conn.shutdown()
        except SSL.Error as exc:
            outcome.server_error = str(exc)
        finally:
            sock.close()
            listener.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with client.wrap_socket(raw, server_hostname="localhost") as tls:
            outcome.client_got = tls.recv(2)
    except (ssl.SSLError, OSError) as exc:
        outcome.client_error = str(exc)
    finally:
        raw.close()
    thread.join(5)
    assert not thread.is_alive(), "server thread hung"
    return outcome


def client_ctx(
    world: World,
    pair: Pair | None,
    *,
    max_version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(world.dir / "dev" / "ca.pem")
    if pair is not None:
        ctx.load_cert_chain(pair.cert, pair.key)
    if max_version is not None:
        ctx.maximum_version = max_version
    if ciphers is not None:
        ctx.set_ciphers(ciphers)
    return ctx


@pytest.fixture(scope="module")
def server(world) -> SSL.Context:
    return server_context_factory(world.cfg).getContext()


TLS12 = ssl.TLSVersion.TLSv1_2


# --- Who gets in ------------------------------------------------------------------------


@pytest.mark.parametrize("max_version", [None, TLS12])
def test_ca_issued_client_is_accepted(world, server, max_version):
    """A client certificate from tls.ca completes the handshake, in 1.3 and 1.2."""
    outcome = handshake(server, client_ctx(world, world.alice, max_version=max_version))
    assert outcome.accepted, outcome
    assert outcome.version == ("TLSv1.2" if max_version else "TLSv1.3")
    assert outcome.identity.name == "alice"
    assert outcome.identity.issuer == "CN=kms_server development CA,O=kms_server"


@pytest.mark.parametrize("max_version", [None, TLS12])
def test_client_without_certificate_is_refused(world, server, max_version):
    outcome = handshake(server, client_ctx(world, None, max_version=max_version))
    assert not outcome.accepted
    assert "peer did not return a certificate" in outcome.server_error
    assert outcome.client_error is not None


@pytest.mark.parametrize(
    "name",
    [
        "foreign",  # issued by another CA
        "server_auth_only",  # right CA, EKU without clientAuth
        "expired",
        "impostor",  # same subject as a pinned certificate, different key
        "child_of_pinned_ca",  # a pinned CA:TRUE certificate must not act as a CA
        "no_cn",  # no identity in "cn" mode
    ],
)
def test_untrusted_clients_are_refused(world, server, name):
    outcome = handshake(server, client_ctx(world, getattr(world, name)))
    assert not outcome.accepted, outcome
    assert outcome.server_error is not None
    assert "certificate verify failed" in outcome.server_error
    assert outcome.identity is None


@pytest.mark.parametrize("name", ["pinned", "pinned_ca", "pinned_foreign"])
def test_pinned_certificates_are_accepted_as_themselves(world, server, name):
    """Pinned: self-signed, self-signed CA:TRUE, and issued by an untrusted CA."""
    pair = getattr(world, name)
    outcome = handshake(server, client_ctx(world, pair))
    assert outcome.accepted, outcome
    expected = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    assert (
        outcome.identity.fingerprint_sha256
        == expected.fingerprint(hashes.SHA256()).hex()
    )


def test_child_of_a_real_ca_is_accepted_when_that_ca_is_in_tls_ca(world, tmp_path):
    """Control for the pinned-CA refusal: the same chain passes via tls.ca."""
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(world.cfg.ca.read_bytes() + world.pinned_ca.cert.read_bytes())
    cfg = dataclasses.replace(world.cfg, ca=bundle)
    context = server_context_factory(cfg).getContext()
    assert handshake(context, client_ctx(world, world.child_of_pinned_ca)).accepted


def test_fingerprint_mode_accepts_certificate_without_cn(world):
    cfg = dataclasses.replace(world.cfg, identity="fingerprint")
    context = server_context_factory(cfg).getContext()
    outcome = handshake(context, client_ctx(world, world.no_cn), mode="fingerprint")
    assert outcome.accepted, outcome
    assert outcome.identity.subject == "O=NoName"


# --- Protocol versions and ciphers -------------------------------------------------------


def test_tls11_is_refused(world, server):
    ctx = client_ctx(world, world.alice)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    # Let the client's OpenSSL actually offer TLS 1.1.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    outcome = handshake(server, ctx)
    assert not outcome.accepted
    assert "unsupported protocol" in outcome.server_error


def test_min_version_13_refuses_tls12(world):
    cfg = dataclasses.replace(world.cfg, min_version="1.3")
    context = server_context_factory(cfg).getContext()
    outcome = handshake(context, client_ctx(world, world.alice, max_version=TLS12))
    assert "unsupported protocol" in outcome.server_error
    assert handshake(context, client_ctx(world, world.alice)).version == "TLSv1.3"


def test_kmip_profile_suite_aes128_sha256_on_tls12(world, server):
    """TLS_RSA_WITH_AES_128_CBC_SHA256, the suite vCenter 7 negotiates."""
    ctx = client_ctx(world, world.alice, max_version=TLS12, ciphers="AES128-SHA256")
    outcome = handshake(server, ctx)
    assert outcome.accepted, outcome
    assert (outcome.version, outcome.cipher) == ("TLSv1.2", "AES128-SHA256")


def test_aes256_sha256_on_tls12(world, server):
    ctx = client_ctx(world, world.alice, max_version=TLS12, ciphers="AES256-SHA256")
    assert handshake(server, ctx).cipher == "AES256-SHA256"


@pytest.mark.parametrize("suite", ["AES128-SHA256", "AES256-SHA256"])
def test_listeners_other_than_kmip_refuse_suites_without_forward_secrecy(world, suite):
    """kmip_suites=False (audit page, broker API and gateway): the KMIP
    profile suites with RSA key transport are not offered; ECDHE with AEAD
    still is."""
    context = server_context_factory(world.cfg, kmip_suites=False).getContext()
    outcome = handshake(context, client_ctx(world, world.alice, max_version=TLS12, ciphers=suite))
    assert not outcome.accepted, outcome
    default = handshake(context, client_ctx(world, world.alice, max_version=TLS12))
    assert default.accepted and default.cipher.startswith("ECDHE-") and "GCM" in default.cipher


def test_ecdhe_aead_chosen_by_default_and_server_preference_wins(world, server):
    default = handshake(server, client_ctx(world, world.alice, max_version=TLS12))
    assert default.cipher.startswith("ECDHE-") and ("GCM" in default.cipher)
    # The client prefers the RSA-transport suite; the server's order decides.
    ctx = client_ctx(
        world,
        world.alice,
        max_version=TLS12,
        ciphers="AES128-SHA256:ECDHE-RSA-AES128-GCM-SHA256",
    )
    assert handshake(server, ctx).cipher == "ECDHE-RSA-AES128-GCM-SHA256"


@pytest.mark.parametrize(
    "suite",
    [
        "AES128-SHA",
        "ECDHE-RSA-AES128-SHA",
        "AES128-GCM-SHA256",
        "DHE-RSA-AES128-GCM-SHA256",
    ],
)
def test_suites_outside_the_list_are_refused(world, server, suite):
    """CBC-SHA1, DHE and RSA-GCM are not offered; only the listed suites are."""
    ctx = client_ctx(
        world, world.alice, max_version=TLS12, ciphers=f"{suite}:@SECLEVEL=0"
    )
    outcome = handshake(server, ctx)
    assert not outcome.accepted
    assert "no shared cipher" in outcome.server_error


def test_no_compression_no_renegotiation(world):
    context = build_context(world.cfg)
    options = context.set_options(0)  # returns the options in force
    assert options & SSL.OP_NO_COMPRESSION
    assert options & SSL.OP_NO_RENEGOTIATION
    assert options & SSL.OP_CIPHER_SERVER_PREFERENCE
    assert (
        context.get_verify_mode() == SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT
    )


# --- Twisted ------------------------------------------------------------------------------


class _Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.factory.identity = peer_identity(self.transport.getPeerCertificate(), "cn")
        self.transport.write(data)


def _drive(factory, client: ssl.SSLContext):
    """Run a TLS session through Twisted's TLS protocol on an in-memory transport."""
    wrapped = Factory.forProtocol(_Echo)
    # Twisted's TLS protocol coalesces small writes and flushes them on the
    # next reactor turn; a fake clock stands in for the reactor.
    clock = Clock()
    tls_factory = TLSMemoryBIOFactory(factory, False, wrapped, clock=clock)
    protocol = tls_factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 40000))
    transport = StringTransport()
    protocol.makeConnection(transport)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="localhost")

    def pump() -> None:
        for _ in range(50):
            sent = outgoing.read()
            if sent:
                protocol.dataReceived(sent)
            clock.advance(0)
            back = transport.value()
            transport.clear()
            if back:
                incoming.write(back)
            if not sent and not back:
                return

    for _ in range(10):
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pump()
    tls.write(b"ping")
    pump()
    return wrapped, transport, tls


def test_twisted_tls_protocol_uses_the_factory(world):
    factory = server_context_factory(world.cfg)
    wrapped, transport, tls = _drive(factory, client_ctx(world, world.alice))
    assert tls.read(4) == b"ping"
    assert wrapped.identity.name == "alice"
    assert not transport.disconnecting


def test_twisted_refuses_untrusted_client(world):
    factory = server_context_factory(world.cfg)
    wrapped, transport, _ = _drive(factory, client_ctx(world, world.foreign))
    assert transport.disconnecting
    assert not hasattr(wrapped, "identity")


def test_reload_picks_up_new_pins(world, tmp_path):
    cfg = dataclasses.replace(world.cfg, trusted_clients_dir=tmp_path / "pins")
    factory = server_context_factory(cfg)
    newcomer = make_cert(tmp_path, "newcomer")
    assert not handshake(factory.getContext(), client_ctx(world, newcomer)).accepted
    pki.trust_client_cert(newcomer.cert, cfg.trusted_clients_dir)
    factory.reload()
    assert handshake(factory.getContext(), client_ctx(world, newcomer)).accepted


# --- Configuration errors -------------------------------------------------------------------


def test_key_mismatch(world):
    cfg = dataclasses.replace(world.cfg, key=world.alice.key)
    with pytest.raises(TlsConfigError, match="^tls.key does not match tls.cert"):
        server_context_factory(cfg)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"cert": None}, "tls.cert is not set"),
        ({"ca": None}, "tls.ca is not set"),
        (
            {"cert": Path("/nonexistent/server.pem")},
            "tls.cert /nonexistent/server.pem does not",
        ),
        (
            {"key": Path("/nonexistent/server.key")},
            "tls.key /nonexistent/server.key does not",
        ),
    ],
)
def test_missing_settings(world, change, message):
    with pytest.raises(TlsConfigError, match=message):
        server_context_factory(dataclasses.replace(world.cfg, **change))


def test_unusable_files(world, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not pem")
    with pytest.raises(
        TlsConfigError, match="tls.ca .* holds no valid PEM certificate"
    ):
        server_context_factory(dataclasses.replace(world.cfg, ca=garbage))
    with pytest.raises(TlsConfigError, match="tls.key .* is not a PEM private key"):
        server_context_factory(dataclasses.replace(world.cfg, key=garbage))

    _, key = load_pair(world.alice)
    encrypted = tmp_path / "enc.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pw"),
        )
    )
    with pytest.raises(TlsConfigError, match="is encrypted"):
        server_context_factory(dataclasses.replace(world.cfg, key=encrypted))

    pins = tmp_path / "pins"
    pins.mkdir()
    (pins / "bad.pem").write_text("junk")
    with pytest.raises(TlsConfigError, match="tls.trusted_clients_dir .*bad.pem"):
        server_context_factory(dataclasses.replace(world.cfg, trusted_clients_dir=pins))


def test_expired_server_certificate(world, tmp_path):
    ca = load_pair(Pair(world.dir / "dev" / "ca.pem", world.dir / "dev" / "ca.key"))
    old = make_cert(tmp_path, "old-server", issuer=ca, days=-1)
    cfg = dataclasses.replace(world.cfg, cert=old.cert, key=old.key)
    with pytest.raises(TlsConfigError, match="is not valid now"):
        server_context_factory(cfg)


def test_tls_config_error_is_a_config_error():
    assert issubclass(TlsConfigError, ConfigError)


# --- peer_identity ---------------------------------------------------------------------------


def test_peer_identity_modes(world):
    cert = x509.load_pem_x509_certificate(world.alice.cert.read_bytes())
    fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    by_cn = peer_identity(cert, "cn")
    assert by_cn == ClientIdentity(
        name="alice",
        subject="CN=alice",
        fingerprint_sha256=fingerprint,
        issuer="CN=kms_server development CA,O=kms_server",
    )
    assert peer_identity(cert, "subject").name == "CN=alice"
    assert peer_identity(cert, "fingerprint").name == fingerprint
    # pyOpenSSL certificates (what Twisted hands out) give the same answer.
    assert peer_identity(crypto.X509.from_cryptography(cert), "cn") == by_cn
    with pytest.raises(dataclasses.FrozenInstanceError):
        by_cn.name = "mallory"  # type: ignore[misc]


def test_peer_identity_needs_exactly_one_cn(world, tmp_path):
    no_cn = x509.load_pem_x509_certificate(world.no_cn.cert.read_bytes())
    with pytest.raises(PeerIdentityError, match="0 common names"):
        peer_identity(no_cn, "cn")
    two = make_cert(
        tmp_path,
        "two",
        subject=x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "a"),
                x509.NameAttribute(NameOID.COMMON_NAME, "b"),
            ]
        ),
    )
    cert = x509.load_pem_x509_certificate(two.cert.read_bytes())
    with pytest.raises(PeerIdentityError, match="2 common names"):
        peer_identity(cert, "cn")
    with pytest.raises(ValueError, match="unknown identity mode"):
        peer_identity(cert, "email")


# --- The verify callback on its own ---------------------------------------------------------


def _x509(pair: Pair) -> crypto.X509:
    return crypto.X509.from_cryptography(
        x509.load_pem_x509_certificate(pair.cert.read_bytes())
    )


def test_verify_callback_decisions(world):
    """Each rule of the callback, without relying on OpenSSL's own checks.

    OpenSSL's purpose check usually refuses a serverAuth-only leaf before the
    callback; the callback must refuse it anyway.
    """
    pinned_ca = x509.load_pem_x509_certificate(world.pinned_ca.cert.read_bytes())
    verify = client_verify_callback(
        frozenset({pinned_ca.fingerprint(hashes.SHA256()).hex()}), "cn"
    )
    assert verify(None, _x509(world.alice), 0, 0, 1) is True
    assert (
        verify(None, _x509(world.alice), 10, 0, 0) is False
    )  # OpenSSL's verdict stands
    assert verify(None, _x509(world.server_auth_only), 0, 0, 1) is False
    assert verify(None, _x509(world.no_cn), 0, 0, 1) is False
    assert verify(None, _x509(world.pinned_ca), 0, 0, 1) is True  # as itself
    assert verify(None, _x509(world.pinned_ca), 0, 1, 1) is False  # as an issuer
    ca = Pair(world.dir / "dev" / "ca.pem", world.dir / "dev" / "ca.key")
    assert verify(None, _x509(ca), 0, 1, 1) is True


def test_verify_callback_gives_the_same_verdicts_when_asked_again(world, caplog):
    """Leaf verdicts are kept per certificate: asked again (a client that
    reconnects), each certificate gets its own verdict again, and a refusal
    is logged again, each time."""
    verify = client_verify_callback(frozenset(), "cn")
    for _ in range(3):
        caplog.clear()
        assert verify(None, _x509(world.alice), 0, 0, 1) is True
        assert verify(None, _x509(world.server_auth_only), 0, 0, 1) is False
        assert verify(None, _x509(world.no_cn), 0, 0, 1) is False
        refusals = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("lacks clientAuth" in m for m in refusals), refusals
        assert any("0 common names" in m for m in refusals), refusals
    # The mode is part of what is kept: the same certificate without a CN
    # has an identity by fingerprint.
    assert client_verify_callback(frozenset(), "fingerprint")(None, _x509(world.no_cn), 0, 0, 1) is True


def test_peer_identity_is_the_certificates_own_when_subjects_are_equal(world, tmp_path):
    """Two certificates with one subject (a reissued client): each keeps
    its own fingerprint, however often either is seen."""
    first = x509.load_pem_x509_certificate(make_cert(tmp_path, "twin").cert.read_bytes())
    second = x509.load_pem_x509_certificate(make_cert(tmp_path / "..", "twin").cert.read_bytes())
    assert first.subject == second.subject and first != second
    for _ in range(2):
        for cert in (first, second, crypto.X509.from_cryptography(first)):
            identity = peer_identity(cert, "fingerprint")
            assert identity.fingerprint_sha256 == cert_fp(cert)
            assert identity.name == identity.fingerprint_sha256
            assert peer_identity(cert, "cn").name == "twin"


def cert_fp(cert) -> str:
    if isinstance(cert, crypto.X509):
        cert = cert.to_cryptography()
    return cert.fingerprint(hashes.SHA256()).hex()
