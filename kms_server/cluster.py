"""What a node tells the cluster about itself, and what an operator reads.

Nodes keep no state another node needs: the only cluster-wide record is a
heartbeat row per node in `kms_nodes` (for `kms-admin cluster status`).
Work that must happen once per cluster (pruning nodes gone for a week) runs
on whichever node takes a PostgreSQL advisory lock first; on SQLite there
is one node, so it just runs.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from sqlalchemy import delete, select, text, update
from sqlalchemy.dialects import postgresql as pg_dialect
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from kmip_core import __version__
from kms_server.storage.sql import kms_nodes, writer_flock

log = logging.getLogger("kms_server.cluster")

HEARTBEAT_SECONDS = 10.0
RECENT_SECONDS = 60.0
PRUNE_AFTER_SECONDS = 7 * 24 * 3600.0
_PRUNE_LOCK_ID = 0x6B6D7350  # "kmsP"


@dataclass(frozen=True)
class NodeRecord:
    name: str
    address: str
    version: str
    pid: int
    started_at: float
    last_seen: float


class Heartbeat:
    """Upserts this node's row; called from a worker thread, never the
    reactor thread. `lock_path`: on SQLite, the writers' flock file, held
    around each write (kms_server.storage.sql.writer_flock)."""

    def __init__(self, engine: Engine, name: str, address: str, lock_path: str | None = None):
        self.engine = engine
        self.name = name
        self.address = address
        self.lock_path = lock_path
        self.started_at = time.time()

    def beat(self) -> None:
        now = time.time()
        row = {
            "name": self.name,
            "address": self.address,
            "version": __version__,
            "pid": os.getpid(),
            "started_at": self.started_at,
            "last_seen": now,
        }
        dialect = pg_dialect if self.engine.dialect.name == "postgresql" else sqlite_dialect
        stmt = dialect.insert(kms_nodes).values(**row)
        stmt = stmt.on_conflict_do_update(index_elements=["name"], set_={k: v for k, v in row.items() if k != "name"})
        try:
            with writer_flock(self.lock_path):
                with self.engine.begin() as conn:
                    conn.execute(stmt)
                prune_once(self.engine, now)
        except SQLAlchemyError as exc:
            # A heartbeat is best effort: the database may be failing over.
            log.warning("heartbeat not recorded: %s", (str(getattr(exc, "orig", exc)).splitlines() or ["?"])[0])

    def leave(self) -> None:
        """Mark this node as gone (clean stop) so status does not wait a
        minute to stop listing it."""
        try:
            with writer_flock(self.lock_path), self.engine.begin() as conn:
                conn.execute(update(kms_nodes).where(kms_nodes.c.name == self.name).values(last_seen=0.0))
        except SQLAlchemyError:
            pass


def prune_once(engine: Engine, now: float) -> bool:
    """Delete nodes not seen for a week, on one node of the cluster only.
    True if this node did it."""
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            got = conn.execute(text("SELECT pg_try_advisory_xact_lock(:id)"), {"id": _PRUNE_LOCK_ID}).scalar()
            if not got:
                return False
        conn.execute(delete(kms_nodes).where(kms_nodes.c.last_seen < now - PRUNE_AFTER_SECONDS))
    return True


def nodes(engine: Engine) -> list[NodeRecord]:
    with engine.connect() as conn:
        rows = conn.execute(select(kms_nodes).order_by(kms_nodes.c.name)).all()
    return [NodeRecord(**row._mapping) for row in rows]


@dataclass(frozen=True)
class Standby:
    application_name: str
    client_addr: str
    state: str
    sync_state: str
    replay_lag_seconds: float | None
    lag_bytes: int | None


@dataclass(frozen=True)
class DatabaseRole:
    backend: str
    role: str  # "primary", "standby", or "embedded"
    server_version: str
    standbys: list[Standby]


def database_role(engine: Engine) -> DatabaseRole:
    with engine.connect() as conn:
        if conn.dialect.name != "postgresql":
            version = conn.execute(text("select sqlite_version()")).scalar()
            return DatabaseRole("sqlite", "embedded", str(version), [])
        in_recovery = conn.execute(text("SELECT pg_is_in_recovery()")).scalar()
        version = conn.execute(text("SHOW server_version")).scalar()
        standbys = []
        if not in_recovery:
            rows = conn.execute(
                text(
                    "SELECT application_name, coalesce(client_addr::text, 'local') AS client_addr, state, sync_state, "
                    "extract(epoch FROM replay_lag) AS replay_lag, "
                    "pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint AS lag_bytes "
                    "FROM pg_stat_replication ORDER BY application_name"
                )
            ).all()
            standbys = [
                Standby(
                    r.application_name,
                    r.client_addr,
                    r.state,
                    r.sync_state,
                    None if r.replay_lag is None else float(r.replay_lag),
                    None if r.lag_bytes is None else int(r.lag_bytes),
                )
                for r in rows
            ]
        return DatabaseRole("postgresql", "standby" if in_recovery else "primary", str(version), standbys)
