"""KMIP 1.4, 4.10 Get / 2.0, 6.1.21: the object with its key material, in
the Key Format Type the client asks for (a default per object type
otherwise), optionally wrapped under another managed key.

Key Wrapping Specification (KMIP 1.4, 2.1.6): only Wrapping Method Encrypt,
with an AES key (RFC 3394 NIST key wrap, or RFC 5649 with padding) or an RSA
public key (OAEP by default, or PKCS#1 v1.5). The wrapping key must be one
the caller may use, Active, with the Wrap Key usage bit. With no Encoding
Option the whole Key Value structure is TTLV-encoded and wrapped, as the
specification requires; No Encoding wraps the Key Material bytes alone.
"""

from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    CryptographicUsageMask,
    EncodingOption,
    KeyCompressionType,
    KeyFormatType,
    KeyWrapType,
    ObjectType,
    Operation,
    PaddingMethod,
    Tags,
    WrappingMethod,
)

from kmip_core import errors, ttlv
from kmip_core.nonblocking import writer_busy
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import attributes, crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject, Material
from kms_server.operations import common, crypto_params, key_use, object_codec, wrapped_key
from kms_server.operations.object_codec import Wrapping
from kms_server.storage.base import Transaction

OPERATION = Operation.GET

T = Tags
_AES_WRAP_MODES = (
    None,
    BlockCipherMode.NIST_KEY_WRAP,
    BlockCipherMode.AES_KEY_WRAP_PADDING,
)
_RSA_WRAP_PADDINGS = (None, PaddingMethod.OAEP, PaddingMethod.PKCS1v15)


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    key_format = common.optional_enum(payload, T.KEY_FORMAT_TYPE, KeyFormatType)
    compression = common.optional_enum(
        payload, T.KEY_COMPRESSION_TYPE, KeyCompressionType
    )
    if compression not in (None, KeyCompressionType.EC_PUBLIC_KEY_TYPE_UNCOMPRESSED):
        raise errors.FeatureNotSupported(
            f"Key Compression Type {compression.name} is not supported"
        )
    # Key Wrap Type As Registered asks for a key registered wrapped as it
    # was registered (wrapped_key); any other Get, and As Registered for a
    # key registered in clear, returns the key unwrapped (issue 14).
    wrap_type = common.optional_enum(payload, T.KEY_WRAP_TYPE, KeyWrapType)
    specification = payload.find(TAG.KEY_WRAPPING_SPECIFICATION)

    with keystore.transaction(read_only=True) as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.READ_MATERIAL, ctx.now)
        wrapping_key = (
            _wrapping_key(ctx, keystore, txn, specification, obj)
            if specification is not None
            else None
        )
    # 2.x answers Object Destroyed (BL-M-8-21), 1.x Item Not Found.
    common.refuse_destroyed(ctx, obj)
    if obj.value("Fresh") is True:
        # Its first Get writes (_served): tried in the reactor thread (not
        # started as a write, which waits for the batch at its write
        # transaction), it starts again as a write now rather than after
        # unsealing and encoding the key.
        writer_busy("the first Get of a key clears Fresh")
    material = keystore.material(obj)
    if wrap_type == KeyWrapType.AS_REGISTERED and material.registered_block is not None:
        return _as_registered(ctx, obj, material, key_format, specification)
    _check_exportable(obj, wrapped=specification is not None)
    wrapping = None
    if wrapping_key is not None:
        assert specification is not None  # a wrapping key comes with its specification
        wrapping = _wrapping(ctx, keystore, specification, obj, *wrapping_key)
    if key_format is None:
        key_format = object_codec.default_format(obj, material, ctx.v2)
    item = object_codec.encode_object(obj, material, key_format, wrapping)
    if obj.value("Fresh") is True:
        _served(ctx, keystore, obj)
    ctx.batch.id_placeholder = obj.uid
    return [
        ttlv.enumeration(TAG.OBJECT_TYPE, obj.object_type.value),
        common.uid_item(obj.uid),
        item,
    ]


# Fresh True as stored (the Attribute Value item's TTLV bytes).
_FRESH = attributes.encode_value(attributes.make("Fresh", True))


def writes(keystore: Keystore, payload: Item | None) -> bool:
    """Whether this Get is likely to write: its key is held by this process
    (keystore/verified_rows.py) as it was when still Fresh, so its first Get
    clears Fresh. Only how the Get starts rests on it (on SQLite, as a write
    at once instead of trying as a read in the reactor and starting again:
    kms_server/server.py); the Get itself reads the row as stored, and
    writes only if that row says so."""
    uid = None if payload is None else payload.get(TAG.UNIQUE_IDENTIFIER)
    return isinstance(uid, str) and keystore.rows.value(uid, "Fresh") == _FRESH


def _as_registered(
    ctx: RequestContext, obj: ManagedObject, material: Material, key_format: KeyFormatType | None, specification: Item | None
) -> list[Item]:
    """A key registered wrapped, returned with the Key Block it was
    registered with (its Key Value still wrapped)."""
    assert material.registered_block is not None
    if specification is not None:
        raise errors.InvalidField("Key Wrap Type As Registered and a Key Wrapping Specification exclude each other")
    registered = ttlv.decode(material.registered_block)
    registered_format = registered.get(TAG.KEY_FORMAT_TYPE)
    if key_format is not None and key_format.value != registered_format:
        raise errors.KeyFormatTypeNotSupported(
            f"object {obj.uid} was registered wrapped in format {KeyFormatType(registered_format).name}; "
            "As Registered returns that format only"
        )
    _check_exportable(obj, wrapped=True)
    item = object_codec.encode_object(obj, material, KeyFormatType(registered_format), None)
    ctx.batch.id_placeholder = obj.uid
    return [
        ttlv.enumeration(TAG.OBJECT_TYPE, obj.object_type.value),
        common.uid_item(obj.uid),
        wrapped_key.as_registered(item, material.registered_block),
    ]


def _served(ctx: RequestContext, keystore: Keystore, obj: ManagedObject) -> None:
    """KMIP 1.4, 3.34: an object is no longer Fresh once it has been served
    to a client. Only the first Get writes; later ones find it False. The
    row read by this Get is written back unless another request changed
    it since; then it is read again under lock."""
    obj.set_value("Fresh", False)  # its answer is already encoded
    if keystore.save_if_unchanged(obj, ctx.now):
        return
    with keystore.transaction() as txn:
        current = keystore.load(txn, ctx.principal, obj.uid, Action.READ_MATERIAL, ctx.now, for_update=True)
        if current.value("Fresh") is True:
            current.set_value("Fresh", False)
            keystore.save(txn, current, ctx.now)


def _check_exportable(obj: ManagedObject, wrapped: bool) -> None:
    """KMIP 1.4, 3.45 and 3.47: a key that is not Extractable never leaves
    the server; a Sensitive one leaves it only wrapped."""
    if obj.value("Extractable") is False:
        raise errors.PermissionDenied(f"object {obj.uid} is not extractable")
    if obj.value("Sensitive") is True and not wrapped:
        raise errors.PermissionDenied(
            f"object {obj.uid} is sensitive and can only be returned wrapped"
        )


def _wrapping_key(
    ctx: RequestContext, keystore: Keystore, txn: Transaction, specification: Item, obj: ManagedObject
) -> tuple[ManagedObject, Item]:
    """Validate the Key Wrapping Specification and load the wrapping key."""
    if specification.type != ItemType.STRUCTURE:
        raise errors.InvalidField("Key Wrapping Specification must be a structure")
    if obj.object_type not in object_codec.KEY_BLOCK_TYPES:
        raise errors.InvalidField(
            f"a {obj.object_type.name} has no Key Block and cannot be wrapped"
        )
    method = common.optional_enum(specification, T.WRAPPING_METHOD, WrappingMethod)
    if method is None:
        raise errors.MissingData("Wrapping Method is required")
    if method != WrappingMethod.ENCRYPT:
        raise errors.FeatureNotSupported(
            f"Wrapping Method {method.name} is not supported; only ENCRYPT"
        )
    if specification.find(TAG.MAC_SIGNATURE_KEY_INFORMATION) is not None:
        raise errors.FeatureNotSupported(
            "MAC/Signature Key Information is not supported"
        )
    info = specification.find(TAG.ENCRYPTION_KEY_INFORMATION)
    if info is None or info.type != ItemType.STRUCTURE:
        raise errors.MissingData(
            "Encryption Key Information is required to wrap with Wrapping Method ENCRYPT"
        )
    wrapping_uid = info.get(TAG.UNIQUE_IDENTIFIER)
    if not isinstance(wrapping_uid, str):
        raise errors.MissingData(
            "Encryption Key Information needs the wrapping key's Unique Identifier"
        )
    wrapping_obj = key_use.usable_key(
        keystore,
        txn,
        ctx,
        wrapping_uid,
        CryptographicUsageMask.WRAP_KEY,
        protect=True,
        object_types=(ObjectType.SYMMETRIC_KEY, ObjectType.PUBLIC_KEY),
    )
    return wrapping_obj, info


def _wrapping(
    ctx: RequestContext,
    keystore: Keystore,
    specification: Item,
    obj: ManagedObject,
    wrapping_obj: ManagedObject,
    info: Item,
) -> Wrapping:
    params = crypto_params.request_parameters(info, wrapping_obj)
    algorithm = crypto_params.key_algorithm(wrapping_obj, params)
    wrapping_material = keystore.material(wrapping_obj)

    if wrapping_obj.object_type == ObjectType.SYMMETRIC_KEY:
        if algorithm != CryptographicAlgorithm.AES:
            raise errors.FeatureNotSupported(
                "a symmetric wrapping key must be an AES key"
            )
        if params.block_cipher_mode not in _AES_WRAP_MODES:
            raise errors.FeatureNotSupported(
                f"wrapping with Block Cipher Mode {params.block_cipher_mode.name} is not supported; "
                "use NIST_KEY_WRAP or AES_KEY_WRAP_PADDING"
            )

        def wrap(data: bytes) -> bytes:
            try:
                return crypto.wrap_key(
                    wrapping_material.data, data, params.block_cipher_mode
                )
            except crypto.CryptoError as exc:
                raise key_use.crypto_failure(exc) from None

    else:
        if algorithm != CryptographicAlgorithm.RSA:
            raise errors.FeatureNotSupported("a public wrapping key must be an RSA key")
        if params.padding_method not in _RSA_WRAP_PADDINGS:
            raise errors.FeatureNotSupported(
                f"wrapping with Padding Method {params.padding_method.name} is not supported; use OAEP or PKCS1v15"
            )
        if params.p_source:
            raise errors.FeatureNotSupported(
                "an OAEP label (P Source) is not supported"
            )

        def wrap(data: bytes) -> bytes:
            try:
                return crypto.rsa_wrap(
                    wrapping_material.data,
                    data,
                    params.padding_method or PaddingMethod.OAEP,
                    params.hashing_algorithm,
                    params.mask_generator_hashing_algorithm,
                )
            except crypto.CryptoError as exc:
                raise key_use.crypto_failure(exc) from None

    encoding = common.optional_enum(specification, T.ENCODING_OPTION, EncodingOption)
    names = [i.value for i in specification.find_all(TAG.ATTRIBUTE_NAME)]
    wrapped_attributes = (
        tuple(common.attributes_structure(ctx, obj, names)) if names else ()
    )
    key_wrapping_data = ttlv.structure(
        TAG.KEY_WRAPPING_DATA,
        [
            ttlv.enumeration(TAG.WRAPPING_METHOD, WrappingMethod.ENCRYPT.value),
            info,
            ttlv.enumeration(TAG.ENCODING_OPTION, encoding.value)
            if encoding is not None
            else None,
        ],
    )
    return Wrapping(
        wrap=wrap,
        key_wrapping_data=key_wrapping_data,
        ttlv_encoding=encoding != EncodingOption.NO_ENCODING,
        attributes=wrapped_attributes,
    )
