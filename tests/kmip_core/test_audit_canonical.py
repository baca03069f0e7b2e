"""kmip_core.audit.chain.canonical: the bytes every record's hash is taken
over. They must never change, whatever encodes them (issue 15 made one
encoder serve every record)."""

from __future__ import annotations

import math

import pytest

from kmip_core.audit.chain import canonical, record_hash


def test_canonical_text_is_sorted_compact_and_unescaped():
    body = {"time": "2026-12-04T21:00:00.000001Z", "client": {"role": "user", "name": "é"}, "seq": 2, "a": [1, None, True]}
    text = canonical(body)
    assert text == '{"a":[1,null,true],"client":{"name":"é","role":"user"},"seq":2,"time":"2026-12-04T21:00:00.000001Z"}'
    # Pinned: a record's hash depends on these exact bytes.
    assert record_hash(text) == record_hash(canonical(dict(reversed(list(body.items())))))


@pytest.mark.parametrize("number", [math.nan, math.inf])
def test_canonical_refuses_what_json_cannot_say_exactly(number):
    with pytest.raises(ValueError):
        canonical({"x": number})


def test_canonical_keeps_no_state_between_records():
    nested = {"a": {"b": {"c": 1}}}
    assert canonical(nested) == canonical(nested) == '{"a":{"b":{"c":1}}}'
    cyclic: dict = {}
    cyclic["self"] = cyclic
    with pytest.raises(ValueError):
        canonical(cyclic)
    assert canonical(nested) == '{"a":{"b":{"c":1}}}'
