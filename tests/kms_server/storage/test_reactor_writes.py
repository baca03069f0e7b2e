"""SQLite writes in the reactor thread (kms_server.storage.reactor_writes):
the write transactions of one reactor turn join one batch, committed at the
end of the turn; nothing is committed, published or remembered before that;
a member that fails loses only its own changes; a failed commit fails every
waiter; a write that would wait for another writer raises WriterBusy before
it has done anything and runs again once the turn is this process's.

The reactor is twisted's Clock (the turn ends at `advance(0)`); the pool
thread that waits for the turn is a real thread, its result handed to the
"reactor" by the test (`Pool.settle`)."""

from __future__ import annotations

import fcntl
import os
import threading
import time

import pytest
from twisted.internet import defer, task

from kmip_core.audit.chain import verify
from kmip_core.nonblocking import WouldBlock, WriterBusy, in_reactor, would_block, writer_busy
from kms_server.audit.trail import AuditTrail, iter_records
from kms_server.cluster import Heartbeat, nodes
from kms_server.storage import open_storage
from kms_server.storage.base import StorageError
from kms_server.storage.reactor_writes import BURST_MAX, ReactorWrites
from kms_server.storage.sql import SqlStorage, writer_flock
from tests.kms_server.storage.test_write_batches import on_write_commit, refuse_commit, write_commits


class Pool:
    """run_in_thread for the tests: `f` runs on a real thread; its Deferred
    fires when the test calls settle() (as the reactor would, once told)."""

    def __init__(self):
        self.started: list[tuple[threading.Thread, defer.Deferred, list]] = []

    def __call__(self, f):
        d: defer.Deferred = defer.Deferred()
        outcome: list = []

        def run():
            try:
                outcome.append(("ok", f()))
            except BaseException as exc:  # noqa: BLE001 - handed to the Deferred
                outcome.append(("error", exc))

        thread = threading.Thread(target=run)
        thread.start()
        self.started.append((thread, d, outcome))
        return d

    def settle(self, timeout: float = 10.0) -> None:
        started, self.started = self.started, []
        for thread, d, outcome in started:
            thread.join(timeout)
            assert not thread.is_alive(), "the pool thread did not finish"
            kind, value = outcome[0]
            if kind == "ok":
                d.callback(value)
            else:
                d.errback(value)


@pytest.fixture
def storage(sqlite_storage):
    return sqlite_storage  # SQLite only (conftest.py), not every backend


@pytest.fixture
def writer(storage):
    clock = task.Clock()
    pool = Pool()
    writes = ReactorWrites(storage.reactor_batches(), clock, pool)
    return writes, clock, pool


def committed(storage: SqlStorage, key: str) -> bytes | None:
    """What a separate reader sees: only committed data."""
    with storage.transaction(read_only=True) as txn:
        return txn.get_meta(key)


def write(storage: SqlStorage, key: str, hooks: list | None = None) -> None:
    """One write transaction in the reactor thread."""
    with in_reactor(), storage.transaction() as txn:
        txn.set_meta(key, key.encode())
        if hooks is not None:
            txn.after_commit(lambda: hooks.append((key, committed(storage, key))))


def result_of(d: defer.Deferred) -> list:
    got: list = []
    d.addBoth(got.append)
    return got


def test_without_a_reactor_writer_a_write_in_the_reactor_is_busy_and_opens_nothing(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'kms.db'}")
    try:
        with pytest.raises(WriterBusy):
            write(storage, "k")
        assert not storage.writes.reactor_batch_open
        assert committed(storage, "k") is None
        # Outside the reactor the same thread writes as always.
        with storage.transaction() as txn:
            txn.set_meta("k", b"1")
        assert committed(storage, "k") == b"1"
    finally:
        storage.close()


def test_outside_a_batch_a_write_in_the_reactor_is_busy_and_writes_nothing(storage, writer):
    with pytest.raises(WriterBusy):
        write(storage, "k")
    assert not storage.writes.reactor_batch_open
    assert committed(storage, "k") is None


def test_the_writes_of_a_turn_share_one_commit_at_its_end(storage, writer, monkeypatch):
    writes, clock, _ = writer
    commits = write_commits(storage, monkeypatch)
    hooks: list = []
    seen: list = []

    def job(key):
        write(storage, key, hooks)
        seen.append(committed(storage, key))  # inside the batch: not committed yet
        return writes.committed().addCallback(lambda _: key)

    answers = [result_of(writes.when_free(lambda k=k: job(k))) for k in ("a", "b")]
    # Queued for the end of the turn: nothing ran yet.
    assert writes.queued == 2 and seen == [] and commits == []
    clock.advance(0)  # the end of the turn
    assert seen == [None, None], "a member's change is not visible to readers before the commit"
    assert answers == [["a"], ["b"]]
    assert commits == [1], "two writes, one commit"
    assert committed(storage, "a") == b"a" and committed(storage, "b") == b"b"
    # The after_commit work ran once the rows were committed.
    assert hooks == [("a", b"a"), ("b", b"b")]
    assert writes.members == 2 and writes.commits == 1
    assert not storage.writes.reactor_batch_open and writes.queued == 0


def test_a_member_that_fails_loses_only_its_own_changes(storage, writer):
    writes, clock, _ = writer
    hooks: list = []

    def failing():
        with in_reactor(), storage.transaction() as txn:
            txn.set_meta("lost", b"x")
            txn.after_commit(lambda: hooks.append("lost"))
            raise ValueError("refused by the operation")

    kept = result_of(writes.when_free(lambda: write(storage, "kept", hooks)))
    failed = result_of(writes.when_free(failing))
    after = result_of(writes.when_free(lambda: write(storage, "after", hooks)))
    clock.advance(0)
    assert kept == [None] and after == [None]
    assert isinstance(failed[0].value, ValueError), "the job's own error reaches its caller"
    assert writes.members == 2, "the failed block did not join"
    assert committed(storage, "kept") == b"kept" and committed(storage, "after") == b"after"
    assert committed(storage, "lost") is None
    assert [h[0] for h in hooks] == ["kept", "after"]


def test_a_failed_commit_fails_every_waiter_and_stores_and_publishes_nothing(storage, writer):
    writes, clock, _ = writer
    hooks: list = []
    waiters: list = []

    def job(key):
        write(storage, key, hooks)
        waiters.append(result_of(writes.committed()))

    for key in ("a", "b"):
        writes.when_free(lambda k=key: job(k))

    with on_write_commit(storage, refuse_commit):
        clock.advance(0)
    assert len(waiters) == 2
    for got in waiters:
        assert len(got) == 1 and isinstance(got[0].value, StorageError) and "commit" in str(got[0].value)
    assert waiters[0][0].value is not waiters[1][0].value, "each waiter has its own exception"
    assert committed(storage, "a") is None and committed(storage, "b") is None
    assert hooks == []
    # The next turn writes as usual.
    later = result_of(writes.when_free(lambda: write(storage, "later")))
    clock.advance(0)
    assert later == [None] and committed(storage, "later") == b"later"


def test_a_failed_sync_of_the_log_fails_every_waiter_and_the_next_batch_cannot_open(storage, writer, monkeypatch):
    """Committed but perhaps not on disk (kms_server.storage.sql.WalSync):
    the answers are not sent as stored, and the process writes no more."""
    writes, clock, _ = writer
    waiters: list = []

    def job(key):
        write(storage, key)
        waiters.append(result_of(writes.committed()))

    for key in ("a", "b"):
        writes.when_free(lambda k=key: job(k))

    def fail(_fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", fail)
    clock.advance(0)
    monkeypatch.undo()
    assert len(waiters) == 2
    for got in waiters:
        assert len(got) == 1 and isinstance(got[0].value, StorageError)
        assert "could not be synced" in str(got[0].value)
    later = result_of(writes.when_free(lambda: write(storage, "later")))
    clock.advance(0)
    assert len(later) == 1 and isinstance(later[0].value, StorageError)
    assert "restart the node" in str(later[0].value)
    assert committed(storage, "later") is None


def test_writes_waiting_for_the_flock_of_another_process_run_once_it_is_released(storage, writer):
    writes, clock, pool = writer
    path = storage.writes.lock_path
    with storage.transaction() as txn:  # creates the lock file
        txn.set_meta("k", b"0")
    other = os.open(path, os.O_RDWR)  # another open file: as another process's flock
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        first = result_of(writes.when_free(lambda: write(storage, "queued") or "one"))
        clock.advance(0)  # the end of the turn: the flock is taken, a pool thread waits
        assert len(pool.started) == 1 and not storage.writes.reactor_batch_open
        # What comes meanwhile queues behind the same wait: one pool thread.
        second = result_of(writes.when_free(lambda: write(storage, "second") or "two"))
        clock.advance(0)
        assert len(pool.started) == 1 and writes.queued == 2
        time.sleep(0.2)
        assert pool.started[0][0].is_alive(), "the pool thread waits for the flock"
        assert first == [] and second == []
    finally:
        fcntl.flock(other, fcntl.LOCK_UN)
        os.close(other)
    pool.settle()  # the turn is ours: the queued work runs, then one commit
    assert first == ["one"] and second == ["two"] and writes.commits == 1
    assert writes.queued == 0 and not storage.writes.reactor_batch_open
    assert committed(storage, "queued") == b"queued" and committed(storage, "second") == b"second"


def test_a_worker_threads_batch_is_waited_for_then_the_queued_work_runs(storage, writer):
    writes, clock, pool = writer
    inside, release = threading.Event(), threading.Event()

    def worker():
        with storage.transaction() as txn:
            txn.set_meta("worker", b"w")
            inside.set()
            assert release.wait(10)

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    queued = result_of(writes.when_free(lambda: write(storage, "reactor") or "done"))
    clock.advance(0)
    assert len(pool.started) == 1, "the worker's turn is waited for on a pool thread"
    release.set()
    # The worker hands its open batch to the thread queued behind it (the
    # pool thread), and waits for its commit: the reactor adopts the batch,
    # adds its write and commits both.
    pool.settle()
    assert queued == ["done"]
    thread.join(10)
    assert not thread.is_alive()
    assert committed(storage, "worker") == b"w" and committed(storage, "reactor") == b"reactor"
    assert writes.commits == 1


def turn_cannot_be_had(storage: SqlStorage) -> None:
    """Another writer has the turn, and waiting for it fails (the database
    cannot be reached)."""

    def unreachable():
        raise StorageError("connect: unreachable")

    storage.writes.open_reactor_batch = lambda: False
    storage.writes.wait_reactor_batch = unreachable


def test_work_waiting_for_a_turn_that_cannot_be_had_is_told_so(storage, writer):
    writes, clock, pool = writer
    turn_cannot_be_had(storage)
    got = result_of(writes.when_free(lambda: "never"))
    clock.advance(0)
    pool.settle()
    assert len(got) == 1 and isinstance(got[0].value, StorageError)
    assert writes.queued == 0


def test_a_waiting_write_in_the_reactor_thread_while_its_batch_is_open_is_refused_not_a_deadlock(storage, writer):
    writes, clock, _ = writer
    refused: list = []

    def job():
        write(storage, "open")
        with pytest.raises(StorageError, match="reactor thread") as caught:
            with storage.transaction() as txn:  # outside in_reactor(): it would wait
                txn.set_meta("x", b"1")
        refused.append(caught.value)

    writes.when_free(job)
    clock.advance(0)
    assert len(refused) == 1
    assert committed(storage, "open") == b"open" and committed(storage, "x") is None


def test_once_it_wrote_a_request_is_pinned_and_would_block_no_longer_raises(storage, writer):
    writes, clock, _ = writer
    outcome: list = []

    def job():
        with in_reactor():
            with pytest.raises(WouldBlock):
                would_block("a retry's wait")
            with storage.transaction() as txn:
                txn.set_meta("pinned", b"1")
            would_block("a retry's wait")  # it cannot start over elsewhere now: it waits here
        outcome.append("finished")

    writes.when_free(job)
    clock.advance(0)
    assert outcome == ["finished"]
    assert committed(storage, "pinned") == b"1"


def test_work_queued_by_an_answer_runs_in_a_later_batch(storage, writer):
    writes, clock, _ = writer
    later: list = []

    def first():
        write(storage, "first")
        writes.committed().addCallback(
            lambda _: later.append(result_of(writes.when_free(lambda: write(storage, "second") or "2")))
        )

    writes.when_free(first)
    clock.advance(0)  # Clock runs what is scheduled meanwhile too: both turns
    assert later and later[0] == ["2"]
    assert writes.commits == 2, "queued after the first commit: a batch of its own"
    assert committed(storage, "first") == b"first" and committed(storage, "second") == b"second"


def test_a_batch_runs_at_most_burst_max_jobs_and_the_rest_right_after(storage, writer, monkeypatch):
    writes, clock, _ = writer
    commits = write_commits(storage, monkeypatch)
    total = BURST_MAX + 3
    answers = [result_of(writes.when_free(lambda i=i: write(storage, f"k{i}") or i)) for i in range(total)]
    clock.advance(0)  # Clock runs the follow-up turn too
    assert [a[0] for a in answers] == list(range(total))
    assert len(commits) == 2 and writes.commits == 2
    assert committed(storage, f"k{total - 1}") == f"k{total - 1}".encode()


def test_a_heartbeat_takes_the_writers_flock_so_the_reactor_never_meets_it_in_sqlites_busy_handler(storage, writer):
    writes, clock, pool = writer
    path = storage.writes.lock_path
    with storage.transaction() as txn:  # creates the lock file
        txn.set_meta("k", b"0")
    beat = Heartbeat(storage.engine, "node-1", "127.0.0.1:5696", lock_path=path)
    # The heartbeat waits for a batch that holds the flock...
    other = os.open(path, os.O_RDWR)
    fcntl.flock(other, fcntl.LOCK_EX)
    thread = threading.Thread(target=beat.beat)
    thread.start()
    thread.join(0.3)
    assert thread.is_alive(), "the heartbeat wrote while another writer held the flock"
    fcntl.flock(other, fcntl.LOCK_UN)
    os.close(other)
    thread.join(10)
    assert [n.name for n in nodes(storage.engine)] == ["node-1"]
    # ...and while it holds it, the reactor's batch is not opened in the
    # reactor thread: a pool thread waits for the flock instead.
    with writer_flock(path):
        got = result_of(writes.when_free(lambda: write(storage, "after-beat") or "ok"))
        clock.advance(0)
        assert len(pool.started) == 1 and not storage.writes.reactor_batch_open
    pool.settle()
    assert got == ["ok"] and committed(storage, "after-beat") == b"after-beat"


def test_a_job_that_raises_even_would_block_leaves_no_batch_open_and_the_others_commit(storage, writer):
    writes, clock, _ = writer

    def escapes():
        write(storage, "before-escape")
        raise WriterBusy("a caller that forgot to catch it")

    escaped = result_of(writes.when_free(escapes))
    other = result_of(writes.when_free(lambda: write(storage, "other") or "ok"))
    clock.advance(0)
    assert isinstance(escaped[0].value, WriterBusy) and other == ["ok"]
    assert not storage.writes.reactor_batch_open, "the batch was committed and the flock released"
    assert committed(storage, "other") == b"other"
    fd = os.open(storage.writes.lock_path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free
    finally:
        os.close(fd)


def test_a_batch_that_cannot_be_opened_fails_the_queued_work_instead_of_leaving_it_waiting(storage, writer):
    writes, clock, _ = writer

    def unreachable():
        raise StorageError("connect: unreachable")

    storage.writes.open_reactor_batch = unreachable
    got = result_of(writes.when_free(lambda: "never"))
    clock.advance(0)
    assert len(got) == 1 and isinstance(got[0].value, StorageError)
    assert writes.queued == 0


def test_follow_up_work_that_fails_does_not_keep_the_other_answers_back(storage, writer, caplog):
    writes, clock, _ = writer
    hooks: list = []

    def failing_hook():
        with in_reactor(), storage.transaction() as txn:
            txn.set_meta("a", b"a")
            txn.after_commit(lambda: 1 / 0)

    writes.when_free(failing_hook)
    waiter = result_of(writes.when_free(lambda: write(storage, "b", hooks) or writes.committed()))
    clock.advance(0)
    assert waiter == [None] and [h[0] for h in hooks] == ["b"]
    assert committed(storage, "a") == b"a" and "work after a reactor batch's commit failed" in caplog.text


def _audit_selects(storage: SqlStorage) -> list[str]:
    """Reads of the audit trail's head made on the writers' connection
    from now on (its SQLite trace)."""
    seen: list[str] = []
    with storage.writes._engine.connect() as conn:  # the pool's one writer connection
        conn.connection.driver_connection.set_trace_callback(
            lambda sql: seen.append(sql) if "FROM kms_audit" in sql and sql.lstrip().upper().startswith("SELECT") else None
        )
    return seen


def test_records_of_one_batch_chain_on_the_head_its_members_left_and_a_rolled_back_one_leaves_none(storage, writer):
    """The audit head is read once per batch: each member's records follow
    the ones the members before it kept, and a member rolled back leaves the
    head where it was, so the chain has no gap and no fork."""
    writes, clock, _ = writer
    trail = AuditTrail(storage, "node-1")
    entry = {"event": "request", "operation": "GET", "client": {"name": "alice"}, "result": {"status": "SUCCESS"}}

    def append(n: int, fail: bool = False):
        with in_reactor(), storage.transaction() as txn:
            for _ in range(n):
                trail.append(txn, entry)
            if fail:
                raise ValueError("refused after its records")

    selects = _audit_selects(storage)
    outcomes = [
        result_of(writes.when_free(lambda: append(2))),
        result_of(writes.when_free(lambda: append(1, fail=True))),
        result_of(writes.when_free(lambda: append(1))),
    ]
    clock.advance(0)
    assert [type(o[0]) for o in outcomes[::2]] == [type(None), type(None)]
    assert isinstance(outcomes[1][0].value, ValueError)
    records = list(iter_records(storage))
    assert [r.seq for r in records] == [1, 2, 3]
    assert verify(records, [], None).ok
    assert len(selects) == 1, "one read of the head for the whole batch"
    # A worker thread's transaction (outside the reactor) continues the chain.
    with storage.transaction() as txn:
        trail.append(txn, entry)
        trail.append(txn, entry)
    records = list(iter_records(storage))
    assert [r.seq for r in records] == [1, 2, 3, 4, 5]
    assert verify(records, [], None).ok


# Work started at once (ReactorWrites.start): what it does before its write
# transaction runs outside the writer's turn; it waits for the next batch at
# the transaction, and is resumed in it.


def started(writes: ReactorWrites, job) -> list:
    """`writes.start(job)`: [value] if it ended at once, else what its
    Deferred fires with (empty until then)."""
    ran = writes.start(job)
    return result_of(ran) if isinstance(ran, defer.Deferred) else [ran]


def test_a_started_write_runs_its_work_before_the_transaction_now_and_the_rest_in_the_batch(storage, writer, monkeypatch):
    writes, clock, _ = writer
    commits = write_commits(storage, monkeypatch)
    steps: list = []
    opened: list = []
    open_batch = storage.writes.open_reactor_batch

    def opening():
        opened.append(list(steps))
        return open_batch()

    storage.writes.open_reactor_batch = opening

    def job(key):
        with in_reactor() as state:
            steps.append(f"{key}: before")  # a new key, its seal: no turn needed
            with storage.transaction() as txn:
                steps.append(f"{key}: in the batch")
                txn.set_meta(key, key.encode())
            steps.append(f"{key}: after")
        assert state.pinned, "it joined a batch"
        return writes.committed().addCallback(lambda _: key)

    answers = [started(writes, lambda k=k: job(k)) for k in ("a", "b")]
    # Both ran up to their transactions at once, and wait there.
    assert steps == ["a: before", "b: before"]
    assert answers == [[], []] and writes.queued == 2 and commits == []
    clock.advance(0)  # the end of the turn
    assert opened == [["a: before", "b: before"]], "the batch opened after the work before the transactions"
    assert steps == ["a: before", "b: before", "a: in the batch", "a: after", "b: in the batch", "b: after"]
    assert answers == [["a"], ["b"]]
    assert commits == [1], "two writes, one commit"
    assert committed(storage, "a") == b"a" and committed(storage, "b") == b"b"


def test_a_started_work_that_does_not_write_ends_at_once_and_opens_no_batch(storage, writer):
    writes, clock, _ = writer

    def refused():
        with in_reactor() as state:
            result = "refused before its transaction"
        assert not state.pinned
        return result

    assert started(writes, refused) == ["refused before its transaction"]
    assert writes.queued == 0
    clock.advance(0)
    assert writes.commits == 0 and not storage.writes.reactor_batch_open


def test_what_a_started_work_raises_before_it_waits_is_raised_to_its_caller(storage, writer):
    writes, _, _ = writer

    def failing():
        with in_reactor():
            raise ValueError("a bad request")

    with pytest.raises(ValueError, match="a bad request"):
        writes.start(failing)
    assert writes.queued == 0


def test_what_a_started_work_raises_in_the_batch_reaches_its_deferred_and_loses_only_its_changes(storage, writer):
    writes, clock, _ = writer

    def failing():
        with in_reactor(), storage.transaction() as txn:
            txn.set_meta("lost", b"x")
            raise ValueError("refused in its transaction")

    failed = started(writes, failing)
    kept = started(writes, lambda: write_in_work(storage, "kept"))
    clock.advance(0)
    assert isinstance(failed[0].value, ValueError)
    assert kept == ["kept"]
    assert committed(storage, "kept") == b"kept" and committed(storage, "lost") is None


def write_in_work(storage: SqlStorage, key: str) -> str:
    with in_reactor(), storage.transaction() as txn:
        txn.set_meta(key, key.encode())
    return key


def test_works_waiting_meanwhile_keep_their_own_state(storage, writer):
    """While one work waits, others run in the reactor thread (reads, other
    works): each keeps its own in_reactor state, in a context of its own."""
    writes, clock, _ = writer
    states: dict = {}

    def job(key):
        with in_reactor() as state:
            states[key] = state
            with storage.transaction() as txn:
                txn.set_meta(key, b"1")
            assert state.writable and state.pinned
        return key

    first = started(writes, lambda: job("a"))
    # A read in the reactor meanwhile, outside any work: not writable, and
    # its end does not touch the waiting work's state.
    with in_reactor() as read:
        with pytest.raises(WriterBusy):
            write(storage, "not now")
    assert not read.pinned
    second = started(writes, lambda: job("b"))
    assert not states["a"].writable and not states["b"].writable
    clock.advance(0)
    assert first == ["a"] and second == ["b"]
    assert states["a"] is not states["b"]


def test_works_waiting_for_a_turn_that_cannot_be_had_start_over_elsewhere(storage, writer):
    writes, clock, pool = writer
    turn_cannot_be_had(storage)
    told: list = []

    def job():
        try:
            with in_reactor(), storage.transaction() as txn:
                txn.set_meta("never", b"1")
        except WouldBlock as exc:
            told.append(str(exc))
            return "on the pool"
        return "written"

    got = started(writes, job)
    clock.advance(0)
    pool.settle()
    assert got == ["on the pool"], "told where it waited, it gave up its run in the reactor"
    assert len(told) == 1 and "unreachable" in told[0]
    assert writes.queued == 0
    assert committed(storage, "never") is None


def test_a_started_work_beyond_burst_max_runs_in_the_next_batch(storage, writer, monkeypatch):
    writes, clock, _ = writer
    commits = write_commits(storage, monkeypatch)
    total = BURST_MAX + 2
    answers = [started(writes, lambda i=i: write_in_work(storage, f"w{i}")) for i in range(total)]
    clock.advance(0)
    assert answers == [[f"w{i}"] for i in range(total)]
    assert commits == [1, 1], "two batches, one commit each"


def test_a_started_work_that_finds_it_will_write_goes_on_and_waits_at_its_transaction(storage, writer):
    """writer_busy raises WriterBusy in work tried in the reactor (it starts
    again as a write), not in a started work: that one goes on with what
    precedes its write (a first Get unseals and encodes its key) and waits
    at its transaction."""
    writes, clock, _ = writer
    steps: list = []

    with in_reactor(), pytest.raises(WriterBusy):
        writer_busy("a first Get clears Fresh")

    def job():
        with in_reactor():
            writer_busy("a first Get clears Fresh")
            steps.append("unsealed and encoded")
            with storage.transaction() as txn:
                steps.append("in the batch" if storage.writes.reactor_batch_open else "outside")
                txn.set_meta("fresh", b"0")
        return "answered"

    got = started(writes, job)
    assert steps == ["unsealed and encoded"] and got == []
    clock.advance(0)
    assert steps == ["unsealed and encoded", "in the batch"] and got == ["answered"]
    assert committed(storage, "fresh") == b"0"


# The log synced while the reactor goes on (a `syncer`, as a node runs):
# the reactor commits and goes on; answers and follow-up work wait for the
# sync; the writes that arrive meanwhile wait for its end, then commit
# together in the next batch.


@pytest.fixture
def synced_writer(storage):
    clock = task.Clock()
    pool, syncer = Pool(), Pool()
    # The sync made on a thread the test settles, as the node's sync
    # process makes it while the reactor goes on (test_log_sync.py).
    writes = ReactorWrites(storage.reactor_batches(), clock, pool, lambda commit: syncer(commit.sync))
    return writes, clock, syncer, pool


def count_syncs(monkeypatch) -> list[threading.Thread]:
    """The threads that called fdatasync, one entry per call."""
    calls: list[threading.Thread] = []
    real = os.fdatasync

    def counted(fd):
        calls.append(threading.current_thread())
        return real(fd)

    monkeypatch.setattr(os, "fdatasync", counted)
    return calls


def test_answers_wait_for_the_sync_on_its_thread_and_the_writes_meanwhile_commit_together_after_it(
    storage, synced_writer, monkeypatch
):
    writes, clock, syncer, _ = synced_writer
    syncs = count_syncs(monkeypatch)
    hooks: list = []
    batches: list = []
    writes.on_batch = lambda members, ok: batches.append((members, ok))

    def job(key):
        write(storage, key, hooks)
        return writes.committed().addCallback(lambda _: key)

    first = result_of(writes.when_free(lambda: job("a"), reads=True))
    clock.advance(0)  # batch 1 commits; its sync starts on the sync thread
    assert committed(storage, "a") == b"a", "committed: other readers see it"
    assert first == [] and hooks == [] and batches == [], "nobody is told before the log is synced"
    assert writes.unsynced == 1 and len(syncer.started) == 1
    assert not storage.writes.reactor_batch_open
    # The writers' flock is free for the other processes during the sync.
    other = os.open(storage.writes.lock_path, os.O_RDWR)
    try:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
    finally:
        os.close(other)
    # Writes that arrive meanwhile wait for the sync's end, then share one
    # batch: the batches stay as large as when the reactor waited itself.
    later = [result_of(writes.when_free(lambda k=key: job(k), reads=True)) for key in ("b", "c")]
    clock.advance(0)
    assert writes.queued == 2 and writes.commits == 1 and committed(storage, "b") is None
    syncer.settle()  # batch 1 is durable: its answer and its work go
    assert first == ["a"] and hooks == [("a", b"a")] and batches == [(1, True)]
    assert writes.unsynced == 0 and syncer.started == []
    clock.advance(0)  # the next turn: b and c in one batch
    assert writes.commits == 2 and writes.unsynced == 1 and later == [[], []]
    syncer.settle()
    assert later == [["b"], ["c"]] and batches == [(1, True), (2, True)]
    assert hooks == [("a", b"a"), ("b", b"b"), ("c", b"c")]
    reactor_thread = threading.current_thread()
    assert len(syncs) == 2 and reactor_thread not in syncs, "the reactor thread never waited in fdatasync"


def test_with_no_batch_open_committed_waits_for_the_batch_not_yet_synced(storage, synced_writer):
    writes, clock, syncer, _ = synced_writer
    writes.when_free(lambda: write(storage, "a"), reads=True)
    clock.advance(0)
    assert not storage.writes.reactor_batch_open and writes.unsynced == 1
    later = result_of(writes.committed())
    assert later == [], "what this process committed is not durable yet"
    syncer.settle()
    assert later == [None]
    assert result_of(writes.committed()) == [None], "nothing waits: at once"


def test_a_failed_sync_on_its_thread_fails_its_batch_and_the_writes_waiting_behind_it(
    storage, synced_writer, monkeypatch
):
    writes, clock, syncer, _ = synced_writer
    hooks: list = []
    batches: list = []
    writes.on_batch = lambda members, ok: batches.append((members, ok))

    def fail(_fd):
        raise OSError(5, "Input/output error")

    # Only the sync thread syncs (it starts at the commit).
    monkeypatch.setattr(os, "fdatasync", fail)
    first = result_of(writes.when_free(lambda: write(storage, "a", hooks) or writes.committed(), reads=True))
    clock.advance(0)
    behind = result_of(writes.when_free(lambda: write(storage, "b", hooks) or writes.committed(), reads=True))
    clock.advance(0)
    syncer.settle()
    monkeypatch.undo()
    assert len(first) == 1 and isinstance(first[0].value, StorageError)
    assert "could not be synced" in str(first[0].value)
    assert hooks == [] and batches == [(1, False)], "no follow-up work of a batch not known durable"
    clock.advance(0)  # the write that waited cannot open a batch any more
    assert len(behind) == 1 and isinstance(behind[0].value, StorageError)
    assert "restart the node" in str(behind[0].value)
    assert committed(storage, "b") is None and syncer.started == []


def test_a_syncer_that_raises_fails_its_batch_and_the_next_batch_is_synced_again(storage, synced_writer):
    writes, clock, syncer, _ = synced_writer
    first = result_of(writes.when_free(lambda: write(storage, "a") or writes.committed(), reads=True))
    clock.advance(0)
    # The running sync ends in something unexpected (no fdatasync failed:
    # nothing of the log was dropped).
    thread, _, outcome = syncer.started[0]
    thread.join(10)
    outcome[:] = [("error", RuntimeError("unexpected"))]
    syncer.settle()
    assert len(first) == 1 and isinstance(first[0].value, StorageError)
    assert "could not be synced" in str(first[0].value)
    second = result_of(writes.when_free(lambda: write(storage, "b") or writes.committed(), reads=True))
    clock.advance(0)
    assert len(syncer.started) == 1
    syncer.settle()
    assert second == [None] and committed(storage, "b") == b"b"


def test_a_worker_threads_batch_adopted_by_the_reactor_is_synced_before_its_members_wake(
    storage, synced_writer, monkeypatch
):
    """Its members wait on their own threads for the batch to end, which
    the reactor cannot defer: that batch is synced at its commit."""
    writes, clock, syncer, pool = synced_writer
    syncs = count_syncs(monkeypatch)
    inside, release = threading.Event(), threading.Event()
    woke: list = []

    def worker():
        with storage.transaction() as txn:
            txn.set_meta("worker", b"w")
            inside.set()
            assert release.wait(10)
        woke.append(len(syncs))

    thread = threading.Thread(target=worker)
    thread.start()
    assert inside.wait(10)
    queued = result_of(writes.when_free(lambda: write(storage, "reactor") or writes.committed(), reads=True))
    clock.advance(0)
    release.set()
    pool.settle()
    thread.join(10)
    assert woke == [1], "the worker thread woke once the log was synced"
    assert queued == [None] and syncer.started == [] and writes.unsynced == 0



def test_a_batch_of_writes_alone_is_synced_by_the_reactor_and_one_with_reads_records_by_the_syncer(
    storage, synced_writer, monkeypatch
):
    """Writers wait for their own sync, with little else for the reactor
    to do meanwhile: the syncer's round trip would only add to their wait.
    Reads' records (as server.py queues them) mean reads to serve."""
    writes, clock, syncer, _ = synced_writer
    syncs = count_syncs(monkeypatch)
    alone = result_of(writes.when_free(lambda: write(storage, "a") or writes.committed()))
    clock.advance(0)
    assert alone == [None] and syncer.started == [] and writes.unsynced == 0
    assert syncs == [threading.current_thread()], "synced at the commit, in the reactor thread"
    write_job = result_of(writes.when_free(lambda: write(storage, "b") or writes.committed()))
    records_job = result_of(writes.when_free(lambda: write(storage, "c") or writes.committed(), reads=True))
    clock.advance(0)
    assert writes.commits == 2 and write_job == [] and records_job == [], "one batch, synced elsewhere"
    syncer.settle()
    assert write_job == [None] and records_job == [None]
    assert len(syncs) == 2 and syncs[1] is not threading.current_thread()
    # The next batch of writes alone is the reactor's again.
    again = result_of(writes.when_free(lambda: write(storage, "d") or writes.committed()))
    clock.advance(0)
    assert again == [None] and syncer.started == [] and syncs[2] is threading.current_thread()
