"""Two vtpm-broker processes on ONE PostgreSQL database ("PostgreSQL for
several broker replicas"): both serve the same trust and VM registry. An
instance enrolled through broker 1 creates a VM through broker 2, a host
unwraps through broker 2's gateway, writes from both keep the audit chain
intact and a one-time token stays one-time when raced across replicas.

Real processes on 127.0.0.1: a kms-server, two vtpm-broker replicas (own
data directories, server certificates and KMS client keys; one master key,
one database), PostgreSQL 15 (a fresh database, dropped afterwards).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from broker_process import (
    Broker,
    create_vm,
    enroll,
    new_key_and_csr,
    register_host,
    set_up,
    write_config,
)
from conftest import drop_postgres_database, new_postgres_database, postgres_available, start_server

from broker import schema
from broker.keysafe import parse_key_safe
from kmip_core.client import KmipClient

pytestmark = pytest.mark.skipif(not postgres_available(), reason="no PostgreSQL on 127.0.0.1:5432 or psycopg missing")


@pytest.fixture(scope="module")
def database():
    name, url = new_postgres_database("broker_replicas")
    yield url
    drop_postgres_database(name)


@pytest.fixture(scope="module")
def kms(tmp_path_factory, pki_dir):
    server = start_server(
        tmp_path_factory.mktemp("kms"),
        pki_dir,
        extra_config="""
        [access]
        administrators = ["admin"]
        """,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kms_admin(kms, pki_dir):
    with KmipClient(
        [f"127.0.0.1:{kms.port}"], pki_dir / "admin.pem", pki_dir / "admin.key", pki_dir / "ca.pem"
    ) as client:
        yield client


@pytest.fixture(scope="module")
def replicas(tmp_path_factory, pki_dir, kms, database):
    """Broker 1: `vtpm-broker db upgrade` (the operator's step on
    PostgreSQL), then init (master key, trust CA, EK CA in the database).
    Broker 2: the same database and master key; its init finds the CAs and
    makes only its own server certificate and KMS client key."""
    w1, w2 = tmp_path_factory.mktemp("broker1"), tmp_path_factory.mktemp("broker2")
    c1 = write_config(w1, kms.port, pki_dir, node_name="broker-1", db_url=database)
    upgraded = Broker(w1, c1, w1 / "data").cli("db", "upgrade")
    assert f"upgraded from empty to {schema.head_revision()}" in upgraded.stdout
    b1 = set_up(w1, c1, pki_dir)
    c2 = write_config(
        w2, kms.port, pki_dir, node_name="broker-2", db_url=database, master_key=w1 / "data" / "master.key"
    )
    init2 = Broker(w2, c2, w2 / "data").cli("init")
    assert "trust CA        created" not in init2.stdout and "EK CA      created" not in init2.stdout
    b2 = set_up(w2, c2, pki_dir)  # init again (idempotent) and the KMS CA signs broker 2's CSR
    assert b1.ca.read_bytes() == b2.ca.read_bytes()  # one trust CA, from the shared database
    for b in (b1, b2):
        b.start()
    yield b1, b2
    for b in (b1, b2):
        b.stop()


def test_a_broker_refuses_to_start_on_an_unmigrated_postgresql(replicas, kms, pki_dir, tmp_path):
    """On PostgreSQL the broker only checks the schema at start: broker 2's
    files pointed at an empty database are refused with one line naming
    `vtpm-broker db upgrade`."""
    data = replicas[1].data_dir
    name, url = new_postgres_database("broker_empty")
    try:
        config = tmp_path / "broker.toml"
        config.write_text(
            textwrap.dedent(
                f"""
                [broker]
                provider_name = "kms-test"
                data_dir = "{tmp_path / "data"}"

                [api]
                port = 0

                [gateway]
                port = 0

                [tls]
                cert = "{data / "broker-tls.pem"}"
                key = "{data / "broker-tls.key"}"

                [kms]
                nodes = ["127.0.0.1:{kms.port}"]
                ca = "{pki_dir / "ca.pem"}"
                cert = "{data / "kms-client.pem"}"
                key = "{data / "kms-client.key"}"

                [storage]
                db_url = "{url}"

                [master_key]
                file = "{replicas[0].data_dir / "master.key"}"
                """
            )
        )
        done = subprocess.run(
            [sys.executable, "-m", "broker.cli", "--config", str(config), "run"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        errors = [line for line in done.stderr.splitlines() if line.startswith("vtpm-broker: error:")]
        assert len(errors) == 1 and "no vtpm-broker schema" in errors[0] and "db upgrade" in errors[0], done.stderr
    finally:
        drop_postgres_database(name)


def test_two_brokers_serve_one_database(replicas, kms_admin):
    """Enrolled through broker 1 (approved and polled through broker 2), the
    instance registers a host through broker 1 and creates a VM through
    broker 2; both list it; the host unwraps through broker 2's gateway and
    broker 1's; the audit chain written by both is intact."""
    b1, b2 = replicas
    identity = enroll(b1, "vc-pg", approver=b2, poller=b2)
    host = register_host(b1, identity, "esx-pg-1")
    vm = create_vm(b2, identity, host="esx-pg-1")
    for b in (b1, b2):
        answer = b.call("GET", "/v1/vms", identity)
        assert answer.status_code == 200, answer.text
        assert [(v["vm_uuid"], v["host"]) for v in answer.json()["vms"]] == [(vm["vm_uuid"], "esx-pg-1")]

    ks = parse_key_safe(vm["key_safe"])
    expected = kms_admin.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
    assert len(expected) == 64
    for b in (b2, b1):
        assert b.gateway_port, "this build has no broker.gateway"
        with KmipClient([f"127.0.0.1:{b.gateway_port}"], host[0], host[1], b.ca) as client:
            assert client.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag) == expected

    # Revoked through broker 2: broker 1 refuses the instance's host at once.
    b2.cli("admin", "revoke", "vc-pg")
    from kmip_core.client import KmipError

    with KmipClient([f"127.0.0.1:{b1.gateway_port}"], host[0], host[1], b1.ca) as client:
        with pytest.raises(KmipError) as refused:
            client.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
        assert refused.value.reason.name == "PERMISSION_DENIED"

    trail = json.loads(b1.cli("admin", "audit", "--json").stdout)
    assert trail["problems"] == []
    unwraps = [(r["actor"], r["allowed"]) for r in trail["records"] if r["action"] == "gateway.unwrap"]
    assert unwraps == [("host:esx-pg-1", True), ("host:esx-pg-1", True), ("host:esx-pg-1", False)]


def test_replicas_write_concurrently(replicas, kms_admin):
    """Both gateways unwrap at once from several threads: every decision is
    in one intact audit chain. A token raced to both replicas at once
    enrolls once."""
    b1, b2 = replicas
    identity = enroll(b2, "vc-pg-load")
    host = register_host(b2, identity, "esx-pg-load")
    vm = create_vm(b1, identity, host="esx-pg-load")
    ks = parse_key_safe(vm["key_safe"])
    expected = kms_admin.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
    before = len(json.loads(b1.cli("admin", "audit", "--json").stdout)["records"])

    per_thread, errors, results = 25, [], []
    lock = threading.Lock()

    def worker(b: Broker) -> None:
        try:
            with KmipClient([f"127.0.0.1:{b.gateway_port}"], host[0], host[1], b.ca) as client:
                for _ in range(per_thread):
                    dek = client.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
                    with lock:
                        results.append(dek == expected)
        except Exception as exc:  # reported below
            errors.append(repr(exc))

    threads = [threading.Thread(target=worker, args=(b,)) for b in (b1, b2) for _ in range(4)]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    elapsed = time.monotonic() - started
    assert errors == []
    assert results == [True] * (len(threads) * per_thread)
    print(f"\n{len(results)} unwraps through two gateways on one PostgreSQL: {len(results) / elapsed:.0f}/s")

    trail = json.loads(b1.cli("admin", "audit", "--json").stdout)
    assert trail["problems"] == []
    assert [r["seq"] for r in trail["records"]] == list(range(1, len(trail["records"]) + 1))
    assert len(trail["records"]) == before + len(results)

    # One token, posted to both replicas at the same moment: exactly one enrollment.
    for attempt in range(5):
        name = f"vc-race-{attempt}"
        token = b1.cli("admin", "token", "--instance", name).stdout.strip()
        _, csr = new_key_and_csr(b1.workdir, name)
        body = {"instance": name, "token": token, "csr_pem": csr}
        statuses: list[int] = []
        barrier = threading.Barrier(2)

        def post(b: Broker, body=body, statuses=statuses, barrier=barrier) -> None:
            barrier.wait()
            statuses.append(b.call("POST", "/v1/enroll", json=body).status_code)

        racers = [threading.Thread(target=post, args=(b,)) for b in (b1, b2)]
        for t in racers:
            t.start()
        for t in racers:
            t.join(60)
        assert sorted(statuses) == [202, 403], statuses
