"""Request messages the in-process benchmarks send to the dispatcher
(bench/locate_scale.py, bench/key_scale.py, bench/request_cpu.py,
bench/wal_pages.py): KMIP 1.4, one batch of items."""

from __future__ import annotations

from kmip.core.enums import BatchErrorContinuationOption, CryptographicAlgorithm, ObjectType, Operation
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


def create_aes(name: str | None = None) -> bytes:
    """Create an AES-256 key (usage mask Encrypt | Decrypt), with a Name if
    given."""
    pairs = [
        attribute("Cryptographic Algorithm", ttlv.enumeration(0, CryptographicAlgorithm.AES.value)),
        attribute("Cryptographic Length", ttlv.integer(0, 256)),
        attribute("Cryptographic Usage Mask", ttlv.integer(0, 12)),
    ]
    if name is not None:
        value = ttlv.structure(0, [ttlv.text(T.NAME_VALUE.value, name), ttlv.enumeration(T.NAME_TYPE.value, 1)])
        pairs.append(attribute("Name", value))
    payload = [
        ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
        ttlv.structure(T.TEMPLATE_ATTRIBUTE.value, pairs),
    ]
    return request([item(Operation.CREATE, payload)])


def on_object(operation: Operation, uid: str) -> bytes:
    """`operation` (Get, Destroy...) on the object `uid`, nothing else asked."""
    return request([item(operation, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])
