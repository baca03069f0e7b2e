"""KMIP messages and attribute values on the client side.

Builds the one-item Request Message a client sends (KMIP 1.4 section 7,
2.0 section 8), reads the Response Message back into a result status and
payload, and converts attribute values between Python (str, int, bool,
bytes, aware datetime, PyKMIP enums) and TTLV items, in the 1.x form
(Attribute Name + Attribute Value) and the 2.0 form (the attribute's own tag,
or a vendor Attribute for custom `x-` names).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from kmip.core import enums
from kmip.core.enums import CredentialType, NameType, Operation, ResultReason, ResultStatus, Tags

from kmip_core import ttlv
from kmip_core.ttlv import Item, ItemType

T = Tags
VALUE_TAG = T.ATTRIBUTE_VALUE.value
_INT32 = range(-(2**31), 2**31)


class MalformedResponse(Exception):
    """The bytes that came back are not a response to our request."""


# Requests.
def request_message(
    version: tuple[int, int],
    operation: Operation,
    payload_items: Iterable[Item | None],
    credential: tuple[str, str] | None = None,
    correlation: str | None = None,
    ticket: bytes | None = None,
) -> bytes:
    """One Request Message. `correlation` becomes the header's Client
    Correlation Value (KMIP 1.4, 6.20; 2.0, 7.17), which only 1.4 and later
    define: it is left out of older versions' headers (PyKMIP's own codec
    reads no such field in any version).

    `credential` (username, password) and `ticket` each become one Credential
    of the header's Authentication (KMIP 1.4, 2.1.2; 2.0, 2.1.2), the
    username/password first, so that a server reading only the first
    Credential still finds it. The ticket is a Ticket credential (KMIP 2.0,
    Credential Type Ticket, Ticket Type Login) whatever `version` is: the
    broker's gateway takes its attestation token that way from clients of
    any version."""
    credentials = []
    if credential is not None:
        username, password = credential
        credentials.append(
            ttlv.structure(
                T.CREDENTIAL.value,
                [
                    ttlv.enumeration(T.CREDENTIAL_TYPE.value, CredentialType.USERNAME_AND_PASSWORD.value),
                    ttlv.structure(
                        T.CREDENTIAL_VALUE.value,
                        [ttlv.text(T.USERNAME.value, username), ttlv.text(T.PASSWORD.value, password)],
                    ),
                ],
            )
        )
    if ticket is not None:
        credentials.append(ticket_credential(ticket))
    authentication = ttlv.structure(T.AUTHENTICATION.value, credentials) if credentials else None
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            protocol_version(version),
            ttlv.text(T.CLIENT_CORRELATION_VALUE.value, correlation)
            if correlation is not None and version >= (1, 4)
            else None,
            authentication,
            ttlv.integer(T.BATCH_COUNT.value, 1),
        ],
    )
    item = ttlv.structure(
        T.BATCH_ITEM.value,
        [
            ttlv.enumeration(T.OPERATION.value, operation.value),
            ttlv.structure(T.REQUEST_PAYLOAD.value, payload_items),
        ],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, item]))


def ticket_credential(ticket: bytes) -> Item:
    """A Credential of type Ticket: Credential Value { Ticket Type = Login,
    Ticket Value = `ticket` } (KMIP 2.0, 2.1.2 and 2.1.16)."""
    if not isinstance(ticket, (bytes, bytearray)) or not ticket:
        raise ValueError("a ticket is a non-empty byte string")
    return ttlv.structure(
        T.CREDENTIAL.value,
        [
            ttlv.enumeration(T.CREDENTIAL_TYPE.value, CredentialType.TICKET.value),
            ttlv.structure(
                T.CREDENTIAL_VALUE.value,
                [
                    ttlv.enumeration(T.TICKET_TYPE.value, enums.TicketType.LOGIN.value),
                    ttlv.byte_string(T.TICKET_VALUE.value, bytes(ticket)),
                ],
            ),
        ],
    )


def protocol_version(version: tuple[int, int]) -> Item:
    return ttlv.structure(
        T.PROTOCOL_VERSION.value,
        [
            ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, version[0]),
            ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, version[1]),
        ],
    )


# Responses.
@dataclass(frozen=True)
class Response:
    status: ResultStatus
    reason: ResultReason | None
    message: str
    payload: Item


def parse_response(data: bytes, operation: Operation) -> Response:
    try:
        message = ttlv.decode(data)
    except ttlv.TTLVError as exc:
        raise MalformedResponse(f"undecodable response: {exc}") from None
    if message.tag != T.RESPONSE_MESSAGE.value or message.type != ItemType.STRUCTURE:
        raise MalformedResponse("not a Response Message")
    if message.find(T.RESPONSE_HEADER.value) is None:
        raise MalformedResponse("Response Header is missing")
    items = message.find_all(T.BATCH_ITEM.value)
    if len(items) != 1:
        raise MalformedResponse(f"{len(items)} batch items in the response to a single request")
    item = items[0]
    answered = item.get(T.OPERATION.value)
    if answered is not None and answered != operation.value:
        raise MalformedResponse(f"response is for operation {answered:#x}, not {operation.name}")
    try:
        status = ResultStatus(item.get(T.RESULT_STATUS.value))
    except ValueError:
        raise MalformedResponse("Result Status is missing or not defined") from None
    reason_value = item.get(T.RESULT_REASON.value)
    reason = None
    if reason_value is not None:
        try:
            reason = ResultReason(reason_value)
        except ValueError:
            reason = ResultReason.GENERAL_FAILURE
    text = item.get(T.RESULT_MESSAGE.value, "")
    payload = item.find(T.RESPONSE_PAYLOAD.value)
    if payload is None or payload.type != ItemType.STRUCTURE:
        payload = ttlv.structure(T.RESPONSE_PAYLOAD.value, [])
    return Response(status, reason, text if isinstance(text, str) else "", payload)


# Attribute values: Python -> TTLV.
def value_item(tag: int, value: Any) -> Item:
    """A TTLV item for a Python value: Item (retagged), bool, PyKMIP enum,
    int (Integer, or Long Integer beyond 32 bits), str, bytes, or an aware
    datetime (Date-Time)."""
    if isinstance(value, Item):
        return value.retag(tag)
    if isinstance(value, bool):
        return ttlv.boolean(tag, value)
    if isinstance(value, enum.Enum):
        return ttlv.enumeration(tag, value.value)
    if isinstance(value, int):
        return ttlv.integer(tag, value) if value in _INT32 else ttlv.long_integer(tag, value)
    if isinstance(value, str):
        return ttlv.text(tag, value)
    if isinstance(value, (bytes, bytearray, memoryview)):
        return ttlv.byte_string(tag, bytes(value))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            raise ValueError("a datetime attribute value must be timezone-aware (KMIP dates are UTC)")
        return ttlv.date_time(tag, int(value.timestamp()))
    raise TypeError(f"no KMIP type for a {type(value).__name__} attribute value")


def attribute_value(name: str, value: Any, tag: int = VALUE_TAG) -> Item:
    """A value for attribute `name`; a str given for "Name" becomes the Name
    structure (uninterpreted text)."""
    if name == "Name" and isinstance(value, str):
        return ttlv.structure(
            tag,
            [
                ttlv.text(T.NAME_VALUE.value, value),
                ttlv.enumeration(T.NAME_TYPE.value, NameType.UNINTERPRETED_TEXT_STRING.value),
            ],
        )
    return value_item(tag, value)


def is_custom(name: str) -> bool:
    return name.startswith(("x-", "y-"))


def standard_tag(name: str) -> int:
    try:
        return enums.convert_attribute_name_to_tag(name).value
    except (ValueError, KeyError):
        raise ValueError(f"unknown attribute name {name!r} (custom attributes start with 'x-')") from None


def attribute_v1(name: str, value: Any) -> Item:
    return ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), attribute_value(name, value)])


def attribute_v2(name: str, value: Any) -> Item:
    if is_custom(name):
        vendor, _, short = name.partition("-")
        return ttlv.structure(
            T.ATTRIBUTE.value,
            [
                ttlv.text(T.VENDOR_IDENTIFICATION.value, vendor),
                ttlv.text(T.ATTRIBUTE_NAME.value, short),
                attribute_value(name, value),
            ],
        )
    return attribute_value(name, value, standard_tag(name))


def attribute_items(version: tuple[int, int], pairs: Iterable[tuple[str, Any]]) -> list[Item]:
    """1.x: a list of Attribute structures; 2.0: the children of Attributes."""
    convert = attribute_v2 if version >= (2, 0) else attribute_v1
    return [convert(name, value) for name, value in pairs]


def attribute_reference(version: tuple[int, int], name: str) -> Item:
    """How Get Attributes names an attribute: Attribute Name (1.x) or
    Attribute Reference (2.0)."""
    if version < (2, 0):
        return ttlv.text(T.ATTRIBUTE_NAME.value, name)
    if is_custom(name):
        vendor, _, short = name.partition("-")
        return ttlv.structure(
            T.ATTRIBUTE_REFERENCE.value,
            [ttlv.text(T.VENDOR_IDENTIFICATION.value, vendor), ttlv.text(T.ATTRIBUTE_NAME.value, short)],
        )
    return ttlv.enumeration(T.ATTRIBUTE_REFERENCE.value, standard_tag(name))


# Attribute values: TTLV -> Python.
def _enum_class(tag: int) -> type[enum.Enum] | None:
    try:
        name = Tags(tag).name
    except ValueError:
        return None
    cls = getattr(enums, "".join(part.capitalize() for part in name.split("_")), None)
    return cls if isinstance(cls, type) and issubclass(cls, enum.Enum) else None


def python_value(item: Item, tag: int | None = None) -> Any:
    """A plain Python value: enumerations become the PyKMIP enum named after
    the tag where there is one, dates aware UTC datetimes, structures dicts
    keyed by snake_case tag names (a Name structure its text)."""
    tag = item.tag if tag is None else tag
    if item.type == ItemType.STRUCTURE:
        if tag == T.NAME.value and item.find(T.NAME_VALUE.value) is not None:
            return item.get(T.NAME_VALUE.value)
        out: dict[str, Any] = {}
        for child in item.children():
            key = ttlv.tag_name(child.tag).lower()
            value = python_value(child)
            if key in out:
                previous = out[key]
                out[key] = (previous if isinstance(previous, list) else [previous]) + [value]
            else:
                out[key] = value
        return out
    if item.type == ItemType.ENUMERATION:
        cls = _enum_class(tag)
        if cls is not None:
            try:
                return cls(item.value)
            except ValueError:
                pass
        return item.value
    if item.type in (ItemType.DATE_TIME, ItemType.DATE_TIME_EXTENDED):
        seconds = item.value / 1_000_000 if item.type == ItemType.DATE_TIME_EXTENDED else item.value
        return dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
    return item.value


def _name_tag(name: str) -> int | None:
    if is_custom(name):
        return None
    try:
        return enums.convert_attribute_name_to_tag(name).value
    except (ValueError, KeyError):
        return None


def read_attributes(payload: Item) -> dict[str, list[Any]]:
    """The attributes in a Get Attributes response payload, in either
    version's form, as {name: [values...]}."""
    result: dict[str, list[Any]] = {}
    for child in payload.children():
        if child.tag == T.ATTRIBUTE.value:
            name, value = _read_attribute(child)
            result.setdefault(name, []).append(value)
        elif child.tag == T.ATTRIBUTES.value:
            for item in child.children():
                if item.tag == T.ATTRIBUTE.value:
                    name, value = _read_attribute(item)
                else:
                    try:
                        name = enums.convert_attribute_tag_to_name(Tags(item.tag))
                    except ValueError:
                        name = ttlv.tag_name(item.tag)
                    value = python_value(item)
                result.setdefault(name, []).append(value)
    return result


def _read_attribute(item: Item) -> tuple[str, Any]:
    name = item.get(T.ATTRIBUTE_NAME.value)
    if not isinstance(name, str):
        raise MalformedResponse("Attribute without an Attribute Name")
    vendor = item.get(T.VENDOR_IDENTIFICATION.value)
    if isinstance(vendor, str):
        name = f"{vendor}-{name}"
    value = item.find(VALUE_TAG)
    if value is None:
        return name, None
    return name, python_value(value, _name_tag(name))
