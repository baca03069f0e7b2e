"""KMIP 1.4, 4.9 Locate / 2.0, 6.1.27: the objects whose attributes match
every attribute in the request, among those the caller may see, in creation
order, paged by Offset Items and Maximum Items.

Equality on any attribute (custom ones included) is an indexed lookup in
storage. A date attribute given twice is a range (KMIP 1.4, 4.9: "the
first value is the start, the second the end"); ranges are checked on the
candidates that the equality filters leave."""

from kmip.core.enums import Operation, Tags

from kms_server import errors
from kms_server.keystore import attributes as attrs
from kms_server.keystore.policy import Action
from kms_server.operations import common
from kms_server.wire import ttlv
from kms_server.wire.ttlv import ItemType

OPERATION = Operation.LOCATE


def handle(ctx, keystore, payload):
    maximum = payload.get(Tags.MAXIMUM_ITEMS.value)
    offset = payload.get(Tags.OFFSET_ITEMS.value, 0)
    if maximum is not None and (not isinstance(maximum, int) or maximum < 0):
        raise errors.InvalidField("Maximum Items must be a non-negative integer")
    if not isinstance(offset, int) or offset < 0:
        raise errors.InvalidField("Offset Items must be a non-negative integer")
    if payload.find(Tags.ATTRIBUTES.value) is not None:
        given = common.client_attributes(payload, Tags.TEMPLATE_ATTRIBUTE, Tags.ATTRIBUTES)
    else:
        given = []
        for item in payload.find_all(Tags.ATTRIBUTE.value):
            name, _index, value = attrs.from_attribute_v1(item)
            if value is None:
                raise errors.InvalidField(f"attribute {name!r} has no value")
            given.append((name, value))
    group_member = payload.get(Tags.OBJECT_GROUP_MEMBER.value)

    equals, dates = [], {}
    for name, value in given:
        attrs.check_known(name)
        attrs.check_value_type(name, value)
        if value.type == ItemType.DATE_TIME:
            dates.setdefault(name, []).append(value.value)
        else:
            equals.append((name, value))
    if group_member is not None and not any(n == "Object Group" for n, _ in equals):
        pass  # Group membership (Fresh/Default) is not modelled; see README.

    with keystore.transaction() as txn:
        uids = keystore.locate(txn, ctx.principal, equals, list(dates), 0, None)
        if dates:
            uids = [u for u in uids if _dates_match(keystore, txn, ctx, u, dates)]
    total = len(uids)
    page = uids[offset:] if maximum is None else uids[offset : offset + maximum]
    out = []
    if ctx.at_least(1, 3):
        out.append(ttlv.integer(Tags.LOCATED_ITEMS.value, total))
    out += [common.uid_item(u) for u in page]
    return out


def _dates_match(keystore, txn, ctx, uid, dates) -> bool:
    obj = keystore.load(txn, ctx.principal, uid, Action.READ_ATTRIBUTES, ctx.now)
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
