"""kmip_core.audit.chain: a record's time text and the float stored beside
it (`stamp`, issue 15) are what `format_time` and `parse_time` give, so
records written since hash and verify exactly as before."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from kmip_core.audit.chain import format_time, parse_time, stamp

# 2001 to 2200: the trail's times are the server's clock.
TIMES = st.floats(min_value=978_307_200.0, max_value=7_258_118_400.0, allow_nan=False)


@given(TIMES)
def test_stamp_text_is_the_strftime_format(t):
    text, _ = stamp(t)
    assert text == datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert format_time(t) == text


@given(TIMES)
def test_stamp_float_is_what_the_text_parses_back_to(t):
    text, at = stamp(t)
    assert at == parse_time(text)
    assert abs(at - t) < 1e-5


def test_whole_seconds_keep_their_microseconds_field():
    assert stamp(1_700_000_000.0)[0] == "2023-11-14T22:13:20.000000Z"


def test_half_microseconds_and_the_carry_into_the_next_second_round_as_datetime_does():
    """Half a microsecond rounds to even, as datetime.fromtimestamp rounds
    it, and a fraction that rounds up to a whole second moves the second."""
    for t in (
        1_700_000_000.0000005,
        1_700_000_000.0000015,
        1_700_000_000.9999995,
        1_700_000_000.9999996,
        1_699_999_999.99999999,
    ):
        text, at = stamp(t)
        assert text == datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"), t
        assert at == parse_time(text)
    assert stamp(1_700_000_000.9999996)[0] == "2023-11-14T22:13:21.000000Z"
