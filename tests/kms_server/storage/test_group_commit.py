"""Group commit (kmip_core.db.group_commit): batching, results per
item, and a failed batch failing each of its items."""

from __future__ import annotations

import threading

import pytest
from twisted.internet import defer

from kmip_core.db.group_commit import DeferredGroupCommit, GroupCommit


class Refused(Exception):
    pass


def test_one_item_alone_is_one_batch():
    batches = []

    def flush(items):
        batches.append(list(items))
        return [item * 2 for item in items]

    group = GroupCommit(flush)
    assert group.submit(21) == 42
    assert group.submit(5) == 10
    assert batches == [[21], [5]]


def test_items_queued_during_a_commit_share_the_next_one():
    """While the first batch is being written, seven more threads submit;
    they are written together by one flush, and each gets its own result."""
    first_started, release_first = threading.Event(), threading.Event()
    batches: list[list[int]] = []

    def flush(items):
        batches.append(list(items))
        if len(batches) == 1:
            first_started.set()
            assert release_first.wait(10)
        return [f"done-{item}" for item in items]

    group = GroupCommit(flush)
    results: dict[int, str] = {}

    def submit(item):
        results[item] = group.submit(item)

    leader = threading.Thread(target=submit, args=(0,))
    leader.start()
    assert first_started.wait(10)
    followers = [threading.Thread(target=submit, args=(i,)) for i in range(1, 8)]
    for t in followers:
        t.start()
    # Every follower is queued behind the running flush before it ends.
    for _ in range(1000):
        with group._cond:
            if len(group._pending) == 7:
                break
        threading.Event().wait(0.005)
    release_first.set()
    for t in [leader, *followers]:
        t.join(10)
    assert batches[0] == [0]
    assert sorted(batches[1]) == list(range(1, 8)) and len(batches) == 2
    assert results == {i: f"done-{i}" for i in range(8)}


def test_a_failed_batch_fails_each_item_and_the_next_batch_works():
    calls = {"n": 0}

    def flush(items):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError("disk full")
        return list(items)

    group = GroupCommit(flush, Refused)
    with pytest.raises(Refused, match="disk full"):
        group.submit("a")
    assert group.submit("b") == "b"


def test_concurrent_failures_raise_in_every_thread():
    gate = threading.Barrier(6, timeout=10)

    def flush(items):
        raise RuntimeError("no database")

    group = GroupCommit(flush, Refused)
    errors = []

    def submit(i):
        gate.wait()
        try:
            group.submit(i)
        except Refused as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == ["no database"] * 6


def test_a_flush_returning_the_wrong_number_of_results_fails_the_batch():
    group = GroupCommit(lambda items: [], Refused)
    with pytest.raises(Refused, match="0 results for 1 items"):
        group.submit("x")


# DeferredGroupCommit: the same, for callers in a reactor thread.
class Thread:
    """run_in_thread for the tests: each call is queued, and run when the
    test says so; its Deferred fires then, as deferToThreadPool's would."""

    def __init__(self):
        self.calls: list[tuple] = []

    def __call__(self, f, items):
        d = defer.Deferred()
        self.calls.append((f, items, d))
        return d

    def run_next(self):
        f, items, d = self.calls.pop(0)
        try:
            result = f(items)
        except Exception as exc:
            d.errback(exc)
        else:
            d.callback(result)


def recording_flush():
    """A flush that records each batch it is given and answers done-<item>."""
    batches: list[list] = []

    def flush(items):
        batches.append(list(items))
        return [f"done-{item}" for item in items]

    return batches, flush


def outcomes(ds):
    got = []
    for d in ds:
        d.addCallbacks(got.append, lambda f: got.append(f.value))
    return got


def test_deferred_items_submitted_during_a_write_form_the_next_batch():
    batches, flush = recording_flush()
    thread = Thread()
    group = DeferredGroupCommit(flush, thread, Refused)
    first = group.submit(0)
    assert group.flushing and len(thread.calls) == 1
    later = [group.submit(i) for i in range(1, 6)]
    assert len(thread.calls) == 1, "a second batch started while one was being written"
    got_first, got_later = outcomes([first]), outcomes(later)
    thread.run_next()
    assert got_first == ["done-0"] and got_later == []
    assert len(thread.calls) == 1  # the next batch, started as the first ended
    thread.run_next()
    assert got_later == [f"done-{i}" for i in range(1, 6)]
    assert batches == [[0], [1, 2, 3, 4, 5]]
    assert not group.flushing and thread.calls == []


def test_a_failed_deferred_batch_fails_each_item_and_the_next_batch_is_written():
    def flush(items):
        if 0 in items:
            raise OSError("disk full")
        return items

    thread = Thread()
    group = DeferredGroupCommit(flush, thread, Refused)
    failed = [group.submit(0)]
    failed += [group.submit(1), group.submit(2)]  # queued behind [0]
    got = outcomes(failed)
    thread.run_next()
    assert len(got) == 1 and isinstance(got[0], Refused) and str(got[0]) == "disk full"
    thread.run_next()
    assert got[1:] == [1, 2]
    again = outcomes([group.submit(0), group.submit(0)])
    thread.run_next()
    thread.run_next()
    assert all(isinstance(e, Refused) for e in again) and again[0] is not again[1]


def test_a_deferred_batch_with_a_result_missing_fails_every_item():
    thread = Thread()
    group = DeferredGroupCommit(lambda items: items[:-1], thread, Refused)
    got = outcomes([group.submit("a"), group.submit("b"), group.submit("c")])
    thread.run_next()  # ["a"]: no result at all
    thread.run_next()  # ["b", "c"]: one result for two
    assert [type(e) for e in got] == [Refused, Refused, Refused]
    assert "0 results for 1" in str(got[0])
    assert "1 results for 2" in str(got[1]) and "1 results for 2" in str(got[2])


class LaterJob:
    """run_in_thread with take_when_run: `f()` runs when the test says, as
    a job of the reactor's next batch would; `fail_next` is a batch that
    could not be opened (the job never runs)."""

    def __init__(self):
        self.jobs: list[tuple] = []

    def __call__(self, f):
        d = defer.Deferred()
        self.jobs.append((f, d))
        return d

    def run_next(self):
        f, d = self.jobs.pop(0)
        try:
            result = f()
        except Exception as exc:
            d.errback(exc)
        else:
            d.callback(result)

    def fail_next(self):
        _, d = self.jobs.pop(0)
        d.errback(OSError("unable to open database file"))


def test_taken_when_run_a_batch_holds_every_item_submitted_until_its_job_runs():
    batches, flush = recording_flush()
    job = LaterJob()
    group = DeferredGroupCommit(flush, job, Refused, take_when_run=True)
    got = outcomes([group.submit(i) for i in range(4)])
    assert len(job.jobs) == 1 and batches == [], "one job queued, nothing taken yet"
    job.run_next()
    assert batches == [[0, 1, 2, 3]] and got == [f"done-{i}" for i in range(4)]
    assert not group.flushing and job.jobs == []


def test_taken_when_run_a_job_that_never_runs_fails_each_waiting_item_alone():
    job = LaterJob()
    group = DeferredGroupCommit(lambda items: items, job, Refused, take_when_run=True)
    got = outcomes([group.submit("a"), group.submit("b")])
    job.fail_next()
    assert [type(e) for e in got] == [Refused, Refused] and got[0] is not got[1]
    assert "unable to open" in str(got[0])
    assert not group.flushing
    again = outcomes([group.submit("c")])
    job.run_next()
    assert again == ["c"]
