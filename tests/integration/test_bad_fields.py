"""Bad field values over real mutual TLS (issue 19): a value a KMIP
enumeration does not define, or a field of the wrong type or size in the
header or the Operation, is answered Invalid Field or Invalid Message item
by item, the server logs no traceback, and the other items of a batch keep
their own answers."""

from __future__ import annotations

import time

import pytest
from kmip.core.enums import (
    BatchErrorContinuationOption,
    CryptographicAlgorithm,
    KeyFormatType,
    ObjectType,
    Operation,
    ResultReason,
    ResultStatus,
)
from kmip.core.enums import Tags as T
from kmip_client import RawClient

from kmip_core import ttlv
from kmip_core.ttlv import Item

HUGE = 1 << (2048 * 8 - 2)  # Encodes as a 2,048-byte Big Integer.


def _version(major: Item | None = None, minor: Item | None = None) -> Item:
    return ttlv.structure(
        T.PROTOCOL_VERSION.value,
        [
            major or ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1),
            minor or ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4),
        ],
    )


def _message(items: list[Item], header: list[Item] | None = None, version: Item | None = None) -> bytes:
    fields = [version or _version(), *(header or [])]
    if not any(f.tag == T.BATCH_COUNT.value for f in fields):
        fields.append(ttlv.integer(T.BATCH_COUNT.value, len(items)))
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [ttlv.structure(T.REQUEST_HEADER.value, fields), *items]))


def _item(operation: Item, payload: list[Item]) -> Item:
    return ttlv.structure(T.BATCH_ITEM.value, [operation, ttlv.structure(T.REQUEST_PAYLOAD.value, payload)])


def _op(operation: Operation) -> Item:
    return ttlv.enumeration(T.OPERATION.value, operation.value)


def _attribute(name: str, value: Item) -> Item:
    return ttlv.structure(
        T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), value.retag(T.ATTRIBUTE_VALUE.value)]
    )


def _create() -> Item:
    return _item(
        _op(Operation.CREATE),
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            ttlv.structure(
                T.TEMPLATE_ATTRIBUTE.value,
                [
                    _attribute("Cryptographic Algorithm", ttlv.enumeration(0, CryptographicAlgorithm.AES.value)),
                    _attribute("Cryptographic Length", ttlv.integer(0, 128)),
                    _attribute("Cryptographic Usage Mask", ttlv.integer(0, 12)),
                ],
            ),
        ],
    )


def _register_aes(template_algorithm: int) -> Item:
    """Register of a 128-bit AES key whose Template-Attribute names another
    Cryptographic Algorithm."""
    key_block = ttlv.structure(
        T.KEY_BLOCK.value,
        [
            ttlv.enumeration(T.KEY_FORMAT_TYPE.value, KeyFormatType.RAW.value),
            ttlv.structure(T.KEY_VALUE.value, [ttlv.byte_string(T.KEY_MATERIAL.value, bytes(range(16)))]),
            ttlv.enumeration(T.CRYPTOGRAPHIC_ALGORITHM.value, CryptographicAlgorithm.AES.value),
            ttlv.integer(T.CRYPTOGRAPHIC_LENGTH.value, 128),
        ],
    )
    return _item(
        _op(Operation.REGISTER),
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            ttlv.structure(
                T.TEMPLATE_ATTRIBUTE.value,
                [
                    _attribute("Cryptographic Algorithm", ttlv.enumeration(0, template_algorithm)),
                    _attribute("Cryptographic Usage Mask", ttlv.integer(0, 12)),
                ],
            ),
            ttlv.structure(T.SYMMETRIC_KEY.value, [key_block]),
        ],
    )


def _answers(server, pki, data: bytes) -> list[Item]:
    with RawClient(server.host, server.port, pki, "alice", timeout=20) as client:
        response = client.request(data)
    assert response is not None, "the server closed the connection instead of answering"
    assert response.tag == T.RESPONSE_MESSAGE.value
    return response.find_all(T.BATCH_ITEM.value)


def _reason(item: Item) -> ResultReason | None:
    value = item.get(T.RESULT_REASON.value)
    return None if value is None else ResultReason(value)


@pytest.fixture
def no_traceback(kms_module):
    """Fails the test if the server logged a traceback while it ran."""
    start = len(kms_module.log)
    yield
    time.sleep(0.2)  # Let the log reader catch up.
    logged = "\n".join(kms_module.log[start:])
    assert "Traceback" not in logged, logged


def test_undefined_cryptographic_algorithm_in_register_is_invalid_field(kms_module, pki_dir, no_traceback):
    """Register with Cryptographic Algorithm 0xF3 in its template: Invalid
    Field (was a ValueError from the Enum, answered General Failure)."""
    (item,) = _answers(kms_module, pki_dir, _message([_register_aes(0xF3)]))
    assert item.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value
    assert _reason(item) == ResultReason.INVALID_FIELD


def test_create_then_bad_operation_with_continue_answers_item_by_item(kms_module, pki_dir, no_traceback):
    """[Create, an item whose Operation is the Integer -1] with Continue:
    the Create succeeds and its identifier reaches the client; the bad item
    fails with its own reason. The whole batch used to be General Failure
    (the -1 was echoed as an Enumeration the encoder could not write)."""
    continue_ = ttlv.enumeration(T.BATCH_ERROR_CONTINUATION_OPTION.value, BatchErrorContinuationOption.CONTINUE.value)
    bad = _item(ttlv.integer(T.OPERATION.value, -1), [])
    created, refused = _answers(kms_module, pki_dir, _message([_create(), bad], header=[continue_]))
    assert created.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value
    uid = created.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    assert isinstance(uid, str) and uid
    assert refused.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value
    assert _reason(refused) in (ResultReason.INVALID_MESSAGE, ResultReason.INVALID_FIELD)
    assert refused.find(T.OPERATION.value) is None  # Not echoed.
    # The key exists and is the client's.
    get = _item(_op(Operation.GET_ATTRIBUTES), [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])
    (answer,) = _answers(kms_module, pki_dir, _message([get]))
    assert answer.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value


@pytest.mark.parametrize(
    "operation",
    [
        ttlv.integer(T.OPERATION.value, -1),
        ttlv.big_integer(T.OPERATION.value, HUGE),
        ttlv.text(T.OPERATION.value, "Create"),
    ],
    ids=["integer-minus-one", "big-integer-2048-bytes", "text"],
)
def test_operation_of_the_wrong_type_is_invalid_message(kms_module, pki_dir, no_traceback, operation):
    (item,) = _answers(kms_module, pki_dir, _message([_item(operation, [])]))
    assert item.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value
    assert _reason(item) == ResultReason.INVALID_MESSAGE


@pytest.mark.parametrize(
    "message",
    [
        _message(
            [_item(_op(Operation.DISCOVER_VERSIONS), [])],
            version=_version(major=ttlv.big_integer(T.PROTOCOL_VERSION_MAJOR.value, HUGE)),
        ),
        _message(
            [_item(_op(Operation.DISCOVER_VERSIONS), [])],
            version=_version(minor=ttlv.long_integer(T.PROTOCOL_VERSION_MINOR.value, 4)),
        ),
        _message(
            [_item(_op(Operation.DISCOVER_VERSIONS), [])], header=[ttlv.big_integer(T.BATCH_COUNT.value, HUGE)]
        ),
        _message(
            [_item(_op(Operation.DISCOVER_VERSIONS), [])],
            header=[ttlv.big_integer(T.MAXIMUM_RESPONSE_SIZE.value, HUGE)],
        ),
        _message(
            [_item(_op(Operation.DISCOVER_VERSIONS), [])],
            header=[ttlv.integer(T.BATCH_ERROR_CONTINUATION_OPTION.value, -1)],
        ),
    ],
    ids=["version-major-big-integer", "version-minor-long-integer", "batch-count-big-integer",
         "maximum-response-size-big-integer", "continuation-option-integer"],
)
def test_header_field_of_the_wrong_type_is_invalid_message(kms_module, pki_dir, no_traceback, message):
    """Header integers of the wrong type or size: Invalid Message, never a
    traceback (a 2,048-byte version used to overflow Python's int-to-text
    limit in the log line)."""
    (item,) = _answers(kms_module, pki_dir, message)
    assert item.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value
    assert _reason(item) == ResultReason.INVALID_MESSAGE


@pytest.mark.parametrize(
    "reference",
    [ttlv.text(T.ATTRIBUTE_REFERENCE.value, ""), ttlv.byte_string(T.ATTRIBUTE_REFERENCE.value, b"\x42\x00\x28")],
    ids=["text", "bytes"],
)
@pytest.mark.parametrize("operation", [Operation.GET_ATTRIBUTES, Operation.DELETE_ATTRIBUTE], ids=["get", "delete"])
def test_attribute_reference_of_a_string_type_is_invalid_field(kms_module, pki_dir, no_traceback, reference, operation):
    """A 2.0 Attribute Reference that is neither an Enumeration nor a
    Structure (found by the fuzzer: a ValueError formatting it, answered
    General Failure with a traceback)."""
    create = ttlv.structure(
        T.BATCH_ITEM.value,
        [
            _op(Operation.CREATE),
            ttlv.structure(
                T.REQUEST_PAYLOAD.value,
                [
                    ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
                    ttlv.structure(
                        T.ATTRIBUTES.value,
                        [
                            ttlv.enumeration(T.CRYPTOGRAPHIC_ALGORITHM.value, CryptographicAlgorithm.AES.value),
                            ttlv.integer(T.CRYPTOGRAPHIC_LENGTH.value, 128),
                            ttlv.integer(T.CRYPTOGRAPHIC_USAGE_MASK.value, 12),
                        ],
                    ),
                ],
            ),
        ],
    )
    v2 = _version(
        ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 2), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 0)
    )
    (created,) = _answers(kms_module, pki_dir, _message([create], version=v2))
    uid = created.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    item = _item(_op(operation), [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid), reference])
    (answer,) = _answers(kms_module, pki_dir, _message([item], version=v2))
    assert answer.get(T.RESULT_STATUS.value) == ResultStatus.OPERATION_FAILED.value
    assert _reason(answer) == ResultReason.INVALID_FIELD
