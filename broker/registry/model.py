"""The trust registry's vocabulary: the errors its methods raise (one line
for the caller; ``broker.api`` maps each to one HTTP status), the values
they return, and the checks of the names and UUIDs requests carry."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

from broker import audit_trail
from kmip_core.names import check_name

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


# Instance and host names follow kmip_core.names' rule at its default length,
# as vtpm-mgmt (broker/mgmt/state.py) and vtpm-host (broker/host/config.py)
# check them before they ask.


def check_instance_name(name: object) -> str:
    return check_name(
        name, lambda rule: InvalidRequest(f"instance name must be {rule}, starting with a letter or digit")
    )


def check_host_name(name: object) -> str:
    return check_name(name, lambda rule: InvalidRequest(f"host name must be {rule}, starting with a letter or digit"))


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
