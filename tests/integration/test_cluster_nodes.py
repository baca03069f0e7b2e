"""Several kms-server nodes on one PostgreSQL database serve at the same
time: concurrent writers on different nodes lose no update, and
`kms-admin cluster status` shows the nodes, the primary and its standby."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import pg_cluster
import pytest
from conftest import start_server
from kmip.core.enums import Operation, Tags
from kmip_client import RawClient

from kmip_core import ttlv
from kmip_core.client.messages import request_message

T = Tags
pytestmark = pytest.mark.skipif(pg_cluster.available() is not None, reason=str(pg_cluster.available()))


def message(op: Operation, payload: list) -> bytes:
    return request_message((1, 4), op, payload)


def ok_payload(response: ttlv.Item) -> ttlv.Item:
    item = response.find(T.BATCH_ITEM.value)
    assert item.get(T.RESULT_STATUS.value) == 0, item
    return item.find(T.RESPONSE_PAYLOAD.value)


@pytest.fixture
def replicated():
    cluster = pg_cluster.PgCluster().start()
    yield cluster
    cluster.close()


@pytest.fixture
def three_nodes(tmp_path, pki_dir, replicated):
    servers = []
    key = tmp_path / "master.key"
    try:
        servers.append(start_server(tmp_path / "kms-0", pki_dir, db_url=replicated.multi_host_url(), master_key=key))
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            servers += pool.map(
                lambda i: start_server(tmp_path / f"kms-{i}", pki_dir, db_url=replicated.multi_host_url(), master_key=key),
                (1, 2),
            )
        yield servers
    finally:
        for s in servers:
            s.stop()


def test_concurrent_writers_on_different_nodes_lose_no_update(three_nodes, pki_dir):
    """Twelve clients spread over three nodes each add 10 values of one
    x- attribute to the same key at the same time: all 120 are there."""
    with RawClient(three_nodes[0].host, three_nodes[0].port, pki_dir, "alice") as raw:
        created = ok_payload(raw.request(message(Operation.CREATE, [
            ttlv.enumeration(T.OBJECT_TYPE.value, 2),
            ttlv.structure(T.TEMPLATE_ATTRIBUTE.value, [
                ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Algorithm"),
                                                   ttlv.enumeration(T.ATTRIBUTE_VALUE.value, 3)]),
                ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, "Cryptographic Length"),
                                                   ttlv.integer(T.ATTRIBUTE_VALUE.value, 256)]),
            ]),
        ])))
    uid = created.get(T.UNIQUE_IDENTIFIER.value)

    def writer(n):
        server = three_nodes[n % 3]
        with RawClient(server.host, server.port, pki_dir, "alice") as raw:
            for i in range(10):
                ok_payload(raw.request(message(Operation.ADD_ATTRIBUTE, [
                    ttlv.text(T.UNIQUE_IDENTIFIER.value, uid),
                    ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, "x-writer"),
                                                       ttlv.text(T.ATTRIBUTE_VALUE.value, f"{n}-{i}")]),
                ])))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        list(pool.map(writer, range(12)))
    with RawClient(three_nodes[2].host, three_nodes[2].port, pki_dir, "alice") as raw:
        payload = ok_payload(raw.request(message(Operation.GET_ATTRIBUTES, [
            ttlv.text(T.UNIQUE_IDENTIFIER.value, uid), ttlv.text(T.ATTRIBUTE_NAME.value, "x-writer")])))
    values = sorted(a.get(T.ATTRIBUTE_VALUE.value) for a in payload.find_all(T.ATTRIBUTE.value))
    assert values == sorted(f"{n}-{i}" for n in range(12) for i in range(10))


def test_cluster_status_shows_nodes_primary_and_sync_standby(three_nodes, replicated):
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", "cluster", "status", "--db-url", replicated.multi_host_url()],
        capture_output=True, text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    for i, server in enumerate(three_nodes):
        assert f"kms-{i}" in result.stdout and f"127.0.0.1:{server.port}" in result.stdout
    assert "primary" in result.stdout
    assert "standby" in result.stdout and "sync" in result.stdout and "streaming" in result.stdout
