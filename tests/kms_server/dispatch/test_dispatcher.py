"""Tests for kmip_core.server.dispatcher: request messages in, response
messages out, through Dispatcher.handle with the in-memory storage and the
real operation table (KMIP 1.4 section 7, KMIP 2.0 section 8)."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import pytest
from kmip.core.enums import (
    BatchErrorContinuationOption,
    CredentialType,
    CryptographicAlgorithm,
    ObjectType,
    Operation,
    QueryFunction,
    ResultReason,
    ResultStatus,
    State,
)
from kmip.core.enums import Tags as T

from kmip_core import ttlv
from kmip_core.policy import Principal
from kmip_core.sealing.barrier import Barrier
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher
from kmip_core.ttlv import Item
from kms_server.keystore.keystore import Keystore
from kms_server.operations import OPERATIONS
from kms_server.storage import LocateQuery, open_storage

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "malformed"
ALICE = ConnectionInfo(principal=Principal("alice"), peer="127.0.0.1:5696")


# Request builders.
def version_item(version):
    return ttlv.structure(
        T.PROTOCOL_VERSION.value,
        [
            ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, version[0]),
            ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, version[1]),
        ],
    )


def batch_item(
    operation: Operation | int, payload: list | None, batch_id: bytes | None = None
) -> Item:
    operation = operation.value if isinstance(operation, Operation) else operation
    return ttlv.structure(
        T.BATCH_ITEM.value,
        [
            ttlv.enumeration(T.OPERATION.value, operation),
            ttlv.byte_string(T.UNIQUE_BATCH_ITEM_ID.value, batch_id)
            if batch_id is not None
            else None,
            ttlv.structure(T.REQUEST_PAYLOAD.value, payload)
            if payload is not None
            else None,
        ],
    )


def request(items, version=(1, 4), header_extra=(), batch_count=None) -> bytes:
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            version_item(version),
            *header_extra,
            ttlv.integer(
                T.BATCH_COUNT.value, len(items) if batch_count is None else batch_count
            ),
        ],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, *items]))


def credential(username: str | None, password: str | None) -> Item:
    return ttlv.structure(
        T.AUTHENTICATION.value,
        [
            ttlv.structure(
                T.CREDENTIAL.value,
                [
                    ttlv.enumeration(
                        T.CREDENTIAL_TYPE.value,
                        CredentialType.USERNAME_AND_PASSWORD.value,
                    ),
                    ttlv.structure(
                        T.CREDENTIAL_VALUE.value,
                        [
                            ttlv.text(T.USERNAME.value, username)
                            if username is not None
                            else None,
                            ttlv.text(T.PASSWORD.value, password)
                            if password is not None
                            else None,
                        ],
                    ),
                ],
            )
        ],
    )


def v1_attribute(name: str, value: Item) -> Item:
    return ttlv.structure(
        T.ATTRIBUTE.value,
        [ttlv.text(T.ATTRIBUTE_NAME.value, name), value.retag(T.ATTRIBUTE_VALUE.value)],
    )


def create_payload() -> list[Item]:
    return [
        ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
        ttlv.structure(
            T.TEMPLATE_ATTRIBUTE.value,
            [
                v1_attribute(
                    "Cryptographic Algorithm",
                    ttlv.enumeration(0, CryptographicAlgorithm.AES.value),
                ),
                v1_attribute("Cryptographic Length", ttlv.integer(0, 256)),
                v1_attribute("Cryptographic Usage Mask", ttlv.integer(0, 12)),
            ],
        ),
    ]


def add_attribute_payload(uid: str, name: str, value: str) -> list[Item]:
    return [
        ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
        v1_attribute(name, ttlv.text(0, value)),
    ]


def discover_versions() -> Item:
    return batch_item(Operation.DISCOVER_VERSIONS, [])


# Response readers.
def header_version(response: Item) -> tuple[int, int]:
    pv = response.find(T.RESPONSE_HEADER.value).find(T.PROTOCOL_VERSION.value)
    return pv.get(T.PROTOCOL_VERSION_MAJOR.value), pv.get(
        T.PROTOCOL_VERSION_MINOR.value
    )


def batch_items(response: Item) -> list[Item]:
    items = response.find_all(T.BATCH_ITEM.value)
    assert response.find(T.RESPONSE_HEADER.value).get(T.BATCH_COUNT.value) == len(items)
    return items


def status(item: Item) -> ResultStatus:
    return ResultStatus(item.get(T.RESULT_STATUS.value))


def reason(item: Item) -> ResultReason | None:
    value = item.get(T.RESULT_REASON.value)
    return None if value is None else ResultReason(value)


def only_item(response: Item) -> Item:
    items = batch_items(response)
    assert len(items) == 1
    return items[0]


@pytest.fixture
def keystore():
    return Keystore(open_storage("memory://"), Barrier(os.urandom(32)))


@pytest.fixture
def dispatcher(keystore):
    return Dispatcher(keystore, OPERATIONS, node="node-1")


def handle(dispatcher, data: bytes, conn=ALICE) -> Item:
    raw = dispatcher.handle(data, conn)
    assert raw is not None
    return ttlv.decode(raw)


def create_key(dispatcher, conn=ALICE) -> str:
    item = only_item(
        handle(
            dispatcher, request([batch_item(Operation.CREATE, create_payload())]), conn
        )
    )
    assert status(item) == ResultStatus.SUCCESS, item.get(T.RESULT_MESSAGE.value)
    return item.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)


def get_attribute_values(dispatcher, uid: str, name: str, conn=ALICE) -> list:
    payload = [
        ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
        ttlv.text(T.ATTRIBUTE_NAME.value, name),
    ]
    item = only_item(
        handle(
            dispatcher, request([batch_item(Operation.GET_ATTRIBUTES, payload)]), conn
        )
    )
    assert status(item) == ResultStatus.SUCCESS
    attributes = item.find(T.RESPONSE_PAYLOAD.value).find_all(T.ATTRIBUTE.value)
    return [
        a.get(T.ATTRIBUTE_VALUE.value)
        for a in attributes
        if a.get(T.ATTRIBUTE_NAME.value) == name
    ]


# Protocol versions.
@pytest.mark.parametrize("version", [(1, 0), (1, 1), (1, 2), (1, 3), (1, 4), (2, 0)])
def test_response_echoes_the_request_version(dispatcher, version):
    response = handle(dispatcher, request([discover_versions()], version=version))
    assert response.tag == T.RESPONSE_MESSAGE.value
    assert header_version(response) == version
    assert status(only_item(response)) == ResultStatus.SUCCESS


@pytest.mark.parametrize(
    "version,answered_in", [((3, 0), (2, 1)), ((0, 9), (1, 0)), ((1, 5), (1, 4))]
)
def test_unsupported_version_is_invalid_message_in_a_supported_version(
    dispatcher, version, answered_in
):
    response = handle(dispatcher, request([discover_versions()], version=version))
    assert header_version(response) == answered_in
    item = only_item(response)
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.INVALID_MESSAGE


def test_response_header_has_a_time_stamp(dispatcher):
    response = handle(dispatcher, request([discover_versions()]))
    assert isinstance(
        response.find(T.RESPONSE_HEADER.value).get(T.TIME_STAMP.value), int
    )


def test_client_correlation_value_is_echoed_in_2_0(dispatcher):
    extra = [ttlv.text(T.CLIENT_CORRELATION_VALUE.value, "corr-42")]
    response = handle(
        dispatcher, request([discover_versions()], version=(2, 0), header_extra=extra)
    )
    assert (
        response.find(T.RESPONSE_HEADER.value).get(T.CLIENT_CORRELATION_VALUE.value)
        == "corr-42"
    )


def test_server_correlation_value_is_the_request_id_in_2_x(dispatcher):
    """KMIP 2.0, 8.2: the server's correlation value is the request id that
    names the request in the server log, General Failure texts and the
    audit trail; 1.x headers have no such field."""
    v2 = handle(dispatcher, request([discover_versions()], version=(2, 0)))
    value = v2.find(T.RESPONSE_HEADER.value).get(T.SERVER_CORRELATION_VALUE.value)
    assert isinstance(value, str) and len(value) == 16
    again = handle(dispatcher, request([discover_versions()], version=(2, 1)))
    assert again.find(T.RESPONSE_HEADER.value).get(T.SERVER_CORRELATION_VALUE.value) != value
    v1 = handle(dispatcher, request([discover_versions()], version=(1, 4)))
    assert v1.find(T.RESPONSE_HEADER.value).find(T.SERVER_CORRELATION_VALUE.value) is None


# Malformed and wrong messages.
@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 8,
        b"not ttlv at all",
        bytes.fromhex("42007801000000104200770100000008"),
    ],
    ids=["empty", "zeros", "text", "truncated"],
)
def test_undecodable_bytes_give_none(dispatcher, data):
    assert dispatcher.handle(data, ALICE) is None


@pytest.mark.parametrize("count", [0, 2, 5])
def test_batch_count_mismatch_is_invalid_message(dispatcher, count):
    item = only_item(
        handle(dispatcher, request([discover_versions()], batch_count=count))
    )
    assert reason(item) == ResultReason.INVALID_MESSAGE


def load_fixture(name: str) -> bytes:
    lines = (FIXTURES / f"{name}.hex").read_text().splitlines()
    return bytes.fromhex(
        "".join(line.strip() for line in lines if not line.startswith("#"))
    )


@pytest.mark.parametrize(
    "name,expected",
    [
        ("unknown_operation", ResultReason.OPERATION_NOT_SUPPORTED),
        ("batch_count_mismatch", ResultReason.INVALID_MESSAGE),
        ("missing_request_payload", ResultReason.INVALID_MESSAGE),
    ],
)
def test_well_formed_but_wrong_fixtures_are_refused(dispatcher, name, expected):
    item = only_item(handle(dispatcher, load_fixture(name)))
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == expected


def test_response_message_sent_as_a_request_is_not_processed(dispatcher):
    raw = dispatcher.handle(load_fixture("response_message_as_request"), ALICE)
    if raw is not None:
        assert reason(only_item(ttlv.decode(raw))) == ResultReason.INVALID_MESSAGE


@pytest.mark.parametrize("name", [p.stem for p in FIXTURES.glob("*.hex")])
def test_no_fixture_crashes_the_dispatcher(dispatcher, name):
    raw = dispatcher.handle(load_fixture(name), ALICE)
    if raw is not None:
        assert all(
            status(i) == ResultStatus.OPERATION_FAILED
            for i in batch_items(ttlv.decode(raw))
        )


# Batches.
def test_batch_items_echo_their_unique_batch_item_ids(dispatcher):
    uid = create_key(dispatcher)
    ids = [b"\x01", b"second", b"\xff\x00\xff"]
    items = [
        batch_item(
            Operation.ADD_ATTRIBUTE, add_attribute_payload(uid, "x-tag", f"v{i}"), bid
        )
        for i, bid in enumerate(ids)
    ]
    response = handle(dispatcher, request(items))
    out = batch_items(response)
    assert [i.get(T.UNIQUE_BATCH_ITEM_ID.value) for i in out] == ids
    assert [i.get(T.OPERATION.value) for i in out] == [
        Operation.ADD_ATTRIBUTE.value
    ] * 3
    assert all(status(i) == ResultStatus.SUCCESS for i in out)
    assert get_attribute_values(dispatcher, uid, "x-tag") == ["v0", "v1", "v2"]


def failing_batch(uid: str) -> list[Item]:
    return [
        batch_item(
            Operation.ADD_ATTRIBUTE, add_attribute_payload(uid, "x-a", "1"), b"a"
        ),
        batch_item(
            Operation.ADD_ATTRIBUTE,
            add_attribute_payload("no-such-object", "x-b", "2"),
            b"b",
        ),
        batch_item(
            Operation.ADD_ATTRIBUTE, add_attribute_payload(uid, "x-c", "3"), b"c"
        ),
    ]


def continuation(option: BatchErrorContinuationOption) -> list[Item]:
    return [ttlv.enumeration(T.BATCH_ERROR_CONTINUATION_OPTION.value, option.value)]


def test_continue_processes_items_after_a_failure(dispatcher):
    uid = create_key(dispatcher)
    response = handle(
        dispatcher,
        request(
            failing_batch(uid),
            header_extra=continuation(BatchErrorContinuationOption.CONTINUE),
        ),
    )
    out = batch_items(response)
    assert [status(i) for i in out] == [
        ResultStatus.SUCCESS,
        ResultStatus.OPERATION_FAILED,
        ResultStatus.SUCCESS,
    ]
    assert reason(out[1]) == ResultReason.ITEM_NOT_FOUND
    assert get_attribute_values(dispatcher, uid, "x-c") == ["3"]


@pytest.mark.parametrize("option", [None, BatchErrorContinuationOption.STOP])
def test_stop_does_not_process_items_after_a_failure(dispatcher, option):
    uid = create_key(dispatcher)
    extra = continuation(option) if option else []
    out = batch_items(
        handle(dispatcher, request(failing_batch(uid), header_extra=extra))
    )
    assert [status(i) for i in out] == [
        ResultStatus.SUCCESS,
        ResultStatus.OPERATION_FAILED,
    ]
    assert [i.get(T.UNIQUE_BATCH_ITEM_ID.value) for i in out] == [b"a", b"b"]
    assert get_attribute_values(dispatcher, uid, "x-a") == ["1"]
    assert get_attribute_values(dispatcher, uid, "x-c") == []


# Operations.
@pytest.mark.parametrize("operation", [0xFFFF, 0x0], ids=["undefined", "zero"])
def test_undefined_operation_is_not_supported(dispatcher, operation):
    item = only_item(handle(dispatcher, request([batch_item(operation, [])])))
    assert reason(item) == ResultReason.OPERATION_NOT_SUPPORTED


@pytest.mark.parametrize(
    "operation", [Operation.ARCHIVE, Operation.RECOVER, Operation.GET_USAGE_ALLOCATION]
)
def test_defined_but_unimplemented_operation_is_not_supported(dispatcher, operation):
    assert operation not in OPERATIONS
    item = only_item(handle(dispatcher, request([batch_item(operation, [])])))
    assert reason(item) == ResultReason.OPERATION_NOT_SUPPORTED
    assert item.get(T.OPERATION.value) == operation.value


def test_query_lists_implemented_operations(dispatcher):
    payload = [
        ttlv.enumeration(T.QUERY_FUNCTION.value, QueryFunction.QUERY_OPERATIONS.value)
    ]
    item = only_item(
        handle(dispatcher, request([batch_item(Operation.QUERY, payload)]))
    )
    listed = {
        i.value for i in item.find(T.RESPONSE_PAYLOAD.value).find_all(T.OPERATION.value)
    }
    assert Operation.CREATE.value in listed and Operation.LOCATE.value in listed
    assert Operation.ARCHIVE.value not in listed


def test_discover_versions_lists_the_supported_versions(dispatcher):
    item = only_item(handle(dispatcher, request([discover_versions()])))
    versions = [
        (pv.get(T.PROTOCOL_VERSION_MAJOR.value), pv.get(T.PROTOCOL_VERSION_MINOR.value))
        for pv in item.find(T.RESPONSE_PAYLOAD.value).find_all(T.PROTOCOL_VERSION.value)
    ]
    assert versions == [(2, 1), (2, 0), (1, 4), (1, 3), (1, 2), (1, 1), (1, 0)]


def test_maximum_response_size_too_small_is_response_too_large(dispatcher):
    extra = [ttlv.integer(T.MAXIMUM_RESPONSE_SIZE.value, 64)]
    response = handle(
        dispatcher,
        request([discover_versions(), discover_versions()], header_extra=extra),
    )
    out = batch_items(response)
    assert len(out) == 2
    assert all(reason(i) == ResultReason.RESPONSE_TOO_LARGE for i in out)


def test_maximum_response_size_large_enough_is_honoured(dispatcher):
    extra = [ttlv.integer(T.MAXIMUM_RESPONSE_SIZE.value, 1 << 16)]
    item = only_item(
        handle(dispatcher, request([discover_versions()], header_extra=extra))
    )
    assert status(item) == ResultStatus.SUCCESS


def test_id_placeholder_carries_the_created_key_to_activate(dispatcher):
    response = handle(
        dispatcher,
        request(
            [
                batch_item(Operation.CREATE, create_payload()),
                batch_item(Operation.ACTIVATE, []),
            ]
        ),
    )
    created, activated = batch_items(response)
    assert status(created) == status(activated) == ResultStatus.SUCCESS
    uid = created.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    assert (
        activated.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value) == uid
    )
    assert get_attribute_values(dispatcher, uid, "State") == [State.ACTIVE.value]


def test_id_placeholder_does_not_outlive_its_message(dispatcher):
    handle(dispatcher, request([batch_item(Operation.CREATE, create_payload())]))
    item = only_item(handle(dispatcher, request([batch_item(Operation.ACTIVATE, [])])))
    assert reason(item) == ResultReason.MISSING_DATA


# Credentials.
@pytest.fixture
def auth_dispatcher(keystore):
    return Dispatcher(
        keystore, OPERATIONS, authenticate=lambda u, p, identity: (u, p, identity) == ("vcenter", "s3cret", "alice")
    )


@pytest.mark.parametrize(
    "extra",
    [
        [],
        [credential("vcenter", "wrong")],
        [credential("mallory", "s3cret")],
        [credential("vcenter", None)],
    ],
    ids=["none", "wrong-password", "wrong-user", "no-password"],
)
def test_credential_required_and_not_accepted(auth_dispatcher, extra):
    response = handle(
        auth_dispatcher, request([discover_versions()], header_extra=extra)
    )
    item = only_item(response)
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.AUTHENTICATION_NOT_SUCCESSFUL


def test_credential_refusal_happens_before_any_operation(auth_dispatcher, keystore):
    handle(
        auth_dispatcher,
        request(
            [batch_item(Operation.CREATE, create_payload())],
            header_extra=[credential("vcenter", "no")],
        ),
    )
    with keystore.transaction() as txn:
        assert txn.locate(LocateQuery()) == []


def test_right_credential_is_accepted(auth_dispatcher):
    response = handle(
        auth_dispatcher,
        request([discover_versions()], header_extra=[credential("vcenter", "s3cret")]),
    )
    assert status(only_item(response)) == ResultStatus.SUCCESS


# Internal errors.
def test_internal_exception_is_general_failure_with_request_id_only(keystore, caplog):
    def broken(ctx, keystore, payload):
        raise RuntimeError("connection string postgres://kms:hunter2@db")

    operations = dict(OPERATIONS)
    operations[Operation.DISCOVER_VERSIONS] = broken
    dispatcher = Dispatcher(keystore, operations)
    with caplog.at_level(logging.ERROR, logger="kms_server.dispatch"):
        item = only_item(handle(dispatcher, request([discover_versions()])))
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.GENERAL_FAILURE
    message = item.get(T.RESULT_MESSAGE.value)
    assert "hunter2" not in message and "RuntimeError" not in message
    match = re.search(r"request ([0-9a-f]{8,})", message)
    assert match, message
    # The same id leads to the details in the server log.
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert logged and "hunter2" in caplog.text


def test_request_ids_differ_between_requests(keystore):
    def broken(ctx, keystore, payload):
        raise RuntimeError("x")

    dispatcher = Dispatcher(
        keystore, {**OPERATIONS, Operation.DISCOVER_VERSIONS: broken}
    )
    messages = {
        only_item(handle(dispatcher, request([discover_versions()]))).get(
            T.RESULT_MESSAGE.value
        )
        for _ in range(3)
    }
    assert len(messages) == 3


def test_internal_exception_in_one_item_does_not_stop_continue_batches(keystore):
    def broken(ctx, keystore, payload):
        raise RuntimeError("x")

    dispatcher = Dispatcher(keystore, {**OPERATIONS, Operation.QUERY: broken})
    items = [batch_item(Operation.QUERY, []), discover_versions()]
    out = batch_items(
        handle(
            dispatcher,
            request(
                items, header_extra=continuation(BatchErrorContinuationOption.CONTINUE)
            ),
        )
    )
    assert [reason(i) for i in out] == [ResultReason.GENERAL_FAILURE, None]
    assert status(out[1]) == ResultStatus.SUCCESS


def test_1_x_gets_1_x_reasons_and_2_0_gets_2_0_reasons(dispatcher):
    """Activating an Active key is a lifecycle error: ILLEGAL_OPERATION in
    1.x, WRONG_KEY_LIFECYCLE_STATE in 2.0."""
    uid = create_key(dispatcher)
    activate = batch_item(
        Operation.ACTIVATE, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)]
    )
    assert (
        status(only_item(handle(dispatcher, request([activate]))))
        == ResultStatus.SUCCESS
    )
    assert (
        reason(only_item(handle(dispatcher, request([activate], version=(1, 4)))))
        == ResultReason.ILLEGAL_OPERATION
    )
    assert (
        reason(only_item(handle(dispatcher, request([activate], version=(2, 0)))))
        == ResultReason.WRONG_KEY_LIFECYCLE_STATE
    )


class FlakyStorage:
    """Wraps a storage; the first `failures` transactions fail as a lost
    database connection would (before commit, or during the commit)."""

    def __init__(self, inner, failures: int, commit_unknown: bool = False):
        self.inner = inner
        self.failures = failures
        self.commit_unknown = commit_unknown
        self.attempts = 0

    def transaction(self, read_only=False):
        from contextlib import contextmanager

        from kms_server.storage.base import StorageUnavailable

        @contextmanager
        def unit():
            self.attempts += 1
            if self.failures > 0:
                self.failures -= 1
                if self.commit_unknown:
                    # The work is done, then the commit's fate is unknown.
                    with self.inner.transaction(read_only=read_only) as txn:
                        yield txn
                    raise StorageUnavailable("commit: connection lost", commit_unknown=True)
                raise StorageUnavailable("connect: connection refused")
            with self.inner.transaction(read_only=read_only) as txn:
                yield txn

        return unit()

    def close(self):
        self.inner.close()


def _flaky_dispatcher(failures, commit_unknown=False):
    storage = FlakyStorage(open_storage("memory://"), 0)
    keystore = Keystore(storage, Barrier(os.urandom(32)))
    # The keystore's own start-up transaction (the store digest) is not counted.
    storage.failures, storage.commit_unknown, storage.attempts = failures, commit_unknown, 0
    sleeps = []
    return Dispatcher(keystore, OPERATIONS, retry_delays=(0.1, 0.2, 0.4), sleep=sleeps.append), storage, sleeps


def test_lost_database_connection_before_commit_is_retried():
    """A Create whose transactions fail twice with a lost connection (nothing
    committed) succeeds on the third attempt, after the configured waits."""
    dispatcher, storage, sleeps = _flaky_dispatcher(failures=2)
    item = only_item(handle(dispatcher, request([batch_item(Operation.CREATE, create_payload())])))
    assert status(item) == ResultStatus.SUCCESS
    assert storage.attempts == 3
    assert sleeps == [0.1, 0.2]


def test_database_down_longer_than_the_retries_is_general_failure():
    dispatcher, storage, sleeps = _flaky_dispatcher(failures=10)
    item = only_item(handle(dispatcher, request([batch_item(Operation.CREATE, create_payload())])))
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.GENERAL_FAILURE
    assert storage.attempts == 4
    assert sleeps == [0.1, 0.2, 0.4]


def test_commit_outcome_unknown_is_general_failure_never_success_and_not_retried():
    dispatcher, storage, sleeps = _flaky_dispatcher(failures=1, commit_unknown=True)
    item = only_item(handle(dispatcher, request([batch_item(Operation.CREATE, create_payload())])))
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.GENERAL_FAILURE
    assert "may or may not be stored" in item.get(T.RESULT_MESSAGE.value)
    assert storage.attempts == 1 and sleeps == []


def test_retry_schedule_doubles_up_to_the_cap_and_spends_exactly_the_budget():
    from kmip_core.server.dispatcher import retry_schedule

    delays = retry_schedule(30.0)
    assert delays[:5] == (0.25, 0.5, 1.0, 2.0, 4.0)
    assert max(delays) == 4.0
    assert abs(sum(delays) - 30.0) < 1e-9
    assert retry_schedule(0.1) == (0.1,)


def test_counts_held_by_the_caller_are_counted_only_once_settled_as_what_the_client_got():
    """Dispatcher.holding_counts: a write answered before its commit is
    durable (kms_server's reactor batches) is counted once the caller knows
    what its client gets: its answer, or General Failure for each item."""
    from prometheus_client import CollectorRegistry

    from kmip_core.metrics import RequestMetrics

    registry = CollectorRegistry()
    dispatcher = Dispatcher(
        Keystore(open_storage("memory://"), Barrier(os.urandom(32))),
        OPERATIONS,
        metrics=RequestMetrics(registry, "kms"),
    )
    operations = ttlv.enumeration(T.QUERY_FUNCTION.value, QueryFunction.QUERY_OPERATIONS.value)
    query = request([batch_item(Operation.QUERY, [operations])])
    missing = request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, "no-such-key")])])

    def counted(operation: str, result: str) -> float | None:
        return registry.get_sample_value("kms_requests_total", {"operation": operation, "result": result})

    with dispatcher.holding_counts() as held:
        assert status(only_item(ttlv.decode(dispatcher.handle(query, ALICE)))) == ResultStatus.SUCCESS
        dispatcher.handle(missing, ALICE)
    assert counted("QUERY", "SUCCESS") is None and counted("GET", "ITEM_NOT_FOUND") is None
    held.settle(False)
    assert counted("QUERY", "GENERAL_FAILURE") == 1 and counted("GET", "GENERAL_FAILURE") == 1
    assert counted("QUERY", "SUCCESS") is None
    held.settle(True)  # settled once: nothing left to count
    assert counted("QUERY", "SUCCESS") is None

    with dispatcher.holding_counts() as held:
        dispatcher.handle(query, ALICE)
    held.settle(True)
    assert counted("QUERY", "SUCCESS") == 1
    # Outside, counted at once, as always.
    dispatcher.handle(missing, ALICE)
    assert counted("GET", "ITEM_NOT_FOUND") == 1


@pytest.mark.parametrize(
    "field, name, kind",
    [
        (ttlv.text(T.MAXIMUM_RESPONSE_SIZE.value, "big"), "Maximum Response Size", "an Integer"),
        (ttlv.integer(T.BATCH_ERROR_CONTINUATION_OPTION.value, 1), "Batch Error Continuation Option", "an Enumeration"),
        (ttlv.integer(T.CLIENT_CORRELATION_VALUE.value, 7), "Client Correlation Value", "a Text String"),
        (ttlv.text(T.AUTHENTICATION.value, "alice"), "Authentication", "a Structure"),
    ],
)
def test_a_header_field_of_the_wrong_type_is_refused_naming_it(dispatcher, field, name, kind):
    """Each Request Header field the server reads is checked for its type
    before its value is used; the answer names the field and its type."""
    response = handle(dispatcher, request([discover_versions()], header_extra=[field]))
    item = only_item(response) if batch_items(response) else None
    assert item is not None and status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.INVALID_MESSAGE
    assert item.get(T.RESULT_MESSAGE.value) == f"{name} in the Request Header must be {kind}"
