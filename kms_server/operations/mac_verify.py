"""KMIP 1.4, 4.34 MAC Verify / 2.0, 6.1.30: whether MAC Data is the HMAC of
the Data under a managed key. A mismatch is an answer (Validity Indicator
Invalid), not a failure. The key needs the MAC Verify usage bit and may be
Active, Deactivated or Compromised (processing, KMIP 1.4, 3.22)."""

from kmip.core.enums import (
    CryptographicUsageMask,
    Operation,
    Tags,
    ValidityIndicator,
)

from kmip_core import ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common, key_use, mac

OPERATION = Operation.MAC_VERIFY

T = Tags


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    obj, algorithm, data = mac.hmac_request(ctx, keystore, payload, CryptographicUsageMask.MAC_VERIFY, "MAC Verify")
    mac_data = common.require(payload, T.MAC_DATA, ItemType.BYTE_STRING).value
    material = keystore.material(obj)
    try:
        crypto.mac_verify(material.data, algorithm, data, mac_data)
        validity = ValidityIndicator.VALID
    except crypto.MacInvalid:
        validity = ValidityIndicator.INVALID
    except crypto.CryptoError as exc:
        raise key_use.crypto_failure(exc) from None
    return [common.uid_item(obj.uid), ttlv.enumeration(TAG.VALIDITY_INDICATOR, validity.value)]
