"""kmip_core.workers: the workers of a node share one listening socket and
take turns by load (`LoadTable`, `AcceptTurns`): a worker holding more
connections than another leaves a new one to it, for at most ACCEPT_WAIT
seconds; one holding no more accepts at once, one connection per readiness.

The port is a stand-in recording what AcceptTurns asks of it; the reactor
is twisted's Clock. tests/integration/test_process_model.py shows the turns
on a real node."""

from __future__ import annotations

import os

import pytest
from twisted.internet import task

from kmip_core.workers import ACCEPT_POLL, ACCEPT_WAIT, AcceptTurns, LoadTable


class Port:
    """What AcceptTurns uses of a Twisted listening port."""

    def __init__(self):
        self.connected = True
        self.disconnecting = False
        self.reading = True
        self.accepted = 0
        self.numberAccepts = 100

    def doRead(self):
        self.accepted += 1

    def stopReading(self):
        self.reading = False

    def startReading(self):
        self.reading = True


@pytest.fixture
def table():
    table = LoadTable.create(2)
    yield table
    table.close()


def turns(table, index=0):
    port, clock = Port(), task.Clock()
    return AcceptTurns(port, table, index, clock), port, clock


def test_the_table_is_shared_memory_every_worker_sees():
    table = LoadTable.create(3)
    try:
        # Another process maps the same memfd (here: a second mapping of it).
        other = LoadTable(os.dup(table.fd), 3)
        table.set(0, 4)
        other.set(1, 2)
        other.set(2, 7)
        assert [table.get(i) for i in range(3)] == [4, 2, 7]
        assert table.fewest_elsewhere(0) == 2 and table.fewest_elsewhere(1) == 4
        assert other.total() == 13
        other.close()
    finally:
        table.close()
    alone = LoadTable.create(1)
    assert alone.fewest_elsewhere(0) is None
    alone.close()


def test_a_worker_holding_no_more_than_the_others_accepts_at_once_one_at_a_time(table):
    accept, port, _ = turns(table)
    table.set(0, 3)
    table.set(1, 3)
    accept.doRead()
    assert port.accepted == 1 and port.reading
    assert port.numberAccepts == 1, "one connection per readiness: a burst is shared"


def test_a_worker_holding_more_leaves_the_connection_to_the_other(table):
    accept, port, clock = turns(table)
    table.set(0, 2)
    table.set(1, 1)
    accept.doRead()
    assert port.accepted == 0 and not port.reading
    clock.advance(ACCEPT_POLL)
    assert not port.reading, "nothing moved yet: still waiting"
    table.set(1, 2)  # the other worker took it
    clock.advance(ACCEPT_POLL)
    assert port.reading and port.accepted == 0
    # The next connection: level again, this worker takes its turn.
    accept.doRead()
    assert port.accepted == 1


def test_a_connection_the_other_worker_does_not_take_is_taken_after_the_wait(table):
    accept, port, clock = turns(table)
    table.set(0, 5)
    table.set(1, 0)  # a worker that is busy, or stopped
    accept.doRead()
    clock.advance(ACCEPT_WAIT - ACCEPT_POLL)
    assert not port.reading and port.accepted == 0
    clock.advance(2 * ACCEPT_POLL)
    assert port.reading
    accept.doRead()
    assert port.accepted == 1, "taken although this worker still holds more"
    # The wait is per connection: the next one is offered to the other again.
    accept.doRead()
    assert port.accepted == 1 and not port.reading


def test_a_port_that_stopped_listening_while_waiting_is_left_alone(table):
    accept, port, clock = turns(table)
    table.set(0, 1)
    accept.doRead()
    port.connected = False
    table.set(1, 1)
    clock.advance(ACCEPT_WAIT)
    assert not port.reading and clock.getDelayedCalls() == []
