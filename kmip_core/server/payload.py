"""Reading the fields of a request or object structure: a child of the
right type, an enumeration value that is defined, the label errors name
them by. Shared by the object codec and the Cryptographic Parameters."""

from __future__ import annotations

from kmip.core.enums import (
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.ttlv import Item, ItemType

T = Tags



def label(t: Tags) -> str:
    return t.name.replace("_", " ").title()


def enum_field(item: Item | None, enum_cls, what: Tags):
    if item is None:
        return None
    if item.type != ItemType.ENUMERATION:
        raise errors.InvalidField(f"{label(what)} must be an enumeration")
    try:
        return enum_cls(item.value)
    except ValueError:
        raise errors.InvalidField(
            f"{label(what)} value {item.value:#x} is not defined"
        ) from None


def child_item(
    parent: Item,
    t: Tags,
    type_: ItemType | tuple[ItemType, ...] | None = None,
    required: bool = True,
) -> Item | None:
    item = parent.find(t.value)
    if item is None:
        if required:
            raise errors.MissingData(
                f"{label(t)} is required in {ttlv.tag_name(parent.tag).replace('_', ' ').title()}"
            )
        return None
    types = (type_,) if isinstance(type_, ItemType) else type_
    if types is not None and item.type not in types:
        raise errors.InvalidField(f"{label(t)} has the wrong type")
    return item

