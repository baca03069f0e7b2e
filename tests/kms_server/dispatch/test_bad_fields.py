"""Bad field values in the dispatcher (issue 19): an undefined enumeration
value is Invalid Field wherever an operation converts it, and one item's
answer that cannot be encoded does not take the batch's other answers with
it."""

from __future__ import annotations

import logging
import os

from kmip.core.enums import (
    BatchErrorContinuationOption,
    CryptographicAlgorithm,
    ObjectType,
    Operation,
    ResultReason,
    ResultStatus,
)
from kmip.core.enums import Tags as T

from kmip_core import errors, ttlv
from kmip_core.policy import Principal
from kmip_core.reasons import input_error
from kmip_core.sealing.barrier import Barrier
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher
from kms_server.keystore.keystore import Keystore
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage

ALICE = ConnectionInfo(principal=Principal("alice"), peer="127.0.0.1:5696")
CONTINUE = ttlv.enumeration(T.BATCH_ERROR_CONTINUATION_OPTION.value, BatchErrorContinuationOption.CONTINUE.value)


def request(items, header_extra=()) -> bytes:
    version = ttlv.structure(
        T.PROTOCOL_VERSION.value,
        [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4)],
    )
    header = ttlv.structure(T.REQUEST_HEADER.value, [version, *header_extra, ttlv.integer(T.BATCH_COUNT.value, len(items))])
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, *items]))


def batch_item(operation: Operation, payload: list) -> ttlv.Item:
    return ttlv.structure(
        T.BATCH_ITEM.value,
        [ttlv.enumeration(T.OPERATION.value, operation.value), ttlv.structure(T.REQUEST_PAYLOAD.value, payload)],
    )


def create_payload() -> list:
    def attribute(name, value):
        return ttlv.structure(
            T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), value.retag(T.ATTRIBUTE_VALUE.value)]
        )

    return [
        ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
        ttlv.structure(
            T.TEMPLATE_ATTRIBUTE.value,
            [
                attribute("Cryptographic Algorithm", ttlv.enumeration(0, CryptographicAlgorithm.AES.value)),
                attribute("Cryptographic Length", ttlv.integer(0, 256)),
                attribute("Cryptographic Usage Mask", ttlv.integer(0, 12)),
            ],
        ),
    ]


def _raised(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the exception is the result.
        return exc
    raise AssertionError("nothing raised")


def test_enum_conversion_of_an_undefined_value_is_invalid_field():
    refused = input_error(_raised(lambda: CryptographicAlgorithm(0xF3)))
    assert isinstance(refused, errors.InvalidField)
    assert "CryptographicAlgorithm" in refused.message


def test_a_value_error_of_the_servers_own_code_stays_internal():
    def own():
        raise ValueError("a bug of ours")

    assert input_error(_raised(own)) is None
    assert input_error(_raised(lambda: int("x"))) is None
    assert input_error(_raised(lambda: {}["k"])) is None


def _dispatcher(extra: dict) -> Dispatcher:
    keystore = Keystore(open_storage("memory://"), Barrier(os.urandom(32)))
    return Dispatcher(keystore, {**OPERATIONS, **extra}, node="node-1")


def _items(dispatcher, data):
    return ttlv.decode(dispatcher.handle(data, ALICE)).find_all(T.BATCH_ITEM.value)


def test_enum_value_error_deep_in_an_operation_is_invalid_field_without_traceback(caplog):
    """Any operation that converts a client's value to an Enum it does not
    define answers Invalid Field, and logs no traceback."""

    def converts(ctx, keystore, payload):
        CryptographicAlgorithm(payload.get(T.CRYPTOGRAPHIC_ALGORITHM.value))
        return []

    dispatcher = _dispatcher({Operation.HASH: converts})
    payload = [ttlv.enumeration(T.CRYPTOGRAPHIC_ALGORITHM.value, 0xF3)]
    with caplog.at_level(logging.INFO, logger="kms_server"):
        (item,) = _items(dispatcher, request([batch_item(Operation.HASH, payload)]))
    assert item.get(T.RESULT_REASON.value) == ResultReason.INVALID_FIELD.value
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_an_answer_that_cannot_be_encoded_fails_alone():
    """[Create, an item whose answer cannot be encoded] with Continue: the
    Create keeps its identifier; only the other item is General Failure."""

    def unencodable(ctx, keystore, payload):
        return [ttlv.integer(T.CRYPTOGRAPHIC_LENGTH.value, 1 << 40)]

    dispatcher = _dispatcher({Operation.HASH: unencodable})
    data = request([batch_item(Operation.CREATE, create_payload()), batch_item(Operation.HASH, [])], header_extra=[CONTINUE])
    created, failed = _items(dispatcher, data)
    assert created.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value
    assert isinstance(created.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value), str)
    assert failed.get(T.RESULT_REASON.value) == ResultReason.GENERAL_FAILURE.value
    assert failed.get(T.OPERATION.value) == Operation.HASH.value
