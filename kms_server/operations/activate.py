"""KMIP 1.4, 4.19 Activate: Pre-Active to Active, Activation Date now."""

from kmip.core.enums import Operation

from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import Item
from kms_server.keystore import lifecycle
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.ACTIVATE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.MANAGE, ctx.now, for_update=True)
        common.refuse_destroyed(ctx, obj)
        lifecycle.activate(obj, ctx.now)
        keystore.save(txn, obj, ctx.now)
    return [common.uid_item(obj.uid)]
