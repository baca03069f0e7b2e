#!/usr/bin/env python3
"""The recovery drill's wall time for N VMs (issue 6, target: 100 VMs in <= 60 s on 2 cores).

Runs `vtpm-drill --vms N --hosts H --json` once per N (default 10 and 100),
one after the other, each as its own process (the console script beside this
Python), and prints, per run: the drill's own `seconds` (from its JSON) and
the wall time measured here around the whole process (Python start-up,
the KMS and broker start-up and shut-down included), and the drill's
verdict: recovered, nv_match, ek_match, kek_match out of N. Everything binds
127.0.0.1 (the drill's servers choose port 0). A run that does not finish
within --timeout is killed and reported; nothing here asserts a timing.

    .venv/bin/python bench/vtpm_drill.py [--vms 10 100] [--hosts 2] [--jobs J]
        [--timeout 600] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

TARGET = {"vms": 100, "seconds": 60.0}


def drill_command(vms: int, hosts: int, jobs: int | None) -> list[str]:
    script = Path(sys.executable).parent / "vtpm-drill"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "broker.drill.cli"]
    argv = [*head, "--vms", str(vms), "--hosts", str(hosts), "--json"]
    if jobs:
        argv += ["--jobs", str(jobs)]
    return argv


def run_one(vms: int, hosts: int, jobs: int | None, timeout: float) -> dict:
    argv = drill_command(vms, hosts, jobs)
    row: dict = {"vms": vms, "hosts": hosts, "command": " ".join(argv[-6:] if len(argv) > 6 else argv)}
    started = time.perf_counter()
    # Its own process group, so a timeout also ends the KMS, broker and swtpm it started.
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        row.update(wall_seconds=round(time.perf_counter() - started, 2), error=f"killed after {timeout:g} s")
        return row
    row["wall_seconds"] = round(time.perf_counter() - started, 2)
    row["exit_status"] = proc.returncode
    try:
        summary = json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = [line for line in err.splitlines() if line.strip()][-1:] or [f"exit status {proc.returncode}"]
        row["error"] = f"no JSON from vtpm-drill: {tail[0]}"
        return row
    row.update(
        drill_seconds=summary.get("seconds"),
        recovered=summary.get("recovered"),
        nv_match=summary.get("nv_match"),
        ek_match=summary.get("ek_match"),
        kek_match=summary.get("kek_match"),
        failures=summary.get("failures", []),
    )
    if proc.returncode != 0:
        row["error"] = f"exit status {proc.returncode}: " + "; ".join(str(f) for f in row["failures"][:3])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, nargs="+", default=[10, 100], help="VM counts, one drill each (default 10 100)")
    parser.add_argument("--hosts", type=int, default=2, help="hosts (default 2)")
    parser.add_argument("--jobs", type=int, help="passed to vtpm-drill --jobs (default: the drill's own)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per drill before it is killed (600)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    rows = []
    for n in args.vms:
        print(f"vtpm-drill --vms {n} --hosts {args.hosts} --json ...", file=sys.stderr, flush=True)
        rows.append(run_one(n, args.hosts, args.jobs, args.timeout))

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"vtpm-drill end to end: {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}; target {TARGET['vms']} VMs <= {TARGET['seconds']:g} s on 2 cores"
    )
    columns = ("VMs", "hosts", "drill s", "wall s", "recovered", "nv_match", "ek_match", "kek_match", "status")
    for column in columns:
        table.add_column(column, justify="right")
    status = 0
    for r in rows:
        n = r["vms"]

        def of(key: str, n: int = n, r: dict = r) -> str:
            return f"{r[key]}/{n}" if r.get(key) is not None else "-"

        ok = "error" not in r and r.get("recovered") == n
        status |= 0 if ok else 1
        verdict = "ok" if ok else f"FAILED: {r.get('error', '')}"[:60]
        table.add_row(
            str(n),
            str(r["hosts"]),
            str(r.get("drill_seconds", "-")),
            str(r["wall_seconds"]),
            of("recovered"),
            of("nv_match"),
            of("ek_match"),
            of("kek_match"),
            verdict,
        )
    Console(width=max(Console().width, 120)).print(table)
    print(
        "drill s: the drill's own JSON `seconds`; wall s: measured here around the vtpm-drill process "
        "(Python start-up and shut-down included)."
    )
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "target": TARGET, "runs": rows}, indent=2))
    return status


if __name__ == "__main__":
    sys.exit(main())
