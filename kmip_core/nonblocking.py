"""Work run in a reactor thread, and what it must not do: block.

A node may run a request in its reactor thread instead of handing it to
its thread pool (kms_server on SQLite: reads and writes asked alone, issue
15): the two hand-offs between threads, and the GIL passed back and forth
for them, cost more than such a request. Inside `in_reactor()`, the places
that could block the thread call `would_block(what)` (sleeping before a
retry), which raises `WouldBlock`; the caller then runs the request again
from the start on its pool. A write that would wait for another writer's
turn calls `writer_busy(what)` instead, which raises `WriterBusy` (a
WouldBlock): the caller may run it again in the reactor once the turn is
its own (kms_server/storage/reactor_writes.py). Both are raised before the
work has changed anything. Once it has (its change waits in the reactor's
batch), the work is `pinned()`: it can no longer start over elsewhere, and
`would_block` lets it wait where it is.

A write may also wait for the writer's turn without blocking the thread:
run as a `Work` (a greenlet of the reactor thread), it calls
`writer_turn(what)` where its write transaction begins; the work is then
suspended, the reactor serves others, and whoever opens the batch resumes
it there. The state kept here is a ContextVar, and each work runs in a
copy of the context it was started in, so that what one waiting work has
set is not what the next request in the thread sees.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import greenlet

__all__ = [
    "Work",
    "WouldBlock",
    "WriterBusy",
    "in_reactor",
    "in_reactor_now",
    "pinned",
    "would_block",
    "writer_busy",
    "writer_turn",
]


@dataclass
class ReactorState:
    """What `in_reactor()` knows of the work it runs: `writable`, a batch
    is open that writes can join; `pinned`, the work has joined one."""

    writable: bool
    pinned: bool = False


# A ContextVar, not a thread-local: works of the reactor thread that wait
# for the writer's turn (`Work`) each run in a context of their own.
_STATE: contextvars.ContextVar[ReactorState | None] = contextvars.ContextVar("kmip_core.nonblocking", default=None)
_WORK: contextvars.ContextVar[Work | None] = contextvars.ContextVar("kmip_core.nonblocking.work", default=None)


class WouldBlock(BaseException):
    """Raised inside `in_reactor()` where the work would block the thread.
    A BaseException, so that the request path's `except Exception` (which
    turns errors into KMIP failures) lets it through to the caller."""


class WriterBusy(WouldBlock):
    """A write would wait for another writer's turn: the work can run again
    in the reactor thread once that turn is its own."""


@contextlib.contextmanager
def in_reactor(writable: bool = False) -> Iterator[ReactorState]:
    """`writable`: a batch is open that writes can join without waiting
    (then `writer_busy` does not raise). Yields the work's state: its
    `pinned` says, once the block is left, whether it joined a batch."""
    state = ReactorState(writable)
    token = _STATE.set(state)
    try:
        yield state
    finally:
        _STATE.reset(token)


def would_block(what: str) -> None:
    """Call before `what` blocks the thread: raises WouldBlock in
    `in_reactor()`, unless the work is `pinned()` to this thread (then it
    blocks: it cannot start over elsewhere)."""
    state = _STATE.get()
    if state is not None and not state.pinned:
        raise WouldBlock(what)


def writer_busy(what: str) -> None:
    """Call where work will write (before the costly part that precedes
    the write): raises WriterBusy in `in_reactor()` unless writes can join
    an open batch there, or the work is a `Work`, which will wait for one
    at its write transaction (`writer_turn`) and need not start over."""
    state = _STATE.get()
    if state is not None and not state.writable and _waiting_work() is None:
        raise WriterBusy(what)


def _waiting_work() -> Work | None:
    """The `Work` whose own code is running (it can wait), or None."""
    work = _WORK.get()
    return work if work is not None and greenlet.getcurrent() is work._greenlet else None


def writer_turn(what: str) -> None:
    """Call where a write transaction is about to begin, outside any
    transaction. In `in_reactor()` without an open batch: a `Work` waits
    here until the reactor has opened one and resumes it; other work
    raises WriterBusy. Elsewhere, returns at once."""
    state = _STATE.get()
    if state is None or state.writable:
        return
    work = _waiting_work()
    if work is None:
        raise WriterBusy(what)
    work._wait()
    state.writable = True


def pinned() -> None:
    """The work inside `in_reactor()` has changed something that waits for
    this thread's commit: from now on it must finish here."""
    state = _STATE.get()
    if state is not None:
        state.pinned = True


def in_reactor_now() -> bool:
    """Whether this thread is inside `in_reactor()`: code that can do its
    work there without waiting (a SQLite write joining the reactor's
    batch) takes that path instead of calling `would_block`."""
    return _STATE.get() is not None


_WAITING = object()


def _run_work(work: Work) -> Any:
    # Unset at the end: the greenlet's context, which the work holds, must
    # not hold the work once it ended (a reference cycle).
    token = _WORK.set(work)
    try:
        return work._fn()
    finally:
        _WORK.reset(token)


class Work:
    """Work of the reactor thread that may wait for the writer's turn
    (`writer_turn`) without blocking the thread: it runs in a greenlet, in
    a copy of the context it was made in, and `step()` runs it until it
    ends or waits. What it computes before its write transaction is thus
    computed outside the writer's turn, which the node's processes hold
    one at a time (issue 15)."""

    __slots__ = ("_caller", "_fn", "_greenlet", "result")

    def __init__(self, fn: Callable[[], Any]):
        # The greenlet is given this work when it starts (no closure over
        # it: no reference cycle for the collector to find once it ends).
        self._fn = fn
        self._greenlet = greenlet.greenlet(_run_work)
        self._greenlet.gr_context = contextvars.copy_context()
        self._caller: greenlet.greenlet | None = None
        self.result: Any = None

    def step(self) -> bool:
        """Run the work until it ends (True: its value is `result`; what
        it raises is raised here) or waits for the writer's turn (False).
        Call again once a batch is open."""
        return self._switch(lambda: self._greenlet.switch(self))

    def throw(self, exc: BaseException) -> bool:
        """Raise `exc` where the work waits, and run it on (as `step`)."""
        return self._switch(lambda: self._greenlet.throw(exc))

    def _switch(self, go: Callable[[], Any]) -> bool:
        self._caller = self._greenlet.parent = greenlet.getcurrent()
        value = go()
        if value is _WAITING and not self._greenlet.dead:
            return False
        self.result = value
        return True

    def _wait(self) -> None:
        caller = self._caller
        assert caller is not None  # running, so switched to by _switch
        caller.switch(_WAITING)
