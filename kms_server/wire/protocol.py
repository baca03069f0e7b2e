"""KMIP over TLS: one `KmipProtocol` per connection moves bytes, the
`KmipFactory` holds what connections share (limits, the worker pool, the
request handler).

Framing reads the 8-byte header of the Request Message and checks the
declared length against the limit before buffering anything more (like
`IntNStringReceiver.MAX_LENGTH`). Each complete message is handed to a
worker thread; the reactor thread never decodes business logic, touches
the database, or runs slow cryptography. Messages on one connection are
answered in order; different connections are served concurrently.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.threads import deferToThreadPool
from twisted.protocols.policies import TimeoutMixin
from zope.interface import implementer

from kms_server.wire import ttlv

log = logging.getLogger("kms_server.wire")

REQUEST_MESSAGE_TAG = 0x420078
# Complete requests a connection may have waiting behind the one being
# processed; beyond this the connection stops being read (TCP back-pressure),
# so a pipelining client cannot make the server buffer without bound.
MAX_QUEUED_REQUESTS = 4


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


@implementer(IHandshakeListener)
class KmipProtocol(protocol.Protocol, TimeoutMixin):
    def __init__(self, factory: KmipFactory):
        self.factory = factory
        self._buffer = bytearray()
        self._expected: int | None = None
        self._queue: deque[bytes] = deque()
        self._busy = False
        self._identity = None
        self._closing = False
        self._paused = False
        self._admitted = False
        self._handshake_done = False
        self.peer = ""

    def callLater(self, period, func):
        # TimeoutMixin would use the global reactor; use the factory's so
        # that embedding code and tests control time.
        return self.factory.reactor.callLater(period, func)

    # Connection events.
    def connectionMade(self):
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        if not self.factory.admit(self):
            log.warning("refusing connection from %s: %d connections open", self.peer, self.factory.max_connections)
            self.transport.abortConnection()
            return
        self._admitted = True
        # Until the handshake completes the shorter handshake timeout applies,
        # so clients that never finish it cannot hold connection slots.
        self.setTimeout(self.factory.handshake_timeout)

    def handshakeCompleted(self):
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
        self.setTimeout(self.factory.idle_timeout)

    def connectionLost(self, reason=protocol.connectionDone):
        self.setTimeout(None)
        if self._admitted and not self._handshake_done:
            self.factory.refused(self.peer, f"TLS handshake failed: {reason.getErrorMessage()}", None)
        self.factory.release(self)

    def timeoutConnection(self):
        log.info("closing idle connection from %s", self.peer)
        self.transport.abortConnection()

    # Framing.
    def dataReceived(self, data: bytes):
        if self._closing:
            return
        if self._identity is None:
            # Data before the handshake finished should not happen with TLS;
            # refuse rather than process an unauthenticated request.
            self._close()
            return
        self.resetTimeout()
        self._buffer += data
        while True:
            if self._expected is None:
                if len(self._buffer) < ttlv.HEADER_SIZE:
                    return
                try:
                    self._expected = check_frame_header(bytes(self._buffer[: ttlv.HEADER_SIZE]), self.factory.max_message_size)
                except (FramingError, ttlv.TTLVError) as exc:
                    log.info("closing connection from %s: %s", self.peer, exc)
                    self._close()
                    return
            if len(self._buffer) < self._expected:
                return
            message = bytes(self._buffer[: self._expected])
            del self._buffer[: self._expected]
            self._expected = None
            self._queue.append(message)
            self._next()
            if len(self._queue) >= MAX_QUEUED_REQUESTS and not self._paused:
                self._paused = True
                self.transport.pauseProducing()

    def _next(self):
        if self._busy or not self._queue or self._closing:
            return
        self._busy = True
        # A request being processed is not idleness: no idle timeout until
        # it is answered, however slow it is.
        self.setTimeout(None)
        message = self._queue.popleft()
        if self._paused and len(self._queue) < MAX_QUEUED_REQUESTS:
            self._paused = False
            self.transport.resumeProducing()
        d = self.factory.process(message, self._identity)
        d.addCallbacks(self._respond, self._failed)

    def _respond(self, response: bytes | None):
        self._busy = False
        if response is None:
            self._close()
            return
        if not self._closing:
            self.transport.write(response)
            self.setTimeout(self.factory.idle_timeout)
        self._next()

    def _failed(self, failure):
        self._busy = False
        log.error("request from %s failed outside the dispatcher: %s", self.peer, failure.getErrorMessage())
        self._close()

    def _close(self):
        self._closing = True
        self.transport.loseConnection()

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._queue)


class KmipFactory(protocol.Factory):
    """What every connection shares. `handle(message, identity)` runs on the
    worker pool and returns the response bytes, or None to close."""

    def __init__(
        self,
        handle: Callable[[bytes, object], bytes | None],
        identify: Callable[[object, str], object],
        threadpool,
        reactor,
        max_message_size: int = 1 << 20,
        idle_timeout: float = 300.0,
        handshake_timeout: float = 10.0,
        max_connections: int = 1024,
        refused: Callable[[str, str, object], None] | None = None,
    ):
        self.handle = handle
        # Told of every connection refused at the TLS layer (peer, reason,
        # the certificate if one was presented): the audit trail.
        self.refused = refused or (lambda peer, reason, certificate: None)
        self.identify = identify
        self.threadpool = threadpool
        self.reactor = reactor
        self.max_message_size = max_message_size
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.max_connections = max_connections
        self.connections: set[KmipProtocol] = set()
        self._in_flight: set[defer.Deferred] = set()
        self._closed_waiters: list[defer.Deferred] = []

    def buildProtocol(self, addr):
        return KmipProtocol(self)

    def admit(self, proto: KmipProtocol) -> bool:
        if len(self.connections) >= self.max_connections:
            return False
        self.connections.add(proto)
        return True

    def release(self, proto: KmipProtocol) -> None:
        self.connections.discard(proto)
        if not self.connections:
            waiters, self._closed_waiters = self._closed_waiters, []
            for d in waiters:
                d.callback(None)

    def process(self, message: bytes, identity) -> defer.Deferred:
        d = deferToThreadPool(self.reactor, self.threadpool, self.handle, message, identity)
        self._in_flight.add(d)

        def done(result):
            self._in_flight.discard(d)
            return result

        d.addBoth(done)
        return d

    @defer.inlineCallbacks
    def drain(self):
        """Fires when every request in flight has been answered, including
        requests already received that start as earlier ones finish."""
        while self._in_flight:
            yield defer.DeferredList(list(self._in_flight), consumeErrors=True)

    def close_all(self, timeout: float = 5.0) -> defer.Deferred:
        """Close every connection once its pending responses are flushed;
        fires when all are closed, or after `timeout` seconds (stragglers
        are then aborted)."""
        if not self.connections:
            return defer.succeed(None)
        d = defer.Deferred()
        self._closed_waiters.append(d)
        for proto in list(self.connections):
            proto.transport.loseConnection()

        def abort():
            for proto in list(self.connections):
                proto.transport.abortConnection()

        call = self.reactor.callLater(timeout, abort)
        d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])
        return d
