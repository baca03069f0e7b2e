"""The broker's own state in SQLite or PostgreSQL, through SQLAlchemy Core.

The schema is versioned with Alembic as the KMS's is: broker/migrations/
builds exactly these tables (a test compares them), broker.schema applies
and checks it, `vtpm-broker db upgrade` runs it. A change to a table here
needs a migration there. ``Database.create_all`` is for unit tests only.

On PostgreSQL several broker processes share the database. Every write
transaction (``Database.begin``) first takes one transaction-scoped
advisory lock, so writers are serialized across processes exactly as
SQLite's BEGIN IMMEDIATE serializes them, and the read-check-write steps in
broker.trust (a token used once, an instance's state, the audit chain head)
stay correct. Reads (``Database.read``) take no lock: one REPEATABLE READ,
READ ONLY snapshot. (So never open a write transaction inside another one
on the same thread: on PostgreSQL it would wait for itself.)

Nothing secret is stored in the clear: CA private keys are sealed under the
broker's master key before they reach a row, enrollment tokens and poll
secrets are stored as SHA-256 digests only. Bound values are kept out of
exception text (``hide_parameters``), as in ``kms_server.storage.sql``.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    select,
    text,
)
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from kmip_core.db.engine import DatabaseUrlError, configure_sqlite, describe_error, open_engine, parse_db_url
from kmip_core.sealing.barrier import Barrier, BarrierError, read_key_file

__all__ = [
    "Database",
    "DatabaseError",
    "attest_nonces",
    "attest_policies",
    "attest_tokens",
    "audit",
    "audit_checkpoints",
    "cas",
    "ek_certificates",
    "enrollments",
    "host_tpms",
    "hosts",
    "instances",
    "meta",
    "metadata",
    "nvram_generations",
    "open_barrier",
    "tokens",
    "users",
    "vms",
]


class DatabaseError(Exception):
    """The broker database cannot be opened or used; one line, no values."""


metadata = MetaData()

# Management instances: pending -> trusted -> revoked (or rejected).
instances = Table(
    "broker_instances",
    metadata,
    Column("name", Text, primary_key=True),
    Column("state", Text, nullable=False),
    # SHA-256 (hex) of the instance's current certificate; only this one is
    # accepted while the instance is trusted.
    Column("cert_fingerprint", Text, nullable=True, unique=True),
    Column("cert_pem", Text, nullable=True),
    Column("pinned", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
    Column("changed_at", Float, nullable=False),
    Column("last_used_at", Float, nullable=True),
)

# One-time enrollment tokens: only the digest is kept.
tokens = Table(
    "broker_tokens",
    metadata,
    Column("token_sha256", Text, primary_key=True),
    Column("instance", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Column("used_at", Float, nullable=True),
)

enrollments = Table(
    "broker_enrollments",
    metadata,
    Column("id", Text, primary_key=True),
    Column("instance", Text, nullable=False),
    Column("csr_pem", Text, nullable=False),
    Column("poll_secret_sha256", Text, nullable=False),
    # pending, approved, rejected, superseded
    Column("state", Text, nullable=False),
    Column("certificate_pem", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("decided_at", Float, nullable=True),
    Index("ix_broker_enrollments_instance", "instance"),
)

hosts = Table(
    "broker_hosts",
    metadata,
    Column("name", Text, primary_key=True),
    Column("instance", Text, nullable=False),
    Column("cert_fingerprint", Text, nullable=False, unique=True),
    Column("cert_pem", Text, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_broker_hosts_instance", "instance"),
)

vms = Table(
    "broker_vms",
    metadata,
    Column("vm_uuid", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("instance", Text, nullable=False),
    Column("kms_key_id", Text, nullable=False, unique=True),
    Column("key_safe", Text, nullable=False),
    Column("host", Text, nullable=True),
    Column("created_at", Float, nullable=False),
    Column("changed_at", Float, nullable=False),
    # Cold migration (revision 0003): the trusted instance the owner (or an
    # administrator) released the VM to, who did, and when; NULL otherwise.
    # Only that instance may register the VM while its owner is trusted.
    Column("released_to", Text, nullable=True),
    Column("released_by", Text, nullable=True),
    Column("released_at", Float, nullable=True),
    # Key rotation (revision 0004, broker/rotation.py): NULL unless a rekey
    # is under way. "pending": rekey_kms_key_id/rekey_key_safe are the new
    # KEK and key safe (the VM's host may unwrap with either); "retiring":
    # they are the old ones, whose KEK is still to be deactivated.
    Column("rekey_kind", Text, nullable=True),
    Column("rekey_state", Text, nullable=True),
    Column("rekey_kms_key_id", Text, nullable=True),
    Column("rekey_key_safe", Text, nullable=True),
    Column("rekey_at", Float, nullable=True),
    Index("ix_broker_vms_instance", "instance"),
    Index("ix_broker_vms_rekey_kms_key_id", "rekey_kms_key_id", unique=True),
)

# People and tools that call the API with a certificate from the trust CA
# (`vtpm-broker admin issue-user`); their role comes from [roles].
users = Table(
    "broker_users",
    metadata,
    Column("name", Text, primary_key=True),
    Column("cert_fingerprint", Text, nullable=False, unique=True),
    Column("cert_pem", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# CA certificates with their private keys sealed under the master key
# (AAD = purpose, e.g. "ca:trust", "ca:ek"). state: "active" (one per
# purpose), "retired" (kept so certificates it issued still chain), or
# "pending" (a new key waiting for a third party to sign its CSR).
cas = Table(
    "broker_cas",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("purpose", Text, nullable=False),
    Column("state", Text, nullable=False),
    Column("cert_pem", Text, nullable=False),
    Column("chain_pem", Text, nullable=False, default=""),
    Column("sealed_key", LargeBinary, nullable=False),
    Column("created_at", Float, nullable=False),
    Index("ix_broker_cas_purpose", "purpose", "state"),
    sqlite_autoincrement=True,
)

# EK (and platform) certificates the vTPM CA issued, so that a CA swap can
# re-certify an existing vTPM's EK (`vtpm-broker ca recertify`).
ek_certificates = Table(
    "broker_ek_certificates",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("vm_uuid", Text, nullable=False),
    Column("cert_type", Text, nullable=False),
    Column("cert_der", LargeBinary, nullable=False),
    Column("ca_fingerprint", Text, nullable=False),
    Column("issued_to", Text, nullable=False),
    Column("issued_at", Float, nullable=False),
    Index("ix_broker_ek_certificates_vm", "vm_uuid", "cert_type"),
    sqlite_autoincrement=True,
)

# The last .nvram generation a host reported per VM (rollback protection,
# docs/nvram-format.md "Rollback"). Kept by VM UUID, so it survives the VM's
# re-registration by another instance after a loss of the management plane.
nvram_generations = Table(
    "broker_nvram_generations",
    metadata,
    Column("vm_uuid", Text, primary_key=True),
    Column("generation", BigInteger, nullable=False),
    Column("reported_by", Text, nullable=False),
    Column("reported_at", Float, nullable=False),
)

# Host attestation (docs/attestation.md). A host's TPM: the EK public key
# the security administrator pinned, the attestation key (AK) proven to live
# in that TPM (TPM2_MakeCredential / ActivateCredential), the AK of an
# enrollment under way (pending_*: the enrolled AK stays in force until the
# new one is proven), and what the host's last verified quote showed.
# state: pinned -> enrolled; revoked. Secrets are SHA-256 digests only.
host_tpms = Table(
    "broker_host_tpms",
    metadata,
    Column("host", Text, primary_key=True),
    Column("state", Text, nullable=False),
    Column("ek_fingerprint", Text, nullable=False),
    Column("ek_public_pem", Text, nullable=False),
    Column("ak_public", LargeBinary, nullable=True),
    Column("ak_name", Text, nullable=True),
    Column("pending_ak_public", LargeBinary, nullable=True),
    Column("pending_ak_name", Text, nullable=True),
    Column("pending_secret_sha256", Text, nullable=True),
    Column("pending_expires_at", Float, nullable=True),
    Column("pinned_by", Text, nullable=False),
    Column("pinned_at", Float, nullable=False),
    Column("enrolled_at", Float, nullable=True),
    # The TPM's clock and boot counters (TPMS_CLOCK_INFO) of the last
    # verified quote: a quote from an earlier boot, or an older one of the
    # same boot, is refused; a token is bound to the boot it was issued in.
    Column("reset_count", BigInteger, nullable=True),
    Column("restart_count", BigInteger, nullable=True),
    Column("clock", BigInteger, nullable=True),
    # "attested", "failed" or "no policy"; the reason; the PCRs quoted.
    Column("last_result", Text, nullable=True),
    Column("last_reason", Text, nullable=True),
    Column("last_quote_at", Float, nullable=True),
    Column("last_pcr_bank", Text, nullable=True),
    Column("last_pcrs", Text, nullable=True),
    Column("changed_at", Float, nullable=False),
)

# Accepted PCR values: per host ("host:<name>"), per host group (the hosts
# of a management instance, "instance:<name>") or for every host
# ("default"); the most specific applies. `pcrs` is JSON {"index": "hex"};
# `digest` names the policy's content, so a token issued under an older
# policy is refused.
attest_policies = Table(
    "broker_attest_policies",
    metadata,
    Column("scope", Text, primary_key=True),
    Column("pcr_bank", Text, nullable=False),
    Column("pcrs", Text, nullable=False),
    Column("digest", Text, nullable=False),
    Column("source", Text, nullable=False),
    Column("created_by", Text, nullable=False),
    Column("created_at", Float, nullable=False),
)

# A challenge's nonce, single use, short-lived (SHA-256 only).
attest_nonces = Table(
    "broker_attest_nonces",
    metadata,
    Column("nonce_sha256", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("expires_at", Float, nullable=False),
)

# Attestation tokens (SHA-256 only): what a host shows the gateway with each
# unwrap, valid until `expires_at` and only for the boot, AK and policy it
# was issued under.
attest_tokens = Table(
    "broker_attest_tokens",
    metadata,
    Column("token_sha256", Text, primary_key=True),
    Column("host", Text, nullable=False),
    Column("ak_name", Text, nullable=False),
    Column("reset_count", BigInteger, nullable=False),
    Column("restart_count", BigInteger, nullable=False),
    Column("policy_scope", Text, nullable=False),
    Column("policy_digest", Text, nullable=False),
    Column("issued_at", Float, nullable=False),
    Column("expires_at", Float, nullable=False),
    Index("ix_broker_attest_tokens_host", "host"),
)

# The audit trail: every trust decision and key access, hash-chained
# (broker/audit_trail.py, docs/audit-trail.md). `body` is the canonical JSON
# the hash covers; the other columns repeat its fields for queries and are
# checked against it. Records from before that format (revision 0001) have
# no body: they are checked by their own rule up to the carry-over record.
audit = Table(
    "broker_audit",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", Text, nullable=False),
    Column("action", Text, nullable=False),
    Column("target", Text, nullable=False),
    Column("allowed", Boolean, nullable=False),
    Column("reason", Text, nullable=False),
    Column("prev_hash", Text, nullable=False),
    Column("hash", Text, nullable=False),
    Column("body", Text, nullable=True),
    sqlite_autoincrement=True,
)

# Ed25519-signed checkpoints of the audit chain's head, written
# periodically and at stop; a removed tail or a rewritten chain shows
# against them.
audit_checkpoints = Table(
    "broker_audit_checkpoints",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=False),
    Column("time", Float, nullable=False),
    Column("node", Text, nullable=False),
    Column("head_hash", Text, nullable=False),
    Column("key_id", Text, nullable=False),
    Column("signature", Text, nullable=False),
)

meta = Table(
    "broker_meta",
    metadata,
    Column("key", Text, primary_key=True),
    Column("value", LargeBinary, nullable=False),
)

_PG_AUDIT_LOCK_ID = 0x76746D61  # "vtma": serializes appends to the audit chain
_PG_WRITE_LOCK_ID = 0x76746D77  # "vtmw": serializes write transactions, as SQLite's BEGIN IMMEDIATE


class Database:
    """An engine and transactions; the repository logic lives in broker/registry/."""

    def __init__(self, db_url: str, *, pool_size: int = 8) -> None:
        try:
            url, self.shown_url = parse_db_url(db_url)
        except DatabaseUrlError as exc:
            raise DatabaseError(str(exc)) from None
        self.dialect = url.get_backend_name()
        try:
            # PostgreSQL: every checkout pings (pool_pre_ping), not only
            # after idling as kms-server's do: the gateway does not run a
            # request again, so a connection that died in a failover must
            # not reach a request.
            ping = {"pool_pre_ping": True} if self.dialect == "postgresql" else {}
            self.engine: Engine = open_engine(url, pool_size=pool_size, **ping)
            # Reads (the gateway's hot path: authorize_unwrap) need no write
            # lock. On SQLite a second engine opens plain deferred,
            # query-only transactions, which WAL lets run beside a writer; on
            # PostgreSQL the same pool opens read-only REPEATABLE READ
            # transactions (one snapshot).
            if self.dialect == "sqlite":
                configure_sqlite(self.engine)
                self.read_engine: Engine = open_engine(url, pool_size=pool_size)
                configure_sqlite(self.read_engine, begin="BEGIN", wal=False, query_only=True)
            else:
                self.read_engine = self.engine.execution_options(
                    isolation_level="REPEATABLE READ", postgresql_readonly=True
                )
        except (SQLAlchemyError, ImportError) as exc:
            raise DatabaseError(f"cannot open {self.shown_url}: {exc}") from None

    def create_all(self) -> None:
        """Create missing tables (no migrations yet; see the module note)."""
        try:
            metadata.create_all(self.engine)
        except SQLAlchemyError as exc:
            raise DatabaseError(f"cannot create the broker tables in {self.shown_url}: {describe_error(exc)}") from None

    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        """One transaction: committed when the block ends, rolled back if it
        raises. SQLite takes its write lock at BEGIN (see configure_sqlite),
        PostgreSQL the broker's write lock (see the module note)."""
        try:
            with self.engine.begin() as conn:
                if self.dialect == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_WRITE_LOCK_ID})
                yield conn
        except SQLAlchemyError as exc:
            raise DatabaseError(f"broker database error: {describe_error(exc)}") from None

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A transaction for reading only (one consistent snapshot)."""
        try:
            with self.read_engine.begin() as conn:
                yield conn
        except SQLAlchemyError as exc:
            raise DatabaseError(f"broker database error: {describe_error(exc)}") from None

    def lock_audit_chain(self, conn: Connection) -> None:
        """Serialize audit appends across processes (SQLite: BEGIN IMMEDIATE
        already does)."""
        if self.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _PG_AUDIT_LOCK_ID})

    def get_meta(self, conn: Connection, key: str) -> bytes | None:
        return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

    def set_meta(self, conn: Connection, key: str, value: bytes) -> None:
        if conn.execute(select(meta.c.key).where(meta.c.key == key)).first() is None:
            conn.execute(meta.insert().values(key=key, value=value))
        else:
            conn.execute(meta.update().where(meta.c.key == key).values(value=value))

    # CAs ----------------------------------------------------------------------

    def put_ca(self, purpose: str, cert_pem: str, sealed_key: bytes, chain_pem: str = "", state: str = "active") -> int:
        """Store a CA row; a new active CA retires the previous one, a new
        pending one replaces the previous pending one. Returns its id."""
        if state not in ("active", "pending"):
            raise ValueError("state must be 'active' or 'pending'")
        with self.begin() as conn:
            if state == "active":
                conn.execute(
                    cas.update().where(cas.c.purpose == purpose, cas.c.state == "active").values(state="retired")
                )
            conn.execute(cas.delete().where(cas.c.purpose == purpose, cas.c.state == "pending"))
            result = conn.execute(
                cas.insert().values(
                    purpose=purpose,
                    state=state,
                    cert_pem=cert_pem,
                    chain_pem=chain_pem,
                    sealed_key=sealed_key,
                    created_at=time.time(),
                )
            )
            key = result.inserted_primary_key
            assert key is not None  # set after a single-row INSERT (SQLAlchemy types it Optional)
            return int(key[0])

    def get_ca(self, purpose: str, state: str = "active"):
        """The newest row of that purpose and state (id, cert_pem, chain_pem,
        sealed_key, created_at), or None."""
        with self.read() as conn:
            return conn.execute(
                select(cas).where(cas.c.purpose == purpose, cas.c.state == state).order_by(cas.c.id.desc()).limit(1)
            ).first()

    def list_cas(self, purpose: str) -> list:
        """Every CA row of the purpose, oldest first (sealed keys included:
        they are sealed)."""
        with self.read() as conn:
            return list(conn.execute(select(cas).where(cas.c.purpose == purpose).order_by(cas.c.id)).all())

    def close(self) -> None:
        self.engine.dispose()
        if self.dialect == "sqlite":
            self.read_engine.dispose()


# --- The master key ---------------------------------------------------------------

_CHECK_META = "barrier.check"
_CHECK_PURPOSE = "broker:master-key-check"
_CHECK_PLAINTEXT = b"vtpm-broker master key check v1"


def open_barrier(db: Database, key_file) -> Barrier:
    """The barrier for the broker's master key file. The first use records
    a check value; later uses refuse a different key before anything is
    unsealed with it. Raises BarrierError with one line."""
    barrier = Barrier(read_key_file(key_file))
    with db.begin() as conn:
        check = db.get_meta(conn, _CHECK_META)
        if check is None:
            db.set_meta(conn, _CHECK_META, barrier.seal(_CHECK_PURPOSE, _CHECK_PLAINTEXT))
            return barrier
    try:
        opened = barrier.unseal(_CHECK_PURPOSE, check)
    except BarrierError:
        opened = None
    if opened != _CHECK_PLAINTEXT:
        raise BarrierError(
            f"master key {key_file} does not open this broker database; give the key file it was created with"
        )
    return barrier
