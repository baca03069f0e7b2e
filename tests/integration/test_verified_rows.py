"""A node keeps the rows it has authenticated (`[storage] verified_rows`,
kms_server/keystore/verified_rows.py), and still never serves a row another
node changed: over real mutual TLS, two nodes on one PostgreSQL database,
node A reads a key (and so holds its row) while node B activates it, adds to
it, then revokes and destroys it; every read on A answers with what B wrote.
The rule: a held row is used only when the rows read in the request's own
transaction are the held row byte for byte (docs/process-model.md)."""

from __future__ import annotations

import pytest
import requests
from conftest import start_server
from kmip.core.enums import ResultReason, State
from prometheus_text import sample

from kmip_core.client import KmipClient
from kmip_core.client.errors import KmipError


@pytest.fixture
def two_nodes(tmp_path, pki_dir, postgres_url):
    key = tmp_path / "master.key"
    servers = []
    try:
        for name in ("a", "b"):
            servers.append(
                start_server(
                    tmp_path / name,
                    pki_dir,
                    db_url=postgres_url,
                    master_key=key,
                    extra_config="[metrics]\nport = 0\n" if name == "a" else "",
                )
            )
        yield servers
    finally:
        for server in servers:
            server.stop()


def held_reads(server) -> float:
    url = server.announced("kms-server metrics on").rsplit(" ", 1)[1].rstrip("/")
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sample(text, "kms_verified_row_reads_total", result="held")


def client(server, pki):
    return KmipClient([f"127.0.0.1:{server.port}"], pki / "alice.pem", pki / "alice.key", pki / "ca.pem")


def test_a_node_holding_a_row_serves_what_another_node_wrote_since(two_nodes, pki_dir):
    a, b = two_nodes
    with client(a, pki_dir) as on_a, client(b, pki_dir) as on_b:
        uid = on_a.create_symmetric_key()
        secret = on_a.get_key(uid)
        before = held_reads(a)
        for _ in range(3):
            assert on_a.get_attributes(uid, ["State"])["State"] == [State.PRE_ACTIVE]
        assert held_reads(a) >= before + 3, "node A served those reads from the row it holds"
        on_b.activate(uid)
        assert on_a.get_attributes(uid, ["State"])["State"] == [State.ACTIVE]
        on_b.add_attribute(uid, "x-Owner-Team", "storage")
        assert on_a.get_attributes(uid, ["x-Owner-Team"])["x-Owner-Team"] == ["storage"]
        assert on_a.get_key(uid) == secret
        on_b.revoke(uid)
        on_b.destroy(uid)
        assert on_a.get_attributes(uid, ["State"])["State"] == [State.DESTROYED]
        with pytest.raises(KmipError) as refused:
            on_a.get_key(uid)
        assert refused.value.reason != ResultReason.GENERAL_FAILURE, "refused as destroyed, not as an integrity failure"
