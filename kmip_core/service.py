"""Running a Twisted service tree until the process is told to stop.

Both `kms-server` and `vtpm-broker run` start their root service this way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["run_service"]


def run_service(
    root: Any,
    reactor: Any,
    describe: Callable[[Exception], str],
    started: Callable[[], None] | None = None,
    start_failed: Callable[[str], None] | None = None,
) -> str | None:
    """Start `root` once the reactor runs, stop it at shutdown, and run the
    reactor until then. Returns `describe(exc)` of a failed start (the
    reactor is stopped at once), or None after an orderly stop. `started`
    is called once the service runs, `start_failed` with the reason when it
    could not start (a worker tells its supervisor: kmip_core.workers)."""
    failed: list[str] = []

    def start() -> None:
        try:
            root.startService()
        except Exception as exc:
            failed.append(describe(exc))
            if start_failed is not None:
                start_failed(failed[0])
            reactor.stop()
            return
        if started is not None:
            started()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return failed[0] if failed else None
