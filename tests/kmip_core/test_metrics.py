"""kmip_core.metrics and kmip_core.logs in process: readiness checks, the
[metrics] settings' refusals, request metrics, the listener on a real
loopback socket (two services' registries side by side), JSON log lines."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from kmip_core import logs
from kmip_core.config import ConfigError
from kmip_core.metrics import (
    MULTIPROCESS_ENV,
    MetricsListener,
    MetricsListenerError,
    Readiness,
    RequestMetrics,
    check_metrics_section,
    readiness_table,
    require_safe_bind,
)


def test_readiness_names_each_check_and_its_failure():
    readiness = Readiness()
    readiness.add("database", lambda: "postgresql, schema 0007")
    readiness.add("master_key", lambda: None)

    def broken():
        raise RuntimeError("connection refused\nsecond line never shown")

    readiness.add("kms", broken)
    report = readiness.run()
    assert not report.ready
    body = report.as_json()
    assert [c["name"] for c in body["checks"]] == ["database", "master_key", "kms"]
    assert body["checks"][0] == {"name": "database", "ok": True, "detail": "postgresql, schema 0007",
                                 "seconds": body["checks"][0]["seconds"]}
    assert body["checks"][1]["detail"] == "ok"
    assert body["checks"][2]["ok"] is False and body["checks"][2]["detail"] == "connection refused"
    with pytest.raises(ValueError, match="twice"):
        readiness.add("kms", lambda: None)


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::", "localhost"])
def test_plain_http_is_refused_off_loopback(host):
    with pytest.raises(MetricsListenerError, match="127.0.0.1"):
        require_safe_bind(host, None)
    with pytest.raises(MetricsListenerError):
        MetricsListener(None, CollectorRegistry(), Readiness(), host=host, port=0)
    require_safe_bind(host, object())  # mutual TLS: any address


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_plain_http_on_loopback(host):
    require_safe_bind(host, None)


def test_metrics_section_cross_checks():
    base = {"host": "127.0.0.1", "port": 9101, "cert": None, "key": None, "ca": None}
    check_metrics_section(base)
    check_metrics_section({**base, "host": "0.0.0.0", "port": None})  # off: nothing to refuse
    with pytest.raises(ConfigError, match="plain HTTP"):
        check_metrics_section({**base, "host": "0.0.0.0"})
    with pytest.raises(ConfigError, match="metrics.cert is set without metrics.key"):
        check_metrics_section({**base, "host": "0.0.0.0", "cert": "c.pem"})
    check_metrics_section({**base, "host": "0.0.0.0", "cert": "c.pem", "key": "k.pem", "ca": "ca.pem"})


def test_request_metrics_fold_undefined_operations():
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, "svc")
    metrics.request("CREATE", "SUCCESS", 0.01)
    metrics.request("0x7FFFFFFF", "OPERATION_NOT_SUPPORTED", 0.001)
    metrics.request("0x7FFFFFFE", "OPERATION_NOT_SUPPORTED", 0.001)
    metrics.database_event("retry")
    text = generate_latest(registry).decode()
    assert 'svc_requests_total{operation="CREATE",result="SUCCESS"} 1.0' in text
    assert 'svc_requests_total{operation="unknown",result="OPERATION_NOT_SUPPORTED"} 2.0' in text
    assert "0x7FFFFFFF" not in text
    assert 'svc_request_duration_seconds_count{operation="CREATE"} 1.0' in text
    assert 'svc_database_events_total{event="retry"} 1.0' in text


def test_readiness_table_says_unreachable():
    from rich.console import Console

    out = io.StringIO()
    Console(file=out, width=120).print(readiness_table("kms-server x", None, {"error": "no answer from x"}))
    assert "UNREACHABLE" in out.getvalue() and "no answer from x" in out.getvalue()


@pytest.fixture(scope="module")
def reactor():
    from twisted.internet import reactor as twisted_reactor

    thread = threading.Thread(target=twisted_reactor.run, kwargs={"installSignalHandlers": False}, daemon=True)
    thread.start()
    yield twisted_reactor
    twisted_reactor.callFromThread(twisted_reactor.stop)
    thread.join(10)


def _in_reactor(reactor, fn):
    from twisted.internet import threads

    return threads.blockingCallFromThread(reactor, fn)


def test_two_services_in_one_process_keep_their_own_registries(reactor):
    """Per-service registries: two listeners, same metric names, no collision."""
    listeners = []
    for name in ("one", "two"):
        registry = CollectorRegistry()
        metrics = RequestMetrics(registry, "svc")
        metrics.request("GET", "SUCCESS", 0.001)
        if name == "two":
            metrics.request("GET", "SUCCESS", 0.001)
        readiness = Readiness()
        readiness.add("always", lambda: "fine")
        listener = MetricsListener(reactor, registry, readiness, host="127.0.0.1", port=0)
        _in_reactor(reactor, listener.start)
        listeners.append(listener)
    try:
        texts = [urllib.request.urlopen(f"{listener.url}metrics", timeout=10).read().decode() for listener in listeners]
        assert 'svc_requests_total{operation="GET",result="SUCCESS"} 1.0' in texts[0]
        assert 'svc_requests_total{operation="GET",result="SUCCESS"} 2.0' in texts[1]
        body = json.loads(urllib.request.urlopen(f"{listeners[0].url}readyz", timeout=10).read())
        assert body == {"ready": True, "checks": [{"name": "always", "ok": True, "detail": "fine",
                                                   "seconds": body["checks"][0]["seconds"]}]}
    finally:
        for listener in listeners:
            _in_reactor(reactor, listener.stop)


def test_a_slow_check_answers_503_and_probes_share_one_run(reactor):
    release = threading.Event()
    runs = []

    def slow():
        runs.append(1)
        release.wait(10)
        return "late"

    readiness = Readiness()
    readiness.add("slow", slow)
    listener = MetricsListener(reactor, CollectorRegistry(), readiness, host="127.0.0.1", port=0, timeout=0.5)
    _in_reactor(reactor, listener.start)
    try:
        answers = []

        def probe():
            try:
                urllib.request.urlopen(f"{listener.url}readyz", timeout=10)
                answers.append(200)
            except urllib.error.HTTPError as exc:
                answers.append((exc.code, json.loads(exc.read())))

        probes = [threading.Thread(target=probe) for _ in range(3)]
        for p in probes:
            p.start()
        for p in probes:
            p.join(10)
        assert len(answers) == 3
        for code, body in answers:
            assert code == 503
            assert body["checks"][0]["name"] == "slow" and "no answer within 0.5 s" in body["checks"][0]["detail"]
        assert len(runs) == 1
        # While that run is still blocked, probes do not queue more runs.
        with pytest.raises(urllib.error.HTTPError) as still:
            urllib.request.urlopen(f"{listener.url}readyz", timeout=10)
        assert still.value.code == 503 and "has not returned yet" in still.value.read().decode()
        assert len(runs) == 1
        # Once it returns, the next probe runs the checks again.
        release.set()
        deadline = time.monotonic() + 10
        while True:
            try:
                body = json.loads(urllib.request.urlopen(f"{listener.url}readyz", timeout=10).read())
                break
            except urllib.error.HTTPError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert body["ready"] is True and body["checks"][0]["detail"] == "late"
        assert len(runs) == 2
    finally:
        release.set()
        time.sleep(0.1)
        _in_reactor(reactor, listener.stop)


def test_json_log_lines_carry_request_and_client():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter("kms-1"))
    logger = logging.getLogger("test.metrics.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        logger.info("outside")
        with logs.log_context("0123456789abcdef", "alice"):
            logger.info("request %s refused", "0123456789abcdef")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 3
    assert lines[0]["request_id"] is None and lines[0]["client"] is None
    assert lines[1] == {
        "time": lines[1]["time"], "level": "INFO", "node": "kms-1", "logger": "test.metrics.json",
        "message": "request 0123456789abcdef refused", "request_id": "0123456789abcdef", "client": "alice",
    }
    assert lines[1]["time"].endswith("Z")
    assert "ValueError: boom" in lines[2]["exception"]


def test_configure_text_stays_the_default(capsys):
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        logs.configure("INFO")
        logging.getLogger("test.metrics.text").info("plain")
        err = capsys.readouterr().err
        assert " INFO test.metrics.text: plain" in err and not err.lstrip().startswith("{")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_docs_name_every_metric_and_the_dashboard_only_real_ones():
    """docs/metrics.md lists every metric the services register, and the
    Grafana dashboard queries no metric that does not exist."""
    import re
    from pathlib import Path

    from broker.metrics import BrokerMetrics
    from kms_server.metrics import KmsMetrics

    docs = Path(__file__).resolve().parents[2] / "docs"
    documented = set(re.findall(r"^\| `((?:kms|vtpm_broker)_\w+)` \|", (docs / "metrics.md").read_text(), re.M))
    # Registered up front, and read on scrape (their collectors need a running service).
    registered = set()
    for metrics in (KmsMetrics("n"), BrokerMetrics("n")):
        for family in metrics.registry.collect():
            registered.add(family.name + ("_total" if family.type == "counter" else ""))
    on_scrape = {
        "kms_open_connections", "kms_worker_queue_depth", "kms_worker_threads_busy", "kms_worker_threads_max",
        "kms_objects", "kms_audit_sink_records", "vtpm_broker_open_connections", "vtpm_broker_worker_queue_depth",
        "vtpm_broker_kms_pool_connections", "vtpm_broker_hosts_by_attestation",
    }
    assert registered | on_scrape == documented
    dashboard = (docs / "grafana-dashboard.json").read_text()
    json.loads(dashboard)
    queried = {re.sub(r"_(bucket|count|sum)$", "", m) for m in re.findall(r"\b((?:kms|vtpm_broker)_[a-z_]+)", dashboard)}
    queried.discard("kms_instance")
    assert queried <= documented, queried - documented
    assert {"kms_requests_total", "vtpm_broker_unwraps_total", "vtpm_broker_unwrap_duration_seconds"} <= queried


def test_request_metrics_count_every_request_with_the_children_kept():
    registry = CollectorRegistry()
    metrics = RequestMetrics(registry, "t")
    for result in ("SUCCESS", "SUCCESS", "ITEM_NOT_FOUND"):
        metrics.request("Get", result, 0.001)
    metrics.request("Create", "SUCCESS")
    assert registry.get_sample_value("t_requests_total", {"operation": "Get", "result": "SUCCESS"}) == 2
    assert registry.get_sample_value("t_requests_total", {"operation": "Get", "result": "ITEM_NOT_FOUND"}) == 1
    assert registry.get_sample_value("t_requests_total", {"operation": "Create", "result": "SUCCESS"}) == 1
    assert registry.get_sample_value("t_request_duration_seconds_count", {"operation": "Get"}) == 3
    assert registry.get_sample_value("t_request_duration_seconds_count", {"operation": "Create"}) is None


_FORKED_COUNTS = """
import os, sys
import kmip_core.metrics  # sets the value class, before any value exists
from prometheus_client import CollectorRegistry, Counter, multiprocess
c = Counter("t_forked_total", "h", ["who"])
c.labels("parent").inc()
pid = os.fork()
if pid == 0:
    c.labels("child").inc(5)
    c.labels("parent").inc(0)  # the child's own file holds its own values
    os._exit(0)
os.waitpid(pid, 0)
c.labels("parent").inc()
registry = CollectorRegistry()
multiprocess.MultiProcessCollector(registry, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
print(registry.get_sample_value("t_forked_total", {"who": "parent"}),
      registry.get_sample_value("t_forked_total", {"who": "child"}),
      sorted(name.endswith(f"_{os.getpid()}.db") for name in os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])))
"""


def test_multiprocess_values_know_a_forked_child_from_its_parent(tmp_path):
    """The process id is kept rather than asked for at every inc (a system
    call each), and taken again in a forked child: the child writes its own
    file, never into its parent's."""
    import subprocess
    import sys

    env = {**os.environ, MULTIPROCESS_ENV: str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _FORKED_COUNTS], env=env, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split(maxsplit=2)
    assert out[:2] == ["2.0", "5.0"]
    assert out[2].strip() == "[False, True]"  # one file of the parent's, one of the child's


def test_a_multiprocess_directory_is_held_while_used_removed_after_and_what_killed_processes_left_goes(
    tmp_path, monkeypatch
):
    """A supervisor killed by SIGKILL cannot remove its metrics directory:
    the next one removes every directory of the prefix whose lock is free,
    and leaves the directory of a process that still runs, one without a
    lock file (an earlier release's) and one of another prefix."""
    import fcntl
    import tempfile

    from kmip_core.metrics import multiprocess_directory, remove_abandoned

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    prefix = "kms-test-metrics-"
    abandoned = tmp_path / f"{prefix}killed"
    abandoned.mkdir()
    (abandoned / ".held").touch()
    (abandoned / "counter_4242.db").write_bytes(b"\0" * 16)
    running = tmp_path / f"{prefix}running"
    running.mkdir()
    (running / ".held").touch()
    held = os.open(running / ".held", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)  # as its live process holds it
    older = tmp_path / f"{prefix}older-release"
    older.mkdir()
    other = tmp_path / "someone-else-killed"
    other.mkdir()
    (other / ".held").touch()
    try:
        with multiprocess_directory(prefix) as path:
            assert path.startswith(str(tmp_path / prefix)) and os.path.isdir(path)
            assert not abandoned.exists(), "left by a killed process: removed"
            assert running.exists() and older.exists() and other.exists()
            # While the block runs, the new directory is held: not removed by another start.
            assert remove_abandoned(prefix) == []
            assert os.path.isdir(path)
        assert not os.path.exists(path), "removed at the end of the block"
    finally:
        os.close(held)
    # Its process gone, the running one's directory is removed at the next sweep.
    assert remove_abandoned(prefix) == [str(running)]
    assert older.exists() and other.exists()
