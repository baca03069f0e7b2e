"""KMIP 1.4, 4.3 Register / 2.0, 6.1.41: a client-supplied object (symmetric
key, private or public key, X.509 certificate, secret data, opaque object)
is stored under a new Unique Identifier.

The client's attributes come from the Template-Attribute (2.0: Attributes);
those the material implies (Cryptographic Algorithm and Length; for a
certificate also Certificate Type and Length, the X.509 attributes and a
Digest) are set by the server, and a client value that contradicts the
material is refused rather than stored.
"""

import dataclasses

from kmip.core.enums import CryptographicAlgorithm, ObjectType, Operation, Tags

from kmip_core import errors
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common, crypto_params, object_codec, wrapped_key

OPERATION = Operation.REGISTER

_ALGORITHM = "Cryptographic Algorithm"
_LENGTH = "Cryptographic Length"


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    object_type = common.optional_enum(payload, Tags.OBJECT_TYPE, ObjectType)
    if object_type is None:
        raise errors.MissingData("Object Type is required")
    tag = object_codec.OBJECT_TAGS.get(object_type)
    if tag is None:
        raise errors.FeatureNotSupported(
            f"registering a {object_type.name} is not supported"
        )
    item = payload.find(tag.value)
    if item is None:
        raise errors.MissingData(
            f"the {object_type.name} to register is missing from the request"
        )
    registered_block = None
    if wrapped_key.is_wrapped(item):
        # Unwrapped with the wrapping key it names; the Key Block as
        # registered is kept for Key Wrap Type As Registered (issue 14).
        item, registered_block = wrapped_key.unwrap_for_register(ctx, keystore, item)
    material, implied = object_codec.decode_object(object_type, item)
    if registered_block is not None:
        material = dataclasses.replace(material, registered_block=registered_block)
    given = common.client_attributes(payload, Tags.TEMPLATE_ATTRIBUTE, Tags.ATTRIBUTES)
    # A client may restate what the material implies (a certificate's
    # Certificate Type, say); _merge_implied refuses a value that differs.
    attributes = keystore.validate_client_attributes(object_type, given, implied=implied)
    _merge_implied(attributes, implied)
    if object_type == ObjectType.SYMMETRIC_KEY:
        _check_symmetric(attributes)
    algorithm = attributes.get(_ALGORITHM)
    for name, values in object_codec.server_attributes(
        object_type, material, algorithm[0].value if algorithm else None, generated=False
    ).items():
        attributes.setdefault(name, values)
    attrs.set_initial_defaults(object_type, attributes)
    with keystore.transaction() as txn:
        obj = keystore.new_object(
            txn, ctx.principal, object_type, attributes, material, ctx.now
        )
    ctx.batch.id_placeholder = obj.uid
    return [common.uid_item(obj.uid)]


def _merge_implied(attributes: dict, implied: dict) -> None:
    for name, value in implied.items():
        existing = attributes.get(name)
        if isinstance(value, list):  # Several values (a certificate's OUs, say): all or nothing.
            if existing and existing != value:
                raise errors.InvalidField(f"{name} does not match the registered certificate")
            attributes[name] = value
            continue
        if not existing:
            attributes[name] = [value]
            continue
        if existing[0] == value:
            continue
        if name == _ALGORITHM and _same_family(existing[0].value, value.value):
            # The client may say ECDSA where the material only tells EC.
            continue
        raise errors.InvalidField(
            f"{name} {_show(name, existing[0].value)} does not match the registered material "
            f"({_show(name, value.value)})"
        )


def _same_family(a: int, b: int) -> bool:
    family = crypto_params.algorithm_family
    return family(CryptographicAlgorithm(a)) == family(CryptographicAlgorithm(b))


def _show(name: str, value: object) -> str:
    if name == _ALGORITHM:
        try:
            return CryptographicAlgorithm(value).name
        except ValueError:
            pass
    return str(value)


def _check_symmetric(attributes: dict) -> None:
    if not attributes.get(_ALGORITHM):
        raise errors.MissingData(
            "Cryptographic Algorithm is required to register a symmetric key"
        )
    # Only the length of the material is checked (decode_object), not
    # whether its algorithm takes that length: the operations that use the
    # key say so (issue 14).
