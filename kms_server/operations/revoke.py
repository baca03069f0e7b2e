"""KMIP 1.4, 4.20 Revoke: Deactivated, or Compromised for a key or CA
compromise, with the Revocation Reason recorded."""

from kmip.core.enums import Operation, RevocationReasonCode, Tags

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore import lifecycle
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.REVOKE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    reason = common.require(payload, Tags.REVOCATION_REASON)
    code = reason.get(TAG.REVOCATION_REASON_CODE)
    try:
        RevocationReasonCode(code)
    except ValueError:
        raise errors.InvalidField("Revocation Reason Code is missing or not defined") from None
    occurrence = payload.get(TAG.COMPROMISE_OCCURRENCE_DATE)
    with keystore.transaction() as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.MANAGE, ctx.now, for_update=True)
        if code not in lifecycle.COMPROMISE_REASONS:
            # A destroyed key found compromised becomes Destroyed
            # Compromised (KMIP 1.4, 3.22); nothing else applies to it.
            common.refuse_destroyed(ctx, obj)
        lifecycle.revoke(obj, code, occurrence, ctx.now)
        obj.set("Revocation Reason", attrs.as_value(reason))
        keystore.save(txn, obj, ctx.now)
    return [common.uid_item(obj.uid)]
