"""Tests for kms_server.keystore.lifecycle: every transition of the state
diagram in the module's docstring (KMIP 1.4 Figure 1), and every transition
it does not draw refused with IllegalOperation and no change to the object.

  Pre-Active --Activate / Activation Date reached--> Active
  Pre-Active, Active --Revoke(other reason) / Deactivation Date--> Deactivated
  Pre-Active, Active, Deactivated --Revoke(compromise)--> Compromised
  Pre-Active, Deactivated --Destroy--> Destroyed
  Compromised --Destroy--> Destroyed Compromised
  Destroyed --Revoke(compromise)--> Destroyed Compromised
"""

from __future__ import annotations

import copy
import itertools

import pytest
from kmip.core.enums import ObjectType, RevocationReasonCode, State

from kmip_core import errors
from kms_server.keystore import lifecycle
from kms_server.keystore.objects import ManagedObject

NOW = 1_700_000_000
EARLIER = NOW - 3600
LATER = NOW + 3600

OTHER = RevocationReasonCode.CESSATION_OF_OPERATION.value
OTHER_REASONS = [
    r.value
    for r in RevocationReasonCode
    if r
    not in (RevocationReasonCode.KEY_COMPROMISE, RevocationReasonCode.CA_COMPROMISE)
]
COMPROMISE_REASONS = [
    RevocationReasonCode.KEY_COMPROMISE.value,
    RevocationReasonCode.CA_COMPROMISE.value,
]


def make(
    state: State | None, object_type: ObjectType = ObjectType.SYMMETRIC_KEY, **dates
) -> ManagedObject:
    obj = ManagedObject(uid="uid-1", owner="alice", attributes={})
    obj.set_value("Object Type", object_type.value)
    if state is not None:
        obj.set_value("State", state.value)
    for name, value in dates.items():
        obj.set_value(name.replace("_", " ").title(), value)
    return obj


def activate(obj):
    lifecycle.activate(obj, NOW)


def revoke_other(obj):
    lifecycle.revoke(obj, OTHER, None, NOW)


def revoke_compromise(obj):
    lifecycle.revoke(obj, RevocationReasonCode.KEY_COMPROMISE.value, EARLIER, NOW)


def destroy(obj):
    lifecycle.destroy(obj, NOW)


ACTIONS = {
    "activate": activate,
    "revoke_other": revoke_other,
    "revoke_compromise": revoke_compromise,
    "destroy": destroy,
}

# The diagram: (state, action) -> new state. Everything else is forbidden.
ALLOWED = {
    (State.PRE_ACTIVE, "activate"): State.ACTIVE,
    (State.PRE_ACTIVE, "revoke_other"): State.DEACTIVATED,
    (State.ACTIVE, "revoke_other"): State.DEACTIVATED,
    (State.PRE_ACTIVE, "revoke_compromise"): State.COMPROMISED,
    (State.ACTIVE, "revoke_compromise"): State.COMPROMISED,
    (State.DEACTIVATED, "revoke_compromise"): State.COMPROMISED,
    (State.PRE_ACTIVE, "destroy"): State.DESTROYED,
    (State.DEACTIVATED, "destroy"): State.DESTROYED,
    (State.COMPROMISED, "destroy"): State.DESTROYED_COMPROMISED,
    (State.DESTROYED, "revoke_compromise"): State.DESTROYED_COMPROMISED,
}
FORBIDDEN = [pair for pair in itertools.product(State, ACTIONS) if pair not in ALLOWED]


@pytest.mark.parametrize(
    "state,action", list(ALLOWED), ids=lambda x: getattr(x, "name", x)
)
def test_allowed_transition(state, action):
    obj = make(state)
    ACTIONS[action](obj)
    assert obj.state == ALLOWED[(state, action)]


@pytest.mark.parametrize("state,action", FORBIDDEN, ids=lambda x: getattr(x, "name", x))
def test_forbidden_transition_raises_and_changes_nothing(state, action):
    obj = make(state, activation_date=EARLIER)
    before = copy.deepcopy(obj.attributes)
    with pytest.raises(errors.IllegalOperation):
        ACTIONS[action](obj)
    assert obj.attributes == before


def test_the_table_covers_every_state_and_action():
    assert len(ALLOWED) + len(FORBIDDEN) == len(State) * len(ACTIONS)


# Dates set by the transitions.
def test_activate_sets_the_activation_date():
    obj = make(State.PRE_ACTIVE)
    activate(obj)
    assert obj.value("Activation Date") == NOW


@pytest.mark.parametrize("reason", OTHER_REASONS)
@pytest.mark.parametrize("state", [State.PRE_ACTIVE, State.ACTIVE])
def test_revoke_for_any_other_reason_deactivates(state, reason):
    obj = make(state)
    lifecycle.revoke(obj, reason, None, NOW)
    assert obj.state == State.DEACTIVATED
    assert obj.value("Deactivation Date") == NOW
    assert obj.value("Compromise Date") is None


@pytest.mark.parametrize("reason", COMPROMISE_REASONS)
def test_revoke_for_compromise_records_both_dates(reason):
    obj = make(State.ACTIVE)
    lifecycle.revoke(obj, reason, EARLIER, NOW)
    assert obj.state == State.COMPROMISED
    assert obj.value("Compromise Date") == NOW
    assert obj.value("Compromise Occurrence Date") == EARLIER


def test_revoke_for_compromise_without_occurrence_date_still_records_one():
    obj = make(State.ACTIVE)
    lifecycle.revoke(obj, RevocationReasonCode.KEY_COMPROMISE.value, None, NOW)
    assert obj.value("Compromise Occurrence Date") is not None


@pytest.mark.parametrize(
    "state", [State.PRE_ACTIVE, State.DEACTIVATED, State.COMPROMISED]
)
def test_destroy_sets_the_destroy_date(state):
    obj = make(state)
    destroy(obj)
    assert obj.value("Destroy Date") == NOW


# Objects without a lifecycle.
def test_stateless_object_cannot_be_activated_or_revoked():
    for action in (activate, revoke_other, revoke_compromise):
        obj = make(None, ObjectType.TEMPLATE)
        with pytest.raises(errors.IllegalOperation):
            action(obj)
        assert obj.state is None


def test_stateless_object_can_be_destroyed():
    obj = make(None, ObjectType.TEMPLATE)
    destroy(obj)
    assert obj.state is None
    assert obj.value("Destroy Date") == NOW


# Transitions by date.
def test_activation_date_reached_activates():
    obj = make(State.PRE_ACTIVE, activation_date=NOW)
    lifecycle.apply_dates(obj, NOW)
    assert obj.state == State.ACTIVE


def test_activation_date_in_the_future_does_not_activate():
    obj = make(State.PRE_ACTIVE, activation_date=LATER)
    lifecycle.apply_dates(obj, NOW)
    assert obj.state == State.PRE_ACTIVE


@pytest.mark.parametrize("state", [State.PRE_ACTIVE, State.ACTIVE])
def test_deactivation_date_reached_deactivates(state):
    obj = make(state, deactivation_date=EARLIER)
    lifecycle.apply_dates(obj, NOW)
    assert obj.state == State.DEACTIVATED


def test_both_dates_passed_end_deactivated():
    obj = make(
        State.PRE_ACTIVE, activation_date=EARLIER - 10, deactivation_date=EARLIER
    )
    lifecycle.apply_dates(obj, NOW)
    assert obj.state == State.DEACTIVATED


def test_deactivation_date_in_the_future_does_not_deactivate():
    obj = make(State.ACTIVE, deactivation_date=LATER)
    lifecycle.apply_dates(obj, NOW)
    assert obj.state == State.ACTIVE


@pytest.mark.parametrize(
    "state",
    [
        State.DEACTIVATED,
        State.COMPROMISED,
        State.DESTROYED,
        State.DESTROYED_COMPROMISED,
    ],
)
def test_dates_never_move_an_object_backwards_or_out_of_an_end_state(state):
    obj = make(state, activation_date=EARLIER, deactivation_date=EARLIER)
    lifecycle.apply_dates(obj, NOW)
    assert obj.state == state


def test_apply_dates_ignores_stateless_objects():
    obj = make(None, ObjectType.TEMPLATE, activation_date=EARLIER)
    lifecycle.apply_dates(obj, NOW)
    assert obj.state is None


# Use by state (KMIP 1.4, 3.22).
@pytest.mark.parametrize("state", list(State))
def test_require_usable_to_protect_needs_active(state):
    obj = make(state)
    if state == State.ACTIVE:
        lifecycle.require_usable(obj, protect=True)
    else:
        with pytest.raises(errors.IllegalOperation):
            lifecycle.require_usable(obj, protect=True)


@pytest.mark.parametrize("state", list(State))
def test_require_usable_to_process(state):
    obj = make(state)
    if state in (State.ACTIVE, State.DEACTIVATED, State.COMPROMISED):
        lifecycle.require_usable(obj, protect=False)
    else:
        with pytest.raises(errors.IllegalOperation):
            lifecycle.require_usable(obj, protect=False)


def test_require_usable_refuses_stateless_objects():
    with pytest.raises(errors.IllegalOperation, match="stateless"):
        lifecycle.require_usable(make(None, ObjectType.TEMPLATE), protect=False)
