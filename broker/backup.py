"""`vtpm-broker backup` and `restore`: the broker's whole state in one
encrypted, authenticated file (docs/broker-operations.md).

What a backup holds:

- every table of the broker database (instances, tokens, enrollments,
  hosts, VMs and their placements, .nvram generations, users, the trust CA
  and EK CA rows with their keys still sealed under the master key, EK
  certificate issuance history, the audit trail and its signed checkpoints,
  broker_meta with the master-key check record), read in one snapshot
  transaction, so brokers keep serving while it runs;
- the files `vtpm-broker init` leaves in the data directory that a broker
  needs to serve: its TLS server certificate and key, its KMS client key,
  certificate and CSR, the audit signing key and its public half, and the
  trust CA certificate.

The file format and its cryptography are the KMS backup's
(kmip_core.backup_format, docs/backup-format.md, format 2) with the
broker's own signature: a random backup key seals the record stream in
chunks (AES-256-GCM, STREAM) and the broker's master key wraps that key into
the header. The master key itself is never in a backup: a restore needs the
master key file of the broker that made it, kept apart from the backups.

A restore goes into an empty target only (no row in any broker table, no
file it would write, nothing in the data directory but the master key), and
authenticates the whole file before it writes anything; then every row goes
in within one transaction and the files are written before it commits, so it
gives back the whole broker or nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Column, Integer, LargeBinary, MetaData, Table, Text, func, insert, select
from sqlalchemy.exc import SQLAlchemyError

from broker import db as broker_db
from broker import schema
from broker.config import BrokerConfig
from kmip_core.backup_format import (
    BackupError,
    BackupKind,
    Progress,
    Section,
    open_sealed,
    require_empty,
    set_high_water,
    table_section,
    write_sealed,
)
from kmip_core.db.engine import describe_error
from kmip_core.files import atomic_file
from kmip_core.sealing.barrier import Barrier, BarrierError
from kmip_core.sealing.master_key import MasterKey, MasterKeyError
from kmip_core.sealing.opener import open_master_key

__all__ = ["BROKER_BACKUP", "BROKER_TABLES", "BackupError", "BackupSummary", "RestoreSummary", "backup", "restore"]

MAGIC = b"\x89VTBBAK\n"

# Every table of broker.db, in the order a restore inserts them (there are
# no foreign keys; configuration-like tables first). A table added to
# broker.db goes here: tests/broker/test_backup.py fails until it does.
BROKER_TABLES: tuple[str, ...] = (
    "broker_meta",
    "broker_cas",
    "broker_instances",
    "broker_tokens",
    "broker_enrollments",
    "broker_hosts",
    "broker_users",
    "broker_vms",
    "broker_nvram_generations",
    "broker_ek_certificates",
    "broker_host_tpms",
    "broker_attest_policies",
    "broker_attest_nonces",
    "broker_attest_tokens",
    "broker_audit",
    "broker_audit_checkpoints",
)

# The files a broker serves with, as a section of their own: by role, so a
# restore writes each where the restoring configuration puts it.
_files_metadata = MetaData()
FILES = Table(
    "broker_backup_files",
    _files_metadata,
    Column("role", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("mode", Integer, nullable=False),
    Column("data", LargeBinary, nullable=False),
)

_metadata = MetaData()
for _table in broker_db.metadata.tables.values():
    _table.to_metadata(_metadata)
FILES.to_metadata(_metadata)

BROKER_BACKUP = BackupKind(MAGIC, "vtpm-broker", "vtpm-broker", _metadata)


def _files(cfg: BrokerConfig) -> dict[str, tuple[Path, int, bool]]:
    """role -> (path in this configuration, mode, required to serve)."""
    return {
        "tls.cert": (cfg.tls.cert, 0o644, True),
        "tls.key": (cfg.tls.key, 0o600, True),
        "kms.cert": (cfg.kms.cert, 0o644, False),
        "kms.key": (cfg.kms.key, 0o600, True),
        "kms.csr": (cfg.kms_csr_path, 0o644, False),
        "audit.signing_key": (cfg.audit.signing_key_file, 0o600, False),
        "audit.public_key": (cfg.audit.public_key_file, 0o644, False),
        "trust_ca.cert": (cfg.trust_ca_path, 0o644, True),
    }


@dataclass(frozen=True)
class BackupSummary:
    path: Path
    size: int
    rows: dict[str, int]
    files: tuple[str, ...]
    schema_revision: str
    created_at: str


@dataclass(frozen=True)
class RestoreSummary:
    path: Path
    database: str
    rows: dict[str, int]
    files: tuple[Path, ...]
    schema_revision: str
    backup_created_at: str
    backup_node: str


def _master_key(cfg: BrokerConfig, doing: str) -> MasterKey:
    path = cfg.master_key.file
    if not path.exists():
        if doing == "restore":
            raise BackupError(
                f"master key {path} does not exist; copy the master key file of the broker that made the backup "
                "there (mode 0600) before the restore"
            )
        raise BackupError(f"master key {path} does not exist; check --config (the broker's own configuration)")
    try:
        return open_master_key(cfg.master_key, lambda _name: None)
    except MasterKeyError as exc:
        raise BackupError(str(exc)) from None


def _opens(master: MasterKey, check: bytes | None) -> bool:
    """The master key opens the database's check record (broker.db.open_barrier's)."""
    key = master.legacy_key()  # a key file's 32 bytes: the broker's barrier key
    if check is None or key is None:
        return False
    try:
        return Barrier(key).unseal(broker_db._CHECK_PURPOSE, check) == broker_db._CHECK_PLAINTEXT
    except BarrierError:
        return False


def _tables() -> list[Table]:
    return [_metadata.tables[name] for name in BROKER_TABLES]


def _revision(conn) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn, opts={"version_table": schema.BROKER.version_table}).get_current_revision()


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _sqlite_file(cfg: BrokerConfig) -> Path | None:
    url = cfg.storage.db_url
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return None


def _open_db(cfg: BrokerConfig) -> broker_db.Database:
    try:
        return broker_db.Database(cfg.storage.db_url, pool_size=1)
    except broker_db.DatabaseError as exc:
        raise BackupError(str(exc)) from None


# --- backup -----------------------------------------------------------------------------


def backup(
    cfg: BrokerConfig, out: str | os.PathLike[str], progress: Progress | None = None, *, overwrite: bool = False
) -> BackupSummary:
    """Write the broker's state to `out` (mode 0600, atomically), sealed
    under a backup key that the broker's master key wraps."""
    out = Path(out)
    source = _sqlite_file(cfg)
    if source is not None and not source.is_file():
        raise BackupError(f"broker database {source} does not exist; check --config or run 'vtpm-broker init'")
    master = _master_key(cfg, "backup")
    files = []
    for role, (path, _mode, required) in _files(cfg).items():
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            if required:
                raise BackupError(
                    f"{path} ({role}) does not exist; this broker cannot serve without it: run 'vtpm-broker init'"
                ) from None
            continue
        except OSError as exc:
            raise BackupError(f"cannot read {path} ({exc.strerror}); run the backup as the broker's user") from None
        files.append((role, path.name, path.stat().st_mode & 0o777, data))
    db = _open_db(cfg)
    try:
        with db.read() as conn:  # One snapshot: brokers may keep writing meanwhile.
            revision = _revision(conn)
            head = schema.head_revision()
            if revision != head:
                raise BackupError(
                    f"database {db.shown_url} is at schema revision {revision or 'none'}, this vtpm-broker reads "
                    f"{head}; run 'vtpm-broker db upgrade' (or use the vtpm-broker of the brokers' release)"
                )
            check = conn.execute(
                select(broker_db.meta.c.value).where(broker_db.meta.c.key == broker_db._CHECK_META)
            ).scalar()
            if not _opens(master, check):
                raise BackupError(
                    f"master key {cfg.master_key.file} does not open this broker database; "
                    "configure the master key file its brokers use"
                )
            created_at = _now()
            fields = {
                "schema_revision": revision,
                "created_at": created_at,
                "node": cfg.broker.node_name,
                "provider_name": cfg.broker.provider_name,
                "database": conn.dialect.name,
                "master_key": {"source": "file", "key_id": master.key_id},
            }
            sections = [table_section(conn, t) for t in _tables()]
            sections.append(Section(FILES, len(files), [files]))
            rows = {s.table.name: s.rows for s in sections if s.table is not FILES}
            size, _chunks = write_sealed(out, BROKER_BACKUP, master, fields, sections, progress, overwrite=overwrite)
    except SQLAlchemyError as exc:
        raise BackupError(f"cannot read {db.shown_url}: {describe_error(exc)}; check storage.db_url") from None
    except broker_db.DatabaseError as exc:
        raise BackupError(str(exc)) from None
    finally:
        db.close()
    _audit(cfg, "broker.backup", str(out.absolute()), f"backup of {sum(rows.values())} rows and {len(files)} files")
    return BackupSummary(out, size, rows, tuple(role for role, *_ in files), revision, created_at)


def _audit(cfg: BrokerConfig, action: str, target: str, reason: str) -> None:
    from broker.trust import Registry

    db = _open_db(cfg)
    try:
        Registry(db, node=cfg.broker.node_name).record_audit("local-security-admin", action, target, True, reason)
    except broker_db.DatabaseError as exc:
        raise BackupError(
            f"the {action.removeprefix('broker.')} of {target} is done, but the audit trail could not record it "
            f"({exc}); check the database, then 'vtpm-broker admin audit verify'"
        ) from None
    finally:
        db.close()


# --- restore ----------------------------------------------------------------------------


def _check_data_dir(cfg: BrokerConfig) -> None:
    """Nothing in the data directory but the master key (and an empty
    database file, checked with the database)."""
    data_dir = cfg.broker.data_dir
    if not data_dir.exists():
        return
    if not data_dir.is_dir():
        raise BackupError(f"broker.data_dir {data_dir} is not a directory; point it at a new, empty directory")
    allowed = {cfg.master_key.file.resolve()}
    source = _sqlite_file(cfg)
    if source is not None:
        allowed |= {Path(f"{source}{suffix}").resolve() for suffix in ("", "-wal", "-shm", "-journal")}
    others = sorted(p.name for p in data_dir.iterdir() if p.resolve() not in allowed)
    if others:
        raise BackupError(
            f"data directory {data_dir} is not empty (it holds {', '.join(others[:3])}"
            f"{', ...' if len(others) > 3 else ''}); restore into a new directory with only the master key in it"
        )


def _require_empty(conn, shown: str) -> None:
    require_empty(
        conn,
        shown,
        [_metadata.tables[name] for name in BROKER_TABLES],
        revision=_revision(conn),
        known_revisions=schema.known_revisions(),
        product="vtpm-broker",
    )


def restore(cfg: BrokerConfig, src: str | os.PathLike[str], progress: Progress | None = None) -> RestoreSummary:
    """Restore the backup at `src` into the empty database and data
    directory `cfg` names, with the master key file `cfg` names (the one of
    the broker that made the backup)."""
    src = Path(src)
    master = _master_key(cfg, "restore")
    with open_sealed(src, BROKER_BACKUP, master) as sealed:
        fields = sealed.fields
        revision = str(fields.get("schema_revision"))
        if revision != schema.head_revision():
            raise BackupError(
                f"the backup is at schema revision {revision}, this vtpm-broker restores {schema.head_revision()}; "
                "restore it with the vtpm-broker release that made it, then 'vtpm-broker db upgrade'"
            )
        expected = [*BROKER_TABLES, FILES.name]
        if [name for name, _ in sealed.tables] != expected:
            raise BackupError(
                f"the backup holds tables {', '.join(n for n, _ in sealed.tables)}, this release restores "
                f"{', '.join(expected)}; restore it with the release that made it"
            )
        provider = fields.get("provider_name")
        if provider != cfg.broker.provider_name:
            raise BackupError(
                f"the backup is of key provider {provider!r}, the configuration names {cfg.broker.provider_name!r}; "
                f'set provider_name = "{provider}" in [broker] (every key safe names it)'
            )
        counts = dict(sealed.tables)
        targets = _files(cfg)

        # The target first: refused before anything is read or written.
        _check_data_dir(cfg)
        source = _sqlite_file(cfg)
        created = source is not None and not source.exists()
        if not created:
            db = _open_db(cfg)
            try:
                with db.read() as conn:
                    _require_empty(conn, db.shown_url)
            finally:
                db.close()

        # Pass 1: authenticate and parse the whole file, write nothing.
        files: list[dict] = []
        for table, _info, rows in sealed.sections():
            if table.name == FILES.name:
                files.extend(rows)
        unknown = sorted({f["role"] for f in files} - set(targets))
        if unknown:
            raise BackupError(f"the backup holds a file of role {unknown[0]} this release does not know; report a bug")
        # A file configured outside the data directory (a shared audit key,
        # say) may already be there, with exactly the backup's bytes.
        to_write = []
        for record in files:
            path = targets[record["role"]][0]
            if path.is_symlink() or (path.exists() and path.read_bytes() != record["data"]):
                raise BackupError(
                    f"{path} exists and is not the backup's {record['role']}; "
                    "restore where it does not exist (remove it or check --config)"
                )
            if not path.exists():
                to_write.append(record)

        # Pass 2: schema, then every row in one transaction; the files are
        # written before it commits and removed again if it does not.
        cfg.broker.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        written: list[Path] = []
        restored = False
        db = _open_db(cfg)
        try:
            try:
                schema.upgrade(db)
            except (broker_db.DatabaseError, schema.SchemaError) as exc:
                raise BackupError(f"{exc}; nothing was restored") from None
            total = sum(n for name, n in counts.items() if name != FILES.name)
            done = 0
            if progress:
                progress(0, total)
            with db.begin() as conn:
                _require_empty(conn, db.shown_url)
                sections = {}
                for table, info, rows in sealed.sections():
                    if table.name == FILES.name:
                        continue
                    sections[table.name] = info
                    if rows:
                        conn.execute(insert(table), rows)
                        done += len(rows)
                        if progress:
                            progress(done, total)
                for name in BROKER_TABLES:
                    table = _metadata.tables[name]
                    set_high_water(conn, table, sections[name].get("autoincrement"))
                    stored = conn.execute(select(func.count()).select_from(table)).scalar_one()
                    if stored != counts[name]:
                        raise BackupError(
                            f"{name} holds {stored} rows after the restore, the backup {counts[name]}; "
                            "nothing was restored: restore into a new, empty database"
                        )
                for record in to_write:
                    path, mode, _required = targets[record["role"]]
                    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    try:
                        with atomic_file(path, mode, sync_dir=True, replace=False) as fh:
                            fh.write(record["data"])
                    except FileExistsError:
                        raise BackupError(f"{path} appeared during the restore; nothing was restored") from None
                    written.append(path)
            restored = True
        except SQLAlchemyError as exc:
            raise BackupError(
                f"cannot restore into {db.shown_url}: {describe_error(exc)}; nothing was restored"
            ) from None
        except broker_db.DatabaseError as exc:
            raise BackupError(f"{exc}; nothing was restored") from None
        except OSError as exc:
            raise BackupError(
                f"cannot write {exc.filename} ({exc.strerror}); nothing was restored: check the directory"
            ) from None
        finally:
            shown = db.shown_url
            db.close()
            if not restored:
                for path in written:
                    with contextlib.suppress(OSError):
                        path.unlink()
                if created and source is not None:
                    for suffix in ("", "-wal", "-shm", "-journal"):
                        with contextlib.suppress(FileNotFoundError):
                            Path(f"{source}{suffix}").unlink()
    _audit(
        cfg,
        "broker.restore",
        str(src.absolute()),
        f"restored the state of {fields.get('node')} at {fields.get('created_at')} "
        f"({total} rows, {len(written)} files)",
    )
    return RestoreSummary(
        path=src,
        database=shown,
        rows={k: v for k, v in counts.items() if k != FILES.name},
        files=tuple(written),
        schema_revision=revision,
        backup_created_at=str(fields.get("created_at")),
        backup_node=str(fields.get("node")),
    )
