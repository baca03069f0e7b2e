"""In-memory stand-ins for the parts of Twisted the wire tests drive
(tests/CONVENTIONS: a fake clock and in-memory transports, never the global
reactor or real time).

Used by tests/kms_server/wire/test_protocol.py, tests/broker/test_gateway.py
and the fuzz tests in tests/fuzz/.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

# What TLSStringTransport answers as the peer's certificate.
PEER_CERTIFICATE = object()


class FakeReactor(Clock):
    """A Clock that also runs callFromThread calls at once."""

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


def _run_job(on_result, f, args, kwargs) -> None:
    """Run one job and hand its result (or its Failure) on, as ThreadPool does."""
    try:
        result = f(*args, **kwargs)
    except Exception:  # noqa: BLE001 - handed on, as ThreadPool does
        on_result(False, Failure())
    else:
        on_result(True, result)


class InlineThreadPool:
    """Runs each job at once, in the caller's thread."""

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        _run_job(on_result, f, args, kwargs)


class ManualThreadPool:
    """Queues jobs; the test decides when each one runs (and so when its
    result reaches the reactor). With auto=True jobs run at submission."""

    def __init__(self, auto: bool = False):
        self.auto = auto
        self.jobs: deque = deque()

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs.append((on_result, f, args, kwargs))
        if self.auto:
            self.run_all()

    def run_next(self):
        _run_job(*self.jobs.popleft())

    def run_all(self):
        while self.jobs:
            self.run_next()


class TLSStringTransport(StringTransport):
    """A StringTransport with a peer certificate, as after a TLS handshake."""

    def getPeerCertificate(self):
        return PEER_CERTIFICATE
