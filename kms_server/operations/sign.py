"""KMIP 1.4, 4.31 Sign / 2.0, 6.1.47: a signature over data (or over a
digest the client made, Digested Data) with a private key: RSA-PSS, RSA
PKCS#1 v1.5 or ECDSA. The scheme is the Digital Signature Algorithm, or the
Cryptographic Algorithm, Padding Method and Hashing Algorithm, of the
request's Cryptographic Parameters, else the key's. The key must be Active
with the Sign usage bit.
"""

from kmip.core.enums import CryptographicUsageMask, ObjectType, Operation, Tags

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject
from kms_server.operations import common, crypto_params, key_use

OPERATION = Operation.SIGN

T = Tags


def signed_data(payload: Item) -> tuple[bytes, bool]:
    """The Data, or the Digested Data (then True: already hashed)."""
    for t, prehashed in ((T.DATA, False), (T.DIGESTED_DATA, True)):
        item = payload.find(t.value)
        if item is not None:
            if item.type != ItemType.BYTE_STRING:
                raise errors.InvalidField(
                    f"{t.name.replace('_', ' ').title()} must be a byte string"
                )
            return item.value, prehashed
    raise errors.MissingData("Data or Digested Data is required")


def scheme(obj: ManagedObject, params: crypto_params.CryptoParameters) -> dict:
    """The keyword arguments of crypto.sign / verify_signature."""
    crypto_params.key_algorithm(obj, params)
    if params.digital_signature_algorithm is None and params.hashing_algorithm is None:
        raise errors.MissingData(
            "Cryptographic Parameters with a Digital Signature Algorithm or a Hashing Algorithm are required, "
            "in the request or the key's Cryptographic Parameters"
        )
    return {
        "digital_signature_algorithm": params.digital_signature_algorithm,
        "cryptographic_algorithm": params.cryptographic_algorithm,
        "hashing": params.hashing_algorithm,
        "padding": params.padding_method,
    }


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    key_use.reject_streaming(payload)
    uid = common.unique_identifier(ctx, payload)
    data, prehashed = signed_data(payload)
    with keystore.transaction(read_only=True) as txn:
        obj = key_use.usable_key(
            keystore,
            txn,
            ctx,
            uid,
            CryptographicUsageMask.SIGN,
            protect=True,
            object_types=(ObjectType.PRIVATE_KEY,),
        )
    params = crypto_params.request_parameters(payload, obj)
    kwargs = scheme(obj, params)
    key_use.charge_usage(ctx, keystore, obj, len(data))
    material = keystore.material(obj)
    try:
        signature = crypto.sign(material.data, data, prehashed=prehashed, **kwargs)
    except crypto.CryptoError as exc:
        raise key_use.crypto_failure(exc) from None
    return [
        common.uid_item(obj.uid),
        ttlv.byte_string(TAG.SIGNATURE_DATA, signature),
    ]
