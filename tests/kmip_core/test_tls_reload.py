"""reload_on_sighup: SIGHUP re-reads a listener's TLS material in the
reactor thread; a failed reload keeps the old material and is logged."""

from __future__ import annotations

import logging
import os
import signal

import pytest

from kmip_core.tls import reload_on_sighup


class Reactor:
    def callFromThread(self, fn, *args):
        fn(*args)


class Factory:
    def __init__(self, fail=False):
        self.fail = fail
        self.reloads = 0

    def reload(self):
        self.reloads += 1
        if self.fail:
            raise ValueError("server.key does not match server.pem")


@pytest.fixture
def restore_sighup():
    previous = signal.getsignal(signal.SIGHUP)
    yield
    signal.signal(signal.SIGHUP, previous)


def test_sighup_reloads_and_logs(restore_sighup, caplog):
    factory = Factory()
    log = logging.getLogger("test.tls")
    reload = reload_on_sighup(Reactor(), factory, log)
    with caplog.at_level(logging.INFO, logger="test.tls"):
        os.kill(os.getpid(), signal.SIGHUP)
    assert factory.reloads == 1 and "TLS material reloaded" in caplog.text
    reload()
    assert factory.reloads == 2


def test_a_failed_reload_is_logged_and_does_not_raise(restore_sighup, caplog):
    factory = Factory(fail=True)
    reload = reload_on_sighup(Reactor(), factory, logging.getLogger("test.tls"))
    with caplog.at_level(logging.ERROR, logger="test.tls"):
        reload()
        os.kill(os.getpid(), signal.SIGHUP)
    assert factory.reloads == 2
    assert caplog.text.count("TLS reload failed, keeping the previous material") == 2
    assert "does not match" in caplog.text
