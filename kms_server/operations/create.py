"""KMIP 1.4, 4.1 Create: a new symmetric key (AES, HMAC) or secret.

The client gives Object Type and a Template-Attribute (2.0: Attributes)
with at least Cryptographic Algorithm and Length; the key is generated on a
worker thread and sealed before it is stored."""

from kmip.core.enums import CryptographicAlgorithm, ObjectType, Operation, Tags

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import Material
from kms_server.operations import common, object_codec

OPERATION = Operation.CREATE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    object_type = common.optional_enum(payload, Tags.OBJECT_TYPE, ObjectType)
    if object_type is None:
        raise errors.MissingData("Object Type is required")
    if object_type != ObjectType.SYMMETRIC_KEY:
        raise errors.InvalidField(f"Create makes symmetric keys; use CreateKeyPair or Register for a {object_type.name}")
    given = common.client_attributes(payload, Tags.TEMPLATE_ATTRIBUTE, Tags.ATTRIBUTES)
    attributes = keystore.validate_client_attributes(object_type, given)
    algorithm_item = attributes.get("Cryptographic Algorithm")
    length_item = attributes.get("Cryptographic Length")
    if not algorithm_item:
        raise errors.MissingData("Cryptographic Algorithm is required to create a key")
    if not length_item:
        raise errors.MissingData("Cryptographic Length is required to create a key")
    try:
        algorithm = CryptographicAlgorithm(algorithm_item[0].value)
    except ValueError:
        raise errors.InvalidField("Cryptographic Algorithm value is not defined") from None
    try:
        key = crypto.generate_symmetric_key(algorithm, length_item[0].value)
    except crypto.CryptoError as exc:
        raise errors.InvalidField(str(exc.message)) from None
    material = Material(key)
    attributes.update(object_codec.server_attributes(object_type, material, algorithm.value, generated=True))
    attrs.set_initial_defaults(object_type, attributes)
    # Built, sealed and authenticated before the write transaction, which
    # on SQLite waits for its turn behind the node's other writes.
    prepared = keystore.prepare_object(ctx.principal, object_type, attributes, material, ctx.now)
    with keystore.transaction() as txn:
        obj = keystore.store_object(txn, prepared)
    ctx.batch.id_placeholder = obj.uid
    return [ttlv.enumeration(TAG.OBJECT_TYPE, object_type.value), common.uid_item(obj.uid)]
