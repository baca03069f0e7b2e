"""Running a Twisted service tree until the process is told to stop.

Both `kms-server` and `vtpm-broker run` start their root service this way.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import Any

__all__ = ["run_service", "settle_heap"]


def settle_heap() -> None:
    """Collect what start-up left behind, then move every object alive now
    (modules, configuration, schema, TLS contexts: about 110,000 in a
    kms-server worker) to the collector's permanent generation, which its
    full collections never scan again. A full collection walks every
    tracked object and holds the GIL while it does: over start-up's objects
    it took 30-60 ms, the longest stall a request met (issue 15: with this
    and the verified rows kept untracked, the cycle's p99 at 16
    connections fell from 49-53 to 17-18 ms in bench/README.md's pairs). Objects
    frozen here are still freed when their last reference goes; only a
    reference cycle among them would never be collected, and start-up's
    objects live as long as the process."""
    gc.collect()
    gc.freeze()


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
        settle_heap()
        if started is not None:
            started()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", root.stopService)
    reactor.run()
    return failed[0] if failed else None
