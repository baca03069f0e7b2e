"""Request messages the in-process benchmarks send to the dispatcher
(bench/locate_scale.py, bench/key_scale.py): KMIP 1.4, one batch of items."""

from __future__ import annotations

from kmip.core.enums import BatchErrorContinuationOption, Operation
from kmip.core.enums import Tags as T

from kmip_core import ttlv


def attribute(name: str, value: ttlv.Item) -> ttlv.Item:
    """A 1.x Attribute (name and value) for a template or a Locate."""
    return ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), value.retag(T.ATTRIBUTE_VALUE.value)])


def item(operation: Operation, payload: list[ttlv.Item]) -> ttlv.Item:
    return ttlv.structure(
        T.BATCH_ITEM.value,
        [ttlv.enumeration(T.OPERATION.value, operation.value), ttlv.structure(T.REQUEST_PAYLOAD.value, payload)],
    )


def request(items: list[ttlv.Item], continuation: BatchErrorContinuationOption | None = None) -> bytes:
    """The encoded Request Message; `continuation` sets the Batch Error
    Continuation Option (UNDO runs the batch in one transaction)."""
    header = [
        ttlv.structure(
            T.PROTOCOL_VERSION.value,
            [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4)],
        ),
        ttlv.enumeration(T.BATCH_ERROR_CONTINUATION_OPTION.value, continuation.value) if continuation else None,
        ttlv.integer(T.BATCH_COUNT.value, len(items)),
    ]
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [ttlv.structure(T.REQUEST_HEADER.value, header), *items]))
