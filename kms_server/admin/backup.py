"""``kms-admin backup`` and ``restore``: a consistent, encrypted and
authenticated copy of the store (format: docs/backup-format.md).

The backup reads every backed-up table in one read-only transaction (a
snapshot), so a server may keep running; rows are streamed in batches and
never held all at once. The file is the sealed backup format of
`kmip_core.backup_format` with the KMS's signature: the row stream is cut
into chunks sealed under a random backup key that the master key wraps into
the header, so a master key that never leaves its token works, and a backup
stays restorable with the master key it was made under after a rotation.
Sealed key material stays sealed as it is in the database: the backup layer
is a second layer that also hides attribute values (names, ``x-`` tags).

What is the KMS's own is here: its tables, the configured master key (file,
passphrase with its scrypt salt, or token) and what the header says of it,
its schema revisions, and format 1 (sealed under the raw master key), which
a restore still reads.

Restore authenticates the whole file before it touches the target, which
must be empty; it then inserts every row in one transaction and checks the
counts, so a restore either gives back the whole store or writes nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Table, insert, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from kmip_core import backup_format
from kmip_core.backup_format import (
    BackupError,
    BackupHeader,
    BackupKind,
    Progress,
    check_output,
    count_rows,
    made_under,
    open_backup,
    require_empty,
    set_high_water,
    table_section,
    unwrap_backup_key,
    write_sealed,
)
from kmip_core.db.engine import DatabaseUrlError, configure_sqlite, open_engine, parse_db_url, refresh_statistics
from kmip_core.sealing import barrier
from kmip_core.sealing.master_key import SALT_META, SCRYPT_N, SCRYPT_P, SCRYPT_R, MasterKey, MasterKeyError
from kmip_core.sealing.opener import open_master_key
from kms_server.config import Config
from kms_server.storage import schema
from kms_server.storage import sql as sql_tables

log = logging.getLogger("kms_server.admin.backup")

__all__ = [
    "BACKUP_TABLES",
    "KMS_BACKUP",
    "NOT_BACKED_UP",
    "BackupError",
    "BackupSummary",
    "Progress",
    "RestoreSummary",
    "backup",
    "describe_rows",
    "restore",
]

MAGIC = b"\x89KMSBAK\n"

# The tables a backup holds, parents before children (restore inserts in
# this order). A table added to kms_server.storage.sql (the audit trail) goes
# here or into NOT_BACKED_UP; a test fails until it is in one of them.
BACKUP_TABLES: tuple[str, ...] = (
    "kms_meta",
    "kms_objects",
    "kms_attributes",
    "kms_audit",
    "kms_audit_checkpoints",
)
NOT_BACKED_UP: dict[str, str] = {
    "kms_nodes": "liveness of running nodes: each node records itself again when it starts",
}

# How summaries name the rows of each table, in the order they list them.
_DESCRIPTIONS = {
    "kms_objects": ("object", "objects"),
    "kms_attributes": ("attribute", "attributes"),
    "kms_meta": ("server value", "server values"),
    "kms_audit": ("audit record", "audit records"),
    "kms_audit_checkpoints": ("audit checkpoint", "audit checkpoints"),
}


@dataclass(frozen=True)
class BackupSummary:
    path: Path
    size: int
    rows: dict[str, int]
    chunks: int
    schema_revision: str
    created_at: str
    node: str


@dataclass(frozen=True)
class RestoreSummary:
    path: Path
    database: str
    rows: dict[str, int]
    schema_revision: str
    backup_created_at: str
    backup_node: str


def describe_rows(rows: dict[str, int]) -> str:
    """'3 objects, 12 attributes, 1 server value' for a summary's rows."""
    return backup_format.describe_rows(rows, _DESCRIPTIONS)


KMS_BACKUP = BackupKind(MAGIC, "kms-server", "kms-admin", sql_tables.metadata)


# --- master key -----------------------------------------------------------------------
#
# Format 2: the backup key is wrapped under the configured master key
# (kmip_core.backup_format). Format 1 (read only) derived the chunk key from
# the raw master key bytes, which a token never gives out.


class _Meta:
    """kms_meta rows as the barrier reads them (get_meta)."""

    def __init__(self, meta: dict[str, bytes]):
        self._meta = meta

    def get_meta(self, name: str, for_update: bool = False) -> bytes | None:
        return self._meta.get(name)


def _open_master_key(cfg: Config, get_meta: Callable[[str], bytes | None]) -> MasterKey:
    try:
        return open_master_key(cfg.master_key, get_meta)
    except MasterKeyError as exc:
        raise BackupError(str(exc)) from None


def _close(master: MasterKey) -> None:
    close = getattr(master, "close", None)  # a token key holds a session
    if close is not None:
        close()


def _opens_store(master: MasterKey, meta: dict[str, bytes]) -> bool:
    """True if `master` opens the store whose kms_meta rows are `meta`: it
    unwraps the keyring, or (a store made before the keyring) its raw bytes
    open the check record."""
    if meta.get(barrier.KEYRING_META) is not None:
        try:
            barrier.read_keyring(_Meta(meta), master)
        except barrier.BarrierError:
            return False
        return True
    check = meta.get(barrier.CHECK_META)
    if check is None:
        raise BackupError(
            "the database holds no master-key check record (no node has opened it yet); "
            "start kms-server on it once, then back it up"
        )
    legacy = master.legacy_key()
    return legacy is not None and barrier.opens_check_record(barrier.Barrier(legacy), check)


def _source(cfg: Config, master: MasterKey, meta: dict[str, bytes]) -> dict[str, Any]:
    """The header's master_key member: which key wrapped the backup key, for
    restore and for the operator (no secret; the scrypt salt is not one)."""
    mk = cfg.master_key
    how: dict[str, Any] = {"key_id": master.key_id}
    if mk.pkcs11_module is not None:
        how.update(source="pkcs11", token_label=mk.token_label, key_label=mk.key_label)
    elif mk.passphrase_file is not None:
        salt = meta[SALT_META]  # open_master_key has read it
        how.update(source="passphrase", scrypt={"salt": salt.hex(), "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P})
    else:
        how.update(source="file")
    return how


def _scrypt_salt(how: Any) -> bytes | None:
    """The passphrase salt a backup header names (None: not a passphrase)."""
    if not isinstance(how, dict) or how.get("source") != "passphrase":
        return None
    params = how.get("scrypt") or {}
    if (params.get("n"), params.get("r"), params.get("p")) != (SCRYPT_N, SCRYPT_R, SCRYPT_P):
        raise BackupError(
            "the backup uses scrypt parameters this release does not; restore it with the release that made it"
        )
    try:
        return bytes.fromhex(params["salt"])
    except (KeyError, TypeError, ValueError):
        raise BackupError("the backup header has a malformed scrypt salt; use an intact copy of the backup") from None


def _restore_key(cfg: Config, header: BackupHeader) -> bytes:
    """The key the backup's chunks are sealed under (format 2: the backup
    key the configured master key unwraps; format 1: the master key's raw
    bytes)."""
    fields = header.fields
    how = fields.get("master_key")
    scrypt_salt = _scrypt_salt(how)
    if cfg.master_key.passphrase_file is not None and scrypt_salt is None:
        raise BackupError(
            f"the backup was made under {made_under(how)}, not a passphrase; "
            "configure the master key of the server that made it"
        )
    master = _open_master_key(cfg, lambda name: scrypt_salt if name == SALT_META else None)
    try:
        if header.version == 1:
            legacy = master.legacy_key()
            if legacy is None:
                raise BackupError(
                    "the backup is format 1, sealed under a key file or passphrase, which a token key cannot open; "
                    "restore it with the key file or passphrase of the server that made it"
                )
            return legacy
        return unwrap_backup_key(master, fields, header.salt, MAGIC)
    finally:
        _close(master)


# --- database ---------------------------------------------------------------------------


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).splitlines() or ["?"])[0]


def _database_url(cfg: Config) -> tuple[Any, str]:
    url = cfg.storage.db_url
    if url.startswith("memory:"):
        raise BackupError("the in-memory store cannot be backed up or restored; give a sqlite:// or postgresql:// URL")
    try:
        return parse_db_url(url)
    except DatabaseUrlError as exc:
        raise BackupError(str(exc)) from None


def _sqlite_path(url: Any) -> Path | None:
    if url.get_backend_name() != "sqlite":
        return None
    return Path(url.database) if url.database else None


def _engine(url: Any, *, sqlite_begin: str) -> Engine:
    engine = open_engine(url, poolclass=NullPool)
    if url.get_backend_name() == "sqlite":
        configure_sqlite(engine, begin=sqlite_begin, wal=False)
    return engine


def _tables() -> list[Table]:
    missing = [name for name in BACKUP_TABLES if name not in sql_tables.metadata.tables]
    if missing:  # pragma: no cover - a programming error in this release
        raise BackupError(f"this release has no table {missing[0]}; report a bug")
    return [sql_tables.metadata.tables[name] for name in BACKUP_TABLES]


def _revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


@contextlib.contextmanager
def _snapshot(engine: Engine) -> Iterator[Connection]:
    """One read-only transaction that sees one state of the database."""
    with engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn = conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
        with conn.begin():
            yield conn


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def backup(
    cfg: Config, out_path: str | os.PathLike[str], progress: Progress | None = None, *, overwrite: bool = False
) -> BackupSummary:
    """Write a backup of the store `cfg` names to `out_path` (mode 0600,
    atomically). `progress` is called with (rows written, rows in total)."""
    out_path = Path(out_path)
    check_output(out_path, overwrite)
    url, shown = _database_url(cfg)
    source_file = _sqlite_path(url)
    if source_file is not None and not source_file.is_file():
        raise BackupError(f"database {shown} does not exist; check storage.db_url or --db-url")
    tables = _tables()
    engine = _engine(url, sqlite_begin="BEGIN")
    try:
        with _snapshot(engine) as conn:
            revision = _revision(conn)
            head = schema.head_revision()
            if revision != head:
                raise BackupError(
                    f"database {shown} is at schema revision {revision or 'none'}, this kms-admin reads {head}; "
                    "run 'kms-admin db upgrade' (or use the kms-admin of the server's release)"
                )
            counts = {t.name: count_rows(conn, t) for t in tables}
            meta_table = sql_tables.kms_meta
            meta = {k: bytes(v) for k, v in conn.execute(select(meta_table.c.key, meta_table.c.value))}
            master = _open_master_key(cfg, meta.get)
            try:
                if not _opens_store(master, meta):
                    raise BackupError(
                        f"the configured master key does not open this database ({master.description}); "
                        "configure the key file, passphrase or token key its servers use"
                    )
                created_at = _now()
                fields = {
                    "schema_revision": revision,
                    "created_at": created_at,
                    "node": cfg.server.node_name,
                    "database": conn.dialect.name,
                    "master_key": _source(cfg, master, meta),
                }
                sections = [table_section(conn, t, counts[t.name]) for t in tables]
                size, chunks = write_sealed(
                    out_path, KMS_BACKUP, master, fields, sections, progress, overwrite=overwrite
                )
            finally:
                _close(master)
    except SQLAlchemyError as exc:
        raise BackupError(
            f"cannot read {shown}: {_first_line(exc)}; check storage.db_url and that the database is reachable"
        ) from None
    finally:
        engine.dispose()
    return BackupSummary(
        path=out_path,
        size=size,
        rows=counts,
        chunks=chunks,
        schema_revision=revision,
        created_at=created_at,
        node=cfg.server.node_name,
    )


# --- restore ----------------------------------------------------------------------------


def _require_empty(conn: Connection, shown: str) -> None:
    require_empty(
        conn,
        shown,
        [sql_tables.metadata.tables[name] for name in BACKUP_TABLES],
        revision=_revision(conn),
        known_revisions=schema.known_revisions(),
        product="kms-admin",
    )


def restore(
    cfg: Config,
    in_path: str | os.PathLike[str],
    progress: Progress | None = None,
    *,
    verify_progress: Progress | None = None,
) -> RestoreSummary:
    """Restore the backup at `in_path` into the empty database `cfg` names.

    The whole file is authenticated first (`verify_progress`: rows checked),
    before anything is written; then every row goes in within one
    transaction (`progress`: rows inserted), and the counts are checked
    before it commits.
    """
    in_path = Path(in_path)
    url, shown = _database_url(cfg)

    def chunk_key(header: BackupHeader) -> bytes:
        # What this release restores is checked before the master key is opened.
        revision = header.fields["schema_revision"]
        head = schema.head_revision()
        if revision != head:
            raise BackupError(
                f"the backup is at schema revision {revision}, this kms-admin restores {head}; "
                "restore it with the kms-admin release that made it, then upgrade"
            )
        if [name for name, _ in header.tables] != list(BACKUP_TABLES):
            raise BackupError(
                f"the backup holds tables {', '.join(n for n, _ in header.tables)}, this release restores "
                f"{', '.join(BACKUP_TABLES)}; restore it with the release that made it"
            )
        return _restore_key(cfg, header)

    with open_backup(in_path, KMS_BACKUP, chunk_key) as sealed:
        fields = sealed.fields
        revision = fields["schema_revision"]
        counts = dict(sealed.tables)
        total = sum(counts.values())

        target_file = _sqlite_path(url)
        # A SQLite file that does not exist yet is empty: it is created (the
        # engine makes it, mode 0600) only once the data is good, and removed
        # again if the restore fails after that.
        created = target_file is not None and not target_file.exists()
        engine = None
        restored = False
        try:
            # Fail fast on a non-empty target.
            if not created:
                engine = _engine(url, sqlite_begin="BEGIN IMMEDIATE")
                with engine.connect() as conn:
                    _require_empty(conn, shown)

            # Pass 1: authenticate and parse everything, write nothing.
            done = 0
            if verify_progress:
                verify_progress(0, total)
            for _table, _info, rows in sealed.sections():
                done += len(rows)
                if verify_progress and rows:
                    verify_progress(done, total)

            # Pass 2: schema, then every row in one transaction.
            if engine is None:
                assert target_file is not None  # created: a SQLite file not there yet
                target_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                engine = _engine(url, sqlite_begin="BEGIN IMMEDIATE")
            try:
                schema.upgrade(engine)
            except schema.SchemaError as exc:
                raise BackupError(str(exc)) from None
            done = 0
            if progress:
                progress(0, total)
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    # Nothing else may write these tables until the restore commits.
                    conn.execute(text("LOCK TABLE " + ", ".join(BACKUP_TABLES) + " IN EXCLUSIVE MODE"))
                _require_empty(conn, shown)
                if _revision(conn) != revision:  # pragma: no cover - upgrade just brought it to head
                    raise BackupError(
                        f"database {shown} is not at schema revision {revision} after the upgrade; report a bug"
                    )
                sections = {}
                for table, info, rows in sealed.sections():
                    sections[table.name] = info
                    if rows:
                        conn.execute(insert(table), rows)
                        done += len(rows)
                        if progress:
                            progress(done, total)
                for name in BACKUP_TABLES:
                    table = sql_tables.metadata.tables[name]
                    set_high_water(conn, table, sections[name].get("autoincrement"))
                    stored = count_rows(conn, table)
                    if stored != counts[name]:
                        raise BackupError(
                            f"{name} holds {stored} rows after the restore, the backup {counts[name]}; "
                            "nothing was restored: restore into a new, empty database"
                        )
            restored = True
            # The planner's statistics for the rows just loaded (PostgreSQL):
            # without them every lookup by object is planned as a scan
            # until autovacuum (if it is on) gets there.
            try:
                refresh_statistics(engine, BACKUP_TABLES)
            except SQLAlchemyError as exc:
                log.warning("restored, but ANALYZE failed (run it by hand): %s", _first_line(exc))
        except SQLAlchemyError as exc:
            raise BackupError(
                f"cannot restore into {shown}: {_first_line(exc)}; nothing was restored: check --db-url, "
                "that the database exists and is reachable"
            ) from None
        finally:
            if engine is not None:
                engine.dispose()
            if created and not restored:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    with contextlib.suppress(FileNotFoundError):
                        Path(f"{target_file}{suffix}").unlink()
    return RestoreSummary(
        path=in_path,
        database=shown,
        rows=counts,
        schema_revision=revision,
        backup_created_at=str(fields.get("created_at")),
        backup_node=str(fields.get("node")),
    )
