"""KMIP 1.4, 4.37 Hash / 2.0, 6.1.24: the digest of the Data with the
Hashing Algorithm of the Cryptographic Parameters. No managed object is
involved; streaming (Init/Final Indicator) is not supported."""

from kmip.core.enums import HashingAlgorithm, Operation, Tags

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common, key_use

OPERATION = Operation.HASH


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    key_use.reject_streaming(payload)
    params = common.require(payload, Tags.CRYPTOGRAPHIC_PARAMETERS, ItemType.STRUCTURE)
    hashing = common.optional_enum(params, Tags.HASHING_ALGORITHM, HashingAlgorithm)
    if hashing is None:
        raise errors.MissingData("Hash needs the Hashing Algorithm of the Cryptographic Parameters")
    data = common.require(payload, Tags.DATA, ItemType.BYTE_STRING).value
    try:
        value = crypto.digest(hashing, data)
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None
    return [ttlv.byte_string(TAG.DATA, value)]
