"""bench/request_cpu.py and bench/key_scale.py's loading from several
processes, run for real on small sizes: they finish, each answer they
check is right (a wrong one makes them exit non-zero), and a bad argument
is one line. No timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / script), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_request_cpu_measures_every_workload_of_a_tree(tmp_path):
    out = _run("request_cpu.py", "--rounds", "2", "--iterations", "8", "--json", str(tmp_path / "f.json"))
    assert out.returncode == 0, out.stderr
    runs = json.loads((tmp_path / "f.json").read_text())
    assert list(runs) == [str(REPO)]
    assert len(runs[str(REPO)]) == 2
    for figures in runs[str(REPO)]:
        assert set(figures) == {"get", "create", "cycle"}
        assert all(v > 0 for v in figures.values())
    assert "min / median" in out.stdout


def test_request_cpu_refuses_a_directory_that_is_not_a_checkout(tmp_path):
    out = _run("request_cpu.py", "--tree", str(tmp_path), "--rounds", "1")
    assert out.returncode != 0
    assert "holds no kms_server package" in out.stderr
    assert "Traceback" not in out.stderr


def test_key_scale_loads_from_two_processes_and_every_key_keeps_its_identifier(tmp_path):
    """2,500 keys loaded by the parent (the first 10) and two loading
    processes; the measurement then Locates random keys by the x-Identifier
    their index gave them and exits non-zero if one finds another key."""
    out = _run(
        "key_scale.py",
        "--sizes",
        "10,2500",
        "--samples",
        "40",
        "--load-processes",
        "2",
        "--db-url",
        f"sqlite:///{tmp_path / 'kms.db'}",
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "2500 keys" in out.stdout
    assert "Locate by x-Identifier p50 at 2500 keys" in out.stdout
