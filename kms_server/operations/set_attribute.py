"""KMIP 2.0, 6.1.50 Set Attribute: give a single-valued attribute its
value, whether or not it had one. Multi-valued attributes are refused (use
Add Attribute)."""

from kmip.core.enums import Operation, Tags

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common
from kms_server.operations.attribute_changes import check_applies, check_client_may_change

OPERATION = Operation.SET_ATTRIBUTE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    holder = common.require(payload, Tags.NEW_ATTRIBUTE)
    if len(holder.children()) != 1:
        raise errors.InvalidField("New Attribute must hold exactly one attribute")
    name, _index, value = common.single_attribute(ctx, holder.children()[0])
    if value is None:
        raise errors.MissingData(f"attribute {name!r} has no value")
    spec = check_client_may_change(name)
    if spec is not None and spec.multi:
        raise errors.InvalidField(f"attribute {name!r} takes several values; use Add Attribute")
    attrs.check_value_type(name, value)
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.MANAGE, ctx.now, for_update=True)
        check_applies(spec, obj, name)
        obj.set(name, value)
        attrs.track_flag_history(obj.attributes)
        keystore.save(txn, obj, ctx.now)
    return [common.uid_item(obj.uid)]
