"""Several worker processes on one port (docs/process-model.md).

One Python process runs on one core at a time. A node that should use every
core runs one *supervisor* and N *workers*:

- the supervisor binds one listening socket (`bind_listener`), keeps it,
  starts every worker with it inherited (``pass_fds``), and waits for each
  to report that it is ready (or why it could not start) on a pipe of its
  own;
- every worker runs its own reactor and accepts on that socket, taking
  turns by load (`LoadTable`, `AcceptTurns`): each publishes how many
  connections it holds, and a worker holding more than another lets a new
  connection wait a moment for the other to take it. A client with two
  connections has one on each worker, which a kernel hash of the
  addresses (SO_REUSEPORT, the first design) gave only half the time;
- SIGTERM/SIGINT to the supervisor are passed to every worker, which drains
  its requests in flight and exits; SIGHUP is passed on (TLS reload);
- a worker that dies on its own is started again (at most `MAX_RESTARTS` in
  `RESTART_WINDOW` seconds; beyond that the supervisor stops them all and
  fails); a worker whose supervisor dies is told to stop (PR_SET_PDEATHSIG).

Workers know they are workers from the environment: `WORKER_ENV` holds
``index:count:listen_fd:ready_fd:load_fd``. Nothing here knows what the
workers serve: `kms-server` (kms_server.cli) uses it; any service could.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

__all__ = [
    "ACCEPT_POLL",
    "ACCEPT_WAIT",
    "MAX_RESTARTS",
    "RESTART_WINDOW",
    "WORKER_ENV",
    "AcceptTurns",
    "LoadTable",
    "StartFailed",
    "Supervisor",
    "WorkerSlot",
    "adopt_tls_port",
    "bind_listener",
    "report_failed",
    "report_ready",
    "stop_with_parent",
    "worker_argv",
    "worker_slot",
]

WORKER_ENV = "KMIP_CORE_WORKER"
MAX_RESTARTS = 5
RESTART_WINDOW = 60.0
READY_TIMEOUT = 120.0

log = logging.getLogger("kmip_core.workers")


class StartFailed(Exception):
    """A worker could not start; the message is the worker's own one line."""


@dataclass(frozen=True)
class WorkerSlot:
    """Who this worker is: its index (0 is the primary, which also runs the
    node's singletons), the count, the inherited listening socket and the
    pipe it reports readiness on."""

    index: int
    count: int
    listen_fd: int
    ready_fd: int
    # The workers' load table (`LoadTable`), shared memory.
    load_fd: int

    @property
    def primary(self) -> bool:
        return self.index == 0

    def load_table(self) -> LoadTable:
        return LoadTable(self.load_fd, self.count)


def worker_slot(environ: dict[str, str] | None = None) -> WorkerSlot | None:
    """This process's slot when a supervisor started it, else None."""
    value = (os.environ if environ is None else environ).get(WORKER_ENV)
    if not value:
        return None
    index, count, listen_fd, ready_fd, load_fd = (int(part) for part in value.split(":"))
    return WorkerSlot(index, count, listen_fd, ready_fd, load_fd)


# A worker holding more connections than another lets a new one wait for
# the other to take it: it looks again every ACCEPT_POLL seconds, reads the
# socket again as soon as the workers' total moved (the other took it), and
# takes it itself after ACCEPT_WAIT seconds without a change (the other is
# busy or stopped: a connection never waits longer than that).
ACCEPT_POLL = 0.002
ACCEPT_WAIT = 0.1

_SLOT = struct.Struct("q")


class LoadTable:
    """The connections each worker holds, one 8-byte slot per worker in
    memory the supervisor makes (a memfd) and every worker maps: written
    by its own worker only, read by all (a slot is written whole, so a
    reader sees the old count or the new one)."""

    def __init__(self, fd: int, count: int):
        self.count = count
        self.fd = fd
        self._map = mmap.mmap(fd, count * _SLOT.size)

    @classmethod
    def create(cls, count: int) -> LoadTable:
        fd = os.memfd_create("kmip-workers-load")
        os.ftruncate(fd, count * _SLOT.size)
        return cls(fd, count)

    def set(self, index: int, connections: int) -> None:
        _SLOT.pack_into(self._map, index * _SLOT.size, connections)

    def get(self, index: int) -> int:
        return int(_SLOT.unpack_from(self._map, index * _SLOT.size)[0])

    def total(self) -> int:
        return sum(self.get(i) for i in range(self.count))

    def fewest_elsewhere(self, index: int) -> int | None:
        """The fewest connections another worker holds (None: no other)."""
        others = [self.get(i) for i in range(self.count) if i != index]
        return min(others) if others else None

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class AcceptTurns:
    """A worker's turns at the listening socket all workers share. On a new
    connection, a worker holding more connections than another stops
    reading the socket and looks again every `ACCEPT_POLL` seconds: once the
    workers' total has moved (the other took it) it reads again, and after
    `ACCEPT_WAIT` seconds without a move it takes the connection itself. A
    worker holding no more than any other accepts at once, one connection
    per readiness, so that a burst is shared rather than taken whole by the
    first worker to wake.

    `port` is a Twisted listening port (its doRead is wrapped), `table`
    the workers' `LoadTable`, `reactor` has callLater and seconds."""

    def __init__(self, port: Any, table: LoadTable, index: int, reactor: Any):
        self.port = port
        self.table = table
        self.index = index
        self.reactor = reactor
        self.waited = False  # the next readiness is taken, whatever the load
        self._accept = port.doRead
        port.doRead = self.doRead

    def doRead(self) -> Any:
        fewest = self.table.fewest_elsewhere(self.index)
        if not self.waited and fewest is not None and self.table.get(self.index) > fewest:
            self.port.stopReading()
            self._look(self.table.total(), self.reactor.seconds() + ACCEPT_WAIT)
            return None
        self.waited = False
        self.port.numberAccepts = 1
        return self._accept()

    def _look(self, total: int, deadline: float) -> None:
        self.reactor.callLater(ACCEPT_POLL, self._again, total, deadline)

    def _again(self, total: int, deadline: float) -> None:
        if not self.port.connected or getattr(self.port, "disconnecting", False):
            return  # stopped listening meanwhile
        if self.table.total() == total:
            if self.reactor.seconds() < deadline:
                self._look(total, deadline)
                return
            self.waited = True  # nobody took it: this worker does
        self.port.startReading()


def adopt_tls_port(reactor: Any, slot: WorkerSlot, context_factory: Any, listener: Any) -> tuple[Any, AcceptTurns]:
    """In a worker: listen on the socket its supervisor bound, wrapped in
    TLS as Twisted's listenSSL wraps a socket of its own, and take turns at
    it with the other workers by load. `listener` is the protocol factory;
    its `on_count(connections)` (kmip_core.limits.LimitedFactory's) is set
    to publish the worker's open connections. Returns the listening port
    and its `AcceptTurns`."""
    from twisted.protocols.tls import TLSMemoryBIOFactory

    probe = socket.socket(fileno=os.dup(slot.listen_fd))
    try:
        family = probe.family
    finally:
        probe.close()
    port = reactor.adoptStreamPort(slot.listen_fd, family, TLSMemoryBIOFactory(context_factory, False, listener))
    table, index = slot.load_table(), slot.index
    listener.on_count = lambda connections: table.set(index, connections)
    return port, AcceptTurns(port, table, index, reactor)


def bind_listener(host: str, port: int, backlog: int = 1024) -> socket.socket:
    """The node's listening TCP socket, which every worker inherits and
    accepts on (`AcceptTurns`). OSError if the address is taken (by another
    server, another kms-server included: no SO_REUSEPORT)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        # Twisted's adoptStreamPort wants it non-blocking (its accept loop
        # would hang on a blocking one).
        sock.setblocking(False)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def report_ready(slot: WorkerSlot, announcements: Sequence[str] = ()) -> None:
    """Tell the supervisor this worker serves; `announcements` are the lines
    it would have printed (the supervisor prints them after its own)."""
    _report(slot, "".join(f"announce {' '.join(text.split())}\n" for text in announcements) + "ready")


def report_failed(slot: WorkerSlot, message: str) -> None:
    _report(slot, "failed " + " ".join(message.split()))


def _report(slot: WorkerSlot, line: str) -> None:
    try:
        os.write(slot.ready_fd, (line + "\n").encode("utf-8", "replace"))
        os.close(slot.ready_fd)
    except OSError:
        pass  # The supervisor is gone; PR_SET_PDEATHSIG stops us.


def stop_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `sig` to this process when its parent dies, so
    that no worker outlives a supervisor killed with SIGKILL (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # The parent died before the call.
        os.kill(os.getpid(), sig)


class _Worker:
    def __init__(self, index: int):
        self.index = index
        self.process: subprocess.Popen | None = None
        self.ready_read: int | None = None


class Supervisor:
    """Start `count` workers running `argv`, each with `listener` inherited
    and the workers' `LoadTable`; run until told to stop. The supervisor
    keeps the socket open, so connections wait on it while a worker is
    started again."""

    def __init__(
        self,
        argv: Sequence[str],
        listener: socket.socket,
        count: int,
        *,
        name: str = "worker",
        env: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.argv = list(argv)
        self.listener = listener
        self.count = count
        self.name = name
        self.env = dict(os.environ if env is None else env)
        self.clock = clock
        self.workers = [_Worker(i) for i in range(self.count)]
        self.load = LoadTable.create(count)
        self.stopping = False
        self.restarts: list[float] = []

    # Starting.
    def _spawn(self, worker: _Worker) -> None:
        # A worker started again holds nothing yet (its predecessor's
        # connections died with it).
        self.load.set(worker.index, 0)
        read_fd, write_fd = os.pipe()
        env = dict(self.env)
        listen_fd = self.listener.fileno()
        env[WORKER_ENV] = f"{worker.index}:{self.count}:{listen_fd}:{write_fd}:{self.load.fd}"
        try:
            worker.process = subprocess.Popen(
                self.argv, env=env, pass_fds=(listen_fd, write_fd, self.load.fd), close_fds=True
            )
        finally:
            os.close(write_fd)
        worker.ready_read = read_fd

    def _await_ready(self, worker: _Worker, deadline: float) -> list[str]:
        """Block until `worker` reports; its announcements, or StartFailed
        with its reason if it could not start."""
        assert worker.ready_read is not None and worker.process is not None
        chunks = []
        while True:
            left = deadline - self.clock()
            if left <= 0:
                raise StartFailed(f"{self.name} {worker.index} did not start within {READY_TIMEOUT:.0f} s")
            readable, _, _ = select.select([worker.ready_read], [], [], min(left, 1.0))
            if not readable:
                if worker.process.poll() is not None:
                    break
                continue
            data = os.read(worker.ready_read, 4096)
            if not data:
                break
            chunks.append(data)
            text = b"".join(chunks)
            if text.endswith(b"\n") and text.rstrip(b"\n").rsplit(b"\n", 1)[-1].startswith((b"ready", b"failed ")):
                break
        os.close(worker.ready_read)
        worker.ready_read = None
        lines = b"".join(chunks).decode("utf-8", "replace").splitlines()
        last = lines[-1].strip() if lines else ""
        if last == "ready":
            return [line[len("announce ") :] for line in lines[:-1] if line.startswith("announce ")]
        if last.startswith("failed "):
            raise StartFailed(last[len("failed ") :])
        code = worker.process.wait()
        raise StartFailed(f"{self.name} {worker.index} exited with status {code} before it was ready")

    def start(self) -> list[str]:
        """Start every worker and wait until all are ready: their
        announcements, in worker order. On a failure the others are stopped
        and StartFailed says why."""
        deadline = self.clock() + READY_TIMEOUT
        announcements: list[str] = []
        try:
            # Worker 0 first, alone: it does what a first start writes (the
            # schema migrations on SQLite, the keyring, the store digest),
            # and the others then open a ready database. Started together,
            # they queued behind its migration transaction, which on a
            # loaded host outlasted SQLite's 10 s busy timeout ("database is
            # locked" at start).
            first, *others = self.workers
            self._spawn(first)
            announcements += self._await_ready(first, deadline)
            for worker in others:
                self._spawn(worker)
            for worker in others:
                announcements += self._await_ready(worker, deadline)
        except BaseException:
            self.stopping = True
            self._signal_all(signal.SIGTERM)
            self._reap_all()
            raise
        return announcements

    # Running.
    def run(self) -> int:
        """Wait for the workers; 0 after an orderly stop, 1 when a worker
        kept dying."""
        failed = False
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        }
        try:
            while any(w.process is not None for w in self.workers):
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    break
                worker = next((w for w in self.workers if w.process is not None and w.process.pid == pid), None)
                if worker is None:
                    continue
                code = os.waitstatus_to_exitcode(status)
                assert worker.process is not None  # found by its process's pid above
                worker.process.returncode = code
                worker.process = None
                if self.stopping:
                    continue
                log.error("%s %d exited with status %s; starting it again", self.name, worker.index, code)
                now = self.clock()
                self.restarts = [t for t in self.restarts if now - t < RESTART_WINDOW] + [now]
                if len(self.restarts) > MAX_RESTARTS:
                    log.critical(
                        "%s processes exited %d times in %.0f s; stopping the node",
                        self.name,
                        len(self.restarts),
                        RESTART_WINDOW,
                    )
                    failed = True
                    self.stopping = True
                    self._signal_all(signal.SIGTERM)
                    continue
                try:
                    self._spawn(worker)
                    self._await_ready(worker, self.clock() + READY_TIMEOUT)
                except StartFailed as exc:
                    log.error("%s %d could not start again: %s", self.name, worker.index, exc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self.listener.close()
            self.load.close()
        return 1 if failed else 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self._signal_all(signal.SIGHUP)
            return
        self.stopping = True
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        # os.kill, not Popen.send_signal: that one polls, and a child it
        # reaped would never reach the wait loop (nor be started again).
        # An unreaped child keeps its pid, so the pid is still this worker's.
        for worker in self.workers:
            if worker.process is not None:
                try:
                    os.kill(worker.process.pid, sig)
                except ProcessLookupError:
                    pass

    def _reap_all(self) -> None:
        for worker in self.workers:
            if worker.process is not None:
                try:
                    worker.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    worker.process.kill()
                    worker.process.wait()
                worker.process = None
            if worker.ready_read is not None:
                os.close(worker.ready_read)
                worker.ready_read = None


def worker_argv() -> list[str]:
    """The command line of this very program, to start a worker with."""
    return [sys.executable, *sys.orig_argv[1:]] if getattr(sys, "orig_argv", None) else [sys.executable, *sys.argv]
