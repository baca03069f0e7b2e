"""Server configuration: one TOML file, validated once into frozen dataclasses.

Precedence is defaults < file < command-line overrides. Secrets (TLS key,
master key, passphrase, credentials) are given as file paths only; this
module never reads their contents. Whether the named files exist is checked
separately by :meth:`Config.check_files`, so ``--check-config`` can report
every problem at once instead of stopping at the first.

Relative paths written in the file are resolved against the directory of the
file, so a deployment directory works from any working directory. Relative
paths given as overrides (command-line flags) are resolved against the
current working directory, as a shell user expects. Defaults that are paths
(``data_dir`` and what derives from it) follow the file when there is one,
and the working directory otherwise.
"""

from __future__ import annotations

import difflib
import json
import os
import socket
import stat
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DERIVED",
    "AccessConfig",
    "AuditConfig",
    "Config",
    "ConfigError",
    "LoggingConfig",
    "MasterKeyConfig",
    "Required",
    "Schema",
    "ServerConfig",
    "StorageConfig",
    "TlsConfig",
    "check_shape",
    "format_config",
    "format_settings",
    "load_config",
    "merge_sources",
]


class ConfigError(ValueError):
    """A configuration problem, with a one-line message naming key and fix."""


IDENTITY_MODES = ("cn", "subject", "fingerprint")
TLS_VERSIONS = ("1.2", "1.3")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Keys whose value names a file holding a secret; shown as paths, never read.
SECRET_FILE_KEYS = frozenset(
    {
        ("tls", "key"),
        ("master_key", "file"),
        ("master_key", "passphrase_file"),
        ("master_key", "pin_file"),
        ("access", "credentials_file"),
        ("audit", "signing_key_file"),
    }
)


@dataclass(frozen=True)
class ServerConfig:
    host: str
    port: int
    node_name: str
    max_message_size: int
    idle_timeout: float
    handshake_timeout: float
    max_connections: int
    worker_threads: int
    data_dir: Path
    # TLS handshakes in progress (the oldest is dropped for a newcomer),
    # the deadline for a whole request message once its first byte came,
    # and the caps on response bytes written and not yet sent, per
    # connection and for the node: past them the client is not read.
    max_handshakes: int = 256
    frame_timeout: float = 30.0
    max_unsent_bytes: int = 4 << 20
    max_unsent_bytes_total: int = 256 << 20


@dataclass(frozen=True)
class TlsConfig:
    cert: Path | None
    key: Path | None
    ca: Path | None
    trusted_clients_dir: Path
    identity: str
    min_version: str


@dataclass(frozen=True)
class StorageConfig:
    db_url: str
    # "auto": apply migrations on SQLite (single node), only check on
    # PostgreSQL (a cluster upgrades with `kms-admin db upgrade`).
    schema: str = "auto"
    # How long a request waits for the database to come back (failover)
    # before it is answered GENERAL_FAILURE.
    retry_seconds: float = 15.0
    # Every this many seconds a node checks every object row and the store
    # digest (keystore/row_auth.py) while it serves; 0 turns it off.
    integrity_check_seconds: int = 3600

    @property
    def schema_mode(self) -> str:
        if self.schema != "auto":
            return self.schema
        return "upgrade" if self.db_url.startswith("sqlite") else "check"


@dataclass(frozen=True)
class MasterKeyConfig:
    file: Path | None
    passphrase_file: Path | None
    # A PKCS#11 token holds the key instead (docs/hsm-master-key.md).
    pkcs11_module: Path | None = None
    token_label: str | None = None
    key_label: str | None = None
    pin_file: Path | None = None


@dataclass(frozen=True)
class AccessConfig:
    administrators: tuple[str, ...]
    no_crypto_administrators: tuple[str, ...]
    auditors: tuple[str, ...]
    require_credential: bool
    credentials_file: Path


@dataclass(frozen=True)
class LoggingConfig:
    level: str


@dataclass(frozen=True)
class AuditConfig:
    """The audit trail (docs/audit-trail.md). `enabled = false` exists to
    measure what auditing costs; a production node keeps it on."""

    enabled: bool = True
    # Ed25519 key that signs checkpoints (kms-admin audit key new).
    signing_key_file: Path | None = None
    checkpoint_seconds: float = 60.0
    # SIEM sinks, fed after commit: a JSON-lines file, and syslog (RFC 5424)
    # at udp://host:port or tcp://host:port.
    jsonl_file: Path | None = None
    syslog: str | None = None
    # The security team's HTTPS page (mutual TLS, auditors and
    # administrators); off unless web_port is set (0: any free port).
    web_host: str = "127.0.0.1"
    web_port: int | None = None
    # Connections to the page at once (counted after TLS).
    web_max_connections: int = 64


SECTION_ORDER = ("server", "tls", "storage", "master_key", "access", "logging", "audit")


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    tls: TlsConfig
    storage: StorageConfig
    master_key: MasterKeyConfig
    access: AccessConfig
    logging: LoggingConfig
    audit: AuditConfig = field(default_factory=AuditConfig)
    source: Path | None = field(default=None, compare=False)

    def redacted(self) -> dict[str, dict[str, Any]]:
        """Effective settings as plain values (paths as strings, tuples as lists).

        No secret value is ever held in a Config, only paths to secret files,
        so nothing is removed here; the name says what callers may rely on:
        the result is safe to print or log. Unset optional paths are None.
        """
        out: dict[str, dict[str, Any]] = {}
        for section in SECTION_ORDER:
            obj = getattr(self, section)
            out[section] = {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
        out["storage"]["db_url"] = _redact_url(self.storage.db_url)
        return out

    def check_files(self) -> list[str]:
        """Problems with the files the settings name, one line each.

        Only metadata is looked at (existence, type, permissions); secret
        files are never opened.
        """
        problems: list[str] = []
        data_dir = self.server.data_dir
        if data_dir.exists() and not data_dir.is_dir():
            problems.append(
                f"server.data_dir {data_dir} exists but is not a directory; "
                "point it at a directory"
            )
        for key, path in (
            ("tls.cert", self.tls.cert),
            ("tls.key", self.tls.key),
            ("tls.ca", self.tls.ca),
        ):
            if path is None:
                problems.append(
                    f'{key} is not set; add {key.split(".")[1]} = "<path>" to [tls] '
                    "(kms-admin pki init creates a development set)"
                )
            else:
                problems.extend(_check_file(key, path, secret=(key == "tls.key")))
        trusted = self.tls.trusted_clients_dir
        if trusted.exists() and not trusted.is_dir():
            problems.append(
                f"tls.trusted_clients_dir {trusted} is not a directory; "
                "point it at a directory (it may be absent)"
            )
        if self.master_key.file is not None:
            problems.extend(
                _check_file("master_key.file", self.master_key.file, secret=True)
            )
        if self.master_key.passphrase_file is not None:
            problems.extend(
                _check_file(
                    "master_key.passphrase_file",
                    self.master_key.passphrase_file,
                    secret=True,
                )
            )
        if self.master_key.pkcs11_module is not None:
            problems.extend(
                _check_file("master_key.pkcs11_module", self.master_key.pkcs11_module, secret=False)
            )
        if self.master_key.pin_file is not None:
            problems.extend(_check_file("master_key.pin_file", self.master_key.pin_file, secret=True))
        if self.access.require_credential or self.access.credentials_file.exists():
            problems.extend(
                _check_file(
                    "access.credentials_file", self.access.credentials_file, secret=True
                )
            )
        if self.audit.signing_key_file is not None:
            problems.extend(
                _check_file("audit.signing_key_file", self.audit.signing_key_file, secret=True)
            )
        return problems


def _check_file(key: str, path: Path, *, secret: bool) -> list[str]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return [f"{key} {path} does not exist; create it or fix the path"]
    except OSError as exc:
        return [
            f"{key} {path} cannot be examined ({exc.strerror}); fix the path or permissions"
        ]
    if not stat.S_ISREG(st.st_mode):
        return [f"{key} {path} is not a regular file; point it at a file"]
    if not os.access(path, os.R_OK):
        return [
            f"{key} {path} is not readable by this user; fix its owner or permissions"
        ]
    if secret and st.st_mode & 0o007:
        return [f"{key} {path} is accessible by other users; run: chmod 600 {path}"]
    return []


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def _redact_url(url: str) -> str:
    # Passwords are refused at load time; this is defence in depth for logs.
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


# --- Loading -----------------------------------------------------------------


class _Source:
    """Where a raw value came from, which decides how relative paths resolve."""

    def __init__(self, base: Path, origin: str) -> None:
        self.base = base
        self.origin = origin


_Validator = Callable[[str, Any, _Source], Any]


def _fail(key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"config: {key} must be {expected} (got {value!r})")


def _int_between(lo: int, hi: int) -> _Validator:
    def check(key: str, value: Any, src: _Source) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not lo <= value <= hi
        ):
            raise _fail(key, f"an integer between {lo} and {hi}", value)
        return value

    return check


def _positive_seconds(maximum: float) -> _Validator:
    def check(key: str, value: Any, src: _Source) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(
                key,
                f"a number of seconds between 0 and {maximum:g}, such as 30.0",
                value,
            )
        if not 0 < value <= maximum:
            raise _fail(
                key,
                f"a number of seconds greater than 0 and at most {maximum:g}",
                value,
            )
        return float(value)

    return check


def _port(key: str, value: Any, src: _Source) -> int:
    # 0 asks the OS for a free port: tests and one-off runs use it.
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise _fail(
            key, "an integer between 1 and 65535, or 0 for any free port", value
        )
    return value


def _syslog_url(key: str, value: Any, src: _Source) -> str:
    parts = urlsplit(value) if isinstance(value, str) else None
    try:
        port = parts.port if parts is not None else None
    except ValueError:
        port = None
    if parts is None or parts.scheme not in ("udp", "tcp") or not parts.hostname or port is None:
        raise _fail(key, 'a syslog address such as "udp://127.0.0.1:514" or "tcp://siem.example:6514"', value)
    return value


def _nonempty_str(key: str, value: Any, src: _Source) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "a non-empty string", value)
    return value


def _bool(key: str, value: Any, src: _Source) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, "true or false", value)
    return value


def _choice(options: tuple[str, ...], *, upper: bool = False) -> _Validator:
    shown = " or ".join(f'"{o}"' for o in options)

    def check(key: str, value: Any, src: _Source) -> str:
        if isinstance(value, str):
            candidate = value.upper() if upper else value
            if candidate in options:
                return candidate
        raise _fail(key, f"one of {shown} (a quoted string)", value)

    return check


def _path(key: str, value: Any, src: _Source) -> Path:
    if isinstance(value, Path):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise _fail(key, "a file path as a non-empty string", value)
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = src.base / p
    return Path(os.path.normpath(p))


def _identities(key: str, value: Any, src: _Source) -> tuple[str, ...]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(
        isinstance(v, str) and v.strip() for v in value
    ):
        raise _fail(
            key, 'a list of client identities, such as ["admin1", "admin2"]', value
        )
    return tuple(value)


def _db_url(key: str, value: Any, src: _Source) -> str:
    if not isinstance(value, str) or "://" not in value:
        raise _fail(key, 'a database URL such as "sqlite:///var/kms.db"', value)
    parts = urlsplit(value)
    scheme = parts.scheme.split("+", 1)[0]
    if scheme not in ("sqlite", "postgresql"):
        raise _fail(key, "a sqlite:// or postgresql:// URL", value)
    if parts.password is not None:
        raise ConfigError(
            f"config: {key} must not contain a password; use a PostgreSQL passfile "
            "(PGPASSFILE or ?passfile=<path>) or client certificates instead"
        )
    if scheme == "sqlite":
        return _resolve_sqlite_url(value, src)
    return value


def _resolve_sqlite_url(url: str, src: _Source) -> str:
    # SQLAlchemy would resolve a relative SQLite path against the process's
    # working directory; resolve it like every other path in the file.
    prefix, sep, rest = url.partition(":///")
    if not sep:
        return url
    db_path, q, query = rest.partition("?")
    if not db_path or db_path == ":memory:" or db_path.startswith("/"):
        return url
    resolved = os.path.normpath(src.base / db_path)
    return f"{prefix}:///{resolved}{q}{query}"


# A schema maps section -> key -> (validator, default). A default of DERIVED
# is left for the caller to fill in once the other values are known (most
# derive from a data_dir); None means unset; a Required default means the key
# has no default and must be given.
DERIVED = object()


class Required:
    """The default of a key that must be set; ``example`` is the value shown
    in the error message, such as ``'"kms-prod" (your key provider name)'``."""

    def __init__(self, example: str) -> None:
        self.example = example


Schema = dict[str, dict[str, tuple[_Validator, Any]]]

_SCHEMA: Schema = {
    "server": {
        "host": (_nonempty_str, "127.0.0.1"),
        "port": (_port, 5696),
        "node_name": (_nonempty_str, DERIVED),
        "max_message_size": (_int_between(1024, 1 << 30), 1 << 20),
        "idle_timeout": (_positive_seconds(86400.0), 300.0),
        "handshake_timeout": (_positive_seconds(3600.0), 10.0),
        "max_connections": (_int_between(1, 1_000_000), 1024),
        "worker_threads": (_int_between(1, 1024), 16),
        "data_dir": (_path, "var"),
        "max_handshakes": (_int_between(1, 1_000_000), 256),
        "frame_timeout": (_positive_seconds(3600.0), 30.0),
        "max_unsent_bytes": (_int_between(65536, 1 << 30), 4 << 20),
        "max_unsent_bytes_total": (_int_between(65536, 1 << 40), 256 << 20),
    },
    "tls": {
        "cert": (_path, None),
        "key": (_path, None),
        "ca": (_path, None),
        "trusted_clients_dir": (_path, DERIVED),
        "identity": (_choice(IDENTITY_MODES), "cn"),
        "min_version": (_choice(TLS_VERSIONS), "1.2"),
    },
    "storage": {
        "db_url": (_db_url, DERIVED),
        "schema": (_choice(("auto", "upgrade", "check")), "auto"),
        "retry_seconds": (_positive_seconds(600.0), 15.0),
        "integrity_check_seconds": (_int_between(0, 7 * 86400), 3600),
    },
    "master_key": {
        "file": (_path, None),
        "passphrase_file": (_path, None),
        "pkcs11_module": (_path, None),
        "token_label": (_nonempty_str, None),
        "key_label": (_nonempty_str, None),
        "pin_file": (_path, None),
    },
    "access": {
        "administrators": (_identities, ()),
        "no_crypto_administrators": (_identities, ()),
        "auditors": (_identities, ()),
        "require_credential": (_bool, False),
        "credentials_file": (_path, DERIVED),
    },
    "logging": {
        "level": (_choice(LOG_LEVELS, upper=True), "INFO"),
    },
    "audit": {
        "enabled": (_bool, True),
        "signing_key_file": (_path, None),
        "checkpoint_seconds": (_positive_seconds(86400.0), 60.0),
        "jsonl_file": (_path, None),
        "syslog": (_syslog_url, None),
        "web_host": (_nonempty_str, "127.0.0.1"),
        "web_port": (_port, None),
        "web_max_connections": (_int_between(1, 1_000_000), 64),
    },
}

_SECTION_TYPES: dict[str, type] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "storage": StorageConfig,
    "master_key": MasterKeyConfig,
    "access": AccessConfig,
    "logging": LoggingConfig,
    "audit": AuditConfig,
}


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return f"{hint}known: {', '.join(known)}"


def check_shape(schema: Schema, raw: Any, origin: str) -> dict[str, dict[str, Any]]:
    """``raw`` (a parsed file or the overrides) checked against ``schema``:
    only known sections, each a table, holding only known keys."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: {origin} must be a table of sections")
    for section, table in raw.items():
        if section not in schema:
            raise ConfigError(
                f"config: unknown section [{section}] in {origin}; "
                f"{_suggest(section, list(schema))}"
            )
        if not isinstance(table, dict):
            raise ConfigError(
                f"config: [{section}] in {origin} must be a table of keys, "
                f"such as [{section}] on its own line (got {table!r})"
            )
        for key in table:
            if key not in schema[section]:
                raise ConfigError(
                    f"config: unknown key {section}.{key} in {origin}; "
                    f"{_suggest(key, list(schema[section]))}"
                )
    return raw


def _read_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(
            f"config: file {path} does not exist; pass an existing file with --config"
        ) from None
    except IsADirectoryError:
        raise ConfigError(f"config: {path} is a directory; pass a TOML file") from None
    except OSError as exc:
        raise ConfigError(
            f"config: cannot read {path} ({exc.strerror}); check the path and permissions"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(
            f"config: {path} is not valid TOML ({exc}); fix the syntax"
        ) from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"config: {path} is not UTF-8 text; save it as UTF-8"
        ) from None


def merge_sources(
    schema: Schema,
    path: str | os.PathLike[str] | None,
    overrides: dict[str, dict[str, Any]] | None,
) -> tuple[dict[str, dict[str, Any]], Path | None]:
    """Every key of ``schema`` validated from the first source that has it:
    command-line ``overrides`` (None values skipped), then the TOML file at
    ``path``, then the default. Relative paths resolve against the working
    directory for flags, the file's directory for the file, and the file's
    directory (or the working directory without a file) for defaults.
    DERIVED and None defaults are left as they are for the caller; a missing
    Required key is an error. Returns the values and the file's absolute path.
    """
    cwd_source = _Source(Path.cwd(), "command-line flags")
    file_source: _Source | None = None
    raw_file: dict[str, dict[str, Any]] = {}
    source_path: Path | None = None
    if path is not None:
        source_path = Path(os.path.abspath(os.fspath(path)))
        file_source = _Source(source_path.parent, str(source_path))
        raw_file = check_shape(schema, _read_file(source_path), str(source_path))
    raw_overrides = {
        section: {k: v for k, v in table.items() if v is not None}
        for section, table in check_shape(
            schema, overrides or {}, "command-line flags"
        ).items()
    }
    default_source = file_source or cwd_source

    values: dict[str, dict[str, Any]] = {}
    for section, keys in schema.items():
        values[section] = {}
        for key, (validate, default) in keys.items():
            dotted = f"{section}.{key}"
            if key in raw_overrides.get(section, {}):
                values[section][key] = validate(
                    dotted, raw_overrides[section][key], cwd_source
                )
            elif key in raw_file.get(section, {}):
                assert file_source is not None
                values[section][key] = validate(
                    dotted, raw_file[section][key], file_source
                )
            elif isinstance(default, Required):
                raise ConfigError(
                    f"config: {dotted} is required; "
                    f"add {key} = {default.example} to [{section}]"
                )
            elif default is DERIVED or default is None:
                values[section][key] = default
            else:
                values[section][key] = validate(dotted, default, default_source)
    return values, source_path


def load_config(
    path: str | os.PathLike[str] | None,
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    require_master_key: bool = True,
) -> Config:
    """Read, merge and validate the configuration.

    ``overrides`` maps section -> key -> value, as collected from
    command-line flags; a value of None means "flag not given" and is
    skipped, so callers can pass argparse results straight through.
    ``require_master_key=False`` lets admin tools that never touch key
    material (such as pinning client certificates) run without one.
    """
    values, source_path = merge_sources(_SCHEMA, path, overrides)
    _fill_derived(values)
    _check_cross(values, require_master_key=require_master_key)
    sections = {name: _SECTION_TYPES[name](**vals) for name, vals in values.items()}
    return Config(**sections, source=source_path)


def _fill_derived(values: dict[str, dict[str, Any]]) -> None:
    data_dir: Path = values["server"]["data_dir"]
    if values["server"]["node_name"] is DERIVED:
        values["server"]["node_name"] = socket.gethostname() or "localhost"
    if values["tls"]["trusted_clients_dir"] is DERIVED:
        values["tls"]["trusted_clients_dir"] = data_dir / "trusted-clients"
    if values["storage"]["db_url"] is DERIVED:
        values["storage"]["db_url"] = f"sqlite:///{data_dir / 'kms.db'}"
    if values["access"]["credentials_file"] is DERIVED:
        values["access"]["credentials_file"] = data_dir / "credentials.toml"


def _check_cross(
    values: dict[str, dict[str, Any]], *, require_master_key: bool
) -> None:
    mk = values["master_key"]
    sources = [k for k in ("file", "passphrase_file", "pkcs11_module") if mk[k] is not None]
    if len(sources) > 1:
        raise ConfigError(
            f"config: master_key.{sources[0]} and master_key.{sources[1]} are both set; keep exactly one"
        )
    if require_master_key and not sources:
        raise ConfigError(
            "config: [master_key] needs file or passphrase_file (or a token: pkcs11_module); set one "
            "(kms-admin master-key new --out <path> creates a key file)"
        )
    if mk["pkcs11_module"] is not None:
        for key in ("token_label", "key_label", "pin_file"):
            if mk[key] is None:
                raise ConfigError(
                    f"config: master_key.pkcs11_module needs master_key.{key} too; set it "
                    "(docs/hsm-master-key.md)"
                )
    else:
        for key in ("token_label", "key_label", "pin_file"):
            if mk[key] is not None:
                raise ConfigError(
                    f"config: master_key.{key} is set without master_key.pkcs11_module; "
                    "set the module or remove it"
                )
    access = values["access"]
    both = set(access["administrators"]) & set(access["no_crypto_administrators"])
    if both:
        name = min(both)
        raise ConfigError(
            f"config: {name!r} is in both access.administrators and "
            "access.no_crypto_administrators; keep it in one list"
        )


# --- Display -----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # A JSON string is a valid TOML basic string (same escapes).
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot show {value!r} as TOML")


def format_settings(
    source: Path | None,
    redacted: dict[str, dict[str, Any]],
    secret_keys: frozenset[tuple[str, str]],
) -> str:
    """Settings (a ``redacted()`` result) as TOML text, safe to print.

    Keys in ``secret_keys`` name secret files: they appear by path with a
    comment, their contents never read. Unset optional settings appear as
    comments, since TOML has no null. ``source`` is the file they came from.
    """
    lines: list[str] = []
    if source is not None:
        lines.append(f"# effective configuration from {source}")
    else:
        lines.append("# effective configuration (no file; defaults and flags)")
    for section, table in redacted.items():
        lines.append("")
        lines.append(f"[{section}]")
        for key, value in table.items():
            if value is None:
                lines.append(f"# {key} is not set")
                continue
            line = f"{key} = {_toml_value(value)}"
            if (section, key) in secret_keys:
                line += "  # (secret file, contents not shown)"
            lines.append(line)
    return "\n".join(lines) + "\n"


def format_config(cfg: Config) -> str:
    """The effective settings as TOML text, safe to print.

    Secret files appear by path with a comment; their contents are never
    read. Unset optional settings appear as comments, since TOML has no null.
    """
    return format_settings(cfg.source, cfg.redacted(), SECRET_FILE_KEYS)
