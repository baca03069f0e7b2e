"""`vtpm-broker` configuration: one TOML file, validated once into frozen
dataclasses, on the configuration framework of ``kmip_core.config`` (its
validators and messages), as ``kms_server.config`` is.

Precedence is defaults < file < command-line flags. Secrets are file paths
only (TLS key, KMS client key, master key); this module never reads them.
Relative paths in the file are relative to the file; paths derived from
``broker.data_dir`` follow it.

    [broker]      provider_name (required), data_dir, node_name
    [api]         host, port, max_body, worker_threads, enroll_per_minute,
                  max_connections, max_handshakes, handshake_timeout, request_timeout
    [gateway]     host, port, max_message_size, idle_timeout, handshake_timeout,
                  max_connections, max_handshakes, frame_timeout, worker_threads
                  (read by broker.gateway)
    [tls]         cert, key (the broker's server certificate, issued by
                  `vtpm-broker init` from the trust CA), server_names, min_version
    [kms]         nodes, cert, key, ca, server_name, connect_timeout, request_timeout,
                  connections
    [storage]     db_url (default sqlite:///<data_dir>/broker.db), schema
    [master_key]  file
    [audit]       signing_key_file (Ed25519, made by `vtpm-broker init`), checkpoint_seconds
    [roles]       security_admins, administrators, no_crypto_administrators, auditors
    [logging]     level, format ("text" or "json": kmip_core.logs)
    [metrics]     host, port, cert, key, ca (the monitoring listener: kmip_core.metrics, docs/metrics.md)
    [attestation] required, token_ttl, nonce_ttl, pcrs (host attestation: docs/attestation.md)
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from broker.registry.attestation import AttestationSettings, parse_pcr_selection
from broker.registry.model import InvalidRequest
from kmip_core.config import (
    DERIVED,
    LOG_LEVELS,
    TLS_VERSIONS,
    ConfigError,
    Required,
    Schema,
    Source,
    boolean,
    check_file,
    choice,
    db_url,
    format_settings,
    identities,
    int_between,
    invalid,
    merge_sources,
    nonempty_str,
    path_value,
    plain_value,
    port_number,
    positive_seconds,
    redact_url,
)
from kmip_core.metrics import LOGGING_FORMAT, METRICS_SCHEMA, MetricsConfig, check_metrics_section
from kmip_core.names import check_name

__all__ = [
    "ApiConfig",
    "AuditSection",
    "BrokerConfig",
    "BrokerSection",
    "ConfigError",
    "GatewayConfig",
    "KmsConfig",
    "RolesConfig",
    "format_config",
    "load_config",
]

SECRET_FILE_KEYS = frozenset(
    {("tls", "key"), ("kms", "key"), ("master_key", "file"), ("audit", "signing_key_file"), ("metrics", "key")}
)


@dataclass(frozen=True)
class BrokerSection:
    provider_name: str
    data_dir: Path
    node_name: str


@dataclass(frozen=True)
class ApiConfig:
    host: str
    port: int
    max_body: int
    worker_threads: int
    # Enrollment requests (POST /v1/enroll, which needs no certificate) one
    # address may make per minute, in bursts of as many; 0: no limit.
    enroll_per_minute: int = 30
    # Listener limits (kmip_core.limits): connections counted after
    # TLS, handshakes in progress and their timeout, and the deadline for
    # a whole request once its first byte came.
    max_connections: int = 256
    max_handshakes: int = 256
    handshake_timeout: float = 10.0
    request_timeout: float = 30.0


@dataclass(frozen=True)
class GatewayConfig:
    host: str
    port: int
    max_message_size: int
    idle_timeout: float
    handshake_timeout: float
    max_connections: int
    worker_threads: int
    max_handshakes: int = 256
    frame_timeout: float = 30.0


@dataclass(frozen=True)
class TlsSection:
    cert: Path
    key: Path
    server_names: tuple[str, ...]
    min_version: str


@dataclass(frozen=True)
class KmsConfig:
    nodes: tuple[str, ...]
    cert: Path
    key: Path
    ca: Path | None
    server_name: str | None
    connect_timeout: float
    request_timeout: float
    # KMIP requests in flight to the KMS at once, each on its own
    # persistent TLS connection (gateway unwraps and API key operations).
    connections: int = 8


@dataclass(frozen=True)
class StorageSection:
    db_url: str
    # "auto": apply the migrations at start on SQLite (one broker), only
    # check on PostgreSQL (replicas share it; `vtpm-broker db upgrade`).
    schema: str = "auto"

    @property
    def schema_mode(self) -> str:
        if self.schema != "auto":
            return self.schema
        return "upgrade" if self.db_url.startswith("sqlite") else "check"


@dataclass(frozen=True)
class MasterKeySection:
    file: Path


@dataclass(frozen=True)
class AuditSection:
    # The Ed25519 key that signs checkpoints of the audit trail; its public
    # half (public_key_file) is what auditors keep to verify.
    signing_key_file: Path
    checkpoint_seconds: float = 60.0

    @property
    def public_key_file(self) -> Path:
        path = self.signing_key_file
        return path.with_name(path.name.removesuffix(".key") + ".pub")


@dataclass(frozen=True)
class RolesConfig:
    security_admins: tuple[str, ...]
    administrators: tuple[str, ...]
    no_crypto_administrators: tuple[str, ...]
    auditors: tuple[str, ...]

    def role_of(self, name: str) -> str | None:
        """The role a certificate CN has, most powerful first; None if none."""
        for role, names in (
            ("security_admin", self.security_admins),
            ("administrator", self.administrators),
            ("no_crypto_administrator", self.no_crypto_administrators),
            ("auditor", self.auditors),
        ):
            if name in names:
                return role
        return None


@dataclass(frozen=True)
class LoggingSection:
    level: str
    # "text" (default) or "json": one JSON object per line (kmip_core.logs).
    format: str = "text"


@dataclass(frozen=True)
class AttestationSection:
    """Host attestation (docs/attestation.md)."""

    # Every host must attest; when false, only hosts an attestation policy covers must.
    required: bool = False
    # How long a token issued for a verified quote lets its host unwrap.
    token_ttl: int = 300
    nonce_ttl: int = 60
    # The PCRs a host quotes when no policy covers it yet (its quote is kept
    # for `vtpm-broker admin attest-policy capture`).
    pcrs: str = "sha256:0-7"

    def settings(self) -> AttestationSettings:
        bank, indices = parse_pcr_selection(self.pcrs)
        return AttestationSettings(
            required=self.required,
            token_ttl=self.token_ttl,
            nonce_ttl=self.nonce_ttl,
            pcr_bank=bank,
            pcrs=indices,
        )


def _pcr_selection(key: str, value: Any, src: Source) -> str:
    if not isinstance(value, str):
        raise invalid(key, 'a PCR selection such as "sha256:0-7"', value)
    try:
        parse_pcr_selection(value)
    except InvalidRequest as exc:
        raise ConfigError(f"config: {key}: {exc}") from None
    return value


SECTION_ORDER = (
    "broker", "api", "gateway", "tls", "kms", "storage", "master_key", "audit", "roles", "logging", "metrics",
    "attestation",
)  # fmt: skip


@dataclass(frozen=True)
class BrokerConfig:
    broker: BrokerSection
    api: ApiConfig
    gateway: GatewayConfig
    tls: TlsSection
    kms: KmsConfig
    storage: StorageSection
    master_key: MasterKeySection
    audit: AuditSection
    roles: RolesConfig
    logging: LoggingSection
    # The monitoring listener (/metrics, /healthz, /readyz); off by default.
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    attestation: AttestationSection = field(default_factory=AttestationSection)
    source: Path | None = field(default=None, compare=False)

    # Files the broker writes itself, under data_dir.
    @property
    def trust_ca_path(self) -> Path:
        """The trust CA certificate (public), for hosts, instances and the gateway."""
        return self.broker.data_dir / "trust-ca.pem"

    @property
    def kms_csr_path(self) -> Path:
        return self.broker.data_dir / "kms-client.csr"

    def redacted(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for section in SECTION_ORDER:
            obj = getattr(self, section)
            out[section] = {f.name: plain_value(getattr(obj, f.name)) for f in fields(obj)}
        out["storage"]["db_url"] = redact_url(self.storage.db_url)
        return out

    def check_files(self, *, for_run: bool = True) -> list[str]:
        """Problems with the files the settings name, one line each; secret
        files are only looked at (existence, mode), never opened."""
        problems: list[str] = []
        data_dir = self.broker.data_dir
        if data_dir.exists() and not data_dir.is_dir():
            problems.append(f"broker.data_dir {data_dir} is not a directory; point it at a directory")
        made_by_init = [("master_key.file", self.master_key.file, True)]
        if for_run:
            made_by_init += [
                ("tls.cert", self.tls.cert, False),
                ("tls.key", self.tls.key, True),
                ("kms.key", self.kms.key, True),
            ]
        for key, path, secret in made_by_init:
            if not path.exists():
                where = f" --config {self.source}" if self.source else ""
                problems.append(f"{key} {path} does not exist; run 'vtpm-broker{where} init' first")
            else:
                problems.extend(check_file(key, path, secret=secret))
        # Optional (checkpoints go unsigned without it, with a warning), but
        # a key others can read is a problem.
        if self.audit.signing_key_file.exists():
            problems.extend(check_file("audit.signing_key_file", self.audit.signing_key_file, secret=True))
        if not for_run:
            return problems
        problems.extend(self.metrics.check_files())
        if not self.kms.nodes:
            problems.append('kms.nodes is empty; list the KMS nodes, such as nodes = ["kms1:5696", "kms2:5696"]')
        if self.kms.ca is None:
            problems.append('kms.ca is not set; add ca = "<the KMS CA certificate>" to [kms]')
        else:
            problems.extend(check_file("kms.ca", self.kms.ca, secret=False))
        cert_problems = check_file("kms.cert", self.kms.cert, secret=False)
        if cert_problems and not self.kms.cert.exists():
            cert_problems = [
                f"kms.cert {self.kms.cert} does not exist; sign {self.kms_csr_path} with "
                f"'kms-admin pki sign-csr --csr {self.kms_csr_path} --out {self.kms.cert} --ca-dir <KMS CA dir>'"
            ]
        problems.extend(cert_problems)
        return problems


# --- Validators that kms_server.config does not have ------------------------------


def _provider(key: str, value: Any, src: Source) -> str:
    return check_name(
        value,
        lambda rule: ConfigError(
            f'config: {key} must be a key provider name of {rule}, such as "kms-prod" (got {value!r})'
        ),
    )


def _nodes(key: str, value: Any, src: Source) -> tuple[str, ...]:
    if isinstance(value, tuple):
        value = list(value)
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f'config: {key} must be a list of "host:port" strings (got {value!r})')
    for node in value:
        host, sep, port = node.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f'config: {key} entry {node!r} must be "host:port", such as "kms1:5696"')
    return tuple(value)


def _names(key: str, value: Any, src: Source) -> tuple[str, ...]:
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"config: {key} must be a list of host names or addresses (got {value!r})")
    return tuple(value)


def _optional_str(key: str, value: Any, src: Source) -> str:
    return nonempty_str(key, value, src)


_SCHEMA: Schema = {
    "broker": {
        "provider_name": (_provider, Required('"kms-prod" (your key provider name)')),
        "data_dir": (path_value, "var/broker"),
        "node_name": (nonempty_str, DERIVED),
    },
    "api": {
        "host": (nonempty_str, "127.0.0.1"),
        "port": (port_number, 8443),
        "max_body": (int_between(1024, 16 << 20), 65536),
        "worker_threads": (int_between(1, 256), 8),
        "enroll_per_minute": (int_between(0, 1_000_000), 30),
        "max_connections": (int_between(1, 1_000_000), 256),
        "max_handshakes": (int_between(1, 1_000_000), 256),
        "handshake_timeout": (positive_seconds(3600.0), 10.0),
        "request_timeout": (positive_seconds(3600.0), 30.0),
    },
    "gateway": {
        "host": (nonempty_str, "127.0.0.1"),
        "port": (port_number, 5697),
        "max_message_size": (int_between(1024, 1 << 30), 1 << 20),
        "idle_timeout": (positive_seconds(86400.0), 300.0),
        "handshake_timeout": (positive_seconds(3600.0), 10.0),
        "max_connections": (int_between(1, 1_000_000), 1024),
        "worker_threads": (int_between(1, 1024), 16),
        "max_handshakes": (int_between(1, 1_000_000), 256),
        "frame_timeout": (positive_seconds(3600.0), 30.0),
    },
    "tls": {
        "cert": (path_value, DERIVED),
        "key": (path_value, DERIVED),
        "server_names": (_names, ()),
        "min_version": (choice(TLS_VERSIONS), "1.2"),
    },
    "kms": {
        "nodes": (_nodes, ()),
        "cert": (path_value, DERIVED),
        "key": (path_value, DERIVED),
        "ca": (path_value, None),
        "server_name": (_optional_str, None),
        "connect_timeout": (positive_seconds(600.0), 5.0),
        "request_timeout": (positive_seconds(3600.0), 30.0),
        "connections": (int_between(1, 256), 8),
    },
    "storage": {
        "db_url": (db_url, DERIVED),
        "schema": (choice(("auto", "upgrade", "check")), "auto"),
    },
    "master_key": {"file": (path_value, DERIVED)},
    "audit": {
        "signing_key_file": (path_value, DERIVED),
        "checkpoint_seconds": (positive_seconds(86400.0), 60.0),
    },
    "roles": {
        "security_admins": (identities, ()),
        "administrators": (identities, ()),
        "no_crypto_administrators": (identities, ()),
        "auditors": (identities, ()),
    },
    "logging": {"level": (choice(LOG_LEVELS, upper=True), "INFO"), "format": LOGGING_FORMAT},
    "metrics": dict(METRICS_SCHEMA),
    "attestation": {
        "required": (boolean, False),
        "token_ttl": (int_between(10, 3600), 300),
        "nonce_ttl": (int_between(5, 600), 60),
        "pcrs": (_pcr_selection, "sha256:0-7"),
    },
}

_TYPES: dict[str, type] = {
    "broker": BrokerSection,
    "api": ApiConfig,
    "gateway": GatewayConfig,
    "tls": TlsSection,
    "kms": KmsConfig,
    "storage": StorageSection,
    "master_key": MasterKeySection,
    "audit": AuditSection,
    "roles": RolesConfig,
    "logging": LoggingSection,
    "metrics": MetricsConfig,
    "attestation": AttestationSection,
}


def load_config(
    path: str | os.PathLike[str] | None, overrides: dict[str, dict[str, Any]] | None = None
) -> BrokerConfig:
    """Read, merge and validate. ``overrides`` maps section -> key -> value
    from command-line flags; None values are skipped."""
    values, source_path = merge_sources(_SCHEMA, path, overrides)
    data_dir: Path = values["broker"]["data_dir"]
    derived = {
        ("broker", "node_name"): socket.gethostname() or "localhost",
        ("tls", "cert"): data_dir / "broker-tls.pem",
        ("tls", "key"): data_dir / "broker-tls.key",
        ("kms", "cert"): data_dir / "kms-client.pem",
        ("kms", "key"): data_dir / "kms-client.key",
        ("storage", "db_url"): f"sqlite:///{data_dir / 'broker.db'}",
        ("master_key", "file"): data_dir / "master.key",
        ("audit", "signing_key_file"): data_dir / "audit.key",
    }
    for (section, key), value in derived.items():
        if values[section][key] is DERIVED:
            values[section][key] = value
    check_metrics_section(values["metrics"])
    roles = values["roles"]
    both = set(roles["administrators"]) & set(roles["no_crypto_administrators"])
    if both:
        raise ConfigError(
            f"config: {min(both)!r} is in both roles.administrators and roles.no_crypto_administrators; "
            "keep it in one list"
        )
    sections = {name: _TYPES[name](**vals) for name, vals in values.items()}
    return BrokerConfig(**sections, source=source_path)


def format_config(cfg: BrokerConfig) -> str:
    """The effective settings as TOML, safe to print (secret files by path)."""
    return format_settings(cfg.source, cfg.redacted(), SECRET_FILE_KEYS)
