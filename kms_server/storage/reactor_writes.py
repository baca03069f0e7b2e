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
- A batch that holds the audit records of reads is synced by a process
  of its own (`SyncProcess`, kms_server/storage/log_sync.py), not by the
  reactor thread, which meanwhile reads requests, runs reads and answers
  those whose batch is durable (under Get x16 a worker's reactor waited
  in `fdatasync` for a sixth of its time: bench/README.md). The batch's
  answers, and its members' `after_commit` work, wait for the sync's
  answer. The writes that arrive meanwhile wait for it too, then run in
  the next batch together, as they did when the reactor waited itself:
  no more commits, nor pages written, per request. A batch of writes
  alone is synced by the reactor thread: its writers wait for it, the
  reactor has little else to do meanwhile, and the helper's round trip
  only added to their wait. So is a batch of reads when each client
  connection of the process waits on it (`clients`; the reads' job says
  how many answers it holds: `reads_joined`): no client is left to send
  a request during the sync, the reactor would only wait for the
  helper's answer, and the round trip cost more than the sync
  (bench/README.md, "A batch every client waits on: synced in place").
  Without a `syncer` (unit tests) the reactor syncs every batch itself.

Work that must follow the commit (publishing an audit record, remembering
a row version) is registered with `Transaction.after_commit`, and runs
when the batch commits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

from kmip_core.nonblocking import Work, WouldBlock
from kms_server.storage import log_sync
from kms_server.storage.base import ReactorBatches, StorageError, UnsyncedCommit

__all__ = ["BURST_MAX", "ReactorWrites", "SyncProcess"]

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
        syncer: Callable[[UnsyncedCommit], defer.Deferred[StorageError | None]] | None = None,
        clients: Callable[[], int] | None = None,
    ):
        self._batches = batches
        self._reactor = reactor
        self._run_in_thread = run_in_thread
        # What syncs committed batches' logs while the reactor goes on (the
        # node's SyncProcess); None: the reactor thread, at the commit.
        self._syncer = syncer
        # The committed batch whose sync runs (no batch opens meanwhile:
        # `_schedule`).
        self._syncing: _Pending | None = None
        # Whether the queued jobs hold reads' records (`when_free(reads=)`):
        # only such a batch is synced by the syncer. A batch of writes
        # alone is synced by the reactor thread: their writers wait for it,
        # and the reactor has little else to do meanwhile, so handing the
        # sync over would only add its round trip (bench/README.md).
        self._reads_queued = False
        # How many client connections this process has (the node's
        # KmipFactory.connections), or None: every reads' batch goes to
        # the syncer. And the answers that wait on the open batch beyond
        # one per member (`reads_joined`).
        self._clients = clients
        self._extra_answers = 0
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

    @property
    def unsynced(self) -> int:
        """Committed batches whose sync has not ended, 0 or 1 (tests,
        diagnostics)."""
        return 0 if self._syncing is None else 1

    def committed(self) -> defer.Deferred[None]:
        """Fires once the open batch is committed and durable (with no
        batch open: once the batch whose sync runs is); fails with
        StorageError if its commit or its sync fails."""
        d: defer.Deferred[None] = defer.Deferred()
        if self._batches.reactor_batch_open:
            self._waiters.append(d)
        elif self._syncing is not None:
            self._syncing.waiters.append(d)
        else:
            d.callback(None)  # nothing committed here waits for the disk
        return d

    def when_free(self, job: Callable[[], T | defer.Deferred[T]], reads: bool = False) -> defer.Deferred[T]:
        """Run `job()` in the reactor thread in the next batch: at the end
        of this reactor turn, or once a pool thread has the writer's turn;
        fires with its result (or with what the Deferred it returns fires
        with). `reads`: the job writes the audit records of reads, whose
        batch is then synced by the `syncer` while the reactor goes on
        (more reads are likely to come meanwhile)."""
        if reads:
            self._reads_queued = True
        return self._queue(job)

    def reads_joined(self, answers: int) -> None:
        """In a batch, from a job queued with `reads` (one write
        transaction, a member): `answers` reads' answers wait on this
        batch. The batch is synced by the syncer only if more clients are
        connected than answers wait on it (`clients`)."""
        self._extra_answers += answers - 1  # the job itself is one member

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
        if self._burst_call is None and not self._acquiring and self._syncing is None:
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
        background, self._reads_queued = self._reads_queued, False
        self._extra_answers = 0
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
        ended = self._batches.end_reactor_batch()
        self.commits += 1
        if ended is None or isinstance(ended, StorageError):
            self._ended(members, ended, waiters)
        elif self._syncer is None or not background or not self._others_may_send(members):
            error = ended.sync()
            if error is None:
                ended.durable()
            self._ended(members, error, waiters)
        else:
            assert self._syncing is None  # no batch opens while a sync runs (_schedule)
            self._syncing = _Pending(ended, members, waiters)
            self._syncer(ended).addBoth(self._synced)
        if self._queued:
            # Beyond BURST_MAX (the reads' job may be among them), or
            # queued by what the commit's answers set off.
            self._reads_queued = self._reads_queued or background
            self._schedule()

    def _others_may_send(self, members: int) -> bool:
        """Whether more clients are connected than answers wait on the
        batch just committed (its reads', and one per write transaction
        but the reads' jobs): one of them may send a request, which the
        reactor serves while the syncer syncs. (Each connection's requests
        are answered in order, so a connection has at most one answer
        waiting; one with a request still on the pool counts as free.)"""
        if self._clients is None:
            return True
        return self._clients() > members + self._extra_answers

    def _synced(self, outcome: StorageError | Failure | None) -> None:
        """A sync ended: its batches' answers go, and the writes queued
        meanwhile run in the next batch."""
        pending, self._syncing = self._syncing, None
        assert pending is not None  # set with the sync (_run_and_commit)
        if isinstance(outcome, Failure):
            log.error("syncing the write-ahead log failed: %s", outcome.getTraceback())
            error: StorageError | None = StorageError(f"the log could not be synced: {outcome.getErrorMessage()}")
        else:
            error = outcome
        if error is None:
            pending.commit.durable()
        self._ended(pending.members, error, pending.waiters)
        if self._queued:
            self._schedule()

    def _ended(self, members: int, error: StorageError | None, waiters: list[defer.Deferred[None]]) -> None:
        """A batch's outcome, known: counted, and its answers told."""
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


class SyncProcess:
    """The process that syncs a node process's reactor batches to disk
    (`ReactorWrites(syncer=...)`; kms_server/storage/log_sync.py runs in
    it): called with a committed batch, it sends the helper the database's
    path and returns a Deferred that fires in the reactor thread, once the
    helper has answered, with the batch's outcome (`UnsyncedCommit.settle`).
    The reactor thread reads the answers as it reads sockets.

    The helper starts with `start()` (the node's start), or else with the
    first sync, and again after it has exited (killed, say): the syncs it had not answered are reported as of
    unknown outcome, and the next sync, by the new helper, covers their
    frames too. If no helper can be started, the reactor thread syncs
    itself, as it did before the helper (logged once)."""

    def __init__(self, reactor: Any, command: list[str] | None = None) -> None:
        self._reactor = reactor
        # Run by path, isolated: the helper imports the standard library only.
        self._command = command or [sys.executable, "-I", "-S", log_sync.__file__]
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending: list[tuple[UnsyncedCommit, defer.Deferred[StorageError | None]]] = []
        self._buffer = b""
        self._reader: _Replies | None = None
        self._failed_to_start = False
        self.started = 0  # helpers started (tests, diagnostics)

    @property
    def pid(self) -> int | None:
        """The helper's process id while it runs (tests, diagnostics)."""
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the helper now, so that the first batch does not wait for
        it (a helper that cannot start is logged; its syncs stay here)."""
        if self._proc is None:
            self._start()

    def __call__(self, commit: UnsyncedCommit) -> defer.Deferred[StorageError | None]:
        if self._proc is None and not self._start():
            return defer.succeed(commit.sync())  # no helper: the reactor thread syncs
        assert self._proc is not None and self._proc.stdin is not None  # started above
        d: defer.Deferred[StorageError | None] = defer.Deferred()
        self._pending.append((commit, d))
        try:
            os.write(self._proc.stdin.fileno(), log_sync.request(commit.database))
        except OSError:
            self._lost("the log's sync process exited")
        return d

    def stop(self, timeout: float = 10.0) -> None:
        """Close the helper's input and wait for it to exit (the syncs it
        has not answered are reported lost)."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        self._stop_reading()
        assert proc.stdin is not None and proc.stdout is not None  # both piped (_start)
        proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        self._fail_pending("the node process stopped before the log's sync was answered")

    def _start(self) -> bool:
        try:
            proc = subprocess.Popen(
                self._command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, cwd="/"
            )
        except OSError as exc:
            if not self._failed_to_start:
                log.error("the log's sync process could not start (%s): the reactor thread syncs instead", exc)
                self._failed_to_start = True
            return False
        assert proc.stdout is not None  # piped
        os.set_blocking(proc.stdout.fileno(), False)
        self._proc, self._buffer = proc, b""
        self._reader = _Replies(proc.stdout.fileno(), self._read)
        self._reactor.addReader(self._reader)
        self.started += 1
        return True

    def _read(self) -> None:
        """The helper's answers that have come (the reactor found them)."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            return
        ended = False
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except BlockingIOError:
                break
            except OSError:
                chunk = b""
            if not chunk:
                ended = True  # after the answers read before it
                break
            self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            if not self._pending:
                log.error("an answer of the log's sync process that nothing asked for: %r", line[:80])
                continue
            commit, d = self._pending.pop(0)
            try:
                error = log_sync.outcome(line)
            except ValueError as exc:
                d.callback(commit.lost(str(exc)))
            else:
                d.callback(commit.settle(error))
        if ended:
            self._lost("the log's sync process exited")

    def _lost(self, why: str) -> None:
        proc, self._proc = self._proc, None
        self._stop_reading()
        if proc is not None:
            log.error("%s (status %s): the syncs it had not answered are of unknown outcome", why, proc.poll())
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(1)
        self._fail_pending(why)

    def _fail_pending(self, why: str) -> None:
        pending, self._pending = self._pending, []
        for commit, d in pending:
            d.callback(commit.lost(why))

    def _stop_reading(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            self._reactor.removeReader(reader)


class _Replies:
    """The read end of the sync process's answers, for the reactor."""

    def __init__(self, fd: int, on_read: Callable[[], None]) -> None:
        self._fd = fd
        self._on_read = on_read

    def fileno(self) -> int:
        return self._fd

    def doRead(self) -> None:
        self._on_read()

    def connectionLost(self, reason: object) -> None:
        pass

    def logPrefix(self) -> str:
        return "kms-log-sync"


class _Pending:
    """A committed batch waiting for its sync (ReactorWrites)."""

    __slots__ = ("commit", "members", "waiters")

    def __init__(self, commit: UnsyncedCommit, members: int, waiters: list[defer.Deferred[None]]) -> None:
        self.commit = commit
        self.members = members
        self.waiters = waiters


def _fire(d: defer.Deferred[Any], result: Any) -> None:
    """`d` fires with a job's result, or with what the Deferred it
    returned fires with."""
    if isinstance(result, defer.Deferred):
        result.chainDeferred(d)
    else:
        d.callback(result)
