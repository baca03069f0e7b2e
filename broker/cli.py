"""`vtpm-broker`: run the broker, set it up, and administer trust.

    vtpm-broker [--config F] [run [--metrics-port P]]
    vtpm-broker [--config F] init
    vtpm-broker [--config F] check-config
    vtpm-broker [--config F] db upgrade|status
    vtpm-broker [--config F] admin token --instance NAME [--ttl S]
    vtpm-broker [--config F] admin approve|reject|revoke NAME
    vtpm-broker [--config F] admin pin NAME --cert F
    vtpm-broker [--config F] admin list [--json]
    vtpm-broker [--config F] admin status [--url URL]... [--cert F --key F --ca F]
    vtpm-broker [--config F] admin issue-user NAME --out-dir D
    vtpm-broker [--config F] admin transfer VM --to INSTANCE
    vtpm-broker [--config F] admin audit [--vm NAME|UUID] [--host H] [--since 1h] [--request-id ID] [--json]
    vtpm-broker [--config F] admin audit verify [--public-key F] [--file EXPORT]
    vtpm-broker [--config F] admin audit checkpoint
    vtpm-broker [--config F] admin audit export --to F [--force]
    vtpm-broker [--config F] ca show [--pem]
    vtpm-broker [--config F] ca import|csr|install-signed|recertify ...
    vtpm-broker [--config F] backup --out F [--force]
    vtpm-broker [--config F] restore --from F

Admin commands act on the broker's database as the security administrator
(run them on the broker host, as the broker's user). Every failure is one
line on stderr and exit status 2; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, overload

if TYPE_CHECKING:
    from kmip_core.audit.audit_key import Signer

__all__ = ["main"]

KMS_CLIENT_CN_PREFIX = "vtpm-broker-"


class CliError(Exception):
    """A one-line problem and its fix."""


def _load_signer(path: Path) -> Signer:
    """The audit signing key at `path`, which the caller found there."""
    from broker import audit_trail

    signer = audit_trail.load_signer(path)
    if signer is None:
        raise CliError(f"no audit signing key {path}; create it with 'vtpm-broker init'")
    return signer


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vtpm-broker", description="vTPM key broker")
    p.add_argument("--config", metavar="FILE", help="TOML configuration file (default: $VTPM_BROKER_CONFIG)")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    sub = p.add_subparsers(dest="command")
    run = sub.add_parser("run", help="run the broker (the default)")
    run.add_argument(
        "--metrics-port",
        type=int,
        metavar="P",
        help="serve /metrics, /healthz and /readyz on this port ([metrics] host, default 127.0.0.1; 0 picks a free port)",
    )
    sub.add_parser("init", help="create the master key, CAs, server certificate and the KMS client key and CSR")
    sub.add_parser("check-config", help="print the effective settings (secrets redacted) and any problem")
    db = sub.add_parser("db", help="the database schema (Alembic migrations)")
    dsub = db.add_subparsers(dest="db_command", required=True)
    dsub.add_parser("upgrade", help="apply this release's schema migrations (once, before starting the brokers)")
    dsub.add_parser("status", help="show the schema revision (exit 1 unless it is this release's)")

    admin = sub.add_parser("admin", help="trust administration (security administrator)")
    asub = admin.add_subparsers(dest="admin_command", required=True)
    token = asub.add_parser("token", help="issue a one-time enrollment token")
    token.add_argument("--instance", required=True, metavar="NAME", help="the management instance the token enrolls")
    token.add_argument("--ttl", type=int, default=3600, metavar="SECONDS", help="lifetime (default 3600)")
    for name, text in (
        ("approve", "approve the pending enrollment and issue the certificate"),
        ("reject", "reject the pending enrollment"),
        ("revoke", "end the instance's trust now"),
    ):
        asub.add_parser(name, help=text).add_argument("name", metavar="NAME")
    pin = asub.add_parser("pin", help="trust an instance's own certificate (exactly that one)")
    pin.add_argument("name", metavar="NAME")
    pin.add_argument("--cert", required=True, metavar="F", help="the instance's own certificate (PEM) to trust")
    listing = asub.add_parser("list", help="instances with state and last use, and hosts with their attestation status")
    listing.add_argument("--json", action="store_true", help="print the result as JSON")
    listing.add_argument(
        "--hosts", action="store_true", help="only the hosts and their attestation status (JSON: a list of hosts)"
    )
    attest = asub.add_parser("attest", help="host TPMs (host attestation, docs/attestation.md)")
    atsub = attest.add_subparsers(dest="attest_command", required=True)
    pin_ek = atsub.add_parser(
        "pin-ek", help="pin a registered host's TPM by its EK public key (from 'vtpm-host attest ek-pub')"
    )
    pin_ek.add_argument("host", metavar="HOST", help="the host's name")
    pin_ek.add_argument("--ek-pub", required=True, metavar="F", help="the host TPM's EK public key (PEM)")
    revoke_tpm = atsub.add_parser("revoke", help="stop trusting a host's TPM: its tokens are void, its quotes refused")
    revoke_tpm.add_argument("host", metavar="HOST", help="the host's name")
    attest_status = atsub.add_parser("status", help="every host's attestation status")
    attest_status.add_argument("--json", action="store_true", help="print the result as JSON")
    policy = asub.add_parser("attest-policy", help="the PCR values hosts must quote to unwrap (docs/attestation.md)")
    psub = policy.add_subparsers(dest="policy_command", required=True)

    def scope_options(command: argparse.ArgumentParser) -> None:
        group = command.add_mutually_exclusive_group(required=True)
        group.add_argument("--host", metavar="HOST", help="the policy of one host")
        group.add_argument("--instance", metavar="NAME", help="the policy of every host of a management instance")
        group.add_argument("--default", action="store_true", help="the policy of every host no other policy covers")

    capture = psub.add_parser("capture", help="take the golden PCR values from a known-good host's last verified quote")
    scope_options(capture)
    capture.add_argument(
        "--from-host", required=True, metavar="HOST", help="the known-good host (it ran 'vtpm-host attest now')"
    )
    capture.add_argument(
        "--pcrs", metavar="LIST", help="only these PCRs of its quote, such as 0-7 (default: all it quoted)"
    )
    given = psub.add_parser("set", help="set the accepted PCR values explicitly")
    scope_options(given)
    given.add_argument("--bank", default="sha256", metavar="BANK", help="the PCR bank (default sha256)")
    given.add_argument("--pcr", action="append", required=True, metavar="N=HEX", help="an accepted PCR value (repeat)")
    plist = psub.add_parser("list", help="the policies")
    plist.add_argument("--json", action="store_true", help="print the result as JSON")
    premove = psub.add_parser(
        "remove", help="remove a policy (its hosts then need none, unless [attestation] required)"
    )
    scope_options(premove)
    status = asub.add_parser(
        "status",
        help="the running broker's readiness (its [metrics] listener's /readyz), as a table; exit 1 unless ready",
    )
    status.add_argument(
        "--url",
        action="append",
        metavar="URL",
        help="a broker's monitoring listener, such as http://127.0.0.1:9102 (repeat for replicas); "
        "default: this configuration's [metrics]",
    )
    status.add_argument("--cert", metavar="F", help="client certificate, for a listener with mutual TLS")
    status.add_argument("--key", metavar="F", help="the client certificate's key")
    status.add_argument("--ca", metavar="F", help="CA of the listener's certificate (default: [metrics] ca)")
    transfer = asub.add_parser(
        "transfer", help="cold migration: release any VM to a trusted instance, which then registers it"
    )
    transfer.add_argument("vm", metavar="VM", help="VM UUID (or a name only one VM has)")
    transfer.add_argument("--to", required=True, metavar="INSTANCE", help="the trusted instance that takes the VM over")
    user = asub.add_parser("issue-user", help="issue an API user certificate (role from [roles])")
    user.add_argument("name", metavar="NAME")
    user.add_argument("--out-dir", required=True, metavar="D", help="where to write the user's key and certificate")
    audit = asub.add_parser("audit", help="list the audit trail and say whether its chain is intact; verify it")
    audit.add_argument("--vm", metavar="NAME_OR_UUID", help="records of one VM (its UUID, its keys, its .nvram)")
    audit.add_argument("--host", metavar="NAME", help="records of one host (its requests and its registration)")
    audit.add_argument("--since", metavar="TIME", help="ISO 8601 time or an age such as 1h, 7d")
    audit.add_argument(
        "--request-id",
        metavar="ID",
        help="records of one API or gateway request (its id is also in the KMS's record: kms-admin audit show "
        "--request-id ID)",
    )
    audit.add_argument("--json", action="store_true", help="one JSON object per record")
    ausub = audit.add_subparsers(dest="audit_command", metavar="COMMAND")
    verify = ausub.add_parser(
        "verify", help="check the chain and the signed checkpoints (exit 1 naming the first bad record)"
    )
    verify.add_argument(
        "--public-key", metavar="FILE", help="audit public key (PEM); default: [audit] signing_key_file or its .pub"
    )
    verify.add_argument("--file", metavar="EXPORT", help="verify an exported file instead of the database")
    ausub.add_parser("checkpoint", help="sign a checkpoint of the current head now")
    export = ausub.add_parser("export", help="write the whole trail and its checkpoints to a JSON-lines file")
    export.add_argument("--to", required=True, metavar="FILE", help="file to write (mode 0600)")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")

    bak = sub.add_parser("backup", help="write the broker's whole state to an encrypted file (brokers may serve)")
    bak.add_argument("--out", required=True, metavar="FILE", help="file to write (mode 0600)")
    bak.add_argument("--force", action="store_true", help="replace FILE if it exists")
    res = sub.add_parser("restore", help="restore a backup into a new data directory and an empty database")
    res.add_argument("--from", dest="source", required=True, metavar="FILE", help="a file 'backup' wrote")

    ca = sub.add_parser("ca", help="the vTPM EK CA")
    csub = ca.add_subparsers(dest="ca_command", required=True)
    show = csub.add_parser("show", help="the active EK CA and its history")
    show.add_argument(
        "--pem",
        action="store_true",
        help="print the active EK CA certificate (then its chain) in PEM, for verifiers of EK certificates",
    )
    imp = csub.add_parser("import", help="replace the EK CA with a third-party CA certificate and key")
    imp.add_argument("--cert", required=True, metavar="F", help="the third-party EK CA certificate (PEM)")
    imp.add_argument(
        "--key", required=True, metavar="F", help="its private key (PEM); sealed under the broker's master key"
    )
    imp.add_argument("--chain", metavar="F", help="the certificates above it, up to the root (PEM)")
    csr = csub.add_parser("csr", help="make a new EK CA key and write its CSR for a third-party CA")
    csr.add_argument("--out", required=True, metavar="F", help="where to write the EK CA's CSR")
    csr.add_argument("--subject", default="vtpm-broker EK CA", metavar="CN", help="the EK CA's common name")
    signed = csub.add_parser("install-signed", help="activate the EK CA certificate a third party signed")
    signed.add_argument("--cert", required=True, metavar="F", help="the EK CA certificate the third party signed (PEM)")
    signed.add_argument("--chain", metavar="F", help="the issuer's certificates, up to the root (PEM)")
    rec = csub.add_parser("recertify", help="re-issue a vTPM's EK certificates under the active EK CA")
    rec.add_argument("--vm", required=True, metavar="UUID", help="the VM whose vTPM EK certificates to re-issue")
    rec.add_argument("--out-dir", required=True, metavar="D", help="where to write the new certificates")
    from kmip_core import __version__, cliopts

    # --config, --log-level and --json before or after the command.
    return cliopts.conventions(
        p, version=__version__, everywhere=("--config", "--log-level"), where_defined=("--json",)
    )


def _fail(message: str) -> int:
    print(f"vtpm-broker: error: {message.splitlines()[0] if message else 'failed'}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from broker.config import ConfigError, load_config

    command = args.command or "run"
    config_path = args.config or os.environ.get("VTPM_BROKER_CONFIG")
    try:
        cfg = load_config(
            config_path,
            {"logging": {"level": args.log_level}, "metrics": {"port": getattr(args, "metrics_port", None)}},
        )
    except ConfigError as exc:
        return _fail(str(exc))
    try:
        if command == "check-config":
            return _check_config(cfg)
        if command == "run":
            return _run(cfg)
        if command == "init":
            return _init(cfg)
        if command == "db":
            return _db(cfg, args)
        if command == "admin":
            return _admin(cfg, args)
        if command == "ca":
            return _ca(cfg, args)
        if command in ("backup", "restore"):
            return _backup_restore(cfg, args)
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception as exc:  # Every failure is one line; see _describe.
        return _fail(_describe(exc))
    return _fail(f"unknown command {command}")


def _describe(exc: BaseException) -> str:
    from twisted.internet.error import CannotListenError

    if isinstance(exc, CannotListenError):
        return f"cannot listen on {exc.interface}:{exc.port} ({exc.socketError}); choose another port"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror}; check the path and permissions"
    text = str(exc) or type(exc).__name__
    known = (
        "ConfigError", "TlsConfigError", "DatabaseError", "BarrierError", "CaMissing", "PkiError",
        "InvalidRequest", "Refused", "NotFound", "Conflict", "Unprocessable", "EkCaError", "CliError",
        "CertificateRequestError", "KmsUnavailable", "SchemaError", "AuditKeyError", "BackupError",
    )  # fmt: skip
    if type(exc).__name__ in known:
        return text
    return f"{text} ({type(exc).__name__})"


# --- check-config, run -------------------------------------------------------------------


def _check_config(cfg) -> int:
    from broker.config import format_config

    print(format_config(cfg), end="")
    problems = cfg.check_files()
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 2 if problems else 0


def _logging(cfg) -> None:
    from kmip_core import logs

    logs.configure(cfg.logging.level, cfg.logging.format, cfg.broker.node_name, _log_context)


def _log_context() -> tuple[str | None, str | None]:
    """(request id, on whose behalf) of the API request this thread serves,
    for JSON log lines (the gateway's come from the dispatcher's own)."""
    from broker.request_scope import current_request_id
    from kmip_core.client import current_correlation

    request_id = current_request_id()
    if request_id is None:
        return None, None
    _, _, acting = (current_correlation() or "").partition(";")
    return request_id, acting.replace("=", ":", 1) or None


def _run(cfg) -> int:
    problems = cfg.check_files()
    if problems:
        return _fail(problems[0])
    _logging(cfg)
    from twisted.internet import reactor

    from broker import service

    root = service.build(cfg, reactor, gateway_factory=service.default_gateway_factory)
    from kmip_core.service import run_service

    failed = run_service(root, reactor, _describe)
    return _fail(failed) if failed else 0


# --- init --------------------------------------------------------------------------------


def _write_private(path: Path, data: bytes) -> None:
    from kmip_core.files import write_atomic

    write_atomic(path, data, 0o600)  # An OSError names the path: one line (_describe).


def _write_public(path: Path, data: bytes) -> None:
    from kmip_core.files import write_atomic

    write_atomic(path, data, 0o644)


def _new_rsa_key():
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _key_pem(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _open(cfg, *, create: bool = False):
    """(db, barrier) for admin commands; refuses a missing master key. The
    schema is handled as the running broker handles it (init: upgraded)."""
    from broker import schema
    from broker.db import Database, open_barrier

    if not create and not cfg.master_key.file.exists():
        raise CliError(f"master key {cfg.master_key.file} does not exist; run 'vtpm-broker init' first")
    db = Database(cfg.storage.db_url)
    try:
        schema.prepare(db, "upgrade" if create else cfg.storage.schema_mode)
        return db, open_barrier(db, cfg.master_key.file)
    except Exception:
        db.close()
        raise


def _init(cfg) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
    from cryptography.x509.oid import NameOID

    from broker import trust_ca
    from kmip_core import pki

    data_dir = cfg.broker.data_dir
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    done: list[str] = []
    if not cfg.master_key.file.exists():
        cfg.master_key.file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        pki.new_master_key(cfg.master_key.file)
        done.append(f"master key      {cfg.master_key.file} (mode 0600; back it up apart from the database)")
    db, barrier = _open(cfg, create=True)
    try:
        done.extend(_init_audit_key(cfg, db))
        try:
            ca = trust_ca.load_trust_ca(db, barrier)
        except trust_ca.CaMissing:
            ca = trust_ca.create_trust_ca(cfg.broker.provider_name)
            trust_ca.store_ca(db, barrier, trust_ca.TRUST_CA_PURPOSE, ca.cert, ca.key)
            done.append("trust CA        created (key sealed in the database)")
        _write_public(cfg.trust_ca_path, ca.cert_pem.encode("ascii"))
        done.append(f"trust CA cert   {cfg.trust_ca_path}")

        if not cfg.tls.cert.exists() or not cfg.tls.key.exists():
            key = _new_rsa_key()
            cert = ca.issue_server(list(cfg.tls.server_names), key.public_key())
            _write_private(cfg.tls.key, _key_pem(key))
            _write_public(cfg.tls.cert, cert.public_bytes(serialization.Encoding.PEM))
            names = ", ".join([*cfg.tls.server_names, "localhost", "127.0.0.1"])
            done.append(f"server cert     {cfg.tls.cert} ({names})")

        if db.get_ca("ca:ek") is None:
            from broker import vtpm_ca

            ek = vtpm_ca.EkCa.create()
            blobs = ek.to_sealed(barrier)
            db.put_ca(
                "ca:ek", blobs["cert_pem"].decode("ascii"), blobs["key_sealed"], blobs["chain_pem"].decode("ascii")
            )
            done.append("vTPM EK CA      created (key sealed in the database)")

        if not cfg.kms.key.exists():
            key = _new_rsa_key()
            _write_private(cfg.kms.key, _key_pem(key))
            done.append(f"KMS client key  {cfg.kms.key}")
        csr_path = cfg.kms_csr_path
        if not cfg.kms.cert.exists():
            key = serialization.load_pem_private_key(cfg.kms.key.read_bytes(), password=None)
            if not isinstance(key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey, dsa.DSAPrivateKey)):
                raise CliError(f"{cfg.kms.key} is a {type(key).__name__}; the KMS client key must be RSA or EC")
            cn = KMS_CLIENT_CN_PREFIX + cfg.broker.provider_name
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .sign(key, hashes.SHA256())
            )
            _write_public(csr_path, csr.public_bytes(serialization.Encoding.PEM))
        # The trail as it is now (a carried-over one included) under a signature.
        done.extend(_sign_checkpoint(cfg, db))
    finally:
        db.close()
    for line in done:
        print(line)
    if cfg.kms.cert.exists():
        print(f"KMS client cert {cfg.kms.cert} (present)")
    else:
        ca_dir = "<KMS CA directory>"
        if cfg.kms.ca is not None and (cfg.kms.ca.parent / "ca.key").exists():
            ca_dir = str(cfg.kms.ca.parent)
        print(f"KMS client CSR  {csr_path}")
        print("Have the KMS CA sign it, then start the broker:")
        print(f"  kms-admin pki sign-csr --csr {csr_path} --out {cfg.kms.cert} --ca-dir {ca_dir}")
    return 0


def _init_audit_key(cfg, db) -> list[str]:
    """The Ed25519 key that signs audit checkpoints (mode 0600) and its
    public key for the auditors, unless they exist. Brokers that share a
    database share this key, as they share the master key."""
    from broker import audit_trail

    key, public = cfg.audit.signing_key_file, cfg.audit.public_key_file
    done = []
    if not key.exists():
        recorded = audit_trail.recorded_key_id(db)
        if recorded is not None:
            raise CliError(
                f"this broker database's audit key (key id {recorded}) is not at {key}; copy it there "
                "(mode 0600) from the first broker, as with the master key, and run init again"
            )
        if public.exists():
            raise CliError(
                f"{public} exists but the audit signing key {key} does not; move {public} aside "
                "(auditors need it for older checkpoints) and run init again"
            )
        key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        verifier = audit_trail.generate_key(key, public)
        done.append(f"audit key       {key} (mode 0600), public key {public} (key id {verifier.key_id}; for auditors)")
    signer = _load_signer(key)
    audit_trail.check_key(db, signer, key)
    if not public.exists():
        _write_public(public, signer.public.pem())
        done.append(f"audit public key {public}")
    return done


# --- db ------------------------------------------------------------------------------------


def _db(cfg, args) -> int:
    """Schema migrations: no master key needed, only storage.db_url."""
    from broker import schema
    from broker.db import Database

    if cfg.storage.db_url.startswith("sqlite"):
        cfg.broker.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    db = Database(cfg.storage.db_url)
    try:
        if args.db_command == "upgrade":
            before, after = schema.upgrade(db)
            if before == after:
                print(f"{db.shown_url}: schema already at revision {after}")
            else:
                print(f"{db.shown_url}: schema upgraded from {before or 'empty'} to {after}")
                for line in _sign_checkpoint(cfg, db):
                    print(line)
            return 0
        current = schema.current_revision(db)
        head = schema.head_revision()
        print(f"database: {db.shown_url}")
        print(f"schema revision: {current or 'none (empty database)'}")
        print(f"this release needs: {head}")
        if current == head:
            return 0
        if current is None or current in schema.known_revisions():
            print("run 'vtpm-broker db upgrade' to bring it up to date")
        else:
            print("the database is newer than this release: upgrade vtpm-broker")
        return 1
    finally:
        db.close()


def _sign_checkpoint(cfg, db) -> list[str]:
    """Sign the trail's head if a key exists and the head moved: after a
    migration (0002 carries the old trail over) and at init, so that what
    is there is under a signature at once."""
    from broker import audit_trail

    if not cfg.audit.signing_key_file.exists():
        return []
    signer = _load_signer(cfg.audit.signing_key_file)
    audit_trail.check_key(db, signer, cfg.audit.signing_key_file)
    checkpoint = audit_trail.sign_checkpoint(db, signer, f"vtpm-broker-admin@{cfg.broker.node_name}")
    if checkpoint is None:
        return []
    return [f"signed audit checkpoint at record {checkpoint.seq} (key id {checkpoint.key_id})"]


# --- admin ---------------------------------------------------------------------------------


def _admin(cfg, args) -> int:
    from broker.trust import Registry
    from broker.trust_ca import load_trust_ca

    if args.admin_command == "audit":
        return _audit(cfg, args)
    if args.admin_command == "status":
        from kmip_core.metrics import print_readiness, status_url

        urls = args.url or [status_url(cfg.metrics)]
        return print_readiness("vtpm-broker", urls, cert=args.cert, key=args.key, ca=args.ca or cfg.metrics.ca)
    db, barrier = _open(cfg)
    try:
        registry = Registry(db, load_trust_ca(db, barrier), node=cfg.broker.node_name)
        cmd = args.admin_command
        if cmd == "token":
            token = registry.issue_token(args.instance, args.ttl)
            expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=args.ttl)
            print(token)
            print(
                f"one-time enrollment token for {args.instance}, valid until {expires:%Y-%m-%d %H:%M:%S} UTC",
                file=sys.stderr,
            )
        elif cmd == "approve":
            from broker.trust_ca import fingerprint

            cert = registry.approve(args.name)
            print(
                f"{args.name} is trusted; certificate sha256 {fingerprint(cert)} (the instance fetches it by polling)"
            )
        elif cmd == "reject":
            registry.reject(args.name)
            print(f"enrollment of {args.name} rejected")
        elif cmd == "revoke":
            registry.revoke(args.name)
            print(f"{args.name} is revoked: its certificate, hosts and VMs are refused from now on")
        elif cmd == "pin":
            try:
                data = Path(args.cert).read_bytes()
            except OSError as exc:
                raise CliError(f"cannot read {args.cert} ({exc.strerror}); check the path") from None
            fp = registry.pin(args.name, data)
            print(f"{args.name} is trusted with exactly the certificate sha256 {fp}")
        elif cmd == "list":
            if not args.hosts:
                _print_instances(registry.list_instances(), args.json)
            if args.hosts or not args.json:
                _print_hosts(registry.attestation_status(), args.json, heading=not args.hosts)
        elif cmd == "attest":
            return _attest(registry, args)
        elif cmd == "attest-policy":
            return _attest_policy(registry, args)
        elif cmd == "issue-user":
            return _issue_user(cfg, registry, args)
        elif cmd == "transfer":
            return _transfer(registry, args)
        return 0
    finally:
        db.close()


def _transfer(registry, args) -> int:
    """`admin transfer VM --to INSTANCE`: the administrator's release
    (Registry.release_vm), whoever owns the VM."""
    text = args.vm
    vms = registry.list_vms()
    found = [v for v in vms if v.vm_uuid == text.lower()] or [v for v in vms if v.name == text]
    if not found:
        raise CliError(f"the broker has no VM {text!r}; give its UUID ('vtpm-broker admin audit --vm' finds it)")
    if len(found) > 1:
        raise CliError(f"{len(found)} VMs are named {text!r} ({', '.join(v.vm_uuid for v in found)}); give the UUID")
    vm = found[0]
    was = vm.instance
    record = registry.release_vm(vm.vm_uuid, args.to, "local-security-admin", None)
    if record.released_to is None:
        print(f"VM {vm.name} ({vm.vm_uuid}): release cancelled; it stays with {was}")
        return 0
    print(f"VM {vm.name} ({vm.vm_uuid}) of {was} released to {args.to}; no host of {was} may unwrap it now")
    print(f"next, on {args.to}: vtpm-mgmt vm register --datastore DIR --vm {vm.vm_uuid} --host H")
    return 0


# --- admin audit (needs the database and the audit key, not the master key) -------------------


def _audit_db(cfg):
    """The database, at this release's schema (checked, never changed: an
    auditor's command writes nothing but a checkpoint)."""
    from broker import schema
    from broker.db import Database

    url = cfg.storage.db_url
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        raise CliError(f"broker database {url.removeprefix('sqlite:///')} does not exist; check --config or run init")
    db = Database(url)
    try:
        schema.check(db)
    except Exception:
        db.close()
        raise
    return db


def _audit_verifier(cfg, public_key: str | None):
    """The key that checks checkpoint signatures: --public-key, else the
    configured signing key (or its .pub beside it); None if there is none."""
    from broker import audit_trail

    if public_key is not None:
        return audit_trail.load_verifier(Path(public_key))
    if cfg.audit.signing_key_file.exists():
        return _load_signer(cfg.audit.signing_key_file).public
    if cfg.audit.public_key_file.exists():
        return audit_trail.load_verifier(cfg.audit.public_key_file)
    return None


def _audit(cfg, args) -> int:
    from broker import audit_trail
    from kmip_core.audit import chain

    if args.audit_command == "verify" and args.file is not None:
        # Offline, as kms-admin audit verify --file: the export and the public key only.
        if args.public_key is None:
            raise CliError("verifying an export needs the audit public key; add --public-key FILE")
        verifier = _audit_verifier(cfg, args.public_key)
        try:
            records, checkpoints = audit_trail.read_export(Path(args.file))
        except audit_trail.ExportError as exc:
            raise CliError(str(exc)) from None
        report = audit_trail.verify_rows(records, checkpoints, verifier)
        return chain.verdict(report, str(args.file), signatures_checked=True).emit()
    db = _audit_db(cfg)
    try:
        if args.audit_command == "checkpoint":
            if not cfg.audit.signing_key_file.exists():
                raise CliError(f"no audit signing key {cfg.audit.signing_key_file}; create it with 'vtpm-broker init'")
            signer = _load_signer(cfg.audit.signing_key_file)
            audit_trail.check_key(db, signer, cfg.audit.signing_key_file)
            checkpoint = audit_trail.sign_checkpoint(db, signer, f"vtpm-broker-admin@{cfg.broker.node_name}")
            if checkpoint is None:
                print("nothing to sign: the last checkpoint already covers the newest record (or the trail is empty)")
            else:
                print(f"signed checkpoint at record {checkpoint.seq} (key id {checkpoint.key_id})")
            return 0
        if args.audit_command == "export":
            return _audit_export(db, Path(args.to), args.force)
        verifier = _audit_verifier(cfg, getattr(args, "public_key", None))
        report = audit_trail.verify(db, verifier)
        verdict = chain.verdict(report, db.shown_url, signatures_checked=verifier is not None)
        if args.audit_command == "verify":
            # The same words and exit statuses as kms-admin audit verify.
            return verdict.emit()
        records, vm_names = _audit_listing(db, args)
    finally:
        db.close()
    if args.json:
        shown = [{**r.__dict__, "vm_name": _vm_name(r.target, vm_names), "request_id": _request_id(r)} for r in records]
        problems = [p.text for p in report.problems]
        print(json.dumps({"records": shown, "intact": report.ok, "problems": problems}, indent=2))
        return verdict.status
    for r in records:
        when = dt.datetime.fromtimestamp(r.at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        allowed = "allowed" if r.allowed else "REFUSED"
        name = _vm_name(r.target, vm_names)
        target = f"{r.target} ({name})" if name else r.target
        request = _request_id(r) or "-"
        print(f"{r.seq:6d} {when} {request:16} {r.actor:28} {r.action:14} {target:38} {allowed:8} {r.reason}")
    return verdict.emit()


def _audit_export(db, to: Path, force: bool) -> int:
    from broker import audit_trail

    if to.exists() and not force:
        raise CliError(f"{to} exists; choose another file or add --force")
    lines = list(audit_trail.export_lines(db))
    _write_private(to, ("\n".join(lines) + "\n").encode("utf-8"))
    records = sum(1 for line in lines if line.startswith('{"type": "record"'))
    print(f"wrote {to}: {records} records, {len(lines) - 1 - records} checkpoints")
    print(f"verify it offline with: vtpm-broker admin audit verify --file {to} --public-key <audit.pub>")
    return 0


def _audit_listing(db, args) -> tuple[list, dict[str, str]]:
    """The records the filters select, oldest first, and VM names by UUID."""
    from sqlalchemy import or_, select

    from broker.db import audit, vms
    from broker.trust import AuditRecord, InvalidRequest, check_vm_uuid
    from kmip_core.audit.timefilter import parse_time

    with db.read() as conn:
        vm_rows = conn.execute(select(vms.c.vm_uuid, vms.c.name, vms.c.kms_key_id)).all()
    names = {row.vm_uuid: row.name for row in vm_rows}
    query = select(audit).order_by(audit.c.seq)
    if args.since:
        try:
            query = query.where(audit.c.at >= parse_time(args.since))
        except ValueError as exc:
            raise CliError(f"--since: {exc}") from None
    if args.host:
        query = query.where(
            (audit.c.actor == f"host:{args.host}") | (audit.c.action.like("host.%") & (audit.c.target == args.host))
        )
    if args.vm:
        try:
            uuids = [check_vm_uuid(args.vm)]
        except InvalidRequest:
            uuids = [row.vm_uuid for row in vm_rows if row.name == args.vm]
            if not uuids:
                raise CliError(f"no registered VM is named {args.vm!r}; give its UUID (vtpm-mgmt vm list)") from None
        keks = [f"key:{row.kms_key_id}" for row in vm_rows if row.vm_uuid in uuids]
        conditions = [audit.c.target == u for u in uuids] + [audit.c.target.like(f"%vm:{u}") for u in uuids]
        conditions += [audit.c.target == k for k in keks] + [audit.c.target.like(f"{k} %") for k in keks]
        query = query.where(or_(*conditions))
    if args.request_id:
        # Only in the hashed body; a LIKE narrows the rows, the parsed body decides.
        query = query.where(audit.c.body.like(f"%{args.request_id.replace('%', '').replace('_', '')}%"))
    with db.read() as conn:
        rows = conn.execute(query).all()
    records = [AuditRecord(**row._mapping) for row in rows]
    if args.request_id:
        records = [r for r in records if _request_id(r) == args.request_id]
    return records, names


def _request_id(record) -> str | None:
    """The API or gateway request a record belongs to (a body field since
    issue 13; None for older records and for CLI commands)."""
    if not record.body:
        return None
    try:
        value = json.loads(record.body).get("request_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _vm_name(target: str, names: dict[str, str]) -> str | None:
    """The name of the VM a record's target names (a UUID or "... vm:UUID")."""
    uuid = target.rsplit("vm:", 1)[-1]
    return names.get(uuid)


def _print_instances(infos, as_json: bool) -> None:
    if as_json:
        print(json.dumps([i.__dict__ for i in infos], indent=2))
        return
    if not infos:
        print("no instances")
        return

    def when(ts):
        return "never" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")

    print(f"{'NAME':24} {'STATE':9} {'PIN':3} {'HOSTS':>5} {'VMS':>5} {'LAST USE (UTC)':19} FINGERPRINT")
    for i in infos:
        state = i.state + ("*" if i.pending_enrollment else "")
        pin = "yes" if i.pinned else "no"
        print(
            f"{i.name:24} {state:9} {pin:3} {i.hosts:5d} {i.vms:5d} {when(i.last_used_at):19} "
            f"{(i.cert_fingerprint or '-')[:16]}"
        )
    if any(i.pending_enrollment for i in infos):
        print("* an enrollment is waiting: vtpm-broker admin approve NAME (or reject NAME)")


def _when(ts) -> str:
    return "never" if ts is None else dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _print_hosts(rows, as_json: bool, heading: bool = False) -> None:
    """Hosts and their attestation status (`admin list`, `admin attest status`)."""
    if as_json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
        return
    if heading:
        print()
    if not rows:
        print("no hosts")
        return
    print(f"{'HOST':24} {'INSTANCE':20} {'ATTESTATION':11} {'POLICY':24} {'LAST QUOTE (UTC)':19} REASON")
    for r in rows:
        print(
            f"{r.host:24} {r.instance:20} {r.status:11} {r.policy or '-':24} {_when(r.last_quote_at):19} "
            f"{(r.last_reason or '-')[:80]}"
        )


def _read_file_arg(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read {what} {path} ({exc.strerror}); check the path") from None


def _attest(registry, args) -> int:
    if args.attest_command == "pin-ek":
        fp = registry.pin_host_ek(args.host, _read_file_arg(args.ek_pub, "the EK public key"))
        print(f"host {args.host}'s TPM is pinned (EK sha256 {fp}); next, on the host: vtpm-host attest enroll")
    elif args.attest_command == "revoke":
        registry.revoke_host_tpm(args.host)
        print(f"host {args.host}'s TPM is revoked: it unwraps nothing a policy covers until its EK is pinned again")
    else:
        _print_hosts(registry.attestation_status(), args.json)
    return 0


def _policy_scope(args) -> str:
    if args.default:
        return "default"
    return f"host:{args.host}" if args.host else f"instance:{args.instance}"


def _attest_policy(registry, args) -> int:
    from broker.trust import parse_pcr_selection

    cmd = args.policy_command
    if cmd == "list":
        policies = registry.attest_policies()
        if args.json:
            print(json.dumps([p.as_json() for p in policies], indent=2))
        elif not policies:
            print("no attestation policies: no host has to attest ([attestation] required is off)")
        for p in [] if args.json else policies:
            print(f"{p.scope}: {p.pcr_bank} PCRs {','.join(map(str, p.pcrs))}, digest {p.digest[:16]}, {p.source}")
            for index, value in p.pcrs.items():
                print(f"  {index:2d} {value}")
        return 0
    scope = _policy_scope(args)
    if cmd == "remove":
        registry.remove_attest_policy(scope)
        print(f"attestation policy {scope} removed")
        return 0
    if cmd == "capture":
        pcrs = parse_pcr_selection(f"sha256:{args.pcrs}")[1] if args.pcrs else None
        info = registry.capture_attest_policy(scope, args.from_host, pcrs)
    else:
        values = {}
        for item in args.pcr:
            index, sep, value = item.partition("=")
            if not sep:
                raise CliError(f"--pcr {item!r}: write N=HEX, such as --pcr 7=3d45...")
            values[index.strip()] = value.strip()
        info = registry.set_attest_policy(scope, args.bank, values)
    print(f"attestation policy {info.scope}: {info.pcr_bank} PCRs {','.join(map(str, info.pcrs))} ({info.source})")
    print("tokens issued under an earlier policy are void; hosts attest again at their next unwrap")
    return 0


def _issue_user(cfg, registry, args) -> int:
    from cryptography.hazmat.primitives import serialization

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _new_rsa_key()
    cert = registry.issue_user(args.name, key.public_key())
    _write_private(out / f"{args.name}.key", _key_pem(key))
    _write_public(out / f"{args.name}.pem", cert.public_bytes(serialization.Encoding.PEM))
    _write_public(out / "broker-ca.pem", registry.trust_ca.cert_pem.encode("ascii"))
    role = cfg.roles.role_of(args.name) or "none (add the name to a [roles] list)"
    print(f"{out / (args.name + '.pem')} and .key issued; role: {role}")
    return 0


# --- backup, restore (broker.backup) -------------------------------------------------------


def _backup_restore(cfg, args) -> int:
    from broker import backup
    from kmip_core.progress import Progress

    # Rows on stderr: a bar on a terminal, plain lines (start, every tenth, every 5 s) otherwise.
    label = "backing up" if args.command == "backup" else "restoring"
    progress = Progress(label, unit="rows", prefix="vtpm-broker: ", tenths=True)  # starts at the first report
    try:
        if args.command == "backup":
            done = backup.backup(cfg, Path(args.out), progress.callback(), overwrite=args.force)
        else:
            restored = backup.restore(cfg, Path(args.source), progress.callback())
    finally:
        progress.close()
    if args.command == "backup":
        rows = sum(done.rows.values())
        print(f"wrote {done.path} ({done.size} bytes): {rows} rows of {len(done.rows)} tables, files "
              f"{', '.join(done.files)}; schema revision {done.schema_revision}")  # fmt: skip
        print(f"it opens only with the master key {cfg.master_key.file}: keep that key apart from the backups")
        return 0
    rows = sum(restored.rows.values())
    print(f"restored {restored.path} (made by {restored.backup_node} at {restored.backup_created_at}) into "
          f"{restored.database}: {rows} rows, {len(restored.files)} files")  # fmt: skip
    print("start the broker with 'vtpm-broker run'; hosts and instances keep their certificates (same trust CA)")
    return 0


# --- ca (the vTPM EK CA; broker.vtpm_ca does the certificate work) -----------------------------------


def _ca(cfg, args) -> int:
    try:
        from broker import vtpm_ca
    except ImportError:
        raise CliError("broker.vtpm_ca is not installed in this build") from None
    from broker.db import ek_certificates
    from broker.service import load_ek_blobs
    from broker.trust import Registry
    from broker.vtpm_ca import EK_CA_PURPOSE

    if args.ca_command == "show" and args.pem:
        # Public certificates only: the database, no master key.
        db = _audit_db(cfg)
        try:
            row = db.get_ca(EK_CA_PURPOSE)
        finally:
            db.close()
        if row is None:
            raise CliError("the broker has no EK CA yet; run 'vtpm-broker init'")
        pem = [row.cert_pem.strip(), (row.chain_pem or "").strip()]
        print("\n".join(part for part in pem if part))
        return 0
    db, barrier = _open(cfg)
    try:
        cmd = args.ca_command
        registry = Registry(db, node=cfg.broker.node_name)

        def audit(action: str, target: str, reason: str) -> None:
            registry.record_audit("local-security-admin", action, target, True, reason)

        def store(ca, state="active") -> None:
            blobs = ca.to_sealed(barrier)
            db.put_ca(
                EK_CA_PURPOSE,
                blobs["cert_pem"].decode("ascii"),
                blobs["key_sealed"],
                blobs["chain_pem"].decode("ascii"),
                state,
            )

        @overload
        def read(path: str) -> bytes: ...

        @overload
        def read(path: None) -> None: ...

        def read(path: str | None) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise CliError(f"cannot read {path} ({exc.strerror}); check the path") from None

        if cmd == "show":
            for row in db.list_cas(EK_CA_PURPOSE):
                ca = vtpm_ca.EkCa.from_sealed(barrier, load_ek_blobs(row))
                print(f"{row.id:4d} {row.state:8} {ca.fingerprint[:16]} {ca.cert.subject.rfc4514_string()}")
            return 0
        if cmd == "import":
            ca = vtpm_ca.EkCa.import_ca(read(args.cert), read(args.key), read(args.chain))
            store(ca)
            audit("ca.import", "ca:ek", f"EK CA {ca.fingerprint}")
            print(f"EK CA replaced by {ca.cert.subject.rfc4514_string()} (sha256 {ca.fingerprint}); "
                  "existing EK certificates stay valid under the old CA")  # fmt: skip
            return 0
        if cmd == "csr":
            pending = vtpm_ca.EkCa.create(args.subject)
            store(pending, "pending")
            audit("ca.csr", "ca:ek", f"pending EK CA key {pending.fingerprint}")
            _write_public(Path(args.out), pending.make_csr())
            print(
                f"CSR for a new EK CA key written to {args.out}; after signing: vtpm-broker ca install-signed --cert F"
            )
            return 0
        if cmd == "install-signed":
            row = db.get_ca(EK_CA_PURPOSE, "pending")
            if row is None:
                raise CliError("no EK CA key is waiting for a signature; run 'vtpm-broker ca csr --out F' first")
            pending = vtpm_ca.EkCa.from_sealed(barrier, load_ek_blobs(row))
            ca = pending.install_signed(read(args.cert), read(args.chain))
            store(ca)
            audit("ca.install-signed", "ca:ek", f"EK CA {ca.fingerprint}")
            print(f"EK CA is now {ca.cert.subject.rfc4514_string()} (sha256 {ca.fingerprint})")
            return 0
        if cmd == "recertify":
            return _recertify(db, barrier, vtpm_ca, ek_certificates, args, audit)
        return 2
    finally:
        db.close()


# Where swtpm_setup (0.7.1) keeps each certificate (docs/vtpm-ca.md), for the
# operator's tpm2_nvwrite; unknown for other key sizes and curves.
_NV_INDEX = {("ek", "rsa", 2048): 0x01C00002, ("ek", "ecc", "secp256r1"): 0x01C0000A,
             ("ek", "ecc", "secp384r1"): 0x01C00016, ("platform", "rsa", 2048): 0x01C08000}  # fmt: skip


def _recertify(db, barrier, vtpm_ca, ek_certificates, args, audit) -> int:
    """Re-issue the newest certificate of each kind (type and key type: a
    vTPM has an RSA and an ECC EK, each with its own certificate) under the
    active EK CA; write <type>-<key type>.cert (DER) into --out-dir."""
    import time

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from sqlalchemy import select

    from broker.service import load_ek_blobs
    from broker.trust import check_vm_uuid
    from broker.vtpm_ca import EK_CA_PURPOSE

    vm_uuid = check_vm_uuid(args.vm)
    ca = vtpm_ca.EkCa.from_sealed(barrier, load_ek_blobs(db.get_ca(EK_CA_PURPOSE)))
    issuers = [x509.load_pem_x509_certificate(r.cert_pem.encode()) for r in db.list_cas(EK_CA_PURPOSE)]
    with db.read() as conn:
        rows = conn.execute(
            select(ek_certificates).where(ek_certificates.c.vm_uuid == vm_uuid).order_by(ek_certificates.c.id)
        ).all()
    latest = {}
    for row in rows:
        info = vtpm_ca.read_ek_certificate(row.cert_der)
        latest[(info.cert_type, info.key_type)] = (row, info)
    if not latest:
        raise CliError(f"the broker issued no EK certificate for VM {vm_uuid}; nothing to re-certify")
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for (cert_type, key_type), (row, info) in sorted(latest.items()):
        der = vtpm_ca.recertify(ca, row.cert_der, issued_by=issuers)
        with db.begin() as conn:
            conn.execute(
                ek_certificates.insert().values(
                    vm_uuid=vm_uuid,
                    cert_type=cert_type,
                    cert_der=der,
                    ca_fingerprint=ca.fingerprint,
                    issued_to="recertify",
                    issued_at=time.time(),
                )
            )
        path = out / f"{cert_type}-{key_type}.cert"
        _write_public(path, der)
        audit("ek.recertify", vm_uuid, f"{cert_type} {key_type} certificate under EK CA {ca.fingerprint}")
        key = serialization.load_pem_public_key(info.public_key_pem)
        size = (
            key.curve.name
            if isinstance(key, ec.EllipticCurvePublicKey)
            else key.key_size
            if isinstance(key, rsa.RSAPublicKey)
            else None
        )
        index = _NV_INDEX.get((cert_type, key_type, size))
        where = f" (swtpm_setup's NV index {index:#010x})" if index else ""
        print(f"{path}: {cert_type} certificate of the {key_type} EK re-issued under "
              f"{ca.cert.subject.rfc4514_string()}{where}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
