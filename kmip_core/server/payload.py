"""Reading the fields of a request payload or object structure, for the
operation handlers of both services: the object a request names (or the
batch's ID Placeholder), a required child of the right type, an optional
byte string, a child of the right type, an enumeration value that is
defined, the label errors name them by; and the refusal of multi-part
(streaming) requests where a handler does not stream."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, TypeVar, overload

from kmip.core.enums import (
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType

E = TypeVar("E")

T = Tags



def label(t: Tags) -> str:
    return t.name.replace("_", " ").title()


@overload
def enum_field(item: Item, enum_cls: Callable[[int], E], what: Tags) -> E: ...


@overload
def enum_field(item: Item | None, enum_cls: Callable[[int], E], what: Tags) -> E | None: ...


def enum_field(item: Item | None, enum_cls: Callable[[int], E], what: Tags) -> E | None:
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


@overload
def child_item(
    parent: Item, t: Tags, type_: ItemType | tuple[ItemType, ...] | None = None, required: Literal[True] = True
) -> Item: ...


@overload
def child_item(
    parent: Item, t: Tags, type_: ItemType | tuple[ItemType, ...] | None = None, required: bool = True
) -> Item | None: ...


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


def tag(t: Tags) -> int:
    return t.value


@overload
def unique_identifier(ctx: RequestContext, payload: Item, required: Literal[True] = True) -> str: ...


@overload
def unique_identifier(ctx: RequestContext, payload: Item, required: bool = True) -> str | None: ...


def unique_identifier(ctx: RequestContext, payload: Item, required: bool = True) -> str | None:
    """The object a request names; without one, the ID Placeholder left by
    an earlier item of the same batch (KMIP 1.4, 6.12)."""
    uid = payload.get(TAG.UNIQUE_IDENTIFIER)
    if uid is None:
        uid = ctx.batch.id_placeholder
    if uid is None and required:
        raise errors.MissingData("Unique Identifier is required")
    if uid is not None and not isinstance(uid, str):
        raise errors.InvalidField("Unique Identifier must be a text string")
    return uid


def uid_item(uid: str) -> Item:
    return ttlv.text(TAG.UNIQUE_IDENTIFIER, uid)


def require(payload: Item, t: Tags, type_: ItemType | None = None) -> Item:
    item = payload.find(t.value)
    if item is None:
        raise errors.MissingData(f"{t.name.replace('_', ' ').title()} is required")
    if type_ is not None and item.type != type_:
        raise errors.InvalidField(f"{t.name.replace('_', ' ').title()} has the wrong type")
    return item


def optional_bytes(payload: Item, t: Tags) -> bytes | None:
    item = payload.find(t.value)
    if item is None:
        return None
    if item.type != ItemType.BYTE_STRING:
        raise errors.InvalidField(
            f"{t.name.replace('_', ' ').title()} must be a byte string"
        )
    return item.value


def reject_streaming(payload: Item) -> None:
    """Multi-part (streaming) cryptographic operations (KMIP 1.3 Correlation
    Value, Init and Final Indicators) are not supported."""
    for t in (T.CORRELATION_VALUE, T.INIT_INDICATOR):
        if payload.find(t.value) is not None:
            raise errors.FeatureNotSupported(
                "streaming cryptographic operations are not supported"
            )
    final = payload.find(TAG.FINAL_INDICATOR)
    if final is not None and final.value is not True:
        raise errors.FeatureNotSupported(
            "streaming cryptographic operations are not supported"
        )
