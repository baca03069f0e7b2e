"""KMIP 1.4, 4.9 Locate / 2.0, 6.1.27: the objects whose attributes match
every attribute in the request, among those the caller may see, in creation
order, paged by Offset Items and Maximum Items.

Equality on any attribute (custom ones included) is an indexed lookup in
storage. A date attribute given twice is a range (KMIP 1.4, 4.9: "the
first value is the start, the second the end"); ranges are checked on the
candidates that the equality filters leave."""

from kmip.core.enums import Operation, State, StorageStatusMask, Tags

from kmip_core import errors, ttlv
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject
from kms_server.operations import common
from kms_server.storage.base import Transaction

OPERATION = Operation.LOCATE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    maximum = payload.get(TAG.MAXIMUM_ITEMS)
    offset = payload.get(TAG.OFFSET_ITEMS, 0)
    if maximum is not None and (not isinstance(maximum, int) or maximum < 0):
        raise errors.InvalidField("Maximum Items must be a non-negative integer")
    if not isinstance(offset, int) or offset < 0:
        raise errors.InvalidField("Offset Items must be a non-negative integer")
    if payload.find(TAG.ATTRIBUTES) is not None:
        given = common.client_attributes(payload, Tags.TEMPLATE_ATTRIBUTE, Tags.ATTRIBUTES)
    else:
        given = []
        for item in payload.find_all(TAG.ATTRIBUTE):
            name, _index, value = attrs.from_attribute_v1(item)
            if value is None:
                raise errors.InvalidField(f"attribute {name!r} has no value")
            given.append((name, value))
    group_member = payload.get(TAG.OBJECT_GROUP_MEMBER)

    equals: list[tuple[str, Item]] = []
    dates: dict[str, list[int]] = {}
    states: list[int] = []
    for name, value in given:
        attrs.check_known(name)
        attrs.check_value_type(name, value)
        if value.type == ItemType.DATE_TIME:
            dates.setdefault(name, []).append(value.value)
        elif name == "State":
            states.append(value.value)
        else:
            equals.append((name, value))
    # Object Group Member (Fresh/Default) is accepted and not modelled; see
    # README "Not supported yet".
    del group_member

    # Destroyed objects are found only when the Storage Status Mask asks
    # for them (2.0, 6.1.27; without a mask, on-line objects only) or the
    # request names a destroyed State.
    mask = payload.get(TAG.STORAGE_STATUS_MASK, StorageStatusMask.ONLINE_STORAGE.value)
    with_destroyed = bool(mask & StorageStatusMask.DESTROYED_STORAGE.value) or any(
        s in _DESTROYED for s in states
    )
    # Left out by a check on each object the conditions find, in the one
    # statement that finds them; with no condition at all (every object)
    # found instead by their State, on the lookup index.
    excluded = [] if with_destroyed else _destroyed_states()
    with keystore.transaction(read_only=True) as txn:
        if len(set(states)) > 1:
            uids = []  # One object has one state.
        elif states or dates:
            uids = _filtered(keystore, txn, ctx, equals, dates, states[0] if states else None, excluded)
        elif equals or not excluded:
            uids = keystore.locate(txn, ctx.principal, equals, [], 0, None, excluded=excluded)
        else:
            uids = _without_destroyed(keystore, txn, ctx, keystore.locate(txn, ctx.principal, [], [], 0, None))
    total = len(uids)
    page = uids[offset:] if maximum is None else uids[offset : offset + maximum]
    out = []
    # Located Items (1.3+) is optional ("a server MAY elect to omit"); it is
    # given when the client pages, the one case where the total tells it
    # something the identifiers do not.
    paging = payload.find(TAG.MAXIMUM_ITEMS) is not None or payload.find(TAG.OFFSET_ITEMS) is not None
    if ctx.at_least(1, 3) and paging:
        out.append(ttlv.integer(TAG.LOCATED_ITEMS, total))
    out += [common.uid_item(u) for u in page]
    # KMIP 1.4, 6.12: a later item of the batch may name the located object
    # by the ID Placeholder.
    if page:
        ctx.batch.id_placeholder = page[0]
    return out


_DESTROYED = (State.DESTROYED.value, State.DESTROYED_COMPROMISED.value)


def _destroyed_states() -> list[tuple[str, Item]]:
    return [("State", ttlv.enumeration(TAG.ATTRIBUTE_VALUE, state)) for state in _DESTROYED]


def _without_destroyed(keystore: Keystore, txn: Transaction, ctx: RequestContext, uids: list[str]) -> list[str]:
    """`uids` less the objects whose State is a destroyed one."""
    if not uids:
        return uids
    destroyed: set[str] = set()
    for state in _destroyed_states():
        destroyed.update(keystore.locate(txn, ctx.principal, [state], [], 0, None))
    return [u for u in uids if u not in destroyed]


# A stored state may be behind the effective one when an Activation or
# Deactivation Date has passed since the object was last written
# (lifecycle.apply_dates); these are the stored states that can have become
# each effective state.
_STORED_STATES = {
    State.ACTIVE.value: (State.PRE_ACTIVE.value, State.ACTIVE.value),
    State.DEACTIVATED.value: (State.PRE_ACTIVE.value, State.ACTIVE.value, State.DEACTIVATED.value),
}


def _filtered(
    keystore: Keystore,
    txn: Transaction,
    ctx: RequestContext,
    equals: list[tuple[str, Item]],
    dates: dict[str, list[int]],
    state: int | None,
    excluded: list[tuple[str, Item]],
) -> list[str]:
    """Candidates from indexed lookups (one per stored state that can be the
    requested effective state), then checked on the loaded objects; those
    with a pair of `excluded` are left out, unless a state is asked (the
    stored states it stands for then leave out any other)."""
    if state is None:
        queries = [equals]
    else:
        queries = [
            equals + [("State", ttlv.enumeration(TAG.ATTRIBUTE_VALUE, stored))]
            for stored in _STORED_STATES.get(state, (state,))
        ]
    candidates = {}
    for query in queries:
        for uid in keystore.locate(
            txn, ctx.principal, query, list(dates), 0, None, excluded=excluded if state is None else ()
        ):
            if uid not in candidates:
                obj = keystore.load(txn, ctx.principal, uid, Action.READ_ATTRIBUTES, ctx.now)
                candidates[uid] = obj
    matching = [
        obj
        for obj in candidates.values()
        if (state is None or obj.value("State") == state) and _dates_match(obj, dates)
    ]
    return [obj.uid for obj in sorted(matching, key=lambda o: o.sequence)]


def _dates_match(obj: ManagedObject, dates: dict[str, list[int]]) -> bool:
    for name, bounds in dates.items():
        values = [v.value for v in obj.attributes.get(name, [])]
        if len(bounds) == 1:
            ok = bounds[0] in values
        else:
            low, high = min(bounds), max(bounds)
            ok = any(low <= v <= high for v in values)
        if not ok:
            return False
    return True
