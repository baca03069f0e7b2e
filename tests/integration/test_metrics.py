"""The monitoring listener of a real kms-server process ([metrics], issue 17):
/metrics names and counters that move with traffic, /healthz, /readyz that
turns unready when the database goes away and ready again when it returns,
JSON log lines, and a listener off loopback without TLS refused at start."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import time

import pytest
import requests
from conftest import start_server
from prometheus_text import metric_names, sample

from kmip_core.client import KmipClient, KmipError

KMS_METRICS = (
    "kms_requests_total",
    "kms_request_duration_seconds",
    "kms_database_events_total",
    "kms_tls_handshake_failures_total",
    "kms_audit_records_written_total",
    "kms_audit_write_failures_total",
    "kms_open_connections",
    "kms_worker_queue_depth",
    "kms_worker_threads_busy",
    "kms_objects",
)


def monitor_url(server) -> str:
    return server.announced("kms-server metrics on").rsplit(" ", 1)[1].rstrip("/")


def kms_admin(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def client(server, pki, name: str = "alice") -> KmipClient:
    return KmipClient(
        [f"127.0.0.1:{server.port}"], pki / f"{name}.pem", pki / f"{name}.key", pki / "ca.pem", server_name="localhost"
    )


def test_metrics_names_and_counters_move_with_traffic(tmp_path, pki_dir):
    server = start_server(tmp_path / "node", pki_dir, extra_config="[metrics]\nport = 0\n")
    try:
        url = monitor_url(server)
        assert url.startswith("http://127.0.0.1:")
        assert requests.get(f"{url}/healthz", timeout=10).json() == {"alive": True}
        before = requests.get(f"{url}/metrics", timeout=10)
        assert before.status_code == 200
        assert before.headers["content-type"].startswith("text/plain")
        assert set(KMS_METRICS) - {"kms_objects"} <= metric_names(before.text)

        with client(server, pki_dir) as c:
            uid = c.create_symmetric_key("AES", 256)
            c.get_key(uid)
            c.activate(uid)
            with pytest.raises(KmipError):
                c.get_key("no-such-object")
            during = requests.get(f"{url}/metrics", timeout=10).text
            assert sample(during, "kms_open_connections", listener="kmip") >= 1
        # A client without a certificate the node accepts: a handshake failure.
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{server.port}/", verify=False, timeout=10)

        after = requests.get(f"{url}/metrics", timeout=10).text
        assert set(KMS_METRICS) <= metric_names(after)
        assert sample(after, "kms_requests_total", operation="CREATE", result="SUCCESS") == 1
        assert sample(after, "kms_requests_total", operation="GET", result="SUCCESS") == 1
        assert sample(after, "kms_requests_total", operation="GET", result="ITEM_NOT_FOUND") == 1
        assert sample(after, "kms_request_duration_seconds_count", operation="CREATE") == 1
        assert sample(after, "kms_audit_records_written_total") >= 4 + sample(
            before.text, "kms_audit_records_written_total"
        )
        # SQLite: the Create, the first Get (it clears Fresh) and Activate
        # were written in the reactor's batches of writes.
        assert sample(after, "kms_write_batches_total", result="committed") >= 1
        assert sample(after, "kms_batched_writes_total") >= 3
        deadline = time.monotonic() + 10
        while sample(after, "kms_tls_handshake_failures_total", reason="handshake") < 1:
            assert time.monotonic() < deadline, after
            time.sleep(0.2)
            after = requests.get(f"{url}/metrics", timeout=10).text
        # Objects are counted at most every 10 s: the first scrape's count
        # (none yet) may still be the one served.
        deadline = time.monotonic() + 15
        while sample(after, "kms_objects", object_type="SYMMETRIC_KEY", state="ACTIVE") != 1:
            assert time.monotonic() < deadline, after
            time.sleep(0.5)
            after = requests.get(f"{url}/metrics", timeout=10).text
        assert sample(after, "kms_worker_queue_depth") == 0

        ready = requests.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 200
        body = ready.json()
        assert body["ready"] is True
        assert [c["name"] for c in body["checks"]] == ["database", "master_key", "tls", "audit_trail"]
        assert all(c["ok"] for c in body["checks"])
        assert requests.post(f"{url}/metrics", timeout=10).status_code == 405
        # kms-admin cluster status shows the same checks, in a table.
        status = kms_admin("cluster", "status", "--config", server.workdir / "kms.toml", "--metrics", url)
        assert status.returncode == 0, status.stderr
        assert f"kms-server {url}: ready" in status.stdout
        for check in ("database", "master_key", "tls", "audit_trail"):
            assert check in status.stdout
        assert requests.get(f"{url}/other", timeout=10).status_code == 404
    finally:
        server.stop()


def test_metrics_port_flag_and_json_logs(tmp_path, pki_dir):
    """--metrics-port turns the listener on; [logging] format = "json" gives
    one JSON object per line with the request id and client, and no key."""
    workdir = tmp_path / "node"
    start_server(workdir, pki_dir).stop()  # writes the configuration
    config = workdir / "kms.toml"
    config.write_text(config.read_text().replace('level = "INFO"', 'level = "DEBUG"\nformat = "json"'))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms_server.cli", "--config", str(config), "--metrics-port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        port = url = None
        for line in proc.stdout:
            if "listening on" in line:
                port = int(line.strip().rsplit(":", 1)[1])
            if "metrics on" in line:
                url = line.strip().rsplit(" ", 1)[1].rstrip("/")
                break
        assert port and url, proc.stderr.read() if proc.poll() is not None else "no metrics line"
        with KmipClient(
            [f"127.0.0.1:{port}"], pki_dir / "alice.pem", pki_dir / "alice.key", pki_dir / "ca.pem",
            server_name="localhost",
        ) as c:
            uid = c.create_symmetric_key("AES", 256)
            key = c.get_key(uid)
            with pytest.raises(KmipError):
                c.get_key("no-such-object")
        assert requests.get(f"{url}/readyz", timeout=10).status_code == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"time", "level", "node", "logger", "message", "request_id", "client"} <= set(record)
        assert record["node"] == "node"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["time"])
    refused = [r for r in records if "ITEM_NOT_FOUND" in r["message"]]
    assert refused and refused[0]["client"] == "alice" and re.fullmatch(r"[0-9a-f]{16}", refused[0]["request_id"])
    assert refused[0]["request_id"] in refused[0]["message"]
    for form in (key.hex(), key.hex().upper(), base64.b64encode(key).decode()):
        assert form not in err


def test_readyz_follows_the_database(tmp_path, pki_dir):
    pg_cluster = pytest.importorskip("pg_cluster")
    reason = pg_cluster.available()
    if reason:
        pytest.skip(reason)
    cluster = pg_cluster.PgCluster(standby=False).start()
    server = None
    try:
        server = start_server(
            tmp_path / "node",
            pki_dir,
            db_url=cluster.primary.url,
            extra_config="[metrics]\nport = 0\n",
        )
        url = monitor_url(server)

        def readiness() -> tuple[int, dict]:
            answer = requests.get(f"{url}/readyz", timeout=30)
            return answer.status_code, {c["name"]: c for c in answer.json()["checks"]}

        status, checks = readiness()
        assert status == 200, checks
        assert checks["database"]["detail"].startswith("postgresql")

        shown = kms_admin("cluster", "status", "--config", server.workdir / "kms.toml", "--metrics", url)
        assert shown.returncode == 0 and ": ready" in shown.stdout, shown.stdout + shown.stderr

        cluster.primary.stop()
        status, checks = readiness()
        assert status == 503, checks
        assert not checks["database"]["ok"]
        assert checks["master_key"]["ok"] and checks["tls"]["ok"]
        # Alive all the same: a load balancer tells "down" from "not ready".
        assert requests.get(f"{url}/healthz", timeout=10).status_code == 200
        assert requests.get(f"{url}/metrics", timeout=30).status_code == 200

        cluster.primary.start()
        deadline = time.monotonic() + 30
        while True:
            status, checks = readiness()
            if status == 200:
                break
            assert time.monotonic() < deadline, checks
            time.sleep(0.5)
        assert all(c["ok"] for c in checks.values())
    finally:
        if server is not None:
            server.stop()
        cluster.close()


def test_metrics_off_loopback_without_tls_is_refused(tmp_path, pki_dir):
    with pytest.raises(RuntimeError) as refused:
        start_server(tmp_path / "node", pki_dir, extra_config='[metrics]\nhost = "0.0.0.0"\nport = 0\n')
    message = str(refused.value)
    assert "plain HTTP off this machine" in message and "127.0.0.1" in message
    assert "Traceback" not in message


def test_metrics_with_mutual_tls(tmp_path, pki_dir):
    """With [metrics] cert, key and ca the listener speaks HTTPS and wants a
    client certificate from that CA; status commands present one."""
    server = start_server(
        tmp_path / "node",
        pki_dir,
        extra_config=f"""
        [metrics]
        port = 0
        cert = "{pki_dir / 'server.pem'}"
        key = "{pki_dir / 'server.key'}"
        ca = "{pki_dir / 'ca.pem'}"
        """,
    )
    try:
        url = monitor_url(server)
        assert url.startswith("https://127.0.0.1:")
        url = url.replace("127.0.0.1", "localhost")  # the name the server certificate carries
        ca = str(pki_dir / "ca.pem")
        with pytest.raises(requests.exceptions.RequestException):
            requests.get(f"{url}/metrics", verify=ca, timeout=10)
        alice = (str(pki_dir / "alice.pem"), str(pki_dir / "alice.key"))
        answer = requests.get(f"{url}/metrics", verify=ca, cert=alice, timeout=10)
        assert answer.status_code == 200 and "kms_requests_total" in answer.text
        assert requests.get(f"{url}/readyz", verify=ca, cert=alice, timeout=10).json()["ready"] is True
        status = kms_admin(
            "cluster", "status", "--config", server.workdir / "kms.toml", "--metrics", url,
            "--cert", alice[0], "--key", alice[1],
        )
        assert status.returncode == 0 and ": ready" in status.stdout, status.stdout + status.stderr
    finally:
        server.stop()


def test_a_node_on_postgresql_counts_the_writes_its_commits_serve(tmp_path, pki_dir, postgres_url):
    """On PostgreSQL every write runs on a worker thread, its commit shared
    with the writers queued behind it (WriteBatches): the node counts those
    commits and the writes they served."""
    server = start_server(tmp_path / "node", pki_dir, extra_config="[metrics]\nport = 0\n", db_url=postgres_url)
    try:
        url = monitor_url(server)
        with client(server, pki_dir) as c:
            for _ in range(3):
                c.create_symmetric_key("AES", 256)
        after = requests.get(f"{url}/metrics", timeout=10).text
        commits = sample(after, "kms_shared_commits_total", result="committed")
        writes = sample(after, "kms_shared_commit_writes_total")
        # Three Creates, each its own write transaction (alone here: one
        # client, one request at a time), each in a committed batch.
        assert commits >= 3 and writes >= 3 and writes >= commits, after
        assert sample(after, "kms_shared_commits_total", result="failed") in (0, None)
    finally:
        server.stop()
