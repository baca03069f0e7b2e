"""Object states and their dates (KMIP 1.4 sections 3.22-3.31, 4.19-4.21;
the state diagram of KMIP 1.4 Figure 1).

  Pre-Active --Activate / Activation Date reached--> Active
  Pre-Active, Active --Revoke(other reason) / Deactivation Date--> Deactivated
  Pre-Active, Active, Deactivated --Revoke(compromise)--> Compromised
  Pre-Active, Deactivated --Destroy--> Destroyed
  Compromised --Destroy--> Destroyed Compromised
  Destroyed --Revoke(compromise)--> Destroyed Compromised
"""

from __future__ import annotations

from kmip.core.enums import ObjectType, RevocationReasonCode, State, UsageLimitsUnit

from kmip_core import errors
from kmip_core.ttlv import TAG
from kms_server.keystore import attributes as attrs
from kms_server.keystore.objects import ManagedObject

STATEFUL_TYPES = (
    ObjectType.SYMMETRIC_KEY,
    ObjectType.PUBLIC_KEY,
    ObjectType.PRIVATE_KEY,
    ObjectType.SPLIT_KEY,
    ObjectType.CERTIFICATE,
    ObjectType.SECRET_DATA,
    ObjectType.OPAQUE_DATA,
    ObjectType.TEMPLATE,
)

COMPROMISE_REASONS = (RevocationReasonCode.KEY_COMPROMISE.value, RevocationReasonCode.CA_COMPROMISE.value)
DESTROYED_STATES = (State.DESTROYED, State.DESTROYED_COMPROMISED)


def apply_dates(obj: ManagedObject, now: int) -> None:
    """Move an object along by the dates set on it: an Activation Date that
    has passed makes a Pre-Active object Active, a Deactivation Date that has
    passed makes it Deactivated."""
    state = obj.state
    if state is None:
        return
    activation = obj.value("Activation Date")
    deactivation = obj.value("Deactivation Date")
    if state == State.PRE_ACTIVE and activation is not None and activation <= now:
        obj.set_value("State", State.ACTIVE.value)
        state = State.ACTIVE
    if state in (State.PRE_ACTIVE, State.ACTIVE) and deactivation is not None and deactivation <= now:
        obj.set_value("State", State.DEACTIVATED.value)


def activate(obj: ManagedObject, now: int) -> None:
    if obj.state is None:
        raise errors.IllegalOperation(f"a {obj.object_type.name} has no lifecycle to activate")
    if obj.state != State.PRE_ACTIVE:
        raise errors.IllegalOperation(f"object is {obj.state.name}; only a PRE_ACTIVE object can be activated")
    obj.set_value("State", State.ACTIVE.value)
    obj.set_value("Activation Date", now)


def revoke(obj: ManagedObject, reason_code: int, occurrence_date: int | None, now: int) -> None:
    state = obj.state
    if state is None:
        raise errors.IllegalOperation(f"a {obj.object_type.name} cannot be revoked")
    if reason_code in COMPROMISE_REASONS:
        if state == State.DESTROYED:
            obj.set_value("State", State.DESTROYED_COMPROMISED.value)
        elif state in (State.PRE_ACTIVE, State.ACTIVE, State.DEACTIVATED):
            obj.set_value("State", State.COMPROMISED.value)
        else:
            raise errors.IllegalOperation(f"object is {state.name} and cannot be revoked")
        obj.set_value("Compromise Date", now)
        # KMIP 1.4, 4.20: without a client date, the Initial Date.
        if occurrence_date is None:
            occurrence_date = obj.value("Initial Date", now)
        obj.set_value("Compromise Occurrence Date", occurrence_date)
        return
    if state not in (State.PRE_ACTIVE, State.ACTIVE):
        raise errors.IllegalOperation(f"object is {state.name}; only a PRE_ACTIVE or ACTIVE object can be revoked")
    obj.set_value("State", State.DEACTIVATED.value)
    obj.set_value("Deactivation Date", now)


def destroy(obj: ManagedObject, now: int) -> None:
    """Mark destroyed; the caller removes the key material."""
    state = obj.state
    if state == State.ACTIVE:
        raise errors.LifecycleRefused("object is ACTIVE; revoke it before destroying it")
    if state in DESTROYED_STATES:
        raise errors.IllegalOperation(f"object is already {state.name}")
    if state is not None:
        new = State.DESTROYED_COMPROMISED if state == State.COMPROMISED else State.DESTROYED
        obj.set_value("State", new.value)
    obj.set_value("Destroy Date", now)


def require_usable(obj: ManagedObject, protect: bool, now: int | None = None) -> None:
    """Protecting (Encrypt, Sign, MAC, wrapping) needs an Active object;
    processing (Decrypt, SignatureVerify) is also allowed once the object is
    Deactivated or Compromised (KMIP 1.4, 3.22 State). Within those states,
    protecting stops at the Protect Stop Date and processing starts at the
    Process Start Date (KMIP 1.4, 3.25 and 3.26)."""
    state = obj.state
    allowed = (State.ACTIVE,) if protect else (State.ACTIVE, State.DEACTIVATED, State.COMPROMISED)
    if state not in allowed:
        name = state.name if state else "stateless"
        raise errors.IllegalOperation(f"object is {name}; this operation needs an ACTIVE object")
    if now is None:
        return
    protect_stop = obj.value("Protect Stop Date")
    process_start = obj.value("Process Start Date")
    if protect and protect_stop is not None and protect_stop <= now:
        raise errors.LifecycleRefused(
            "the object's Protect Stop Date has passed; it may no longer protect data", errors.PermissionDenied
        )
    if not protect and process_start is not None and process_start > now:
        raise errors.LifecycleRefused(
            "the object's Process Start Date has not come; it may not process data yet", errors.PermissionDenied
        )


# Dates a client may still change in each state (KMIP 1.4, 3.24 and 3.27:
# the Activation Date only while Pre-Active, the Deactivation Date only
# while Pre-Active or Active).
_DATE_CHANGE_STATES = {
    "Activation Date": (State.PRE_ACTIVE,),
    "Deactivation Date": (State.PRE_ACTIVE, State.ACTIVE),
}


def check_date_change(obj: ManagedObject, name: str) -> None:
    """Refuse a client's change of a lifecycle date the object's state has
    put beyond reach."""
    allowed = _DATE_CHANGE_STATES.get(name)
    state = obj.state
    if allowed is None or state is None or state in allowed:
        return
    raise errors.LifecycleRefused(f"object is {state.name}; its {name} can no longer be changed", errors.PermissionDenied)


# Usage Limits (KMIP 1.4, 3.21; 2.0, 4.61): a budget of bytes or objects an
# object may protect (Encrypt, Sign, MAC), counted down by the server.
def has_usage_limits(obj: ManagedObject) -> bool:
    return obj.first("Usage Limits") is not None


def consume_usage(obj: ManagedObject, data_length: int) -> None:
    """Count one protecting use (of `data_length` bytes) against the
    object's Usage Limits; refuse it when the budget left is too small."""
    limits = obj.first("Usage Limits")
    if limits is None:
        return
    unit = limits.get(TAG.USAGE_LIMITS_UNIT)
    needed = data_length if unit == UsageLimitsUnit.BYTE.value else 1
    total = limits.get(TAG.USAGE_LIMITS_TOTAL)
    count = limits.get(TAG.USAGE_LIMITS_COUNT)
    left = total if count is None else count
    if needed > left:
        raise errors.PermissionDenied("the object's Usage Limits are used up")
    obj.set("Usage Limits", attrs.usage_limits(total, left - needed, unit))
