"""Rules shared by Add, Modify, Delete and Set Attribute: which attributes
a client may change, and how values are checked. Each operation has its own
module; this one holds what they have in common."""

from kmip_core import errors
from kms_server.keystore import attributes as attrs
from kms_server.keystore import lifecycle


def check_client_may_change(name: str, deleting: bool = False):
    spec = attrs.check_known(name)
    if spec is None:
        return None
    allowed = spec.client_deletable if deleting else spec.client_modifiable
    if not allowed:
        raise errors.AttributeReadOnly(f"attribute {name!r} cannot be {'deleted' if deleting else 'changed'} by a client")
    return spec


def check_applies(spec, obj, name: str) -> None:
    """The attribute applies to this object, and its state still lets a
    client change it (a lifecycle date already passed cannot be moved)."""
    if spec is not None and obj.object_type not in spec.applies_to:
        raise errors.InvalidField(f"attribute {name!r} does not apply to a {obj.object_type.name}")
    lifecycle.check_date_change(obj, name)
