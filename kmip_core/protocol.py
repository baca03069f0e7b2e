"""KMIP over TLS: one `KmipProtocol` per connection moves bytes, the
`KmipFactory` holds what connections share (limits, the worker pool, the
request handler).

Framing reads the 8-byte header of the Request Message and checks the
declared length against the limit before buffering anything more (like
`IntNStringReceiver.MAX_LENGTH`). Each complete message is handed to a
worker thread; the reactor thread never decodes business logic, touches
the database, or runs slow cryptography. Messages on one connection are
answered in order; different connections are served concurrently.

What one connection can make the node hold is bounded: at most
MAX_QUEUED_REQUESTS complete requests wait; a message must arrive whole
within `frame_timeout` of its first byte; the protocol is its transport's
streaming producer, so once more than `max_unsent_bytes` of its responses
wait to be sent (the client does not read) it starts no request and reads
nothing until they drain, and the same holds for every connection while
the node's unsent bytes exceed `max_unsent_bytes_total`. A close always
ends, even with reading paused. Handshake and connection caps are the
listener's (`wire.limits.LimitedFactory` around the factory).
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IAddress, IHandshakeListener, IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from kmip_core import limits, ttlv

log = logging.getLogger("kms_server.wire")

REQUEST_MESSAGE_TAG = 0x420078
# Complete requests a connection may have waiting behind the one being
# processed; beyond this the connection stops being read (TCP back-pressure),
# so a pipelining client cannot make the server buffer without bound.
MAX_QUEUED_REQUESTS = 4
# How often connections held back by the node's cap on unsent bytes look
# again whether they may go on.
NODE_RECHECK_SECONDS = 0.1


class FramingError(Exception):
    pass


def check_frame_header(header: bytes, max_message_size: int) -> int:
    """The total size of the message whose first 8 bytes are `header`;
    raises FramingError for anything that cannot start a request."""
    tag, item_type, length = ttlv.read_header(header)
    if tag != REQUEST_MESSAGE_TAG or item_type != ttlv.ItemType.STRUCTURE:
        raise FramingError(f"not a Request Message (tag 0x{tag:06X}, type {item_type.name})")
    if length % 8:
        raise FramingError("message length is not a multiple of 8")
    total = ttlv.HEADER_SIZE + length
    if total > max_message_size:
        raise FramingError(f"declared message size {total} exceeds the limit {max_message_size}")
    return total


@implementer(IHandshakeListener, IPushProducer)
class KmipProtocol(protocol.Protocol):
    """One connection. Its timers: the idle timeout (no request for
    `idle_timeout`, or responses not read for as long), and the frame
    deadline (a message whose first byte arrived must be complete within
    `frame_timeout`, however slowly its bytes trickle in). The handshake
    timeout and the connection cap are the listener's (`wire.limits`)."""

    # Set by makeConnection before any event reaches the protocol.
    transport: limits.Transport  # type: ignore[assignment]  # Twisted: ITransport | None, a zope Interface (limits.Transport)

    def __init__(self, factory: KmipFactory):
        self.factory = factory
        self._buffer = bytearray()
        self._expected: int | None = None
        self._queue: deque[bytes] = deque()
        self._busy = False
        self._identity: object = None
        self._closing = False
        self._lost = False
        self._reading_paused = False
        # The transport's write buffer is over the per-connection cap (it
        # paused us as a producer), or the node's unsent bytes are over the
        # node cap: no new request is started and the client is not read.
        self._write_blocked = False
        self._node_blocked = False
        self._handshake_done = False
        self.peer = ""
        self._idle = limits.Deadline(factory.reactor, self._idle_expired)
        self._frame_deadline = limits.Deadline(factory.reactor, self._frame_expired)

    # Connection events.
    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"

    def handshakeCompleted(self) -> None:
        if self._lost or self._closing:
            return
        self._handshake_done = True
        certificate = None
        try:
            certificate = self.transport.getPeerCertificate()
            self._identity = self.factory.identify(certificate, self.peer)
        except Exception as exc:  # A certificate we cannot map is a refusal.
            log.warning("connection from %s: client certificate not accepted: %s", self.peer, exc)
            self.factory.refused(self.peer, f"client certificate not accepted: {exc}", certificate)
            self._close()
            return
        self.factory.connections.add(self)
        # The transport tells us (pauseProducing) when more than
        # max_unsent_bytes of our responses wait to be sent.
        socket = limits.socket_transport(self.transport)
        if socket is not None:
            limits.pause_when_unsent_over(socket, self.factory.max_unsent_bytes)
        self.transport.registerProducer(self, True)
        self._idle.start(self.factory.idle_timeout)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._lost = True
        self._closing = True
        self._idle.stop()
        self._frame_deadline.stop()
        self._queue.clear()
        self._buffer.clear()
        if not self._handshake_done:
            # The listener limits say why when it was theirs to refuse.
            refusal = vars(self.transport).get("refusal") if hasattr(self.transport, "__dict__") else None
            self.factory.refused(self.peer, refusal or f"TLS handshake failed: {reason.getErrorMessage()}", None)
        self.factory.release(self)

    def _idle_expired(self) -> None:
        if self._lost:
            return
        if self._closing:
            log.info("aborting connection from %s: its close did not complete", self.peer)
        elif self._write_blocked:
            log.info("closing connection from %s: responses not read for %ss", self.peer, self.factory.idle_timeout)
        else:
            log.info("closing idle connection from %s", self.peer)
        self.transport.abortConnection()

    def _frame_expired(self) -> None:
        if self._lost:
            return
        log.info(
            "closing connection from %s: message not complete %ss after its first byte",
            self.peer,
            self.factory.frame_timeout,
        )
        self.transport.abortConnection()

    # IPushProducer, driven by the transport's write buffer.
    def pauseProducing(self) -> None:
        self._write_blocked = True
        self._update_reading()
        if not self._busy and not self._lost:
            # Unread responses are idleness too: a client that stops
            # reading is closed after idle_timeout.
            self._idle.start(self.factory.idle_timeout)

    def resumeProducing(self) -> None:
        self._write_blocked = False
        self._update_reading()
        self.factory.unsent_changed()
        self._next()

    def stopProducing(self) -> None:
        pass

    def node_unblocked(self) -> None:
        if self._lost:
            return
        self._node_blocked = False
        if not self._busy:
            self._idle.start(self.factory.idle_timeout)
        self._update_reading()
        self._next()

    def _update_reading(self) -> None:
        """Read the client only while its requests can be taken: the queue
        has room and its responses (and the node's) are being read."""
        if self._lost or self._closing:
            return
        pause = len(self._queue) >= MAX_QUEUED_REQUESTS or self._write_blocked or self._node_blocked
        if pause and not self._reading_paused:
            self._reading_paused = True
            # Bytes do not trickle in while we do not read: the frame
            # deadline starts again when reading resumes.
            self._frame_deadline.cancel()
            self.transport.pauseProducing()
        elif not pause and self._reading_paused:
            self._reading_paused = False
            if self._buffer:
                self._frame_deadline.start(self.factory.frame_timeout)
            self.transport.resumeProducing()

    # Framing.
    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        if self._identity is None:
            # Data before the handshake finished should not happen with TLS;
            # refuse rather than process an unauthenticated request.
            self._close()
            return
        if not self._busy:
            self._idle.start(self.factory.idle_timeout)
        if not self._buffer and data:
            self._frame_deadline.start(self.factory.frame_timeout)
        self._buffer += data
        while not self._closing:
            if self._expected is None:
                if len(self._buffer) < ttlv.HEADER_SIZE:
                    break
                try:
                    self._expected = check_frame_header(
                        bytes(self._buffer[: ttlv.HEADER_SIZE]), self.factory.max_message_size
                    )
                except (FramingError, ttlv.TTLVError) as exc:
                    log.info("closing connection from %s: %s", self.peer, exc)
                    self._close()
                    return
            if len(self._buffer) < self._expected:
                break
            message = bytes(self._buffer[: self._expected])
            del self._buffer[: self._expected]
            self._expected = None
            self._queue.append(message)
            if self._buffer:
                # The next frame's first byte is here: its deadline starts.
                self._frame_deadline.start(self.factory.frame_timeout)
            else:
                self._frame_deadline.cancel()
            self._next()
        self._update_reading()

    def _next(self) -> None:
        if self._busy or not self._queue or self._closing or self._write_blocked or self._node_blocked:
            return
        self._busy = True
        # A request being processed is not idleness: no idle timeout until
        # it is answered, however slow it is.
        self._idle.cancel()
        message = self._queue.popleft()
        self._update_reading()
        d = self.factory.process(message, self._identity)
        d.addCallbacks(self._respond, self._failed)

    def _respond(self, response: bytes | None) -> None:
        self._busy = False
        if self._lost:
            return  # The client went away while its request was processed.
        if response is None:
            self._close()
            return
        if self._closing:
            return
        self.transport.write(response)
        if self._lost:
            return
        self._idle.start(self.factory.idle_timeout)
        # The node's total is a sum over every connection: taken only when
        # this connection's own buffer holds something. One whose responses
        # all went to the kernel adds nothing to the node's memory, and its
        # next response is checked again (an O(connections) sum per answer
        # was a tenth of the server's time at 16 connections).
        if not self._write_blocked and self.factory.unsent_bytes(self.transport) > 0 and self.factory.over_node_cap():
            # Held back for the node's sake, not the client's fault: no idle
            # timeout until the node is under its cap again.
            self._node_blocked = True
            self._idle.cancel()
            self.factory.wait_for_node(self)
            self._update_reading()
        self._next()

    def _failed(self, failure: Failure) -> None:
        self._busy = False
        if self._lost:
            return
        log.error("request from %s failed outside the dispatcher: %s", self.peer, failure.getErrorMessage())
        self._close()

    def _close(self) -> None:
        """Close after flushing what was written. Reading resumes so that
        the peer's close is seen, and a close that does not complete in
        time is aborted: a closing connection always ends."""
        if self._lost or self._closing:
            return
        self._closing = True
        self._frame_deadline.cancel()
        self._queue.clear()
        self._idle.start(self.factory.close_timeout)
        if self._reading_paused:
            self._reading_paused = False
            self.transport.resumeProducing()
        if self._handshake_done and self._identity is not None:
            # A registered producer would hold TLS's close back.
            self.transport.unregisterProducer()
        self.transport.loseConnection()

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._queue)

    @property
    def blocked(self) -> bool:
        """Not taking requests because its responses are not being read."""
        return self._write_blocked or self._node_blocked


class InPool:
    """What `handle_inline` returns for a request it leaves to the pool:
    `run()` is called there, or `handle(message, identity)` without one
    (`run` lets the inline attempt pass on what it already did, such as
    the decoded message)."""

    __slots__ = ("run",)

    def __init__(self, run: Callable[[], Any] | None = None):
        self.run = run


IN_POOL = InPool()


class HeldAnswer:
    """What `handle` may return instead of the response: an answer that
    leaves only once something else is done (the KMS: the audit record of
    the read it answers is durable). `release()` is called in the reactor
    thread and returns a Deferred that fires with the bytes to send, or
    None to close the connection. The connection sends nothing else, and
    reads no other request, until then."""

    __slots__ = ("release",)

    def __init__(self, release: Callable[[], defer.Deferred[bytes | None]]):
        self.release = release


def _released(answer: bytes | HeldAnswer | None) -> bytes | None | defer.Deferred[bytes | None]:
    return answer.release() if isinstance(answer, HeldAnswer) else answer


class KmipFactory(protocol.Factory):
    """What every connection shares. `handle(message, identity)` runs on the
    worker pool and returns the response bytes, None to close, or a
    `HeldAnswer`. With `handle_inline`, each request is first offered to it
    in the reactor thread (kmip_core/nonblocking.py).

    Listen with `wire.limits.LimitedFactory` around it: that is where the
    handshake timeout and the connection cap are."""

    def __init__(
        self,
        # The identity `identify` makes of a certificate is what `handle` is given.
        handle: Callable[[bytes, Any], bytes | HeldAnswer | None],
        identify: Callable[[Any, str], Any],
        threadpool: ThreadPool,
        reactor: Any,
        max_message_size: int = 1 << 20,
        idle_timeout: float = 300.0,
        frame_timeout: float = 30.0,
        max_unsent_bytes: int = 4 << 20,
        max_unsent_bytes_total: int = 256 << 20,
        refused: Callable[[str, str, object], None] | None = None,
        close_timeout: float = 10.0,
        # Tried first, in the reactor thread: what `handle` would return,
        # or an InPool to have the request run on the pool.
        handle_inline: Callable[[bytes, Any], Any] | None = None,
    ):
        self.handle = handle
        self.handle_inline = handle_inline
        # Told of every connection refused at the TLS layer (peer, reason,
        # the certificate if one was presented): the audit trail.
        self.refused = refused or (lambda peer, reason, certificate: None)
        self.identify = identify
        self.threadpool = threadpool
        self.reactor = reactor
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout
        self.max_unsent_bytes = max_unsent_bytes
        self.max_unsent_bytes_total = max_unsent_bytes_total
        self.close_timeout = close_timeout
        # How many bytes a connection's transport has not sent yet; tests
        # replace it.
        self.unsent_bytes: Callable[[object], int] = limits.unsent_bytes
        self.connections: set[KmipProtocol] = set()
        self._node_waiters: dict[KmipProtocol, None] = {}
        self._recheck: limits.DelayedCall | None = None
        self._in_flight: set[defer.Deferred] = set()
        self._closed_waiters: list[defer.Deferred[None]] = []

    def buildProtocol(self, addr: IAddress | None) -> KmipProtocol:
        return KmipProtocol(self)

    def release(self, proto: KmipProtocol) -> None:
        self.connections.discard(proto)
        self._node_waiters.pop(proto, None)
        self.unsent_changed()
        if not self.connections:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    # The node's cap on responses written and not yet sent.
    def unsent_total(self) -> int:
        return sum(self.unsent_bytes(p.transport) for p in self.connections if not p._lost)

    def over_node_cap(self) -> bool:
        return self.unsent_total() > self.max_unsent_bytes_total

    def wait_for_node(self, proto: KmipProtocol) -> None:
        self._node_waiters[proto] = None
        if self._recheck is None:
            # Buffers under the per-connection cap drain without telling
            # anyone: look again at intervals while someone waits.
            self._recheck = self.reactor.callLater(NODE_RECHECK_SECONDS, self._recheck_node)

    def _recheck_node(self) -> None:
        self._recheck = None
        self.unsent_changed()
        if self._node_waiters:
            self._recheck = self.reactor.callLater(NODE_RECHECK_SECONDS, self._recheck_node)

    def unsent_changed(self) -> None:
        """A connection's buffer drained or a connection went: connections
        held back by the node cap go on while the node is under it."""
        while self._node_waiters and not self.over_node_cap():
            proto = next(iter(self._node_waiters))
            del self._node_waiters[proto]
            proto.node_unblocked()

    def process(self, message: bytes, identity: object) -> defer.Deferred[bytes | None]:
        answer: Any = IN_POOL
        released = False
        handled: defer.Deferred[Any]
        if self.handle_inline is not None:
            try:
                answer = self.handle_inline(message, identity)
                if isinstance(answer, HeldAnswer):
                    # Released here rather than by a callback of a Deferred
                    # that already fired: chaining the Deferred it returns
                    # onto another cost a held read 1.6 us (issue 15).
                    handled, released = answer.release(), True
                else:
                    handled = defer.succeed(answer)
            except Exception:
                handled = defer.fail()
                answer = None
        if isinstance(answer, InPool):
            if answer.run is None:
                handled = deferToThreadPool(self.reactor, self.threadpool, self.handle, message, identity)
            else:
                handled = deferToThreadPool(self.reactor, self.threadpool, answer.run)
        d: defer.Deferred[bytes | None] = handled if released else handled.addCallback(_released)
        self._in_flight.add(d)

        def done(result: Any) -> Any:
            self._in_flight.discard(d)
            return result

        d.addBoth(done)
        return d

    @defer.inlineCallbacks
    def drain(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Fires when every request in flight has been answered, including
        requests already received that start as earlier ones finish."""
        while self._in_flight:
            yield defer.DeferredList(list(self._in_flight), consumeErrors=True)

    def close_all(self, timeout: float = 5.0) -> defer.Deferred[None]:
        """Close every connection once its pending responses are flushed;
        fires when all are closed, or after `timeout` seconds (stragglers
        are then aborted)."""
        if not self.connections:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._closed_waiters.append(d)
        for proto in list(self.connections):
            proto._close()

        def abort() -> None:
            for proto in list(self.connections):
                proto.transport.abortConnection()

        call = self.reactor.callLater(timeout, abort)

        def done(result: None) -> None:
            if call.active():
                call.cancel()
            return result

        d.addBoth(done)
        return d
