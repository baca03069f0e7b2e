"""bench/kmip_throughput.py end to end, as `make bench` runs it (issue 15's
"Done when": the side-by-side table with the ceiling), on tiny settings:
kms-server, PyKMIP's reference server and the ceiling, two workloads, one
connection, five iterations. No timing is asserted: only that the figures
exist, are positive where they must be, and that the table printed agrees
with the JSON written."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SERVERS = ("kms-server", "PyKMIP", "ceiling")
WORKLOADS = {"get": 1, "cycle": 4}  # workload: requests per iteration, as the table labels it
SERVER_COLUMNS = ("req/s", "p50 ms", "p95 ms", "srv CPU ms/req", "err")


def _cells(line: str) -> list[tuple[int, int, str]]:
    """(start, end, text) of each cell of a table line: rich pads its cells
    so that two of them are at least two spaces apart."""
    return [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+(?: \S+)*", line)]


def _table(stdout: str) -> tuple[list[tuple[str, str]], dict[str, dict[tuple[str, str], str]]]:
    """The printed table as (group, column) headers, in order, and each
    workload's row as {(group, column): text}. Every column but the first is
    right-justified, so a cell ends where its header does; a group is a
    server (its req/s column names it) or "kms/" (the shares)."""
    lines = stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if line.lstrip().startswith("workload (req/it)"))
    top = {end: text for _, end, text in _cells(lines[at - 1])}
    columns: dict[int, tuple[str, str]] = {}
    group = ""
    for _, end, text in _cells(lines[at])[1:]:
        above = top.pop(end, "")
        if above in SERVERS or above == "kms/":
            group = above
            columns[end] = (group, text if above == "kms/" else "req/s")
        else:
            columns[end] = (group, f"{above} {text}".strip())
    assert not top, f"header cells over no column (the table is folded?): {top}\n{stdout}"
    rows: dict[str, dict[tuple[str, str], str]] = {}
    for workload, n in WORKLOADS.items():
        line = next((line for line in lines if line.lstrip().startswith(f"{workload} ({n}) ")), None)
        assert line is not None, f"no row for {workload}\n{stdout}"
        cells = _cells(line)[1:]
        assert all(end in columns for _, end, _ in cells), f"{workload}'s row is out of line\n{stdout}"
        rows[workload] = {columns[end]: text for _, end, text in cells}
    return list(columns.values()), rows


def _assert_side_by_side(stdout: str, figures: dict) -> None:
    """The table has a column group per server, the kms/ceiling share, a
    row per workload; the JSON a positive req/s, no error and a server CPU
    figure per server and workload; and the two agree."""
    assert "KMIP throughput, 5 iterations per cell" in stdout, stdout
    columns, rows = _table(stdout)
    groups = list(dict.fromkeys(group for group, _ in columns))
    assert groups == ["", *SERVERS, "kms/"], columns
    for server in SERVERS:
        assert [c for g, c in columns if g == server] == list(SERVER_COLUMNS), columns
    assert [c for g, c in columns if g == "kms/"] == ["PyKMIP", "ceiling"], columns

    assert figures["meta"]["servers"] == list(SERVERS)
    results = {(r["server"], r["workload"]): r for r in figures["results"]}
    assert set(results) == {(s, w) for s in SERVERS for w in WORKLOADS}, sorted(results)
    for (server, workload), r in results.items():
        where = f"{server} {workload}: {r}"
        assert r["concurrency"] == 1 and r["status"] == "ok", where
        assert r["requests_per_s"] > 0, where
        assert r["errors"] == 0 and r["request_errors"] == 0, where
        assert r["iterations_done"] == 5 and r["requests_ok"] == 5 * WORKLOADS[workload], where
        # CPU time is counted in clock ticks: five canned answers may take none.
        assert r["server_cpu_ms_per_request"] is not None and r["server_cpu_ms_per_request"] >= 0, where
        row = rows[workload]
        assert row[(server, "req/s")] == f"{r['requests_per_s']:,.1f}", (row, where)
        assert row[(server, "srv CPU ms/req")] == f"{r['server_cpu_ms_per_request']:,.2f}", (row, where)
        assert row[(server, "err")] == "0", (row, where)

    for workload, row in rows.items():
        kms = results[("kms-server", workload)]["requests_per_s"]
        share = row[("kms/", "ceiling")]
        assert re.fullmatch(r"\d+%", share), row
        # Printed to the percent: within half a percent of the JSON's ratio.
        assert abs(int(share[:-1]) - 100 * kms / results[("ceiling", workload)]["requests_per_s"]) <= 0.5, (
            share,
            workload,
        )
        versus = row[("kms/", "PyKMIP")]
        assert re.fullmatch(r"\d+\.\d\dx", versus), row
        assert abs(float(versus[:-1]) - kms / results[("PyKMIP", workload)]["requests_per_s"]) <= 0.005, (
            versus,
            workload,
        )


def _gone(pid: int) -> bool:
    """Whether no process is left in the process group `pid` leads (each
    server is started in a session of its own); a SIGKILLed straggler may
    take a moment to be reaped by init."""
    deadline = time.monotonic() + 10
    while True:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


@pytest.mark.slow
def test_make_bench_prints_the_side_by_side_table_with_the_ceiling(tmp_path):
    out = tmp_path / "out.json"
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env["TMPDIR"] = str(tmp_path)  # the script's servers' directories
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "kmip_throughput.py"),
            *("--servers", ",".join(SERVERS), "--workloads", ",".join(WORKLOADS)),
            *("--concurrency", "1", "--ops", "5", "--warmup", "1", "--warm-keys", "2"),
            *("--quiet-wait", "0", "--noisy-retries", "0", "--cell-timeout", "60"),
            *("--json", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
        env=env,
    )
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    _assert_side_by_side(result.stdout, json.loads(out.read_text()))

    # Each server on a port of its own on 127.0.0.1, all stopped, with
    # whatever they started, and their directories removed (no --keep).
    started = re.findall(r"(kms-server|PyKMIP|ceiling) pid (\d+) on (\S+):(\d+)", result.stderr)
    assert sorted(name for name, *_ in started) == sorted(SERVERS), result.stderr
    assert {host for _, _, host, _ in started} == {"127.0.0.1"}, started
    assert len({port for *_, port in started}) == 3 and "0" not in {port for *_, port in started}, started
    for name, pid, _, _ in started:
        assert _gone(int(pid)), f"{name} (pid {pid}) or a process it started is still running"
    assert not list(tmp_path.glob("kmip-bench-*")), list(tmp_path.iterdir())
