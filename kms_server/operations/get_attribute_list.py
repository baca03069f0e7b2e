"""KMIP 1.4, 4.12 Get Attribute List / 2.0, 6.1.24: the names of the
attributes an object carries (2.0: as Attribute References)."""

from kmip.core.enums import Operation

from kmip_core import ttlv
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.GET_ATTRIBUTE_LIST


def _reference(name: str) -> Item:
    spec = attrs.spec_for(name)
    if spec is not None:
        return ttlv.enumeration(TAG.ATTRIBUTE_REFERENCE, spec.tag)
    vendor, _, short = name.partition("-")
    return ttlv.structure(
        TAG.ATTRIBUTE_REFERENCE,
        [ttlv.text(TAG.VENDOR_IDENTIFICATION, vendor), ttlv.text(TAG.ATTRIBUTE_NAME, short)],
    )


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    with keystore.transaction(read_only=True) as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.READ_ATTRIBUTES, ctx.now)
    names = [n for n, values in attrs.visible(obj.uid, obj.attributes, ctx.v2).items() if values]
    if ctx.v2:
        return [common.uid_item(obj.uid)] + [_reference(n) for n in names]
    return [common.uid_item(obj.uid)] + [ttlv.text(TAG.ATTRIBUTE_NAME, n) for n in names]
