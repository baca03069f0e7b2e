"""A node on SQLite answers writes from its reactor thread
(kms_server/server.py, kms_server/storage/reactor_writes.py): the answer
of a Create leaves only once the reactor's batch is committed, and if that
commit fails the client is answered General Failure and nothing is stored.
A read needs no commit and is answered at once; an operation that stays on
the pool (Create Key Pair) is handed to it.

The node is a real KmsService (its SQLite database, barrier, keystore,
audit trail, dispatcher) on twisted's Clock instead of a running reactor:
the end of a reactor turn is `clock.advance(0)`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import greenlet
import pytest
from kmip.core.enums import CryptographicAlgorithm, Operation, ResultReason, ResultStatus
from kmip.core.enums import Tags as T
from twisted.internet import task

from kmip_core import ttlv
from kmip_core.policy import Principal
from kmip_core.protocol import HeldAnswer, InPool
from kmip_core.server.dispatcher import ConnectionInfo
from kms_server.audit.trail import iter_records
from kms_server.config import load_config
from kms_server.operations import get
from kms_server.server import UNCOMMITTED, KmsService
from kms_server.storage.base import StorageError
from tests.conftest import write_node_config
from tests.kms_server.dispatch.test_dispatcher import batch_item, only_item, reason, request, status
from tests.kms_server.storage.test_write_batches import on_write_commit, refuse_commit

CONN = ConnectionInfo(principal=Principal(name="alice"), peer="127.0.0.1:1")


@pytest.fixture
def node(tmp_path, pki_dir):
    config = write_node_config(tmp_path / "reactor-node", pki_dir)
    clock = task.Clock()
    service = KmsService(load_config(config), clock)
    try:
        yield service, clock
    finally:
        service.storage.close()


@contextlib.contextmanager
def failing_commits(service, times: int | None = None) -> Iterator[list]:
    """Every write's commit (or the first `times`) fails as a full disk would make
    it; yields the list of failures made."""
    failed: list = []

    def refuse(conn):
        if times is None or len(failed) < times:
            failed.append(True)
            refuse_commit(conn)

    with on_write_commit(service.storage, refuse):
        yield failed


def create_request() -> bytes:
    attributes = [
        ttlv.structure(
            T.ATTRIBUTE.value,
            [
                ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Algorithm"),
                ttlv.enumeration(T.ATTRIBUTE_VALUE.value, CryptographicAlgorithm.AES.value),
            ],
        ),
        ttlv.structure(
            T.ATTRIBUTE.value,
            [ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Length"), ttlv.integer(T.ATTRIBUTE_VALUE.value, 256)],
        ),
        ttlv.structure(
            T.ATTRIBUTE.value,
            [ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Usage Mask"), ttlv.integer(T.ATTRIBUTE_VALUE.value, 12)],
        ),
    ]
    payload = [
        ttlv.enumeration(T.OBJECT_TYPE.value, 2),  # Symmetric Key
        ttlv.structure(T.TEMPLATE_ATTRIBUTE.value, attributes),
    ]
    return request([batch_item(Operation.CREATE, payload)])


def sent(answer) -> list:
    """What the connection would send for `answer` (bytes, or a HeldAnswer
    whose Deferred fires later)."""
    got: list = []
    if isinstance(answer, HeldAnswer):
        answer.release().addBoth(got.append)
    else:
        got.append(answer)
    return got


def stored_uids(service) -> list[str]:
    with service.storage.transaction(read_only=True) as txn:
        return [obj.uid for obj in txn.scan_objects()]


def uid_of(response: bytes) -> str:
    payload = only_item(ttlv.decode(response)).find(T.RESPONSE_PAYLOAD.value)
    return payload.get(T.UNIQUE_IDENTIFIER.value)


def creates_counted(service) -> dict[str, float]:
    """kms_requests_total of Create, by result (those counted so far)."""
    counted = {}
    for metric in service.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "kms_requests_total" and sample.labels.get("operation") == "CREATE":
                counted[sample.labels["result"]] = sample.value
    return counted


def created_key(service, clock) -> str:
    """A key created through the reactor, its batch committed."""
    got = sent(service._handle_inline(create_request(), CONN))
    clock.advance(0)
    return uid_of(got[0])


def test_a_create_is_answered_once_the_reactor_batch_is_committed(node):
    service, clock = node
    assert service.reactor_writes is not None, "SQLite: writes run in the reactor"
    answer = service._handle_inline(create_request(), CONN)
    assert isinstance(answer, HeldAnswer), "the answer waits for the commit"
    got = sent(answer)
    assert got == [] and stored_uids(service) == [], "nothing leaves, nothing is visible before the commit"
    assert creates_counted(service) == {}, "counted once its answer is known"
    clock.advance(0)
    (response,) = got
    assert status(only_item(ttlv.decode(response))) == ResultStatus.SUCCESS
    assert creates_counted(service) == {"SUCCESS": 1}
    assert stored_uids(service) == [uid_of(response)]
    assert [r.operation for r in iter_records(service.storage)] == ["CREATE"]
    registry = service.metrics.registry
    assert registry.get_sample_value("kms_write_batches_total", {"result": "committed"}) == 1
    assert registry.get_sample_value("kms_batched_writes_total") == 1
    # A read of it needs no commit: answered as soon as its record is written.
    get = request([batch_item(Operation.GET_ATTRIBUTES, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid_of(response))])])
    got = sent(service._handle_inline(get, CONN))
    clock.advance(0)
    assert status(only_item(ttlv.decode(got[0]))) == ResultStatus.SUCCESS


def test_a_write_whose_batch_fails_to_commit_is_answered_general_failure_and_stores_nothing(node, caplog):
    service, clock = node
    answers = [sent(service._handle_inline(create_request(), CONN)) for _ in range(2)]

    with failing_commits(service):
        clock.advance(0)
    for got in answers:
        (response,) = got
        item = only_item(ttlv.decode(response))
        assert status(item) == ResultStatus.OPERATION_FAILED
        assert reason(item) == ResultReason.GENERAL_FAILURE
        assert item.get(T.RESULT_MESSAGE.value) == UNCOMMITTED
        assert item.get(T.OPERATION.value) == Operation.CREATE.value
        assert item.find(T.RESPONSE_PAYLOAD.value) is None, "no identifier of an object that does not exist"
    assert stored_uids(service) == []
    assert list(iter_records(service.storage)) == []
    assert "did not commit" in caplog.text
    assert service.metrics.registry.get_sample_value("kms_write_batches_total", {"result": "failed"}) == 1
    # The records the batch held were lost with it: the trail reports failed
    # writes (the readiness check reads last_failure).
    assert service.metrics.registry.get_sample_value("kms_audit_write_failures_total") == 2
    assert service.trail.last_failure is not None
    # Counted as what their clients were sent: General Failure, not success.
    assert creates_counted(service) == {"GENERAL_FAILURE": 2}
    # The node writes again on the next turn.
    got = sent(service._handle_inline(create_request(), CONN))
    clock.advance(0)
    assert status(only_item(ttlv.decode(got[0]))) == ResultStatus.SUCCESS
    assert creates_counted(service) == {"GENERAL_FAILURE": 2, "SUCCESS": 1}


def test_creating_a_key_pair_stays_on_the_pool(node):
    service, _ = node
    message = request([batch_item(Operation.CREATE_KEY_PAIR, [])])
    assert isinstance(service._handle_inline(message, CONN), InPool)


def test_a_first_get_and_a_refusal_write_in_the_next_batch_and_are_answered_after_it(node):
    service, clock = node
    uid = created_key(service, clock)
    get = request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])
    missing = request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, "no-such-key")])])
    commits = service.reactor_writes.commits
    # The first Get clears Fresh; the refusal's record is written at once:
    # both wait for the turn's batch of writes.
    first, refused = sent(service._handle_inline(get, CONN)), sent(service._handle_inline(missing, CONN))
    assert first == [] and refused == []
    clock.advance(0)
    assert service.reactor_writes.commits == commits + 1, "both in one batch"
    assert status(only_item(ttlv.decode(first[0]))) == ResultStatus.SUCCESS
    assert reason(only_item(ttlv.decode(refused[0]))) == ResultReason.ITEM_NOT_FOUND
    results = [(r.operation, r.result) for r in iter_records(service.storage)]
    assert results[1:] == [("GET", "SUCCESS"), ("GET", "OPERATION_FAILED")], results
    # The key is no longer Fresh: the next Get is a read, answered without a batch.
    commits = service.reactor_writes.commits
    again = sent(service._handle_inline(get, CONN))
    clock.advance(0)
    assert status(only_item(ttlv.decode(again[0]))) == ResultStatus.SUCCESS
    assert service.reactor_writes.commits == commits + 1, "only its record's batch"


def test_a_read_whose_record_is_lost_with_its_batch_is_answered_general_failure(node):
    service, clock = node
    uid = created_key(service, clock)
    read = request([batch_item(Operation.GET_ATTRIBUTES, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])
    answer = sent(service._handle_inline(read, CONN))
    assert answer == [], "the answer waits for its record"

    # The record's batch fails to commit; the refusal's record follows in a
    # batch of its own (Clock runs that turn too).
    with failing_commits(service, times=1) as failed:
        clock.advance(0)
    assert failed == [True]
    (response,) = answer
    item = only_item(ttlv.decode(response))
    assert status(item) == ResultStatus.OPERATION_FAILED
    assert reason(item) == ResultReason.GENERAL_FAILURE
    assert item.find(T.RESPONSE_PAYLOAD.value) is None, "no attribute leaves without its record"
    results = [(r.operation, r.result) for r in iter_records(service.storage)]
    assert results == [("CREATE", "SUCCESS"), ("GET_ATTRIBUTES", "OPERATION_FAILED")], results


def test_the_records_of_a_turns_reads_are_one_member_of_its_batch_and_each_answer_waits_for_it(node):
    """Reads asked in one turn have their records written together (one
    savepoint, one read of the audit head), in the order the reads came; no
    answer leaves before the batch is committed, and a read asked once that
    member is written waits for a member of its own."""
    service, clock = node
    uid = created_key(service, clock)
    read = request([batch_item(Operation.GET_ATTRIBUTES, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])
    members, commits = service.reactor_writes.members, service.reactor_writes.commits
    answers = [sent(service._handle_inline(read, CONN)) for _ in range(3)]
    assert answers == [[], [], []]
    clock.advance(0)
    assert service.reactor_writes.members == members + 1, "three records, one member"
    assert service.reactor_writes.commits == commits + 1
    assert [status(only_item(ttlv.decode(got[0]))) for got in answers] == [ResultStatus.SUCCESS] * 3
    records = list(iter_records(service.storage))
    assert [r.operation for r in records] == ["CREATE"] + ["GET_ATTRIBUTES"] * 3
    assert [r.seq for r in records] == [1, 2, 3, 4]
    later = sent(service._handle_inline(read, CONN))
    assert later == []
    clock.advance(0)
    assert service.reactor_writes.members == members + 2
    assert status(only_item(ttlv.decode(later[0]))) == ResultStatus.SUCCESS


def test_when_the_batch_cannot_be_opened_every_pending_record_is_refused(node, monkeypatch):
    """The job that would write the turn's records never runs: each read
    waiting on it is answered General Failure, none stays waiting."""
    service, clock = node
    uid = created_key(service, clock)
    read = request([batch_item(Operation.GET_ATTRIBUTES, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])

    def cannot_open() -> bool:
        raise StorageError("begin: unable to open database file")

    monkeypatch.setattr(service.storage.writes, "open_reactor_batch", cannot_open)
    answers = [sent(service._handle_inline(read, CONN)) for _ in range(2)]
    clock.advance(0)
    for got in answers:
        item = only_item(ttlv.decode(got[0]))
        assert reason(item) == ResultReason.GENERAL_FAILURE
        assert item.find(T.RESPONSE_PAYLOAD.value) is None
    assert not service.read_records.flushing, "no record stays waiting"


def _runs(service, monkeypatch) -> list[str]:
    """How each run of a request starts from now on: 'reactor' (tried there
    first, as a read), 'write' (started as a write: a greenlet that waits
    for the batch at its write transaction, ReactorWrites.start) or 'batch'
    (in the reactor's batch of writes); and, for each write transaction,
    'transaction in the batch' or 'transaction outside'."""
    runs: list[str] = []
    handle = service._handle

    def counted(message, conn, decoded):
        writes = service.reactor_writes
        if writes.batch_open:
            runs.append("batch")
        else:
            runs.append("write" if greenlet.getcurrent().parent is not None else "reactor")
        return handle(message, conn, decoded)

    monkeypatch.setattr(service, "_handle", counted)
    transaction = service.keystore.transaction

    @contextlib.contextmanager
    def watched(read_only=False):
        with transaction(read_only) as txn:  # a write waits here for the batch
            if not read_only:
                runs.append("transaction in the batch" if service.reactor_writes.batch_open else "transaction outside")
            yield txn

    monkeypatch.setattr(service.keystore, "transaction", watched)
    return runs


def test_a_first_get_of_a_key_held_as_fresh_starts_as_a_write(node, monkeypatch):
    """The process holds the key's row as written, Fresh: its first Get runs
    once, started as a write: it reads and unseals its key and encodes its
    answer at once, and only the transaction that clears Fresh waits for
    the batch (it was tried in the reactor, found it writes and started
    again, in the batch, from the start). A Get of a key no longer Fresh is
    a read, tried in the reactor; one the process does not hold is tried
    there and starts again as a write."""
    service, clock = node
    uid = created_key(service, clock)
    get = request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])
    runs = _runs(service, monkeypatch)
    unseal = service.keystore.material
    unsealed: list = []
    monkeypatch.setattr(
        service.keystore, "material", lambda obj: unsealed.append(service.reactor_writes.batch_open) or unseal(obj)
    )
    got = sent(service._handle_inline(get, CONN))
    assert runs == ["write"] and unsealed == [False], "read and unsealed before the batch"
    assert got == [] and service.reactor_writes.queued == 1, "its write waits for the batch"
    clock.advance(0)
    assert runs == ["write", "transaction in the batch"]
    assert status(only_item(ttlv.decode(got[0]))) == ResultStatus.SUCCESS
    runs.clear()
    got = sent(service._handle_inline(get, CONN))
    clock.advance(0)
    assert runs == ["reactor"], "no longer Fresh: a read"
    assert status(only_item(ttlv.decode(got[0]))) == ResultStatus.SUCCESS

    other = created_key(service, clock)
    service.keystore.rows.forget(other)
    runs.clear()
    got = sent(service._handle_inline(request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, other)])]), CONN))
    clock.advance(0)
    assert runs[:2] == ["reactor", "write"] and runs[-1] == "transaction in the batch", runs
    assert status(only_item(ttlv.decode(got[0]))) == ResultStatus.SUCCESS
    fresh = [r for r in iter_records(service.storage) if r.operation == "GET"]
    assert len(fresh) == 3
    with service.storage.transaction(read_only=True) as txn:
        for key in (uid, other):
            assert txn.get_object(key).version == 2, "Fresh cleared once"


def test_a_stale_fresh_hint_changes_nothing(node, monkeypatch):
    """The row held says Fresh, the stored one no longer does (another
    process served the key since): the Get, started as a write, reads the
    row as stored, writes nothing of the object, and answers as a read
    would."""
    service, clock = node
    uid = created_key(service, clock)
    held = service.keystore.rows.get(uid)
    get = request([batch_item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])
    sent(service._handle_inline(get, CONN))
    clock.advance(0)
    service.keystore.rows.put(held)  # as if this process had not seen Fresh cleared
    with service.storage.transaction(read_only=True) as txn:
        version = txn.get_object(uid).version
    runs = _runs(service, monkeypatch)
    got = sent(service._handle_inline(get, CONN))
    clock.advance(0)
    assert runs == ["write"], "started as a write; it read the row as stored and wrote nothing"
    assert status(only_item(ttlv.decode(got[0]))) == ResultStatus.SUCCESS
    with service.storage.transaction(read_only=True) as txn:
        assert txn.get_object(uid).version == version, "nothing of the object was written"


def test_the_fresh_hint_of_a_get_without_a_plain_identifier_is_no(node):
    """A Get whose payload is missing, has no Unique Identifier (an ID
    Placeholder's), or names it with an item of another type is not
    routed by the hint: the Get decides, as for any key not held."""
    service, clock = node
    uid = created_key(service, clock)
    keystore = service.keystore
    assert get.writes(keystore, ttlv.structure(T.REQUEST_PAYLOAD.value, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)]))
    assert not get.writes(keystore, None)
    assert not get.writes(keystore, ttlv.structure(T.REQUEST_PAYLOAD.value, []))
    assert not get.writes(keystore, ttlv.structure(T.REQUEST_PAYLOAD.value, [ttlv.integer(T.UNIQUE_IDENTIFIER.value, 7)]))
    assert not get.writes(keystore, ttlv.text(T.REQUEST_PAYLOAD.value, uid))


def test_a_creates_key_is_made_and_sealed_when_it_arrives_and_only_its_transaction_waits_for_the_batch(
    node, monkeypatch
):
    """A write starts at once (ReactorWrites.start): its new key is made,
    sealed and authenticated outside the writer's turn, which the node's
    processes hold one at a time; the write transaction runs in the batch
    at the end of the turn."""
    service, clock = node
    keystore, writes = service.keystore, service.reactor_writes
    seen: list = []
    prepare, store = keystore.prepare_object, keystore.store_object

    def preparing(*args, **kwargs):
        seen.append(("prepare", writes.batch_open))
        return prepare(*args, **kwargs)

    def storing(*args, **kwargs):
        seen.append(("store", writes.batch_open))
        return store(*args, **kwargs)

    monkeypatch.setattr(keystore, "prepare_object", preparing)
    monkeypatch.setattr(keystore, "store_object", storing)
    answers = [sent(service._handle_inline(create_request(), CONN)) for _ in range(2)]
    assert seen == [("prepare", False), ("prepare", False)], "both keys made on arrival, no batch open"
    assert writes.queued == 2 and answers == [[], []]
    clock.advance(0)
    assert seen[2:] == [("store", True), ("store", True)]
    assert writes.commits == 1, "one batch for both"
    uids = sorted(uid_of(got[0]) for got in answers)
    assert sorted(stored_uids(service)) == uids
    assert [r.operation for r in iter_records(service.storage)] == ["CREATE", "CREATE"]
