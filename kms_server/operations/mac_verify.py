"""KMIP 1.4, 4.34 MAC Verify / 2.0, 6.1.30: whether MAC Data is the HMAC of
the Data under a managed key. A mismatch is an answer (Validity Indicator
Invalid), not a failure. The key needs the MAC Verify usage bit and may be
Active, Deactivated or Compromised (processing, KMIP 1.4, 3.22)."""

from kmip.core.enums import (
    CryptographicAlgorithm,
    CryptographicUsageMask,
    ObjectType,
    Operation,
    Tags,
    ValidityIndicator,
)

from kms_server import errors
from kms_server.keystore import crypto
from kms_server.operations import common, object_codec
from kms_server.wire import ttlv
from kms_server.wire.ttlv import ItemType

OPERATION = Operation.MAC_VERIFY

T = Tags


def handle(ctx, keystore, payload):
    object_codec.reject_streaming(payload)
    uid = common.unique_identifier(ctx, payload)
    data = common.require(payload, T.DATA, ItemType.BYTE_STRING).value
    mac_data = common.require(payload, T.MAC_DATA, ItemType.BYTE_STRING).value
    with keystore.transaction(read_only=True) as txn:
        obj = object_codec.usable_key(
            keystore,
            txn,
            ctx,
            uid,
            CryptographicUsageMask.MAC_VERIFY,
            protect=False,
            object_types=(ObjectType.SYMMETRIC_KEY,),
        )
    params = object_codec.request_parameters(payload, obj)
    algorithm = params.cryptographic_algorithm
    if algorithm is None:
        value = obj.value("Cryptographic Algorithm")
        algorithm = None if value is None else CryptographicAlgorithm(value)
    if algorithm is None or not algorithm.name.startswith("HMAC_"):
        raise errors.InvalidField(
            "MAC Verify needs an HMAC algorithm, from the key or the Cryptographic Parameters' Cryptographic Algorithm"
        )
    material = keystore.material(obj)
    try:
        crypto.mac_verify(material.data, algorithm, data, mac_data)
        validity = ValidityIndicator.VALID
    except crypto.MacInvalid:
        validity = ValidityIndicator.INVALID
    except crypto.CryptoError as exc:
        raise object_codec.crypto_failure(exc) from None
    return [common.uid_item(obj.uid), ttlv.enumeration(T.VALIDITY_INDICATOR.value, validity.value)]
