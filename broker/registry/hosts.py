"""Hosts: a trusted instance registers its hosts (each gets a certificate
from the trust CA, CN = host:<name>) and removes them."""

from __future__ import annotations

from cryptography import x509
from sqlalchemy import select, update

from broker.db import attest_tokens, host_tpms, hosts, instances, vms
from broker.registry.audit import AuditTrail
from broker.registry.enrollment import require_trusted
from broker.registry.model import Conflict, InvalidRequest, NotFound, check_host_name
from broker.trust_ca import CertificateRequestError, cert_pem, fingerprint, load_csr_pem


def own_host(conn, instance: str, host: str) -> None:
    """NotFound unless `host` is a host of `instance`."""
    row = conn.execute(select(hosts.c.instance).where(hosts.c.name == host)).first()
    if row is None or row.instance != instance:
        raise NotFound(f"no host named {host}")


class Hosts(AuditTrail):
    """Registering and removing hosts."""

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
                require_trusted(conn, instance)
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
                    require_trusted(conn, instance)
                existing = conn.execute(select(hosts).where(hosts.c.name == name)).first()
                if existing is None or (instance is not None and existing.instance != instance):
                    raise NotFound(f"no host named {name}")
                conn.execute(hosts.delete().where(hosts.c.name == name))
                # Its TPM's pin and tokens go with it: a new host under the
                # same name is pinned anew (docs/attestation.md).
                tpm = conn.execute(host_tpms.delete().where(host_tpms.c.host == name)).rowcount
                conn.execute(attest_tokens.delete().where(attest_tokens.c.host == name))
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
                    f"removed (instance {existing.instance}), {unplaced} VMs unplaced"
                    + (", its TPM's pin dropped" if tpm else ""),
                )
