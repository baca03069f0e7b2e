"""bench/cluster_throughput.py's own logic: how connections spread over the
nodes, how a cell's CPU is split between the serving nodes and PostgreSQL,
and its command line. No server is started and no timing is asserted."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_cluster_throughput", REPO / "bench" / "cluster_throughput.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cluster = _load()


def test_connections_spread_evenly_with_the_remainder_on_the_first_nodes() -> None:
    """Connection i goes to node i mod n, so 16 over 3 nodes is 6/5/5."""
    assert cluster.connections_per_node(3, 16) == [6, 5, 5]
    assert cluster.connections_per_node(3, 2) == [1, 1, 0]
    assert cluster.connections_per_node(1, 16) == [16]


def test_connections_per_node_refuses_no_nodes() -> None:
    with pytest.raises(ValueError):
        cluster.connections_per_node(0, 4)


def test_sampler_splits_serving_nodes_from_idle_ones_and_the_database() -> None:
    """The total it returns (what run_cell subtracts from the machine's busy
    time) counts every node and PostgreSQL; cell_cpu counts the serving
    nodes only, and PostgreSQL apart."""
    readings = {101: [1.0, 1.5], 102: [2.0, 2.25], 201: [10.0, 10.75]}
    calls: dict[int, int] = {}

    def fake_cpu(pid: int) -> float:
        calls[pid] = calls.get(pid, -1) + 1
        return readings[pid][calls[pid]]

    sampler = cluster.CpuSampler([101, 102], [201], serving=1)
    original = cluster.kt.process_tree_cpu
    cluster.kt.process_tree_cpu = fake_cpu
    try:
        assert sampler() == pytest.approx(13.0)
        assert sampler() == pytest.approx(14.5)
    finally:
        cluster.kt.process_tree_cpu = original
    nodes, pg = sampler.cell_cpu()
    assert nodes == pytest.approx(0.5)
    assert pg == pytest.approx(0.75)


def test_sampler_reads_a_real_process_tree() -> None:
    sampler = cluster.CpuSampler([os.getpid()], [os.getpid()], serving=1)
    first = sampler()
    assert first is not None and first > 0
    assert sampler.cell_cpu() == (None, None)  # one sample is not a cell


def test_sampler_says_unknown_when_a_process_is_gone() -> None:
    sampler = cluster.CpuSampler([2**22 + 7], [os.getpid()], serving=1)
    assert sampler() is None
    assert sampler() is None
    assert sampler.cell_cpu()[0] is None


def test_per_request_ms() -> None:
    assert cluster.per_request_ms(0.5, 250) == 2.0
    assert cluster.per_request_ms(None, 250) is None
    assert cluster.per_request_ms(0.5, 0) is None


def test_command_line_defaults_are_every_workload_at_16_connections() -> None:
    args = cluster.parse_args([])
    assert args.workloads == ["cycle", "get", "create", "vcenter-mix", "locate-x", "connect"]
    assert args.concurrency == [16]
    assert args.audit == "on"


def test_command_line_refuses_an_unknown_workload_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cluster.parse_args(["--workloads", "cycle,nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown workload 'nope'" in err
    assert "Traceback" not in err


def test_command_line_refuses_a_concurrency_that_is_not_a_number(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cluster.parse_args(["--concurrency", "4,x"])
    assert "whole numbers" in capsys.readouterr().err
