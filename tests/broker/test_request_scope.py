"""broker/request_scope.py: inside a request scope the broker's audit
records carry the request id (an optional body field: a trail mixing old
and new records verifies) and KMIP requests carry the correlation value;
refusals are counted so the API records each refusal once."""

from __future__ import annotations

import json
import threading

import pytest

from broker.db import Database
from broker.request_scope import correlation_value, current_request_id, refusal_recorded, request_scope
from broker.trust import Registry
from kmip_core.client import current_correlation


@pytest.fixture
def registry(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
    db.create_all()
    yield Registry(db)
    db.close()


def test_correlation_value_names_whom_the_broker_acts_for():
    assert correlation_value("0123456789abcdef", "host:esx-01") == "broker-req=0123456789abcdef;host=esx-01"
    assert correlation_value("ab", "instance:vc-a") == "broker-req=ab;instance=vc-a"
    assert correlation_value("ab", "user:alice") == "broker-req=ab;user=alice"
    assert correlation_value("ab", "anonymous@127.0.0.1:5") == "broker-req=ab"
    assert correlation_value("ab", None) == "broker-req=ab"


def test_records_carry_the_request_id_inside_a_scope_and_the_trail_verifies(registry):
    registry.record_audit("local-security-admin", "token.issue", "vc-a", True, "outside any request")
    with request_scope("0123456789abcdef", "host:esx-01"):
        assert current_request_id() == "0123456789abcdef"
        assert current_correlation() == "broker-req=0123456789abcdef;host=esx-01"
        assert not refusal_recorded()
        registry.record_audit("host:esx-01", "gateway.unwrap", "key:1", False, "refused")
        assert refusal_recorded()
    assert current_request_id() is None and current_correlation() is None
    bodies = [json.loads(r.body) for r in registry.audit_records()]
    assert "request_id" not in bodies[0]
    assert bodies[1]["request_id"] == "0123456789abcdef"
    assert registry.verify_audit() == []


def test_scopes_are_per_thread(registry):
    seen = {}
    ready = threading.Barrier(2)

    def work(rid):
        with request_scope(rid, f"host:h{rid}"):
            ready.wait()
            registry.record_audit(f"host:h{rid}", "gateway.unwrap", "key:1", True, "ok")
            seen[rid] = (current_request_id(), current_correlation())

    threads = [threading.Thread(target=work, args=(rid,)) for rid in ("aaaa", "bbbb")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"aaaa": ("aaaa", "broker-req=aaaa;host=haaaa"), "bbbb": ("bbbb", "broker-req=bbbb;host=hbbbb")}
    by_actor = {r.actor: json.loads(r.body)["request_id"] for r in registry.audit_records()}
    assert by_actor == {"host:haaaa": "aaaa", "host:hbbbb": "bbbb"}
