"""KMIP 1.4, 4.21 Destroy: the key material is removed from storage
(crypto-shredding: the sealed blob is deleted, not just marked); the
object's metadata stays so that its history can still be read."""

from kmip.core.enums import Operation

from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import Item
from kms_server.keystore import lifecycle
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject
from kms_server.operations import common

OPERATION = Operation.DESTROY


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    # Checked on the row as read, and written back unless another request
    # changed it meanwhile (the update's version check): on SQLite the
    # write then holds the node's write turn only for its SQL (issue 15).
    # Otherwise checked and written again under lock.
    with keystore.transaction(read_only=True) as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.DESTROY, ctx.now)
    _destroy(ctx, keystore, obj)
    if keystore.save_if_unchanged(obj, ctx.now):
        return [common.uid_item(obj.uid)]
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.DESTROY, ctx.now, for_update=True)
        _destroy(ctx, keystore, obj)
        keystore.save(txn, obj, ctx.now)
    return [common.uid_item(obj.uid)]


def _destroy(ctx: RequestContext, keystore: Keystore, obj: ManagedObject) -> None:
    common.refuse_destroyed(ctx, obj)
    lifecycle.destroy(obj, ctx.now)
    keystore.reseal(obj, None)
