"""Group commit: items that threads submit at the same time are written by
one transaction, and each thread returns only once its item is committed.

There is no writer thread. A submitting thread that finds no batch being
written becomes the leader: it takes every item queued so far and calls
`flush(items)`, which writes them in one transaction and returns one result
per item. The others wait for it, then find their result, or are leaders of
the next batch. Under load a batch holds what arrived during the previous
commit, so the cost of a commit (its fsync, its lock) is shared; alone, a
thread pays one commit, as it would without batching.

A batch that fails fails every one of its items: `flush` raising makes each
waiting `submit` raise `error(exc)` (a new exception per thread), so a
caller that must not go on without its record (fail closed) does not.
Used by the KMS audit trail (refusals; reads answered by a caller that
cannot wait, below) and the broker's audit trail (the gateway's unwraps).
Inside `kmip_core.nonblocking.in_reactor()` no thread may wait: `submit`
then calls `flush([item])` itself, and the storage under it either writes
without waiting (the KMS on SQLite: a member of the reactor's own batch) or
raises WouldBlock before writing.

`DeferredGroupCommit` is the same for a Twisted reactor: an item is
submitted from the reactor thread and its result comes as a Deferred, so no
thread waits for it. Items submitted while a batch is being written form the
next batch; one batch at a time is written, on a pool thread. The KMS holds
the answer to a read in the reactor until the read's audit record is durable
(kms_server/server.py): the worker thread that served the read is free at
once, and a batch costs two hand-offs between threads instead of a wait and
a wake per item (issue 15). With `take_when_run`, a batch takes its items
when the runner runs it rather than when it is handed to the runner: a KMS
on SQLite runs it in the reactor thread as one job of the reactor's next
batch of writes, and every record submitted until that job runs joins it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar, cast

from twisted.internet import defer
from twisted.python.failure import Failure

from kmip_core.nonblocking import in_reactor_now

__all__ = ["DeferredGroupCommit", "GroupCommit"]

Item = TypeVar("Item")
Result = TypeVar("Result")


class _Slot(Generic[Item, Result]):
    __slots__ = ("item", "result", "error", "done")

    def __init__(self, item: Item):
        self.item = item
        self.result: Result | None = None
        self.error: str | None = None
        self.done = False


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        flush: Callable[[list[Item]], Sequence[Result]],
        error: Callable[[str], Exception] = RuntimeError,
    ):
        self._flush_items = flush
        self._error = error
        self._cond = threading.Condition()
        self._pending: list[_Slot[Item, Result]] = []
        self._flushing = False

    def submit(self, item: Item) -> Result:
        """Write `item` with whatever else is queued; return its result
        once committed, or raise `error(...)` if its batch failed."""
        if in_reactor_now():
            # No thread may wait here: the item is written at once, by a
            # flush that either joins the reactor's own batch or raises
            # WouldBlock before it writes (kms_server/storage/reactor_writes.py).
            return self._flush_alone(item)
        slot: _Slot[Item, Result] = _Slot(item)
        with self._cond:
            self._pending.append(slot)
            while not slot.done:
                if self._flushing:
                    self._cond.wait()
                    continue
                self._flushing = True
                batch, self._pending = self._pending, []
                self._cond.release()
                try:
                    self._flush(batch)
                finally:
                    self._cond.acquire()
                    self._flushing = False
                    self._cond.notify_all()
        if slot.error is not None:
            raise self._error(slot.error)
        # A flushed slot holds its result or its error (None may be a result).
        return cast(Result, slot.result)

    def _flush_alone(self, item: Item) -> Result:
        try:
            results = list(self._flush_items([item]))
            if len(results) != 1:
                raise RuntimeError(f"group commit: {len(results)} results for 1 item")
        except Exception as exc:
            raise self._error(str(exc) or type(exc).__name__) from None
        return results[0]

    def _flush(self, batch: list[_Slot[Item, Result]]) -> None:
        try:
            results = list(self._flush_items([slot.item for slot in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"group commit: {len(results)} results for {len(batch)} items")
        except Exception as exc:
            for slot in batch:
                slot.error, slot.done = str(exc) or type(exc).__name__, True
            return
        for slot, result in zip(batch, results, strict=True):
            slot.result, slot.done = result, True


class DeferredGroupCommit(Generic[Item, Result]):
    """Group commit for callers in a reactor thread (module docstring).

    `run_in_thread(f, items)` runs `f(items)` on a thread and returns a
    Deferred that fires in the reactor thread (deferToThreadPool); `flush`
    writes its items in one transaction and returns one result per item,
    or raises. Every method is called in the reactor thread.

    `take_when_run`: `run_in_thread(f)` instead, which runs `f()` later in
    the reactor thread (never on another thread: it takes the items queued
    until then) and returns a Deferred of what `f()` gives, or of what the
    Deferred it returns gives."""

    def __init__(
        self,
        flush: Callable[[list[Item]], Sequence[Result]],
        run_in_thread: Callable[..., defer.Deferred[Any]],
        error: Callable[[str], Exception] = RuntimeError,
        *,
        take_when_run: bool = False,
    ):
        self._flush_items = flush
        self._run_in_thread = run_in_thread
        self._error = error
        self._take_when_run = take_when_run
        self._pending: list[tuple[Item, defer.Deferred[Result]]] = []
        self._flushing = False

    @property
    def flushing(self) -> bool:
        """Whether a batch is being written (tests, diagnostics)."""
        return self._flushing

    def submit(self, item: Item) -> defer.Deferred[Result]:
        """Fires with the item's result once its batch is committed, or
        fails with `error(...)` if its batch failed."""
        d: defer.Deferred[Result] = defer.Deferred()
        self._pending.append((item, d))
        if not self._flushing:
            self._next()
        return d

    def _next(self) -> None:
        if not self._pending:
            self._flushing = False
            return
        self._flushing = True
        batch: list[tuple[Item, defer.Deferred[Result]]] = []

        def take() -> list[Item]:
            batch.extend(self._pending)
            self._pending = []
            return [item for item, _ in batch]

        if self._take_when_run:
            written = self._run_in_thread(lambda: self._flush_checked(take()))
        else:
            written = self._run_in_thread(self._flush_checked, take())

        def settle(outcome: Any) -> None:
            if not batch:
                take()  # the runner failed before it ran the flush
            if isinstance(outcome, Failure):
                text = str(outcome.value) or type(outcome.value).__name__
                for _, d in batch:
                    # A new exception per item: one raised in several
                    # callers would share one traceback.
                    d.errback(Failure(self._error(text)))
            else:
                for (_, d), result in zip(batch, outcome, strict=True):
                    d.callback(result)
            # What arrived while this batch was written is the next one.
            self._next()

        written.addBoth(settle)

    def _flush_checked(self, items: list[Item]) -> list[Result]:
        results = list(self._flush_items(items))
        if len(results) != len(items):
            raise RuntimeError(f"group commit: {len(results)} results for {len(items)} items")
        return results
