"""KMIP 1.4, 4.32 Signature Verify / 2.0, 6.1.48: check a signature with a
public key. A signature that does not verify is a successful operation whose
Validity Indicator is Invalid; only a check that cannot be made (bad
parameters, malformed key) is a Cryptographic Failure. Verifying is
processing, so a Deactivated or Compromised key may still do it; the key
needs the Verify usage bit.
"""

from kmip.core.enums import (
    CryptographicUsageMask,
    ObjectType,
    Operation,
    Tags,
    ValidityIndicator,
)

from kmip_core import ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common, crypto_params, key_use
from kms_server.operations.sign import scheme, signed_data

OPERATION = Operation.SIGNATURE_VERIFY

T = Tags


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    key_use.reject_streaming(payload)
    uid = common.unique_identifier(ctx, payload)
    data, prehashed = signed_data(payload)
    signature = common.require(payload, T.SIGNATURE_DATA, ItemType.BYTE_STRING).value
    with keystore.transaction(read_only=True) as txn:
        obj = key_use.usable_key(
            keystore,
            txn,
            ctx,
            uid,
            CryptographicUsageMask.VERIFY,
            protect=False,
            object_types=(ObjectType.PUBLIC_KEY,),
        )
    params = crypto_params.request_parameters(payload, obj)
    kwargs = scheme(obj, params)
    material = keystore.material(obj)
    try:
        crypto.verify_signature(
            material.data, data, signature, prehashed=prehashed, **kwargs
        )
        validity = ValidityIndicator.VALID
    except crypto.SignatureInvalid:
        validity = ValidityIndicator.INVALID
    except crypto.CryptoError as exc:
        raise key_use.crypto_failure(exc) from None
    return [
        common.uid_item(obj.uid),
        ttlv.enumeration(TAG.VALIDITY_INDICATOR, validity.value),
    ]
