"""The enrollment route is the one route anyone who reaches the broker can
call without a certificate: it is limited per address (429 with
Retry-After), and nothing else is."""

from __future__ import annotations

from broker.api import Api, ApiRequest, RateLimit
from broker.config import load_config


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_token_bucket_per_address():
    clock = Clock()
    limit = RateLimit(3, clock=clock)
    assert [limit.take("10.0.0.1") for _ in range(3)] == [0, 0, 0]
    assert limit.take("10.0.0.1") == 20  # one token comes back every 20 s
    assert limit.take("10.0.0.2") == 0  # another address has its own bucket
    clock.now += 20
    assert limit.take("10.0.0.1") == 0
    assert limit.take("10.0.0.1") == 20
    assert all(RateLimit(0, clock=clock).take("10.0.0.1") == 0 for _ in range(100))


def test_idle_addresses_are_forgotten_when_many_are_tracked(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(RateLimit, "MAX_TRACKED", 10)
    limit = RateLimit(60, clock=clock)
    for i in range(10):
        limit.take(f"10.0.0.{i}")
    clock.now += 120  # every bucket is full again
    limit.take("10.0.1.1")
    assert len(limit._buckets) <= 2


def _api(tmp_path, per_minute: int) -> Api:
    config = tmp_path / "broker.toml"
    config.write_text(
        f'[broker]\nprovider_name = "kp"\ndata_dir = "{tmp_path / "data"}"\n[api]\nenroll_per_minute = {per_minute}\n'
    )
    return Api(load_config(config), registry=None, vmkeys=None)


def test_enrollment_beyond_the_limit_gets_429_with_retry_after(tmp_path):
    api = _api(tmp_path, 2)
    request = ApiRequest("POST", "/v1/enroll", body=b"not json", peer="192.0.2.7:40000")
    assert [api.dispatch(request).status for _ in range(2)] == [400, 400]
    refused = api.dispatch(request)
    assert refused.status == 429 and refused.headers["Retry-After"] == "30"
    assert "retry in 30 s" in refused.body["error"]
    # Another address, and the routes that need a certificate, are not limited by it.
    assert api.dispatch(ApiRequest("POST", "/v1/enroll", body=b"x", peer="192.0.2.8:1")).status == 400
    assert api.dispatch(ApiRequest("GET", "/v1/vms", peer="192.0.2.7:40001")).status == 401
