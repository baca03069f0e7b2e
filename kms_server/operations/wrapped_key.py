"""Keys registered wrapped (issue 14): a Key Block whose Key Value is a Byte
String and whose Key Wrapping Data names another managed key (KMIP 1.4,
2.1.3-2.1.5; 2.0, 2.1.3-2.1.5), or, as PyKMIP's client sends it, a Key
Value structure whose Key Material holds the wrapped bytes.

Register unwraps it with that key, which the caller must be allowed to use
with the Unwrap Key usage bit (Wrapping Method Encrypt only: AES key wrap,
RFC 3394 or 5649, with a symmetric key; RSA OAEP or PKCS#1 v1.5 with a
private key). The key is then stored like any other, so every operation
uses it, and the Key Block as registered is kept beside it, sealed the same
way: Get with Key Wrap Type As Registered returns that Key Block byte for
byte; any other Get returns the key unwrapped (or wrapped anew by a Key
Wrapping Specification), as for a key registered in clear."""

from __future__ import annotations

from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    CryptographicUsageMask,
    EncodingOption,
    ObjectType,
    PaddingMethod,
    Tags,
    WrappingMethod,
)

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common, crypto_params, key_use

T = Tags
_AES_WRAP_MODES = (None, BlockCipherMode.NIST_KEY_WRAP, BlockCipherMode.AES_KEY_WRAP_PADDING)
_RSA_WRAP_PADDINGS = (None, PaddingMethod.OAEP, PaddingMethod.PKCS1v15)


def is_wrapped(holder: Item) -> bool:
    block = holder.find(TAG.KEY_BLOCK)
    return block is not None and block.type == ItemType.STRUCTURE and block.find(TAG.KEY_WRAPPING_DATA) is not None


def unwrap_for_register(ctx: RequestContext, keystore: Keystore, holder: Item) -> tuple[Item, bytes]:
    """The object structure with its Key Block unwrapped (what Register
    decodes), and the registered Key Block's TTLV to keep."""
    block = holder.find(TAG.KEY_BLOCK)
    assert block is not None
    wrapping_data = block.find(TAG.KEY_WRAPPING_DATA)
    assert wrapping_data is not None
    if wrapping_data.type != ItemType.STRUCTURE:
        raise errors.InvalidField("Key Wrapping Data must be a structure")
    method = common.optional_enum(wrapping_data, T.WRAPPING_METHOD, WrappingMethod)
    if method is None:
        raise errors.MissingData("Key Wrapping Data needs a Wrapping Method")
    if method != WrappingMethod.ENCRYPT:
        raise errors.FeatureNotSupported(f"a key wrapped by Wrapping Method {method.name} cannot be registered; only ENCRYPT")
    if wrapping_data.find(TAG.MAC_SIGNATURE_KEY_INFORMATION) is not None:
        raise errors.FeatureNotSupported("a key with MAC/Signature Key Information cannot be registered")
    if wrapping_data.find(TAG.IV_COUNTER_NONCE) is not None:
        raise errors.FeatureNotSupported("a key wrapped with an IV/Counter/Nonce cannot be registered; use AES key wrap or RSA")
    info = wrapping_data.find(TAG.ENCRYPTION_KEY_INFORMATION)
    if info is None or info.type != ItemType.STRUCTURE:
        raise errors.MissingData("Key Wrapping Data needs Encryption Key Information naming the wrapping key")
    wrapping_uid = info.get(TAG.UNIQUE_IDENTIFIER)
    if not isinstance(wrapping_uid, str):
        raise errors.MissingData("Encryption Key Information needs the wrapping key's Unique Identifier")
    encoding = common.optional_enum(wrapping_data, T.ENCODING_OPTION, EncodingOption)
    value = block.find(TAG.KEY_VALUE)
    if value is None:
        raise errors.MissingData("Key Block needs a Key Value")
    if value.type == ItemType.BYTE_STRING:
        wrapped = value.value
        ttlv_encoded = encoding != EncodingOption.NO_ENCODING  # The specification's default.
    else:
        # PyKMIP's client sends the wrapped bytes as the Key Material of a
        # Key Value structure; they are the wrapped key material unless the
        # Encoding Option says TTLV Encoding.
        material_item = value.find(TAG.KEY_MATERIAL) if value.type == ItemType.STRUCTURE else None
        if material_item is None or material_item.type != ItemType.BYTE_STRING:
            raise errors.InvalidField("the Key Value of a wrapped key is a byte string")
        wrapped = material_item.value
        ttlv_encoded = encoding == EncodingOption.TTLV_ENCODING

    with keystore.transaction(read_only=True) as txn:
        wrapping_obj = key_use.usable_key(
            keystore,
            txn,
            ctx,
            wrapping_uid,
            CryptographicUsageMask.UNWRAP_KEY,
            protect=False,
            object_types=(ObjectType.SYMMETRIC_KEY, ObjectType.PRIVATE_KEY),
        )
    params = crypto_params.request_parameters(info, wrapping_obj)
    algorithm = crypto_params.key_algorithm(wrapping_obj, params)
    wrapping_material = keystore.material(wrapping_obj)
    try:
        if wrapping_obj.object_type == ObjectType.SYMMETRIC_KEY:
            if algorithm != CryptographicAlgorithm.AES:
                raise errors.FeatureNotSupported("a symmetric wrapping key must be an AES key")
            if params.block_cipher_mode not in _AES_WRAP_MODES:
                raise errors.FeatureNotSupported(
                    f"unwrapping with Block Cipher Mode {params.block_cipher_mode.name} is not supported; "
                    "use NIST_KEY_WRAP or AES_KEY_WRAP_PADDING"
                )
            plaintext = crypto.unwrap_key(wrapping_material.data, wrapped, params.block_cipher_mode)
        else:
            if algorithm != CryptographicAlgorithm.RSA:
                raise errors.FeatureNotSupported("a private wrapping key must be an RSA key")
            if params.padding_method not in _RSA_WRAP_PADDINGS:
                raise errors.FeatureNotSupported(
                    f"unwrapping with Padding Method {params.padding_method.name} is not supported; use OAEP or PKCS1v15"
                )
            if params.p_source:
                raise errors.FeatureNotSupported("an OAEP label (P Source) is not supported")
            plaintext = crypto.rsa_unwrap(
                wrapping_material.data,
                wrapped,
                params.padding_method or PaddingMethod.OAEP,
                params.hashing_algorithm,
                params.mask_generator_hashing_algorithm,
            )
    except crypto.CryptoError as exc:
        raise key_use.crypto_failure(exc) from None

    if not ttlv_encoded:
        key_value = ttlv.structure(TAG.KEY_VALUE, [ttlv.byte_string(TAG.KEY_MATERIAL, plaintext)])
    else:
        # TTLV encoding: the wrapped bytes are a Key Value structure (KMIP
        # 1.4, 2.1.4).
        try:
            key_value = ttlv.decode(plaintext)
        except ttlv.TTLVError:
            raise errors.InvalidField("the unwrapped Key Value is not TTLV; say Encoding Option No Encoding") from None
        if key_value.tag != TAG.KEY_VALUE or key_value.type != ItemType.STRUCTURE:
            raise errors.InvalidField("the unwrapped bytes are not a Key Value structure")
    unwrapped_block = ttlv.structure(
        TAG.KEY_BLOCK,
        [key_value if c.tag == TAG.KEY_VALUE else c for c in block.children() if c.tag != TAG.KEY_WRAPPING_DATA],
    )
    unwrapped = ttlv.structure(
        holder.tag, [unwrapped_block if c.tag == TAG.KEY_BLOCK else c for c in holder.children()]
    )
    return unwrapped, ttlv.encode(block)


def as_registered(item: Item, registered_block: bytes) -> Item:
    """The object structure a Get encoded, with the Key Block as it was
    registered in place of its own."""
    block = ttlv.decode(registered_block)
    return ttlv.structure(item.tag, [block if c.tag == TAG.KEY_BLOCK else c for c in item.children()])
