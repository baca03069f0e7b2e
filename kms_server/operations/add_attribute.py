"""KMIP 1.4, 4.13 Add Attribute / 2.0, 6.1.2: a new value for an attribute
(a new instance of a multi-valued one, or the first value of a single-valued
one). vCenter tags every key this way with text `x-` attributes."""

from kmip.core.enums import Operation

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common
from kms_server.operations.attribute_changes import check_applies, check_client_may_change

OPERATION = Operation.ADD_ATTRIBUTE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    item = payload.find(TAG.ATTRIBUTE) or payload.find(TAG.NEW_ATTRIBUTE)
    if item is None:
        raise errors.MissingData("Attribute is required")
    if item.tag == TAG.NEW_ATTRIBUTE:
        if len(item.children()) != 1:
            raise errors.InvalidField("New Attribute must hold exactly one attribute")
        item = item.children()[0]
    name, _index, value = common.single_attribute(ctx, item)
    if value is None:
        raise errors.MissingData(f"attribute {name!r} has no value")
    spec = check_client_may_change(name)
    attrs.check_value_type(name, value)
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.MANAGE, ctx.now, for_update=True)
        check_applies(spec, obj, name)
        values = obj.attributes.setdefault(name, [])
        if values and (spec is not None and not spec.multi):
            raise errors.AttributeSingleValued(f"attribute {name!r} already has a value; use Modify Attribute")
        if name == "Name" and attrs.as_value(value) in values:
            # KMIP 2.0, 4.35: a Name is unique (BL-M-8); the same value twice
            # on one object is the plainest breach of that.
            raise errors.NonUniqueName("the object already carries this Name")
        values.append(attrs.as_value(value))
        index = len(values) - 1
        attrs.track_flag_history(obj.attributes)
        keystore.save(txn, obj, ctx.now)
    if ctx.v2:
        return [common.uid_item(obj.uid)]
    return [common.uid_item(obj.uid), attrs.to_attribute_v1(name, value, index)]
