"""Dispatcher.handle_holding_records: the answer to a read asked alone in its
message comes back with its audit record unwritten, for the caller to
write before the answer leaves (kms_server/server.py batches them in the
reactor, issue 15); everything else is answered and recorded as by
Dispatcher.handle. And reads run in the reactor thread on SQLite, sent to
the pool when they would block (kmip_core.nonblocking)."""

from __future__ import annotations

import logging
import os

import pytest
from kmip.core.enums import Operation, ResultReason, ResultStatus
from kmip.core.enums import Tags as T

from kmip_core import ttlv
from kmip_core.nonblocking import WouldBlock, WriterBusy, in_reactor, would_block
from kmip_core.sealing.barrier import Barrier
from kmip_core.server.dispatcher import Dispatcher, HeldResponse, single_operation
from kms_server.audit.trail import AuditTrail, iter_records, verify_storage
from kms_server.keystore.keystore import Keystore
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage
from tests.kms_server.dispatch.test_dispatcher import (
    ALICE,
    batch_item,
    create_key,
    create_payload,
    only_item,
    reason,
    request,
    status,
)


class Counted:
    """The dispatcher's metrics: what it counted, in order."""

    def __init__(self):
        self.requests: list[tuple[str, str]] = []

    def request(self, operation, result, latency):
        self.requests.append((operation, result))

    def database_event(self, event):
        pass


@pytest.fixture
def node():
    storage = open_storage("memory://")
    trail = AuditTrail(storage, "node-1")
    metrics = Counted()
    dispatcher = Dispatcher(
        Keystore(storage, Barrier(os.urandom(32))), OPERATIONS, node="node-1", trail=trail, metrics=metrics
    )
    yield dispatcher, trail, storage, metrics
    storage.close()


def get_request(uid: str) -> bytes:
    return request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])


def records(storage) -> list:
    return list(iter_records(storage))


def warm_key(dispatcher) -> str:
    """A key read once: its first Get cleared Fresh, a write whose record
    went into that write's own transaction."""
    uid = create_key(dispatcher)
    first = dispatcher.handle_holding_records(get_request(uid), ALICE)
    assert isinstance(first, bytes), "the first Get writes, and is recorded with its write"
    return uid


def storage_object(storage, uid):
    with storage.transaction(read_only=True) as txn:
        return txn.get_object(uid)


def key_bytes(item) -> bytes:
    obj = item.find(T.RESPONSE_PAYLOAD.value).find(T.SYMMETRIC_KEY.value)
    return obj.find(T.KEY_BLOCK.value).find(T.KEY_VALUE.value).find(T.KEY_MATERIAL.value).value


def test_a_read_alone_comes_back_held_and_its_record_is_written_by_the_caller(node):
    dispatcher, trail, storage, metrics = node
    uid = warm_key(dispatcher)
    before = records(storage)
    held = dispatcher.handle_holding_records(get_request(uid), ALICE)
    assert isinstance(held, HeldResponse)
    # Not written yet: the caller writes it before the answer leaves.
    assert records(storage) == before
    item = only_item(ttlv.decode(held.response))
    assert status(item) == ResultStatus.SUCCESS and len(key_bytes(item)) == 32
    assert held.record["operation"] == "GET" and held.record["uid"] == uid
    assert held.record["result"]["status"] == "SUCCESS"
    trail.write_batch([held.record])
    after = records(storage)
    assert len(after) == len(before) + 1 and after[-1].operation == "GET" and after[-1].uid == uid
    assert verify_storage(storage, None).ok


def test_an_answer_withheld_is_general_failure_without_the_key(node, caplog):
    dispatcher, trail, storage, metrics = node
    uid = warm_key(dispatcher)
    held = dispatcher.handle_holding_records(get_request(uid), ALICE)
    assert isinstance(held, HeldResponse)
    key = key_bytes(only_item(ttlv.decode(held.response)))
    with caplog.at_level(logging.ERROR, logger="kms_server.dispatch"):
        withheld = held.withheld("audit disk full")
    item = only_item(ttlv.decode(withheld))
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.GENERAL_FAILURE
    assert item.find(T.RESPONSE_PAYLOAD.value) is None
    assert key not in withheld
    assert f"request {held.request_id} GET: audit record not written, answer withheld: audit disk full" in caplog.text
    # What the caller tries to record instead.
    refusal = held.refusal_record()
    assert refusal["result"]["status"] == "OPERATION_FAILED"
    assert refusal["result"]["reason"] == "GENERAL_FAILURE"
    assert refusal["request_id"] == held.record["request_id"] == held.request_id


def test_a_held_request_is_counted_once_settled_with_its_outcome(node):
    dispatcher, trail, storage, metrics = node
    uid = warm_key(dispatcher)
    assert metrics.requests == [("CREATE", "SUCCESS"), ("GET", "SUCCESS")]
    first = dispatcher.handle_holding_records(get_request(uid), ALICE)
    second = dispatcher.handle_holding_records(get_request(uid), ALICE)
    assert isinstance(first, HeldResponse) and isinstance(second, HeldResponse)
    answered = [("CREATE", "SUCCESS"), ("GET", "SUCCESS")]
    assert metrics.requests == answered  # nothing more answered yet
    first.settled(True)
    second.settled(False)
    assert metrics.requests == answered + [("GET", "SUCCESS"), ("GET", "GENERAL_FAILURE")]


def test_writes_batches_and_refusals_are_answered_and_recorded_at_once(node):
    dispatcher, trail, storage, metrics = node
    uid = warm_key(dispatcher)
    count = len(records(storage))
    # A write: its record is in its own transaction.
    created = dispatcher.handle_holding_records(request([batch_item(Operation.CREATE, create_payload())]), ALICE)
    assert isinstance(created, bytes) and status(only_item(ttlv.decode(created))) == ResultStatus.SUCCESS
    count += 1
    assert len(records(storage)) == count
    # Two reads in one message: both recorded before the answer, in order.
    get = batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])
    both = dispatcher.handle_holding_records(request([get, get]), ALICE)
    assert isinstance(both, bytes)
    count += 2
    assert [r.operation for r in records(storage)[-2:]] == ["GET", "GET"] and len(records(storage)) == count
    # A refused read: its refusal is recorded.
    missing = dispatcher.handle_holding_records(get_request("no-such-key"), ALICE)
    assert isinstance(missing, bytes)
    assert reason(only_item(ttlv.decode(missing))) == ResultReason.ITEM_NOT_FOUND
    assert records(storage)[-1].result == "OPERATION_FAILED" and len(records(storage)) == count + 1
    assert verify_storage(storage, None).ok


def test_without_a_trail_nothing_is_held():
    storage = open_storage("memory://")
    dispatcher = Dispatcher(Keystore(storage, Barrier(os.urandom(32))), OPERATIONS, node="node-1")
    uid = create_key(dispatcher)
    answer = dispatcher.handle_holding_records(get_request(uid), ALICE)
    assert isinstance(answer, bytes) and status(only_item(ttlv.decode(answer))) == ResultStatus.SUCCESS
    storage.close()


# Reads in the reactor thread (kmip_core.nonblocking): on SQLite a node
# first runs a read asked alone there; whatever would block sends it to
# the pool, where it runs again from the start.
@pytest.fixture
def sqlite_node(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path}/kms.db")
    trail = AuditTrail(storage, "node-1")
    dispatcher = Dispatcher(Keystore(storage, Barrier(os.urandom(32))), OPERATIONS, node="node-1", trail=trail)
    yield dispatcher, trail, storage
    storage.close()


def test_sqlite_says_its_reads_may_run_in_the_reactor(sqlite_node):
    assert sqlite_node[2].reads_in_reactor
    memory = open_storage("memory://")
    assert not memory.reads_in_reactor
    memory.close()


def test_a_write_transaction_in_the_reactor_raises_would_block_and_leaves_nothing_open(sqlite_node):
    dispatcher, trail, storage = sqlite_node
    with in_reactor():
        with storage.transaction(read_only=True) as txn:
            assert txn.audit_head() is None
        with pytest.raises(WouldBlock):
            with storage.transaction() as txn:
                pytest.fail("a write transaction was opened in the reactor")
    # Outside, the same thread writes as before (no transaction left marked active).
    trail.write_batch([{"operation": "TEST", "client": {"name": "t"}, "result": {"status": "SUCCESS"}}])
    assert len(records(storage)) == 1


def test_a_warm_read_runs_in_the_reactor_and_one_that_writes_is_sent_back_untouched(sqlite_node):
    dispatcher, trail, storage = sqlite_node
    uid = create_key(dispatcher)
    count, version = len(records(storage)), storage_object(storage, uid).version
    # The first Get clears Fresh, a write: with no reactor batch to join
    # (kms_server/storage/reactor_writes.py) it would wait for the writer,
    # and leaves no trace.
    with in_reactor(), pytest.raises(WriterBusy):
        dispatcher.handle_holding_records(get_request(uid), ALICE)
    assert len(records(storage)) == count
    assert storage_object(storage, uid).version == version, "the bounced Get changed the object"
    # Run again on the pool (outside): it writes, and records with its write.
    assert isinstance(dispatcher.handle_holding_records(get_request(uid), ALICE), bytes)
    assert len(records(storage)) == count + 1
    assert storage_object(storage, uid).version == version + 1
    # Now a read only: answered in the reactor, its record held for the caller.
    with in_reactor():
        held = dispatcher.handle_holding_records(get_request(uid), ALICE)
    assert isinstance(held, HeldResponse)
    assert status(only_item(ttlv.decode(held.response))) == ResultStatus.SUCCESS


def test_a_refused_read_in_the_reactor_is_sent_back_to_be_recorded_on_the_pool(sqlite_node):
    dispatcher, trail, storage = sqlite_node
    # Its refusal's record is written at once, which would block.
    with in_reactor(), pytest.raises(WouldBlock):
        dispatcher.handle_holding_records(get_request("no-such-key"), ALICE)
    assert records(storage) == []
    answer = dispatcher.handle_holding_records(get_request("no-such-key"), ALICE)
    assert reason(only_item(ttlv.decode(answer))) == ResultReason.ITEM_NOT_FOUND
    assert [r.result for r in records(storage)] == ["OPERATION_FAILED"]


def test_would_block_is_raised_only_in_the_reactor_and_passes_except_exception():
    would_block("nothing")  # outside: no effect
    with in_reactor():
        try:
            would_block("a commit")
        except Exception:  # noqa: BLE001 - what the request path catches
            pytest.fail("WouldBlock was caught as an Exception")
        except WouldBlock as exc:
            assert str(exc) == "a commit"
    would_block("nothing")  # the flag is cleared on the way out


def test_single_operation_names_the_operation_of_a_message_of_one_item(node):
    dispatcher = node[0]
    get = batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, "k")])
    assert single_operation(dispatcher.decode(request([get]))) == Operation.GET.value
    assert single_operation(dispatcher.decode(request([get, get]))) is None
    assert dispatcher.decode(b"\x42\x00") is None


def test_a_message_decoded_beforehand_is_answered_as_its_bytes_are(node):
    dispatcher, trail, storage, metrics = node
    uid = warm_key(dispatcher)
    data = get_request(uid)
    held = dispatcher.handle_holding_records(data, ALICE, dispatcher.decode(data))
    assert isinstance(held, HeldResponse)
    assert status(only_item(ttlv.decode(held.response))) == ResultStatus.SUCCESS
    assert held.record["uid"] == uid
