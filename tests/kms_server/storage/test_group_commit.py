"""Group commit (kmip_core.db.group_commit): batching, results per
item, and a failed batch failing each of its items."""

from __future__ import annotations

import threading

import pytest

from kmip_core.db.group_commit import GroupCommit


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
