"""A node on the PostgreSQL of this machine (127.0.0.1:5432) instead of the
embedded SQLite: the captured vCenter session and PyKMIP's client work the
same, and no key bytes reach the database."""

from __future__ import annotations

import pytest
import vcenter_vectors
from conftest import start_server
from kmip.core import enums
from kmip.core.enums import Tags
from kmip.pie.client import ProxyKmipClient
from kmip_client import RawClient


def test_node_on_postgresql(tmp_path, pki_dir, postgres_db):
    psycopg = pytest.importorskip("psycopg")
    name, url = postgres_db
    server = start_server(tmp_path / "pg-node", pki_dir, db_url=url)
    keys = []
    try:
        with RawClient(server.host, server.port, pki_dir, "alice") as raw:
            for exchange in vcenter_vectors.load()[:20]:
                response = raw.request(exchange.request)
                for item in response.find_all(Tags.BATCH_ITEM.value):
                    # Requests naming vCenter's own ids "1"/"2" may be unknown
                    # here; everything else succeeds.
                    assert item.get(Tags.RESULT_STATUS.value) == 0 or item.get(Tags.RESULT_REASON.value) == 1
        client = ProxyKmipClient(
            hostname=server.host, port=server.port,
            cert=str(pki_dir / "alice.pem"), key=str(pki_dir / "alice.key"), ca=str(pki_dir / "ca.pem"),
        )
        client.open()
        try:
            for _ in range(3):
                uid = client.create(enums.CryptographicAlgorithm.AES, 256)
                keys.append(client.get(uid).value)
        finally:
            client.close()
    finally:
        server.stop()
    with psycopg.connect(host="127.0.0.1", port=5432, user="postgres", dbname=name) as conn:
        rows = conn.execute("SELECT sealed_material FROM kms_objects").fetchall()
        attributes = conn.execute("SELECT value FROM kms_attributes").fetchall()
    assert len(rows) >= 3
    dump = b"".join(bytes(r[0] or b"") for r in rows) + b"".join(bytes(a[0]) for a in attributes)
    for key in keys:
        assert key not in dump
