"""kms_server.keystore.streams: multi-part operations kept between requests,
each usable only by the client that began it, for its key and operation,
within limits and an idle timeout."""

from __future__ import annotations

import pytest

from kmip_core import errors
from kms_server.keystore.streams import Streams


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_stream_is_found_only_by_its_client_key_and_operation():
    streams = Streams()
    cipher = object()
    value = streams.begin("alice", "k1", "ENCRYPT", cipher)
    assert len(value) == 16 and streams.begin("alice", "k1", "ENCRYPT", object()) != value
    for client, uid, op in (("bob", "k1", "ENCRYPT"), ("alice", "k2", "ENCRYPT"), ("alice", "k1", "DECRYPT")):
        with pytest.raises(errors.InvalidField):
            streams.take(value, client, uid, op, final=False)
    stream = streams.take(value, "alice", "k1", "ENCRYPT", final=False)
    assert stream.cipher is cipher
    stream.done()
    stream = streams.take(value, "alice", "k1", "ENCRYPT", final=True)
    assert stream.cipher is cipher
    stream.done()
    with pytest.raises(errors.InvalidField, match="names no multi-part operation"):
        streams.take(value, "alice", "k1", "ENCRYPT", final=True)


def test_limits_per_client_and_in_all():
    streams = Streams(per_client=2, total=3)
    streams.begin("alice", "k", "ENCRYPT", object())
    streams.begin("alice", "k", "ENCRYPT", object())
    with pytest.raises(errors.PermissionDenied, match="at most 2"):
        streams.begin("alice", "k", "ENCRYPT", object())
    streams.begin("bob", "k", "ENCRYPT", object())
    with pytest.raises(errors.GeneralFailure, match="3 multi-part operations open"):
        streams.begin("carol", "k", "ENCRYPT", object())


def test_idle_streams_expire_and_use_keeps_one_alive():
    clock = Clock()
    streams = Streams(idle_seconds=60, clock=clock)
    kept = streams.begin("alice", "k", "ENCRYPT", object())
    dropped = streams.begin("alice", "k", "ENCRYPT", object())
    clock.now += 50
    streams.take(kept, "alice", "k", "ENCRYPT", final=False).done()
    clock.now += 50
    assert len(streams) == 1
    streams.take(kept, "alice", "k", "ENCRYPT", final=False).done()
    with pytest.raises(errors.InvalidField, match="idle for more than 60 s"):
        streams.take(dropped, "alice", "k", "ENCRYPT", final=False)


def test_abandon_drops_a_stream():
    streams = Streams()
    value = streams.begin("alice", "k", "ENCRYPT", object())
    streams.abandon(value)
    streams.abandon(value)
    assert len(streams) == 0


def test_one_part_at_a_time():
    """A cipher context takes its parts in order: a part sent while another
    of the same stream is being processed is refused, and the stream goes
    on once that one is done."""
    streams = Streams()
    value = streams.begin("alice", "k", "ENCRYPT", object())
    running = streams.take(value, "alice", "k", "ENCRYPT", final=False)
    with pytest.raises(errors.InvalidField, match="one after another"):
        streams.take(value, "alice", "k", "ENCRYPT", final=False)
    running.done()
    streams.take(value, "alice", "k", "ENCRYPT", final=True).done()
    assert len(streams) == 0
