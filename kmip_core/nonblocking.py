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
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["WouldBlock", "WriterBusy", "in_reactor", "in_reactor_now", "pinned", "would_block", "writer_busy"]

_state = threading.local()


class WouldBlock(BaseException):
    """Raised inside `in_reactor()` where the work would block the thread.
    A BaseException, so that the request path's `except Exception` (which
    turns errors into KMIP failures) lets it through to the caller."""


class WriterBusy(WouldBlock):
    """A write would wait for another writer's turn: the work can run again
    in the reactor thread once that turn is its own."""


@contextlib.contextmanager
def in_reactor(writable: bool = False) -> Iterator[None]:
    """`writable`: a batch is open that writes can join without waiting
    (then `writer_busy` does not raise)."""
    _state.on = True
    _state.pinned = False
    _state.writable = writable
    try:
        yield
    finally:
        _state.on = False
        _state.pinned = False
        _state.writable = False


def would_block(what: str) -> None:
    """Call before `what` blocks the thread: raises WouldBlock in
    `in_reactor()`, unless the work is `pinned()` to this thread (then it
    blocks: it cannot start over elsewhere)."""
    if getattr(_state, "on", False) and not _state.pinned:
        raise WouldBlock(what)


def writer_busy(what: str) -> None:
    """Call where work will write (before the costly part that precedes
    the write): raises WriterBusy in `in_reactor()` unless writes can join
    an open batch there."""
    if getattr(_state, "on", False) and not _state.writable:
        raise WriterBusy(what)


def pinned() -> None:
    """The work inside `in_reactor()` has changed something that waits for
    this thread's commit: from now on it must finish here."""
    _state.pinned = True


def in_reactor_now() -> bool:
    """Whether this thread is inside `in_reactor()`: code that can do its
    work there without waiting (a SQLite write joining the reactor's
    batch) takes that path instead of calling `would_block`."""
    return getattr(_state, "on", False)
