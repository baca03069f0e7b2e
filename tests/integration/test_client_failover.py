"""The project's KMIP client against two real kms-server nodes on one
PostgreSQL database (the machine's, 127.0.0.1:5432): both nodes serve the
same keys, and when one is killed the client carries on with the other
without ever reporting an unacknowledged write as done."""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import drop_postgres_database, new_postgres_database, start_server
from kmip.core.enums import CryptographicAlgorithm, ResultReason, State

from kmip_core.client import KmipClient, KmipError, OutcomeUnknown


class Cluster:
    """`count` nodes (two by default), one database, one master key."""

    def __init__(self, root: Path, pki: Path, count: int = 2):
        self.database, url = new_postgres_database("kms_client_it")
        self.pki = pki
        self.nodes = []
        try:
            master_key = root / "master.key"  # One key seals for both nodes.
            for letter in "abcdefgh"[:count]:
                self.nodes.append(start_server(root / f"node-{letter}", pki, db_url=url, master_key=master_key))
        except BaseException:
            self.close()
            raise

    def address(self, index: int) -> str:
        node = self.nodes[index]
        return f"{node.host}:{node.port}"

    def client(self, *indexes: int, version=(1, 4), **kwargs) -> KmipClient:
        return KmipClient(
            [self.address(i) for i in indexes],
            cert=self.pki / "alice.pem",
            key=self.pki / "alice.key",
            ca=self.pki / "ca.pem",
            version=version,
            **kwargs,
        )

    def close(self) -> None:
        for node in self.nodes:
            node.stop()
        drop_postgres_database(self.database)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, pki_dir):
    cluster = Cluster(tmp_path_factory.mktemp("cluster"), pki_dir)
    yield cluster
    cluster.close()


@pytest.mark.parametrize("version", [(1, 4), (2, 0)], ids=["kmip-1.4", "kmip-2.0"])
def test_key_created_through_one_node_is_served_by_the_other(cluster, version):
    """Every operation of the client works against a real node, and what
    node A did is what node B sees: same key bytes, attributes, state."""
    tag = uuid.uuid4().hex
    when = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
    with cluster.client(0, version=version) as a, cluster.client(1, version=version) as b:
        assert version in a.discover_versions()
        assert a.query_server_information()["vendor_identification"].startswith("kms-server")
        uid = a.create_symmetric_key(
            name=f"kek-{tag}",
            attributes={"x-vm": tag, "x-generation": 7, "x-encrypted": True, "x-blob": b"\x01\x02", "x-when": when},
        )
        key = a.get_key(uid)
        assert len(key) == 32
        assert b.get_key(uid) == key

        attributes = b.get_attributes(uid)
        assert attributes["Name"] == [f"kek-{tag}"]
        assert attributes["Cryptographic Algorithm"] == [CryptographicAlgorithm.AES]
        assert attributes["Cryptographic Length"] == [256]
        assert attributes["State"] == [State.PRE_ACTIVE]
        assert attributes["x-vm"] == [tag] and attributes["x-generation"] == [7]
        assert attributes["x-encrypted"] == [True] and attributes["x-blob"] == [b"\x01\x02"]
        assert attributes["x-when"] == [when]
        assert set(b.get_attributes(uid, ["x-vm", "State"])) == {"x-vm", "State"}
        assert "x-vm" in b.get_attribute_list(uid)

        assert b.locate({"x-vm": tag}) == [uid]
        assert a.locate({"Name": f"kek-{tag}"}) == [uid]
        b.add_attribute(uid, "x-host", "esx-1")
        assert a.get_attributes(uid, ["x-host"]) == {"x-host": ["esx-1"]}

        a.activate(uid)
        assert b.get_attributes(uid, ["State"]) == {"State": [State.ACTIVE]}
        sealed = a.encrypt(uid, b"the DEK of a VM", aad=b"vm-42")
        assert sealed.iv and sealed.tag and sealed.data != b"the DEK of a VM"
        assert b.decrypt(uid, sealed.data, sealed.iv, aad=b"vm-42", tag=sealed.tag) == b"the DEK of a VM"
        with pytest.raises(KmipError) as bad_tag:
            b.decrypt(uid, sealed.data, sealed.iv, aad=b"vm-43", tag=sealed.tag)
        assert bad_tag.value.reason == ResultReason.CRYPTOGRAPHIC_FAILURE
        assert bad_tag.value.node == cluster.address(1)
        cbc = a.encrypt(uid, b"sixteen byte msg", mode="CBC", padding="PKCS5")
        assert b.decrypt(uid, cbc.data, cbc.iv, mode="CBC", padding="PKCS5") == b"sixteen byte msg"

        b.revoke(uid, "CESSATION_OF_OPERATION")
        assert a.get_attributes(uid, ["State"]) == {"State": [State.DEACTIVATED]}
        a.destroy(uid)
        with pytest.raises(KmipError) as gone:
            b.get_key(uid)
        assert gone.value.reason is not None and gone.value.node == cluster.address(1)
        with pytest.raises(KmipError) as missing:
            b.get_key(str(uuid.uuid4()))
        assert missing.value.reason == ResultReason.ITEM_NOT_FOUND


def test_loader_continues_on_the_survivor_when_a_node_is_killed(tmp_path, pki_dir, capsys):
    """Three nodes on one database; Create+Get in a loop through
    KmipClient([A, B, C]); A is killed with SIGKILL mid-load. The loop
    carries on through a survivor within two seconds; every Create that
    returned a uid is readable from both survivors with the same key bytes;
    an OutcomeUnknown is counted apart, never as a success, and Locate by
    its unique Name tells whether it happened."""
    cluster = Cluster(tmp_path, pki_dir, count=3)
    try:
        run = uuid.uuid4().hex[:8]
        acknowledged: dict[str, str] = {}  # uid -> name
        keys: dict[str, bytes] = {}
        unknown: list[str] = []  # names of creates with an unknown outcome
        errors: list[Exception] = []
        successes: list[float] = []
        stop = threading.Event()
        client = cluster.client(0, 1, 2, connect_timeout=2.0, request_timeout=5.0)

        def loader() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                name = f"loader-{run}-{i}"
                try:
                    uid = client.create_symmetric_key(name=name, attributes={"x-loader": run})
                except OutcomeUnknown:
                    unknown.append(name)
                    continue
                except KmipError as exc:
                    errors.append(exc)
                    continue
                acknowledged[uid] = name
                try:
                    keys[uid] = client.get_key(uid)
                except KmipError as exc:
                    errors.append(exc)
                    continue
                successes.append(time.monotonic())

        thread = threading.Thread(target=loader, daemon=True)
        thread.start()
        deadline = time.monotonic() + 20
        while len(successes) < 25 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.current_node == cluster.address(0)
        before = len(successes)
        cluster.nodes[0].proc.kill()
        killed_at = time.monotonic()
        cluster.nodes[0].proc.wait(5)
        while time.monotonic() < deadline and len([t for t in successes if t > killed_at]) < 25:
            time.sleep(0.02)
        stop.set()
        thread.join(15)
        client.close()
        assert not thread.is_alive()

        after = [t for t in successes if t > killed_at]
        stalled = after[0] - killed_at if after else float("inf")
        assert before >= 25 and len(after) >= 25, (before, len(after), errors)
        assert errors == []
        assert stalled < 2.0
        assert client.current_node == cluster.address(1)

        with cluster.client(2) as c:
            for uid in acknowledged:
                assert c.get_key(uid) == keys[uid]
        with cluster.client(1) as b:
            for uid in acknowledged:
                assert b.get_key(uid) == keys[uid]
            happened = [name for name in unknown if b.locate({"Name": name})]
            for name in unknown:
                assert len(b.locate({"Name": name})) <= 1
            assert set(b.locate({"x-loader": run})) >= set(acknowledged)
        with capsys.disabled():
            print(
                f"\n[client failover, 3 nodes] acknowledged={len(acknowledged)} (readable from both survivors: all) "
                f"outcome_unknown={len(unknown)} (of which created: {len(happened)}) "
                f"stall_after_kill={stalled * 1000:.0f} ms"
            )
    finally:
        cluster.close()
