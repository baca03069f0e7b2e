"""The KMIP XML encoding of the OASIS profile test cases (KMIP Profiles 1.4,
5.4 "XML Encoding"; 2.0/2.1, 5.4) turned into TTLV items.

A test-case file is a <KMIP> element holding RequestMessage/ResponseMessage
pairs. Every element names its tag by the specification's name
("UniqueIdentifier"); a leaf carries `type` and `value`. Enumerations are
given by name ("SymmetricKey") or as hex ("0x80000001"); an Integer may be
a list of mask names ("Encrypt Decrypt"); a DateTime is ISO 8601 or the
placeholder `$NOW` with an optional offset in seconds; a ByteString or
BigInteger is hex.

Any other value starting with `$` is a placeholder (`$UNIQUE_IDENTIFIER_0`,
`$IV_COUNTER_NONCE`, ...): in a response it binds to what the server
returned, in a later request it is replaced by that bound value.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from kmip.core import enums

from kmip_core import ttlv
from kmip_core.ttlv import Item, ItemType


def norm(name: str) -> str:
    return name.replace("_", "").replace(" ", "").replace("#", "").replace(".", "").replace("-", "").upper()


TAGS: dict[str, enums.Tags] = {norm(name): member for name, member in enums.Tags.__members__.items()}
_ENUM_CLASSES: dict[str, type[enum.Enum]] = {
    norm(name): cls
    for name, cls in vars(enums).items()
    if isinstance(cls, type) and issubclass(cls, enum.Enum) and cls is not enums.Tags
}
# Tags whose enumeration class is not named after the tag.
_ENUM_FOR_TAG = {
    "MASKGENERATORHASHINGALGORITHM": enums.HashingAlgorithm,
    "PKCS11FUNCTION": getattr(enums, "PKCS11Function", None),
    "PKCS11RETURNCODE": getattr(enums, "PKCS11ReturnCode", None),
    "RNGALGORITHM": getattr(enums, "RNGAlgorithm", None),
}
# Enumeration value names the test cases spell otherwise than PyKMIP.
_VALUE_ALIASES = {"DES3": "TRIPLEDES", "OPAQUEOBJECT": "OPAQUEDATA", "OK": "CKROK"}
_MASKS = (enums.CryptographicUsageMask, enums.ProtectionStorageMask, enums.StorageStatusMask)
_TYPES = {
    "Structure": ItemType.STRUCTURE,
    "Integer": ItemType.INTEGER,
    "LongInteger": ItemType.LONG_INTEGER,
    "BigInteger": ItemType.BIG_INTEGER,
    "Enumeration": ItemType.ENUMERATION,
    "Boolean": ItemType.BOOLEAN,
    "TextString": ItemType.TEXT_STRING,
    "ByteString": ItemType.BYTE_STRING,
    "DateTime": ItemType.DATE_TIME,
    "Interval": ItemType.INTERVAL,
    "DateTimeExtended": ItemType.DATE_TIME_EXTENDED,
}
NOW_RE = re.compile(r"^\$NOW(?:\s*([+-])\s*(\d+))?$")


class VectorError(ValueError):
    """The test case uses a tag, type or value this converter cannot map."""


@dataclass
class Exchange:
    """One request and the response the test case expects for it."""

    index: int
    request: ET.Element
    response: ET.Element


def load(path: Path) -> list[Exchange]:
    root = ET.parse(path).getroot()
    messages = [el for el in root if el.tag in ("RequestMessage", "ResponseMessage")]
    exchanges = []
    for i in range(0, len(messages), 2):
        request = messages[i]
        response = messages[i + 1] if i + 1 < len(messages) else None
        if request.tag != "RequestMessage" or response is None or response.tag != "ResponseMessage":
            raise VectorError(f"{path.name}: message {i + 1} is not a request/response pair")
        exchanges.append(Exchange(i // 2, request, response))
    return exchanges


def tag_of(element: ET.Element) -> int:
    member = TAGS.get(norm(element.tag))
    if member is None:
        raise VectorError(f"unknown tag {element.tag}")
    return member.value


def type_of(element: ET.Element) -> ItemType:
    name = element.get("type", "Structure")
    try:
        return _TYPES[name]
    except KeyError:
        raise VectorError(f"unknown type {name!r} on {element.tag}") from None


def is_placeholder(text: str | None) -> bool:
    return bool(text) and text.startswith("$") and not NOW_RE.match(text)


def now_value(text: str, now: float) -> int | None:
    """`$NOW`, `$NOW-3600`: the current time plus the offset, else None."""
    match = NOW_RE.match(text or "")
    if not match:
        return None
    offset = int(match.group(2) or 0)
    return int(now) + (-offset if match.group(1) == "-" else offset)


def enum_class(tag_name: str, attribute_name: str | None = None) -> type[enum.Enum] | None:
    key = norm(tag_name)
    if key == "ATTRIBUTEREFERENCE":
        return enums.Tags
    if key == "ATTRIBUTEVALUE" and attribute_name:
        key = norm(attribute_name)
    return _ENUM_FOR_TAG.get(key) or _ENUM_CLASSES.get(key)


def enum_value(text: str, tag_name: str, attribute_name: str | None = None) -> int:
    if text.lower().startswith("0x"):
        return int(text, 16)
    cls = enum_class(tag_name, attribute_name)
    if cls is None:
        raise VectorError(f"no enumeration known for {tag_name} ({text})")
    wanted = norm(text)
    wanted = _VALUE_ALIASES.get(wanted, wanted)
    for name, member in cls.__members__.items():
        if norm(name) == wanted:
            return int(member.value)
    raise VectorError(f"{text} is not a {cls.__name__}")


def integer_value(text: str) -> int:
    text = text.strip()
    if re.fullmatch(r"-?\d+", text):
        return int(text)
    if text.lower().startswith("0x"):
        return int(text, 16)
    value = 0
    for flag in text.replace("|", " ").split():
        for cls in _MASKS:
            member = next((m for n, m in cls.__members__.items() if norm(n) == norm(flag)), None)
            if member is not None:
                value |= int(member.value)
                break
        else:
            raise VectorError(f"unknown mask flag {flag!r}")
    return value


def datetime_value(text: str, now: float) -> int:
    at_now = now_value(text, now)
    if at_now is not None:
        return at_now
    try:
        return int(dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp())
    except ValueError:
        raise VectorError(f"bad DateTime {text!r}") from None


def leaf_value(item_type: ItemType, text: str, tag_name: str, now: float, attribute_name: str | None = None):
    """The Python value of a leaf as `ttlv.Item` holds it."""
    if item_type == ItemType.INTEGER:
        return integer_value(text)
    if item_type in (ItemType.LONG_INTEGER, ItemType.INTERVAL):
        return int(text, 0) if text.lower().startswith("0x") else int(text)
    if item_type == ItemType.BIG_INTEGER:
        raw = bytes.fromhex(text)
        return int.from_bytes(raw, "big", signed=True) if raw else 0
    if item_type == ItemType.ENUMERATION:
        return enum_value(text, tag_name, attribute_name)
    if item_type == ItemType.BOOLEAN:
        if text.lower() in ("true", "1"):
            return True
        if text.lower() in ("false", "0"):
            return False
        raise VectorError(f"bad Boolean {text!r}")
    if item_type == ItemType.TEXT_STRING:
        return text
    if item_type == ItemType.BYTE_STRING:
        return bytes.fromhex(text)
    if item_type in (ItemType.DATE_TIME, ItemType.DATE_TIME_EXTENDED):
        return datetime_value(text, now)
    raise VectorError(f"cannot read a {item_type.name} value")


def attribute_name_for(parent: ET.Element | None) -> str | None:
    """The Attribute Name beside an Attribute Value (1.x attributes)."""
    if parent is None:
        return None
    name = parent.find("AttributeName")
    return None if name is None else name.get("value")


def to_item(
    element: ET.Element,
    bindings: dict[str, object],
    now: float,
    substitutions: dict[bytes, bytes] | None = None,
    parent: ET.Element | None = None,
) -> Item:
    """A request element as a TTLV item, placeholders replaced by their
    bound values and server-chosen bytes learned earlier in the flow
    (`substitutions`) replaced by what this server chose."""
    tag = tag_of(element)
    item_type = type_of(element)
    if item_type == ItemType.STRUCTURE:
        return Item(tag, item_type, tuple(to_item(c, bindings, now, substitutions, element) for c in element))
    text = element.get("value", "")
    if is_placeholder(text):
        if text[1:] not in bindings:
            raise VectorError(f"placeholder {text} is used before a response bound it")
        return Item(tag, item_type, bindings[text[1:]])
    value = leaf_value(item_type, text, element.tag, now, attribute_name_for(parent))
    if substitutions and item_type == ItemType.BYTE_STRING and value in substitutions:
        value = substitutions[value]
    return Item(tag, item_type, value)


def encode_request(element: ET.Element, bindings, now: float, substitutions=None) -> bytes:
    return ttlv.encode(to_item(element, bindings, now, substitutions))


def protocol_version(element: ET.Element) -> tuple[int, int] | None:
    pv = element.find("RequestHeader/ProtocolVersion")
    if pv is None:
        return None
    major = pv.find("ProtocolVersionMajor")
    minor = pv.find("ProtocolVersionMinor")
    return int(major.get("value")), int(minor.get("value"))
