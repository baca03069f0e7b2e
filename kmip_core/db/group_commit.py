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
Used by the KMS audit trail (reads and refusals) and the broker's audit trail
(the gateway's unwraps).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar, cast

__all__ = ["GroupCommit"]

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
