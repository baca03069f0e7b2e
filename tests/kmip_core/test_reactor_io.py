"""Reads that wait for a socket in the reactor thread (kmip_core/reactor_io.py,
`nonblocking.wait_fd`): a work suspended on its socket lets the reactor
serve others, is resumed with what the socket is ready for, and its
Deferred fires with its result or fails with what it raised. Real sockets
(socketpairs), watched with select() by tests.twisted_fakes.SelectReactor."""

from __future__ import annotations

import socket

import pytest

from kmip_core.nonblocking import WouldBlock, WriterBusy, can_wait_fd, in_reactor, wait_fd, writer_turn
from kmip_core.reactor_io import ReactorReads
from tests.twisted_fakes import SelectReactor


@pytest.fixture
def pairs():
    made = []

    def pair():
        a, b = socket.socketpair()
        made.extend((a, b))
        return a, b

    yield pair
    for s in made:
        s.close()


def receive(sock: socket.socket, log: list | None = None) -> bytes:
    """A job: wait until `sock` is readable, then read it."""
    with in_reactor():
        ready = wait_fd(sock.fileno(), 1, "a test read")
        assert ready == 1
        data = sock.recv(100)
    if log is not None:
        log.append(data)
    return data


def test_a_work_that_waits_is_resumed_when_its_socket_is_readable_and_its_deferred_fires():
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    a, b = socket.socketpair()
    with a, b:
        d = reads.start(lambda: receive(a))
        results: list = []
        d.addCallback(results.append)
        assert results == [] and reads.waiting == 1 and len(reactor.readers) == 1
        b.send(b"answer")
        reactor.pump()
        assert results == [b"answer"]
        assert reads.waiting == 0 and not reactor.readers and not reactor.writers


def test_works_waiting_at_once_end_in_the_order_their_sockets_are_ready(pairs):
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    (a1, b1), (a2, b2) = pairs(), pairs()
    log: list = []
    first = reads.start(lambda: receive(a1, log))
    second = reads.start(lambda: receive(a2, log))
    assert reads.waiting == 2
    b2.send(b"second")
    reactor.pump()
    assert log == [b"second"] and reads.waiting == 1
    b1.send(b"first")
    reactor.pump()
    assert log == [b"second", b"first"] and reads.waiting == 0
    assert first.called and second.called


def test_a_work_that_does_not_wait_returns_its_result_and_watches_nothing():
    reactor = SelectReactor()
    assert ReactorReads(reactor).start(lambda: 42) == 42
    assert not reactor.readers


def test_what_a_resumed_work_raises_fails_its_deferred(pairs):
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    a, b = pairs()

    def job():
        receive(a)
        raise ValueError("the answer was wrong")

    d = reads.start(job)
    failures: list = []
    d.addErrback(failures.append)
    b.send(b"x")
    reactor.pump()
    assert len(failures) == 1 and failures[0].check(ValueError)
    assert not reactor.readers


def test_a_work_waits_again_as_many_times_as_it_needs(pairs):
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    a, b = pairs()
    d = reads.start(lambda: receive(a) + receive(a))
    results: list = []
    d.addCallback(results.append)
    b.send(b"one")
    reactor.pump()
    assert results == [] and reads.waiting == 1
    b.send(b"two")
    reactor.pump()
    assert results == [b"onetwo"]


def test_a_wait_for_either_direction_is_resumed_once_and_unwatched_in_both(pairs):
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    a, _b = pairs()
    seen: list = []

    def job():
        with in_reactor():
            seen.append(wait_fd(a.fileno(), 3, "a test read or write"))

    reads.start(job)
    assert len(reactor.readers) == 1 and len(reactor.writers) == 1
    reactor.pump()  # writable at once
    assert seen == [2]
    assert not reactor.readers and not reactor.writers


def test_a_socket_the_reactor_drops_resumes_the_work_as_readable(pairs):
    """connectionLost (the reactor found the socket closed or failed): the
    work is resumed, and its driver reads the socket to learn the error."""
    reactor = SelectReactor()
    reads = ReactorReads(reactor)
    a, _b = pairs()
    seen: list = []

    def job():
        with in_reactor():
            seen.append(wait_fd(a.fileno(), 1, "a test read"))

    reads.start(job)
    (watcher,) = reactor.readers
    watcher.connectionLost(None)
    assert seen == [1] and reads.waiting == 0 and not reactor.readers
    watcher.doRead()  # a late event changes nothing
    assert seen == [1]


def test_a_reactor_read_may_not_wait_for_the_writers_turn():
    reactor = SelectReactor()

    def job():
        with in_reactor():
            writer_turn("a write transaction")

    with pytest.raises(WriterBusy):
        ReactorReads(reactor).start(job)


def test_wait_fd_outside_a_work_raises_would_block_in_the_reactor_and_returns_at_once_elsewhere(pairs):
    a, _b = pairs()
    assert not can_wait_fd()
    assert wait_fd(a.fileno(), 1, "a test read") == 0  # outside in_reactor(): the caller blocks
    with in_reactor():
        assert not can_wait_fd()
        with pytest.raises(WouldBlock, match="a test read"):
            wait_fd(a.fileno(), 1, "a test read")


def test_can_wait_fd_only_in_a_reactor_read():
    reactor = SelectReactor()
    assert ReactorReads(reactor).start(can_wait_fd) is True
