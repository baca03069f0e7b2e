"""KMIP 1.4, 4.30 Decrypt / 2.0, 6.1.13: the reverse of Encrypt, with a
symmetric key or an RSA private key. GCM checks the Authenticated
Encryption Tag and the key wraps their integrity value; a failed check is a
Cryptographic Failure. Decrypting is processing, so a Deactivated or
Compromised key may still do it; the key needs the Decrypt usage bit.
A multi-part decryption (kms_server/operations/streaming.py) gives out the
plaintext of each part as it comes; in GCM the tag, sent with the last
part, is checked only then.
"""

from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    CryptographicUsageMask,
    ObjectType,
    Operation,
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common, key_use, streaming
from kms_server.operations.encrypt import NO_IV_MODES, cipher_request, cipher_stream, optional_bytes, rsa_padding

OPERATION = Operation.DECRYPT

T = Tags


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    tag = optional_bytes(payload, T.AUTHENTICATED_ENCRYPTION_TAG)
    part, data, iv, aad, obj, params, algorithm = cipher_request(
        ctx,
        keystore,
        payload,
        CryptographicUsageMask.DECRYPT,
        protect=False,
        object_types=(ObjectType.SYMMETRIC_KEY, ObjectType.PRIVATE_KEY),
    )
    material = keystore.material(obj)
    if part is not None and not part.init:
        # A later part: key, parameters, IV and additional data are the first part's.
        return streaming.run(ctx, keystore, obj, OPERATION, part, data, tag=tag)[0]

    try:
        if obj.object_type == ObjectType.PRIVATE_KEY:
            if algorithm != CryptographicAlgorithm.RSA:
                raise errors.FeatureNotSupported(
                    f"decryption with a {algorithm.name if algorithm else 'unknown'} private key is not supported"
                )
            if iv is not None or aad is not None or tag is not None:
                raise errors.InvalidField(
                    "RSA decryption takes no IV/Counter/Nonce, additional data or tag"
                )
            plaintext = crypto.rsa_decrypt(
                material.data,
                data,
                rsa_padding(params),
                params.hashing_algorithm,
                params.mask_generator_hashing_algorithm,
                params.p_source,
            )
        else:
            mode = params.block_cipher_mode
            if mode is None and algorithm not in crypto.CHACHA_ALGORITHMS:
                raise errors.MissingData(
                    "a Block Cipher Mode is required, in the request or the key's Cryptographic Parameters"
                )
            named = mode or algorithm
            assert named is not None  # without a mode the algorithm is a ChaCha20 one (above)
            if iv is None and mode not in NO_IV_MODES:
                # The profiles (CS-BC-M-11 to 13, at 1.4, 2.0 and 2.1)
                # answer Invalid Message, not Missing Data.
                raise errors.InvalidMessage(
                    f"IV/Counter/Nonce is required to decrypt in {named.name}"
                )
            if part is not None:
                begin = cipher_stream(material, algorithm, mode, params, iv, aad, decrypting=True)
                return streaming.run(ctx, keystore, obj, OPERATION, part, data, begin, tag=tag)[0]
            if (mode == BlockCipherMode.GCM or algorithm == CryptographicAlgorithm.CHACHA20_POLY1305) and tag is None:
                raise errors.MissingData(
                    f"Authenticated Encryption Tag is required to decrypt in {named.name}"
                )
            plaintext = crypto.decrypt(
                material.data,
                algorithm,
                mode,
                data,
                iv=iv,
                padding=params.padding_method,
                aad=aad,
                tag=tag,
            )
    except crypto.CryptoError as exc:
        raise key_use.crypto_failure(exc) from None
    return [common.uid_item(obj.uid), ttlv.byte_string(TAG.DATA, plaintext)]
