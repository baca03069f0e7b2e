"""Payload helpers shared by the operation modules (the generic readers --
Unique Identifier or ID Placeholder, required fields -- are kmip_core.server.payload's,
named here for the modules that read them as common.*): reading client attributes in
the 1.x (Template-Attribute) and 2.0 (Attributes) forms, and writing
attributes back in the form of the request's version."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from kmip.core.enums import Tags

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.server.payload import require, tag, uid_item, unique_identifier
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import attributes as attrs
from kms_server.keystore import lifecycle
from kms_server.keystore.objects import ManagedObject

# The payload readers of kmip_core.server.payload are named here too:
# the operation modules read them as common.* / key_use.*.
__all__ = [
    "attribute_items",
    "attribute_reference",
    "attributes_structure",
    "client_attributes",
    "optional_enum",
    "refuse_destroyed",
    "require",
    "single_attribute",
    "tag",
    "uid_item",
    "unique_identifier",
]


def attribute_reference(item: Item) -> str:
    """The attribute a 2.0 Attribute Reference names. Only an Enumeration
    (the attribute's tag) or a Structure (a vendor attribute) is one; any
    other type is refused here, before its value is read as a tag."""
    if item.type not in (ItemType.ENUMERATION, ItemType.STRUCTURE):
        raise errors.InvalidField("Attribute Reference must be an Enumeration or a Structure")
    if item.type == ItemType.STRUCTURE and item.get(TAG.VENDOR_IDENTIFICATION) == "":
        # No vendor: a standard attribute by its name, as PyKMIP's client
        # sends one (its AttributeReference is always the structure) and
        # PyKMIP's server reads it (issue 14).
        name = item.get(TAG.ATTRIBUTE_NAME)
        if isinstance(name, str) and attrs.SPECS.get(name) is not None:
            return name
    return attrs.name_from_reference_v2(item)


def optional_enum(payload: Item, t: Tags, enum_cls: Any) -> Any:
    item = payload.find(t.value)
    if item is None:
        return None
    if item.type != ItemType.ENUMERATION:
        raise errors.InvalidField(f"{t.name} must be an enumeration")
    try:
        return enum_cls(item.value)
    except ValueError:
        raise errors.InvalidField(f"{t.name} value {item.value:#x} is not defined") from None


# Reading client attributes.
def _v1_template_attributes(template: Item) -> list[tuple[str, Item]]:
    result = []
    for child in template.children():
        if child.tag == TAG.NAME:
            # A Name given directly in a Template-Attribute.
            result.append(("Name", attrs.as_value(child)))
        elif child.tag == TAG.ATTRIBUTE:
            name, _index, value = attrs.from_attribute_v1(child)
            if value is None:
                raise errors.InvalidField(f"attribute {name!r} has no value")
            result.append((name, value))
        elif child.tag == TAG.TEMPLATE_ATTRIBUTE:
            raise errors.FeatureNotSupported("Template objects are not supported")
    return result


def _v2_attributes(structure: Item) -> list[tuple[str, Item]]:
    result = []
    for child in structure.children():
        name, value = attrs.from_item_v2(child)
        if value is None:
            raise errors.InvalidField(f"attribute {name!r} has no value")
        result.append((name, value))
    return result


def client_attributes(payload: Item, v1_tag: Tags, v2_tag: Tags) -> list[tuple[str, Item]]:
    """Attributes from a 1.x Template-Attribute (or Common/Private/Public
    variant) or a 2.0 Attributes structure; whichever the payload holds."""
    v1 = payload.find(v1_tag.value)
    if v1 is not None:
        return _v1_template_attributes(v1)
    v2 = payload.find(v2_tag.value)
    if v2 is not None:
        return _v2_attributes(v2)
    return []


def single_attribute(ctx: RequestContext, item: Item) -> tuple[str, int | None, Item | None]:
    """One attribute in a request (Add/Modify/Delete/SetAttribute): 1.x
    Attribute structure, or a 2.0 attribute item."""
    if item.tag == TAG.ATTRIBUTE and item.find(TAG.VENDOR_IDENTIFICATION) is None:
        return attrs.from_attribute_v1(item)
    name, value = attrs.from_item_v2(item)
    return name, None, value


# Writing attributes back.
def attribute_items(ctx: RequestContext, obj: ManagedObject, names: Iterable[str] | None) -> list[Item]:
    """The object's attributes in the request version's form: a list of 1.x
    Attribute structures, or the children of a 2.0 Attributes structure."""
    attributes = attrs.visible(obj.uid, obj.attributes, ctx.v2)
    selected = list(attributes) if names is None else list(dict.fromkeys(names))
    out: list[Item] = []
    for name in selected:
        values = attributes.get(name, [])
        for index, value in enumerate(values):
            if ctx.v2:
                out.append(attrs.to_item_v2(name, value))
            else:
                out.append(attrs.to_attribute_v1(name, value, index))
    return out


def attributes_structure(ctx: RequestContext, obj: ManagedObject, names: Iterable[str] | None) -> list[Item]:
    items = attribute_items(ctx, obj, names)
    if ctx.v2:
        return [ttlv.structure(TAG.ATTRIBUTES, items)]
    return items


def refuse_destroyed(ctx: RequestContext, obj: ManagedObject) -> None:
    """An operation that needs a destroyed object's key value or would use
    or change it (Get, Encrypt, Activate, Destroy again, ...) finds nothing
    (issue 14): Item Not Found at 1.x, which names no destroyed object and
    is what clients such as PyKMIP's read (their server forgets a destroyed
    object), Object Destroyed at 2.x. Its metadata stays readable
    (GetAttributes; Locate when asked for destroyed objects), as the OASIS
    profile flows read it."""
    if obj.state not in lifecycle.DESTROYED_STATES:
        return
    if ctx.v2:
        raise errors.ObjectDestroyed(f"object {obj.uid} is destroyed")
    raise errors.ItemNotFound(f"no object with unique identifier {obj.uid!r}: it is destroyed")
