"""KMIP 1.4, 4.11 Get Attributes / 2.0, 6.1.23: the named attributes of an
object (all of them if none is named); a name the object does not carry is
left out of the response rather than refused."""

from kmip.core.enums import Operation

from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.GET_ATTRIBUTES


def requested_names(ctx: RequestContext, payload: Item) -> list[str] | None:
    names = [i.value for i in payload.find_all(TAG.ATTRIBUTE_NAME)]
    names += [common.attribute_reference(i) for i in payload.find_all(TAG.ATTRIBUTE_REFERENCE)]
    return names or None


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    names = requested_names(ctx, payload)
    with keystore.transaction(read_only=True) as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.READ_ATTRIBUTES, ctx.now)
    return [common.uid_item(obj.uid)] + common.attributes_structure(ctx, obj, names)
