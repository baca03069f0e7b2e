"""Work run in a reactor thread, and what it must not do: block.

A node may run a request in its reactor thread instead of handing it to
its thread pool (kms_server: reads asked alone, on SQLite, issue 15): the
two hand-offs between threads, and the GIL passed back and forth for them,
cost more than such a read. Inside `in_reactor()`, the places that could
block the thread (a write transaction and its commit, waiting for another
thread's commit, sleeping before a retry) call `would_block(what)`, which
raises `WouldBlock`. The caller then runs the request again from the start
on its pool: nothing the first run did is kept, since it had only read.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["WouldBlock", "in_reactor", "would_block"]

_state = threading.local()


class WouldBlock(BaseException):
    """Raised inside `in_reactor()` where the work would block the thread.
    A BaseException, so that the request path's `except Exception` (which
    turns errors into KMIP failures) lets it through to the caller."""


@contextlib.contextmanager
def in_reactor() -> Iterator[None]:
    _state.on = True
    try:
        yield
    finally:
        _state.on = False


def would_block(what: str) -> None:
    """Call before `what` blocks the thread: raises WouldBlock in `in_reactor()`."""
    if getattr(_state, "on", False):
        raise WouldBlock(what)
