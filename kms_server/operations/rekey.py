"""KMIP 1.4, 4.4 Re-key / 2.0, 6.1.42: a replacement for a symmetric key.

The new key has a new Unique Identifier and fresh material of the same
algorithm and length, and carries over the existing key's attributes (the
client's Template-Attribute, 2.0 Attributes, may change some). The Names
move to the new key. The existing key gets a Replacement Object Link to the
new one, the new key a Replaced Object Link to the existing one.

Dates: without an Offset the Activation, Process Start, Protect Stop and
Deactivation Dates are copied, so the new key is Active if the existing key
was. With an Offset the new Activation Date is now + Offset and the other
three keep their distance from it that they had from the existing key's
Activation Date.
"""

from kmip.core.enums import (
    CryptographicAlgorithm,
    LinkType,
    ObjectType,
    Operation,
    Tags,
)

from kmip_core import errors
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import attributes as attrs
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject, Material
from kms_server.operations import common, object_codec

OPERATION = Operation.REKEY

T = Tags
# Attributes that describe one object's own history and are not carried
# over to its replacement; new_object sets the ones the new key needs.
_NOT_COPIED = {
    "Unique Identifier",
    "Object Type",
    "State",
    "Initial Date",
    "Original Creation Date",
    "Last Change Date",
    "Activation Date",
    "Process Start Date",
    "Protect Stop Date",
    "Deactivation Date",
    "Destroy Date",
    "Compromise Occurrence Date",
    "Compromise Date",
    "Revocation Reason",
    "Archive Date",
    "Link",
    "Digest",
    "Fresh",
    "Key Value Present",
    "Key Value Location",
}
_RELATIVE_DATES = ("Process Start Date", "Protect Stop Date", "Deactivation Date")


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    offset = _offset(payload)
    given = common.client_attributes(payload, T.TEMPLATE_ATTRIBUTE, T.ATTRIBUTES)
    changes = keystore.validate_client_attributes(ObjectType.SYMMETRIC_KEY, given)

    with keystore.transaction() as txn:
        old = keystore.load(
            txn, ctx.principal, uid, Action.MANAGE, ctx.now, for_update=True
        )
        if old.object_type != ObjectType.SYMMETRIC_KEY:
            raise errors.InvalidField(
                f"Re-key replaces symmetric keys; object {uid} is a {old.object_type.name}"
            )
        common.refuse_destroyed(ctx, old)

        attributes = {
            name: list(values)
            for name, values in old.attributes.items()
            if name not in _NOT_COPIED
        }
        attributes.update(_dates(old, offset, ctx.now))
        attributes.update(changes)
        attributes["Link"] = [
            attrs.link_value(LinkType.REPLACED_OBJECT_LINK.value, old.uid)
        ]
        key = _generate(attributes)
        attributes.update(
            object_codec.server_attributes(
                ObjectType.SYMMETRIC_KEY, Material(key), attributes["Cryptographic Algorithm"][0].value, generated=True
            )
        )
        attrs.set_initial_defaults(ObjectType.SYMMETRIC_KEY, attributes)

        new = keystore.new_object(
            txn,
            ctx.principal,
            ObjectType.SYMMETRIC_KEY,
            attributes,
            Material(key),
            ctx.now,
            owner=old.owner,
        )
        old.remove("Name")
        old.attributes.setdefault("Link", []).append(
            attrs.link_value(LinkType.REPLACEMENT_OBJECT_LINK.value, new.uid)
        )
        keystore.save(txn, old, ctx.now)
    ctx.batch.id_placeholder = new.uid
    return [common.uid_item(new.uid)]


def _offset(payload: Item) -> int | None:
    item = payload.find(TAG.OFFSET)
    if item is None:
        return None
    if item.type != ItemType.INTERVAL:
        raise errors.InvalidField("Offset must be an interval")
    return item.value


def _dates(old: ManagedObject, offset: int | None, now: int) -> dict[str, list[Item]]:
    if offset is None:
        names = ("Activation Date", *_RELATIVE_DATES)
        return {
            name: list(old.attributes[name])
            for name in names
            if old.attributes.get(name)
        }
    activation = now + offset
    dates = {"Activation Date": [attrs.make("Activation Date", activation)]}
    old_activation = old.value("Activation Date")
    if old_activation is not None:
        for name in _RELATIVE_DATES:
            value = old.value(name)
            if value is not None:
                dates[name] = [attrs.make(name, activation + (value - old_activation))]
    return dates


def _generate(attributes: dict) -> bytes:
    algorithm_items = attributes.get("Cryptographic Algorithm")
    length_items = attributes.get("Cryptographic Length")
    if not algorithm_items or not length_items:
        raise errors.MissingData(
            "the key has no Cryptographic Algorithm and Length to re-key with"
        )
    try:
        algorithm = CryptographicAlgorithm(algorithm_items[0].value)
    except ValueError:
        raise errors.InvalidField(
            "Cryptographic Algorithm value is not defined"
        ) from None
    try:
        return crypto.generate_symmetric_key(algorithm, length_items[0].value)
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None
