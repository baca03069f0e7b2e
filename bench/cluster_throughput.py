#!/usr/bin/env python3
"""Write throughput of one KMS node versus three nodes on the same database,
in the same run (issue 4), with the audit trail and without it (issue 3).

A throw-away PostgreSQL primary with a synchronous standby (as in
tests/pg_cluster.py: initdb, pg_basebackup, on free 127.0.0.1 ports) backs
the nodes, so every acknowledged Create is on two servers. Client processes
(not threads: the client must not be the bottleneck) create AES-256 keys
through the project's failover client, spread evenly over the nodes.

    .venv/bin/python bench/cluster_throughput.py [--ops 600] [--clients 12] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pg_cluster  # noqa: E402
from conftest import start_server  # noqa: E402

from bench.stats import percentile  # noqa: E402
from kmip_core.pki import init_pki  # noqa: E402


def _worker(args) -> tuple[int, int, list[float]]:
    node, pki, ops = args
    from kmip_core.client import KmipClient, KmipError

    latencies, errors = [], 0
    with KmipClient([node], cert=pki / "alice.pem", key=pki / "alice.key", ca=pki / "ca.pem") as client:
        for _ in range(ops):
            start = time.perf_counter()
            try:
                client.create_symmetric_key()
            except KmipError:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)
    return len(latencies), errors, latencies


def run(nodes: list[str], pki: Path, clients: int, ops: int) -> dict:
    per_client = max(1, ops // clients)
    jobs = [(nodes[i % len(nodes)], pki, per_client) for i in range(clients)]
    with mp.get_context("spawn").Pool(clients) as pool:
        pool.map(_worker, [(nodes[0], pki, 1)] * clients)  # Warm up connections and imports.
        start = time.perf_counter()
        results = pool.map(_worker, jobs)
        elapsed = time.perf_counter() - start
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    latencies = sorted(x for r in results for x in r[2])

    def pct(p: float) -> float:
        return percentile(latencies, p, float("nan")) * 1000

    return {
        "nodes": len(nodes),
        "creates": done,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "creates_per_second": round(done / elapsed, 1),
        "p50_ms": round(pct(0.5), 2),
        "p95_ms": round(pct(0.95), 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=600, help="creates per configuration (default 600)")
    parser.add_argument("--clients", type=int, default=12, help="client processes (default 12)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    reason = pg_cluster.available()
    if reason:
        print(f"cluster_throughput: cannot run: {reason}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="kms-bench-"))
    pki = work / "pki"
    init_pki(pki, server_names=["localhost"], clients=["alice"])
    cluster = pg_cluster.PgCluster().start()
    rows = []
    try:
        # With the audit trail (the default), then with [audit] enabled =
        # false, on the same database: what the trail costs on PostgreSQL.
        for audit in (True, False):
            servers = []
            try:
                for i in range(3):
                    servers.append(
                        start_server(
                            work / f"kms-{i}-{'audit' if audit else 'no-audit'}",
                            pki,
                            db_url=cluster.multi_host_url(),
                            master_key=work / "mk",
                            extra_config="" if audit else "\n[audit]\nenabled = false\n",
                        )
                    )
                addresses = [f"{s.host}:{s.port}" for s in servers]
                for nodes in (addresses[:1], addresses):
                    rows.append({"audit": "on" if audit else "off", **run(nodes, pki, args.clients, args.ops)})
            finally:
                for s in servers:
                    s.stop()
    finally:
        cluster.close()
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"Create AES-256 through kms-server nodes on PostgreSQL with a synchronous standby "
        f"({args.clients} client processes)"
    )
    for column in ("audit", "nodes", "creates", "errors", "seconds", "creates/s", "p50 ms", "p95 ms"):
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(
            *(
                str(r[k])
                for k in ("audit", "nodes", "creates", "errors", "seconds", "creates_per_second", "p50_ms", "p95_ms")
            )
        )
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
