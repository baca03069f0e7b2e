"""KMIP 1.4, 4.29 Encrypt / 2.0, 6.1.18: data encrypted with a managed key.

Symmetric keys: AES in GCM (with Authenticated Encryption Additional Data
and Tag), CBC and ECB (Padding Method PKCS5 or none), CTR, CFB, OFB, XTS,
and the NIST key wraps (RFC 3394, RFC 5649); Triple DES in the block modes;
ChaCha20 (no mode; 8- or 12-byte nonce) and ChaCha20-Poly1305 (mode AEAD or
none; 12-byte nonce, tag 12 to 16 bytes).
RSA public keys: OAEP (default; its label is the P Source) or PKCS#1 v1.5. The Cryptographic
Parameters come from the request, else from the key's Cryptographic
Parameters attribute. An IV the server generates is returned; one the
client gave is not. The key must be Active with the Encrypt usage bit.
AES in GCM, CTR, CBC and ECB may also run in parts (Init Indicator,
Correlation Value, Final Indicator: kms_server/operations/streaming.py).
"""

from collections.abc import Callable
from typing import NamedTuple

from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    CryptographicUsageMask,
    ObjectType,
    Operation,
    PaddingMethod,
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.server.payload import optional_bytes
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject, Material
from kms_server.operations import common, crypto_params, key_use, streaming

OPERATION = Operation.ENCRYPT

T = Tags
# Modes whose IV the server makes up when the client gives none.
NO_IV_MODES = (
    BlockCipherMode.ECB,
    BlockCipherMode.NIST_KEY_WRAP,
    BlockCipherMode.AES_KEY_WRAP_PADDING,
)


def rsa_padding(params: crypto_params.CryptoParameters) -> PaddingMethod:
    padding = params.padding_method or PaddingMethod.OAEP
    if padding not in (PaddingMethod.OAEP, PaddingMethod.PKCS1v15):
        raise errors.FeatureNotSupported(
            f"RSA encryption with Padding Method {padding.name} is not supported"
        )
    if params.p_source and padding != PaddingMethod.OAEP:
        raise errors.InvalidField("a P Source (OAEP label) needs Padding Method OAEP")
    return padding


class CipherRequest(NamedTuple):
    """What Encrypt and Decrypt read alike from a request: its place in a
    multi-part operation, the data, IV and additional data, and the key
    (usable for the operation) with the Cryptographic Parameters in force."""

    part: streaming.Part | None
    data: bytes
    iv: bytes | None
    aad: bytes | None
    obj: ManagedObject
    params: crypto_params.CryptoParameters
    algorithm: CryptographicAlgorithm | None


def cipher_request(
    ctx: RequestContext,
    keystore: Keystore,
    payload: Item,
    usage: CryptographicUsageMask,
    protect: bool,
    object_types: tuple[ObjectType, ...],
) -> CipherRequest:
    part = streaming.part_of(payload)
    uid = common.unique_identifier(ctx, payload)
    data = common.require(payload, T.DATA, ItemType.BYTE_STRING).value
    iv = optional_bytes(payload, T.IV_COUNTER_NONCE)
    aad = optional_bytes(payload, T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA)
    if part is not None:
        streaming.check_later_part(payload, part, (T.IV_COUNTER_NONCE, T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA))
    with keystore.transaction(read_only=True) as txn:
        obj = key_use.usable_key(keystore, txn, ctx, uid, usage, protect=protect, object_types=object_types)
    params = crypto_params.request_parameters(payload, obj)
    return CipherRequest(part, data, iv, aad, obj, params, crypto_params.key_algorithm(obj, params))


def cipher_stream(
    material: Material,
    algorithm: CryptographicAlgorithm | None,
    mode: BlockCipherMode | None,
    params: crypto_params.CryptoParameters,
    iv: bytes | None,
    aad: bytes | None,
    *,
    decrypting: bool,
) -> Callable[[], crypto.CipherStream]:
    """What makes the cipher of the first part of a multi-part Encrypt or
    Decrypt (the tag length is an encryption's to choose)."""
    return lambda: crypto.CipherStream(
        material.data,
        algorithm,
        mode,
        decrypting=decrypting,
        iv=iv,
        padding=params.padding_method,
        aad=aad,
        tag_length=None if decrypting else params.tag_length,
    )


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    part, data, iv, aad, obj, params, algorithm = cipher_request(
        ctx,
        keystore,
        payload,
        CryptographicUsageMask.ENCRYPT,
        protect=True,
        object_types=(ObjectType.SYMMETRIC_KEY, ObjectType.PUBLIC_KEY),
    )
    key_use.charge_usage(ctx, keystore, obj, len(data))
    material = keystore.material(obj)
    result = [common.uid_item(obj.uid)]
    if part is not None and not part.init:
        # A later part: key, parameters and IV are the first part's.
        return streaming.run(ctx, keystore, obj, OPERATION, part, data)[0]

    if obj.object_type == ObjectType.PUBLIC_KEY:
        if algorithm != CryptographicAlgorithm.RSA:
            raise errors.FeatureNotSupported(
                f"encryption with a {algorithm.name if algorithm else 'unknown'} public key is not supported"
            )
        if iv is not None or aad is not None:
            raise errors.InvalidField(
                "RSA encryption takes no IV/Counter/Nonce and no additional data"
            )
        try:
            ciphertext = crypto.rsa_encrypt(
                material.data,
                data,
                rsa_padding(params),
                params.hashing_algorithm,
                params.mask_generator_hashing_algorithm,
                params.p_source,
            )
        except crypto.CryptoError as exc:
            raise key_use.crypto_failure(exc) from None
        return result + [ttlv.byte_string(TAG.DATA, ciphertext)]

    mode = params.block_cipher_mode
    if mode is None and algorithm not in crypto.CHACHA_ALGORITHMS:
        raise errors.MissingData(
            "a Block Cipher Mode is required, in the request or the key's Cryptographic Parameters"
        )
    authenticated = mode == BlockCipherMode.GCM or algorithm == CryptographicAlgorithm.CHACHA20_POLY1305
    if authenticated and params.tag_length is not None and not 12 <= params.tag_length <= 16:
        # The profiles (CS-BC-M-GCM-1, CS-BC-M-CHACHA20POLY1305-1) answer
        # General Failure here.
        raise errors.GeneralFailure(f"Tag Length {params.tag_length} is not 12 to 16 bytes")
    generated = False
    if iv is None and mode not in NO_IV_MODES:
        generated = True
        if params.iv_length:
            # A client-chosen IV length (in bits), e.g. for GCM.
            if params.iv_length % 8:
                raise errors.InvalidField("IV Length must be a whole number of bytes")
            iv = crypto.random_bytes(params.iv_length // 8)
    elif iv is not None and params.random_iv:
        raise errors.InvalidField(
            "Random IV asks the server for the IV; the request must not give one"
        )
    if part is not None:
        begin = cipher_stream(material, algorithm, mode, params, iv, aad, decrypting=False)
        result, cipher = streaming.run(ctx, keystore, obj, OPERATION, part, data, begin)
        if generated and cipher.iv is not None:
            result.append(ttlv.byte_string(TAG.IV_COUNTER_NONCE, cipher.iv))
        return result
    try:
        ciphertext, iv_used, tag = crypto.encrypt(
            material.data,
            algorithm,
            mode,
            data,
            iv=iv,
            padding=params.padding_method,
            aad=aad,
            tag_length=params.tag_length,
        )
    except crypto.CryptoError as exc:
        raise key_use.crypto_failure(exc) from None
    result.append(ttlv.byte_string(TAG.DATA, ciphertext))
    if generated and iv_used is not None:
        result.append(ttlv.byte_string(TAG.IV_COUNTER_NONCE, iv_used))
    if tag is not None:
        result.append(ttlv.byte_string(TAG.AUTHENTICATED_ENCRYPTION_TAG, tag))
    return result
