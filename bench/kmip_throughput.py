#!/usr/bin/env python3
"""KMIP throughput and latency: kms-server side by side with PyKMIP's
reference server and the ceiling of its own stack, on the same machine, in
the same run.

    .venv/bin/python bench/kmip_throughput.py [--ops 300] [--concurrency 1,4,16]
        [--workloads cycle,get,create,vcenter-mix,locate-x,connect,...] [--json FILE]

The servers are started here on free 127.0.0.1 ports, each in its own
temporary directory (kms-server and PyKMIP with their own SQLite database),
all with the same development PKI (kmip_core.pki.init_pki) and mutual TLS.
The ceiling is bench/ceiling_server.py: canned answers on kms-server's own
stack (Twisted, pyOpenSSL, the project's framing), no storage, no crypto, no
audit. Every workload is run against each server at each concurrency level:
N client processes (not threads, so the client's GIL is not what is
measured), one TLS connection each, opened before the clock starts. The
create-get, vcenter-mix and discover workloads use PyKMIP's ProxyKmipClient
(KMIP 1.2); the others a raw TTLV client (KMIP 1.2, the project's codec),
which leaves the servers more of the CPU. Figures, with each server's CPU
time per request, are printed as a table (and written with --json); errors
on every side are counted and shown, never dropped.
Nothing here asserts a timing: it is a measurement, see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.stats import percentile  # noqa: E402

# KMIP requests per iteration of each workload, in order. Workloads run in
# this order: the cycle first, on empty stores (PyKMIP's server answers a
# Locate by reading every object it holds).
WORKLOADS = {
    "cycle": ("Create", "Get", "Locate", "Destroy"),
    "get": ("Get",),
    "create": ("Create",),
    "vcenter-mix": ("Create", "GetAttributes", "Get", "Activate"),
    "locate-x": ("Locate",),
    "connect": ("Connect+DiscoverVersions",),
    "create-get": ("Create", "Get"),
    "discover": ("DiscoverVersions",),
}
WORKLOAD_HELP = {
    "create-get": "Create AES-256, then Get it",
    "vcenter-mix": "Create AES-256, GetAttributes, Get, Activate",
    "discover": "DiscoverVersions only (protocol + TLS + framing overhead)",
    "cycle": "Create AES-256 with a unique Name, Get it, Locate it by Name, Destroy it",
    "get": "Get, round robin over a warm key set (--warm-keys per connection, created and read once before the clock)",
    "create": "Create AES-256",
    "locate-x": "Locate by x-Identifier, round robin over a warm key set that carries one each",
    "connect": "a new TLS connection (mutual TLS handshake), DiscoverVersions, close",
}
# Workloads run with the raw TTLV client (_RawRunner: requests encoded with
# the project's codec over the standard library's ssl): the others with
# PyKMIP's ProxyKmipClient, as they always were.
RAW_WORKLOADS = ("cycle", "get", "create", "locate-x", "connect")
# kms-no-audit: kms-server with [audit] enabled = false, to measure what the
# audit trail costs (make bench-audit); not run unless asked for. ceiling:
# bench/ceiling_server.py, canned answers on kms-server's stack.
SERVERS = ("kms-server", "kms-no-audit", "PyKMIP", "ceiling")
DEFAULT_SERVERS = ("kms-server", "PyKMIP", "ceiling")
CLIENT_NAME = "bench"
NOISE_CORES = 0.2
GET_ATTRIBUTE_NAMES = ["State", "Cryptographic Algorithm", "Cryptographic Length"]


# --------------------------------------------------------------------------
# Client side: one worker process = one KMIP connection.
# --------------------------------------------------------------------------


class _Reconnect(Exception):
    """The connection may be out of step (transport or decoding error)."""


def _open_client(spec: dict):
    from kmip.core import enums
    from kmip.pie.client import ProxyKmipClient

    client = ProxyKmipClient(
        hostname=spec["host"],
        port=spec["port"],
        cert=spec["cert"],
        key=spec["key"],
        ca=spec["ca"],
        kmip_version=enums.KMIPVersion.KMIP_1_2,
    )
    # Bounded: a server that stops answering fails the request, it does not
    # hang the benchmark.
    client.proxy.timeout = spec["socket_timeout"]
    client.open()
    return client


def _close_client(client) -> None:
    if client is None:
        return
    try:
        client.close()
    except Exception:
        pass


class _Runner:
    """Runs iterations of one workload on one connection and records
    per-request latencies and every error."""

    def __init__(self, spec: dict):
        from kmip.core import enums
        from kmip.pie import exceptions as pie_exceptions

        self.enums = enums
        self.failure_type = pie_exceptions.KmipOperationFailure
        self.spec = spec
        self.workload = spec["workload"]
        self.client = None
        self.latencies: dict[str, list[float]] = {op: [] for op in WORKLOADS[self.workload]}
        self.iteration_latencies: list[float] = []
        self.errors = 0
        self.error_samples: list[str] = []
        self.skipped = 0
        self.reconnects = 0
        self.recording = False

    def error(self, op: str, text: str) -> None:
        if not self.recording:
            raise RuntimeError(f"{op}: {text}")
        self.errors += 1
        if len(self.error_samples) < 5:
            self.error_samples.append(f"{op}: {text}"[:300])

    def connect(self) -> None:
        _close_client(self.client)
        self.client = None
        self.client = _open_client(self.spec)

    def tls(self) -> tuple[str, str]:
        sock = self.client.proxy.socket
        return sock.version() or "?", (sock.cipher() or ("?",))[0]

    def _call(self, op: str, fn):
        t0 = time.perf_counter()
        try:
            value = fn()
        except self.failure_type as exc:
            self.error(op, f"{exc.reason.name if exc.reason else '?'}: {exc.message}")
            return None, False
        except Exception as exc:
            self.error(op, f"{type(exc).__name__}: {exc}")
            raise _Reconnect() from exc
        elapsed = time.perf_counter() - t0
        if self.recording:
            self.latencies[op].append(elapsed)
        return value, True

    def iteration(self) -> None:
        """One iteration; a failed step skips the steps that depend on it."""
        enums = self.enums
        ops = WORKLOADS[self.workload]
        t0 = time.perf_counter()
        done = 0
        try:
            if self.workload == "discover":
                result, ok = self._call("DiscoverVersions", lambda: self.client.proxy.discover_versions())
                if ok:
                    if result.result_status.value != enums.ResultStatus.SUCCESS:
                        reason = result.result_reason.value.name if result.result_reason else "?"
                        self.error("DiscoverVersions", f"{reason}: {result.result_message}")
                        return
                    if not result.protocol_versions:
                        self.error("DiscoverVersions", "wrong answer: no protocol versions")
                        return
                    done = 1
                return
            uid, ok = self._call("Create", lambda: self.client.create(enums.CryptographicAlgorithm.AES, 256))
            if not ok:
                return
            done = 1
            if self.workload == "vcenter-mix":
                result, ok = self._call("GetAttributes", lambda: self.client.get_attributes(uid, GET_ATTRIBUTE_NAMES))
                if not ok:
                    return
                by_name = {a.attribute_name.value: a.attribute_value.value for a in result[1]}
                if by_name.get("State") != enums.State.PRE_ACTIVE or by_name.get("Cryptographic Length") != 256:
                    self.error("GetAttributes", f"wrong answer: {by_name!r}")
                    return
                done += 1
            key, ok = self._call("Get", lambda: self.client.get(uid))
            if not ok:
                return
            if len(key.value) != 32:
                self.error("Get", f"wrong answer: {len(key.value)} key bytes")
                return
            done += 1
            if self.workload == "vcenter-mix":
                _, ok = self._call("Activate", lambda: self.client.activate(uid))
                if not ok:
                    return
                done += 1
        finally:
            if self.recording:
                self.skipped += len(ops) - max(done, 0) - (0 if done == len(ops) else 1)
                if done == len(ops):
                    self.iteration_latencies.append(time.perf_counter() - t0)


class _Unsupported(Exception):
    """The server refused the set-up a workload needs (an error answer, not
    a transport failure): the workload is not one it supports."""


class _RawConnection:
    """One mutual-TLS connection that sends a Request Message and reads one
    Response Message (the 8-byte header gives its length)."""

    def __init__(self, spec: dict, context: ssl.SSLContext):
        raw = socket.create_connection((spec["host"], spec["port"]), timeout=spec["socket_timeout"])
        try:
            self.sock = context.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise

    def exchange(self, request: bytes) -> bytes:
        self.sock.sendall(request)
        header = self._read(8)
        return header + self._read(int.from_bytes(header[4:8], "big"))

    def _read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data += chunk
        return bytes(data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class _RawRunner(_Runner):
    """The workloads of RAW_WORKLOADS with a light client: KMIP 1.2 requests
    encoded with the project's codec, so that the client's own CPU leaves
    the servers room (PyKMIP's client costs 0.25-0.8 ms per request)."""

    VERSION = (1, 2)

    def __init__(self, spec: dict):
        super().__init__(spec)
        from kmip.core.enums import CryptographicAlgorithm, ObjectType, Operation, ResultStatus, Tags

        from kmip_core import ttlv
        from kmip_core.client import messages

        self.ttlv, self.messages, self.T = ttlv, messages, Tags
        self.Operation, self.SUCCESS = Operation, ResultStatus.SUCCESS
        self.AES, self.SYMMETRIC_KEY = CryptographicAlgorithm.AES, ObjectType.SYMMETRIC_KEY
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.context.load_verify_locations(spec["ca"])
        self.context.load_cert_chain(spec["cert"], spec["key"])
        # Unique across processes, cells and runs against the same database.
        self.token = os.urandom(6).hex()
        self.count = 0
        self.warm: list[tuple[str, str]] = []  # (uid, x-Identifier)
        self.canned = spec.get("canned", False)

    def connect(self) -> None:
        _close_client(self.client)
        self.client = None
        self.client = _RawConnection(self.spec, self.context)
        if self.workload == "connect":
            self.tls_seen = self.tls()
            self.client.close()  # each iteration opens its own
            self.client = None

    def tls(self) -> tuple[str, str]:
        if self.client is None:
            return self.tls_seen
        sock = self.client.sock
        return sock.version() or "?", (sock.cipher() or ("?",))[0]

    def _request(self, op: str, operation, payload: list, connection=None):
        """(payload, True) on Success; (None, False) after a counted error
        answer; _Reconnect on a transport or decoding failure."""
        message = self.messages.request_message(self.VERSION, operation, payload)

        def exchange():
            data = (connection or self.client).exchange(message)
            return self.messages.parse_response(data, operation)

        response, ok = self._call(op, exchange)
        if not ok:
            return None, False
        if response.status != self.SUCCESS:
            reason = response.reason.name if response.reason else "?"
            if not self.recording:  # set-up or warm-up: the server refuses the workload
                raise _Unsupported(f"{op}: {reason}: {response.message}")
            self.error(op, f"{reason}: {response.message}")
            return None, False
        return response.payload, True

    def _uid(self, text: str) -> object:
        return self.ttlv.text(self.T.UNIQUE_IDENTIFIER.value, text)

    def _create(self, name: str | None = None, identifier: str | None = None):
        pairs = [
            ("Cryptographic Algorithm", self.AES),
            ("Cryptographic Length", 256),
            ("Cryptographic Usage Mask", 12),  # Encrypt | Decrypt
        ]
        if name is not None:
            pairs.append(("Name", name))
        if identifier is not None:
            pairs.append(("x-Identifier", identifier))
        template = self.ttlv.structure(
            self.T.TEMPLATE_ATTRIBUTE.value, self.messages.attribute_items(self.VERSION, pairs)
        )
        object_type = self.ttlv.enumeration(self.T.OBJECT_TYPE.value, self.SYMMETRIC_KEY.value)
        payload, ok = self._request("Create", self.Operation.CREATE, [object_type, template])
        if not ok:
            return None
        uid = payload.get(self.T.UNIQUE_IDENTIFIER.value)
        if not isinstance(uid, str) or not uid:
            self.error("Create", "wrong answer: no Unique Identifier")
            return None
        return uid

    def _get(self, uid: str) -> bool:
        payload, ok = self._request("Get", self.Operation.GET, [self._uid(uid)])
        if not ok:
            return False
        key = payload.find(self.T.SYMMETRIC_KEY.value)
        block = key.find(self.T.KEY_BLOCK.value) if key is not None else None
        value = block.find(self.T.KEY_VALUE.value) if block is not None else None
        material = value.get(self.T.KEY_MATERIAL.value) if value is not None else None
        if not isinstance(material, bytes) or len(material) != 32:
            self.error("Get", "wrong answer: no 32-byte key")
            return False
        return True

    def _locate(self, attribute: str, value: str, uid: str) -> bool:
        items = self.messages.attribute_items(self.VERSION, [(attribute, value)])
        payload, ok = self._request("Locate", self.Operation.LOCATE, items)
        if not ok:
            return False
        found = [i.value for i in payload.find_all(self.T.UNIQUE_IDENTIFIER.value)]
        # The ceiling's canned answer names its one fixed identifier.
        if len(found) != 1 or (found[0] != uid and not self.canned):
            self.error("Locate", f"wrong answer: {len(found)} identifier(s), expected {uid}")
            return False
        return True

    def setup(self) -> None:
        """The warm key set of `get` and `locate-x`, before the clock: each
        key created (with its x-Identifier) and read once (the first Get of
        a key writes: it stops being Fresh)."""
        if self.workload not in ("get", "locate-x"):
            return
        for i in range(self.spec["warm_keys"]):
            identifier = f"bench-{self.token}-{i}" if self.workload == "locate-x" else None
            uid = self._create(identifier=identifier)
            if self.workload == "get":
                self._get(uid)
            else:
                self._locate("x-Identifier", identifier, uid)
            self.warm.append((uid, identifier))

    def iteration(self) -> None:
        ops = WORKLOADS[self.workload]
        t0 = time.perf_counter()
        done = 0
        try:
            if self.workload == "connect":
                op = ops[0]

                def session():
                    connection = _RawConnection(self.spec, self.context)
                    try:
                        data = connection.exchange(
                            self.messages.request_message(self.VERSION, self.Operation.DISCOVER_VERSIONS, [])
                        )
                    finally:
                        connection.close()
                    return self.messages.parse_response(data, self.Operation.DISCOVER_VERSIONS)

                response, ok = self._call(op, session)
                if not ok:
                    return
                if response.status != self.SUCCESS or not response.payload.find(self.T.PROTOCOL_VERSION.value):
                    self.error(op, f"wrong answer: {response.status.name}, no protocol versions")
                    return
                done = 1
                return
            if self.workload == "get":
                uid, _ = self.warm[self.count % len(self.warm)]
                self.count += 1
                done = 1 if self._get(uid) else 0
                return
            if self.workload == "locate-x":
                uid, identifier = self.warm[self.count % len(self.warm)]
                self.count += 1
                done = 1 if self._locate("x-Identifier", identifier, uid) else 0
                return
            if self.workload == "create":
                done = 1 if self._create() else 0
                return
            # cycle
            self.count += 1
            name = f"bench-{self.token}-{self.count}"
            uid = self._create(name=name)
            if uid is None:
                return
            done = 1
            if not self._get(uid):
                return
            done = 2
            if not self._locate("Name", name, uid):
                return
            done = 3
            _, ok = self._request("Destroy", self.Operation.DESTROY, [self._uid(uid)])
            if ok:
                done = 4
        finally:
            if self.recording:
                self.skipped += len(ops) - max(done, 0) - (0 if done == len(ops) else 1)
                if done == len(ops):
                    self.iteration_latencies.append(time.perf_counter() - t0)


def _worker_main(index: int, commands, results) -> None:
    """A long-lived client process: connect / go / stop commands per cell."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    import logging

    # PyKMIP's client warns on every open that no pykmip.conf exists (the
    # explicit arguments are all it needs) and logs connection failures,
    # which the benchmark counts and reports itself.
    logging.basicConfig(handlers=[logging.NullHandler()])
    runner: _Runner | None = None
    while True:
        command = commands.get()
        if command is None:
            break
        cell = command["cell"]
        if command["kind"] == "connect":
            spec = command["spec"]
            try:
                runner = (_RawRunner if spec["workload"] in RAW_WORKLOADS else _Runner)(spec)
                runner.connect()
                tls = runner.tls()
                if hasattr(runner, "setup"):
                    runner.setup()
                for _ in range(spec["warmup"]):
                    runner.iteration()
                results.put({"cell": cell, "index": index, "kind": "ready", "tls": tls})
            except _Unsupported as exc:
                _close_client(runner.client if runner else None)
                runner = None
                results.put({"cell": cell, "index": index, "kind": "ready", "error": str(exc), "unsupported": True})
            except Exception as exc:
                _close_client(runner.client if runner else None)
                runner = None
                results.put({"cell": cell, "index": index, "kind": "ready", "error": f"{type(exc).__name__}: {exc}"})
        elif command["kind"] == "go":
            if runner is None:
                continue
            runner.recording = True
            deadline = command["deadline"]
            target = runner.spec["iterations"]
            cpu0 = time.process_time()
            start = time.monotonic()
            done = 0
            timed_out = False
            gave_up = ""
            while done < target:
                if time.monotonic() > deadline:
                    timed_out = True
                    break
                try:
                    try:
                        runner.iteration()
                    except _Reconnect:
                        raise
                    except Exception as exc:  # an answer the checks could not even read
                        runner.error("iteration", f"unexpected {type(exc).__name__}: {exc}")
                        raise _Reconnect() from exc
                except _Reconnect:
                    runner.reconnects += 1
                    try:
                        runner.connect()
                    except Exception as exc:
                        runner.error("connect", f"{type(exc).__name__}: {exc}")
                        gave_up = f"could not reconnect: {type(exc).__name__}: {exc}"
                        done += 1
                        break
                done += 1
            end = time.monotonic()
            results.put(
                {
                    "cell": cell,
                    "index": index,
                    "kind": "done",
                    "start": start,
                    "end": end,
                    "client_cpu": time.process_time() - cpu0,
                    "iterations": done,
                    "target": target,
                    "latencies": runner.latencies,
                    "iteration_latencies": runner.iteration_latencies,
                    "errors": runner.errors,
                    "error_samples": runner.error_samples,
                    "skipped": runner.skipped,
                    "reconnects": runner.reconnects,
                    "timed_out": timed_out,
                    "gave_up": gave_up,
                }
            )
            _close_client(runner.client)
            runner = None


def client_spec(
    host: str,
    port: int,
    pki: Path,
    workload: str,
    warmup: int = 2,
    socket_timeout: float = 20.0,
    warm_keys: int = 16,
    canned: bool = False,
) -> dict:
    """What a client process is told for one cell: the server's address,
    the client certificate CLIENT_NAME of `pki` (made by init_pki), the
    workload and its set-up (`canned`: the server is the ceiling)."""
    return {
        "host": host,
        "port": port,
        "cert": str(pki / f"{CLIENT_NAME}.pem"),
        "key": str(pki / f"{CLIENT_NAME}.key"),
        "ca": str(pki / "ca.pem"),
        "workload": workload,
        "warmup": warmup,
        "socket_timeout": socket_timeout,
        "warm_keys": warm_keys,
        "canned": canned,
    }


class ClientPool:
    """`size` client processes, started once (spawn: no state inherited from
    this process's threads) and reused for every cell."""

    def __init__(self, size: int):
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.workers: list[tuple] = []
        self.cell = 0
        for i in range(size):
            self.workers.append(self._spawn(i))

    def _spawn(self, index: int):
        commands = self.ctx.Queue()
        proc = self.ctx.Process(target=_worker_main, args=(index, commands, self.results), daemon=True)
        proc.start()
        return proc, commands

    def _replace(self, index: int) -> None:
        proc, _ = self.workers[index]
        if proc.is_alive():
            proc.kill()
        proc.join(5)
        self.workers[index] = self._spawn(index)

    def _collect(self, kind: str, indexes: set[int], until: float) -> dict[int, dict]:
        got: dict[int, dict] = {}
        while set(got) != indexes:
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            try:
                message = self.results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [i for i in indexes - set(got) if not self.workers[i][0].is_alive()]
                for i in dead:
                    got[i] = {"kind": kind, "index": i, "error": "client process died"}
                continue
            if message.get("cell") != self.cell or message.get("kind") != kind:
                continue  # left over from a cell that timed out
            got[message["index"]] = message
        return got

    def run_cell(
        self,
        spec: dict,
        concurrency: int,
        iterations: int,
        cell_timeout: float,
        sample_cpu,
        addresses: list[tuple[str, int]] | None = None,
    ) -> dict:
        """One cell: `concurrency` connections share `iterations` of the
        workload of `spec` (a client_spec). With `addresses` (host, port),
        connection i goes to addresses[i % len(addresses)] instead of the
        spec's server: the connections spread evenly over a cluster's nodes.
        `sample_cpu()` gives the servers' CPU seconds so far."""
        self.cell += 1
        n = min(concurrency, iterations, len(self.workers))
        for i in range(n):
            if not self.workers[i][0].is_alive():
                self._replace(i)
        shares = [iterations // n + (1 if i < iterations % n else 0) for i in range(n)]
        for i in range(n):
            client = {**spec, "iterations": shares[i]}
            if addresses:
                client["host"], client["port"] = addresses[i % len(addresses)]
            self.workers[i][1].put({"cell": self.cell, "kind": "connect", "spec": client})
        connect_deadline = time.monotonic() + spec["socket_timeout"] * (spec["warmup"] + 1) + 15
        ready = self._collect("ready", set(range(n)), connect_deadline)
        problems: list[str] = []
        unsupported: list[str] = []
        started: set[int] = set()
        tls = None
        for i in range(n):
            message = ready.get(i)
            if message is None:
                problems.append(f"client {i}: no answer while connecting")
                self._replace(i)
            elif message.get("unsupported"):
                unsupported.append(message["error"])
            elif "error" in message:
                problems.append(f"client {i}: connect/warm-up failed: {message['error']}")
            else:
                started.add(i)
                tls = tls or message["tls"]
        cpu0, machine0 = sample_cpu(), machine_busy_cpu()
        deadline = time.monotonic() + cell_timeout
        for i in sorted(started):
            self.workers[i][1].put({"cell": self.cell, "kind": "go", "deadline": deadline})
        done = self._collect("done", started, deadline + spec["socket_timeout"] + 15)
        cpu1, machine1 = sample_cpu(), machine_busy_cpu()
        for i in sorted(started - set(done)):
            problems.append(f"client {i}: no answer by the deadline (killed)")
            self._replace(i)
        return {
            "clients": n,
            "target_iterations": iterations,
            "parts": [done[i] for i in sorted(done) if "error" not in done[i]],
            "problems": problems + [f"client {i}: {done[i]['error']}" for i in sorted(done) if "error" in done[i]],
            "server_cpu": (cpu1 - cpu0) if cpu0 is not None and cpu1 is not None else None,
            "tls": tls,
            "machine_cpu": machine1 - machine0,
            "unsupported": unsupported,
        }

    def close(self) -> None:
        for _proc, commands in self.workers:
            try:
                commands.put(None)
            except Exception:
                pass
        for proc, _ in self.workers:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)


# --------------------------------------------------------------------------
# Servers.
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_busy_cpu() -> float:
    """CPU seconds all cores spent outside idle and iowait since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal ...
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(max_wait: float, window: float = 3.0) -> bool:
    """Wait (at most max_wait seconds) until the whole machine has used less
    than 0.1 core for `window` seconds: between cells the servers and the
    clients are idle, so anything busier is other work (a test run, a
    build) that would disturb the next cell."""
    deadline = time.monotonic() + max_wait
    quiet_since = time.monotonic()
    while True:
        before = machine_busy_cpu()
        time.sleep(0.5)
        if machine_busy_cpu() - before > 0.05:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= window:
            return True
        if time.monotonic() > deadline:
            return False


def process_tree_cpu(root_pid: int) -> float | None:
    """User + system CPU seconds of a process and all its descendants
    (PyKMIP's server runs a multiprocessing.Manager child for its policies)."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2 :].split()
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    if root_pid not in stats:
        return None
    total, todo = 0.0, [root_pid]
    while todo:
        pid = todo.pop()
        total += stats[pid][1]
        todo.extend(child for child, (ppid, _) in stats.items() if ppid == pid)
    return total


@dataclass
class Server:
    name: str
    proc: subprocess.Popen
    host: str
    port: int
    workdir: Path
    log_path: Path
    notes: list[str] = field(default_factory=list)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def cpu(self) -> float | None:
        return process_tree_cpu(self.proc.pid)

    def log_tail(self, lines: int = 25) -> str:
        texts = []
        for path in sorted({self.log_path, *self.workdir.glob("*.log")}):
            try:
                texts.append(f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:]))
            except OSError:
                pass
        return "\n".join(texts)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT/SIGTERM first (both servers drain and exit), then SIGKILL
        of the process group this script started it in."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT if self.name == "PyKMIP" else signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # stragglers (PyKMIP's Manager child)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass


def wait_for_tls(server: Server, pki: Path, timeout: float) -> None:
    """Until a mutual-TLS handshake with the server succeeds."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.load_verify_locations(str(pki / "ca.pem"))
    context.load_cert_chain(str(pki / f"{CLIENT_NAME}.pem"), str(pki / f"{CLIENT_NAME}.key"))
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not server.alive():
            raise RuntimeError(
                f"{server.name} exited ({server.proc.returncode}) before accepting TLS\n{server.log_tail()}"
            )
        try:
            with socket.create_connection((server.host, server.port), timeout=2) as raw:
                with context.wrap_socket(raw) as tls:
                    tls.do_handshake()
                    return
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
            time.sleep(0.2)
    raise RuntimeError(f"{server.name} did not accept TLS within {timeout:.0f}s ({last})\n{server.log_tail()}")


def _drain(stream, sink, lines: list[str]) -> None:
    for line in stream:
        lines.append(line)
        sink.write(line)
        sink.flush()


def start_kms_server(
    root: Path,
    pki: Path,
    log_level: str,
    timeout: float,
    worker_threads: int | None = None,
    audit: bool = True,
    name: str = "kms-server",
    processes: int | None = None,
) -> Server:
    from kmip_core.audit import audit_key
    from kmip_core.pki import new_master_key

    workdir = root / name
    workdir.mkdir(mode=0o700)
    new_master_key(workdir / "master.key")
    audit_key.generate(workdir / "audit.key", workdir / "audit.pub")
    audit_section = (
        f'signing_key_file = "{workdir / "audit.key"}"\ncheckpoint_seconds = 10.0' if audit else "enabled = false"
    )
    config = workdir / "kms.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            host = "127.0.0.1"
            port = 0
            data_dir = "{workdir / "data"}"
            {f"worker_threads = {worker_threads}" if worker_threads else ""}
            {f"processes = {processes}" if processes else ""}

            [tls]
            cert = "{pki / "server.pem"}"
            key = "{pki / "server.key"}"
            ca = "{pki / "ca.pem"}"

            [storage]
            db_url = "sqlite:///{workdir / "data" / "kms.db"}"

            [master_key]
            file = "{workdir / "master.key"}"

            [logging]
            level = "{log_level}"
            """
        )
        + f"\n[audit]\n{audit_section}\n"
    )
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms_server.cli", "--config", str(config)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        start_new_session=True,  # Ctrl-C reaches this script, which stops the server itself
        env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))},
    )
    lines: list[str] = []
    threading.Thread(target=_drain, args=(proc.stdout, log, lines), daemon=True).start()
    server = Server(name, proc, "127.0.0.1", 0, workdir, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if "listening on" in line:
                server.port = int(line.strip().rsplit(":", 1)[1])
                wait_for_tls(server, pki, max(1.0, deadline - time.monotonic()))
                return server
        if not server.alive():
            break
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"kms-server did not start\n{server.log_tail()}")


def start_ceiling(
    root: Path,
    pki: Path,
    log_level: str,
    timeout: float,
    worker_threads: int | None = None,
    processes: int = 1,
    in_reactor: bool = False,
) -> Server:
    """bench/ceiling_server.py: canned answers on kms-server's stack, with
    the same certificate, key and CA (log_level: its log is warnings only);
    `processes` on one socket, answering in the reactor if `in_reactor`."""
    workdir = root / "ceiling"
    workdir.mkdir(mode=0o700)
    log_path = workdir / "server.log"
    log = open(log_path, "w")
    command = [
        sys.executable,
        str(REPO / "bench" / "ceiling_server.py"),
        "--cert",
        str(pki / "server.pem"),
        "--key",
        str(pki / "server.key"),
        "--ca",
        str(pki / "ca.pem"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
    ]
    if worker_threads:
        command += ["--worker-threads", str(worker_threads)]
    if processes > 1:
        command += ["--processes", str(processes)]
    if in_reactor:
        command.append("--in-reactor")
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=_drain, args=(proc.stdout, log, lines), daemon=True).start()
    server = Server("ceiling", proc, "127.0.0.1", 0, workdir, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in list(lines):
            if "listening on" in line:
                server.port = int(line.strip().rsplit(":", 1)[1])
                wait_for_tls(server, pki, max(1.0, deadline - time.monotonic()))
                return server
        if not server.alive():
            break
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"the ceiling server did not start\n{server.log_tail()}")


PYKMIP_BOOT = r"""
import json, sys, warnings
warnings.simplefilter("ignore", DeprecationWarning)
from kmip.services.server import KmipServer
settings = json.loads(sys.argv[1])
server = KmipServer(**settings)
with server:
    server.serve()
"""


def start_pykmip(root: Path, pki: Path, log_level: str, timeout: float, attempts: int = 3) -> Server:
    workdir = root / "pykmip"
    workdir.mkdir(mode=0o700)
    (workdir / "policies").mkdir()
    last = ""
    for attempt in range(attempts):
        port = free_port()
        settings = {
            "hostname": "127.0.0.1",
            "port": port,
            "certificate_path": str(pki / "server.pem"),
            "key_path": str(pki / "server.key"),
            "ca_path": str(pki / "ca.pem"),
            "auth_suite": "TLS1.2",
            "config_path": None,  # everything is given here; no /etc/pykmip/server.conf
            "log_path": str(workdir / f"server-{attempt}.log"),
            "policy_path": str(workdir / "policies"),
            "enable_tls_client_auth": True,
            "logging_level": log_level,
            "live_policies": False,
            "database_path": str(workdir / "pykmip.db"),
        }
        log_path = workdir / f"stderr-{attempt}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-c", PYKMIP_BOOT, json.dumps(settings)],
                cwd=workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Server("PyKMIP", proc, "127.0.0.1", port, workdir, log_path)
        try:
            wait_for_tls(server, pki, timeout)
            return server
        except RuntimeError as exc:
            last = str(exc)
            server.stop(5)
    raise RuntimeError(f"PyKMIP's server did not start after {attempts} attempts: {last}")


# --------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------


def summarize(server: str, workload: str, concurrency: int, raw: dict) -> dict:
    parts = raw["parts"]
    ops = WORKLOADS[workload]
    latencies = {op: [x for p in parts for x in p["latencies"][op]] for op in ops}
    all_requests = [x for op in ops for x in latencies[op]]
    iteration_latencies = [x for p in parts for x in p["iteration_latencies"]]
    errors = sum(p["errors"] for p in parts)
    problems = list(raw["problems"])
    for p in parts:
        if p["timed_out"]:
            problems.append(
                f"client {p['index']}: cell time limit reached after {p['iterations']}/{p['target']} iterations"
            )
        if p["gave_up"]:
            problems.append(f"client {p['index']}: {p['gave_up']}")
    iterations_done = sum(p["iterations"] for p in parts)
    missing_iterations = raw["target_iterations"] - iterations_done
    wall = (max(p["end"] for p in parts) - min(p["start"] for p in parts)) if parts else None
    ok_requests = len(all_requests)
    ms = lambda v: None if v is None else round(v * 1000, 3)  # noqa: E731
    result = {
        "server": server,
        "workload": workload,
        "concurrency": concurrency,
        "clients": raw["clients"],
        "target_iterations": raw["target_iterations"],
        "iterations_done": iterations_done,
        "requests_ok": ok_requests,
        "errors": errors + len(raw["problems"]),
        "request_errors": errors,
        "incomplete_iterations": max(0, missing_iterations),
        "skipped_requests": sum(p["skipped"] for p in parts),
        "reconnects": sum(p["reconnects"] for p in parts),
        "wall_s": None if wall is None else round(wall, 4),
        "requests_per_s": round(ok_requests / wall, 2) if wall else None,
        "iterations_per_s": round(len(iteration_latencies) / wall, 2) if wall else None,
        "p50_ms": ms(percentile(all_requests, 0.50)),
        "p95_ms": ms(percentile(all_requests, 0.95)),
        "p99_ms": ms(percentile(all_requests, 0.99)),
        "iteration_p50_ms": ms(percentile(iteration_latencies, 0.50)),
        "iteration_p95_ms": ms(percentile(iteration_latencies, 0.95)),
        "per_operation": {
            op: {
                "n": len(latencies[op]),
                "p50_ms": ms(percentile(latencies[op], 0.50)),
                "p95_ms": ms(percentile(latencies[op], 0.95)),
            }
            for op in ops
        },
        "server_cpu_ms_per_request": (
            round(raw["server_cpu"] * 1000 / ok_requests, 3) if raw["server_cpu"] is not None and ok_requests else None
        ),
        "server_cpu_utilisation": (
            round(raw["server_cpu"] / wall, 3) if raw["server_cpu"] is not None and wall else None
        ),
        # CPU the rest of the machine used during the cell (neither the server
        # nor the benchmark's clients): anything well above 0 means the
        # figures of this cell were disturbed by other work.
        "other_cpu_cores": (
            round(
                max(0.0, raw["machine_cpu"] - (raw["server_cpu"] or 0) - sum(p["client_cpu"] for p in parts)) / wall, 2
            )
            if wall
            else None
        ),
        "client_cpu_ms_per_request": (
            round(sum(p["client_cpu"] for p in parts) * 1000 / ok_requests, 3) if ok_requests else None
        ),
        "tls": raw["tls"],
        "error_samples": [s for p in parts for s in p["error_samples"]][:10],
        "problems": problems,
    }
    if raw.get("unsupported"):
        # The server answered the workload's set-up with an error: say so,
        # with its answer, rather than time what is left.
        result["status"] = "unsupported"
        result["problems"] = [f"refused the workload's set-up: {raw['unsupported'][0]}", *problems]
    elif ok_requests == 0:
        result["status"] = "failed"
    elif result["errors"]:
        result["status"] = "errors"
    elif result["incomplete_iterations"]:
        result["status"] = "incomplete"
    else:
        result["status"] = "ok"
    return result


def not_run(server: str, workload: str, concurrency: int, reason: str) -> dict:
    return {
        "server": server,
        "workload": workload,
        "concurrency": concurrency,
        "status": "not run",
        "problems": [reason],
        "errors": None,
    }


def cores_used(results: list[dict], workload: str, concurrency: int) -> str:
    """Where a cell's cores went, server by server: the server's
    process tree and the load generator's clients, in cores over the cell
    (e.g. "kms-server 1.32 + 0.64, PyKMIP 1.00 + 0.21"). The machine's
    cores are shared: a server that leaves the clients less CPU per request
    leaves itself more; PyKMIP's server does not use more than one
    (its engine lock)."""
    parts = []
    for r in results:
        if r["workload"] != workload or r["concurrency"] != concurrency or r.get("server_cpu_utilisation") is None:
            continue
        rate, client_ms = r.get("requests_per_s"), r.get("client_cpu_ms_per_request")
        if not rate or client_ms is None:
            continue
        parts.append(f"{r['server']} {r['server_cpu_utilisation']:.2f} + {rate * client_ms / 1000:.2f}")
    return ", ".join(parts)


def render(results: list[dict], meta: dict, console) -> None:
    from rich import box
    from rich.table import Table

    table = Table(
        title=f"KMIP throughput, {meta['ops']} iterations per cell, {meta['cpu_count']} cores ({meta['date']})",
        box=box.SIMPLE_HEAVY,
        header_style="bold",
    )
    table.add_column("workload (req/it)")
    table.add_column("conc", justify="right")
    shown = [name for name in SERVERS if name in meta.get("servers", SERVERS)]
    for name in shown:
        style = {"PyKMIP": "magenta", "ceiling": "green"}.get(name, "cyan")
        table.add_column(f"{name}\nreq/s", justify="right", style=style)
        table.add_column("p50 ms", justify="right")
        table.add_column("p95 ms", justify="right")
        table.add_column("srv CPU\nms/req", justify="right")
        table.add_column("err", justify="right")
    versus_pykmip = "kms-server" in shown and "PyKMIP" in shown
    audit_cost = "kms-server" in shown and "kms-no-audit" in shown
    versus_ceiling = "kms-server" in shown and "ceiling" in shown
    if versus_pykmip:
        table.add_column("kms/\nPyKMIP", justify="right", style="bold")
    if versus_ceiling:
        table.add_column("kms/\nceiling", justify="right", style="bold")
    if audit_cost:
        table.add_column("audit on/\naudit off", justify="right", style="bold")

    cells: dict[tuple[str, int], dict[str, dict]] = {}
    for r in results:
        cells.setdefault((r["workload"], r["concurrency"]), {})[r["server"]] = r

    def fmt(v, digits=1):
        return "-" if v is None else f"{v:,.{digits}f}"

    last_workload = None
    for (workload, conc), by_server in cells.items():
        if last_workload is not None and workload != last_workload:
            table.add_section()
        row = [f"{workload} ({len(WORKLOADS[workload])})" if workload != last_workload else "", str(conc)]
        last_workload = workload
        for name in shown:
            r = by_server.get(name)
            if r is None or r["status"] == "not run":
                row += ["[yellow]not run[/]", "", "", "", ""]
                continue
            if r["status"] == "unsupported":
                row += ["[yellow]refused[/]", "", "", "", ""]
                continue
            if r["status"] == "failed":
                row += ["[red]FAILED[/]", "-", "-", "-", f"[red]{r['errors']}[/]"]
                continue
            err = f"[red]{r['errors']}[/]" if r["errors"] else "0"
            if r.get("incomplete_iterations"):
                err += f" [red]({r['incomplete_iterations']} it. not run)[/]"
            row += [
                fmt(r["requests_per_s"]),
                fmt(r["p50_ms"], 2),
                fmt(r["p95_ms"], 2),
                fmt(r["server_cpu_ms_per_request"], 2),
                err,
            ]
        for wanted, other in ((versus_pykmip, "PyKMIP"), (versus_ceiling, "ceiling"), (audit_cost, "kms-no-audit")):
            if not wanted:
                continue
            a, b = by_server.get("kms-server"), by_server.get(other)
            if a and b and a.get("requests_per_s") and b.get("requests_per_s"):
                ratio = a["requests_per_s"] / b["requests_per_s"]
                row.append(f"{ratio:.0%}" if other == "ceiling" else f"{ratio:.2f}x")
            else:
                row.append("-")
        table.add_row(*row)
    console.print(table)
    console.print(
        "req/s: successful KMIP requests per second of wall time (all clients); p50/p95: per-request latency "
        "seen by the client; srv CPU ms/req: CPU time of the server's process tree (user+sys) per successful "
        "request; err: failed requests + clients that could not connect or finish; refused: the server answered "
        "the workload's set-up with an error (below). kms/ceiling: kms-server's req/s as a share of the ceiling's "
        "(bench/ceiling_server.py: canned answers on the same stack). connect: a request is a whole new session."
    )
    for name in shown:
        tls = meta.get("tls", {}).get(name)
        if tls:
            console.print(f"{name}: TLS {tls[0]} {tls[1]}")
    if "ceiling" in shown:
        n = meta.get("ceiling_processes", 1)
        where = "in its reactor thread" if meta.get("ceiling_in_reactor") else "on its thread pool"
        console.print(f"ceiling: {n} process{'es' if n > 1 else ''}, every request answered {where}")
    for workload in dict.fromkeys(r["workload"] for r in results):
        n = len(WORKLOADS[workload])
        console.print(f"{workload}: {WORKLOAD_HELP[workload]} ({n} request{'s' if n > 1 else ''} per iteration)")
        for concurrency in dict.fromkeys(r["concurrency"] for r in results if r["workload"] == workload):
            cores = cores_used(results, workload, concurrency)
            if cores:
                console.print(f"    x{concurrency}, cores used by the server + the load generator: {cores}")
    noisy = [r for r in results if (r.get("other_cpu_cores") or 0) > NOISE_CORES]
    if noisy:
        console.print(
            f"[yellow]Other work on the machine used more than {NOISE_CORES} core(s) during "
            f"{len(noisy)} cell(s); their figures are disturbed:[/] "
            + ", ".join(f"{r['server']} {r['workload']} x{r['concurrency']} ({r['other_cpu_cores']})" for r in noisy)
        )
    problems = [r for r in results if r.get("problems") or r.get("error_samples")]
    for r in problems:
        console.print(f"[red]{r['server']} {r['workload']} x{r['concurrency']}[/] ({r['status']}):")
        for text in r.get("problems", [])[:5] + r.get("error_samples", [])[:5]:
            console.print(f"    {text}", markup=False)


# --------------------------------------------------------------------------
# Main.
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--ops", type=int, default=300, help="iterations per workload per concurrency level per server (default 300)"
    )
    p.add_argument("--concurrency", default="1,4,16", help="comma-separated client connection counts (default 1,4,16)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help=f"comma-separated, from {', '.join(WORKLOADS)}")
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help="comma-separated: kms-server, kms-no-audit (auditing off), PyKMIP, ceiling (canned answers on "
        "kms-server's stack) (default kms-server,PyKMIP,ceiling)",
    )
    p.add_argument(
        "--warm-keys",
        type=int,
        default=16,
        metavar="N",
        help="keys each connection creates before the clock for the get and locate-x workloads (default 16)",
    )
    p.add_argument(
        "--warmup", type=int, default=2, help="unmeasured iterations per connection before the clock starts (default 2)"
    )
    p.add_argument(
        "--cell-timeout",
        type=float,
        default=120.0,
        help="seconds one workload x concurrency x server may take (default 120)",
    )
    p.add_argument("--socket-timeout", type=float, default=20.0, help="client socket timeout in seconds (default 20)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        metavar="S",
        help="before each cell wait up to S seconds for the machine to be idle (default 10; 0: don't wait)",
    )
    p.add_argument(
        "--noisy-retries",
        type=int,
        default=2,
        metavar="N",
        help=f"run a cell again, up to N times, when other work used more than {NOISE_CORES} core during it (default 2)",
    )
    p.add_argument(
        "--log-level", default="INFO", help="log level of both servers (default INFO, both servers' default)"
    )
    p.add_argument(
        "--kms-worker-threads",
        type=int,
        metavar="N",
        help="kms-server's [server] worker_threads, and the ceiling's (default: the server's default, 16)",
    )
    p.add_argument(
        "--kms-processes",
        type=int,
        metavar="N",
        help="kms-server's [server] processes (default: the server's default, one per core)",
    )
    p.add_argument(
        "--ceiling-processes",
        type=int,
        default=1,
        metavar="N",
        help="the ceiling's processes on one socket (default 1: on 2 cores the clients leave it no more)",
    )
    p.add_argument(
        "--ceiling-answers",
        choices=("reactor", "pool"),
        default="reactor",
        help="where the ceiling answers: in its reactor thread, as kms-server answers most requests (default), "
        "or on its thread pool, the reference issue 15 measured when it was filed",
    )
    p.add_argument("--json", metavar="FILE", help="also write every figure to FILE")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (servers' logs and databases)")
    args = p.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    for w in args.workloads:
        if w not in WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(WORKLOADS)}")
    for s in args.servers:
        if s not in SERVERS:
            p.error(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    if args.ops < 1 or not args.concurrency or min(args.concurrency) < 1 or args.warm_keys < 1:
        p.error("--ops, --warm-keys and every --concurrency value must be at least 1")
    if args.ceiling_processes < 1:
        p.error("--ceiling-processes must be at least 1")
    return args


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("kms-server", "PyKMIP", "cryptography", "SQLAlchemy", "Twisted"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def failed_cells(results: list[dict]) -> list[dict]:
    """The cells that make the run fail. A workload PyKMIP's server refuses
    (it has no custom attributes) is a fact about the reference, not a
    failure of the run; so is a PyKMIP cell cut short, without errors, by
    --cell-timeout (its cycle runs at about 45 requests a second on two
    cores: `make bench`'s 6,000 requests take longer than the default
    120 s). Such a cell's figures are measured over the iterations it ran."""
    return [
        r
        for r in results
        if r["status"] != "ok" and not (r["status"] in ("unsupported", "incomplete") and r["server"] == "PyKMIP")
    ]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        from rich.console import Console
    except ImportError:
        print("bench/kmip_throughput.py needs rich: .venv/bin/pip install rich", file=sys.stderr)
        return 2

    console = Console()
    width = 150 if len(args.servers) <= 2 else 210
    if not console.is_terminal or console.width < width:
        console = Console(width=width)  # the side-by-side table needs the room, also in a file
    err = Console(stderr=True, width=150, log_path=False)

    def terminate(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)

    root = Path(tempfile.mkdtemp(prefix="kmip-bench-"))
    servers: dict[str, Server] = {}
    start_errors: dict[str, str] = {}
    pool: ClientPool | None = None
    results: list[dict] = []
    meta = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": _versions(),
        "ops": args.ops,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "kmip_version": "1.2",
        "servers": args.servers,
        "kms_worker_threads": args.kms_worker_threads,
        "kms_processes": args.kms_processes,
        "ceiling_processes": args.ceiling_processes,
        "ceiling_in_reactor": args.ceiling_answers == "reactor",
        "client": "PyKMIP ProxyKmipClient, one process per connection",
        "tls": {},
        "loadavg_at_start": os.getloadavg(),
    }
    interrupted = False
    try:
        from kmip_core.pki import init_pki

        pki = root / "pki"
        init_pki(pki, server_names=["localhost"], clients=[CLIENT_NAME])

        err.log(f"starting {max(args.concurrency)} client processes and the servers in {root}")
        pool = ClientPool(max(args.concurrency))
        starters = {
            "kms-server": lambda *a: start_kms_server(
                *a, worker_threads=args.kms_worker_threads, processes=args.kms_processes
            ),
            "kms-no-audit": lambda *a: start_kms_server(
                *a,
                worker_threads=args.kms_worker_threads,
                audit=False,
                name="kms-no-audit",
                processes=args.kms_processes,
            ),
            "PyKMIP": start_pykmip,
            "ceiling": lambda *a: start_ceiling(
                *a,
                worker_threads=args.kms_worker_threads,
                processes=args.ceiling_processes,
                in_reactor=args.ceiling_answers == "reactor",
            ),
        }
        for name in args.servers:
            try:
                servers[name] = starters[name](root, pki, args.log_level, 60.0)
                err.log(f"{name} pid {servers[name].proc.pid} on 127.0.0.1:{servers[name].port}")
            except Exception as exc:
                start_errors[name] = str(exc)
                err.log(f"[red]{name} could not be started[/]: {str(exc).splitlines()[0]}")

        for workload in args.workloads:
            for conc in args.concurrency:
                for name in args.servers:
                    server = servers.get(name)
                    if server is None:
                        results.append(
                            not_run(name, workload, conc, f"server not started: {start_errors[name].splitlines()[0]}")
                        )
                        continue
                    if not server.alive():
                        results.append(
                            not_run(
                                name, workload, conc, f"server exited ({server.proc.returncode}) earlier in the run"
                            )
                        )
                        continue
                    spec = client_spec(
                        server.host,
                        server.port,
                        pki,
                        workload,
                        warmup=args.warmup,
                        socket_timeout=args.socket_timeout,
                        warm_keys=args.warm_keys,
                        canned=name == "ceiling",
                    )
                    attempt = 0
                    best = None
                    while True:
                        attempt += 1
                        if args.quiet_wait > 0 and not wait_until_quiet(args.quiet_wait):
                            err.log(
                                f"[yellow]the machine did not become quiet within {args.quiet_wait:.0f}s; running anyway[/]"
                            )
                        raw = pool.run_cell(spec, conc, args.ops, args.cell_timeout, server.cpu)
                        r = summarize(name, workload, conc, raw)
                        r["attempt"] = attempt
                        noisy = (r.get("other_cpu_cores") or 0) > NOISE_CORES
                        err.log(
                            f"{name:10} {workload:12} x{conc:<3} {r['status']:7} "
                            f"{r['requests_per_s'] or 0:8.1f} req/s  p50 {r['p50_ms'] or 0:7.2f} ms  "
                            f"p95 {r['p95_ms'] or 0:7.2f} ms  errors {r['errors']}"
                            + (f"  [yellow]other work on the machine: {r['other_cpu_cores']} cores[/]" if noisy else "")
                        )
                        if best is None or (r.get("other_cpu_cores") or 0) < (best.get("other_cpu_cores") or 0):
                            best = r
                        if not noisy or attempt > args.noisy_retries or not server.alive():
                            break
                    r = best  # the least disturbed attempt
                    r["attempts"] = attempt
                    if not server.alive():
                        r["problems"].append(f"server exited ({server.proc.returncode}) during this cell")
                        r["errors"] = (r["errors"] or 0) + 1
                        r["status"] = "failed" if r["status"] == "failed" else "errors"
                    if r.get("tls"):
                        meta["tls"].setdefault(name, r["tls"])
                    results.append(r)
    except KeyboardInterrupt:
        interrupted = True
        err.log("[yellow]interrupted: stopping the servers; figures so far follow[/]")
    except Exception:
        err.print(traceback.format_exc(), markup=False)
        err.log("[red]benchmark aborted: stopping the servers; figures so far follow[/]")
        interrupted = True
    finally:
        if pool is not None:
            pool.close()
        for name, server in servers.items():
            if not server.alive():
                err.print(
                    f"{name} had exited with {server.proc.returncode}; log tail:\n{server.log_tail()}", markup=False
                )
            server.stop()  # also when it died: its process group may have children left
        if args.keep or interrupted:
            err.log(f"servers' logs and databases kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    meta["start_errors"] = start_errors
    meta["loadavg_at_end"] = os.getloadavg()
    meta["pykmip_concurrency_note"] = (
        "PyKMIP's server runs one thread per connection but processes every request under one engine lock "
        "(KmipEngine._synchronize), so requests on concurrent connections are served one at a time."
    )
    if results:
        render(results, meta, console)
    else:
        console.print("no cell finished: nothing to show")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        err.log(f"figures written to {args.json}")
    if interrupted:
        return 130
    return 1 if failed_cells(results) else 0


if __name__ == "__main__":
    sys.exit(main())
