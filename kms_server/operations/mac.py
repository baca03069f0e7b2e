"""KMIP 1.4, 4.33 MAC / 2.0, 6.1.29: an HMAC of the data with a managed
key (HMAC-SHA1, -SHA224, -SHA256, -SHA384, -SHA512 and SHA-3 variants).

The HMAC algorithm is the Cryptographic Algorithm of the request's
Cryptographic Parameters, else of the key's Cryptographic Parameters
attribute, else the key's own algorithm; so an HMAC key says which hash
it is for, and a generic key can be used with an explicit algorithm. The
key must be Active with the MAC Generate usage bit.
"""

from kmip.core.enums import (
    CryptographicAlgorithm,
    CryptographicUsageMask,
    ObjectType,
    Operation,
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject
from kms_server.operations import common, crypto_params, key_use

OPERATION = Operation.MAC

T = Tags


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    obj, algorithm, data = hmac_request(ctx, keystore, payload, CryptographicUsageMask.MAC_GENERATE, "MAC")
    key_use.charge_usage(ctx, keystore, obj, len(data))
    material = keystore.material(obj)
    try:
        mac_data = crypto.mac(material.data, algorithm, data)
    except crypto.CryptoError as exc:
        raise key_use.crypto_failure(exc) from None
    return [common.uid_item(obj.uid), ttlv.byte_string(TAG.MAC_DATA, mac_data)]


def hmac_request(
    ctx: RequestContext, keystore: Keystore, payload: Item, usage: CryptographicUsageMask, what: str
) -> tuple[ManagedObject, CryptographicAlgorithm, bytes]:
    """The key, HMAC algorithm and Data of a MAC or MAC Verify request. MAC
    needs an Active key (protect); MAC Verify also takes a Deactivated or
    Compromised one (process, KMIP 1.4, 3.22)."""
    key_use.reject_streaming(payload)
    uid = common.unique_identifier(ctx, payload)
    data = common.require(payload, T.DATA, ItemType.BYTE_STRING).value
    with keystore.transaction(read_only=True) as txn:
        obj = key_use.usable_key(
            keystore,
            txn,
            ctx,
            uid,
            usage,
            protect=usage == CryptographicUsageMask.MAC_GENERATE,
            object_types=(ObjectType.SYMMETRIC_KEY,),
        )
    params = crypto_params.request_parameters(payload, obj)
    algorithm = params.cryptographic_algorithm
    if algorithm is None:
        value = obj.value("Cryptographic Algorithm")
        algorithm = None if value is None else CryptographicAlgorithm(value)
    if algorithm is None or not algorithm.name.startswith("HMAC_"):
        raise errors.InvalidField(
            f"{what} needs an HMAC algorithm, from the key or the Cryptographic Parameters' Cryptographic Algorithm"
        )
    return obj, algorithm, data
