"""The checks on a key used by a cryptographic operation (Encrypt, Decrypt,
MAC, Sign, Signature Verify, wrapping): who may use it, its type, state and
usage mask, its Usage Limits; and the errors those operations share."""

from __future__ import annotations

from kmip.core.enums import (
    CryptographicUsageMask,
    ObjectType,
    Tags,
)

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.ttlv import Item
from kms_server.keystore import crypto, lifecycle
from kms_server.keystore.objects import ManagedObject

T = Tags



def usable_key(
    keystore,
    txn,
    ctx,
    uid: str,
    usage: CryptographicUsageMask,
    protect: bool,
    object_types: tuple[ObjectType, ...],
) -> ManagedObject:
    """Load a key for Encrypt, Decrypt, MAC, Sign, Signature Verify or
    wrapping: the caller may use it (Action.USE), it is of a type the
    operation takes, in a state that allows the operation (Active to
    protect; also Deactivated or Compromised to process), and its
    Cryptographic Usage Mask has the operation's bit."""
    obj = keystore.load(txn, ctx.principal, uid, Action.USE, ctx.now)
    if obj.object_type not in object_types:
        names = " or ".join(t.name for t in object_types)
        raise errors.InvalidField(
            f"object {uid} is a {obj.object_type.name}; this operation needs a {names}"
        )
    lifecycle.require_usable(obj, protect, ctx.now)
    if not obj.usage_mask & usage.value:
        raise errors.PermissionDenied(
            f"the Cryptographic Usage Mask of object {uid} does not include {usage.name}"
        )
    return obj


def charge_usage(ctx, keystore, obj: ManagedObject, data_length: int) -> None:
    """Count a protecting use (Encrypt, Sign, MAC) against the object's
    Usage Limits before it is carried out; a use the budget does not cover
    is refused (KMIP 1.4, 3.21)."""
    if not lifecycle.has_usage_limits(obj):
        return
    with keystore.transaction() as txn:
        current = keystore.load(txn, ctx.principal, obj.uid, Action.USE, ctx.now, for_update=True)
        lifecycle.consume_usage(current, data_length)
        keystore.save(txn, current, ctx.now)


def reject_streaming(payload: Item) -> None:
    """Multi-part (streaming) cryptographic operations (KMIP 1.3 Correlation
    Value, Init and Final Indicators) are not supported."""
    for t in (T.CORRELATION_VALUE, T.INIT_INDICATOR):
        if payload.find(t.value) is not None:
            raise errors.FeatureNotSupported(
                "streaming cryptographic operations are not supported"
            )
    final = payload.find(T.FINAL_INDICATOR.value)
    if final is not None and final.value is not True:
        raise errors.FeatureNotSupported(
            "streaming cryptographic operations are not supported"
        )


def crypto_failure(exc: crypto.CryptoError) -> errors.KmsError:
    return errors.CryptographicFailure(exc.message)


