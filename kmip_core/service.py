"""Running a Twisted service tree until the process is told to stop.

Both `kms-server` and `vtpm-broker run` start their root service this way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["run_service"]


def run_service(root: Any, reactor: Any, describe: Callable[[Exception], str]) -> str | None:
    """Start `root` once the reactor runs, stop it at shutdown, and run the
    reactor until then. Returns `describe(exc)` of a failed start (the
    reactor is stopped at once), or None after an orderly stop."""
    failed: list[str] = []

    def start():
        try:
            root.startService()
        except Exception as exc:
            failed.append(describe(exc))
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return failed[0] if failed else None
