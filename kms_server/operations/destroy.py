"""KMIP 1.4, 4.21 Destroy: the key material is removed from storage
(crypto-shredding: the sealed blob is deleted, not just marked); the
object's metadata stays so that its history can still be read."""

from kmip.core.enums import Operation

from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import Item
from kms_server.keystore import lifecycle
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.DESTROY


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.DESTROY, ctx.now, for_update=True)
        common.refuse_destroyed(ctx, obj)
        lifecycle.destroy(obj, ctx.now)
        keystore.reseal(obj, None)
        keystore.save(txn, obj, ctx.now)
    return [common.uid_item(obj.uid)]
