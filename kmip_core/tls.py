"""Server-side TLS for the KMIP listener: mutual authentication, strict.

The policy, in one place:

- TLS 1.2 and 1.3 only (``tls.min_version`` may raise the floor to 1.3).
- A client certificate is required and verified. It is trusted if it
  chains to a certificate in ``tls.ca``, or if it *is* one of the pinned
  certificates in ``tls.trusted_clients_dir``. A pinned certificate is
  trusted as exactly itself: even with CA:TRUE it never vouches for
  another certificate, because pinning is an operator saying "this
  client", not "this issuer".
- The client certificate must allow clientAuth when it has an extended key
  usage, and must yield an identity under ``tls.identity``, so a connection
  that reaches the operation layer always has a usable identity.
- Cipher preference is the server's: ECDHE with AEAD first; on the KMIP
  listener only, the RSA key transport suites AES128-SHA256 and
  AES256-SHA256 stay last because the KMIP profiles name them and vCenter 7
  negotiates TLS_RSA_WITH_AES_128_CBC_SHA256 (this needs an RSA server
  key). Every other listener (audit page, broker API and gateway) offers
  ECDHE with AEAD only (``kmip_suites=False``).
- No compression, no renegotiation.

:class:`ServerContextFactory` plugs into Twisted (``reactor.listenSSL``,
``TLSMemoryBIOFactory``, ``SSL4ServerEndpoint``). Its :meth:`reload`
re-reads certificates and pins, so ``kms-admin clients trust`` can take
effect without a restart; a reload also changes the session ticket keys,
so a removed pin cannot live on through session resumption.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from twisted.internet import ssl as twisted_ssl
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from zope.interface import implementer

from kmip_core.config import ConfigError, TlsConfig

__all__ = [
    "AEAD_TLS12_SUITES",
    "CIPHERS_TLS12",
    "CIPHERS_TLS13",
    "TLS12_SUITES",
    "TLS13_SUITES",
    "ClientIdentity",
    "PeerIdentityError",
    "ServerContextFactory",
    "TlsConfigError",
    "build_context",
    "client_verify_callback",
    "peer_identity",
    "server_context_factory",
]

log = logging.getLogger(__name__)

# ECDHE + AEAD first (Mozilla "intermediate" order), then the KMIP profile
# suites without forward secrecy that older KMIP clients such as vCenter 7
# need. Nothing else: no CBC-SHA1, no DHE, no 3DES.
TLS12_SUITES = (
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
    "AES128-SHA256",
    "AES256-SHA256",
)
# For listeners no KMIP profile constrains: forward secrecy and AEAD only.
AEAD_TLS12_SUITES = tuple(s for s in TLS12_SUITES if s.startswith("ECDHE-"))
TLS13_SUITES = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
)
CIPHERS_TLS12 = ":".join(TLS12_SUITES)
CIPHERS_TLS13 = ":".join(TLS13_SUITES)
# Long enough for a CA bundle with intermediates; the bound keeps a
# hostile chain from costing much work.
VERIFY_DEPTH = 6
SESSION_ID_CONTEXT = b"kms_server"

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}
_IDENTITY_MODES = ("cn", "subject", "fingerprint")


class TlsConfigError(ConfigError):
    """The TLS settings cannot be used; one line naming the key and the fix."""


class PeerIdentityError(ValueError):
    """A client certificate does not yield an identity in the configured mode."""


@dataclass(frozen=True)
class ClientIdentity:
    """Who is on the other end, as taken from the verified client certificate.

    ``name`` is what access control uses, chosen by ``tls.identity``.
    """

    name: str
    subject: str
    fingerprint_sha256: str
    issuer: str


def _der(cert: x509.Certificate | crypto.X509) -> bytes:
    if isinstance(cert, crypto.X509):
        return crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
    if isinstance(cert, x509.Certificate):
        return cert.public_bytes(serialization.Encoding.DER)
    raise TypeError(f"expected an X.509 certificate, got {type(cert).__name__}")


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def peer_identity(cert: x509.Certificate | crypto.X509, mode: str) -> ClientIdentity:
    """Derive the client's identity from its certificate.

    ``mode`` is ``"cn"`` (the single Common Name), ``"subject"`` (the RFC 4514
    subject) or ``"fingerprint"`` (SHA-256 of the certificate, hex). A
    certificate with no CN, or with several, has no identity in ``"cn"``
    mode: picking one of several would let an issuer's choice of order
    decide who the client is.

    The identity is a function of the certificate's bytes and the mode
    alone, so the answers for the last certificates seen are kept
    (`_identity_of`): a client that connects again is not parsed again.
    Whether the certificate is trusted is not part of it; OpenSSL and
    `client_verify_callback` decide that at every handshake.
    """
    if mode not in _IDENTITY_MODES:
        raise ValueError(f"unknown identity mode {mode!r}; use one of {_IDENTITY_MODES}")
    return _identity_of(_der(cert), mode)


# Certificates whose identity is kept: the clients of a node, and more.
IDENTITY_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=IDENTITY_CACHE_SIZE)
def _identity_of(der: bytes, mode: str) -> ClientIdentity:
    """`peer_identity` of a certificate's DER; raises PeerIdentityError (not
    kept: lru_cache keeps answers only)."""
    c = x509.load_der_x509_certificate(der)
    subject = c.subject.rfc4514_string()
    fingerprint = hashlib.sha256(der).hexdigest()
    if mode == "cn":
        names = c.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if len(names) != 1 or not isinstance(names[0].value, str) or not names[0].value:
            raise PeerIdentityError(
                f"client certificate {subject!r} has {len(names)} common names; "
                "identity mode 'cn' needs exactly one"
            )
        name = names[0].value
    elif mode == "subject":
        if not subject:
            raise PeerIdentityError("client certificate has an empty subject")
        name = subject
    else:
        name = fingerprint
    return ClientIdentity(
        name=name,
        subject=subject,
        fingerprint_sha256=fingerprint,
        issuer=c.issuer.rfc4514_string(),
    )


# --- Loading files ------------------------------------------------------------------


def _require(key: str, path: Path | None) -> Path:
    if path is None:
        raise TlsConfigError(
            f"{key} is not set; add it to [tls] (kms-admin pki init makes a development set)"
        )
    return path


def _read(key: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(
            f"{key} {path} does not exist; fix the path in [tls]"
        ) from None
    except OSError as exc:
        raise TlsConfigError(
            f"{key} {path} cannot be read ({exc.strerror}); fix its permissions"
        ) from None


def _load_pem_certs(key: str, path: Path) -> list[x509.Certificate]:
    data = _read(key, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsConfigError(
            f"{key} {path} holds no valid PEM certificate; give PEM X.509 certificates"
        ) from None
    return certs


# The private keys OpenSSL can serve TLS with (pyOpenSSL's use_privatekey).
_TLS_KEY_TYPES = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
    dsa.DSAPrivateKey,
)
TlsPrivateKey = (
    rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey | dsa.DSAPrivateKey
)


def _load_key(path: Path) -> TlsPrivateKey:
    data = _read("tls.key", path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise TlsConfigError(
            f"tls.key {path} is encrypted; give an unencrypted key file readable only "
            "by the server (chmod 600)"
        ) from None
    except ValueError:
        raise TlsConfigError(
            f"tls.key {path} is not a PEM private key; check the file"
        ) from None
    if not isinstance(key, _TLS_KEY_TYPES):
        raise TlsConfigError(f"tls.key {path} is a {type(key).__name__}, which TLS cannot use; give an RSA or EC key")
    return key


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _load_pins(directory: Path) -> list[x509.Certificate]:
    if not directory.exists():
        return []
    if not directory.is_dir():
        raise TlsConfigError(
            f"tls.trusted_clients_dir {directory} is not a directory; fix the path"
        )
    pins = []
    for path in sorted(directory.glob("*.pem")):
        certs = _load_pem_certs("tls.trusted_clients_dir", path)
        if len(certs) != 1:
            raise TlsConfigError(
                f"tls.trusted_clients_dir {path} holds {len(certs)} certificates; "
                "pin one certificate per file with kms-admin clients trust"
            )
        pins.append(certs[0])
    return pins


def _is_valid_now(cert: x509.Certificate) -> bool:
    now = dt.datetime.now(dt.UTC)
    return cert.not_valid_before_utc <= now < cert.not_valid_after_utc


# --- The context --------------------------------------------------------------------


def _has_client_auth(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in eku


# The X509_V_ERR_* codes an operator is likely to meet, for the log.
_VERIFY_ERRORS = {
    2: "issuer certificate not found",
    7: "certificate signature failure",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate that is not pinned",
    19: "self-signed certificate in chain",
    20: "issuer not trusted (not in tls.ca and not pinned)",
    21: "unable to verify the first certificate",
    24: "invalid CA certificate",
    26: "certificate not allowed for client authentication",
}


def client_verify_callback(
    pinned_only: frozenset[str], identity_mode: str
) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:
    """The check OpenSSL runs at each depth of the client's chain, top first.

    ``pinned_only`` holds the SHA-256 fingerprints of pinned certificates
    that are not also in tls.ca: those may only ever be the leaf.
    """

    def verify(
        connection: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if not ok:
            log.warning(
                "client certificate rejected at depth %d (%s): %s",
                depth,
                _subject(cert),
                _VERIFY_ERRORS.get(errno, f"OpenSSL verify error {errno}"),
            )
            return False
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, cert)
        if depth > 0:
            if pinned_only and hashlib.sha256(der).hexdigest() in pinned_only:
                log.warning(
                    "client certificate rejected: pinned certificate %s used as an issuer; "
                    "a pinned certificate is trusted only as itself",
                    _subject(cert),
                )
                return False
            return True
        refusal = _leaf_refusal(der, identity_mode)
        if refusal is not None:
            log.warning("%s", refusal)
            return False
        return True

    return verify


def _subject(cert: crypto.X509) -> str:
    return cert.to_cryptography().subject.rfc4514_string()


@functools.lru_cache(maxsize=IDENTITY_CACHE_SIZE)
def _leaf_refusal(der: bytes, identity_mode: str) -> str | None:
    """Why a client's leaf certificate (already verified by OpenSSL) is
    refused, or None; a function of its bytes and the mode, so kept for the
    last certificates seen. Validity and trust are OpenSSL's, at every
    handshake, and are not part of it."""
    c = x509.load_der_x509_certificate(der)
    if not _has_client_auth(c):
        return f"client certificate {c.subject.rfc4514_string()} rejected: extended key usage lacks clientAuth"
    try:
        _identity_of(der, identity_mode)
    except PeerIdentityError as exc:
        return f"client certificate rejected: {exc}"
    return None


def _x509(cert: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


def build_context(tls_cfg: TlsConfig, *, kmip_suites: bool = True) -> SSL.Context:
    """A fully configured server SSL.Context; raises TlsConfigError on bad
    settings. `kmip_suites`: also offer the KMIP profile suites without
    forward secrecy (the KMIP listener only)."""
    if tls_cfg.min_version not in _MIN_VERSIONS:
        raise TlsConfigError(
            f'tls.min_version must be "1.2" or "1.3" (got {tls_cfg.min_version!r})'
        )
    if tls_cfg.identity not in _IDENTITY_MODES:
        raise TlsConfigError(
            f'tls.identity must be "cn", "subject" or "fingerprint" (got {tls_cfg.identity!r})'
        )
    cert_path = _require("tls.cert", tls_cfg.cert)
    key_path = _require("tls.key", tls_cfg.key)
    ca_path = _require("tls.ca", tls_cfg.ca)

    chain = _load_pem_certs("tls.cert", cert_path)
    leaf = chain[0]
    key = _load_key(key_path)
    if _spki(key.public_key()) != _spki(leaf.public_key()):
        raise TlsConfigError(
            f"tls.key does not match tls.cert ({key_path} vs {cert_path}); "
            "give the key the certificate was issued for"
        )
    if not _is_valid_now(leaf):
        raise TlsConfigError(
            f"tls.cert {cert_path} is not valid now (valid "
            f"{leaf.not_valid_before_utc:%Y-%m-%d} to {leaf.not_valid_after_utc:%Y-%m-%d}); "
            "renew it"
        )
    if kmip_suites and tls_cfg.min_version == "1.2" and not isinstance(key, rsa.RSAPrivateKey):
        log.warning(
            "tls.key is not RSA: clients limited to TLS_RSA_WITH_AES_128_CBC_SHA256 "
            "(vCenter 7) cannot connect"
        )

    cas = _load_pem_certs("tls.ca", ca_path)
    pins = _load_pins(tls_cfg.trusted_clients_dir)
    ca_fingerprints = {_fingerprint(c) for c in cas}
    pinned_only = frozenset(_fingerprint(p) for p in pins) - ca_fingerprints
    for pin in pins:
        if not _is_valid_now(pin):
            log.warning(
                "pinned client certificate %s is not valid now; it will be refused",
                pin.subject.rfc4514_string(),
            )

    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(_MIN_VERSIONS[tls_cfg.min_version])
    ctx.set_options(
        SSL.OP_NO_SSLv2
        | SSL.OP_NO_SSLv3
        | SSL.OP_NO_TLSv1
        | SSL.OP_NO_TLSv1_1
        | SSL.OP_NO_COMPRESSION
        | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_CIPHER_SERVER_PREFERENCE
        | SSL.OP_SINGLE_ECDH_USE
    )
    suites = TLS12_SUITES if kmip_suites else AEAD_TLS12_SUITES
    ctx.set_cipher_list(":".join(suites).encode("ascii"))
    ctx.set_tls13_ciphersuites(CIPHERS_TLS13.encode("ascii"))
    # Needed for session resumption when clients are verified.
    ctx.set_session_id(SESSION_ID_CONTEXT)

    ctx.use_certificate(leaf)
    for extra in chain[1:]:
        ctx.add_extra_chain_cert(extra)
    ctx.use_privatekey(key)
    try:
        ctx.check_privatekey()
    except SSL.Error:
        raise TlsConfigError(
            "tls.key does not match tls.cert; give the matching key"
        ) from None

    store = ctx.get_cert_store()
    assert store is not None
    seen: set[str] = set()
    for anchor in [*cas, *pins]:
        fingerprint = _fingerprint(anchor)
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        store.add_cert(_x509(anchor))
        ctx.add_client_ca(anchor)
    # Lets a pinned certificate that is not self-signed (say, issued by a
    # vCenter's own CA) be a trust anchor by itself.
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    ctx.set_verify_depth(VERIFY_DEPTH)
    ctx.set_verify(
        SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
        client_verify_callback(pinned_only, tls_cfg.identity),
    )
    log.info(
        "TLS ready: min version %s, %d CA certificate(s), %d pinned client certificate(s)",
        tls_cfg.min_version,
        len(cas),
        len(pins),
    )
    return ctx


@implementer(IOpenSSLServerConnectionCreator)
class ServerContextFactory(twisted_ssl.ContextFactory):
    """Twisted context factory for the KMIP listener.

    Works both as an old-style ``getContext()`` factory and as an
    ``IOpenSSLServerConnectionCreator``; each new connection uses the
    context current at accept time.
    """

    def __init__(self, tls_cfg: TlsConfig, *, kmip_suites: bool = True) -> None:
        self.tls_cfg = tls_cfg
        self.kmip_suites = kmip_suites
        self._context = build_context(tls_cfg, kmip_suites=kmip_suites)

    def getContext(self) -> SSL.Context:
        return self._context

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._context, None)

    def reload(self) -> None:
        """Re-read certificates and pins; on error the current context stays."""
        self._context = build_context(self.tls_cfg, kmip_suites=self.kmip_suites)


class Reloadable(Protocol):
    """A context factory that can re-read its TLS material."""

    def reload(self) -> None: ...


def reload_on_sighup(reactor: Any, factory: Reloadable, log: logging.Logger) -> Callable[[], None]:
    """Re-read `factory`'s TLS material (its ``reload()``) on SIGHUP, in the
    reactor thread; new connections use it, and a failure keeps the previous
    material and is logged. The handler is installed only from the main
    thread (where Python delivers signals). Returns the reload function."""

    def reload() -> None:
        try:
            factory.reload()
            log.info("TLS material reloaded")
        except Exception as exc:
            log.error("TLS reload failed, keeping the previous material: %s", exc)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(reload))
    return reload


def server_context_factory(tls_cfg: TlsConfig, *, kmip_suites: bool = True) -> ServerContextFactory:
    """Build a listener's TLS context factory; raises TlsConfigError.
    `kmip_suites=False` for every listener but the KMIP one."""
    return ServerContextFactory(tls_cfg, kmip_suites=kmip_suites)
