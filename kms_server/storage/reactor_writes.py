"""SQLite writes in the reactor thread, committed once per reactor turn.

On SQLite a node runs most single-item requests in its reactor thread,
writes included (issue 15, docs/process-model.md). A thread hand-off costs
more than a small write, and worker threads taking turns at SQLite's one
writer fought over the GIL: 45-70 futex calls per request of the
create-get-locate-destroy cycle.

How a write runs there (`WriteBatches`, kms_server/storage/sql.py):

- A request that writes starts at once (`start`), as a
  `kmip_core.nonblocking.Work`: what it computes before its write
  transaction (a new key, its seal, its row MAC) is computed then, outside
  the writer's turn, which the node's processes hold one at a time. At its
  write transaction it waits, and is resumed at the end of the reactor
  turn, with every other write that arrived in the turn, in one batch:
  each write transaction is one member, under its own savepoint; a member
  that fails is rolled back alone. Work queued with `when_free` runs whole
  in the batch. A request run in the reactor as a read that finds it
  writes after all (a Get clears Fresh the first time) raises
  `kmip_core.nonblocking.WriterBusy` before anything is written, since no
  batch is open outside those bursts, and starts again as a write.
- The batch opens if it can without waiting (no worker thread of this
  process writing or queued to, the writer flock, shared with the node's
  other processes, free); otherwise one pool thread waits for the turn,
  and the writes queued meanwhile run when it has it. The flock is thus
  held for the writes and their commit only, not for the reads of the
  turn.
- The batch commits in the reactor thread right after its writes: one
  commit, one sync of the write-ahead log (after the flock is released:
  `kms_server.storage.sql.WalSync`), for all of them. The answers wait
  for both (`committed()`): nothing is answered before it is durable.
  If the commit or the sync fails, each waiter is told so (its request
  is answered General Failure).

Work that must follow the commit (publishing an audit record, remembering
a row version) is registered with `Transaction.after_commit`, and runs
when the batch commits.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from kmip_core.nonblocking import Work, WouldBlock
from kms_server.storage.base import ReactorBatches, StorageError

__all__ = ["BURST_MAX", "ReactorWrites"]

log = logging.getLogger("kms_server.storage")

T = TypeVar("T")

# The most jobs one batch runs: the writer flock is held for all of them,
# and the other processes' writers wait that long. What is left runs in
# the next batch, right after.
BURST_MAX = 64


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
        self._burst_call: Any = None
        self._waiters: list[defer.Deferred[None]] = []
        # Jobs to run in the next batch: callables, or works to resume.
        self._queued: list[tuple[Callable[[], Any] | Work, defer.Deferred[Any]]] = []
        self._acquiring = False
        self.commits = 0  # batches ended (tests, diagnostics)
        # Told of each batch that held writes: how many write transactions,
        # and whether it committed (the node's metrics).
        self.on_batch: Callable[[int, bool], None] | None = None

    @property
    def members(self) -> int:
        """Write transactions that joined a batch so far (each batch's count
        for `on_batch`; tests, diagnostics). Whether one request wrote is
        its `in_reactor()` state's `pinned`."""
        return self._batches.reactor_members

    @property
    def batch_open(self) -> bool:
        """Whether writes in the reactor thread can join a batch now."""
        return self._batches.reactor_batch_open

    @property
    def queued(self) -> int:
        """Work waiting for the next batch (tests, diagnostics)."""
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
        """Run `job()` in the reactor thread in the next batch: at the end
        of this reactor turn, or once a pool thread has the writer's turn;
        fires with its result (or with what the Deferred it returns fires
        with)."""
        return self._queue(job)

    def start(self, job: Callable[[], T]) -> T | defer.Deferred[T]:
        """Run `job()` now, as a `kmip_core.nonblocking.Work`: what it does
        before its write transaction runs at once, outside the writer's
        turn; at its write transaction (`writer_turn`) it waits for the
        next batch, and is resumed in it. Its result if it ended without
        waiting (what it raises is raised), else a Deferred of it."""
        work = Work(job)
        if work.step():
            return work.result
        return self._queue(work)

    def _queue(self, job: Callable[[], Any] | Work, d: defer.Deferred[Any] | None = None) -> defer.Deferred[Any]:
        """Queue `job` for the next batch; `d` (a new one by default) fires
        with its result. Queued inside a batch (a job that queues another,
        a work that waits again), it runs in that batch."""
        if d is None:
            d = defer.Deferred()
        self._queued.append((job, d))
        if not self._batches.reactor_batch_open:
            self._schedule()
        return d

    def _schedule(self) -> None:
        if self._burst_call is None and not self._acquiring:
            self._burst_call = self._reactor.callLater(0, self._burst)

    def _burst(self) -> None:
        self._burst_call = None
        if not self._queued or self._acquiring:
            return
        try:
            opened = self._batches.open_reactor_batch()
        except StorageError:
            self._acquire_failed(Failure())
            return
        if opened:
            self._run_and_commit()
            return
        # Another writer has the turn: a pool thread waits for it.
        self._acquiring = True
        self._run_in_thread(self._batches.wait_reactor_batch).addCallbacks(self._acquired, self._acquire_failed)

    def _acquired(self, _: object) -> None:
        self._acquiring = False
        self._run_and_commit()

    def _acquire_failed(self, failure: Failure) -> None:
        # The batch could not be opened (the database cannot be reached):
        # the work is told so, and its caller runs it elsewhere.
        self._acquiring = False
        queued, self._queued = self._queued, []
        for job, d in queued:
            if isinstance(job, Work):
                # Told where it waits: it gives up its run in the reactor,
                # as any work that would block (and starts over on the pool).
                self._settle(d, job, WouldBlock(f"no batch: {failure.getErrorMessage()}"))
            else:
                d.errback(Failure(StorageError(failure.getErrorMessage())))

    def _settle(self, d: defer.Deferred[Any], work: Work, throw: BaseException | None = None) -> None:
        """Run a waiting work on (with `throw` raised where it waits, if
        given); `d` fires with its result once it ends. One that waits
        again is queued again."""
        try:
            ended = work.step() if throw is None else work.throw(throw)
        except BaseException:
            d.errback()
            return
        if not ended:
            self._queue(work, d)
        else:
            _fire(d, work.result)

    def _run_and_commit(self) -> None:
        members_before = self.members
        ran = 0
        while self._queued and ran < BURST_MAX:
            queued, self._queued = self._queued[: BURST_MAX - ran], self._queued[BURST_MAX - ran :]
            ran += len(queued)
            for job, d in queued:
                if isinstance(job, Work):
                    self._settle(d, job)
                    continue
                try:
                    result = job()
                except BaseException:
                    # Whatever a job raises (even WouldBlock, which its
                    # caller should have caught), the batch is committed
                    # and the flock released below: it is the job's alone.
                    d.errback()
                else:
                    _fire(d, result)
        waiters, self._waiters = self._waiters, []
        members = self.members - members_before
        error = self._batches.commit_reactor_batch()
        self.commits += 1
        if members and self.on_batch is not None:
            self.on_batch(members, error is None)
        if error is not None:
            log.error(
                "a reactor batch of writes did not commit (%d answers waited on it: General Failure instead): %s",
                len(waiters),
                error,
            )
        for d in waiters:
            if error is None:
                d.callback(None)
            else:
                # One exception per waiter: they must not share a traceback.
                d.errback(Failure(StorageError(str(error))))
        if self._queued:
            # Beyond BURST_MAX, or queued by what the commit's answers set off.
            self._schedule()


def _fire(d: defer.Deferred[Any], result: Any) -> None:
    """`d` fires with a job's result, or with what the Deferred it
    returned fires with."""
    if isinstance(result, defer.Deferred):
        result.chainDeferred(d)
    else:
        d.callback(result)
