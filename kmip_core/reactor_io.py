"""Reads that wait for their database in the reactor thread, not on a pool
thread.

On PostgreSQL every statement is a round trip. A request handed to the
thread pool for it pays two hand-offs between threads and a wake of the
reactor, and passes the GIL back and forth: on a node under Get load, more
CPU than the read's own statements (issue 15). `ReactorReads` runs such a
read in the reactor thread instead, as a `kmip_core.nonblocking.Work` (a
greenlet) made with ``writer=False``: where its statement waits for the
server's answer (`nonblocking.wait_fd`, called by the database driver's
wait), the work is suspended, the reactor watches the connection's socket
and serves others meanwhile, and resumes the work once the socket is
ready. Several reads thus wait at once, each on its own connection.

A read that would block otherwise (no connection at hand, a retry's sleep,
a write) raises WouldBlock there, before it has changed anything, and its
caller runs it again on the pool, as for any work of `in_reactor()`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from kmip_core.nonblocking import Work

__all__ = ["ReactorReads"]

_READ, _WRITE = 1, 2


class ReactorReads:
    """Runs work in the reactor thread that may wait for sockets. Every
    method is called in the reactor thread; `reactor` provides addReader,
    addWriter, removeReader and removeWriter."""

    def __init__(self, reactor: Any):
        self._reactor = reactor
        # Works suspended now, each on its socket (tests, diagnostics).
        self.waiting = 0

    def start(self, job: Callable[[], Any]) -> Any:
        """Run `job()` now, as a `Work` (``writer=False``). Its result if it
        ended without waiting (what it raises is raised), else a Deferred
        that fires with its result or fails with what it raised."""
        work = Work(job, writer=False)
        if work.step():
            return work.result
        d: defer.Deferred[Any] = defer.Deferred()
        self._watch(work, d)
        return d

    def _watch(self, work: Work, d: defer.Deferred[Any]) -> None:
        if work.io is None:
            # A work made here waits only in wait_fd (writer_turn raises in
            # it): anything else is a bug, reported where the caller waits.
            d.errback(Failure(RuntimeError("a reactor read waited for something other than a socket")))
            return
        fileno, events = work.io
        self.waiting += 1
        _SocketWait(self, work, d, fileno, events).register()

    def _resume(self, work: Work, d: defer.Deferred[Any], ready: int) -> None:
        self.waiting -= 1
        try:
            ended = work.step(ready)
        except BaseException:
            d.errback(Failure())
            return
        if ended:
            d.callback(work.result)
        else:
            self._watch(work, d)


class _SocketWait:
    """One wait of a work for its socket, as the reactor's read and/or
    write descriptor (fileno, doRead, doWrite, connectionLost, logPrefix):
    on the first event it is removed, and the work resumed with what the
    socket is ready for."""

    __slots__ = ("_d", "_events", "_fileno", "_reads", "_work")

    def __init__(self, reads: ReactorReads, work: Work, d: defer.Deferred[Any], fileno: int, events: int):
        self._reads, self._d = reads, d
        self._work: Work | None = work
        self._fileno, self._events = fileno, events

    def register(self) -> None:
        reactor = self._reads._reactor
        if self._events & _READ:
            reactor.addReader(self)
        if self._events & _WRITE:
            reactor.addWriter(self)

    def fileno(self) -> int:
        return self._fileno

    def logPrefix(self) -> str:
        return "database-wait"

    def doRead(self) -> None:
        self._ready(_READ)

    def doWrite(self) -> None:
        self._ready(_WRITE)

    def connectionLost(self, reason: Failure) -> None:
        # The reactor dropped the descriptor (its socket closed or failed):
        # the driver reads the socket and reports the error.
        self._ready(_READ)

    def _ready(self, ready: int) -> None:
        work, self._work = self._work, None
        if work is None:
            return  # resumed already (an event on both directions)
        reactor = self._reads._reactor
        if self._events & _READ:
            reactor.removeReader(self)
        if self._events & _WRITE:
            reactor.removeWriter(self)
        self._reads._resume(work, self._d, ready)
