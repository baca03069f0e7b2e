"""``kms-admin``: operator commands for kms_server.

Each command group is added by a ``register_<group>(subparsers)`` function
listed in :data:`COMMAND_GROUPS`; a new group is one function and one entry
there. A command's handler receives the parsed arguments and returns an exit
status. Expected failures (bad input, missing files, PKI and configuration
problems) become one line on stderr, ``kms-admin: error: <problem>; <fix>``,
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from kmip_core import __version__, cliopts, pki
from kmip_core.config import ConfigError
from kms_server.admin import integrity_cli
from kms_server.admin.audit_cli import register_audit
from kms_server.admin.backup_cli import register_backup

# In a module of its own (not here) so that the command modules raise the
# very class main() catches, also when this module runs as __main__; none
# of them imports this module.
from kms_server.admin.errors import CommandError
from kms_server.config import load_config

__all__ = [
    "COMMAND_GROUPS",
    "CommandError",
    "build_parser",
    "main",
    "register_clients",
    "register_master_key",
    "register_pki",
]

PROG = "kms-admin"
EXIT_USAGE = 2
DEFAULT_CA_DIR = "certs/dev"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line that says the fix."""

    # Set by build_parser: callers add command groups to it.
    subparsers: argparse._SubParsersAction[_Parser]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message}; see '{self.prog} --help'\n")


def _out(line: str) -> None:
    print(line, flush=True)


# --- pki ----------------------------------------------------------------------------


def _pki_init(args: argparse.Namespace) -> int:
    result = pki.init_pki(
        args.dir,
        server_names=args.server_name,
        clients=args.client,
        key_type=args.key_type,
        force=args.force,
    )
    for path in result.written:
        _out(f"wrote {path}")
    for path in result.kept:
        _out(f"kept {path} (exists)")
    if not result.written:
        _out(
            "nothing to do: every file exists (use --force to re-issue server and clients)"
        )
    return 0


def _pki_issue_client(args: argparse.Namespace) -> int:
    cert_path, key_path = pki.issue_client(
        args.dir, args.name, key_type=args.key_type, force=args.force
    )
    _out(f"wrote {cert_path}")
    _out(f"wrote {key_path}")
    return 0


def _pki_sign_csr(args: argparse.Namespace) -> int:
    cert = pki.sign_csr(
        args.ca_dir, args.csr, args.out, days=args.days, force=args.force
    )
    _out(f"wrote {args.out} for {cert.subject.rfc4514_string()}")
    _out(f"  valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    _out(f"  sha256 fingerprint {pki.fingerprint_sha256(cert)}")
    return 0


def register_pki(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "pki", help="development PKI: CA, server and client certificates"
    )
    commands = group.add_subparsers(
        dest="pki_command", metavar="COMMAND", required=True
    )

    init = commands.add_parser(
        "init",
        help="create a CA, a server certificate and client certificates",
        description="Create DIR/ca.pem, server.pem and <client>.pem with their keys. "
        "An existing CA is reused and existing certificates are kept, so this can be "
        "run again to add clients.",
    )
    init.add_argument(
        "--dir", required=True, type=Path, help="directory for the PKI files"
    )
    init.add_argument(
        "--server-name",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name or IP address of the server (repeatable; the first becomes the CN; "
        "localhost and 127.0.0.1 are always added)",
    )
    init.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME",
        help="client to issue (repeatable)",
    )
    init.add_argument(
        "--key-type",
        choices=("rsa", "ec"),
        default="rsa",
        help="rsa (default; 2048-bit, needed by vCenter 7's TLS_RSA suite) or ec (P-256)",
    )
    init.add_argument(
        "--force",
        action="store_true",
        help="re-issue existing server and client certificates",
    )
    init.set_defaults(func=_pki_init)

    issue = commands.add_parser(
        "issue-client", help="issue one client certificate from DIR's CA"
    )
    issue.add_argument(
        "--dir", required=True, type=Path, help="PKI directory (with ca.pem)"
    )
    issue.add_argument(
        "--name", required=True, help="client name: the certificate's CN"
    )
    issue.add_argument("--key-type", choices=("rsa", "ec"), default="rsa", help="rsa (default, 2048-bit) or ec (P-256)")
    issue.add_argument(
        "--force", action="store_true", help="replace an existing certificate"
    )
    issue.set_defaults(func=_pki_issue_client)

    sign = commands.add_parser(
        "sign-csr",
        help="issue a client certificate for a certificate signing request",
        description="Sign a CSR with the development CA: subject and subject "
        "alternative names are copied, usage is always clientAuth only.",
    )
    sign.add_argument("--csr", required=True, type=Path, help="CSR file (PEM or DER)")
    sign.add_argument(
        "--out", required=True, type=Path, help="where to write the certificate"
    )
    sign.add_argument(
        "--ca-dir",
        type=Path,
        default=Path(DEFAULT_CA_DIR),
        help=f"PKI directory with ca.pem and ca.key (default {DEFAULT_CA_DIR})",
    )
    sign.add_argument(
        "--days",
        type=int,
        default=pki.LEAF_DAYS,
        help=f"validity (default {pki.LEAF_DAYS})",
    )
    sign.add_argument(
        "--force", action="store_true", help="overwrite --out if it exists"
    )
    sign.set_defaults(func=_pki_sign_csr)


# --- clients --------------------------------------------------------------------------


def _trusted_dir(args: argparse.Namespace) -> Path:
    # Pinning touches no key material, so a config without [master_key]
    # (or no config at all: defaults under ./var) is enough.
    cfg = load_config(args.config, require_master_key=False)
    return cfg.tls.trusted_clients_dir


def _clients_trust(args: argparse.Namespace) -> int:
    trusted_dir = _trusted_dir(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pki.PkiWarning)
        fingerprint = pki.trust_client_cert(args.cert, trusted_dir)
    for warning in caught:
        print(f"{PROG}: warning: {warning.message}", file=sys.stderr)
    _out(f"trusted {fingerprint}")
    _out(f"wrote {trusted_dir / (fingerprint + '.pem')}")
    _out("running servers pick this up on reload or restart")
    return 0


def _clients_list(args: argparse.Namespace) -> int:
    trusted_dir = _trusted_dir(args)
    entries = pki.list_trusted(trusted_dir)
    if not entries:
        _out(f"no trusted client certificates in {trusted_dir}")
        return 0
    for entry in entries:
        _out(
            f"{entry.fingerprint_sha256}  until {entry.not_valid_after:%Y-%m-%d}  {entry.subject}"
        )
    return 0


def _clients_untrust(args: argparse.Namespace) -> int:
    path = pki.untrust(args.fingerprint, _trusted_dir(args))
    _out(f"removed {path}")
    return 0


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help="server config file (tls.trusted_clients_dir is used; default ./var/trusted-clients)",
    )


def register_clients(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("clients", help="pinned client certificates")
    commands = group.add_subparsers(
        dest="clients_command", metavar="COMMAND", required=True
    )

    trust = commands.add_parser(
        "trust", help="pin a client certificate: exactly this certificate is accepted"
    )
    trust.add_argument("cert", type=Path, help="client certificate (PEM or DER)")
    _add_config_option(trust)
    trust.set_defaults(func=_clients_trust)

    listing = commands.add_parser("list", help="list pinned client certificates")
    _add_config_option(listing)
    listing.set_defaults(func=_clients_list)

    untrust = commands.add_parser("untrust", help="remove a pinned client certificate")
    untrust.add_argument(
        "fingerprint", help="SHA-256 fingerprint as shown by 'clients list'"
    )
    _add_config_option(untrust)
    untrust.set_defaults(func=_clients_untrust)


# --- master-key -----------------------------------------------------------------------


_PKCS11_OPTIONS = ("pkcs11_module", "token_label", "key_label", "pin_file")


def _master_key_new(args: argparse.Namespace) -> int:
    token = [name for name in _PKCS11_OPTIONS if getattr(args, name) is not None]
    if token:
        if args.out is not None:
            raise CommandError("--out writes a key file, --pkcs11-module makes the key in a token; give one of them")
        missing = [name for name in _PKCS11_OPTIONS if getattr(args, name) is None]
        if missing:
            flags = ", ".join("--" + name.replace("_", "-") for name in missing)
            raise CommandError(f"a key in a token needs {flags} too; see 'kms-admin master-key new --help'")
        return _master_key_new_in_token(args)
    if args.out is None:
        raise CommandError(
            "give --out FILE for a key file, or --pkcs11-module, --token-label, --key-label and --pin-file "
            "for a key made in a token"
        )
    path = pki.new_master_key(args.out)
    _out(f"wrote {path} (mode 0600; back it up: without it stored keys cannot be read)")
    return 0


def _master_key_new_in_token(args: argparse.Namespace) -> int:
    from kmip_core.sealing.master_key import MasterKeyError

    try:
        from kmip_core.sealing import pkcs11_key
    except ModuleNotFoundError as exc:
        if exc.name != "pkcs11":
            raise
        raise CommandError("python-pkcs11 is not installed; run: pip install 'python-pkcs11>=0.9'") from None
    try:
        key = pkcs11_key.generate_token_key(args)
    except MasterKeyError as exc:
        raise CommandError(str(exc)) from None
    try:
        _out(f"generated {key.description}: AES-256, sensitive, not extractable (id {key.key_id})")
    finally:
        key.close()
    _out("set in [master_key]:")
    _out(f'  pkcs11_module = "{args.pkcs11_module}"')
    _out(f'  token_label = "{args.token_label}"')
    _out(f'  key_label = "{args.key_label}"')
    _out(f'  pin_file = "{args.pin_file}"')
    _out("the key never leaves the token: back the token up as its vendor says, or stored keys are lost with it")
    return 0


def register_master_key(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "master-key", help="the master key that wraps keys at rest"
    )
    commands = group.add_subparsers(
        dest="master_key_command", metavar="COMMAND", required=True
    )
    new = commands.add_parser(
        "new", help="write a new random 256-bit master key file, or generate the key in a PKCS#11 token"
    )
    new.add_argument("--out", type=Path, help="key file to create (never overwritten)")
    hsm = new.add_argument_group("a key in a PKCS#11 token (docs/hsm-master-key.md)")
    hsm.add_argument("--pkcs11-module", type=Path, help="the token's PKCS#11 library")
    hsm.add_argument("--token-label", help="label of the token")
    hsm.add_argument("--key-label", help="label of the new key (an existing key is never replaced)")
    hsm.add_argument("--pin-file", type=Path, help="file holding the token's user PIN")
    new.set_defaults(func=_master_key_new)
    rotate = commands.add_parser(
        "rotate",
        help="re-seal every object under a new data key and wrap the keyring under a new master key, while nodes serve",
    )
    integrity_cli.add_rotate_arguments(rotate)
    rotate.set_defaults(func=integrity_cli.master_key_rotate)


# --- credentials ----------------------------------------------------------------------


def _credentials_file(args: argparse.Namespace) -> Path:
    cfg = load_config(args.config, require_master_key=False)
    return cfg.access.credentials_file


def _load_users(path: Path):
    """The credentials file (users and the certificates bound to them)."""
    from kms_server import credentials

    if not path.exists():
        return credentials.CredentialsFile()
    try:
        return credentials.load_file(path)
    except credentials.CredentialsError as exc:
        raise CommandError(str(exc)) from None


def _credentials_set(args: argparse.Namespace) -> int:
    from kms_server import credentials

    try:
        password = args.password_file.read_text().rstrip("\r\n")
    except OSError as exc:
        raise CommandError(f"cannot read {args.password_file} ({exc.strerror}); give a readable --password-file") from None
    if len(password) < 12:
        raise CommandError(f"the password in {args.password_file} is shorter than 12 characters; use a longer one")
    if not args.username or any(c in args.username for c in '"\\\n'):
        raise CommandError("the username must be non-empty and hold no quotes, backslashes or newlines")
    path = _credentials_file(args)
    known = _load_users(path)
    known.users[args.username] = credentials.hash_password(password)
    if args.client:
        known.clients[args.username] = list(dict.fromkeys(args.client))
    credentials.save(path, known.users, known.clients)
    bound = known.clients.get(args.username) or [args.username]
    _out(
        f"stored an Argon2id hash for {args.username!r} in {path}; "
        f"accepted only from the certificate identities {', '.join(map(repr, bound))}"
    )
    return 0


def _credentials_remove(args: argparse.Namespace) -> int:
    from kms_server import credentials

    path = _credentials_file(args)
    known = _load_users(path)
    if known.users.pop(args.username, None) is None:
        raise CommandError(f"no user {args.username!r} in {path}; 'kms-admin credentials list' shows them")
    known.clients.pop(args.username, None)
    credentials.save(path, known.users, known.clients)
    _out(f"removed {args.username!r} from {path}")
    return 0


def _credentials_list(args: argparse.Namespace) -> int:
    known = _load_users(_credentials_file(args))
    for name in sorted(known.users):
        _out(f"{name}\tclients: {', '.join(known.clients.get(name) or [name])}")
    return 0


def register_credentials(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser(
        "credentials", help="KMIP username/password credentials (access.require_credential)"
    )
    commands = group.add_subparsers(dest="credentials_command", metavar="COMMAND", required=True)
    set_ = commands.add_parser("set", help="add a user or change its password (stored as an Argon2id hash)")
    set_.add_argument("username")
    set_.add_argument("--password-file", required=True, type=Path, help="file holding the password")
    set_.add_argument(
        "--client",
        action="append",
        metavar="IDENTITY",
        help="certificate identity that may present this password (repeatable; "
        "default: kept as before, or only a certificate whose identity is the username)",
    )
    set_.add_argument("--config", help="kms-server configuration file (for access.credentials_file)")
    set_.set_defaults(func=_credentials_set)
    remove = commands.add_parser("remove", help="remove a user")
    remove.add_argument("username")
    remove.add_argument("--config", help="kms-server configuration file (for access.credentials_file)")
    remove.set_defaults(func=_credentials_remove)
    list_ = commands.add_parser("list", help="list usernames")
    list_.add_argument("--config", help="kms-server configuration file (for access.credentials_file)")
    list_.set_defaults(func=_credentials_list)


# --- db -------------------------------------------------------------------------------


def _db_engine(args: argparse.Namespace):
    from kmip_core.db.engine import DatabaseUrlError, open_engine, parse_db_url

    overrides = {"storage": {"db_url": args.db_url}} if getattr(args, "db_url", None) else None
    cfg = load_config(args.config, overrides, require_master_key=False)
    url = cfg.storage.db_url
    if url.startswith("memory:"):
        raise CommandError("the in-memory store has no schema; give a sqlite:// or postgresql:// --db-url")
    try:
        parsed, shown = parse_db_url(url)
    except DatabaseUrlError as exc:
        raise CommandError(str(exc)) from None
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None  # parse_db_url refuses a SQLite URL without a file
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return open_engine(parsed), shown


def _db_upgrade(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from kms_server.storage import schema

    engine, shown = _db_engine(args)
    try:
        before, after = schema.upgrade(engine)
    except schema.SchemaError as exc:
        raise CommandError(str(exc)) from None
    except SQLAlchemyError as exc:
        first = (str(getattr(exc, "orig", exc)).splitlines() or ["?"])[0]
        raise CommandError(f"cannot upgrade {shown}: {first}; check --db-url and that the database is reachable") from None
    finally:
        engine.dispose()
    if before == after:
        _out(f"{shown}: schema already at revision {after}")
    else:
        _out(f"{shown}: schema upgraded from {before or 'empty'} to {after}")
    return 0


def _db_status(args: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from kms_server.storage import schema

    engine, shown = _db_engine(args)
    try:
        current = schema.current_revision(engine)
    except SQLAlchemyError as exc:
        first = (str(getattr(exc, "orig", exc)).splitlines() or ["?"])[0]
        raise CommandError(f"cannot read {shown}: {first}; check --db-url and that the database is reachable") from None
    finally:
        engine.dispose()
    head = schema.head_revision()
    _out(f"database: {shown}")
    _out(f"schema revision: {current or 'none (empty database)'}")
    _out(f"this release needs: {head}")
    if current != head:
        _out("run 'kms-admin db upgrade' to bring it up to date" if current in schema.known_revisions() or current is None
             else "the database is newer than this release: upgrade kms-server")
        return 1
    return 0


def _cluster_status(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.table import Table
    from sqlalchemy.exc import SQLAlchemyError

    from kms_server import cluster

    engine, shown = _db_engine(args)
    try:
        records = cluster.nodes(engine)
        role = cluster.database_role(engine)
    except SQLAlchemyError as exc:
        first = (str(getattr(exc, "orig", exc)).splitlines() or ["?"])[0]
        raise CommandError(f"cannot read {shown}: {first}; check --db-url and run 'kms-admin db upgrade'") from None
    finally:
        engine.dispose()
    now = time.time()
    console = Console()
    table = Table(title=f"KMS nodes (seen in the last {int(cluster.RECENT_SECONDS)} s)")
    for column in ("node", "address", "version", "pid", "up since", "last seen"):
        table.add_column(column)
    recent = [r for r in records if now - r.last_seen <= cluster.RECENT_SECONDS]
    for r in recent:
        table.add_row(
            r.name, r.address, r.version, str(r.pid),
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.started_at)), f"{now - r.last_seen:.0f} s ago",
        )
    console.print(table)
    gone = [r.name for r in records if now - r.last_seen > cluster.RECENT_SECONDS]
    if gone:
        console.print(f"not seen recently: {', '.join(gone)}")
    console.print(f"database: {shown} ({role.backend} {role.server_version}, {role.role})")
    if role.backend == "postgresql" and role.role == "primary":
        standbys = Table(title="standbys")
        for column in ("name", "address", "state", "sync", "replay lag", "behind (bytes)"):
            standbys.add_column(column)
        for sb in role.standbys:
            lag = "-" if sb.replay_lag_seconds is None else f"{sb.replay_lag_seconds:.3f} s"
            standbys.add_row(sb.application_name, sb.client_addr, sb.state, sb.sync_state, lag,
                             "-" if sb.lag_bytes is None else str(sb.lag_bytes))
        if role.standbys:
            console.print(standbys)
        else:
            console.print("standbys: none connected (no replication: an acknowledged key lives on this server only)")
    from kms_server.metrics import print_node_readiness

    return print_node_readiness(args, console)


def register_cluster(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("cluster", help="the nodes and the database of a cluster")
    commands = group.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    status = commands.add_parser(
        "status", help="nodes seen recently, database primary and standbys, replication lag, each node's readiness"
    )
    status.add_argument("--config", help="kms-server configuration file (for storage.db_url and [metrics])")
    status.add_argument("--db-url", help="database URL (overrides the configuration)")
    from kms_server.metrics import add_status_arguments

    add_status_arguments(status)
    status.set_defaults(func=_cluster_status)


def register_db(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("db", help="database schema (Alembic migrations)")
    commands = group.add_subparsers(dest="db_command", metavar="COMMAND", required=True)
    for name, func, text in (
        ("upgrade", _db_upgrade, "apply the schema migrations this release has"),
        ("status", _db_status, "show the schema revision (exit 1 unless current)"),
    ):
        cmd = commands.add_parser(name, help=text)
        cmd.add_argument("--config", help="kms-server configuration file (for storage.db_url)")
        cmd.add_argument("--db-url", help="database URL (overrides the configuration)")
        cmd.set_defaults(func=func)
    verify = commands.add_parser(
        "verify",
        help="check every object row's MAC and the store digest (exit 1 naming each object that fails)",
    )
    verify.add_argument("--config", help="kms-server configuration file (storage and master key)")
    verify.add_argument("--db-url", help="database URL (overrides the configuration)")
    integrity_cli.add_verify_arguments(verify)
    verify.set_defaults(func=integrity_cli.db_verify)


# --- assembly ------------------------------------------------------------------------

CommandGroup = Callable[[argparse._SubParsersAction], None]

# Add a command group by appending its register function here.
COMMAND_GROUPS: list[CommandGroup] = [
    register_pki,
    register_clients,
    register_master_key,
    register_credentials,
    register_db,
    register_cluster,
    register_backup,
    register_audit,
]


def build_parser(
    groups: Sequence[CommandGroup] | None = None,
) -> argparse.ArgumentParser:
    """The kms-admin parser; ``parser.subparsers`` lets callers add groups."""
    parser = _Parser(prog=PROG, description="Administer a kms_server KMIP key server.")
    subparsers = parser.add_subparsers(dest="group", metavar="GROUP", required=True)
    for register in COMMAND_GROUPS if groups is None else groups:
        register(subparsers)
    parser.subparsers = subparsers
    # --config, --json and --log-level before or after the command (kmip_core.cliopts).
    return cliopts.conventions(parser, version=__version__, where_defined=("--config", "--json"), log_level=True)


def _os_error_line(exc: OSError) -> str:
    target = f" {exc.filename}" if exc.filename else ""
    reason = exc.strerror or str(exc)
    return f"cannot access{target} ({reason}); check the path and its permissions"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except (pki.PkiError, ConfigError, CommandError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"{PROG}: error: {_os_error_line(exc)}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
