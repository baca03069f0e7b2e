#!/usr/bin/env python3
"""The ceiling: a stand-in KMIP server on kms-server's own stack that
answers every request with a canned, well-formed response.

    .venv/bin/python bench/ceiling_server.py --cert server.pem --key server.key --ca ca.pem
        [--host 127.0.0.1] [--port 0] [--worker-threads 16] [--processes N] [--in-reactor]

Same stack as kms-server, down to the parts a request goes through before it
reaches the dispatcher: Twisted's reactor, pyOpenSSL with the server's own
TLS context (`kmip_core.tls`: mutual TLS, the same suites and verify callback),
the listener limits (`kmip_core.limits`), the project's framing and connection
handling (`kmip_core.protocol.KmipFactory`), the hand-off of every request to a
worker thread pool, the client certificate mapped to an identity, and the
request decoded with the project's TTLV codec. What it leaves out: storage,
cryptography, access checks, the audit trail. Its answer depends on the
request's operation only (and echoes the protocol version and batch item
IDs): Create says SymmetricKey with a fixed Unique Identifier, Get returns a
fixed 32-byte AES key, Locate that one identifier, GetAttributes State
PRE_ACTIVE / AES / 256, DiscoverVersions the versions kms-server speaks;
every other operation Success with an empty payload.

Run alone, it is one process handing every request to its thread pool:
the reference issue 15 measured when it was filed (kms-server then
answered on a thread pool too). kms-server now answers most requests in
its reactor thread and runs one process per core. `--in-reactor` answers
every request in the reactor thread (twice the Gets a second of the
thread pool on two cores), and `--processes N` runs N processes on one
listening socket, as kms-server's `[server] processes` does
(kmip_core.workers). `bench/kmip_throughput.py` starts it with
`--in-reactor` (one process: on two cores its clients leave it no more),
so that no KMIP server on this stack answers faster there. Prints
"ceiling listening on HOST:PORT" once it accepts connections; SIGTERM or
SIGINT stops it (every process) after the requests in flight are
answered.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from kmip.core.enums import (  # noqa: E402
    CryptographicAlgorithm,
    KeyFormatType,
    ObjectType,
    Operation,
    ResultStatus,
    State,
    Tags,
)

from kmip_core import limits, tls, ttlv, workers  # noqa: E402
from kmip_core.config import TlsConfig  # noqa: E402
from kmip_core.protocol import KmipFactory  # noqa: E402

T = Tags
CANNED_UID = "00000000-0000-4000-8000-00000000ce11"
CANNED_KEY = bytes(range(32))
# What kms-server answers to DiscoverVersions without a list, newest first.
VERSIONS = ((2, 0), (1, 4), (1, 3), (1, 2), (1, 1), (1, 0))

log = logging.getLogger("ceiling")


def _version(major: int, minor: int) -> ttlv.Item:
    return ttlv.structure(
        T.PROTOCOL_VERSION.value,
        [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, major), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, minor)],
    )


def _attribute(name: str, value: ttlv.Item) -> ttlv.Item:
    return ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), value])


def _payload(operation: int) -> list[ttlv.Item]:
    """The children of the canned Response Payload of `operation`."""
    uid = ttlv.text(T.UNIQUE_IDENTIFIER.value, CANNED_UID)
    value = T.ATTRIBUTE_VALUE.value
    if operation == Operation.CREATE.value:
        return [ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value), uid]
    if operation == Operation.GET.value:
        key_block = ttlv.structure(
            T.KEY_BLOCK.value,
            [
                ttlv.enumeration(T.KEY_FORMAT_TYPE.value, KeyFormatType.RAW.value),
                ttlv.structure(T.KEY_VALUE.value, [ttlv.byte_string(T.KEY_MATERIAL.value, CANNED_KEY)]),
                ttlv.enumeration(T.CRYPTOGRAPHIC_ALGORITHM.value, CryptographicAlgorithm.AES.value),
                ttlv.integer(T.CRYPTOGRAPHIC_LENGTH.value, 256),
            ],
        )
        return [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            uid,
            ttlv.structure(T.SYMMETRIC_KEY.value, [key_block]),
        ]
    if operation == Operation.GET_ATTRIBUTES.value:
        return [
            uid,
            _attribute("State", ttlv.enumeration(value, State.PRE_ACTIVE.value)),
            _attribute("Cryptographic Algorithm", ttlv.enumeration(value, CryptographicAlgorithm.AES.value)),
            _attribute("Cryptographic Length", ttlv.integer(value, 256)),
        ]
    if operation == Operation.DISCOVER_VERSIONS.value:
        return [_version(*v) for v in VERSIONS]
    if operation in (
        Operation.LOCATE.value,
        Operation.DESTROY.value,
        Operation.ACTIVATE.value,
        Operation.REVOKE.value,
        Operation.ADD_ATTRIBUTE.value,
    ):
        return [uid]
    return []


class CannedAnswers:
    """Response bytes for a Request Message, from pre-encoded parts."""

    def __init__(self, timestamp: int | None = None):
        self.timestamp = int(time.time()) if timestamp is None else timestamp
        self._items: dict[int, bytes] = {}
        self._headers: dict[tuple[int, int, int], bytes] = {}
        self._whole: dict[tuple[int, int, int], bytes] = {}

    def _item(self, operation: int, batch_id: bytes | None) -> bytes:
        """The encoded Batch Item for `operation`, with the request's Unique
        Batch Item ID when it had one."""
        parts = [
            ttlv.encode(ttlv.enumeration(T.OPERATION.value, operation)),
            b"" if batch_id is None else ttlv.encode(ttlv.byte_string(T.UNIQUE_BATCH_ITEM_ID.value, batch_id)),
            self._body(operation),
        ]
        return _wrap(T.BATCH_ITEM.value, b"".join(parts))

    def _body(self, operation: int) -> bytes:
        body = self._items.get(operation)
        if body is None:
            body = ttlv.encode(ttlv.enumeration(T.RESULT_STATUS.value, ResultStatus.SUCCESS.value)) + ttlv.encode(
                ttlv.structure(T.RESPONSE_PAYLOAD.value, _payload(operation))
            )
            self._items[operation] = body
        return body

    def _header(self, major: int, minor: int, count: int) -> bytes:
        key = (major, minor, count)
        header = self._headers.get(key)
        if header is None:
            header = ttlv.encode(
                ttlv.structure(
                    T.RESPONSE_HEADER.value,
                    [
                        _version(major, minor),
                        ttlv.date_time(T.TIME_STAMP.value, self.timestamp),
                        ttlv.integer(T.BATCH_COUNT.value, count),
                    ],
                )
            )
            self._headers[key] = header
        return header

    def answer(self, message: bytes) -> bytes | None:
        """The response to `message`, or None (close the connection) when it
        is not a Request Message the codec can read."""
        try:
            request = ttlv.decode(message)
        except ttlv.TTLVError:
            return None
        header = request.find(T.REQUEST_HEADER.value)
        version = None if header is None else header.find(T.PROTOCOL_VERSION.value)
        if version is None:
            return None
        major = version.get(T.PROTOCOL_VERSION_MAJOR.value, 1)
        minor = version.get(T.PROTOCOL_VERSION_MINOR.value, 0)
        items = request.find_all(T.BATCH_ITEM.value)
        operations = [(i.get(T.OPERATION.value, 0), i.get(T.UNIQUE_BATCH_ITEM_ID.value)) for i in items]
        if len(operations) == 1 and operations[0][1] is None:
            key = (major, minor, operations[0][0])
            whole = self._whole.get(key)
            if whole is None:
                whole = _wrap(T.RESPONSE_MESSAGE.value, self._header(major, minor, 1) + self._item(key[2], None))
                self._whole[key] = whole
            return whole
        body = b"".join(self._item(op, batch_id) for op, batch_id in operations)
        return _wrap(T.RESPONSE_MESSAGE.value, self._header(major, minor, len(operations)) + body)


def _wrap(tag: int, body: bytes) -> bytes:
    """A Structure around already encoded children (whose lengths are
    multiples of 8)."""
    return tag.to_bytes(3, "big") + bytes([ttlv.ItemType.STRUCTURE]) + len(body).to_bytes(4, "big") + body


def build(reactor, cert: Path, key: Path, ca: Path, worker_threads: int = 16, in_reactor: bool = False):
    """(listener factory, TLS context factory, thread pool) wired the way
    kms_server.server wires its own; with `in_reactor`, every request is
    answered in the reactor thread (KmipFactory's `handle_inline`)."""
    from twisted.python.threadpool import ThreadPool

    context_factory = tls.server_context_factory(
        TlsConfig(cert=cert, key=key, ca=ca, trusted_clients_dir=cert.parent / "no-pins", identity="cn", min_version="1.2")
    )
    threadpool = ThreadPool(minthreads=1, maxthreads=worker_threads, name="ceiling-workers")
    canned = CannedAnswers()

    def identify(certificate, peer: str):
        if certificate is None:
            raise ValueError("no client certificate")
        return tls.peer_identity(certificate, "cn")

    def answer(message: bytes, identity) -> bytes:
        return canned.answer(message)

    factory = KmipFactory(
        handle=answer,
        identify=identify,
        threadpool=threadpool,
        reactor=reactor,
        handle_inline=answer if in_reactor else None,
    )
    listener = limits.LimitedFactory(
        factory,
        limits.ListenerLimits(max_connections=1024, max_handshakes=256, handshake_timeout=10.0),
        reactor,
        name="ceiling",
    )
    return listener, context_factory, threadpool, factory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--ca", type=Path, required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--worker-threads", type=int, default=16, help="the thread pool's size (kms-server's default: 16)")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="processes sharing the listening socket, as kms-server's [server] processes (default 1)",
    )
    p.add_argument("--in-reactor", action="store_true", help="answer every request in the reactor thread")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.processes < 1:
        print(f"ceiling_server: --processes {args.processes}: give 1 or more", file=sys.stderr)
        return 2
    slot = workers.worker_slot()
    if slot is None and args.processes > 1:
        return _supervise(args)
    if slot is not None:
        workers.stop_with_parent()

    from twisted.internet import reactor

    try:
        listener, context_factory, threadpool, factory = build(
            reactor, args.cert, args.key, args.ca, args.worker_threads, args.in_reactor
        )
    except Exception as exc:  # a one-line error, no traceback
        if slot is not None:
            workers.report_failed(slot, str(exc))
            return 2
        print(f"ceiling_server: {exc}", file=sys.stderr)
        return 2
    threadpool.start()
    if slot is None:
        port = reactor.listenSSL(args.port, listener, context_factory, interface=args.host)
        address = port.getHost()
        print(f"ceiling listening on {address.host}:{address.port}", flush=True)
    else:
        # The supervisor's socket, wrapped as listenSSL wraps its own; the
        # processes take turns at it by load, as kms-server's workers do.
        port = workers.adopt_tls_port(reactor, slot, context_factory, listener)[0]
        workers.report_ready(slot)

    def stop(*_):
        reactor.callFromThread(_shutdown)

    def _shutdown():
        d = port.stopListening()
        d.addBoth(lambda _: factory.drain())
        d.addBoth(lambda _: factory.close_all(2.0))
        d.addBoth(lambda _: threadpool.stop())
        d.addBoth(lambda _: reactor.stop())

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    reactor.run(installSignalHandlers=False)
    return 0


def _supervise(args) -> int:
    """`--processes` processes of this script on one listening socket
    (kmip_core.workers): bind it, start them, run until told to stop."""
    try:
        listener = workers.bind_listener(args.host, args.port)
    except OSError as exc:
        print(f"ceiling_server: cannot listen on {args.host}:{args.port} ({exc.strerror or exc})", file=sys.stderr)
        return 2
    host, port = listener.getsockname()[:2]
    supervisor = workers.Supervisor(workers.worker_argv(), listener, args.processes, name="ceiling worker")
    try:
        supervisor.start()
    except (workers.StartFailed, KeyboardInterrupt) as exc:
        listener.close()
        supervisor.load.close()
        print(f"ceiling_server: {exc}", file=sys.stderr)
        return 2
    print(f"ceiling listening on {host}:{port}", flush=True)
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
