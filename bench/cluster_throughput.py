#!/usr/bin/env python3
"""The workloads of bench/kmip_throughput.py through one KMS node and through
three, on PostgreSQL with a synchronous standby, in the same run (issue 15,
item 5; issue 4 measured Create only).

    .venv/bin/python bench/cluster_throughput.py [--workloads cycle,get,create,vcenter-mix,locate-x,connect]
        [--concurrency 16] [--ops 300] [--processes N] [--audit on|off|both] [--json FILE]

A throw-away PostgreSQL primary with a synchronous standby (tests/pg_cluster.py:
initdb, pg_basebackup, on free 127.0.0.1 ports) backs three kms-server nodes
(tests/conftest.py's start_server: one master key, one audit key, mutual TLS,
`[server] processes` worker processes each), so every acknowledged write is
on two database servers. For each workload, one cell sends every connection
to the first node, the next spreads the connections evenly over the three
(connection i to node i mod 3); the workloads, the client processes and the
answers' checks are kmip_throughput's own (ClientPool, client_spec,
summarize). Server CPU is the nodes' process trees (the serving nodes only)
and, apart, PostgreSQL's (primary and standby, every backend), per
successful request. Nothing here asserts a timing: see bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import pg_cluster  # noqa: E402

from bench import kmip_throughput as kt  # noqa: E402

DEFAULT_WORKLOADS = ("cycle", "get", "create", "vcenter-mix", "locate-x", "connect")
CLUSTER_NODES = 3


def connections_per_node(nodes: int, connections: int) -> list[int]:
    """How many of `connections` each of `nodes` nodes gets when connection
    i goes to node i mod nodes (ClientPool.run_cell with addresses)."""
    if nodes < 1 or connections < 0:
        raise ValueError("nodes must be at least 1 and connections not negative")
    return [connections // nodes + (1 if i < connections % nodes else 0) for i in range(nodes)]


@dataclass
class CpuSampler:
    """The CPU seconds so far of the KMS nodes' and PostgreSQL's process
    trees. Called (by ClientPool.run_cell) before and after a cell; each
    call's breakdown is kept, so the cell's share of each can be told apart.
    The total, nodes and database together, is what run_cell subtracts
    from the machine's busy time to find other work on the machine."""

    node_pids: list[int]
    pg_pids: list[int]
    serving: int = 1
    samples: list[tuple[float | None, float | None, float | None]] = field(default_factory=list)

    def __call__(self) -> float | None:
        per_node = [kt.process_tree_cpu(pid) for pid in self.node_pids]
        per_pg = [kt.process_tree_cpu(pid) for pid in self.pg_pids]
        serving = None if None in per_node[: self.serving] else sum(c or 0.0 for c in per_node[: self.serving])
        every_node = None if None in per_node else sum(c or 0.0 for c in per_node)
        pg = None if None in per_pg else sum(c or 0.0 for c in per_pg)
        self.samples.append((serving, pg, every_node))
        return None if every_node is None or pg is None else every_node + pg

    def cell_cpu(self) -> tuple[float | None, float | None]:
        """CPU seconds of the serving nodes and of PostgreSQL between the
        last two samples (one cell)."""
        if len(self.samples) < 2:
            return None, None
        (n0, p0, _), (n1, p1, _) = self.samples[-2], self.samples[-1]
        nodes = None if n0 is None or n1 is None else n1 - n0
        pg = None if p0 is None or p1 is None else p1 - p0
        return nodes, pg


def per_request_ms(cpu_seconds: float | None, requests: int | None) -> float | None:
    """CPU milliseconds per successful request, None when either is unknown."""
    if cpu_seconds is None or not requests:
        return None
    return round(cpu_seconds * 1000 / requests, 3)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--workloads",
        default=",".join(DEFAULT_WORKLOADS),
        help=f"comma-separated, from {', '.join(kt.WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})",
    )
    p.add_argument(
        "--concurrency",
        "--clients",
        default="16",
        help="comma-separated client connection counts, each a client process (default 16)",
    )
    p.add_argument(
        "--ops", type=int, default=300, help="iterations per cell (workload x concurrency x nodes; default 300)"
    )
    p.add_argument(
        "--processes",
        type=int,
        default=os.cpu_count() or 1,
        metavar="N",
        help="each node's [server] processes (default: the cores, a node's own default on PostgreSQL)",
    )
    p.add_argument(
        "--audit",
        choices=("on", "off", "both"),
        default="on",
        help="the audit trail: on (default), off ([audit] enabled = false), or both, one after the other",
    )
    p.add_argument("--warm-keys", type=int, default=16, metavar="N", help="get and locate-x: keys per connection (16)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured iterations per connection (default 2)")
    p.add_argument("--cell-timeout", type=float, default=120.0, help="seconds one cell may take (default 120)")
    p.add_argument("--socket-timeout", type=float, default=20.0, help="client socket timeout in seconds (default 20)")
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=5.0,
        metavar="S",
        help="before each cell wait up to S seconds for the machine to be idle (default 5; 0: don't wait)",
    )
    p.add_argument(
        "--noisy-retries",
        type=int,
        default=0,
        metavar="N",
        help=f"run a cell again, up to N times, when other work used more than {kt.NOISE_CORES} core (default 0: "
        "a retry doubles the run, and on a shared machine the next attempt is rarely quieter)",
    )
    p.add_argument("--log-level", default="INFO", help="the nodes' log level (default INFO, their default)")
    p.add_argument("--json", type=Path, help="also write every figure to this file")
    args = p.parse_args(argv)
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for w in args.workloads:
        if w not in kt.WORKLOADS:
            p.error(f"unknown workload {w!r}; choose from {', '.join(kt.WORKLOADS)}")
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",") if x.strip()]
    except ValueError:
        p.error(f"--concurrency takes whole numbers separated by commas, not {args.concurrency!r}")
    if not args.workloads or not args.concurrency or min(args.concurrency) < 1:
        p.error("--workloads needs one workload and every --concurrency value must be at least 1")
    if args.ops < 1 or args.warm_keys < 1 or args.processes < 1:
        p.error("--ops, --warm-keys and --processes must be at least 1")
    return args


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def measure(
    pool: kt.ClientPool,
    sampler: CpuSampler,
    spec: dict,
    concurrency: int,
    addresses: list[tuple[str, int]],
    args: argparse.Namespace,
    log: Callable[[str], None],
    label: str,
) -> dict[str, Any]:
    """One cell through `addresses`, run again (up to --noisy-retries) when
    other work disturbed it; the least disturbed attempt is kept."""
    best: dict[str, Any] | None = None
    attempt = 0
    while True:
        attempt += 1
        if args.quiet_wait > 0 and not kt.wait_until_quiet(args.quiet_wait):
            log(f"the machine did not become quiet within {args.quiet_wait:.0f}s; running anyway")
        sampler.serving = len(addresses)
        raw = pool.run_cell(spec, concurrency, args.ops, args.cell_timeout, sampler, addresses=addresses)
        r = kt.summarize(label, spec["workload"], concurrency, raw)
        node_cpu, pg_cpu = sampler.cell_cpu()
        r["nodes"] = len(addresses)
        r["connections_per_node"] = connections_per_node(len(addresses), raw["clients"])
        r["node_cpu_ms_per_request"] = per_request_ms(node_cpu, r["requests_ok"])
        r["pg_cpu_ms_per_request"] = per_request_ms(pg_cpu, r["requests_ok"])
        r["attempt"] = attempt
        noisy = (r.get("other_cpu_cores") or 0) > kt.NOISE_CORES
        log(
            f"{label:8} {spec['workload']:12} x{concurrency:<3} {r['status']:7} "
            f"{r['requests_per_s'] or 0:8.1f} req/s  p50 {r['p50_ms'] or 0:7.2f} ms  p95 {r['p95_ms'] or 0:7.2f} ms  "
            f"errors {r['errors']}" + (f"  other work on the machine: {r['other_cpu_cores']} cores" if noisy else "")
        )
        if best is None or (r.get("other_cpu_cores") or 0) < (best.get("other_cpu_cores") or 0):
            best = r
        if not noisy or attempt > args.noisy_retries:
            break
    best["attempts"] = attempt
    return best


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(results: list[dict[str, Any]], meta: dict[str, Any]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal or console.width < 170:
        console = Console(width=170)
    both = len({r["audit"] for r in results}) > 1
    table = Table(
        title=(
            f"kms-server on PostgreSQL with a synchronous standby: 1 node vs {CLUSTER_NODES}, {meta['ops']} iterations "
            f"per cell, {meta['processes']} process(es) per node, {meta['cpu_count']} cores ({meta['date']})"
        ),
        box=box.SIMPLE_HEAVY,
        header_style="bold",
    )
    if both:
        table.add_column("audit")
    table.add_column("workload (req/it)")
    table.add_column("conc", justify="right")
    for nodes in (1, CLUSTER_NODES):
        style = "cyan" if nodes == 1 else "green"
        table.add_column(f"{nodes} node{'s' if nodes > 1 else ''}\nreq/s", justify="right", style=style)
        table.add_column("p50 ms", justify="right")
        table.add_column("p95 ms", justify="right")
        table.add_column("nodes CPU\nms/req", justify="right")
        table.add_column("PG CPU\nms/req", justify="right")
        table.add_column("err", justify="right")
    table.add_column(f"{CLUSTER_NODES}/1", justify="right", style="bold")
    cells: dict[tuple[str, str, int], dict[int, dict[str, Any]]] = {}
    for r in results:
        cells.setdefault((r["audit"], r["workload"], r["concurrency"]), {})[r["nodes"]] = r
    last = None
    for (audit, workload, conc), by_nodes in cells.items():
        if last is not None and (audit, workload) != last:
            table.add_section()
        row = [audit] if both else []
        row += [f"{workload} ({len(kt.WORKLOADS[workload])})" if (audit, workload) != last else "", str(conc)]
        last = (audit, workload)
        for nodes in (1, CLUSTER_NODES):
            cell = by_nodes.get(nodes)
            if cell is None or cell["status"] == "failed":
                row += [
                    "[red]FAILED[/]" if cell else "not run",
                    "-",
                    "-",
                    "-",
                    "-",
                    str(cell["errors"]) if cell else "",
                ]
                continue
            err = f"[red]{cell['errors']}[/]" if cell["errors"] else "0"
            if cell.get("incomplete_iterations"):
                err += f" [red]({cell['incomplete_iterations']} it. not run)[/]"
            row += [
                fmt(cell["requests_per_s"]),
                fmt(cell["p50_ms"], 2),
                fmt(cell["p95_ms"], 2),
                fmt(cell["node_cpu_ms_per_request"], 2),
                fmt(cell["pg_cpu_ms_per_request"], 2),
                err,
            ]
        one, many = by_nodes.get(1), by_nodes.get(CLUSTER_NODES)
        if one and many and one.get("requests_per_s") and many.get("requests_per_s"):
            row.append(f"{many['requests_per_s'] / one['requests_per_s']:.2f}x")
        else:
            row.append("-")
        table.add_row(*row)
    console.print(table)
    console.print(
        "req/s: successful KMIP requests per second of wall time (all clients); p50/p95: per-request latency seen by "
        "the client; nodes CPU ms/req: CPU time of the serving nodes' process trees (user+sys) per successful "
        "request, summed over the nodes; PG CPU ms/req: the same for PostgreSQL, primary and synchronous standby; "
        f"{CLUSTER_NODES}/1: req/s through {CLUSTER_NODES} nodes over req/s through 1. connect: a request is a whole "
        "new session (mutual TLS handshake, DiscoverVersions, close)."
    )
    for r in results:
        if r["nodes"] == CLUSTER_NODES:
            split = "/".join(str(n) for n in r["connections_per_node"])
            console.print(f"{CLUSTER_NODES} nodes: connections per node {split} (x{r['concurrency']})")
            break
    for workload in dict.fromkeys(r["workload"] for r in results):
        console.print(f"{workload}: {kt.WORKLOAD_HELP[workload]}")
    noisy = [r for r in results if (r.get("other_cpu_cores") or 0) > kt.NOISE_CORES]
    if noisy:
        console.print(
            f"[yellow]Other work on the machine used more than {kt.NOISE_CORES} core(s) during {len(noisy)} cell(s); "
            "their figures are disturbed:[/] "
            + ", ".join(
                f"{r['nodes']} node(s) {r['workload']} x{r['concurrency']} ({r['other_cpu_cores']})" for r in noisy
            )
        )
    else:
        console.print(f"No cell was disturbed by other work on the machine (all under {kt.NOISE_CORES} core).")
    for r in results:
        if r.get("problems") or r.get("error_samples"):
            console.print(f"[red]{r['nodes']} node(s) {r['workload']} x{r['concurrency']}[/] ({r['status']}):")
            for text in r.get("problems", [])[:5] + r.get("error_samples", [])[:5]:
                console.print(f"    {text}", markup=False)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = pg_cluster.available()
    if reason:
        print(f"cluster_throughput: cannot run: {reason}", file=sys.stderr)
        return 2
    try:
        import rich  # noqa: F401
    except ImportError:
        print("cluster_throughput: needs rich (the table): .venv/bin/pip install rich", file=sys.stderr)
        return 2
    from conftest import start_server

    from kmip_core.pki import init_pki

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    meta: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "commit": git_commit(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "ops": args.ops,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "processes": args.processes,
        "audit": args.audit,
        "loadavg_at_start": os.getloadavg(),
    }
    results: list[dict[str, Any]] = []
    interrupted = aborted = False
    work = Path(tempfile.mkdtemp(prefix="kms-cluster-bench-"))
    pki = work / "pki"
    init_pki(pki, server_names=["localhost"], clients=[kt.CLIENT_NAME])
    cluster = None
    pool = None
    servers: list[Any] = []
    try:
        log(f"starting PostgreSQL (primary and synchronous standby) in {work}")
        cluster = pg_cluster.PgCluster().start()
        meta["postgresql"] = cluster.primary.psql("SHOW server_version", db="postgres")
        if args.processes > 1:
            # The first start on an empty database makes its keyring; two
            # workers doing so at once each make one, and the node fails
            # its integrity check (seen 2026-12-03). One process makes it.
            start_server(
                work / "kms-init", pki, db_url=cluster.multi_host_url(), master_key=work / "mk", log_level="WARNING"
            ).stop()
        pool = kt.ClientPool(max(args.concurrency))
        for audit in ("on", "off") if args.audit == "both" else (args.audit,):
            servers = []
            for i in range(CLUSTER_NODES):
                servers.append(
                    start_server(
                        work / f"kms-{i}-audit-{audit}",
                        pki,
                        db_url=cluster.multi_host_url(),
                        master_key=work / "mk",
                        log_level=args.log_level,
                        server_config=f"processes = {args.processes}",
                        extra_config="" if audit == "on" else "\n[audit]\nenabled = false\n",
                    )
                )
                log(f"node {i} (audit {audit}) pid {servers[-1].proc.pid} on {servers[-1].host}:{servers[-1].port}")
            addresses = [(s.host, s.port) for s in servers]
            pg_pids = [pid for pid in (cluster.primary.pid(), cluster.standby.pid()) if pid is not None]
            sampler = CpuSampler([s.proc.pid for s in servers], pg_pids)
            for workload in args.workloads:
                for conc in args.concurrency:
                    # 1 node, then 3, back to back: drift of the machine hits both alike.
                    for nodes in (1, CLUSTER_NODES):
                        spec = kt.client_spec(
                            addresses[0][0],
                            addresses[0][1],
                            pki,
                            workload,
                            warmup=args.warmup,
                            socket_timeout=args.socket_timeout,
                            warm_keys=args.warm_keys,
                        )
                        label = f"{nodes} node{'s' if nodes > 1 else ''}"
                        r = measure(pool, sampler, spec, conc, addresses[:nodes], args, log, label)
                        r["audit"] = audit
                        dead = [i for i, s in enumerate(servers) if s.proc.poll() is not None]
                        if dead:
                            r["problems"].append(f"node(s) {dead} exited during this cell")
                            r["status"] = "failed"
                        results.append(r)
                        if dead:
                            raise RuntimeError(f"node(s) {dead} exited: {servers[dead[0]].stderr_text()[-2000:]}")
            for s in servers:
                s.stop()
            servers = []
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping the nodes and PostgreSQL; figures so far follow")
    except Exception:
        aborted = True
        log(traceback.format_exc())
        log("benchmark aborted: stopping the nodes and PostgreSQL; figures so far follow")
    finally:
        if pool is not None:
            pool.close()
        for s in servers:
            s.stop()
        if cluster is not None:
            cluster.close()
        shutil.rmtree(work, ignore_errors=True)
    meta["loadavg_at_end"] = os.getloadavg()
    if results:
        render(results, meta)
    else:
        print("no cell finished: nothing to show")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
        log(f"figures written to {args.json}")
    if interrupted:
        return 130
    return 1 if aborted or any(r["status"] != "ok" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
