"""SQLite writes in the reactor thread, committed once per reactor turn.

On SQLite a node runs most single-item requests in its reactor thread,
writes included (issue 15, docs/process-model.md). A thread hand-off costs
more than a small write, and worker threads taking turns at SQLite's one
writer fought over the GIL: 45-70 futex calls per request of the
create-get-locate-destroy cycle.

How a write runs there (`WriteBatches`, kms_server/storage/sql.py):

- The first write transaction of a reactor turn opens a batch, if it can
  without waiting: no worker thread of this process writing or queued to,
  and the writer flock (shared with the node's other processes) free. Each
  write transaction of the turn is one member of the batch, under its own
  savepoint; a member that fails is rolled back alone.
- The batch commits at the end of the turn (`reactor.callLater(0)`), in
  the reactor thread: one commit, one sync of the write-ahead log, for
  every write of the turn. The answers of its members wait for it
  (`committed()`): nothing is answered before it is durable. If the
  commit fails, each member is answered General Failure instead.
- A write that cannot open a batch without waiting raises
  `kmip_core.nonblocking.WriterBusy` before it has done anything: the
  request waits for the turn (`when_free`), which a pool thread waits for
  (the flock, the worker threads' batch). What queued meanwhile runs in
  that batch, then it commits.

Work that must follow the commit (publishing an audit record, remembering
a row version) is registered with `Transaction.after_commit`, and runs
when the batch commits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from kms_server.storage.base import ReactorBatches, StorageError

__all__ = ["ReactorWrites"]

T = TypeVar("T")


class ReactorWrites:
    """The reactor thread's write batches of one node process. Every
    method is called in the reactor thread. `run_in_thread(f)` runs `f()`
    on a pool thread and returns a Deferred firing in the reactor thread."""

    def __init__(
        self,
        batches: ReactorBatches,
        reactor: Any,
        run_in_thread: Callable[[Callable[[], None]], defer.Deferred[Any]],
    ):
        self._batches = batches
        self._reactor = reactor
        self._run_in_thread = run_in_thread
        self._commit_call: Any = None
        self._waiters: list[defer.Deferred[None]] = []
        self._queued: list[tuple[Callable[[], Any], defer.Deferred[Any]]] = []
        self._acquiring = False
        self.commits = 0  # batches committed (tests, diagnostics)
        batches.on_reactor_batch = self._opened

    @property
    def members(self) -> int:
        """Write transactions that joined a batch so far: compared before
        and after a request, whether it wrote."""
        return self._batches.reactor_members

    @property
    def queued(self) -> int:
        """Work waiting for the writer's turn (tests, diagnostics)."""
        return len(self._queued)

    def committed(self) -> defer.Deferred[None]:
        """Fires once the open batch is committed; fails with StorageError
        if its commit fails."""
        if not self._batches.reactor_batch_open:
            return defer.succeed(None)  # nothing of this turn's is uncommitted
        d: defer.Deferred[None] = defer.Deferred()
        self._waiters.append(d)
        return d

    def when_free(self, job: Callable[[], T | defer.Deferred[T]]) -> defer.Deferred[T]:
        """Run `job()` in the reactor thread once this process has the
        writer's turn, in the batch then open; fires with its result (or
        with what the Deferred it returns fires with)."""
        d: defer.Deferred[T] = defer.Deferred()
        self._queued.append((job, d))
        if self._batches.reactor_batch_open:
            self._opened()  # it runs before this turn's commit
        elif not self._acquiring:
            self._acquiring = True
            self._run_in_thread(self._batches.wait_reactor_batch).addCallbacks(
                self._acquired, self._acquire_failed
            )
        return d

    def _opened(self) -> None:
        if self._commit_call is None:
            self._commit_call = self._reactor.callLater(0, self._commit)

    def _acquired(self, _: object) -> None:
        self._acquiring = False
        self._commit()

    def _acquire_failed(self, failure: Failure) -> None:
        # The batch could not be opened (the database cannot be reached):
        # the work is told so, and its caller runs it elsewhere.
        self._acquiring = False
        queued, self._queued = self._queued, []
        for _, d in queued:
            d.errback(Failure(StorageError(failure.getErrorMessage())))

    def _commit(self) -> None:
        if self._commit_call is not None:
            if self._commit_call.active():
                self._commit_call.cancel()
            self._commit_call = None
        # What waited for the turn runs in this batch, before its commit.
        queued, self._queued = self._queued, []
        for job, d in queued:
            try:
                result = job()
            except Exception:
                d.errback()
            else:
                if isinstance(result, defer.Deferred):
                    result.chainDeferred(d)
                else:
                    d.callback(result)
        waiters, self._waiters = self._waiters, []
        error = self._batches.commit_reactor_batch()
        self.commits += 1
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                # One exception per waiter: they must not share a traceback.
                d.errback(Failure(StorageError(str(error))))
        if self._queued and not self._acquiring and not self._batches.reactor_batch_open:
            # Work queued by what the commit's answers set off.
            self._acquiring = True
            self._run_in_thread(self._batches.wait_reactor_batch).addCallbacks(
                self._acquired, self._acquire_failed
            )
