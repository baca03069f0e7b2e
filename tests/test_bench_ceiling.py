"""The benchmark's ceiling server (bench/ceiling_server.py) and the raw
client of bench/kmip_throughput.py: the canned answers are real KMIP over
mutual TLS that PyKMIP's client and the bench's own client accept. No
timing is asserted."""

from __future__ import annotations

import importlib.util
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from kmip.core import enums
from kmip.core.enums import Operation, Tags
from kmip.core.factories import attributes as attribute_factory

from kmip_core import ttlv
from kmip_core.client import messages
from tests.kmip_client import RawClient, pykmip

REPO = Path(__file__).resolve().parent.parent
T = Tags


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


ceiling_server = _load("ceiling_server")
throughput = _load("kmip_throughput")
throughput.CLIENT_NAME = "alice"  # the test PKI's client (this copy of the module is the tests' own)


@pytest.fixture(scope="module")
def ceiling(tmp_path_factory, pki_dir):
    server = throughput.start_ceiling(tmp_path_factory.mktemp("ceiling"), pki_dir, "INFO", 30.0)
    yield server
    server.stop()
    assert server.proc.returncode == 0, server.log_tail()


def test_pykmip_client_gets_well_formed_answers(ceiling, pki_dir):
    client = pykmip(ceiling, pki_dir, "alice", enums.KMIPVersion.KMIP_1_2)
    try:
        uid = client.create(enums.CryptographicAlgorithm.AES, 256, name="k1")
        assert uid == ceiling_server.CANNED_UID
        key = client.get(uid)
        assert key.value == ceiling_server.CANNED_KEY
        assert key.cryptographic_algorithm == enums.CryptographicAlgorithm.AES
        _, attrs = client.get_attributes(uid, ["State", "Cryptographic Length"])
        by_name = {a.attribute_name.value: a.attribute_value.value for a in attrs}
        assert by_name["State"] == enums.State.PRE_ACTIVE
        assert by_name["Cryptographic Length"] == 256
        name = attribute_factory.AttributeFactory().create_attribute(enums.AttributeType.NAME, "k1")
        assert client.locate(attributes=[name]) == [uid]
        client.activate(uid)
        client.destroy(uid)
        versions = client.proxy.discover_versions().protocol_versions
        assert (versions[0].major, versions[0].minor) == (2, 0)
    finally:
        client.close()


def test_a_client_without_a_certificate_is_refused(ceiling, pki_dir):
    with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
        client = RawClient(ceiling.host, ceiling.port, pki_dir, client=None)
        try:
            # TLS 1.3: the refusal of the missing certificate arrives with
            # the first read.
            client.send(messages.request_message((1, 4), Operation.DISCOVER_VERSIONS, []))
            if client.recv_message() is None:
                raise ConnectionError("closed")
        finally:
            client.close()


def test_batch_item_ids_and_version_are_echoed(ceiling, pki_dir):
    items = [
        ttlv.structure(
            T.BATCH_ITEM.value,
            [
                ttlv.enumeration(T.OPERATION.value, op.value),
                ttlv.byte_string(T.UNIQUE_BATCH_ITEM_ID.value, bytes([n])),
                ttlv.structure(T.REQUEST_PAYLOAD.value, [ttlv.text(T.UNIQUE_IDENTIFIER.value, "x")]),
            ],
        )
        for n, op in enumerate((Operation.GET, Operation.DESTROY), 1)
    ]
    header = ttlv.structure(
        T.REQUEST_HEADER.value, [messages.protocol_version((1, 4)), ttlv.integer(T.BATCH_COUNT.value, 2)]
    )
    request = ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, *items]))
    with RawClient(ceiling.host, ceiling.port, pki_dir) as client:
        response = client.request(request)
    assert response.tag == T.RESPONSE_MESSAGE.value
    version = response.find(T.RESPONSE_HEADER.value).find(T.PROTOCOL_VERSION.value)
    assert (version.get(T.PROTOCOL_VERSION_MAJOR.value), version.get(T.PROTOCOL_VERSION_MINOR.value)) == (1, 4)
    answered = [
        (i.get(T.OPERATION.value), i.get(T.UNIQUE_BATCH_ITEM_ID.value), i.get(T.RESULT_STATUS.value))
        for i in response.find_all(T.BATCH_ITEM.value)
    ]
    success = enums.ResultStatus.SUCCESS.value
    assert answered == [(Operation.GET.value, b"\x01", success), (Operation.DESTROY.value, b"\x02", success)]


@pytest.mark.parametrize("workload", throughput.RAW_WORKLOADS)
def test_raw_runner_runs_each_workload_against_the_ceiling(ceiling, pki_dir, workload):
    spec = {
        "host": ceiling.host,
        "port": ceiling.port,
        "cert": str(pki_dir / "alice.pem"),
        "key": str(pki_dir / "alice.key"),
        "ca": str(pki_dir / "ca.pem"),
        "workload": workload,
        "socket_timeout": 10.0,
        "warm_keys": 3,
        "canned": True,
    }
    runner = throughput._RawRunner(spec)
    runner.connect()
    try:
        assert runner.tls()[0].startswith("TLS")
        runner.setup()
        runner.recording = True
        for _ in range(5):
            runner.iteration()
    finally:
        throughput._close_client(runner.client)
    assert runner.errors == 0, runner.error_samples
    assert len(runner.iteration_latencies) == 5
    for op in throughput.WORKLOADS[workload]:
        assert len(runner.latencies[op]) == 5


def test_raw_runner_counts_a_wrong_answer(ceiling, pki_dir):
    """Against the ceiling without the canned exemption, Locate's fixed
    identifier is not the key the cycle created: an error, not a pass."""
    spec = {
        "host": ceiling.host,
        "port": ceiling.port,
        "cert": str(pki_dir / "alice.pem"),
        "key": str(pki_dir / "alice.key"),
        "ca": str(pki_dir / "ca.pem"),
        "workload": "locate-x",
        "socket_timeout": 10.0,
        "warm_keys": 1,
        "canned": False,
    }
    runner = throughput._RawRunner(spec)
    runner.connect()
    try:
        runner.warm = [("another-uid", "x")]
        runner.recording = True
        runner.iteration()
    finally:
        throughput._close_client(runner.client)
    assert runner.errors == 1
    assert "wrong answer" in runner.error_samples[0]
    assert runner.iteration_latencies == []


def test_only_the_reference_may_be_cut_short_or_refuse_without_failing_the_run():
    cells = [
        {"server": "kms-server", "status": "ok"},
        {"server": "PyKMIP", "status": "incomplete"},  # its cycle outlasts --cell-timeout
        {"server": "PyKMIP", "status": "unsupported"},  # it has no custom attributes
    ]
    assert throughput.failed_cells(cells) == []
    bad = [
        {"server": "kms-server", "status": "incomplete"},
        {"server": "ceiling", "status": "incomplete"},
        {"server": "PyKMIP", "status": "errors"},
        {"server": "kms-server", "status": "unsupported"},
    ]
    assert throughput.failed_cells(cells + bad) == bad


def test_cores_used_adds_the_load_generators_share_per_server():
    def cell(workload, server, cores, rate, client_ms, concurrency=16):
        return {
            "workload": workload,
            "concurrency": concurrency,
            "server": server,
            "server_cpu_utilisation": cores,
            "requests_per_s": rate,
            "client_cpu_ms_per_request": client_ms,
        }

    cells = [
        cell("connect", "kms-server", 1.013, 400.0, 2.2),
        cell("connect", "PyKMIP", 1.02, 320.0, 1.9),
        cell("get", "ceiling", 0.9, 10.0, 1.0),
        cell("connect", "ceiling", None, None, None),  # ran nothing: no figures to add
        cell("connect", "kms-server", 0.5, 100.0, 2.0, concurrency=1),
    ]
    assert throughput.cores_used(cells, "connect", 16) == "kms-server 1.01 + 0.88, PyKMIP 1.02 + 0.61"
    assert throughput.cores_used(cells, "connect", 1) == "kms-server 0.50 + 0.20"
    assert throughput.cores_used(cells, "create", 16) == ""


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def test_the_ceiling_runs_as_several_processes_answering_in_the_reactor(tmp_path, pki_dir):
    server = throughput.start_ceiling(tmp_path, pki_dir, "INFO", 30.0, processes=2, in_reactor=True)
    try:
        workers = _children(server.proc.pid)
        assert len(workers) == 2, workers
        clients = [pykmip(server, pki_dir, "alice", enums.KMIPVersion.KMIP_1_2) for _ in range(3)]
        try:
            for client in clients:
                uid = client.create(enums.CryptographicAlgorithm.AES, 256)
                assert uid == ceiling_server.CANNED_UID
                assert client.get(uid).value == ceiling_server.CANNED_KEY
        finally:
            for client in clients:
                client.close()
    finally:
        server.stop()
    assert server.proc.returncode == 0, server.log_tail()
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_the_ceiling_refuses_a_process_count_below_one(tmp_path, pki_dir):
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "ceiling_server.py"),
            "--cert",
            str(pki_dir / "server.pem"),
            "--key",
            str(pki_dir / "server.key"),
            "--ca",
            str(pki_dir / "ca.pem"),
            "--processes",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--processes 0: give 1 or more" in result.stderr
    assert "Traceback" not in result.stderr
