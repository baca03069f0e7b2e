"""One node on several worker processes (`[server] processes`,
kmip_core.workers, docs/process-model.md), as an operator runs it: both
workers serve on the one port, the audit chain stays one chain, SIGTERM
stops them all, SIGHUP reloads every one, a worker that dies is started
again, a killed supervisor leaves no worker behind, a worker that cannot
start fails the node with its one-line reason, and the audit page (worker
0's alone) shows the records every worker wrote."""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import start_server
from kmip.core import enums
from kmip_client import pykmip, tls_context

from kmip_core.audit import audit_key

pytestmark = pytest.mark.slow


def worker_pids(server) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(server.proc.pid)], capture_output=True, text=True).stdout
    return sorted(int(pid) for pid in out.split())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def established_by_pid(port: int, pids: list[int]) -> dict[int, int]:
    """How many ESTABLISHED TCP sockets on local `port` each pid holds."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01":
            inodes.add(fields[9])
    counts = {}
    for pid in pids:
        count = 0
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                count += 1
        counts[pid] = count
    return counts


def sync_helpers_of(pids: list[int]) -> list[int]:
    """The log sync helpers (kms_server/storage/log_sync.py) the workers
    `pids` started and that still run."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if parent in pids and b"log_sync.py" in command and alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def wait_until(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def audit_verify(workdir: Path) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", "audit", "verify", "--config", str(workdir / "kms.toml")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def node(tmp_path, pki_dir):
    server = start_server(tmp_path / "node", pki_dir, server_config="processes = 2")
    yield server
    server.stop()


def test_two_workers_serve_one_port_and_keep_one_audit_chain(node, pki_dir):
    pids = worker_pids(node)
    assert len(pids) == 2, pids
    clients = [pykmip(node, pki_dir) for _ in range(16)]
    try:
        uids = []
        for client in clients:
            uid = client.create(enums.CryptographicAlgorithm.AES, 256)
            assert client.get(uid).value is not None
            uids.append(uid)
        # The workers took turns at the one socket by load: the clients,
        # connected one after the other, are split evenly (a kernel hash
        # of the addresses split 16 evenly 1 time in 5).
        held = established_by_pid(node.port, pids)
        assert sum(held.values()) == len(clients), held
        assert sorted(held.values()) == [8, 8], held

        # Writes through both workers at once: one chain, no fork in it.
        errors: list[BaseException] = []

        def work(client):
            try:
                for _ in range(5):
                    client.destroy(client.create(enums.CryptographicAlgorithm.AES, 128))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
    finally:
        for client in clients:
            client.close()
    report = audit_verify(node.workdir)
    # 16 x (Create, Get) + 16 x 5 x (Create, Destroy) records, all chained.
    assert "audit trail intact" in report, report
    assert f"{16 * 2 + 16 * 5 * 2} records" in report, report


def test_sigterm_stops_every_worker_and_sighup_reloads_every_one(node, pki_dir):
    pids = worker_pids(node)
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: node.stderr_text().count("TLS material reloaded") >= 2, what="both workers reloading")
    client = pykmip(node, pki_dir)
    uid = client.create(enums.CryptographicAlgorithm.AES, 256)
    client.get(uid)  # the first Get clears Fresh: a write
    assert client.get(uid).value is not None  # a read: its record synced by the worker's helper
    client.close()
    helpers = sync_helpers_of(pids)
    assert len(helpers) == 2, "each worker started its sync helper"
    assert node.stop(signal.SIGTERM) == 0, node.stderr_text()
    assert not any(alive(pid) for pid in pids)
    wait_until(lambda: not any(alive(pid) for pid in helpers), what="the sync helpers to exit with their workers")
    wait_until(lambda: node.stderr_text().count("kms_server.server: stopped") >= 2, what="both workers' last line")
    assert node.stderr_text().count("kms_server.server: stopped") == 2, node.stderr_text()


def test_a_worker_that_dies_is_started_again(node, pki_dir):
    first, second = worker_pids(node)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: len(worker_pids(node)) == 2 and first not in worker_pids(node), what="a new worker")
    assert second in worker_pids(node)
    assert node.logged("exited with status -9; starting it again"), node.stderr_text()
    for _ in range(4):  # New connections land on either worker: all answered.
        client = pykmip(node, pki_dir)
        uid = client.create(enums.CryptographicAlgorithm.AES, 256)
        assert client.get(uid).value is not None
        client.close()


def shared_metrics_of(pid: int) -> Path:
    """The directory of shared counters a worker was given."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return Path(next(v for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")).split(b"=", 1)[1].decode())


def test_a_killed_supervisor_leaves_no_worker_behind_and_the_next_start_removes_its_metrics(node, tmp_path, pki_dir):
    pids = worker_pids(node)
    shared = shared_metrics_of(pids[0])
    for _ in range(4):  # reads on both workers, most likely: each starts a sync helper
        client = pykmip(node, pki_dir)
        uid = client.create(enums.CryptographicAlgorithm.AES, 256)
        client.get(uid)  # clears Fresh: a write
        client.get(uid)  # a read
        client.close()
    helpers = sync_helpers_of(pids)
    assert helpers, "a sync helper runs"
    node.proc.kill()
    node.proc.wait(10)
    wait_until(lambda: not any(alive(pid) for pid in pids), what="the workers to stop with their supervisor")
    wait_until(lambda: not any(alive(pid) for pid in helpers), what="the sync helpers to exit with their workers")
    assert shared.is_dir(), "SIGKILL left no chance to remove it"
    # The next node to start (any node of this host) removes it, and keeps its own.
    other = start_server(tmp_path / "other", pki_dir, server_config="processes = 2")
    try:
        assert not shared.exists()
        assert shared_metrics_of(worker_pids(other)[0]).is_dir()
    finally:
        other.stop()


def test_a_worker_that_cannot_start_fails_the_node_in_one_line(tmp_path, pki_dir):
    """The database belongs to another master key: every worker refuses it;
    the node exits 2 with the workers' reason, prints no listening line and
    leaves no process behind."""
    workdir = tmp_path / "node"
    first = start_server(workdir, pki_dir, server_config="processes = 1")
    first.stop()
    (workdir / "master.key").write_text(os.urandom(32).hex() + "\n")
    config = workdir / "kms.toml"
    config.write_text(config.read_text().replace("processes = 1", "processes = 2"))
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.cli", "--config", str(config)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "listening on" not in result.stdout
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("kms-server: error:")]
    assert len(error_lines) == 1 and "master key" in error_lines[0], result.stderr
    leftover = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True).stdout
    assert leftover.strip() == ""


def test_processes_need_a_shared_database(tmp_path):
    config = tmp_path / "kms.toml"
    config.write_text(
        '[server]\nprocesses = 2\n[storage]\ndb_url = "sqlite:///:memory:"\n[master_key]\nfile = "/nonexistent"\n'
    )
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.cli", "--config", str(config), "--check-config"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "server.processes > 1 needs a database the processes share" in result.stderr
    assert "Traceback" not in result.stderr


def test_metrics_count_the_requests_of_every_worker(tmp_path, pki_dir):
    """Worker 0 serves /metrics; the counters are the sums over both workers
    (prometheus-client's multi-process mode), not worker 0's share."""
    import urllib.request

    from prometheus_text import sample

    server = start_server(tmp_path / "node", pki_dir, server_config="processes = 2", extra_config="[metrics]\nport = 0\n")
    try:
        url = server.announced("kms-server metrics on").rsplit(" ", 1)[1].rstrip("/")
        pids = worker_pids(server)
        # This node's own directory of shared counters, as its workers were given it.
        shared = shared_metrics_of(pids[0])
        assert list(shared.glob(f"*_{pids[0]}.db")), "worker 0 writes its counters there"
        clients = [pykmip(server, pki_dir) for _ in range(16)]
        try:
            for client in clients:
                client.create(enums.CryptographicAlgorithm.AES, 256)
            held = established_by_pid(server.port, pids)
            assert all(count > 0 for count in held.values()), held  # both workers served some
        finally:
            for client in clients:
                client.close()
        with urllib.request.urlopen(f"{url}/metrics", timeout=10) as answer:
            text = answer.read().decode()
        assert sample(text, "kms_requests_total", operation="CREATE", result="SUCCESS") == len(clients)
        assert sample(text, "kms_request_duration_seconds_count", operation="CREATE") == len(clients)
    finally:
        server.stop()
    # The shared counters' directory goes with the node (looked for by its
    # own name: a directory another node left, killed, may hold a file of a
    # process id reused since).
    assert shared.parent == Path(tempfile.gettempdir()) and shared.name.startswith("kms-server-metrics-")
    assert not shared.exists() and not list(shared.glob(f"*_{pids[0]}.db"))


def test_a_port_another_node_holds_is_refused(node, tmp_path):
    """The workers' sockets share their port (SO_REUSEPORT), but a second
    node started on that port is refused, not let in beside the first."""
    config = node.workdir / "kms.toml"
    second = tmp_path / "second.toml"
    second.write_text(
        config.read_text()
        .replace("port = 0", f"port = {node.port}", 1)
        .replace(str(node.workdir / "data"), str(tmp_path / "data2"))
    )
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.cli", "--config", str(second)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"cannot listen on 127.0.0.1:{node.port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_acknowledged_create_survives_the_node_killed_under_load(node, pki_dir):
    """The workers' commits are synced after the writers' flock is released
    (kms_server.storage.sql.WalSync): a node killed while both workers
    write keeps every key a client was answered for, and one chain."""
    workdir = node.workdir
    pids = worker_pids(node)
    acknowledged: list[str] = []
    stop = threading.Event()
    clients = [pykmip(node, pki_dir) for _ in range(8)]

    def load(client):
        while not stop.is_set():
            try:
                uid = client.create(enums.CryptographicAlgorithm.AES, 256)
                acknowledged.append(uid)
                # Reads too, so that batches the sync helper makes durable
                # (those holding reads' records) carry Creates as well.
                client.get_attribute_list(uid)
            except Exception:  # noqa: BLE001 - the node was killed under it
                return

    threads = [threading.Thread(target=load, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    wait_until(lambda: len(acknowledged) >= 200, what="200 acknowledged creates")
    node.proc.kill()
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    node.proc.wait(10)
    stop.set()
    for t in threads:
        t.join(30)
    for client in clients:
        client.close()
    wait_until(lambda: not any(alive(pid) for pid in pids), what="the workers to be gone")
    answered = list(acknowledged)
    again = start_server(workdir, pki_dir, server_config="processes = 2")
    try:
        client = pykmip(again, pki_dir)
        try:
            missing = [uid for uid in answered if client.get(uid).value is None]
        finally:
            client.close()
        assert missing == [], f"{len(missing)} of {len(answered)} acknowledged keys lost"
    finally:
        again.stop()
    report = audit_verify(workdir)
    assert "audit trail intact" in report, report


def socket_inodes(pid: int) -> set[str]:
    """The inodes of the sockets `pid` holds open."""
    found = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def tcp_table() -> list[tuple[int, int, str, str]]:
    """This host's IPv4 TCP sockets: (local port, remote port, state, inode);
    state as /proc/net/tcp spells it ("01" established, "0A" listening)."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        rows.append((int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), fields[3], fields[9]))
    return rows


def listening_ports_of(pid: int) -> set[int]:
    held = socket_inodes(pid)
    return {local for local, _, state, inode in tcp_table() if state == "0A" and inode in held}


def holders_of_connection(pids: list[int], local_port: int, remote_port: int) -> list[int]:
    """Which of `pids` hold the server's end of the connection on
    `local_port` from the client's `remote_port`."""
    wanted = (local_port, remote_port, "01")
    ends = {inode for local, remote, state, inode in tcp_table() if (local, remote, state) == wanted}
    return [pid for pid in pids if socket_inodes(pid) & ends]


def worker_index_of(pid: int) -> int:
    """A worker's index (0: the primary), from the environment its
    supervisor gave it (kmip_core.workers.WORKER_ENV)."""
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    value = next(v for v in environ if v.startswith(b"KMIP_CORE_WORKER=")).split(b"=", 1)[1]
    return int(value.split(b":")[0])


def test_the_audit_page_shows_the_records_of_every_worker(tmp_path, pki_dir):
    """The audit page (kms_server.audit.web) is one of the node's singletons:
    worker 0 alone listens on its port, the other worker not at all. Over
    real mutual TLS, as the auditor, it lists the records of the requests
    both workers served (each under the client address the serving worker
    saw), counts them all, and answers the same on every connection."""
    audit_key.generate(tmp_path / "audit.key", tmp_path / "audit.pub")
    server = start_server(
        tmp_path / "node",
        pki_dir,
        server_config="processes = 2",
        extra_config=f"""
        [access]
        auditors = ["auditor"]

        [audit]
        signing_key_file = "{tmp_path / "audit.key"}"
        web_port = 0
        """,
    )
    try:
        pids = worker_pids(server)
        assert len(pids) == 2, pids
        announced = server.announced("kms-server audit page on https://")
        web_port = int(announced.rstrip("/").rsplit(":", 1)[1])
        index = {pid: worker_index_of(pid) for pid in pids}
        assert sorted(index.values()) == [0, 1], index
        # Worker 0 listens on the node's KMIP socket and the page; worker 1 on the KMIP socket only.
        assert {index[pid]: listening_ports_of(pid) for pid in pids} == {
            0: {server.port, web_port},
            1: {server.port},
        }

        # Each client's connection, found by its address on the server's
        # side, is held by one worker; both workers hold some.
        served: dict[int, set[str]] = {0: set(), 1: set()}  # worker index -> uids
        worker_of_peer: dict[int, int] = {}  # client port -> worker index
        clients = [pykmip(server, pki_dir) for _ in range(6)]
        try:
            for client in clients:
                client_port = client.proxy.socket.getsockname()[1]
                holders = holders_of_connection(pids, server.port, client_port)
                assert len(holders) == 1, holders
                worker = index[holders[0]]
                worker_of_peer[client_port] = worker
                uid = client.create(enums.CryptographicAlgorithm.AES, 256)
                assert client.get(uid).value is not None
                served[worker].add(uid)
        finally:
            for client in clients:
                client.close()
        assert served[0] and served[1], served

        def fetch(path: str) -> tuple[int, str, bytes]:
            context = tls_context(pki_dir, "auditor")
            conn = http.client.HTTPSConnection("127.0.0.1", web_port, context=context, timeout=15)
            try:
                conn.request("GET", path, headers={"Host": "localhost"})
                answer = conn.getresponse()
                return answer.status, answer.getheader("Content-Type", ""), answer.read()
            finally:
                conn.close()

        status, content_type, body = fetch("/")
        assert status == 200 and content_type.startswith("text/html"), (status, body[:200])

        answers = [fetch("/api/records?limit=5000") for _ in range(4)]
        assert {(status, content_type) for status, content_type, _ in answers} == {(200, "application/json")}
        assert len({body for _, _, body in answers}) == 1, "every connection gets the same records"
        listing = json.loads(answers[0][2])
        records = listing["records"]
        # A Create and a Get per client, whichever worker served it.
        assert listing["matched"] == len(records) == 2 * len(clients), listing["matched"]
        by_worker: dict[int, set[str]] = {0: set(), 1: set()}
        for record in records:
            assert record["operation"] in ("CREATE", "GET") and record["result"] == "SUCCESS", record
            by_worker[worker_of_peer[int(record["peer"].rsplit(":", 1)[1])]].add(record["uid"])
        assert by_worker == served, (by_worker, served)

        # One object of each worker, searched for.
        for worker in (0, 1):
            uid = sorted(served[worker])[0]
            status, _, body = fetch(f"/api/records?object={uid}")
            assert status == 200
            found = [(r["operation"], r["uid"]) for r in json.loads(body)["records"]]
            assert found == [("CREATE", uid), ("GET", uid)], found

        status, _, body = fetch("/api/verify")
        report = json.loads(body)
        assert status == 200 and report["ok"] is True and report["records"] == 2 * len(clients), report
    finally:
        server.stop()
