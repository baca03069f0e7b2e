"""Many command-line runs, concurrently, without paying Python's start-up each time.

A drill of 100 VMs runs some 400 `vtpm-host` commands. Started with
`subprocess`, each would spend most of its time importing (`vtpm-host` needs
the KMIP client, about half a second of CPU), so the drill keeps a pool of
worker processes that have imported the tools once; each command then runs
in a fresh process forked from a worker. That process runs exactly the
tool's `main(argv)` with its own stdout and stderr, and exits: whatever it
held (a DEK for the length of a power-on) dies with it, as with the real
command, and swtpm started by `vtpm-host power-on` outlives it the same way.

The pool is a `multiprocessing.Pool` with the fork start method, made before
the drill starts any thread, and its workers are single-threaded, so their
forks are safe.
"""

from __future__ import annotations

import gc
import importlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from broker.drill.processes import TOOLS, checked

__all__ = ["ToolPool", "run_forked"]

# What the workers import once, before any command (the tools' heavy imports).
PRELOAD = (
    "broker.host.cli",
    "broker.host.agent",
    "broker.host.broker_client",
    "kmip_core.client",
    "broker.mgmt.cli",
    "broker.cli",
    "kms_server.admin.cli",
    "broker.drill.guest",
)


def _preload() -> None:
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass  # The command will say what is missing when it runs.
    # Every command runs in a fork of this worker: freezing what the imports
    # made keeps the children's garbage collections from walking (and
    # copy-on-write faulting) the whole inherited heap (gc.freeze's docs).
    gc.collect()
    gc.freeze()


def run_forked(tool: str, *args: str | os.PathLike[str], timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run `tool`'s main(argv) in a forked child; its exit status, stdout and
    stderr. A child still running after `timeout` seconds is killed (exit
    status -9, and a line on stderr saying so)."""
    module = importlib.import_module(TOOLS[tool])
    argv = [str(a) for a in args]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # The child: the command, then _exit (no cleanup of the parent's state).
            status = 70
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                # The streams the parent had may not be fds 1 and 2 (a test's capture).
                sys.stdout = open(1, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
                sys.argv = [tool, *argv]
                status = module.main(argv)
                status = status if isinstance(status, int) else 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(status)
        code = _wait(pid, timeout)
        out.seek(0)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
        if code == -signal.SIGKILL:
            stderr += f"{tool}: killed by the drill after {timeout:g} s\n"
        return subprocess.CompletedProcess([tool, *argv], code, out.read().decode("utf-8", "replace"), stderr)


def _wait(pid: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        done, wait_status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(wait_status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            _, wait_status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(wait_status)
        time.sleep(delay)
        delay = min(delay * 2, 0.02)


class ToolPool:
    """Worker processes that run jobs (module-level functions) concurrently.

    The tools are imported here, once, before the workers are forked: the
    workers share those pages instead of each importing them again.
    """

    def __init__(self, processes: int):
        _preload()
        context = multiprocessing.get_context("fork")
        self._pool = context.Pool(processes=processes)

    def run(
        self, tool: str, *args: str | os.PathLike[str], check: bool = True, timeout: float = 300.0
    ) -> subprocess.CompletedProcess:
        """One command, forked from a worker (never from this process, which
        may have threads); StepFailed if it fails and `check`."""
        return checked(self._pool.apply(run_forked, (tool, *args), {"timeout": timeout}), check)

    def map(self, function: Callable[[Any], Any], jobs: Iterable[Any]) -> Iterator[Any]:
        """Results as they finish (not in order)."""
        return self._pool.imap_unordered(function, list(jobs))

    def close(self) -> None:
        self._pool.terminate()
        self._pool.join()

    def __enter__(self) -> ToolPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
