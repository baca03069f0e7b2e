"""The trust registry: enrollment tokens, management instances, hosts, VM
placement, the unwrap policy and the audit trail (docs/broker-design.md).

Every method is one database transaction and is safe to call from several
threads (the API and the gateway run requests on worker pools). Failures are
the exceptions of `broker.registry.model`, each with a one-line message
meant for the caller; ``broker.api`` maps them to HTTP statuses in one table.

Secrets never reach a row: tokens and poll secrets are stored as SHA-256
digests, compared in constant time.

Each concern is a module of `broker.registry`; `Registry` puts them
together, and this module is where callers import it and its vocabulary from.
"""

from __future__ import annotations

from broker.registry.attestation import (
    Attestation,
    AttestationCheck,
    AttestationSettings,
    HostAttestation,
    check_scope,
    parse_pcr_selection,
)
from broker.registry.audit import AUDIT_GENESIS, AuditTrail
from broker.registry.enrollment import DEFAULT_TOKEN_TTL, LAST_USED_RESOLUTION, MAX_TOKEN_TTL, Instances
from broker.registry.hosts import Hosts
from broker.registry.model import (
    AuditRecord,
    Caller,
    Conflict,
    Decision,
    Enrollment,
    InstanceInfo,
    InvalidRequest,
    NotFound,
    Refused,
    TrustError,
    Unprocessable,
    VmRecord,
    check_host_name,
    check_instance_name,
    check_vm_name,
    check_vm_uuid,
)
from broker.registry.nvram import MAX_NVRAM_GENERATION, NvramGenerations
from broker.registry.policy import UnwrapPolicy
from broker.registry.rekey import Rekeys
from broker.registry.vms import Vms

__all__ = [
    "AUDIT_GENESIS",
    "DEFAULT_TOKEN_TTL",
    "LAST_USED_RESOLUTION",
    "MAX_NVRAM_GENERATION",
    "MAX_TOKEN_TTL",
    "AttestationCheck",
    "AttestationSettings",
    "AuditRecord",
    "Caller",
    "Conflict",
    "Decision",
    "Enrollment",
    "HostAttestation",
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
    "check_scope",
    "check_vm_name",
    "check_vm_uuid",
    "parse_pcr_selection",
]


class Registry(Instances, Hosts, Vms, Rekeys, NvramGenerations, UnwrapPolicy, Attestation, AuditTrail):
    """Trust state in the broker database: every part of `broker.registry`
    on one database, clock and audit trail. ``trust_ca`` is needed only by
    the methods that issue certificates (approve, register_host,
    issue_user)."""
