"""What one audit record says, built from a request item.

`AuditDraft` is made by the dispatcher for one batch item and carried by
the keystore bound to that item: every object the item loads, creates or
saves is noted with its vCenter tags (x-Component, x-Name, x-Identifier)
as they are at that moment. Client-supplied attribute names and values are
kept; key material is never reached: only Attribute structures are read
from the payload, and never inside an object (Key Block, Secret Data...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from kmip.core.enums import Tags

from kmip_core import ttlv
from kmip_core.audit.chain import format_time
from kmip_core.policy import Principal
from kmip_core.ttlv import TAG, Item, ItemType

T = Tags
X_TAGS = ("x-Component", "x-Name", "x-Identifier")
MAX_VALUE_CHARS = 512
MAX_ATTRIBUTES = 64

# Subtrees that hold (or may hold) key material or client data: never read.
_OPAQUE = {
    t.value
    for t in (
        T.SYMMETRIC_KEY,
        T.PRIVATE_KEY,
        T.PUBLIC_KEY,
        T.SECRET_DATA,
        T.SPLIT_KEY,
        T.OPAQUE_OBJECT,
        T.PGP_KEY,
        T.CERTIFICATE,
        T.KEY_BLOCK,
        T.KEY_VALUE,
        T.KEY_MATERIAL,
        T.DATA,
        T.CREDENTIAL,
    )
}
_ATTRIBUTE_SETS = {t.value for t in (T.ATTRIBUTES, T.NEW_ATTRIBUTE, T.CURRENT_ATTRIBUTE)}


class AuditedObject(Protocol):
    """An object a request reached (the KMS keystore's ManagedObject): its
    Unique Identifier and its attribute values by name."""

    @property
    def uid(self) -> str: ...

    def value(self, name: str) -> object: ...


def render(item: Item) -> object:
    """A JSON-friendly rendering of an attribute value."""
    if item.type == ItemType.STRUCTURE:
        return {ttlv.tag_name(c.tag): render(c) for c in item.children() if c.tag not in _OPAQUE}
    if item.type == ItemType.DATE_TIME:
        return format_time(item.value)
    if item.type in (ItemType.BYTE_STRING,):
        text = item.value.hex()
    elif item.type == ItemType.TEXT_STRING:
        text = item.value
    elif item.type == ItemType.BOOLEAN:
        return bool(item.value)
    else:
        return item.value if isinstance(item.value, int) and abs(item.value) < 2**53 else str(item.value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "...(truncated)"


def _attribute_name(tag: int) -> str:
    """A 2.0 attribute's 1.x name ("Cryptographic Length"), as records of
    1.x requests use."""
    from kmip.core import enums

    try:
        return enums.convert_attribute_tag_to_name(Tags(tag))
    except ValueError:
        return ttlv.tag_name(tag)


def request_attributes(payload: Item | None) -> list[dict]:
    """Attribute names and values the client supplied in a request payload
    (1.x Attribute structures, 2.x Attributes / New / Current Attribute),
    skipping every subtree that can hold key material."""
    found: list[dict] = []
    if payload is None or payload.type != ItemType.STRUCTURE:
        return found

    def walk(item: Item) -> None:
        for child in item.children():
            if len(found) >= MAX_ATTRIBUTES or child.tag in _OPAQUE:
                continue
            if child.tag == TAG.ATTRIBUTE and child.type == ItemType.STRUCTURE:
                name = child.get(TAG.ATTRIBUTE_NAME)
                value = child.find(TAG.ATTRIBUTE_VALUE)
                entry: dict[str, object] = {"name": name if isinstance(name, str) else "?"}
                index = child.get(TAG.ATTRIBUTE_INDEX)
                if isinstance(index, int):
                    entry["index"] = index
                if value is not None and value.tag not in _OPAQUE:
                    entry["value"] = render(value)
                found.append(entry)
            elif child.tag in _ATTRIBUTE_SETS and child.type == ItemType.STRUCTURE:
                for attribute in child.children():
                    if attribute.tag in _OPAQUE:
                        continue
                    if attribute.tag == TAG.ATTRIBUTE and attribute.type == ItemType.STRUCTURE:
                        # 2.0 vendor attribute: {Vendor Identification,
                        # Attribute Name, Attribute Value}; "x" + "Name" is x-Name.
                        vendor = attribute.get(TAG.VENDOR_IDENTIFICATION)
                        name = attribute.get(TAG.ATTRIBUTE_NAME)
                        value = attribute.find(TAG.ATTRIBUTE_VALUE)
                        entry = {"name": f"{vendor}-{name}" if isinstance(vendor, str) and isinstance(name, str) else "?"}
                        if value is not None and value.tag not in _OPAQUE:
                            entry["value"] = render(value)
                    else:
                        entry = {"name": _attribute_name(attribute.tag), "value": render(attribute)}
                    found.append(entry)
            elif child.type == ItemType.STRUCTURE:
                walk(child)
            elif child.tag == TAG.ATTRIBUTE_NAME and isinstance(child.value, str):
                found.append({"name": child.value})

    try:
        walk(payload)
    except Exception:  # an odd payload must not stop the request or its record
        found.append({"name": "?", "value": "(attributes not readable)"})
    return found



class AuditWriteFailed(Exception):
    """A record could not be written: the operation it describes must not
    take effect (fail closed)."""


@dataclass
class AuditDraft:
    """The record of one batch item, filled in as it runs."""

    event: str
    request_id: str
    item: int | None
    client: dict
    peer: str
    protocol: str | None
    operation: str
    attributes: list[dict] = field(default_factory=list)
    # The Unique Identifier the request names, for refusals that never
    # reached the object.
    requested: str | None = None
    # The client's Client Correlation Value (KMIP 1.4+), recorded only when
    # sent: records without one hash exactly as before this field existed.
    correlation: str | None = None
    objects: dict[str, dict] = field(default_factory=dict)
    # The record written inside the item's own write transaction, if any.
    written: object | None = None

    def touch(self, obj: AuditedObject) -> None:
        tags = {}
        for name in X_TAGS:
            value = obj.value(name)
            if isinstance(value, str):
                tags[name] = value
        self.objects[obj.uid] = tags

    def note_uid(self, uid: str) -> None:
        """Name an object the request reached but could not read (a row
        that failed its integrity check)."""
        self.objects.setdefault(uid, {})

    def reset(self) -> None:
        self.objects.clear()
        self.written = None

    def entry(self, status: str, reason: str | None, detail: str | None = None) -> dict:
        """The record's fields, less seq, prev and time (added on append)."""
        objects = [{"uid": uid, **tags} for uid, tags in self.objects.items()]
        primary = objects[0] if objects else {}
        body = {
            "event": self.event,
            "request_id": self.request_id,
            "item": self.item,
            "client": self.client,
            "peer": self.peer,
            "protocol": self.protocol,
            "operation": self.operation,
            "uid": primary.get("uid", self.requested),
            "object": {k: primary[k] for k in X_TAGS if k in primary},
            "objects": objects,
            "attributes": self.attributes,
            "result": {"status": status, "reason": reason},
        }
        if detail:
            body["detail"] = detail
        if self.correlation:
            text = self.correlation
            body["correlation"] = text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "...(truncated)"
        return body


def client_fields(principal: Principal | None) -> dict:
    if principal is None:
        return {"name": "-", "role": None, "subject": None, "fingerprint": None, "username": None}
    return {
        "name": principal.name,
        "role": getattr(principal.role, "value", principal.role),
        "subject": principal.subject,
        "fingerprint": principal.fingerprint,
        "username": principal.username,
    }


def system_entry(
    client: str, operation: str, detail: str, uids: list[str] | tuple[str, ...] = (), failed: bool = False
) -> dict:
    """A record's fields for something the server or kms-admin did on its
    own (an integrity check, a master-key rotation), not a client request."""
    return {
        "event": "integrity" if failed else "admin",
        "request_id": "-",
        "item": None,
        "client": {"name": client, "role": None, "subject": None, "fingerprint": None, "username": None},
        "peer": "local",
        "protocol": None,
        "operation": operation,
        "uid": uids[0] if uids else None,
        "object": {},
        "objects": [{"uid": uid} for uid in uids],
        "attributes": [],
        "result": {"status": "OPERATION_FAILED", "reason": "GENERAL_FAILURE"} if failed else {"status": "SUCCESS", "reason": None},
        "detail": detail,
    }
