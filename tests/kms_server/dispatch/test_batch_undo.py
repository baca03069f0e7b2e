"""Batch Error Continuation Option Undo (KMIP 1.4, 6.7; 2.0, 7.7; OASIS
BL-M-2-21), through Dispatcher.handle with the real operation table and an
audit trail, on the in-memory storage, SQLite and PostgreSQL: a failed item rolls
back the changes of the items before it, which are answered Operation
Undone and recorded so; a batch whose items all succeed commits them and
their records together."""

from __future__ import annotations

import json
import os

import pytest
from kmip.core.enums import BatchErrorContinuationOption, Operation, ResultReason, ResultStatus, State
from kmip.core.enums import Tags as T

from kmip_core import ttlv
from kmip_core.sealing.barrier import Barrier
from kmip_core.server.dispatcher import Dispatcher
from kms_server.audit.trail import AuditTrail, iter_records, verify_storage
from kms_server.keystore.keystore import Keystore
from kms_server.operations import OPERATIONS
from kms_server.storage import LocateQuery, open_storage
from tests.kms_server.dispatch.test_dispatcher import (
    _flaky_dispatcher,
    add_attribute_payload,
    batch_item,
    batch_items,
    continuation,
    create_key,
    create_payload,
    get_attribute_values,
    handle,
    reason,
    request,
    status,
)

UNDO = continuation(BatchErrorContinuationOption.UNDO)


def ttlv_uid(uid: str):
    return ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def storage(request, tmp_path):
    urls = {"memory": lambda: "memory://", "sqlite": lambda: f"sqlite:///{tmp_path / 'kms.db'}"}
    url = urls.get(request.param, lambda: request.getfixturevalue("postgres_url"))()
    store = open_storage(url)
    yield store
    store.close()


@pytest.fixture
def dispatcher(storage):
    keystore = Keystore(storage, Barrier(os.urandom(32)))
    return Dispatcher(keystore, OPERATIONS, node="node-1", trail=AuditTrail(storage, "node-1"))


def uids(storage) -> list[str]:
    with storage.transaction(read_only=True) as txn:
        return txn.locate(LocateQuery())


def records(storage) -> list[dict]:
    """The records of the last request (all items), in order."""
    bodies = [json.loads(r.body) for r in iter_records(storage)]
    last = bodies[-1]["request_id"]
    return [b for b in bodies if b["request_id"] == last]


def test_a_failed_item_undoes_the_items_before_it(dispatcher, storage):
    uid = create_key(dispatcher)
    out = batch_items(
        handle(
            dispatcher,
            request(
                [
                    batch_item(Operation.ADD_ATTRIBUTE, add_attribute_payload(uid, "x-a", "1"), b"a"),
                    batch_item(Operation.ACTIVATE, [ttlv_uid(uid)], b"b"),
                    batch_item(Operation.ADD_ATTRIBUTE, add_attribute_payload("no-such-object", "x-c", "3"), b"c"),
                    batch_item(Operation.ADD_ATTRIBUTE, add_attribute_payload(uid, "x-d", "4"), b"d"),
                ],
                header_extra=UNDO,
            ),
        )
    )
    assert [status(i) for i in out] == [
        ResultStatus.OPERATION_UNDONE,
        ResultStatus.OPERATION_UNDONE,
        ResultStatus.OPERATION_FAILED,
    ]
    assert [i.get(T.UNIQUE_BATCH_ITEM_ID.value) for i in out] == [b"a", b"b", b"c"]
    assert reason(out[2]) == ResultReason.ITEM_NOT_FOUND
    # An undone item keeps the payload it had.
    assert out[1].find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value) == uid
    trail = records(storage)
    assert [(r["operation"], r["result"]["status"]) for r in trail] == [
        ("ADD_ATTRIBUTE", "OPERATION_UNDONE"),
        ("ACTIVATE", "OPERATION_UNDONE"),
        ("ADD_ATTRIBUTE", "OPERATION_FAILED"),
    ]
    assert trail[2]["result"]["reason"] == "ITEM_NOT_FOUND"
    assert verify_storage(storage, None).ok
    # Nothing of the batch took effect; the item after the failure never ran.
    assert get_attribute_values(dispatcher, uid, "x-a") == []
    assert get_attribute_values(dispatcher, uid, "State") == [State.PRE_ACTIVE.value]
    assert get_attribute_values(dispatcher, uid, "x-d") == []


def test_an_undone_create_leaves_no_object(dispatcher, storage):
    before = uids(storage)
    out = batch_items(
        handle(
            dispatcher,
            request(
                [
                    batch_item(Operation.CREATE, create_payload()),
                    batch_item(Operation.ACTIVATE, []),  # the ID Placeholder: the new key
                    batch_item(Operation.DESTROY, [ttlv_uid("no-such-object")]),
                ],
                header_extra=UNDO,
            ),
        )
    )
    assert [status(i) for i in out] == [
        ResultStatus.OPERATION_UNDONE,
        ResultStatus.OPERATION_UNDONE,
        ResultStatus.OPERATION_FAILED,
    ]
    created = out[0].find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    assert uids(storage) == before and created not in uids(storage)


def test_a_batch_that_succeeds_commits_every_item_and_its_record(dispatcher, storage):
    out = batch_items(
        handle(
            dispatcher,
            request(
                [batch_item(Operation.CREATE, create_payload()), batch_item(Operation.ACTIVATE, [])],
                header_extra=UNDO,
            ),
        )
    )
    assert [status(i) for i in out] == [ResultStatus.SUCCESS, ResultStatus.SUCCESS]
    uid = out[0].find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    trail = records(storage)
    assert [(r["operation"], r["result"]["status"], r["uid"]) for r in trail] == [
        ("CREATE", "SUCCESS", uid),
        ("ACTIVATE", "SUCCESS", uid),
    ]
    assert verify_storage(storage, None).ok
    assert get_attribute_values(dispatcher, uid, "State") == [State.ACTIVE.value]


def test_undo_with_one_item_answers_like_stop(dispatcher):
    item = batch_items(
        handle(dispatcher, request([batch_item(Operation.ACTIVATE, [ttlv_uid("nope")])], header_extra=UNDO))
    )
    assert [status(i) for i in item] == [ResultStatus.OPERATION_FAILED]


def test_a_lost_database_connection_runs_the_whole_batch_again():
    """The batch's one transaction cannot begin twice; the third attempt
    runs every item, after the configured waits."""
    flaky, storage, sleeps = _flaky_dispatcher(failures=2)
    out = batch_items(
        handle(
            flaky,
            request([batch_item(Operation.CREATE, create_payload()), batch_item(Operation.ACTIVATE, [])], header_extra=UNDO),
        )
    )
    assert [status(i) for i in out] == [ResultStatus.SUCCESS, ResultStatus.SUCCESS]
    assert storage.attempts == 3 and sleeps == [0.1, 0.2]


def test_an_unknown_commit_outcome_is_never_success():
    flaky, storage, sleeps = _flaky_dispatcher(failures=1, commit_unknown=True)
    out = batch_items(
        handle(
            flaky,
            request([batch_item(Operation.CREATE, create_payload()), batch_item(Operation.ACTIVATE, [])], header_extra=UNDO),
        )
    )
    assert all(status(i) == ResultStatus.OPERATION_FAILED for i in out)
    assert {reason(i) for i in out} == {ResultReason.GENERAL_FAILURE}
    assert "may or may not be stored" in out[0].get(T.RESULT_MESSAGE.value)
    assert storage.attempts == 1 and sleeps == []
