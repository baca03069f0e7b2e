"""The trust registry: enrollment tokens, management instances, hosts, VM
placement, the unwrap policy and the audit trail (docs/broker-design.md).

Every method is one database transaction and is safe to call from several
threads (the API and the gateway run requests on worker pools). Failures are
the exceptions below, each with a one-line message meant for the caller;
``broker.api`` maps them to HTTP statuses in one table.

Secrets never reach a row: tokens and poll secrets are stored as SHA-256
digests, compared in constant time.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from cryptography import x509
from sqlalchemy import and_, bindparam, func, or_, select, update

from broker import audit_trail
from broker.db import (
    Database,
    DatabaseError,
    audit,
    enrollments,
    hosts,
    instances,
    nvram_generations,
    tokens,
    users,
    vms,
)
from broker.request_scope import record_made
from broker.trust_ca import (
    CertificateRequestError,
    TrustCa,
    cert_pem,
    fingerprint,
    load_certificate_pem,
    load_csr_pem,
)
from kmip_core.audit.chain import GENESIS, Report
from kmip_core.db.group_commit import GroupCommit

__all__ = [
    "AUDIT_GENESIS",
    "AuditRecord",
    "Caller",
    "Conflict",
    "Decision",
    "Enrollment",
    "InstanceInfo",
    "InvalidRequest",
    "NotFound",
    "Refused",
    "Registry",
    "TrustError",
    "Unprocessable",
    "VmRecord",
    "check_host_name",
    "check_instance_name",
    "check_vm_name",
    "check_vm_uuid",
]

AUDIT_GENESIS = GENESIS
# .nvram generations are u64 in the file; the database column is a signed 64-bit integer.
MAX_NVRAM_GENERATION = 2**63 - 1
DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = 30 * 86400
# last_used_at is written at most this often per instance, not per request.
LAST_USED_RESOLUTION = 60.0

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


# --- Errors (api.py maps each to one HTTP status) --------------------------------


class TrustError(Exception):
    """A request the registry will not carry out; one line for the caller."""


class InvalidRequest(TrustError):
    """A value is malformed (400)."""


class Refused(TrustError):
    """The caller may not do this (403)."""


class NotFound(TrustError):
    """No such object, or one the caller may not see (404)."""


class Conflict(TrustError):
    """The name or object is taken (409)."""


class Unprocessable(TrustError):
    """Well-formed but unusable: another provider, a key the KMS lacks (422)."""


# --- Values ---------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    """The unwrap policy's answer for one host and one KMS key.

    ``vm_uuid`` is None when the host may not know that the key exists (the
    gateway answers ITEM_NOT_FOUND); set when the key is one of the host's
    instance's VMs but the host is not allowed (PERMISSION_DENIED).
    """

    allowed: bool
    reason: str
    host: str | None
    instance: str | None
    vm_uuid: str | None


@dataclass(frozen=True)
class Caller:
    """Who is calling, from a verified client certificate.

    kind: "instance" (a trusted management instance), "host" (a host
    registered by a trusted instance) or "user" (a certificate issued with
    `vtpm-broker admin issue-user`, role from [roles]).
    """

    kind: str
    name: str
    instance: str | None
    fingerprint: str


@dataclass(frozen=True)
class Enrollment:
    enrollment_id: str
    poll_secret: str

    def __repr__(self) -> str:  # Never the secret.
        return f"Enrollment({self.enrollment_id!r})"


@dataclass(frozen=True)
class InstanceInfo:
    name: str
    state: str
    pinned: bool
    cert_fingerprint: str | None
    created_at: float
    changed_at: float
    last_used_at: float | None
    hosts: int
    vms: int
    pending_enrollment: bool


@dataclass(frozen=True)
class VmRecord:
    vm_uuid: str
    name: str
    instance: str
    kms_key_id: str
    key_safe: str
    host: str | None
    # The last .nvram generation a host reported (0: none yet), where the
    # query read it (list_vms); vtpm-mgmt vm check compares it with the
    # datastore's .nvram to find rolled-back copies.
    nvram_generation: int = 0
    # The trusted instance the VM is released to (cold migration), if any.
    released_to: str | None = None
    # A key rotation under way (broker/rotation.py): kind "shallow"|"deep",
    # state "pending"|"retiring"; the new KEK and key safe while pending,
    # the old ones while retiring. None when there is none.
    rekey_kind: str | None = None
    rekey_state: str | None = None
    rekey_kms_key_id: str | None = None
    rekey_key_safe: str | None = None


# A broker_audit row; `body` is the canonical JSON the hash covers (None: a
# record from before the format change). One type with the export's rows.
AuditRecord = audit_trail.Stored


# --- Validation -----------------------------------------------------------------


def check_instance_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest(
            "instance name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return name


def check_host_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise InvalidRequest("host name must be 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return name


def check_vm_uuid(value: object) -> str:
    """The canonical lowercase form of a VM UUID."""
    if not isinstance(value, str) or len(value) > 64:
        raise InvalidRequest("vm_uuid must be a UUID such as 564d1f2a-0c3e-4b6e-9f1a-2b3c4d5e6f70")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidRequest("vm_uuid must be a UUID such as 564d1f2a-0c3e-4b6e-9f1a-2b3c4d5e6f70") from None


def check_vm_name(value: object) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 255 or _CONTROL.search(value):
        raise InvalidRequest("name must be 1-255 characters without control characters")
    return value


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _insert_vm(conn, record: VmRecord, now: float) -> None:
    conn.execute(
        vms.insert().values(
            vm_uuid=record.vm_uuid,
            name=record.name,
            instance=record.instance,
            kms_key_id=record.kms_key_id,
            key_safe=record.key_safe,
            host=record.host,
            created_at=now,
            changed_at=now,
        )
    )


# --- The registry ---------------------------------------------------------------


# Statements the hot paths run, built once: SQLAlchemy then only binds the
# parameters.
_AUDIT_HEAD = select(audit.c.seq, audit.c.hash).order_by(audit.c.seq.desc()).limit(1)
# A VM with the last .nvram generation a host reported for it (NULL: none).
_VM_WITH_GENERATION = select(vms, nvram_generations.c.generation).select_from(
    vms.outerjoin(nvram_generations, nvram_generations.c.vm_uuid == vms.c.vm_uuid)
)

# Who a certificate is (`Registry.identify`, once per API request), built once.
_INSTANCE_BY_FP = select(instances.c.name, instances.c.state, instances.c.last_used_at).where(
    instances.c.cert_fingerprint == bindparam("fp")
)
_HOST_BY_FP = (
    select(hosts.c.name, hosts.c.instance, instances.c.state)
    .select_from(hosts.outerjoin(instances, instances.c.name == hosts.c.instance))
    .where(hosts.c.cert_fingerprint == bindparam("fp"))
)
_USER_BY_FP = select(users.c.name).where(users.c.cert_fingerprint == bindparam("fp"))

# The unwrap policy's one read (the gateway's and a power-on's hot path): the
# host by certificate, its instance's state, and the VM by KMS key or by
# UUID, with the VM's last .nvram generation. kms_key_id, vm_uuid and
# cert_fingerprint are unique, so there is at most one row; none when the
# host is unknown.
_PLACEMENT_COLUMNS = (
    hosts.c.name.label("host"),
    hosts.c.instance.label("instance"),
    instances.c.state.label("state"),
    vms.c.vm_uuid.label("vm_uuid"),
    vms.c.instance.label("vm_instance"),
    vms.c.host.label("vm_host"),
)
_PLACEMENT_BY_KEY = (
    select(*_PLACEMENT_COLUMNS)
    .select_from(
        hosts.outerjoin(instances, instances.c.name == hosts.c.instance).outerjoin(
            vms,
            # The VM's KEK, or the new KEK of its pending rotation: until the
            # .vmx is switched, a host may hold either key safe.
            or_(
                vms.c.kms_key_id == bindparam("key"),
                and_(vms.c.rekey_kms_key_id == bindparam("key"), vms.c.rekey_state == "pending"),
            ),
        )
    )
    .where(hosts.c.cert_fingerprint == bindparam("fp"))
)
_PLACEMENT_BY_VM = (
    select(*_PLACEMENT_COLUMNS, nvram_generations.c.generation)
    .select_from(
        hosts.outerjoin(instances, instances.c.name == hosts.c.instance)
        .outerjoin(vms, vms.c.vm_uuid == bindparam("vm"))
        .outerjoin(nvram_generations, nvram_generations.c.vm_uuid == vms.c.vm_uuid)
    )
    .where(hosts.c.cert_fingerprint == bindparam("fp"))
)


def _placement_decision(row, no_vm: str) -> Decision:
    """The unwrap policy applied to one `_PLACEMENT_*` row (None: the
    host's certificate is not registered). `no_vm` is the reason when the
    row names no VM."""
    if row is None:
        return Decision(False, "host certificate is not registered", None, None, None)
    own_vm = row.vm_uuid is not None and row.vm_instance == row.instance
    vm_uuid = row.vm_uuid if own_vm else None
    if row.state != "trusted":
        return Decision(
            False, f"instance {row.instance} of the host is {row.state or 'unknown'}", row.host, row.instance, vm_uuid
        )
    if row.vm_uuid is None:
        return Decision(False, no_vm, row.host, row.instance, None)
    if not own_vm:
        return Decision(False, "key belongs to a VM of another instance", row.host, row.instance, None)
    if row.vm_host != row.host:
        where = f"host {row.vm_host}" if row.vm_host else "no host"
        return Decision(False, f"VM is placed on {where}, not on this host", row.host, row.instance, vm_uuid)
    return Decision(True, "VM is placed on this host by its trusted instance", row.host, row.instance, vm_uuid)


class Registry:
    """Trust state in the broker database. ``trust_ca`` is needed only by the
    methods that issue certificates (approve, register_host, issue_user)."""

    def __init__(
        self,
        db: Database,
        trust_ca: TrustCa | None = None,
        clock: Callable[[], float] = time.time,
        *,
        node: str = "vtpm-broker",
        audit_signer=None,
    ):
        self.db = db
        self.trust_ca = trust_ca
        self.clock = clock
        # Named in every audit record; the signer (kms_server.keystore.
        # audit_key.Signer) signs checkpoints and its public half checks them.
        self.node = node
        self.audit_signer = audit_signer
        # Appends to the audit chain are serialized in this process too, so
        # SQLite never sees two writers race for the chain head.
        self._audit_lock = threading.Lock()
        self._audit_group: GroupCommit[tuple, None] = GroupCommit(self._write_audit_batch, DatabaseError)

    def _ca(self) -> TrustCa:
        if self.trust_ca is None:
            raise RuntimeError("this registry has no trust CA; load it with broker.trust_ca.load_trust_ca")
        return self.trust_ca

    # Audit -------------------------------------------------------------------

    def record_audit(self, actor: str, action: str, target: str, allowed: bool, reason: str) -> None:
        """Append one record to the hash-chained audit trail and return once
        it is committed. Records that several threads append at once share
        one transaction (group commit: the gateway's unwraps under a boot
        storm). Raises DatabaseError if it cannot be written: callers fail
        closed. Inside a request (broker/request_scope.py) the record
        carries that request's id."""
        self._audit_group.submit((actor, action, target, allowed, reason, record_made(allowed)))

    def _write_audit_batch(self, entries: list[tuple]) -> list[None]:
        with self._audit_lock, self.db.begin() as conn:
            self._append_audits(conn, entries)
        return [None] * len(entries)

    def _append_audit(self, conn, actor: str, action: str, target: str, allowed: bool, reason: str) -> None:
        self._append_audits(conn, [(actor, action, target, allowed, reason, record_made(allowed))])

    def _append_audits(self, conn, entries: list[tuple]) -> None:
        """Chain `entries` (actor, action, target, allowed, reason[, request id]) onto the
        trail inside `conn`'s transaction, holding the chain lock."""
        self.db.lock_audit_chain(conn)
        last = conn.execute(_AUDIT_HEAD).first()
        head = (last.seq, last.hash) if last else None
        conn.execute(audit.insert(), audit_trail.chain_rows(entries, head, self.clock, self.node))

    def audit_records(self, after: int = 0, limit: int = 1000) -> list[AuditRecord]:
        with self.db.read() as conn:
            rows = conn.execute(select(audit).where(audit.c.seq > after).order_by(audit.c.seq).limit(limit)).all()
        return [AuditRecord(**row._mapping) for row in rows]

    def verify_audit_report(self, verifier=None) -> Report:
        """The whole chain and its signed checkpoints (broker/audit_trail.py);
        `verifier` defaults to the public half of the broker's audit key."""
        if verifier is None and self.audit_signer is not None:
            verifier = self.audit_signer.public
        return audit_trail.verify(self.db, verifier)

    def verify_audit(self) -> list[str]:
        """Problems with the audit trail, one line each (empty: intact), in
        the words of `vtpm-broker admin audit verify`."""
        return [p.text for p in self.verify_audit_report().problems]

    def sign_audit_checkpoint(self):
        """Sign the chain's head now (None: no key, or nothing new)."""
        if self.audit_signer is None:
            return None
        return audit_trail.sign_checkpoint(self.db, self.audit_signer, self.node, self.clock)

    # Tokens and enrollment --------------------------------------------------------

    def issue_token(self, instance: str, ttl: int = DEFAULT_TOKEN_TTL, actor: str = "local-security-admin") -> str:
        """A one-time enrollment token for `instance` (only its digest is kept)."""
        check_instance_name(instance)
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 1 <= ttl <= MAX_TOKEN_TTL:
            raise InvalidRequest(f"token lifetime must be between 1 and {MAX_TOKEN_TTL} seconds")
        token = secrets.token_urlsafe(32)
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            row = conn.execute(select(instances.c.state).where(instances.c.name == instance)).first()
            if row is not None and row.state == "revoked":
                raise Refused(f"instance {instance} was revoked; enroll its replacement under a new name")
            conn.execute(
                tokens.insert().values(
                    token_sha256=_digest(token), instance=instance, created_at=now, expires_at=now + ttl
                )
            )
            self._append_audit(conn, actor, "token.issue", instance, True, f"expires in {ttl} s")
        return token

    def enroll(self, instance: str, token: str, csr_pem: str, peer: str = "") -> Enrollment:
        """Consume `token` and record a pending enrollment for `instance`.
        A wrong, replayed or expired token is Refused and changes nothing
        but the audit trail."""
        check_instance_name(instance)
        if not isinstance(token, str) or not 1 <= len(token) <= 256:
            raise InvalidRequest("token must be the string 'vtpm-broker admin token' printed")
        try:
            load_csr_pem(csr_pem)
        except CertificateRequestError as exc:
            raise InvalidRequest(str(exc)) from None
        actor = f"enrollment:{instance}" + (f"@{peer}" if peer else "")
        now = self.clock()
        refusal: str | None = None
        enrollment = Enrollment(uuid.uuid4().hex, secrets.token_urlsafe(32))
        with self._audit_lock, self.db.begin() as conn:
            row = conn.execute(select(tokens).where(tokens.c.token_sha256 == _digest(token))).first()
            state = conn.execute(select(instances.c.state).where(instances.c.name == instance)).scalar()
            if row is None or not hmac.compare_digest(row.instance, instance):
                refusal = "enrollment token is not valid for this instance"
            elif row.used_at is not None:
                refusal = "enrollment token was already used; ask the security administrator for a new one"
            elif row.expires_at <= now:
                refusal = "enrollment token has expired; ask the security administrator for a new one"
            elif state == "revoked":
                refusal = f"instance {instance} was revoked; enroll its replacement under a new name"
            if refusal is None:
                conn.execute(update(tokens).where(tokens.c.token_sha256 == row.token_sha256).values(used_at=now))
                if state is None:
                    conn.execute(
                        instances.insert().values(
                            name=instance, state="pending", pinned=False, created_at=now, changed_at=now
                        )
                    )
                elif state == "rejected":
                    conn.execute(
                        update(instances).where(instances.c.name == instance).values(state="pending", changed_at=now)
                    )
                conn.execute(
                    update(enrollments)
                    .where(enrollments.c.instance == instance, enrollments.c.state == "pending")
                    .values(state="superseded", decided_at=now)
                )
                conn.execute(
                    enrollments.insert().values(
                        id=enrollment.enrollment_id,
                        instance=instance,
                        csr_pem=csr_pem,
                        poll_secret_sha256=_digest(enrollment.poll_secret),
                        state="pending",
                        created_at=now,
                    )
                )
                self._append_audit(conn, actor, "enroll", instance, True, "enrollment pending approval")
        if refusal is not None:
            # Recorded after the refused transaction so nothing else changes.
            self.record_audit(actor, "enroll", instance, False, refusal)
            raise Refused(refusal)
        return enrollment

    def poll_enrollment(self, enrollment_id: str, poll_secret: str) -> dict:
        """{"state", "certificate_pem"?, "ca_pem"?}; an unknown id or a wrong
        secret is NotFound (the two are not told apart)."""
        if not isinstance(enrollment_id, str) or not re.fullmatch(r"[0-9a-f]{32}", enrollment_id):
            raise NotFound("no such enrollment")
        with self.db.read() as conn:
            row = conn.execute(select(enrollments).where(enrollments.c.id == enrollment_id)).first()
        if row is None or not hmac.compare_digest(row.poll_secret_sha256, _digest(poll_secret or "")):
            raise NotFound("no such enrollment")
        answer: dict = {"state": row.state, "instance": row.instance}
        if row.state == "approved":
            answer["certificate_pem"] = row.certificate_pem
            answer["ca_pem"] = self._ca().cert_pem
        return answer

    def _pending(self, conn, instance: str):
        return conn.execute(
            select(enrollments)
            .where(enrollments.c.instance == instance, enrollments.c.state == "pending")
            .order_by(enrollments.c.created_at.desc())
        ).first()

    def approve(self, instance: str, actor: str = "local-security-admin") -> x509.Certificate:
        """Issue the pending enrollment's certificate (CN = instance,
        clientAuth) and make the instance trusted."""
        check_instance_name(instance)
        ca = self._ca()
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            state = conn.execute(select(instances.c.state).where(instances.c.name == instance)).scalar()
            if state is None:
                raise NotFound(f"no instance named {instance}; issue a token with 'vtpm-broker admin token'")
            if state == "revoked":
                raise Refused(f"instance {instance} was revoked; enroll its replacement under a new name")
            pending = self._pending(conn, instance)
            if pending is None:
                raise NotFound(f"instance {instance} has no pending enrollment")
            csr = load_csr_pem(pending.csr_pem)
            cert = ca.issue_client(instance, csr.public_key())
            pem = cert_pem(cert)
            conn.execute(
                update(enrollments)
                .where(enrollments.c.id == pending.id)
                .values(state="approved", certificate_pem=pem, decided_at=now)
            )
            conn.execute(
                update(instances)
                .where(instances.c.name == instance)
                .values(state="trusted", cert_fingerprint=fingerprint(cert), cert_pem=pem, pinned=False, changed_at=now)
            )
            self._append_audit(conn, actor, "approve", instance, True, f"certificate {fingerprint(cert)}")
        return cert

    def reject(self, instance: str, actor: str = "local-security-admin") -> None:
        check_instance_name(instance)
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            pending = self._pending(conn, instance)
            if pending is None:
                raise NotFound(f"instance {instance} has no pending enrollment")
            conn.execute(
                update(enrollments).where(enrollments.c.id == pending.id).values(state="rejected", decided_at=now)
            )
            conn.execute(
                update(instances)
                .where(instances.c.name == instance, instances.c.state == "pending")
                .values(state="rejected", changed_at=now)
            )
            self._append_audit(conn, actor, "reject", instance, True, "enrollment rejected")

    def revoke(self, instance: str, actor: str = "local-security-admin") -> None:
        """End the instance's trust at once: its certificate, its hosts and
        its VMs are refused from the next request on."""
        check_instance_name(instance)
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            state = conn.execute(select(instances.c.state).where(instances.c.name == instance)).scalar()
            if state is None:
                raise NotFound(f"no instance named {instance}")
            if state == "revoked":
                raise Conflict(f"instance {instance} is already revoked")
            conn.execute(update(instances).where(instances.c.name == instance).values(state="revoked", changed_at=now))
            conn.execute(
                update(enrollments)
                .where(enrollments.c.instance == instance, enrollments.c.state == "pending")
                .values(state="rejected", decided_at=now)
            )
            self._append_audit(conn, actor, "revoke", instance, True, f"was {state}")

    def pin(self, instance: str, certificate_pem: str | bytes, actor: str = "local-security-admin") -> str:
        """Trust exactly this certificate (by SHA-256) as `instance`; returns
        the fingerprint."""
        check_instance_name(instance)
        try:
            cert = load_certificate_pem(certificate_pem)
        except CertificateRequestError as exc:
            raise InvalidRequest(str(exc)) from None
        now_dt = time.time()
        if not cert.not_valid_before_utc.timestamp() <= now_dt < cert.not_valid_after_utc.timestamp():
            raise InvalidRequest("the certificate is not valid now; ask the instance for a current one")
        try:
            eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
                raise InvalidRequest("the certificate's extended key usage lacks clientAuth; it cannot be a client")
        except x509.ExtensionNotFound:
            pass
        fp = fingerprint(cert)
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            self._check_fingerprint_free(conn, fp, instance)
            state = conn.execute(select(instances.c.state).where(instances.c.name == instance)).scalar()
            if state == "revoked":
                raise Refused(f"instance {instance} was revoked; pin its replacement under a new name")
            values = dict(state="trusted", cert_fingerprint=fp, cert_pem=cert_pem(cert), pinned=True, changed_at=now)
            if state is None:
                conn.execute(instances.insert().values(name=instance, created_at=now, **values))
            else:
                conn.execute(update(instances).where(instances.c.name == instance).values(**values))
            self._append_audit(conn, actor, "pin", instance, True, f"certificate {fp}")
        return fp

    def _check_fingerprint_free(self, conn, fp: str, instance: str | None = None) -> None:
        other = conn.execute(select(instances.c.name).where(instances.c.cert_fingerprint == fp)).scalar()
        if other is not None and other != instance:
            raise Conflict(f"that certificate already belongs to instance {other}")
        if conn.execute(select(hosts.c.name).where(hosts.c.cert_fingerprint == fp)).first() is not None:
            raise Conflict("that certificate already belongs to a host")
        if conn.execute(select(users.c.name).where(users.c.cert_fingerprint == fp)).first() is not None:
            raise Conflict("that certificate already belongs to a user")

    def list_instances(self) -> list[InstanceInfo]:
        with self.db.read() as conn:
            host_counts = dict(conn.execute(select(hosts.c.instance, func.count()).group_by(hosts.c.instance)).all())
            vm_counts = dict(conn.execute(select(vms.c.instance, func.count()).group_by(vms.c.instance)).all())
            pending = {
                r[0] for r in conn.execute(select(enrollments.c.instance).where(enrollments.c.state == "pending")).all()
            }
            rows = conn.execute(select(instances).order_by(instances.c.name)).all()
        return [
            InstanceInfo(
                name=r.name,
                state=r.state,
                pinned=bool(r.pinned),
                cert_fingerprint=r.cert_fingerprint,
                created_at=r.created_at,
                changed_at=r.changed_at,
                last_used_at=r.last_used_at,
                hosts=host_counts.get(r.name, 0),
                vms=vm_counts.get(r.name, 0),
                pending_enrollment=r.name in pending,
            )
            for r in rows
        ]

    def pinned_certificates(self) -> list[str]:
        """PEMs of the pinned certificates of trusted instances (TLS trust anchors)."""
        with self.db.read() as conn:
            rows = conn.execute(
                select(instances.c.cert_pem).where(instances.c.pinned.is_(True), instances.c.state == "trusted")
            ).all()
        return sorted(r[0] for r in rows if r[0])

    # Users ----------------------------------------------------------------------

    def issue_user(self, name: str, public_key, actor: str = "local-security-admin") -> x509.Certificate:
        """A clientAuth certificate for an API user (CN = name); the role
        comes from [roles]. Issuing again for the same name replaces it."""
        check_instance_name(name)
        cert = self._ca().issue_client(name, public_key)
        fp = fingerprint(cert)
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            if conn.execute(select(instances.c.name).where(instances.c.name == name)).first() is not None:
                raise Conflict(f"{name} is a management instance; give the user another name")
            conn.execute(users.delete().where(users.c.name == name))
            conn.execute(users.insert().values(name=name, cert_fingerprint=fp, cert_pem=cert_pem(cert), created_at=now))
            self._append_audit(conn, actor, "user.issue", name, True, f"certificate {fp}")
        return cert

    # Identification ------------------------------------------------------------

    def identify(self, fp: str) -> Caller | None:
        """The caller a verified certificate stands for, or None when it
        stands for nobody the broker currently trusts (unknown, a revoked
        instance, a host of a revoked instance, a superseded certificate)."""
        now = self.clock()
        with self.db.read() as conn:
            inst = conn.execute(_INSTANCE_BY_FP, {"fp": fp}).first()
            if inst is not None:
                if inst.state != "trusted":
                    return None
                if inst.last_used_at is None or now - inst.last_used_at >= LAST_USED_RESOLUTION:
                    self._touch(inst.name, now)
                return Caller("instance", inst.name, inst.name, fp)
            host = conn.execute(_HOST_BY_FP, {"fp": fp}).first()
            if host is not None:
                if host.state != "trusted":
                    return None
                return Caller("host", host.name, host.instance, fp)
            user = conn.execute(_USER_BY_FP, {"fp": fp}).first()
            if user is not None:
                return Caller("user", user.name, None, fp)
        return None

    def _touch(self, instance: str, now: float) -> None:
        # A separate, small write: identification itself only reads.
        with self.db.begin() as conn:
            conn.execute(update(instances).where(instances.c.name == instance).values(last_used_at=now))

    # Hosts -----------------------------------------------------------------------

    def _require_trusted(self, conn, instance: str) -> None:
        state = conn.execute(select(instances.c.state).where(instances.c.name == instance)).scalar()
        if state != "trusted":
            raise Refused(f"instance {instance} is not trusted")

    @contextlib.contextmanager
    def _refusals_audited(self, actor: str, action: str, target: str) -> Iterator[None]:
        """Record a refusal (any TrustError) raised inside, after the refused
        transaction has rolled back, so the trail is all it changes."""
        try:
            yield
        except TrustError as exc:
            self.record_audit(actor, action, target, False, str(exc))
            raise

    def register_host(self, instance: str, name: str, csr_pem: str, *, actor: str | None = None) -> x509.Certificate:
        """Issue a host certificate (CN = host:<name>) bound to `instance`.
        A host name held by another trusted instance is a Conflict; one held
        by a revoked instance is taken over (its old certificate is void).
        `actor` is who asked (default: the instance itself); refusals are
        audited."""
        actor = actor or f"instance:{instance}"
        with self._refusals_audited(actor, "host.register", str(name)[:64]):
            check_host_name(name)
            try:
                csr = load_csr_pem(csr_pem)
            except CertificateRequestError as exc:
                raise InvalidRequest(str(exc)) from None
            ca = self._ca()
            now = self.clock()
            with self._audit_lock, self.db.begin() as conn:
                self._require_trusted(conn, instance)
                existing = conn.execute(select(hosts).where(hosts.c.name == name)).first()
                if existing is not None and existing.instance != instance:
                    owner_state = conn.execute(
                        select(instances.c.state).where(instances.c.name == existing.instance)
                    ).scalar()
                    if owner_state == "trusted":
                        raise Conflict(f"host {name} is registered by another trusted instance")
                cert = ca.issue_client(f"host:{name}", csr.public_key())
                fp = fingerprint(cert)
                if existing is not None:
                    conn.execute(hosts.delete().where(hosts.c.name == name))
                    # VMs of this instance placed on the host stay placed; VMs of
                    # a previous owner are not this instance's to place.
                conn.execute(
                    hosts.insert().values(
                        name=name, instance=instance, cert_fingerprint=fp, cert_pem=cert_pem(cert), created_at=now
                    )
                )
                reason = "registered" if existing is None else f"re-registered (was {existing.instance})"
                if actor != f"instance:{instance}":
                    reason += f" for instance {instance}"
                self._append_audit(conn, actor, "host.register", name, True, f"{reason}, certificate {fp}")
        return cert

    def remove_host(self, instance: str | None, name: str, *, actor: str | None = None) -> None:
        """Forget a host: its certificate is void and the VMs placed on it
        are unplaced. `instance` limits it to that instance's hosts (None:
        an administrator, any host)."""
        actor = actor or f"instance:{instance}"
        with self._refusals_audited(actor, "host.remove", str(name)[:64]):
            check_host_name(name)
            now = self.clock()
            with self._audit_lock, self.db.begin() as conn:
                if instance is not None:
                    self._require_trusted(conn, instance)
                existing = conn.execute(select(hosts).where(hosts.c.name == name)).first()
                if existing is None or (instance is not None and existing.instance != instance):
                    raise NotFound(f"no host named {name}")
                conn.execute(hosts.delete().where(hosts.c.name == name))
                unplaced = conn.execute(
                    update(vms)
                    .where(vms.c.instance == existing.instance, vms.c.host == name)
                    .values(host=None, changed_at=now)
                ).rowcount
                self._append_audit(
                    conn,
                    actor,
                    "host.remove",
                    name,
                    True,
                    f"removed (instance {existing.instance}), {unplaced} VMs unplaced",
                )

    # VMs -------------------------------------------------------------------------

    @staticmethod
    def _check_no_history(conn, vm_uuid: str) -> None:
        """A UUID whose vTPM a host has sealed comes back only through its own
        .vmx (register): a new vTPM under it would reset rollback protection."""
        seen = conn.execute(
            select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)
        ).scalar()
        if seen is not None:
            raise Conflict(
                f"VM {vm_uuid} had a vTPM (its .nvram reached generation {seen}); register its .vmx "
                "(POST /v1/vms/register) to bring it back, or create the VM under a new UUID"
            )

    def check_new_vm(self, instance: str, vm_uuid: str, host: str | None, *, actor: str | None = None) -> None:
        """Refuse (audited), before a KEK is made, a VM that could not be recorded."""
        with self._refusals_audited(actor or f"instance:{instance}", "vm.create", vm_uuid):
            with self.db.read() as conn:
                self._require_trusted(conn, instance)
                if conn.execute(select(vms.c.vm_uuid).where(vms.c.vm_uuid == vm_uuid)).first() is not None:
                    raise Conflict(f"VM {vm_uuid} is already registered; use POST /v1/vms/register to re-register it")
                self._check_no_history(conn, vm_uuid)
                if host is not None:
                    self._own_host(conn, instance, host)

    def _own_host(self, conn, instance: str, host: str) -> None:
        row = conn.execute(select(hosts.c.instance).where(hosts.c.name == host)).first()
        if row is None or row.instance != instance:
            raise NotFound(f"no host named {host}")

    def add_vm(
        self,
        instance: str,
        vm_uuid: str,
        name: str,
        kms_key_id: str,
        key_safe: str,
        host: str | None,
        *,
        actor: str | None = None,
    ) -> VmRecord:
        actor = actor or f"instance:{instance}"
        now = self.clock()
        with self._refusals_audited(actor, "vm.create", vm_uuid), self._audit_lock, self.db.begin() as conn:
            self._require_trusted(conn, instance)
            if conn.execute(select(vms.c.vm_uuid).where(vms.c.vm_uuid == vm_uuid)).first() is not None:
                raise Conflict(f"VM {vm_uuid} is already registered")
            self._check_no_history(conn, vm_uuid)
            if host is not None:
                self._own_host(conn, instance, host)
            record = VmRecord(vm_uuid, name, instance, kms_key_id, key_safe, host)
            _insert_vm(conn, record, now)
            for_whom = "" if actor == f"instance:{instance}" else f" for instance {instance}"
            self._append_audit(conn, actor, "vm.create", vm_uuid, True, f"KEK {kms_key_id}{for_whom}")
        return record

    def register_vm(
        self, instance: str, vm_uuid: str, name: str, kms_key_id: str, key_safe: str, *, actor: str | None = None
    ) -> VmRecord:
        """Bind a VM found on a datastore to `instance`: recovery and the
        receiving end of a cold migration. A VM held by another trusted
        instance is a Conflict unless it was released to `instance`; one held
        by a revoked instance is taken over. Either way it comes unplaced,
        and its .nvram generation and audit history stay (both are kept by
        VM UUID). Refusals are audited."""
        actor = actor or f"instance:{instance}"
        now = self.clock()
        with self._refusals_audited(actor, "vm.register", vm_uuid), self._audit_lock, self.db.begin() as conn:
            self._require_trusted(conn, instance)
            existing = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            by_key = conn.execute(select(vms).where(vms.c.kms_key_id == kms_key_id)).first()
            if by_key is not None and by_key.vm_uuid != vm_uuid:
                raise Conflict(f"KMS key {kms_key_id} belongs to another VM")
            host = None
            was = "new"
            if existing is not None:
                if existing.instance != instance:
                    owner_state = conn.execute(
                        select(instances.c.state).where(instances.c.name == existing.instance)
                    ).scalar()
                    if owner_state == "trusted":
                        if existing.released_to is not None and existing.released_to != instance:
                            raise Conflict(
                                f"VM {vm_uuid} is registered by another trusted instance and released to "
                                f"instance {existing.released_to}, not to {instance}"
                            )
                        if existing.released_to is None:
                            raise Conflict(
                                f"VM {vm_uuid} is registered by another trusted instance; its owner releases it "
                                f"('vtpm-mgmt vm release VM --to {instance}') or an administrator transfers it"
                            )
                        was = f"migrated from {existing.instance}, released by {existing.released_by}"
                    else:
                        was = f"taken over from {owner_state or 'unknown'} instance {existing.instance}"
                else:
                    if existing.released_to is not None:
                        raise Conflict(
                            f"VM {vm_uuid} is released to instance {existing.released_to}; release it to "
                            f"{instance} to cancel that first"
                        )
                    host = existing.host
                    was = "re-registered"
                conn.execute(vms.delete().where(vms.c.vm_uuid == vm_uuid))
            # Kept by VM UUID: the vTPM's rollback protection survives the re-registration.
            generation = conn.execute(
                select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)
            ).scalar()
            record = VmRecord(vm_uuid, name, instance, kms_key_id, key_safe, host, int(generation or 0))
            _insert_vm(conn, record, now)
            if actor != f"instance:{instance}":
                was += f", for instance {instance}"
            self._append_audit(
                conn,
                actor,
                "vm.register",
                vm_uuid,
                True,
                f"KEK {kms_key_id} ({was}; .nvram generation {generation or 0})",
            )
        return record

    def place_vm(self, instance: str | None, vm_uuid: str, host: str, *, actor: str | None = None) -> None:
        """Place the VM on one of its instance's hosts. `instance` limits it
        to that instance's VMs (None: an administrator, any VM, on a host of
        the VM's own instance)."""
        actor = actor or f"instance:{instance}"
        now = self.clock()
        with self._refusals_audited(actor, "vm.place", vm_uuid), self._audit_lock, self.db.begin() as conn:
            check_host_name(host)
            if instance is not None:
                self._require_trusted(conn, instance)
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            if instance is None:
                self._require_trusted(conn, vm.instance)
            if vm.released_to is not None:
                raise Conflict(
                    f"VM {vm_uuid} is released to instance {vm.released_to}: it is placed once {vm.released_to} "
                    "registers it (or after the release is cancelled)"
                )
            self._own_host(conn, vm.instance, host)
            conn.execute(update(vms).where(vms.c.vm_uuid == vm_uuid).values(host=host, changed_at=now))
            self._append_audit(conn, actor, "vm.place", vm_uuid, True, f"on host {host}")

    def release_vm(self, vm_uuid: str, to: str, actor: str, instance: str | None) -> VmRecord:
        """Cold migration, the sending end: hand the VM over to the trusted
        instance `to`, which then registers it from the datastore. From now
        on the VM is placed on no host, so no host of the old instance can
        unwrap it. `instance` is the owner releasing its own VM; None is an
        administrator's transfer of any VM. Releasing to the owner itself
        cancels a pending release. Refusals are audited; the .nvram
        generation and the trail stay with the VM UUID."""
        action = "vm.release" if instance is not None else "vm.transfer"
        now = self.clock()
        with self._refusals_audited(actor, action, vm_uuid), self._audit_lock, self.db.begin() as conn:
            check_instance_name(to)
            if instance is not None:
                self._require_trusted(conn, instance)
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            if to == vm.instance:
                if vm.released_to is None:
                    raise InvalidRequest(f"VM {vm_uuid} is instance {to}'s already; name the instance it goes to")
                conn.execute(
                    update(vms)
                    .where(vms.c.vm_uuid == vm_uuid)
                    .values(released_to=None, released_by=None, released_at=None, changed_at=now)
                )
                self._append_audit(
                    conn, actor, action, vm_uuid, True, f"release to instance {vm.released_to} cancelled"
                )
                return self._vm_in(conn, vm_uuid)
            state = conn.execute(select(instances.c.state).where(instances.c.name == to)).scalar()
            if state is None:
                raise NotFound(f"no instance named {to}; release to a trusted instance ('vtpm-broker admin list')")
            if state != "trusted":
                raise Conflict(f"instance {to} is {state}, not trusted; release to a trusted instance")
            if vm.released_to == to:
                raise Conflict(f"VM {vm_uuid} is already released to instance {to}")
            conn.execute(
                update(vms)
                .where(vms.c.vm_uuid == vm_uuid)
                .values(released_to=to, released_by=actor, released_at=now, host=None, changed_at=now)
            )
            reason = f"to instance {to} from instance {vm.instance}"
            if vm.host:
                reason += f", no longer placed on host {vm.host}"
            if vm.released_to:
                reason += f" (was released to {vm.released_to})"
            self._append_audit(conn, actor, action, vm_uuid, True, reason)
            return self._vm_in(conn, vm_uuid)

    # Key rotation (broker/rotation.py drives it; these keep its state) ----------------

    def rekey_target(self, vm_uuid: str, instance: str | None, actor: str) -> VmRecord:
        """The VM a rotation may act on: `instance`'s own (None: any), not
        being handed over. Refusals are audited."""
        with self._refusals_audited(actor, "vm.rekey", vm_uuid), self.db.read() as conn:
            if instance is not None:
                self._require_trusted(conn, instance)
            vm = conn.execute(_VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            if vm.released_to is not None:
                raise Conflict(f"VM {vm_uuid} is released to instance {vm.released_to}; rekey it after the migration")
            return _vm(vm)

    def begin_rekey(
        self, vm_uuid: str, kind: str, old_kms_key_id: str, new_kms_key_id: str, new_key_safe: str, actor: str
    ) -> None:
        """Record a pending rotation: from now on the VM's host may unwrap
        with the new KEK too. Conflict if the VM changed meanwhile."""
        now = self.clock()
        with self._refusals_audited(actor, "vm.rekey", vm_uuid), self._audit_lock, self.db.begin() as conn:
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or vm.kms_key_id != old_kms_key_id or vm.rekey_state is not None:
                raise Conflict(f"VM {vm_uuid} changed while its rekey began (another rekey?); run it again")
            conn.execute(
                update(vms)
                .where(vms.c.vm_uuid == vm_uuid)
                .values(
                    rekey_kind=kind,
                    rekey_state="pending",
                    rekey_kms_key_id=new_kms_key_id,
                    rekey_key_safe=new_key_safe,
                    rekey_at=now,
                    changed_at=now,
                )
            )
            self._append_audit(
                conn,
                actor,
                "vm.rekey",
                vm_uuid,
                True,
                f"{kind} rekey begun: new KEK {new_kms_key_id} (was {old_kms_key_id})",
            )

    def switch_rekey(self, vm_uuid: str, new_key_safe: str, actor: str) -> VmRecord:
        """The pending rotation's key safe becomes the VM's; the old KEK is
        kept in the record (state "retiring") until it is deactivated."""
        now = self.clock()
        with self._refusals_audited(actor, "vm.rekey", vm_uuid), self._audit_lock, self.db.begin() as conn:
            vm = conn.execute(select(vms).where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or vm.rekey_state != "pending" or vm.rekey_key_safe != new_key_safe:
                raise Conflict(f"VM {vm_uuid} has no pending rekey to this key safe")
            conn.execute(
                update(vms)
                .where(vms.c.vm_uuid == vm_uuid)
                .values(
                    kms_key_id=vm.rekey_kms_key_id,
                    key_safe=vm.rekey_key_safe,
                    rekey_state="retiring",
                    rekey_kms_key_id=vm.kms_key_id,
                    rekey_key_safe=vm.key_safe,
                    rekey_at=now,
                    changed_at=now,
                )
            )
            self._append_audit(
                conn,
                actor,
                "vm.rekey",
                vm_uuid,
                True,
                f"{vm.rekey_kind} rekey switched: KEK {vm.rekey_kms_key_id} is the VM's, old KEK {vm.kms_key_id} to retire",
            )
            return self._vm_in(conn, vm_uuid)

    def finish_rekey(self, vm_uuid: str, old_kms_key_id: str, actor: str, outcome: str) -> None:
        """The old KEK is deactivated: the rotation is over. `outcome` says
        how (for the trail)."""
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            done = self._end_rekey(conn, vm_uuid, "retiring", old_kms_key_id, now)
            if done:
                self._append_audit(conn, actor, "vm.rekey.retire", vm_uuid, True, f"old KEK {old_kms_key_id} {outcome}")

    def abort_rekey(self, vm_uuid: str, new_kms_key_id: str, actor: str) -> None:
        """Forget a pending rotation whose key safe is in no .vmx."""
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            done = self._end_rekey(conn, vm_uuid, "pending", new_kms_key_id, now)
            if done:
                self._append_audit(
                    conn, actor, "vm.rekey.abort", vm_uuid, True, f"pending rekey to KEK {new_kms_key_id} rolled back"
                )

    @staticmethod
    def _end_rekey(conn, vm_uuid: str, state: str, kms_key_id: str, now: float) -> int:
        """Clear the VM's rotation if it is still in `state` with `kms_key_id`
        (a concurrent change wins); the number of rows cleared."""
        return conn.execute(
            update(vms)
            .where(vms.c.vm_uuid == vm_uuid, vms.c.rekey_state == state, vms.c.rekey_kms_key_id == kms_key_id)
            .values(
                rekey_kind=None,
                rekey_state=None,
                rekey_kms_key_id=None,
                rekey_key_safe=None,
                rekey_at=None,
                changed_at=now,
            )
        ).rowcount

    @staticmethod
    def _vm_in(conn, vm_uuid: str) -> VmRecord:
        return _vm(conn.execute(_VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first())

    def remove_vm(self, vm_uuid: str, actor: str, instance: str | None) -> VmRecord:
        """Forget a VM's registration (its vTPM can no longer be unwrapped
        through the broker until its .vmx is registered again). `instance`
        limits it to that instance's VMs. The KEK stays in the KMS, and the
        .nvram generation and the trail stay with the VM UUID, so a stale
        .nvram is still refused after a re-registration. Refusals are
        audited."""
        with self._refusals_audited(actor, "vm.remove", vm_uuid), self._audit_lock, self.db.begin() as conn:
            vm = conn.execute(_VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first()
            if vm is None or (instance is not None and vm.instance != instance):
                raise NotFound(f"no VM {vm_uuid}")
            conn.execute(vms.delete().where(vms.c.vm_uuid == vm_uuid))
            self._append_audit(
                conn,
                actor,
                "vm.remove",
                vm_uuid,
                True,
                f"KEK {vm.kms_key_id} (instance {vm.instance}); .nvram generation {vm.generation or 0} kept",
            )
        return _vm(vm)

    def get_vm(self, vm_uuid: str, instance: str | None = None) -> VmRecord:
        with self.db.read() as conn:
            vm = conn.execute(_VM_WITH_GENERATION.where(vms.c.vm_uuid == vm_uuid)).first()
        if vm is None or (instance is not None and vm.instance != instance):
            raise NotFound(f"no VM {vm_uuid}")
        return _vm(vm)

    def list_vms(self, instance: str | None = None) -> list[VmRecord]:
        """The VMs (of one instance), each with its last reported .nvram generation."""
        stmt = _VM_WITH_GENERATION.order_by(vms.c.vm_uuid)
        if instance is not None:
            stmt = stmt.where(vms.c.instance == instance)
        with self.db.read() as conn:
            return [_vm(r) for r in conn.execute(stmt).all()]

    # The unwrap policy -----------------------------------------------------------------

    def authorize_unwrap(self, host_fingerprint: str, kms_key_id: str) -> Decision:
        """May the host with this certificate unwrap with this KMS key?
        Only if the host is registered by a trusted instance, the key is the
        KEK of a VM that instance registered, and the VM is placed on that
        host. Reads only: the caller records the decision (record_audit)."""
        with self.db.read() as conn:
            row = conn.execute(_PLACEMENT_BY_KEY, {"fp": host_fingerprint, "key": kms_key_id}).first()
        return _placement_decision(row, "key is not the KEK of any registered VM")

    def authorize_vm_for_host(self, host_fingerprint: str, vm_uuid: str) -> Decision:
        """The same rule by VM: may this host act for this VM (its vTPM's
        EK certificate, say)?"""
        return self.nvram_generation_for_host(host_fingerprint, vm_uuid)[0]

    def nvram_generation_for_host(self, host_fingerprint: str, vm_uuid: str) -> tuple[Decision, int]:
        """`authorize_vm_for_host` and, when allowed, `nvram_generation`
        (else 0), read in one query: a power-on asks for both."""
        with self.db.read() as conn:
            row = conn.execute(_PLACEMENT_BY_VM, {"fp": host_fingerprint, "vm": vm_uuid}).first()
        if row is None or row.vm_uuid is None:
            host, instance = (row.host, row.instance) if row is not None else (None, None)
            return Decision(False, "no such VM", host, instance, None), 0
        decision = _placement_decision(row, "no such VM")
        generation = row.generation if decision.allowed and row.generation is not None else 0
        return decision, int(generation)

    # .nvram generations (rollback protection) ------------------------------------------

    def nvram_generation(self, vm_uuid: str) -> int:
        """The last .nvram generation reported for the VM; 0 when none was."""
        with self.db.read() as conn:
            value = conn.execute(
                select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)
            ).scalar()
        return int(value) if value is not None else 0

    def record_nvram_generation(self, vm_uuid: str, generation: int, actor: str) -> int:
        """Remember a newer .nvram generation for the VM. A lower one than
        recorded is a Conflict (a host wrote an old state back); the same one
        again is accepted, so a repeated report is harmless."""
        if (
            isinstance(generation, bool)
            or not isinstance(generation, int)
            or not 0 <= generation <= MAX_NVRAM_GENERATION
        ):
            raise InvalidRequest(f"generation must be an integer from 0 to {MAX_NVRAM_GENERATION}")
        now = self.clock()
        with self._audit_lock, self.db.begin() as conn:
            stored = conn.execute(
                select(nvram_generations.c.generation).where(nvram_generations.c.vm_uuid == vm_uuid)
            ).scalar()
            if stored is not None and generation < stored:
                reason = f"generation {generation} is older than generation {stored} already recorded"
                refused = True
            else:
                refused = False
                values = dict(generation=generation, reported_by=actor, reported_at=now)
                if stored is None:
                    conn.execute(nvram_generations.insert().values(vm_uuid=vm_uuid, **values))
                else:
                    conn.execute(
                        update(nvram_generations).where(nvram_generations.c.vm_uuid == vm_uuid).values(**values)
                    )
                self._append_audit(
                    conn, actor, "nvram.generation", vm_uuid, True, f"generation {generation} (was {stored or 0})"
                )
        if refused:
            # Recorded after the refused transaction, as enroll does.
            self.record_audit(actor, "nvram.generation", vm_uuid, False, reason)
            raise Conflict(f"{reason}: a rollback of the vTPM state")
        return generation


def _vm(row) -> VmRecord:
    generation = row._mapping.get("generation")
    return VmRecord(
        row.vm_uuid,
        row.name,
        row.instance,
        row.kms_key_id,
        row.key_safe,
        row.host,
        int(generation or 0),
        row._mapping.get("released_to"),
        row._mapping.get("rekey_kind"),
        row._mapping.get("rekey_state"),
        row._mapping.get("rekey_kms_key_id"),
        row._mapping.get("rekey_key_safe"),
    )
