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
from kmip_core.server.context import RequestContext
from kmip_core.server.payload import reject_streaming
from kms_server.keystore import crypto, lifecycle
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject
from kms_server.operations import common
from kms_server.storage.base import Transaction

T = Tags


# The payload readers of kmip_core.server.payload are named here too:
# the operation modules read them as common.* / key_use.*.
__all__ = [
    "charge_usage",
    "crypto_failure",
    "reject_streaming",
    "usable_key",
]


def usable_key(
    keystore: Keystore,
    txn: Transaction,
    ctx: RequestContext,
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
    common.refuse_destroyed(ctx, obj)
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


def charge_usage(ctx: RequestContext, keystore: Keystore, obj: ManagedObject, data_length: int) -> None:
    """Count a protecting use (Encrypt, Sign, MAC) against the object's
    Usage Limits before it is carried out; a use the budget does not cover
    is refused (KMIP 1.4, 3.21)."""
    if not lifecycle.has_usage_limits(obj):
        return
    with keystore.transaction() as txn:
        current = keystore.load(txn, ctx.principal, obj.uid, Action.USE, ctx.now, for_update=True)
        lifecycle.consume_usage(current, data_length)
        keystore.save(txn, current, ctx.now)


def crypto_failure(exc: crypto.CryptoError) -> errors.KmsError:
    """Cryptographic Failure, or Feature Not Supported for a computation
    this server does not implement (a cipher or MAC with a key of an
    algorithm it only generates and stores)."""
    if isinstance(exc, crypto.NotSupported):
        return errors.FeatureNotSupported(exc.message)
    return errors.CryptographicFailure(exc.message)


