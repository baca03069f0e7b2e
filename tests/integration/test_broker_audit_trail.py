"""The broker's audit trail with a real `vtpm-broker` (set up with `init`,
run as a process, spoken to over real TLS) and a real kms-server: the
broker signs checkpoints at start and at stop with the key `init` made,
`vtpm-broker admin audit verify` says the trail is intact, and the edits an
attacker with write access to the broker's database would make (a changed
row, a cut tail) are reported by the command and by the running broker's
/v1/audit."""

from __future__ import annotations

import json

import broker_process
import pytest
from broker_process import create_vm, enroll, register_host
from conftest import start_server
from sqlalchemy import update

from broker.db import Database, audit


@pytest.fixture(scope="module")
def kms(tmp_path_factory, pki_dir):
    server = start_server(tmp_path_factory.mktemp("kms"), pki_dir)
    yield server
    server.stop()


@pytest.fixture
def broker(tmp_path, pki_dir, kms):
    config = broker_process.write_config(tmp_path, kms.port, pki_dir)
    b = broker_process.set_up(tmp_path, config, pki_dir)
    b.start()
    yield b
    b.stop()


def verify(broker) -> tuple[int, str, str]:
    done = broker.cli("admin", "audit", "verify", check=False)
    return done.returncode, done.stdout, done.stderr


def test_real_broker_trail_is_signed_and_tampering_is_reported(broker):
    """A real broker's records (enrollment, host, VM with its KEK in the
    KMS) are under a checkpoint once it stops; then a row edited in the
    database and a tail cut after the checkpoint are each reported, by
    `admin audit verify` (exit 1) and by the restarted broker's /v1/audit."""
    assert (broker.data_dir / "audit.key").stat().st_mode & 0o777 == 0o600
    instance = enroll(broker, "vc-a")
    register_host(broker, instance, "esx-1")
    vm = create_vm(broker, instance, host="esx-1")
    users = broker.workdir / "users"
    broker.cli("admin", "issue-user", "auditor", "--out-dir", str(users))
    auditor = (str(users / "auditor.pem"), str(users / "auditor.key"))
    assert broker.stop() == 0  # the last checkpoint is signed at stop

    status, out, err = verify(broker)
    assert status == 0, err
    first = out.splitlines()[0]
    assert first.startswith("audit trail intact: ") and "signed checkpoints" in first
    assert "chained but not yet signed" not in out  # the stop checkpoint covers the newest record

    listing = broker.cli("admin", "audit", "--vm", vm["vm_uuid"], "--json")
    shown = json.loads(listing.stdout)
    assert shown["intact"] is True
    assert [r["action"] for r in shown["records"]] == ["vm.create"]
    assert shown["records"][0]["vm_name"] == f"vm-{vm['vm_uuid'][:8]}"
    by_name = broker.cli("admin", "audit", "--vm", f"vm-{vm['vm_uuid'][:8]}").stdout
    assert f"{vm['vm_uuid']} (vm-{vm['vm_uuid'][:8]})" in by_name and "audit trail intact" in by_name
    assert "host.register" in broker.cli("admin", "audit", "--host", "esx-1", "--since", "1h").stdout
    bad = broker.cli("admin", "audit", "--since", "yesterday-ish", check=False)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a time" in bad.stderr

    with broker_db(broker) as db:
        with db.read() as conn:
            last = conn.execute(audit.select().order_by(audit.c.seq.desc()).limit(1)).first()
        with db.begin() as conn:
            conn.execute(update(audit).where(audit.c.action == "approve").values(allowed=False))
    status, _, err = verify(broker)
    assert status == 1
    assert "audit trail NOT intact" in err and "altered: column allowed differs from the hashed record" in err

    with broker_db(broker) as db:
        with db.begin() as conn:
            conn.execute(audit.delete().where(audit.c.seq >= last.seq - 1))
    status, _, err = verify(broker)
    assert status == 1
    assert f"trail truncated: checkpoint {last.seq} was signed but records end at {last.seq - 2}" in err

    # The running broker reports it too, and its start-up checkpoint does not cover it up.
    broker.start()
    problems = broker.call("GET", "/v1/audit", auditor).json()["problems"]
    assert any("trail truncated" in p for p in problems), problems
    assert any("column allowed differs" in p for p in problems), problems


class broker_db:
    """The broker's database, opened as an attacker with write access would."""

    def __init__(self, broker) -> None:
        self.db = Database(f"sqlite:///{broker.data_dir / 'broker.db'}")

    def __enter__(self) -> Database:
        return self.db

    def __exit__(self, *exc) -> None:
        self.db.close()
