"""kmip_core.service.run_service: start, stop, and the heap it leaves to
the collector once started."""

from __future__ import annotations

import gc

import pytest

from kmip_core.service import run_service


class _Reactor:
    """Runs what waits for the reactor to run, then returns (a stand-in:
    run_service's own steps are what is tested)."""

    def __init__(self) -> None:
        self.when_running: list = []
        self.triggers: list = []
        self.stopped = False

    def callWhenRunning(self, f) -> None:  # noqa: N802 - Twisted's name
        self.when_running.append(f)

    def addSystemEventTrigger(self, phase, event, f) -> None:  # noqa: N802
        self.triggers.append((phase, event, f))

    def run(self) -> None:
        for f in self.when_running:
            f()

    def stop(self) -> None:
        self.stopped = True


class _Root:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.frozen_at_start: int | None = None

    def startService(self) -> None:  # noqa: N802
        self.frozen_at_start = gc.get_freeze_count()
        if self.fail:
            raise RuntimeError("port taken")

    def stopService(self) -> None:  # noqa: N802
        pass


@pytest.fixture
def unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()  # the test process's heap goes back to the collector


def test_a_started_service_leaves_its_start_up_objects_out_of_full_collections(unfrozen):
    root, reactor, seen = _Root(), _Reactor(), []
    start_up_object = {"kept": ["by start-up"]}
    assert run_service(root, reactor, str, started=lambda: seen.append(gc.get_freeze_count())) is None
    assert root.frozen_at_start == 0  # frozen after the service started, not before
    assert seen and seen[0] > 0  # frozen before the supervisor is told it runs
    assert not any(o is start_up_object for o in gc.get_objects())  # out of every generation
    assert reactor.triggers == [("before", "shutdown", root.stopService)]


def test_a_service_that_fails_to_start_is_not_settled(unfrozen):
    root, reactor, failed = _Root(fail=True), _Reactor(), []
    assert run_service(root, reactor, lambda e: f"could not start: {e}", start_failed=failed.append) == (
        "could not start: port taken"
    )
    assert failed == ["could not start: port taken"] and reactor.stopped
    assert gc.get_freeze_count() == 0
