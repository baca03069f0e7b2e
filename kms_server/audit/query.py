"""Searching the audit trail: the filters that `kms-admin audit show` and
the audit page share, how their text is read, and the search itself.

`vm` and `host` select every record of the objects ever tagged with that
x-Name or x-Identifier (x-Component "Virtual Machine" or "ESXi Server"),
so a key's Create, made before vCenter tagged it, is found too.
"""

from __future__ import annotations

__all__ = ["Filters", "correlation_parts", "find", "operation_name", "parse_time", "result_filter", "selected_uids"]

import json
import re
from collections import deque
from dataclasses import dataclass

from kmip_core.audit.timefilter import parse_time
from kms_server.audit.trail import HOST_COMPONENT, VM_COMPONENT, iter_records, objects_named
from kms_server.storage.base import AuditQuery, Storage, StoredAuditRecord


@dataclass(frozen=True)
class Filters:
    vm: str | None = None
    host: str | None = None
    object: str | None = None
    client: str | None = None
    operation: str | None = None  # as the trail spells it: GET, ADD_ATTRIBUTE
    result: str | None = None  # SUCCESS, OPERATION_FAILED or OPERATION_UNDONE
    reason: str | None = None  # a Result Reason name, e.g. ITEM_NOT_FOUND
    since: float | None = None
    until: float | None = None
    # The KMS's own request id, or an id a client passed in its Client
    # Correlation Value (the broker's "broker-req=<id>;host=<name>").
    request_id: str | None = None
    # Only the newest `limit` matching records (None: all).
    limit: int | None = None


def operation_name(text: str) -> str:
    """The trail's spelling of a KMIP operation: "Get", "get",
    "AddAttribute", "add attribute" and "ADD_ATTRIBUTE" all name one.
    Raises ValueError for a name that is no KMIP operation."""
    from kmip.core.enums import Operation

    wanted = re.sub(r"[^a-z0-9]", "", text.lower())
    for operation in Operation:
        if operation.name.replace("_", "").lower() == wanted:
            return operation.name
    raise ValueError(f"{text!r} is not a KMIP operation; use e.g. Get, Create, AddAttribute")


def result_filter(text: str) -> tuple[str, str | None]:
    """(status, reason) for "success", "failure", "undone" or a Result
    Reason name such as Item_Not_Found."""
    word = re.sub(r"[\s\-]+", "_", text.strip()).upper()
    if word in ("SUCCESS", "OK"):
        return "SUCCESS", None
    if word in ("FAILURE", "FAILED", "REFUSED", "OPERATION_FAILED"):
        return "OPERATION_FAILED", None
    if word in ("UNDONE", "OPERATION_UNDONE"):
        return "OPERATION_UNDONE", None
    return "OPERATION_FAILED", word


def selected_uids(storage: Storage, filters: Filters) -> tuple[str, ...] | None:
    """The objects the vm/host/object filters leave, or None when none of
    them is set. An empty tuple means nothing can match."""
    chosen: list[str] | None = None

    def narrow(uids) -> None:
        nonlocal chosen
        chosen = list(uids) if chosen is None else [u for u in chosen if u in uids]

    if filters.vm:
        narrow(objects_named(storage, filters.vm, VM_COMPONENT))
    if filters.host:
        narrow(objects_named(storage, filters.host, HOST_COMPONENT))
    if filters.object:
        narrow((filters.object,))
    return None if chosen is None else tuple(chosen)


def find(storage: Storage, filters: Filters) -> tuple[int, list[StoredAuditRecord]]:
    """How many records match, and the newest `filters.limit` of them
    (all when no limit), oldest first."""
    uids = selected_uids(storage, filters)
    if uids == ():
        return 0, []
    query = AuditQuery(
        uids=uids,
        operation=filters.operation,
        client=filters.client,
        result=filters.result,
        since=filters.since,
        until=filters.until,
    )
    kept: deque[StoredAuditRecord] = deque(maxlen=filters.limit)
    matched = 0
    for record in iter_records(storage, query):
        if filters.reason is not None and _reason(record) != filters.reason:
            continue
        if filters.request_id is not None and not _has_request_id(record, filters.request_id):
            continue
        kept.append(record)
        matched += 1
    return matched, list(kept)


def _reason(record: StoredAuditRecord) -> str | None:
    try:
        return (json.loads(record.body).get("result") or {}).get("reason")
    except (ValueError, AttributeError):
        return None


def correlation_parts(value: str | None) -> dict[str, str]:
    """The key=value parts of a Client Correlation Value in the broker's
    format ("broker-req=<id>;host=<name>", parts separated by ";"); a value
    in any other form gives {}."""
    parts: dict[str, str] = {}
    for part in (value or "").split(";"):
        key, sep, text = part.partition("=")
        if sep and key.strip():
            parts[key.strip()] = text.strip()
    return parts


def _has_request_id(record: StoredAuditRecord, wanted: str) -> bool:
    """The record's own request id is `wanted`, or its correlation value is
    `wanted` or has a part whose value is `wanted`."""
    try:
        body = json.loads(record.body)
    except ValueError:
        return False
    if body.get("request_id") == wanted:
        return True
    value = body.get("correlation")
    if not isinstance(value, str):
        return False
    return value == wanted or wanted in correlation_parts(value).values()
