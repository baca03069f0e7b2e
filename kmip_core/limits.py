"""Limits every TLS listener applies, whatever it speaks (KMIP, the audit
page's HTTPS, the broker's API and gateway): no client, with or without a
certificate, can hold more than a fixed share of a node.

`LimitedFactory` wraps a listener's protocol factory, in the style of
`twisted.protocols.policies.WrappingFactory`; with `reactor.listenSSL` its
protocols sit between TLS and the application protocol:

- A connection whose TLS handshake has not finished holds a *handshake*
  slot, at most `max_handshakes` of them; when they are all taken the
  oldest is dropped for the newcomer, so idle sockets cannot lock out a
  client that completes its handshake in milliseconds. A handshake not
  done within `handshake_timeout` is aborted.
- Only a completed handshake takes a *connection* slot (`max_connections`);
  one past the cap is closed at once.
- With `request_timeout` set (the HTTP listeners), a request must be
  read whole within that time of its first byte: a client that trickles
  one byte at a time is closed, however often it sends. The protocol says
  when a request is complete with `request_received(transport)`
  (`TimedRequest` does for twisted.web). The KMIP protocol keeps its own
  frame deadline instead.
- A connection being closed is aborted if it has not gone after
  `close_timeout`: a peer that never answers TLS's close_notify, or a
  socket nobody reads any more, cannot keep its slot.

`open_connections` counts both kinds of slots; it returns to zero when
every connection is gone, whatever happened on them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import abstract, defer
from twisted.internet.interfaces import IAddress, IHandshakeListener, IProtocol
from twisted.internet.protocol import Factory, connectionDone
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web import server
from zope.interface import implementer

log = logging.getLogger("kmip_core.limits")

__all__ = [
    "Deadline",
    "LimitedConnection",
    "LimitedFactory",
    "ListenerLimits",
    "TimedRequest",
    "pause_when_unsent_over",
    "request_received",
    "socket_transport",
    "unsent_bytes",
]


# What these modules use of Twisted's reactor, its timers and a listener's
# TLS transport, as typing Protocols: Twisted declares them as zope.interface
# Interfaces, whose methods mypy cannot call (they lack `self`) without the
# mypy-zope plugin.
class DelayedCall(Protocol):
    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, secondsFromNow: float) -> None: ...


class Reactor(Protocol):
    def callLater(self, delay: float, callable: Callable[..., Any], *args: Any, **kw: Any) -> DelayedCall: ...


class Transport(Protocol):
    """A listener's connection as its protocol sees it: TLS over TCP
    (ISSLTransport, ITCPTransport.abortConnection, IConsumer, IPushProducer)."""

    def getPeer(self) -> IAddress: ...

    def getPeerCertificate(self) -> Any: ...

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool) -> None: ...

    def unregisterProducer(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def resumeProducing(self) -> None: ...


@dataclass(frozen=True)
class ListenerLimits:
    """One listener's limits; the defaults suit a node on a small machine."""

    max_connections: int = 1024
    max_handshakes: int = 256
    handshake_timeout: float = 10.0
    close_timeout: float = 10.0
    request_timeout: float | None = None


class Deadline:
    """One timer on `reactor` that calls `expired` unless cancelled or
    restarted first; harmless to cancel twice or after it fired.

    Every request starts and cancels a connection's timers, so they are
    cheap: `cancel` only disarms, and `start` moves the pending call with
    `DelayedCall.reset` (lazy when it moves later, as a restart almost
    always does) instead of cancelling it and scheduling another. A
    disarmed call that comes due does nothing."""

    def __init__(self, reactor: Reactor, expired: Callable[[], None]):
        self._reactor = reactor
        self._expired = expired
        self._call: DelayedCall | None = None
        self._armed = False

    def start(self, seconds: float) -> None:
        self._armed = True
        if self._call is not None and self._call.active():
            self._call.reset(seconds)
        else:
            self._call = self._reactor.callLater(seconds, self._fire)

    def cancel(self) -> None:
        self._armed = False

    def stop(self) -> None:
        """Cancel and drop the pending call itself (the connection is gone)."""
        self._armed = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    @property
    def active(self) -> bool:
        return self._armed and self._call is not None and self._call.active()

    def _fire(self) -> None:
        self._call = None
        if self._armed:
            self._armed = False
            self._expired()


def socket_transport(transport: object) -> abstract.FileDescriptor | None:
    """The socket transport beneath `transport` (through TLS and wrappers),
    or None (an in-memory transport in tests)."""
    for _ in range(8):
        if transport is None or isinstance(transport, abstract.FileDescriptor):
            return transport
        # vars(): a ProtocolWrapper forwards unknown attributes to its own
        # transport, which would skip a layer.
        transport = vars(transport).get("transport")
    return None


def pause_when_unsent_over(socket: abstract.FileDescriptor, limit: int) -> None:
    """Make Twisted pause `socket`'s streaming producer once more than
    `limit` bytes wait in its write buffer. Twisted compares them with the
    transport's `bufferSize`, which is also how much each read asks the
    kernel for (`tcp.Connection.doRead`): a `bufferSize` of 4 MiB made every
    read allocate 4 MiB and give it back (mmap, a page fault, mremap and
    munmap: about 14 us of CPU per read, twice a Get's own decoding; issue
    15). So the limit goes on the check alone, and reads keep Twisted's
    size. The check reads the attributes Twisted's own reads (getattr:
    should Twisted rename them, back-pressure weakens, as in
    `unsent_bytes`, instead of every write failing); should Twisted rename
    the check, it pauses at its own 64 KiB, earlier than asked."""

    def full() -> bool:
        return len(getattr(socket, "dataBuffer", b"")) + getattr(socket, "_tempDataLen", 0) > limit

    socket._isSendBufferFull = full  # type: ignore[method-assign]


def unsent_bytes(transport: object) -> int:
    """Bytes written to `transport` that have not reached the kernel yet:
    what TLS holds back plus the socket transport's write buffer. Twisted
    has no public call for this; these are the attributes its own
    `FileDescriptor._isSendBufferFull` reads."""
    total = 0
    for _ in range(8):
        if transport is None:
            break
        if isinstance(transport, abstract.FileDescriptor):
            # getattr: should Twisted rename them, back-pressure from the
            # node cap weakens instead of every response failing.
            buffered = len(getattr(transport, "dataBuffer", b"")) - getattr(transport, "offset", 0)
            total += buffered + getattr(transport, "_tempDataLen", 0)
            break
        attributes = vars(transport)
        total += sum(len(chunk) for chunk in attributes.get("_appSendBuffer") or ())
        transport = attributes.get("transport")
    return total


@implementer(IHandshakeListener)
class LimitedConnection(ProtocolWrapper):
    """One connection's share of its listener's limits."""

    factory: LimitedFactory
    # Set by makeConnection before any event reaches the protocol.
    transport: Transport  # type: ignore[assignment]  # Twisted: ITransport | None, a zope Interface (see Transport)
    wrappedProtocol: Any  # Twisted: IProtocol, a zope Interface (see Transport)

    def __init__(self, factory: LimitedFactory, wrappedProtocol: IProtocol):
        super().__init__(factory, wrappedProtocol)
        self.state = "new"  # new, handshaking, established, refused, closed
        self.closing = False
        self.peer = "?"
        # Why the limits refused or dropped this connection, for the
        # protocol's own record of refusals (None: they did not).
        self.refusal: str | None = None
        self._producer_registered = False
        self._handshake_deadline = Deadline(factory.reactor, self._handshake_expired)
        self._close_deadline = Deadline(factory.reactor, self._close_expired)
        self._request_deadline = Deadline(factory.reactor, self._request_expired)

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        self.peer = f"{getattr(peer, 'host', '?')}:{getattr(peer, 'port', '?')}"
        self.factory._admit_handshake(self)

    def handshakeCompleted(self) -> None:
        self._handshake_deadline.cancel()
        if self.state != "handshaking":
            return
        if not self.factory._admit_connection(self):
            return
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def dataReceived(self, data: bytes) -> None:
        # A refused or closing connection gets nothing more to its protocol.
        if self.state == "established" and not self.closing:
            timeout = self.factory.limits.request_timeout
            if timeout is not None and not self._request_deadline.active:
                self._request_deadline.start(timeout)
            self.wrappedProtocol.dataReceived(data)

    def request_received(self) -> None:
        """The request being read is complete: its deadline stops."""
        self._request_deadline.cancel()

    def loseConnection(self) -> None:
        self.closing = True
        if not self._close_deadline.active and self.state not in ("closed", "refused"):
            self._close_deadline.start(self.factory.limits.close_timeout)
        # A registered producer would hold TLS's close back, and reading
        # must go on (the protocol may have paused it): the peer's
        # close_notify or FIN must be seen for the close to complete.
        self.unregisterProducer()
        self.transport.resumeProducing()
        super().loseConnection()

    def registerProducer(self, producer: object, streaming: bool) -> None:
        super().registerProducer(producer, streaming)
        self._producer_registered = True

    def unregisterProducer(self) -> None:
        if self._producer_registered:
            self._producer_registered = False
            super().unregisterProducer()

    def abort(self) -> None:
        self.closing = True
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._handshake_deadline.stop()
        self._close_deadline.stop()
        self._request_deadline.stop()
        self.factory._release(self)
        self.state = "closed"
        if self.wrappedProtocol is not None:
            super().connectionLost(reason)

    def _handshake_expired(self) -> None:
        if self.state == "handshaking":
            self.refusal = f"TLS handshake not done in {self.factory.limits.handshake_timeout}s"
            log.info("%s: closing %s: %s", self.factory.name, self.peer, self.refusal)
            self.abort()

    def _request_expired(self) -> None:
        if self.state == "established":
            log.info(
                "%s: closing %s: request not complete %ss after its first byte",
                self.factory.name,
                self.peer,
                self.factory.limits.request_timeout,
            )
            self.abort()

    def _close_expired(self) -> None:
        if self.state != "closed":
            log.info(
                "%s: aborting %s: close not done in %ss",
                self.factory.name,
                self.peer,
                self.factory.limits.close_timeout,
            )
            self.abort()


class LimitedFactory(WrappingFactory[LimitedConnection]):
    """Wraps a listener's protocol factory with `ListenerLimits`."""

    protocol = LimitedConnection

    def __init__(self, wrappedFactory: Factory[Any], limits: ListenerLimits, reactor: Reactor, name: str = "listener"):
        super().__init__(wrappedFactory)
        self.limits = limits
        self.reactor = reactor
        self.name = name
        # Insertion order is age: the first handshake is the oldest.
        self.handshaking: dict[LimitedConnection, None] = {}
        self.established: set[LimitedConnection] = set()
        self._gone_waiters: list[defer.Deferred] = []
        # Told the number of connections this listener holds whenever it
        # changes (a worker's share of a node's load: kmip_core.workers).
        self.on_count: Callable[[int], None] | None = None

    @property
    def open_connections(self) -> int:
        return len(self.handshaking) + len(self.established)

    def registerProtocol(self, p: LimitedConnection) -> None:
        super().registerProtocol(p)
        if self.on_count is not None:
            self.on_count(len(self.protocols))

    def buildProtocol(self, addr: IAddress | None) -> LimitedConnection | None:  # type: ignore[override]  # None refuses the connection, as Twisted's own Factory.buildProtocol may
        wrapped = self.wrappedFactory.buildProtocol(addr)
        if wrapped is None:
            return None
        return self.protocol(self, wrapped)

    def _admit_handshake(self, conn: LimitedConnection) -> None:
        if len(self.handshaking) >= self.limits.max_handshakes:
            oldest = next(iter(self.handshaking))
            log.warning(
                "%s: %d TLS handshakes in progress; dropping the oldest (%s)",
                self.name,
                len(self.handshaking),
                oldest.peer,
            )
            self.handshaking.pop(oldest)
            oldest.state = "refused"
            oldest.refusal = f"dropped for a newer connection: {len(self.handshaking) + 1} TLS handshakes in progress"
            oldest.abort()
        self.handshaking[conn] = None
        conn.state = "handshaking"
        conn._handshake_deadline.start(self.limits.handshake_timeout)

    def _admit_connection(self, conn: LimitedConnection) -> bool:
        self.handshaking.pop(conn, None)
        if len(self.established) >= self.limits.max_connections:
            conn.refusal = f"{len(self.established)} connections open (the cap)"
            log.warning("%s: refusing %s: %s", self.name, conn.peer, conn.refusal)
            conn.state = "refused"
            conn.abort()
            return False
        self.established.add(conn)
        conn.state = "established"
        return True

    def _release(self, conn: LimitedConnection) -> None:
        self.handshaking.pop(conn, None)
        self.established.discard(conn)

    def unregisterProtocol(self, p: LimitedConnection) -> None:
        super().unregisterProtocol(p)
        if self.on_count is not None:
            self.on_count(len(self.protocols))
        if not self.protocols:
            waiters, self._gone_waiters = self._gone_waiters, []
            for d in waiters:
                d.callback(None)

    def drain(self) -> defer.Deferred:
        """The wrapped factory's drain() (requests in flight answered), if
        it has one."""
        drain = getattr(self.wrappedFactory, "drain", None)
        return drain() if drain is not None else defer.succeed(None)

    def close_all(self, timeout: float = 5.0) -> defer.Deferred:
        """Close every connection, flushing what was written; fires when all
        are gone, or after `timeout` seconds (stragglers are then aborted)."""
        if not self.protocols:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._gone_waiters.append(d)
        for conn in list(self.protocols):
            conn.loseConnection()

        def abort() -> None:
            for conn in list(self.protocols):
                conn.abort()

        call = self.reactor.callLater(timeout, abort)

        def done(result: None) -> None:
            if call.active():
                call.cancel()
            return result

        d.addBoth(done)
        return d


def request_received(transport: object) -> None:
    """Tell the listener limits beneath `transport` that the request being
    read is complete (nothing happens without them)."""
    for _ in range(8):
        if transport is None:
            return
        if isinstance(transport, LimitedConnection):
            transport.request_received()
            return
        transport = getattr(transport, "__dict__", {}).get("transport")


class TimedRequest(server.Request):
    """A twisted.web request that stops its listener's request deadline
    once it has been read whole (headers and body)."""

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        request_received(self.channel.transport if self.channel is not None else None)
        return super().requestReceived(command, path, version)
