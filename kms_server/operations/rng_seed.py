"""KMIP 1.4, 4.36 RNG Seed / 2.0, 6.1.45: seed data for the server's
random number generator. The server's generator is the operating system's
CSPRNG; the data is mixed into its pool (crypto.mix_seed: never credited as
entropy, so it cannot weaken the pool) and the answer says how many bytes
were taken (at most crypto.SEED_MAX_BYTES; 0 where the pool is not
writable)."""

from kmip.core.enums import Operation, Tags

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.RNG_SEED


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    data = common.require(payload, Tags.DATA, ItemType.BYTE_STRING).value
    if not data:
        raise errors.InvalidField("Data (the seed) must not be empty")
    return [ttlv.integer(TAG.DATA_LENGTH, crypto.mix_seed(data))]
