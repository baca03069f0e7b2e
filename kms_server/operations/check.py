"""KMIP 1.4, 4.13 Check / 2.0, 6.1.4: would the object allow this use?
The client names what it means to do: a Cryptographic Usage Mask, a
number of Usage Limits units, a Lease Time. Each is checked against the
object; nothing changes. A check that fails is refused (2.x: Incompatible
Cryptographic Usage Mask for the mask; Permission Denied otherwise)."""

from typing import Any

from kmip.core.enums import Operation, Tags

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.CHECK


def _optional(payload: Item, t: Tags, types: tuple[ItemType, ...]) -> Any:
    item = payload.find(t.value)
    if item is None:
        return None
    if item.type not in types:
        raise errors.InvalidField(f"{t.name.replace('_', ' ').title()} has the wrong type")
    return item.value


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    mask = _optional(payload, Tags.CRYPTOGRAPHIC_USAGE_MASK, (ItemType.INTEGER,))
    units = _optional(payload, Tags.USAGE_LIMITS_COUNT, (ItemType.LONG_INTEGER, ItemType.INTEGER))
    lease = _optional(payload, Tags.LEASE_TIME, (ItemType.INTERVAL,))
    with keystore.transaction(read_only=True) as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.USE, ctx.now)
    common.refuse_destroyed(ctx, obj)
    if mask is not None and mask & ~obj.usage_mask:
        raise errors.IncompatibleUsageMask(f"the Cryptographic Usage Mask of object {uid} does not allow {mask:#x}")
    limits = obj.first("Usage Limits")
    if units is not None and limits is not None:
        left = limits.get(TAG.USAGE_LIMITS_COUNT, limits.get(TAG.USAGE_LIMITS_TOTAL))
        if units > left:
            raise errors.PermissionDenied(f"object {uid} has {left} Usage Limits units left")
    granted = obj.value("Lease Time")
    if lease is not None and (granted is None or lease > granted):
        raise errors.PermissionDenied(f"object {uid} is not leased for {lease} s")
    return [common.uid_item(obj.uid)]
