"""Multi-part (streaming) Encrypt and Decrypt in progress on this node.

KMIP 1.3 added Init Indicator, Correlation Value and Final Indicator: a
client sends the data of one encryption or decryption in several requests.
Between them the cipher's state has to live somewhere; it lives here, in
this node's memory, under a random Correlation Value that only the client
that began the stream may use, for the same key and operation. A stream is
therefore bound to the node that began it (another node of the cluster
answers that it knows no such stream), and it is lost when the node
restarts. Nothing of it is stored or logged.

Limits keep a client from filling the node's memory: at most
`per_client` open streams per client and `total` in all, and a stream idle
for `idle_seconds` is dropped.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kmip_core import errors

if TYPE_CHECKING:
    from kms_server.keystore.crypto import CipherStream

__all__ = ["Stream", "Streams"]

CORRELATION_BYTES = 16


@dataclass
class Stream:
    client: str
    uid: str
    operation: str
    cipher: CipherStream
    last_used: float = field(default=0.0)
    # Held while one part runs: a cipher context takes its parts in order,
    # one at a time.
    busy: threading.Lock = field(default_factory=threading.Lock)

    def done(self) -> None:
        """The part that `Streams.take` handed out has been processed."""
        self.busy.release()


class Streams:
    def __init__(
        self,
        *,
        per_client: int = 16,
        total: int = 1024,
        idle_seconds: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.per_client = per_client
        self.total = total
        self.idle_seconds = idle_seconds
        self.clock = clock
        self._lock = threading.Lock()
        self._streams: dict[bytes, Stream] = {}

    def __len__(self) -> int:
        with self._lock:
            self._expire()
            return len(self._streams)

    def begin(self, client: str, uid: str, operation: str, cipher: CipherStream) -> bytes:
        """Keep `cipher` for the client's next parts; its Correlation Value."""
        with self._lock:
            self._expire()
            if len(self._streams) >= self.total:
                raise errors.GeneralFailure(
                    f"this node has {self.total} multi-part operations open; finish or abandon some and retry"
                )
            if sum(1 for s in self._streams.values() if s.client == client) >= self.per_client:
                raise errors.PermissionDenied(
                    f"at most {self.per_client} multi-part operations may be open per client; "
                    "finish one (Final Indicator) first"
                )
            correlation = secrets.token_bytes(CORRELATION_BYTES)
            self._streams[correlation] = Stream(client, uid, operation, cipher, self.clock())
            return correlation

    def take(self, correlation: bytes, client: str, uid: str, operation: str, final: bool) -> Stream:
        """The stream a Correlation Value names, if it is this client's, for
        this key and operation; removed when `final`. The caller processes
        its part and then calls `stream.done()`; a part sent while another
        one of the same stream runs is refused."""
        with self._lock:
            self._expire()
            stream = self._streams.get(correlation)
            if stream is None or stream.client != client:
                raise errors.InvalidField(
                    "the Correlation Value names no multi-part operation of this client on this node "
                    f"(it ended, was idle for more than {self.idle_seconds:g} s, or began on another node)"
                )
            if stream.uid != uid or stream.operation != operation:
                raise errors.InvalidField(
                    f"the Correlation Value belongs to a {stream.operation} with key {stream.uid}"
                )
            if not stream.busy.acquire(blocking=False):
                raise errors.InvalidField(
                    "another part of this multi-part operation is being processed; send the parts one after another"
                )
            if final:
                del self._streams[correlation]
            else:
                stream.last_used = self.clock()
            return stream

    def abandon(self, correlation: bytes) -> None:
        """Drop a stream whose part failed: it cannot go on."""
        with self._lock:
            self._streams.pop(correlation, None)

    def _expire(self) -> None:
        limit = self.clock() - self.idle_seconds
        for correlation in [c for c, s in self._streams.items() if s.last_used < limit]:
            del self._streams[correlation]
