"""The monitoring listener of a real vtpm-broker process ([metrics], issue
17): /metrics names and counters that move with enrollments, rate-limit
refusals and gateway unwraps; /readyz naming its database, KMS pool and TLS
checks, unready while the KMS is away; `vtpm-broker admin status`."""

from __future__ import annotations

import json
import textwrap
import time

import broker_process
import pytest
import requests
from broker_process import Broker, new_key_and_csr
from conftest import start_server
from pg_cluster import free_port
from prometheus_text import metric_names, sample

from broker.keysafe import parse_key_safe
from kmip_core import pki
from kmip_core.client import KmipClient, KmipError

PROVIDER = broker_process.PROVIDER
BROKER_METRICS = (
    "vtpm_broker_enrollments_total",
    "vtpm_broker_rate_limit_refusals_total",
    "vtpm_broker_api_requests_total",
    "vtpm_broker_unwraps_total",
    "vtpm_broker_unwrap_duration_seconds",
    "vtpm_broker_kms_requests_total",
    "vtpm_broker_kms_requests_in_flight",
    "vtpm_broker_kms_request_duration_seconds",
    "vtpm_broker_kms_pool_connections",
    "vtpm_broker_open_connections",
    "vtpm_broker_worker_queue_depth",
    "vtpm_broker_gateway_requests_total",
    "vtpm_broker_gateway_request_duration_seconds",
)


@pytest.fixture
def kms(tmp_path, pki_dir):
    server = start_server(tmp_path / "kms", pki_dir, extra_config='[access]\nadministrators = ["admin"]\n')
    yield server
    server.stop()


@pytest.fixture
def broker(tmp_path, pki_dir, kms):
    workdir = tmp_path / "broker"
    workdir.mkdir()
    config = workdir / "broker.toml"
    metrics_port = free_port()
    config.write_text(
        textwrap.dedent(
            f"""
            [broker]
            provider_name = "{PROVIDER}"
            data_dir = "data"
            node_name = "broker-metrics"

            [api]
            port = 0
            enroll_per_minute = 3

            [gateway]
            port = 0

            [kms]
            nodes = ["127.0.0.1:{kms.port}"]
            ca = "{pki_dir / "ca.pem"}"
            connect_timeout = 2.0

            [roles]
            security_admins = ["secadmin"]
            administrators = ["vc-admin"]

            [metrics]
            port = {metrics_port}

            [logging]
            format = "json"
            """
        )
    )
    b = Broker(workdir, config, workdir / "data")
    b.cli("init")
    pki.sign_csr(pki_dir, workdir / "data" / "kms-client.csr", workdir / "data" / "kms-client.pem")
    b.start(metrics=True)
    b.metrics_url = f"http://127.0.0.1:{metrics_port}"
    yield b
    b.stop()


def scrape(broker) -> str:
    answer = requests.get(f"{broker.metrics_url}/metrics", timeout=30)
    assert answer.status_code == 200
    return answer.text


def test_broker_metrics_move_with_traffic(broker, kms, pki_dir):
    before = scrape(broker)
    assert set(BROKER_METRICS) <= metric_names(before)
    assert sample(before, "vtpm_broker_kms_pool_connections") == 8

    identity = broker_process.enroll(broker, "vc-metrics")
    placed = broker_process.register_host(broker, identity, "esx-m1")
    other = broker_process.register_host(broker, identity, "esx-m2")
    vm = broker_process.create_vm(broker, identity, host="esx-m1")
    ks = parse_key_safe(vm["key_safe"])
    node = f"127.0.0.1:{broker.gateway_port}"
    with KmipClient([node], placed[0], placed[1], broker.ca) as host:
        host.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
        host.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
    with KmipClient([node], other[0], other[1], broker.ca) as host:
        with pytest.raises(KmipError):
            host.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
    # A wrong token, then enrollments past [api] enroll_per_minute = 3.
    _, csr = new_key_and_csr(broker.workdir, "intruder")
    statuses = [
        broker.call("POST", "/v1/enroll", json={"instance": "intruder", "token": "wrong", "csr_pem": csr}).status_code
        for _ in range(4)
    ]
    assert 429 in statuses and statuses[0] != 429

    after = scrape(broker)
    assert set(BROKER_METRICS) <= metric_names(after)
    assert sample(after, "vtpm_broker_unwraps_total", result="allowed") == 2
    assert sample(after, "vtpm_broker_unwraps_total", result="refused") == 1
    assert sample(after, "vtpm_broker_unwrap_duration_seconds_count") == 3
    assert sample(after, "vtpm_broker_gateway_requests_total", operation="DECRYPT", result="SUCCESS") == 2
    assert sample(after, "vtpm_broker_gateway_requests_total", operation="DECRYPT", result="PERMISSION_DENIED") == 1
    assert sample(after, "vtpm_broker_enrollments_total", result="accepted") == 1
    refused = len([s for s in statuses if s not in (202, 429)])
    assert refused >= 1
    assert sample(after, "vtpm_broker_enrollments_total", result="refused") == refused
    assert sample(after, "vtpm_broker_enrollments_total", result="rate_limited") == statuses.count(429)
    assert sample(after, "vtpm_broker_rate_limit_refusals_total", endpoint="enroll") == statuses.count(429)
    # The VM's KEK (Create), its DEK (Encrypt) and two unwraps (Decrypt) went to the KMS.
    assert sample(after, "vtpm_broker_kms_requests_total", operation="DECRYPT", result="SUCCESS") == 2
    assert sample(after, "vtpm_broker_kms_requests_total", operation="CREATE", result="SUCCESS") >= 1
    assert sample(after, "vtpm_broker_kms_requests_in_flight") == 0
    assert sample(after, "vtpm_broker_api_requests_total", status="201") >= 3

    ready = requests.get(f"{broker.metrics_url}/readyz", timeout=30)
    assert ready.status_code == 200, ready.text
    assert [c["name"] for c in ready.json()["checks"]] == ["database", "kms", "tls"]

    status = broker.cli("admin", "status")
    assert "ready" in status.stdout and "database" in status.stdout and "kms" in status.stdout

    # The KMS goes away: the broker is alive, not ready, and says why.
    kms.stop()
    answer = requests.get(f"{broker.metrics_url}/readyz", timeout=30)
    assert answer.status_code == 503, answer.text
    checks = {c["name"]: c for c in answer.json()["checks"]}
    assert not checks["kms"]["ok"] and checks["database"]["ok"] and checks["tls"]["ok"]
    assert requests.get(f"{broker.metrics_url}/healthz", timeout=10).status_code == 200
    down = broker.cli("admin", "status", check=False)
    assert down.returncode == 1, down.stdout + down.stderr
    assert "NOT READY" in down.stdout and "kms" in down.stdout


def test_broker_json_logs(broker):
    """[logging] format = "json": every line one object; a gateway unwrap's
    lines carry its request id and the host, an API request's its id."""
    identity = broker_process.enroll(broker, "vc-logs")
    placed = broker_process.register_host(broker, identity, "esx-log")
    vm = broker_process.create_vm(broker, identity, host="esx-log")
    ks = parse_key_safe(vm["key_safe"])
    with KmipClient([f"127.0.0.1:{broker.gateway_port}"], placed[0], placed[1], broker.ca) as host:
        host.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
    time.sleep(0.5)
    records = [json.loads(line) for line in broker.log if line.strip()]
    assert records
    for record in records:
        assert {"time", "level", "node", "logger", "message", "request_id", "client"} <= set(record)
        assert record["node"] == "broker-metrics"
    unwrap = [r for r in records if "unwrap of key" in r["message"] and "allowed" in r["message"]]
    assert unwrap, records
    assert unwrap[0]["client"] == "host:esx-log"
    assert unwrap[0]["request_id"] and unwrap[0]["request_id"] in unwrap[0]["message"]
