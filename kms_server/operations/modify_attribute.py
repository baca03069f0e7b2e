"""KMIP 1.4, 4.14 Modify Attribute / 2.0, 6.1.30: replace one value of an
attribute the object already carries (1.x: the instance at Attribute Index,
default 0; 2.0: the Current Attribute if given, else the single value)."""

from kmip.core.enums import Operation, Tags

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common
from kms_server.operations.attribute_changes import changed_attribute_v1, check_applies, check_client_may_change

OPERATION = Operation.MODIFY_ATTRIBUTE


def _only_child(item: Item) -> Item:
    if len(item.children()) != 1:
        raise errors.InvalidField(f"{item!r} must hold exactly one attribute")
    return item.children()[0]


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    current = None
    if (new_attribute := payload.find(TAG.NEW_ATTRIBUTE)) is not None:
        name, index, value = common.single_attribute(ctx, _only_child(new_attribute))
        if (current_attribute := payload.find(TAG.CURRENT_ATTRIBUTE)) is not None:
            _n, _i, current = common.single_attribute(ctx, _only_child(current_attribute))
    else:
        item = common.require(payload, Tags.ATTRIBUTE)
        name, index, value = common.single_attribute(ctx, item)
    if value is None:
        raise errors.MissingData(f"attribute {name!r} has no value")
    spec = check_client_may_change(name)
    attrs.check_value_type(name, value)
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.MANAGE, ctx.now, for_update=True)
        check_applies(spec, obj, name)
        values = obj.attributes.get(name)
        if not values:
            raise errors.AttributeNotFound(f"object has no attribute {name!r} to modify")
        if current is not None:
            try:
                index = values.index(attrs.as_value(current))
            except ValueError:
                raise errors.AttributeNotFound(f"object has no such value of {name!r}") from None
        index = index or 0
        if index >= len(values):
            raise errors.IndexOutOfBounds(f"attribute {name!r} has no value at index {index}")
        values[index] = attrs.as_value(value)
        attrs.track_flag_history(obj.attributes)
        keystore.save(txn, obj, ctx.now)
    if ctx.v2:
        return [common.uid_item(obj.uid)]
    return [common.uid_item(obj.uid), changed_attribute_v1(name, value, index)]
