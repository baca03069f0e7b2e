"""KMIP 1.4, 4.35 RNG Retrieve / 2.0, 6.1.44: Data Length bytes from the
server's random number generator (the operating system's CSPRNG)."""

from kmip.core.enums import Operation, Tags

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.RNG_RETRIEVE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    length = common.require(payload, Tags.DATA_LENGTH, ItemType.INTEGER).value
    if length <= 0:
        raise errors.InvalidField("Data Length must be a positive number of bytes")
    try:
        data = crypto.random_bytes(length)
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None
    return [ttlv.byte_string(TAG.DATA, data)]
