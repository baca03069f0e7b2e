"""KMIP 1.4, 4.15 Delete Attribute / 2.0, 6.1.7: remove one value of an
attribute (1.x: by Attribute Name and Index; 2.0: by Current Attribute or
all values of an Attribute Reference)."""

from kmip.core.enums import Operation, Tags

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common
from kms_server.operations.attribute_changes import changed_attribute_v1, check_client_may_change

OPERATION = Operation.DELETE_ATTRIBUTE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    current = None
    all_values = False
    index = 0
    if (holder := payload.find(TAG.CURRENT_ATTRIBUTE)) is not None:
        if len(holder.children()) != 1:
            raise errors.InvalidField("Current Attribute must hold exactly one attribute")
        name, _i, current = common.single_attribute(ctx, holder.children()[0])
    elif (reference := payload.find(TAG.ATTRIBUTE_REFERENCE)) is not None:
        name = common.attribute_reference(reference)
        all_values = True
    else:
        name = common.require(payload, Tags.ATTRIBUTE_NAME).value
        index = payload.get(TAG.ATTRIBUTE_INDEX, 0)
    check_client_may_change(name, deleting=True)
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.MANAGE, ctx.now, for_update=True)
        values = obj.attributes.get(name)
        if not values:
            raise errors.AttributeNotFound(f"object has no attribute {name!r}")
        if all_values:
            removed = values[0]
            del obj.attributes[name]
        else:
            if current is not None:
                try:
                    index = values.index(attrs.as_value(current))
                except ValueError:
                    raise errors.AttributeNotFound(f"object has no such value of {name!r}") from None
            if not isinstance(index, int) or index >= len(values) or index < 0:
                raise errors.IndexOutOfBounds(f"attribute {name!r} has no value at index {index}")
            removed = values.pop(index)
            if not values:
                del obj.attributes[name]
        attrs.track_flag_history(obj.attributes)
        keystore.save(txn, obj, ctx.now)
    if ctx.v2:
        return [common.uid_item(obj.uid)]
    return [common.uid_item(obj.uid), changed_attribute_v1(name, removed, index)]
