"""Tests for kmip_core.protocol: framing, limits, timeouts, ordering
and draining, on Twisted's in-memory transport with a fake clock.

No real thread runs: the worker pool is a stand-in that queues each job
until the test runs it, and the fake reactor's callFromThread calls at
once. The TLS handshake is simulated by calling handshakeCompleted() on a
transport that offers getPeerCertificate().
"""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted_fakes import PEER_CERTIFICATE, FakeReactor, ManualThreadPool, TLSStringTransport

from kmip_core import protocol as wire
from kmip_core import ttlv


def request_bytes(n: int, body_size: int = 0) -> bytes:
    """A Request Message framed like the real thing; the body's content does
    not matter to the wire layer, only its framing."""
    return ttlv.encode(
        ttlv.structure(
            wire.REQUEST_MESSAGE_TAG,
            [
                ttlv.integer(0x42000D, n),
                ttlv.byte_string(0x420094, bytes([n % 256]) * body_size),
            ],
        )
    )


def response_for(message: bytes) -> bytes:
    return b"RESPONSE:" + message


class Harness:
    def __init__(self, auto=True, **limits):
        self.clock = FakeReactor()
        self.pool = ManualThreadPool(auto=auto)
        self.handled: list[tuple[bytes, object]] = []
        self.identified: list[tuple[object, str]] = []
        self.factory = wire.KmipFactory(
            handle=self.handle,
            identify=self.identify,
            threadpool=self.pool,
            reactor=self.clock,
            **limits,
        )

    def handle(self, message: bytes, identity) -> bytes | None:
        self.handled.append((message, identity))
        return response_for(message)

    def identify(self, certificate, peer):
        self.identified.append((certificate, peer))
        return ("identity", peer)

    def connect(self, handshake: bool = True):
        proto = self.factory.buildProtocol(None)
        transport = TLSStringTransport()
        proto.makeConnection(transport)
        if handshake and not transport.disconnecting:
            proto.handshakeCompleted()
        return proto, transport

    def disconnect(self, proto):
        proto.connectionLost(Failure(Exception("gone")))


@pytest.fixture
def global_reactor_calls(monkeypatch):
    """Timers must run on the factory's reactor. Record (and neutralize) any
    call that reaches the global reactor instead, so that a test fails
    cleanly rather than leaving timers in the real reactor."""
    from twisted.internet import reactor

    calls = []
    sink = Clock()

    def call_later(delay, f, *args, **kwargs):
        calls.append((delay, f))
        return sink.callLater(delay, f, *args, **kwargs)

    monkeypatch.setattr(reactor, "callLater", call_later)
    return calls


@pytest.fixture(autouse=True)
def _no_global_timers(global_reactor_calls):
    return global_reactor_calls


# Framing.
def test_one_message_is_answered():
    h = Harness()
    proto, transport = h.connect()
    message = request_bytes(1, 20)
    proto.dataReceived(message)
    assert h.handled == [(message, ("identity", proto.peer))]
    assert transport.value() == response_for(message)
    assert not transport.disconnecting


def test_identity_comes_from_the_peer_certificate():
    h = Harness()
    proto, _ = h.connect()
    assert h.identified == [(PEER_CERTIFICATE, proto.peer)]
    assert proto.peer.startswith("192.168.1.1:")


@settings(max_examples=150, deadline=None)
@given(
    sizes=st.lists(st.integers(0, 60), min_size=1, max_size=6),
    cuts=st.lists(st.integers(0, 10_000), max_size=30),
)
def test_arbitrary_chunking_delivers_each_message_whole_once_and_in_order(sizes, cuts):
    h = Harness()
    proto, transport = h.connect()
    messages = [request_bytes(i, size) for i, size in enumerate(sizes)]
    stream = b"".join(messages)
    points = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    for start, end in itertools.pairwise(points):
        proto.dataReceived(stream[start:end])
    assert [m for m, _ in h.handled] == messages
    assert transport.value() == b"".join(response_for(m) for m in messages)
    assert not transport.disconnecting


def test_byte_at_a_time_delivery():
    h = Harness()
    proto, _ = h.connect()
    messages = [request_bytes(1, 3), request_bytes(2, 17)]
    for byte in b"".join(messages):
        proto.dataReceived(bytes([byte]))
    assert [m for m, _ in h.handled] == messages


def test_declared_length_above_the_limit_closes_without_buffering():
    h = Harness(max_message_size=1024)
    proto, transport = h.connect()
    header = bytes.fromhex("42007801") + (1024).to_bytes(4, "big")  # 8 + 1024 > 1024
    proto.dataReceived(header)
    assert transport.disconnecting
    proto.dataReceived(b"\x00" * 1024)
    assert h.handled == []
    assert h.pool.jobs == deque()
    assert transport.value() == b""


def test_message_of_exactly_the_limit_is_accepted():
    message = request_bytes(1, 100)
    h = Harness(max_message_size=len(message))
    proto, transport = h.connect()
    proto.dataReceived(message)
    assert [m for m, _ in h.handled] == [message]
    assert not transport.disconnecting


@pytest.mark.parametrize(
    "header",
    [
        "42007b0100000010",  # Response Message
        "4200780700000010",  # Request Message tag but a Text String
        "4200780100000014",  # length not a multiple of 8
        "4200780c00000010",  # no such item type
        "0000000000000000",  # garbage
    ],
)
def test_header_that_cannot_start_a_request_closes(header):
    h = Harness()
    proto, transport = h.connect()
    proto.dataReceived(bytes.fromhex(header) + b"\x00" * 16)
    assert transport.disconnecting
    assert h.handled == []


def test_bad_header_after_a_good_message_closes_after_answering_the_good_one():
    h = Harness()
    proto, transport = h.connect()
    good = request_bytes(1, 5)
    proto.dataReceived(good + bytes.fromhex("42007b0100000000"))
    assert [m for m, _ in h.handled] == [good]
    assert transport.value() == response_for(good)
    assert transport.disconnecting


def test_data_before_the_handshake_closes():
    h = Harness()
    proto, transport = h.connect(handshake=False)
    proto.dataReceived(request_bytes(1))
    assert transport.disconnecting
    assert h.handled == []


def test_unmappable_certificate_closes():
    h = Harness()

    def refuse(certificate, peer):
        raise ValueError("unknown client")

    h.factory.identify = refuse
    proto, transport = h.connect()
    assert transport.disconnecting
    proto.dataReceived(request_bytes(1))
    assert h.handled == []


def test_handler_returning_none_closes_the_connection():
    h = Harness()
    h.factory.handle = lambda message, identity: None
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1) + request_bytes(2))
    assert transport.disconnecting
    assert transport.value() == b""


def test_handler_exception_closes_the_connection():
    h = Harness()

    def explode(message, identity):
        raise RuntimeError("boom")

    h.factory.handle = explode
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1))
    assert transport.disconnecting
    assert transport.value() == b""


# Timeouts.
def test_timers_run_on_the_factory_reactor(global_reactor_calls):
    """The factory's reactor is the clock; nothing may be scheduled on the
    global reactor (else tests and embedders cannot control time)."""
    h = Harness()
    proto, _ = h.connect()
    proto.dataReceived(request_bytes(1))
    assert global_reactor_calls == []
    assert h.clock.getDelayedCalls(), "no timeout was scheduled on the factory's reactor"


def test_idle_timeout_closes_after_idle_timeout_and_not_before():
    """A connection with nothing to do is closed after idle_timeout."""
    h = Harness(idle_timeout=300.0)
    _, transport = h.connect()
    h.clock.advance(299.0)
    assert not transport.disconnecting
    h.clock.advance(1.0)
    assert transport.disconnecting


def test_activity_restarts_the_idle_timeout():
    h = Harness(idle_timeout=300.0)
    proto, transport = h.connect()
    h.clock.advance(200.0)
    proto.dataReceived(request_bytes(1))
    h.clock.advance(200.0)
    assert not transport.disconnecting
    h.clock.advance(100.0)
    assert transport.disconnecting


def test_idle_timeout_starts_when_the_handshake_completes():
    """Before the handshake the listener's handshake timeout applies
    (wire.limits); the protocol's idle timeout starts with the handshake."""
    h = Harness(idle_timeout=300.0)
    proto, transport = h.connect(handshake=False)
    assert h.clock.getDelayedCalls() == []
    h.clock.advance(5.0)
    proto.handshakeCompleted()
    h.clock.advance(299.0)
    assert not transport.disconnecting
    h.clock.advance(1.0)
    assert transport.disconnecting


def test_closed_connection_leaves_no_timer():
    h = Harness()
    proto, _ = h.connect()
    h.disconnect(proto)
    assert h.clock.getDelayedCalls() == []


def test_closed_connection_leaves_the_connection_set():
    """Only connections past the handshake are in `connections`, and a
    lost one leaves it."""
    h = Harness()
    p1, _ = h.connect()
    p2, _ = h.connect(handshake=False)
    assert h.factory.connections == {p1}
    h.disconnect(p1)
    h.disconnect(p2)
    assert h.factory.connections == set()


# Ordering and draining.
def test_responses_are_written_in_request_order_when_processing_completes_out_of_order():
    h = Harness()
    first, second = defer.Deferred(), defer.Deferred()
    # The second request's processing finishes before the first one's.
    second.callback(b"second-response")
    results = deque([first, second])
    submitted = []

    def process(message, identity):
        submitted.append(message)
        return results.popleft()

    h.factory.process = process
    proto, transport = h.connect()
    m1, m2 = request_bytes(1), request_bytes(2)
    proto.dataReceived(m1 + m2)
    assert submitted == [m1]  # One request per connection at a time.
    assert transport.value() == b""
    first.callback(b"first-response")
    assert submitted == [m1, m2]
    assert transport.value() == b"first-response" + b"second-response"


def test_connections_are_served_independently():
    h = Harness(auto=False)
    pa, ta = h.connect()
    pb, tb = h.connect()
    ma, mb = request_bytes(1), request_bytes(2)
    pa.dataReceived(ma)
    pb.dataReceived(mb)
    assert len(h.pool.jobs) == 2
    # Connection B's job finishes first and is answered at once.
    h.pool.jobs.rotate(-1)
    h.pool.run_next()
    assert tb.value() == response_for(mb)
    assert ta.value() == b""
    h.pool.run_next()
    assert ta.value() == response_for(ma)


def test_drain_fires_only_after_in_flight_requests_finish():
    h = Harness(auto=False)
    pa, ta = h.connect()
    pb, tb = h.connect()
    pa.dataReceived(request_bytes(1))
    pb.dataReceived(request_bytes(2))
    drained = h.factory.drain()
    fired = []
    drained.addCallback(fired.append)
    h.pool.run_next()
    assert not fired
    h.pool.run_next()
    assert fired
    assert ta.value() and tb.value()


def test_drain_with_nothing_in_flight_fires_at_once():
    h = Harness(auto=False)
    h.connect()
    fired = []
    h.factory.drain().addCallback(fired.append)
    assert fired


def test_drain_waits_for_requests_already_received_on_a_connection():
    """A client that pipelined two requests has both in flight: the server
    read them, and stopping must answer both before closing."""
    h = Harness(auto=False)
    proto, transport = h.connect()
    m1, m2 = request_bytes(1), request_bytes(2)
    proto.dataReceived(m1 + m2)
    fired = []
    h.factory.drain().addCallback(fired.append)
    h.pool.run_next()
    assert transport.value() == response_for(m1)
    assert not fired, "drain fired while a received request was still unanswered"
    h.pool.run_next()
    assert transport.value() == response_for(m1) + response_for(m2)
    assert fired


def explode(message, identity):
    raise RuntimeError("boom")


def test_drain_survives_a_failed_request():
    h = Harness(auto=False)
    h.factory.handle = explode
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1))
    fired = []
    h.factory.drain().addCallback(fired.append)
    h.pool.run_next()
    assert fired
    assert transport.disconnecting


def test_close_all_closes_every_connection():
    h = Harness()
    (_, t1), (_, t2) = h.connect(), h.connect()
    h.factory.close_all()
    assert t1.disconnecting and t2.disconnecting


@pytest.mark.parametrize(
    "header,limit",
    [
        ("4200780100000010", 24),
        ("4200780100000018", 24),
    ],
)
def test_check_frame_header_limit(header, limit):
    data = bytes.fromhex(header)
    declared = 8 + int(header[8:], 16)
    if declared <= limit:
        assert wire.check_frame_header(data, limit) == declared
    else:
        with pytest.raises(wire.FramingError, match="exceeds"):
            wire.check_frame_header(data, limit)


def test_pipelined_requests_pause_reading_until_the_queue_drains():
    """A client that pipelines many requests behind a slow one is no longer
    read (back-pressure) once MAX_QUEUED_REQUESTS wait, and is read again
    when they are answered: the server never queues without bound."""
    from kmip_core.protocol import MAX_QUEUED_REQUESTS

    h = Harness()
    pending = deque()

    def process(message, identity):
        d = defer.Deferred()
        pending.append((d, message))
        return d

    h.factory.process = process
    proto, transport = h.connect()
    messages = [request_bytes(i) for i in range(1, MAX_QUEUED_REQUESTS + 3)]
    proto.dataReceived(b"".join(messages))
    assert transport.producerState == "paused"
    assert len(pending) == 1
    while pending:
        d, message = pending.popleft()
        d.callback(response_for(message))
    assert transport.producerState == "producing"
    assert transport.value() == b"".join(response_for(m) for m in messages)


# Slots freed on every path (issue 19).
class RecordingTransport(TLSStringTransport):
    aborted = False

    def abortConnection(self):
        self.aborted = True
        self.disconnecting = True


def connect_recording(h: Harness) -> tuple[wire.KmipProtocol, RecordingTransport]:
    proto = h.factory.buildProtocol(None)
    transport = RecordingTransport()
    proto.makeConnection(transport)
    proto.handshakeCompleted()
    return proto, transport


def undecodable_frame() -> bytes:
    """A Request Message header and a 16-byte body of 0x01 bytes: framed
    correctly, meaningless inside."""
    return bytes.fromhex("4200780100000010") + b"\x01" * 16


def test_close_with_reading_paused_resumes_reading_and_is_aborted_if_it_hangs():
    """The slot leak of issue 19: an undecodable frame and four requests in
    one write fill the queue, so reading is paused; the handler then asks to
    close. Reading must resume (so the peer's close is seen) and a close
    that never completes is aborted after close_timeout, so connectionLost
    always comes."""
    h = Harness(auto=False, close_timeout=10.0)
    h.factory.handle = lambda message, identity: None if message == undecodable_frame() else response_for(message)
    proto, transport = connect_recording(h)
    proto.dataReceived(undecodable_frame() + b"".join(request_bytes(i) for i in range(4)))
    assert transport.producerState == "paused"
    h.pool.run_next()
    assert transport.disconnecting
    assert transport.producerState == "producing"
    assert transport.producer is None, "a registered producer holds TLS's close back"
    assert h.pool.jobs == deque()
    h.clock.advance(10.0)
    assert transport.aborted
    h.disconnect(proto)
    assert h.factory.connections == set()
    assert h.clock.getDelayedCalls() == []


def test_a_response_after_the_connection_is_lost_is_dropped_and_arms_no_timer():
    """A client that leaves while its request is processed: the response is
    dropped and no idle timer is armed on the dead transport (it used to
    fire there with an AttributeError)."""
    h = Harness(auto=False)
    proto, transport = connect_recording(h)
    proto.dataReceived(request_bytes(1) + request_bytes(2))
    h.disconnect(proto)
    h.pool.run_all()
    assert transport.value() == b""
    assert h.clock.getDelayedCalls() == []
    assert len(h.handled) == 1


def test_a_failure_after_the_connection_is_lost_touches_nothing():
    """A handler failure for a client that already left closes nothing and
    arms no timer."""
    h = Harness(auto=False)

    def explode(message, identity):
        raise RuntimeError("boom")

    h.factory.handle = explode
    proto, transport = connect_recording(h)
    proto.dataReceived(request_bytes(1))
    h.disconnect(proto)
    h.pool.run_all()
    assert not transport.aborted
    assert h.clock.getDelayedCalls() == []


# Frame deadline.
def test_a_frame_trickled_in_is_closed_at_the_frame_deadline():
    """Slow loris: one byte every 12 s resets the idle timer each time, but
    a message must be complete within frame_timeout of its first byte."""
    h = Harness(idle_timeout=300.0, frame_timeout=30.0)
    proto, transport = connect_recording(h)
    message = request_bytes(1, 40)
    for byte in message[:3]:
        proto.dataReceived(bytes([byte]))
        h.clock.advance(12.0)
    assert transport.aborted
    assert h.handled == []


def test_the_frame_deadline_starts_again_for_each_message():
    """Complete messages reset the deadline; only an unfinished one is
    timed."""
    h = Harness(frame_timeout=30.0)
    proto, transport = connect_recording(h)
    for i in range(5):
        proto.dataReceived(request_bytes(i))
        h.clock.advance(20.0)
    assert not transport.aborted
    assert len(h.handled) == 5


def test_the_frame_deadline_waits_while_the_server_does_not_read():
    """While reading is paused by the server (queue full) a partial next
    message cannot progress: its deadline restarts when reading resumes."""
    h = Harness(auto=False, frame_timeout=30.0, idle_timeout=300.0)
    proto, transport = connect_recording(h)
    partial = request_bytes(99)[:10]
    proto.dataReceived(b"".join(request_bytes(i) for i in range(5)) + partial)
    assert transport.producerState == "paused"
    h.clock.advance(60.0)
    assert not transport.aborted
    h.pool.run_all()
    assert transport.producerState == "producing"
    h.clock.advance(29.0)
    assert not transport.aborted
    h.clock.advance(1.0)
    assert transport.aborted


# Back-pressure on responses not read.
def test_the_protocol_is_the_transports_producer():
    """The transport pauses the protocol when more than max_unsent_bytes wait
    to be sent; for that the protocol registers as its streaming producer."""
    h = Harness()
    proto, transport = connect_recording(h)
    assert transport.producer is proto and transport.streaming


def test_no_request_is_started_or_read_while_responses_are_not_read():
    """Once the transport says its buffer is over the cap, the next
    requests wait and the client is not read; when it drains they go on."""
    h = Harness()
    proto, transport = connect_recording(h)
    proto.dataReceived(request_bytes(1))
    proto.pauseProducing()  # The transport: buffer over max_unsent_bytes.
    assert transport.producerState == "paused"
    proto.dataReceived(request_bytes(2) + request_bytes(3))
    assert len(h.handled) == 1
    proto.resumeProducing()  # The transport: buffer drained.
    assert len(h.handled) == 3
    assert transport.producerState == "producing"


def test_a_client_that_never_reads_its_responses_is_closed_after_idle_timeout():
    """Responses that are never read are idleness: the connection goes after
    idle_timeout even though requests are waiting."""
    h = Harness(idle_timeout=300.0)
    proto, transport = connect_recording(h)
    proto.dataReceived(request_bytes(1))
    proto.pauseProducing()
    proto.dataReceived(request_bytes(2))
    h.clock.advance(300.0)
    assert transport.aborted


def test_the_node_cap_holds_back_every_connection_until_the_node_drains():
    """Over max_unsent_bytes_total for the whole node, a connection that has
    just answered starts nothing more and is not read; all go on when the
    node's unsent bytes fall under the cap, and none is closed for it."""
    h = Harness(max_unsent_bytes_total=1000, idle_timeout=300.0)
    unsent: dict = {}
    h.factory.unsent_bytes = lambda transport: unsent.get(id(transport), 0)
    (pa, ta), (pb, tb) = connect_recording(h), connect_recording(h)
    unsent[id(ta)] = 800
    unsent[id(tb)] = 300
    pa.dataReceived(request_bytes(1) + request_bytes(2))
    assert len(h.handled) == 1
    assert ta.producerState == "paused"
    pb.dataReceived(request_bytes(3) + request_bytes(4))
    assert len(h.handled) == 2
    assert pa.blocked and pb.blocked
    h.clock.advance(1000.0)
    assert not ta.aborted and not tb.aborted
    unsent.clear()
    h.clock.advance(wire.NODE_RECHECK_SECONDS)
    assert len(h.handled) == 4
    assert not pa.blocked and not pb.blocked
    assert ta.producerState == tb.producerState == "producing"
    h.disconnect(pa)
    h.disconnect(pb)
    assert h.factory.connections == set()


def test_a_connection_with_nothing_unsent_is_not_held_back_by_the_node_cap():
    """The node's total (a sum over every connection) is taken only when the
    answering connection's own buffer holds something: one whose responses
    all left adds nothing to the node's memory and goes on; the other,
    whose buffer is full, is held back."""
    h = Harness(max_unsent_bytes_total=1000, idle_timeout=300.0)
    unsent: dict = {}
    sums = []
    h.factory.unsent_bytes = lambda transport: unsent.get(id(transport), 0)
    real_total = h.factory.unsent_total
    h.factory.unsent_total = lambda: sums.append(1) or real_total()
    (pa, ta), (pb, _) = connect_recording(h), connect_recording(h)
    unsent[id(ta)] = 1500
    pb.dataReceived(request_bytes(1) + request_bytes(2))
    assert len(h.handled) == 2 and not pb.blocked
    assert sums == []
    pa.dataReceived(request_bytes(3) + request_bytes(4))
    assert len(h.handled) == 3 and pa.blocked
    assert sums
    h.disconnect(pa)
    h.disconnect(pb)


# Answers held until something else is done (the KMS: a read's audit record).
def test_a_held_answer_leaves_only_once_released_and_the_next_request_waits():
    h = Harness()
    released: list[defer.Deferred] = []

    def handle(message, identity):
        h.handled.append((message, identity))

        def release():
            d = defer.Deferred()
            released.append(d)
            return d

        return wire.HeldAnswer(release)

    h.factory.handle = handle
    proto, transport = h.connect()
    m1, m2 = request_bytes(1), request_bytes(2)
    proto.dataReceived(m1 + m2)
    assert len(released) == 1 and transport.value() == b""
    assert [m for m, _ in h.handled] == [m1]  # the second waits for the first's answer
    released[0].callback(b"first-answer")
    assert transport.value() == b"first-answer"
    assert [m for m, _ in h.handled] == [m1, m2]
    released[1].callback(b"second-answer")
    assert transport.value() == b"first-answer" + b"second-answer"
    assert not transport.disconnecting


def test_a_held_answer_released_as_none_closes_the_connection():
    h = Harness()
    h.factory.handle = lambda message, identity: wire.HeldAnswer(lambda: defer.succeed(None))
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1))
    assert transport.value() == b"" and transport.disconnecting


def test_drain_waits_for_a_held_answer():
    h = Harness()
    held = defer.Deferred()
    h.factory.handle = lambda message, identity: wire.HeldAnswer(lambda: held)
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1))
    fired = []
    h.factory.drain().addCallback(fired.append)
    assert not fired, "drain fired while an answer was still held"
    held.callback(b"answer")
    assert fired and transport.value() == b"answer"


# Requests offered to the reactor thread first (handle_inline).
def test_a_request_answered_inline_never_reaches_the_pool():
    h = Harness(auto=False)
    h.factory.handle_inline = lambda message, identity: b"inline:" + message
    proto, transport = h.connect()
    message = request_bytes(1)
    proto.dataReceived(message)
    assert transport.value() == b"inline:" + message
    assert len(h.pool.jobs) == 0 and h.handled == []


def test_a_held_answer_given_inline_is_released_once_and_leaves_when_it_fires():
    h = Harness(auto=False)
    released: list[defer.Deferred] = []

    def release():
        d = defer.Deferred()
        released.append(d)
        return d

    h.factory.handle_inline = lambda message, identity: wire.HeldAnswer(release)
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1) + request_bytes(2))
    assert len(released) == 1 and transport.value() == b""
    released[0].callback(b"first")
    assert transport.value() == b"first" and len(released) == 2
    released[1].callback(b"second")
    assert transport.value() == b"firstsecond" and not transport.disconnecting
    assert len(h.pool.jobs) == 0 and h.handled == []


def test_a_held_answer_given_inline_whose_release_raises_closes_the_connection():
    h = Harness(auto=False)

    def release():
        raise RuntimeError("release failed")

    h.factory.handle_inline = lambda message, identity: wire.HeldAnswer(release)
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1))
    assert transport.value() == b"" and transport.disconnecting
    assert len(h.pool.jobs) == 0 and h.handled == []


def test_a_request_left_in_pool_by_handle_inline_runs_on_the_pool():
    h = Harness(auto=False)
    offered = []

    def inline(message, identity):
        offered.append(message)
        return wire.IN_POOL

    h.factory.handle_inline = inline
    proto, transport = h.connect()
    message = request_bytes(1)
    proto.dataReceived(message)
    assert offered == [message] and transport.value() == b""
    h.pool.run_next()
    assert transport.value() == response_for(message)


def test_work_handed_to_the_pool_by_handle_inline_runs_there_instead_of_handle():
    h = Harness(auto=False)
    h.factory.handle_inline = lambda message, identity: wire.InPool(lambda: b"from-the-pool")
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1))
    assert transport.value() == b""
    h.pool.run_next()
    assert transport.value() == b"from-the-pool" and h.handled == []


def test_an_inline_failure_closes_the_connection():
    h = Harness(auto=False)
    h.factory.handle_inline = explode
    proto, transport = h.connect()
    proto.dataReceived(request_bytes(1))
    assert transport.disconnecting and len(h.pool.jobs) == 0
