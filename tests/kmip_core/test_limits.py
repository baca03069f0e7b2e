"""Tests for kmip_core.limits, the limits every TLS listener applies:
handshake cap and timeout, connection slots counted after TLS, a deadline
for closing and one for reading a request whole.

Twisted's in-memory transport and a fake clock stand in for TLS and time:
`handshakeCompleted()` is what TLSMemoryBIOProtocol calls when the
handshake is done, and `lose()` what the reactor calls when the socket is
gone.
"""

from __future__ import annotations

from twisted.internet import interfaces, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from kmip_core import limits


@implementer(IHandshakeListener)
class Recorder(protocol.Protocol):
    """An application protocol that records what reaches it; a handshake
    listener, as KmipProtocol is."""

    def __init__(self):
        self.data = b""
        self.handshakes = 0
        self.lost = False

    def dataReceived(self, data):
        self.data += data

    def handshakeCompleted(self):
        self.handshakes += 1

    def connectionLost(self, reason=protocol.connectionDone):
        self.lost = True


class Transport(StringTransport):
    """Records aborts; `lose()` ends the connection as the reactor would."""

    def __init__(self):
        super().__init__()
        self.aborted = False
        self.protocol = None

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True

    def lose(self):
        self.protocol.connectionLost(Failure(Exception("gone")))


class Listener:
    def __init__(self, **kw):
        self.clock = Clock()
        self.apps: list[Recorder] = []
        inner = protocol.Factory.forProtocol(self._app)
        self.factory = limits.LimitedFactory(inner, limits.ListenerLimits(**kw), self.clock, name="test")

    def _app(self):
        app = Recorder()
        self.apps.append(app)
        return app

    def connect(self, handshake: bool = True):
        conn = self.factory.buildProtocol(None)
        transport = Transport()
        transport.protocol = conn
        conn.makeConnection(transport)
        if handshake:
            conn.handshakeCompleted()
        return conn, transport


def test_a_handshake_not_done_in_time_is_aborted_and_its_slot_freed():
    """A bare TCP connection that never finishes TLS is aborted after
    handshake_timeout, and the open-connection counter returns to zero."""
    listener = Listener(handshake_timeout=5.0)
    conn, transport = listener.connect(handshake=False)
    assert listener.factory.open_connections == 1
    listener.clock.advance(4.9)
    assert not transport.aborted
    listener.clock.advance(0.1)
    assert transport.aborted
    transport.lose()
    assert listener.factory.open_connections == 0
    assert listener.clock.getDelayedCalls() == []


def test_handshakes_in_progress_do_not_take_connection_slots():
    """More bare sockets than max_connections do not lock out a client
    that completes its handshake: slots are counted after TLS."""
    listener = Listener(max_connections=2, max_handshakes=100)
    bare = [listener.connect(handshake=False) for _ in range(10)]
    conn, transport = listener.connect()
    assert not transport.aborted
    assert listener.apps[-1].handshakes == 1
    assert len(listener.factory.established) == 1
    assert len(listener.factory.handshaking) == len(bare)


def test_the_oldest_handshake_is_dropped_when_all_handshake_slots_are_taken():
    """A flood of idle sockets cannot lock new clients out of the
    handshake: at max_handshakes the oldest one makes room."""
    listener = Listener(max_handshakes=3)
    first, first_transport = listener.connect(handshake=False)
    others = [listener.connect(handshake=False) for _ in range(2)]
    newest, newest_transport = listener.connect(handshake=False)
    assert first_transport.aborted
    assert not newest_transport.aborted
    assert not any(t.aborted for _, t in others)
    assert len(listener.factory.handshaking) == 3
    first_transport.lose()
    newest.handshakeCompleted()
    assert listener.apps[-1].handshakes == 1


def test_a_connection_past_the_cap_is_refused_after_its_handshake():
    """The connection cap refuses the connection that would exceed it, and
    its protocol never hears of the handshake nor gets data."""
    listener = Listener(max_connections=2)
    listener.connect()
    listener.connect()
    conn, transport = listener.connect()
    assert transport.aborted
    assert listener.apps[-1].handshakes == 0
    conn.dataReceived(b"request")
    assert listener.apps[-1].data == b""
    transport.lose()
    assert listener.factory.open_connections == 2


def test_a_lost_connection_frees_its_slot():
    """After any connection is lost its slot is free again."""
    listener = Listener(max_connections=1)
    conn, transport = listener.connect()
    transport.lose()
    assert listener.factory.open_connections == 0
    _, second = listener.connect()
    assert not second.aborted


def test_a_close_that_does_not_complete_is_aborted():
    """The protocol asks to close while reading is paused (a peer that
    never answers close_notify): reading resumes so that the close can
    complete, and the connection is aborted after close_timeout if it has
    not."""
    listener = Listener(close_timeout=10.0)
    conn, transport = listener.connect()
    transport.pauseProducing()
    conn.loseConnection()
    assert transport.producerState == "producing"
    assert transport.disconnecting and not transport.aborted
    listener.clock.advance(10.0)
    assert transport.aborted
    transport.lose()
    assert listener.factory.open_connections == 0
    assert listener.apps[-1].lost


def test_a_registered_producer_does_not_hold_the_close_back():
    """TLS waits for the producer to go before it closes: closing
    unregisters it."""
    listener = Listener()
    conn, transport = listener.connect()
    conn.registerProducer(listener.apps[-1], True)
    conn.loseConnection()
    assert transport.producer is None
    assert transport.disconnecting


def test_no_timer_is_left_once_the_connection_is_gone():
    """Every timer of a connection is cancelled when it is lost; none
    fires on a dead transport."""
    listener = Listener(request_timeout=5.0)
    conn, transport = listener.connect(handshake=False)
    transport.lose()
    conn2, transport2 = listener.connect()
    conn2.dataReceived(b"partial")
    conn2.loseConnection()
    transport2.lose()
    assert listener.clock.getDelayedCalls() == []


def test_a_request_trickled_in_is_closed_at_its_deadline():
    """A request must be read whole within request_timeout of its first
    byte: one byte every few seconds (each resetting any idle timer) does
    not keep it open."""
    listener = Listener(request_timeout=30.0)
    conn, transport = listener.connect()
    for _ in range(5):
        conn.dataReceived(b"G")
        listener.clock.advance(5.9)
    assert not transport.aborted
    listener.clock.advance(0.5)
    assert transport.aborted


def test_a_request_read_whole_stops_its_deadline():
    """`request_received` (the protocol saying the request is complete)
    stops the deadline; the next request's first byte starts a new one."""
    listener = Listener(request_timeout=30.0)
    conn, transport = listener.connect()
    conn.dataReceived(b"GET / HTTP/1.1\r\n\r\n")
    limits.request_received(conn)
    listener.clock.advance(100.0)
    assert not transport.aborted
    conn.dataReceived(b"G")
    listener.clock.advance(30.0)
    assert transport.aborted


def test_close_all_closes_handshaking_and_established_connections():
    """Stopping a listener closes every connection, whatever its state,
    and fires once all are gone."""
    listener = Listener()
    _, bare = listener.connect(handshake=False)
    _, established = listener.connect()
    done = []
    listener.factory.close_all().addCallback(done.append)
    assert bare.disconnecting and established.disconnecting
    bare.lose()
    assert not done
    established.lose()
    assert done == [None]


def test_a_factory_that_refuses_gets_no_wrapper():
    """A wrapped factory that returns None (refusing) is honoured."""
    inner = protocol.Factory()
    inner.buildProtocol = lambda addr: None
    factory = limits.LimitedFactory(inner, limits.ListenerLimits(), Clock())
    assert factory.buildProtocol(None) is None


def test_a_kmip_connection_refused_by_the_limits_is_recorded_with_their_reason():
    """The KMIP listener records refused connections (the audit trail):
    one refused by the cap or by the handshake timeout is recorded as
    such, not as a failed handshake."""
    from kmip_core.protocol import KmipFactory

    class CertifiedTransport(Transport):
        def getPeerCertificate(self):
            return object()

    clock = Clock()
    refusals = []
    inner = KmipFactory(
        handle=lambda message, identity: None,
        identify=lambda certificate, peer: "identity",
        threadpool=None,
        reactor=clock,
        refused=lambda peer, reason, certificate: refusals.append(reason),
    )
    factory = limits.LimitedFactory(
        inner, limits.ListenerLimits(max_connections=1, handshake_timeout=5.0), clock, name="kmip"
    )
    transports = []
    for handshake in (True, True, False):
        conn = factory.buildProtocol(None)
        transport = CertifiedTransport()
        transport.protocol = conn
        conn.makeConnection(transport)
        if handshake:
            conn.handshakeCompleted()
        transports.append(transport)
    clock.advance(5.0)
    for transport in transports:
        transport.lose()
    assert refusals == ["1 connections open (the cap)", "TLS handshake not done in 5.0s"]
    assert factory.open_connections == 0
    assert inner.connections == set()


def test_unsent_bytes_reads_through_tls_and_wrappers_to_the_socket_buffer():
    """unsent_bytes: what TLS holds back plus the socket transport's write
    buffer, found beneath any wrapper (a ProtocolWrapper forwards unknown
    attributes to its transport, which must not count a layer twice)."""
    from twisted.internet import abstract
    from twisted.protocols.policies import ProtocolWrapper

    socket_transport = abstract.FileDescriptor(reactor=Clock())
    socket_transport.dataBuffer = b"y" * 5
    socket_transport.offset = 2
    socket_transport._tempDataBuffer = [b"x" * 10]
    socket_transport._tempDataLen = 10
    tls_layer = ProtocolWrapper(None, None)
    tls_layer.transport = socket_transport
    tls_layer._appSendBuffer = [b"z" * 7]
    outer = ProtocolWrapper(None, None)
    outer.transport = tls_layer
    assert limits.unsent_bytes(outer) == 3 + 10 + 7
    assert limits.socket_transport(outer) is socket_transport
    assert limits.unsent_bytes(StringTransport()) == 0


def test_a_deadline_restarted_reuses_its_call_and_a_cancelled_one_never_fires():
    """Each request restarts a connection's timers: a restart moves the one
    pending call instead of adding another, a cancelled (disarmed) call that
    comes due does nothing, and stop() removes the call itself."""
    clock = Clock()
    fired = []
    deadline = limits.Deadline(clock, lambda: fired.append(clock.seconds()))
    deadline.start(10)
    for _ in range(100):
        deadline.cancel()
        deadline.start(10)
        clock.advance(1)
    assert len(clock.getDelayedCalls()) == 1
    assert fired == [] and deadline.active
    deadline.cancel()
    assert not deadline.active
    clock.advance(20)
    assert fired == []
    deadline.start(5)
    clock.advance(5)
    assert fired == [125.0] and not deadline.active
    deadline.start(5)
    deadline.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(10)
    assert fired == [125.0]


class _SocketStandIn:
    """A reactor's addWriter and removeWriter, for a FileDescriptor that
    buffers writes (it never sends: the test's data stays unsent)."""

    def addWriter(self, _writer):
        pass

    def removeWriter(self, _writer):
        pass


@implementer(interfaces.IPushProducer)
class _Producer:
    def __init__(self):
        self.paused = 0

    def pauseProducing(self):
        self.paused += 1

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass


def test_the_producer_is_paused_past_the_unsent_limit_and_reads_keep_twisteds_size():
    """pause_when_unsent_over: the write buffer may hold `limit` bytes before
    the producer is paused, and the transport's bufferSize, which is also
    the size of each read, stays Twisted's (a 4 MiB read buffer cost 14 us
    of CPU per read)."""
    from twisted.internet import abstract

    socket_transport = abstract.FileDescriptor(reactor=_SocketStandIn())
    socket_transport.connected = True
    default_read_size = socket_transport.bufferSize
    producer = _Producer()
    socket_transport.registerProducer(producer, True)
    limits.pause_when_unsent_over(socket_transport, 200_000)
    socket_transport.write(b"x" * 150_000)  # past Twisted's 64 KiB, within the limit
    assert producer.paused == 0
    socket_transport.write(b"x" * 60_000)  # 210,000 unsent
    assert producer.paused == 1
    assert socket_transport.bufferSize == default_read_size == 65536
