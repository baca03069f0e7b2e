"""Rules shared by Add, Modify, Delete and Set Attribute: which attributes
a client may change, and how values are checked. Each operation has its own
module; this one holds what they have in common."""


from kmip_core import errors, ttlv
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore import lifecycle
from kms_server.keystore.objects import ManagedObject


def check_client_may_change(name: str, deleting: bool = False) -> attrs.AttributeSpec | None:
    spec = attrs.check_known(name)
    if spec is None:
        return None
    allowed = spec.client_deletable if deleting else spec.client_modifiable
    if not allowed:
        raise errors.AttributeReadOnly(f"attribute {name!r} cannot be {'deleted' if deleting else 'changed'} by a client")
    return spec


def check_applies(spec: attrs.AttributeSpec | None, obj: ManagedObject, name: str) -> None:
    """The attribute applies to this object, and its state still lets a
    client change it (a lifecycle date already passed cannot be moved)."""
    if spec is not None and obj.object_type not in spec.applies_to:
        raise errors.InvalidField(f"attribute {name!r} does not apply to a {obj.object_type.name}")
    lifecycle.check_date_change(obj, name)


def changed_attribute_v1(name: str, value: Item, index: int) -> Item:
    """The Attribute a 1.x Modify or Delete Attribute answers: the value
    with its Attribute Index, given also when it is 0 for an attribute that
    may have several instances (custom ones included), as PyKMIP's server
    answers and its clients read (KMIP 1.4, 2.1.1: an omitted index means
    0, so a reader of the specification reads the same). A single-instance
    attribute has no index to tell."""
    spec = attrs.SPECS.get(name)
    multi = spec.multi if spec is not None else attrs.is_custom(name)
    if not multi:
        return attrs.to_attribute_v1(name, value, index)
    return ttlv.structure(
        TAG.ATTRIBUTE,
        [
            ttlv.text(TAG.ATTRIBUTE_NAME, name),
            ttlv.integer(TAG.ATTRIBUTE_INDEX, index),
            attrs.as_value(value),
        ],
    )
