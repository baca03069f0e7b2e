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

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from kmip_core.config import (
    DERIVED,
    IDENTITY_MODES,
    LOG_LEVELS,
    TLS_VERSIONS,
    ConfigError,
    Required,
    Schema,
    TlsConfig,
    boolean,
    check_file,
    check_shape,
    choice,
    db_url,
    format_settings,
    identities,
    int_between,
    merge_sources,
    nonempty_str,
    path_value,
    plain_value,
    port_number,
    positive_seconds,
    redact_url,
    syslog_url,
)
from kmip_core.metrics import LOGGING_FORMAT, METRICS_SCHEMA, MetricsConfig, check_metrics_section

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


# Keys whose value names a file holding a secret; shown as paths, never read.
SECRET_FILE_KEYS = frozenset(
    {
        ("tls", "key"),
        ("master_key", "file"),
        ("master_key", "passphrase_file"),
        ("master_key", "pin_file"),
        ("access", "credentials_file"),
        ("audit", "signing_key_file"),
        ("metrics", "key"),
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
    # Worker processes sharing the listening socket (docs/process-model.md);
    # by default one per core.
    processes: int = 1
    max_unsent_bytes_total: int = 256 << 20


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
    # Object rows a worker process keeps once authenticated, so that a read
    # finding the stored row unchanged skips its MAC check and decoding
    # (keystore/verified_rows.py); 0 turns the cache off.
    verified_rows: int = 8192

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
    # "text" (default) or "json": one JSON object per line (kmip_core.logs).
    format: str = "text"


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


SECTION_ORDER = ("server", "tls", "storage", "master_key", "access", "logging", "audit", "metrics")


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    tls: TlsConfig
    storage: StorageConfig
    master_key: MasterKeyConfig
    access: AccessConfig
    logging: LoggingConfig
    audit: AuditConfig = field(default_factory=AuditConfig)
    # The monitoring listener (/metrics, /healthz, /readyz); off by default.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
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
            out[section] = {f.name: plain_value(getattr(obj, f.name)) for f in fields(obj)}
        out["storage"]["db_url"] = redact_url(self.storage.db_url)
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
                problems.extend(check_file(key, path, secret=(key == "tls.key")))
        trusted = self.tls.trusted_clients_dir
        if trusted.exists() and not trusted.is_dir():
            problems.append(
                f"tls.trusted_clients_dir {trusted} is not a directory; "
                "point it at a directory (it may be absent)"
            )
        if self.master_key.file is not None:
            problems.extend(
                check_file("master_key.file", self.master_key.file, secret=True)
            )
        if self.master_key.passphrase_file is not None:
            problems.extend(
                check_file(
                    "master_key.passphrase_file",
                    self.master_key.passphrase_file,
                    secret=True,
                )
            )
        if self.master_key.pkcs11_module is not None:
            problems.extend(
                check_file("master_key.pkcs11_module", self.master_key.pkcs11_module, secret=False)
            )
        if self.master_key.pin_file is not None:
            problems.extend(check_file("master_key.pin_file", self.master_key.pin_file, secret=True))
        if self.access.require_credential or self.access.credentials_file.exists():
            problems.extend(
                check_file(
                    "access.credentials_file", self.access.credentials_file, secret=True
                )
            )
        if self.audit.signing_key_file is not None:
            problems.extend(
                check_file("audit.signing_key_file", self.audit.signing_key_file, secret=True)
            )
        problems.extend(self.metrics.check_files())
        return problems



_SCHEMA: Schema = {
    "server": {
        "host": (nonempty_str, "127.0.0.1"),
        "port": (port_number, 5696),
        "node_name": (nonempty_str, DERIVED),
        "max_message_size": (int_between(1024, 1 << 30), 1 << 20),
        "idle_timeout": (positive_seconds(86400.0), 300.0),
        "handshake_timeout": (positive_seconds(3600.0), 10.0),
        "max_connections": (int_between(1, 1_000_000), 1024),
        "worker_threads": (int_between(1, 1024), 16),
        "processes": (int_between(1, 256), DERIVED),
        "data_dir": (path_value, "var"),
        "max_handshakes": (int_between(1, 1_000_000), 256),
        "frame_timeout": (positive_seconds(3600.0), 30.0),
        "max_unsent_bytes": (int_between(65536, 1 << 30), 4 << 20),
        "max_unsent_bytes_total": (int_between(65536, 1 << 40), 256 << 20),
    },
    "tls": {
        "cert": (path_value, None),
        "key": (path_value, None),
        "ca": (path_value, None),
        "trusted_clients_dir": (path_value, DERIVED),
        "identity": (choice(IDENTITY_MODES), "cn"),
        "min_version": (choice(TLS_VERSIONS), "1.2"),
    },
    "storage": {
        "db_url": (db_url, DERIVED),
        "schema": (choice(("auto", "upgrade", "check")), "auto"),
        "retry_seconds": (positive_seconds(600.0), 15.0),
        "integrity_check_seconds": (int_between(0, 7 * 86400), 3600),
        "verified_rows": (int_between(0, 10_000_000), 8192),
    },
    "master_key": {
        "file": (path_value, None),
        "passphrase_file": (path_value, None),
        "pkcs11_module": (path_value, None),
        "token_label": (nonempty_str, None),
        "key_label": (nonempty_str, None),
        "pin_file": (path_value, None),
    },
    "access": {
        "administrators": (identities, ()),
        "no_crypto_administrators": (identities, ()),
        "auditors": (identities, ()),
        "require_credential": (boolean, False),
        "credentials_file": (path_value, DERIVED),
    },
    "logging": {
        "level": (choice(LOG_LEVELS, upper=True), "INFO"),
        "format": LOGGING_FORMAT,
    },
    "audit": {
        "enabled": (boolean, True),
        "signing_key_file": (path_value, None),
        "checkpoint_seconds": (positive_seconds(86400.0), 60.0),
        "jsonl_file": (path_value, None),
        "syslog": (syslog_url, None),
        "web_host": (nonempty_str, "127.0.0.1"),
        "web_port": (port_number, None),
        "web_max_connections": (int_between(1, 1_000_000), 64),
    },
    "metrics": dict(METRICS_SCHEMA),
}

_SECTION_TYPES: dict[str, type] = {
    "server": ServerConfig,
    "tls": TlsConfig,
    "storage": StorageConfig,
    "master_key": MasterKeyConfig,
    "access": AccessConfig,
    "logging": LoggingConfig,
    "audit": AuditConfig,
    "metrics": MetricsConfig,
}
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
    if values["server"]["processes"] is DERIVED:
        # One per core, on SQLite too: its writers of every process queue
        # on one flock and share commits (docs/process-model.md).
        values["server"]["processes"] = os.cpu_count() or 1


def _in_memory(url: str) -> bool:
    return url.startswith("memory:") or ":memory:" in url


def _check_cross(
    values: dict[str, dict[str, Any]], *, require_master_key: bool
) -> None:
    if values["server"]["processes"] > 1 and _in_memory(values["storage"]["db_url"]):
        raise ConfigError(
            "config: server.processes > 1 needs a database the processes share, not one in memory; "
            "set processes = 1 or a sqlite:///<file> or postgresql:// db_url"
        )
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
    check_metrics_section(values["metrics"])
    access = values["access"]
    both = set(access["administrators"]) & set(access["no_crypto_administrators"])
    if both:
        name = min(both)
        raise ConfigError(
            f"config: {name!r} is in both access.administrators and "
            "access.no_crypto_administrators; keep it in one list"
        )


def format_config(cfg: Config) -> str:
    """The effective settings as TOML text, safe to print.

    Secret files appear by path with a comment; their contents are never
    read. Unset optional settings appear as comments, since TOML has no null.
    """
    return format_settings(cfg.source, cfg.redacted(), SECRET_FILE_KEYS)
