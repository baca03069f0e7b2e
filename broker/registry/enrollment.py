"""Enrollment and the trust in management instances: one-time tokens, the
enrollment an instance asks for with one, its approval, rejection and
revocation, pinned instance certificates, API users, and who a verified
certificate stands for.

Tokens and poll secrets never reach a row: they are stored as SHA-256
digests, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid

from cryptography import x509
from sqlalchemy import bindparam, func, select, update

from broker.db import enrollments, hosts, instances, tokens, users, vms
from broker.registry.audit import AuditTrail
from broker.registry.model import (
    Caller,
    Conflict,
    Enrollment,
    InstanceInfo,
    InvalidRequest,
    NotFound,
    Refused,
    check_instance_name,
)
from broker.trust_ca import CertificateRequestError, cert_pem, fingerprint, load_certificate_pem, load_csr_pem

DEFAULT_TOKEN_TTL = 3600
MAX_TOKEN_TTL = 30 * 86400
# last_used_at is written at most this often per instance, not per request.
LAST_USED_RESOLUTION = 60.0

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


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def require_trusted(conn, instance: str) -> None:
    """Refused unless `instance` is a trusted instance."""
    state = conn.execute(select(instances.c.state).where(instances.c.name == instance)).scalar()
    if state != "trusted":
        raise Refused(f"instance {instance} is not trusted")


class Instances(AuditTrail):
    """Tokens, enrollment, instances, users and identification."""

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
            if row is not None and refusal is None:
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
            host_counts: dict[str, int] = dict(
                conn.execute(select(hosts.c.instance, func.count()).group_by(hosts.c.instance)).all()
            )
            vm_counts: dict[str, int] = dict(
                conn.execute(select(vms.c.instance, func.count()).group_by(vms.c.instance)).all()
            )
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
