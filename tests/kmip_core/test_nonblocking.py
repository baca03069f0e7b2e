"""kmip_core.nonblocking.Work: work of the reactor thread that waits for the
writer's turn at `writer_turn` without blocking the thread, in a context of
its own; and the state `in_reactor()` keeps for it."""

from __future__ import annotations

import gc
import weakref

import pytest

from kmip_core.nonblocking import Work, WouldBlock, WriterBusy, in_reactor, in_reactor_now, writer_busy, writer_turn


def test_a_work_that_does_not_wait_ends_at_its_first_step():
    work = Work(lambda: "done")
    assert work.step() is True and work.result == "done"


def test_a_work_waits_at_writer_turn_and_goes_on_writable_when_resumed():
    seen: list = []

    def job():
        with in_reactor() as state:
            seen.append(("before", state.writable))
            writer_turn("a write transaction")
            seen.append(("after", state.writable))
        return "written"

    work = Work(job)
    assert work.step() is False, "it waits"
    assert seen == [("before", False)]
    assert not in_reactor_now(), "the caller's context is not the work's"
    assert work.step() is True and work.result == "written"
    assert seen == [("before", False), ("after", True)]


def test_outside_a_work_writer_turn_raises_writer_busy_and_writer_busy_too():
    with in_reactor():
        with pytest.raises(WriterBusy):
            writer_turn("a write transaction")
        with pytest.raises(WriterBusy):
            writer_busy("a first Get")
    # Outside in_reactor() both return at once (a worker thread waits for its turn).
    writer_turn("a write transaction")
    writer_busy("a first Get")


def test_what_is_thrown_where_a_work_waits_is_raised_there():
    def job():
        with in_reactor():
            try:
                writer_turn("a write transaction")
            except WouldBlock as exc:
                return f"told: {exc}"
        return "written"

    work = Work(job)
    assert work.step() is False
    assert work.throw(WouldBlock("no batch")) is True
    assert work.result == "told: no batch"


def test_what_a_work_raises_is_raised_by_its_step():
    def job():
        with in_reactor():
            writer_turn("a write transaction")
            raise ValueError("refused")

    work = Work(job)
    assert work.step() is False
    with pytest.raises(ValueError, match="refused"):
        work.step()


def test_works_waiting_together_keep_their_own_state():
    states: dict = {}

    def job(name):
        with in_reactor() as state:
            states[name] = state
            writer_turn("a write transaction")
            return state.pinned, state.writable

    first, second = Work(lambda: job("a")), Work(lambda: job("b"))
    assert first.step() is False and second.step() is False
    assert states["a"] is not states["b"]
    states["b"].pinned = True  # what one sets is its own
    assert first.step() is True and first.result == (False, True)
    assert second.step() is True and second.result == (True, True)


def test_an_ended_work_leaves_nothing_for_the_collector():
    # Each work's function is watched through a weak reference: freed at
    # once by reference counting unless a cycle (the work's context holding
    # the work) keeps it for the collector. Counting what gc.collect() finds
    # would also count what other tests' threads leave in this process.
    def make_job():
        def job():
            with in_reactor():
                writer_turn("a write transaction")
            return 1

        return job

    gc.collect()
    gc.disable()
    try:
        watched = []
        for _ in range(200):
            job = make_job()
            watched.append(weakref.ref(job))
            work = Work(job)
            assert work.step() is False and work.step() is True
            del work, job
        kept = sum(ref() is not None for ref in watched)
        assert kept == 0, f"{kept} of 200 ended works kept alive by a reference cycle"
    finally:
        gc.enable()
