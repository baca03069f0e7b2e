"""Fuzzing the TTLV codec and the KMIP framing with real client traffic.

tests/kms_server/wire/test_ttlv.py already checks round trips of random
trees and random bytes; these properties start from the captured vCenter
and OASIS requests (tests/fixtures/fuzz/) and mutate them where a decoder
is most likely wrong: declared lengths, type bytes, nesting, truncation.
The framing properties feed the same bytes through the real KmipProtocol
on an in-memory transport, cut at arbitrary points.
"""

from __future__ import annotations

import pytest
from fuzz.fuzz_support import (
    SEED_ITEMS,
    SEEDS,
    budget,
    depth,
    mutated_bytes,
    mutated_tree,
    nested,
    structure_depth,
    trees,
)
from hypothesis import given
from hypothesis import strategies as st
from twisted_fakes import FakeReactor, InlineThreadPool, TLSStringTransport

from kmip_core import protocol as wire
from kmip_core import ttlv
from kmip_core.ttlv import TTLVError

SEED = st.sampled_from(SEED_ITEMS)


def decode_or_ttlv_error(data: bytes, max_depth: int = ttlv.DEFAULT_MAX_DEPTH):
    """The decoded item, or None when the codec refused the bytes with its
    own error; any other exception fails the test."""
    try:
        return ttlv.decode(data, max_depth)
    except TTLVError:
        return None


# --- The codec ---------------------------------------------------------------------------


def test_every_seed_decodes_and_encodes_to_the_same_bytes():
    """The seeds are real client messages: they must decode, and the codec
    must give back exactly the bytes the client sent."""
    assert len(SEEDS) > 200
    for data in SEEDS:
        assert ttlv.encode(ttlv.decode(data)) == data


@budget(200)
@given(SEED.flatmap(mutated_tree))
def test_structure_aware_mutations_round_trip(item):
    """decode(encode(x)) == x for a real request with values, types and
    shape changed, as long as it is within the nesting limit."""
    data = ttlv.encode(item)
    if structure_depth(item) > ttlv.DEFAULT_MAX_DEPTH:
        with pytest.raises(TTLVError, match="nesting deeper"):
            ttlv.decode(data)
        return
    assert ttlv.decode(data) == item


@budget(300)
@given(SEED.flatmap(mutated_bytes))
def test_corrupted_real_messages_raise_only_ttlv_error(data):
    """Lengths, type bytes and tags of a real message corrupted, bits
    flipped, bytes cut or spliced: the codec answers a tree or TTLVError,
    never another exception; a tree it accepts encodes back to bytes that
    decode to the same tree."""
    item = decode_or_ttlv_error(data)
    if item is not None:
        assert ttlv.decode(ttlv.encode(item)) == item


@budget(200)
@given(st.binary(min_size=8, max_size=8), st.binary(max_size=64))
def test_any_header_over_any_body_raises_only_ttlv_error(header, body):
    """Every one of the 2^64 headers, over a body that may or may not fit."""
    item = decode_or_ttlv_error(header + body)
    if item is not None:
        assert ttlv.encode(item) == header + body or ttlv.decode(ttlv.encode(item)) == item


@budget(100)
@given(st.integers(0, 200), st.integers(1, 40))
def test_nesting_is_refused_past_the_limit_not_by_recursion(levels, max_depth):
    """Deep nesting is a TTLVError decided by the limit, never a
    RecursionError, whatever the limit."""
    data = nested(levels, leaf=ttlv.integer(0x420002, 7))
    item = decode_or_ttlv_error(data, max_depth)
    if levels <= max_depth:
        assert item is not None and depth(item) == levels + 1
    else:
        assert item is None


def test_very_deep_nesting_is_refused_cheaply():
    """100,000 levels (800 kB): refused at the limit, not after recursing."""
    with pytest.raises(TTLVError, match="nesting deeper"):
        ttlv.decode(nested(100_000))


@budget(150)
@given(SEED, st.data())
def test_every_truncation_and_extension_of_a_real_message_is_refused(item, data):
    encoded = ttlv.encode(item)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    with pytest.raises(TTLVError):
        ttlv.decode(encoded[:cut])
    with pytest.raises(TTLVError, match="trailing"):
        ttlv.decode(encoded + data.draw(st.binary(min_size=1, max_size=16)))


@budget(100)
@given(trees(20), st.integers(1, 40))
def test_the_depth_limit_is_exact(item, max_depth):
    """A tree decodes under a limit exactly when its depth allows it."""
    data = ttlv.encode(item)
    result = decode_or_ttlv_error(data, max_depth)
    assert (result is not None) == (structure_depth(item) <= max_depth)


# --- Framing ---------------------------------------------------------------------------------


class Connection:
    """One KmipProtocol over an in-memory transport; the handler answers
    every message with its length so that the output shows what was framed."""

    def __init__(self, max_message_size: int = 1 << 20):
        self.handled: list[bytes] = []
        self.factory = wire.KmipFactory(
            handle=self.handle,
            identify=lambda certificate, peer: "alice",
            threadpool=InlineThreadPool(),
            reactor=FakeReactor(),
            max_message_size=max_message_size,
        )
        self.protocol = self.factory.buildProtocol(None)
        self.transport = TLSStringTransport()
        self.protocol.makeConnection(self.transport)
        self.protocol.handshakeCompleted()

    def handle(self, message: bytes, identity) -> bytes:
        self.handled.append(message)
        return len(message).to_bytes(8, "big")

    def feed(self, chunks: list[bytes]) -> tuple[list[bytes], bytes, bool]:
        for chunk in chunks:
            self.protocol.dataReceived(chunk)
        return self.handled, self.transport.value(), self.transport.disconnecting


def cut(data: bytes, points: list[int]) -> list[bytes]:
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@st.composite
def streams(draw) -> bytes:
    """Several real requests back to back, possibly followed by a corrupted
    one or by garbage: what a pipelining (or hostile) client writes."""
    messages = [ttlv.encode(draw(SEED)) for _ in range(draw(st.integers(1, 4)))]
    tail = draw(st.one_of(st.just(b""), SEED.flatmap(mutated_bytes), st.binary(max_size=32)))
    return b"".join(messages) + tail


@budget(200)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=12))
def test_chunking_of_a_request_stream_changes_nothing(data, points):
    """Whatever the cuts, the same messages reach the handler in the same
    order, the same answers leave, and the connection ends the same way."""
    whole = Connection().feed([data])
    chunked = Connection().feed(cut(data, points))
    assert chunked == whole


@budget(60)
@given(streams())
def test_byte_at_a_time_equals_one_write(data):
    whole = Connection().feed([data])
    assert Connection().feed([data[i : i + 1] for i in range(len(data))]) == whole


@budget(150)
@given(st.lists(SEED, min_size=1, max_size=3), st.lists(st.integers(0, 10_000), max_size=8))
def test_pipelined_real_requests_are_each_delivered_whole_once(items, points):
    messages = [ttlv.encode(i) for i in items]
    handled, output, closed = Connection().feed(cut(b"".join(messages), points))
    assert handled == messages
    assert output == b"".join(len(m).to_bytes(8, "big") for m in messages)
    assert not closed


@budget(150)
@given(st.binary(min_size=8, max_size=8), st.integers(8, 1 << 21))
def test_framing_refuses_before_buffering(header, limit):
    """A header that cannot start a request, or declares more than the
    limit, closes the connection at once: nothing after it is buffered or
    handled."""
    connection = Connection(max_message_size=limit)
    handled, _, closed = connection.feed([header, bytes(4096)])
    try:
        total = wire.check_frame_header(header, limit)
    except (wire.FramingError, TTLVError):
        assert closed and handled == []
        return
    assert total <= limit
    if total <= 8 + 4096:
        assert len(handled) == 1 and handled[0] == (header + bytes(4096))[:total]
