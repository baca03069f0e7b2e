"""The broker's audit trail on the KMS's chain (broker/audit_trail.py,
kmip_core/audit/chain.py with the broker's Domain), on real SQLite and
PostgreSQL databases: whoever can write the broker's database can no longer
edit, rewrite or cut its trail unseen; a KMS record never verifies as a
broker record; a checkpoint signed by another key is reported; and a trail
written by the code before this format is carried over by migration 0002
and stays verifiable, its old records under their old rule."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from sqlalchemy import text, update

from broker import audit_trail, schema
from broker.db import Database, audit, audit_checkpoints
from broker.trust import Registry
from kmip_core.audit import audit_key, chain
from kmip_core.db import migrations


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.25

    def __call__(self) -> float:
        self.now += 1.5
        return self.now


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'broker.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """The broker's audit key and another one."""
    directory = tmp_path_factory.mktemp("audit-keys")
    audit_key.generate(directory / "audit.key", directory / "audit.pub")
    audit_key.generate(directory / "other.key", directory / "other.pub")
    return audit_key.load_signer(directory / "audit.key"), audit_key.load_signer(directory / "other.key")


@pytest.fixture
def registry(db_url, keys):
    db = Database(db_url)
    schema.upgrade(db)
    yield Registry(db, clock=Clock(), node="broker-1", audit_signer=keys[0])
    db.close()


def fill(registry: Registry, count: int = 6) -> None:
    for n in range(count):
        registry.record_audit(f"host:esx-{n % 2}", "gateway.unwrap", f"key:kek-{n}", n % 3 != 0, f"reason {n}")


def problems(registry: Registry, verifier=None) -> list[str]:
    return [p.text for p in audit_trail.verify(registry.db, verifier or registry.audit_signer.public).problems]


def execute(db: Database, statement, params=None) -> None:
    with db.begin() as conn:
        conn.execute(statement, params or {})


# --- The new format ------------------------------------------------------------------------


def test_records_are_canonical_json_hashed_with_the_broker_tag(registry):
    """Each row carries the canonical body its hash covers, with the broker's
    domain tag; the columns repeat the body."""
    fill(registry, 2)
    with registry.db.read() as conn:
        rows = conn.execute(audit.select().order_by(audit.c.seq)).all()
    first, second = rows
    body = json.loads(second.body)
    assert chain.canonical(body) == second.body
    assert second.hash == hashlib.sha256(b"vtpm-broker-audit-v1\n" + second.body.encode()).hexdigest()
    assert body["prev"] == first.hash == second.prev_hash
    assert (body["seq"], body["node"], body["actor"], body["allowed"]) == (2, "broker-1", "host:esx-1", True)
    assert chain.parse_time(body["time"]) == second.at
    assert problems(registry) == []


def test_an_edited_row_is_reported(registry):
    """A row edited in the database (its reason, its verdict) is named by
    verify, whether or not a checkpoint covers it yet."""
    fill(registry)
    registry.sign_audit_checkpoint()
    execute(registry.db, update(audit).where(audit.c.seq == 3).values(reason="nothing happened"))
    execute(registry.db, update(audit).where(audit.c.seq == 5).values(allowed=False))
    found = problems(registry)
    assert "record 3 altered: column reason differs from the hashed record" in found
    assert "record 5 altered: column allowed differs from the hashed record" in found
    assert registry.verify_audit()[0].startswith("record 3 altered")


def test_a_consistent_rewrite_after_a_checkpoint_is_reported(registry):
    """An attacker who rewrites a record and re-chains everything after it
    (body, hash, columns, all consistent) is caught by the signed checkpoint."""
    fill(registry)
    registry.sign_audit_checkpoint()
    with registry.db.read() as conn:
        rows = conn.execute(audit.select().order_by(audit.c.seq)).all()
    prev = rows[1].hash
    for row in rows[2:]:
        body = json.loads(row.body)
        body["prev"] = prev
        if row.seq == 3:
            body["allowed"], body["reason"] = False, "refused after all"
        forged = audit_trail.row_of(body)
        execute(registry.db, update(audit).where(audit.c.seq == row.seq).values(**forged))
        prev = forged["hash"]
    assert problems(registry) == ["records 1 to 6 rewritten after checkpoint 6 was signed"]


def test_a_tail_cut_after_a_checkpoint_is_reported(registry):
    """Removing the newest records after a checkpoint signed them shows."""
    fill(registry)
    registry.sign_audit_checkpoint()
    execute(registry.db, audit.delete().where(audit.c.seq >= 5))
    assert problems(registry) == ["trail truncated: checkpoint 6 was signed but records end at 4"]


def test_a_record_removed_from_the_middle_is_reported(registry):
    fill(registry)
    execute(registry.db, audit.delete().where(audit.c.seq == 2))
    assert "record 2 missing: removed from the trail" in problems(registry)


def test_a_kms_record_does_not_verify_as_a_broker_record(registry):
    """Domain separation: the same body hashed as the KMS hashes its records
    is not a broker record, and a KMS trail does not verify as the broker's."""
    fill(registry, 3)
    with registry.db.read() as conn:
        row = conn.execute(audit.select().where(audit.c.seq == 3)).first()
    kms_hash = chain.record_hash(row.body, chain.KMS)
    assert kms_hash != row.hash == chain.record_hash(row.body, chain.BROKER)
    execute(registry.db, update(audit).where(audit.c.seq == 3).values(hash=kms_hash))
    assert "record 3 altered: its content no longer matches its hash" in problems(registry)

    # A whole trail chained under the KMS tag fails every record as a broker trail.
    kms_rows, prev = [], chain.GENESIS
    for seq in (1, 2):
        body = audit_trail.new_body(seq, prev, 1_800_000_000.0 + seq, "n", "a", "x", "t", True, "r")
        body_text = chain.canonical(body)
        row = audit_trail.Row(seq, chain.parse_time(body["time"]), body_text, chain.record_hash(body_text, chain.KMS),
                              prev, "a", "x", "t", True, "r")  # fmt: skip
        kms_rows.append(row)
        prev = row.hash
    # The rows are sound but for the tag: under the KMS's tag they would verify.
    kms_tagged = dataclasses.replace(chain.BROKER, record_tag=chain.KMS.record_tag)
    assert chain.verify(kms_rows, [], None, domain=kms_tagged).ok
    broker = chain.verify(kms_rows, [], None, domain=chain.BROKER)
    assert [p.seq for p in broker.problems if "no longer matches its hash" in p.text] == [1, 2]


def test_a_kms_checkpoint_signature_does_not_verify_as_the_brokers(registry, keys):
    """A checkpoint message signed under the KMS's tag, even with the same
    key, is not a broker checkpoint."""
    fill(registry, 2)
    signer = keys[0]
    with registry.db.read() as conn:
        head = conn.execute(audit.select().where(audit.c.seq == 2)).first()
    signature = signer.sign(chain.checkpoint_message(2, head.hash, 1_800_000_100.0, "broker-1", chain.KMS))
    execute(registry.db, audit_checkpoints.insert().values(
        seq=2, time=1_800_000_100.0, node="broker-1", head_hash=head.hash, key_id=signer.key_id, signature=signature
    ))  # fmt: skip
    assert problems(registry) == [
        "checkpoint 2: signature does not verify with the audit public key (forged)",
    ]


def test_a_checkpoint_with_a_wrong_key_is_reported(registry, keys):
    """A checkpoint signed by another key (someone who wants to cover a
    rewritten trail) is reported, whether it names the other key or claims
    the broker's key id."""
    fill(registry, 4)
    other = keys[1]
    impostor = Registry(registry.db, clock=Clock(), node="broker-1", audit_signer=other)
    impostor.sign_audit_checkpoint()
    assert problems(registry) == [f"checkpoint 4: signed by key {other.key_id}, not the audit key {keys[0].key_id}"]
    execute(registry.db, update(audit_checkpoints).values(key_id=keys[0].key_id))
    assert problems(registry) == ["checkpoint 4: signature does not verify with the audit public key (forged)"]
    # The impostor's own key would accept it: the key decides.
    assert problems(registry, verifier=other.public) == [f"checkpoint 4: signed by key {keys[0].key_id}, "
                                                          f"not the audit key {other.key_id}"]  # fmt: skip


def test_checkpoints_are_signed_only_when_the_head_moved(registry):
    fill(registry, 2)
    first = registry.sign_audit_checkpoint()
    assert first is not None and first.seq == 2
    assert registry.sign_audit_checkpoint() is None
    fill(registry, 1)
    assert registry.sign_audit_checkpoint().seq == 3
    report = audit_trail.verify(registry.db, registry.audit_signer.public)
    assert report.ok and (report.records, report.checkpoints, report.unsigned_tail) == (3, 2, 0)


# --- The trail of the code before this format, carried over by migration 0002 ---------------------


def old_hash(prev_hash, seq, at, actor, action, target, allowed, reason) -> str:
    """The record hash of broker/trust.py before this change (revision 0001),
    written out here so the test does not lean on the code it checks."""
    body = json.dumps(
        [prev_hash, seq, repr(float(at)), actor, action, target, bool(allowed), reason],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def old_database(db_url: str, count: int = 5) -> Database:
    """A broker database at revision 0001 with `count` records as the old
    code wrote them."""
    db = Database(db_url)
    migrations.migrate(db.engine, schema.BROKER, "0001")
    prev = "0" * 64
    with db.engine.begin() as conn:
        for seq in range(1, count + 1):
            at = 1_700_000_000.0 + seq / 3
            row = ("local-security-admin", "token.issue", f"vc-{seq}", seq != 2, f"expires in {seq} s")
            digest = old_hash(prev, seq, at, *row)
            conn.execute(
                text("INSERT INTO broker_audit (seq, at, actor, action, target, allowed, reason, prev_hash, hash) "
                     "VALUES (:seq, :at, :actor, :action, :target, :allowed, :reason, :prev, :hash)"),
                dict(seq=seq, at=at, actor=row[0], action=row[1], target=row[2], allowed=row[3], reason=row[4],
                     prev=prev, hash=digest),
            )  # fmt: skip
            prev = digest
    assert schema.current_revision(db) == "0001"
    return db


def test_an_old_trail_migrates_and_verifies(db_url, keys):
    """Revision 0002 keeps the old records, appends a carry-over record that
    commits to their count and last hash, and the new chain goes on from
    there: verify checks both, and the checkpoints cover the old records."""
    db = old_database(db_url)
    try:
        with db.read() as conn:
            old_head = conn.execute(text("SELECT hash FROM broker_audit WHERE seq = 5")).scalar()
        assert schema.upgrade(db) == ("0001", schema.head_revision())
        registry = Registry(db, clock=Clock(), node="broker-1", audit_signer=keys[0])
        records = registry.audit_records()
        assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
        carried = json.loads(records[5].body)
        assert (carried["action"], carried["prev"]) == ("audit.carry-over", old_head)
        assert carried["carried_over"] == {"records": 5, "last_seq": 5, "head_hash": old_head, "problems": []}
        assert all(r.body is None for r in records[:5])
        fill(registry, 3)
        registry.sign_audit_checkpoint()
        report = audit_trail.verify(db, keys[0].public)
        assert report.ok, report.problems
        assert (report.records, report.first_seq, report.last_seq, report.checkpoints) == (9, 1, 9, 1)

        # Old records stay protected after the carry-over: an edit, a
        # consistent re-hash of the old chain, a removed old tail.
        execute(db, update(audit).where(audit.c.seq == 3).values(target="vc-x"))
        assert problems(registry) == ["record 3 altered: its content no longer matches its hash"]
        prev = "0" * 64
        with db.read() as conn:
            rows = conn.execute(audit.select().where(audit.c.seq <= 5).order_by(audit.c.seq)).all()
        for row in rows:
            digest = old_hash(prev, row.seq, row.at, row.actor, row.action, row.target, row.allowed, row.reason)
            execute(db, update(audit).where(audit.c.seq == row.seq).values(prev_hash=prev, hash=digest))
            prev = digest
        assert problems(registry) == ["records 1 to 5 rewritten after record 6 committed to them"]
        execute(db, audit.delete().where(audit.c.seq >= 4, audit.c.seq <= 5))
        assert "records 4 to 5 missing: removed from the trail" in problems(registry)
    finally:
        db.close()


def test_an_old_record_edited_before_migration_is_reported(db_url, keys):
    """An old record edited while the old code ran is still reported after
    the migration, and the carry-over record says the old chain was broken
    when it was carried over."""
    db = old_database(db_url)
    try:
        execute(db, text("UPDATE broker_audit SET reason = 'edited' WHERE seq = 2"))
        schema.upgrade(db)
        registry = Registry(db, clock=Clock(), node="broker-1", audit_signer=keys[0])
        carried = json.loads(registry.audit_records()[-1].body)
        assert carried["carried_over"]["problems"] == [
            "record 2: record 2 altered: its content no longer matches its hash"
        ]
        found = problems(registry)
        assert found[0] == "record 2 altered: its content no longer matches its hash"
        assert any("already not intact when they were carried over" in p for p in found)
        # Repairing the old row afterwards does not hide it: the carry-over still says so.
        execute(db, text("UPDATE broker_audit SET reason = 'expires in 2 s' WHERE seq = 2"))
        assert problems(registry) == [
            "record 6: the records before the carry-over were already not intact when they were carried over "
            "(record 2: record 2 altered: its content no longer matches its hash)"
        ]
    finally:
        db.close()


def test_an_empty_old_trail_needs_no_carry_over(db_url):
    db = old_database(db_url, count=0)
    try:
        schema.upgrade(db)
        assert Registry(db).audit_records() == []
        assert audit_trail.verify(db).ok
    finally:
        db.close()


def test_removing_the_carry_over_and_everything_after_it_is_reported(db_url, keys):
    db = old_database(db_url)
    try:
        schema.upgrade(db)
        execute(db, audit.delete().where(audit.c.seq >= 6))
        assert problems(Registry(db, audit_signer=keys[0])) == [
            "trail truncated: no record follows record 5, not even the carry-over record of migration 0002"
        ]
    finally:
        db.close()


# --- The commands an operator runs ---------------------------------------------------------------


def broker_cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "broker.cli", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_db_upgrade_then_admin_audit_verify_on_an_old_database(tmp_path):
    """The operator's path on an old database: `db upgrade` (carries the
    trail over), `vtpm-broker init` (makes the audit key, 0600, and signs a
    checkpoint), `admin audit verify` (exit 0), then a tampered row (exit 1,
    the KMS's words) and a bad key path (exit 2, one line)."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    config = tmp_path / "broker.toml"
    config.write_text(textwrap.dedent(f"""
        [broker]
        provider_name = "kms-test"
        data_dir = "{data}"
        node_name = "broker-1"

        [storage]
        schema = "check"
        """))  # fmt: skip
    old_database(f"sqlite:///{data / 'broker.db'}").close()
    status = broker_cli(config, "admin", "audit", "verify")
    assert status.returncode == 2 and "db upgrade" in status.stderr and status.stderr.count("\n") == 1
    upgraded = broker_cli(config, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    assert "signed audit checkpoint" not in upgraded.stdout  # no audit key yet
    made = broker_cli(config, "init")
    assert made.returncode == 0, made.stderr
    assert (data / "audit.key").stat().st_mode & 0o777 == 0o600
    assert (data / "audit.pub").exists() and "audit key" in made.stdout
    assert "signed audit checkpoint at record 6" in made.stdout
    again = broker_cli(config, "init").stdout
    assert "audit key" not in again and "checkpoint" not in again
    checkpoint = broker_cli(config, "admin", "audit", "checkpoint")
    assert checkpoint.returncode == 0 and "nothing to sign" in checkpoint.stdout

    verify = broker_cli(config, "admin", "audit", "verify")
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.splitlines()[0] == "audit trail intact: 6 records (records 1 to 6), 1 signed checkpoints"
    offline = broker_cli(config, "admin", "audit", "verify", "--public-key", str(data / "audit.pub"))
    assert offline.returncode == 0

    listing = broker_cli(config, "admin", "audit")
    assert listing.returncode == 0 and "audit.carry-over" in listing.stdout and "audit trail intact" in listing.stdout

    # Offline, as kms-admin audit verify --file: an export and the public key only.
    export = tmp_path / "trail.jsonl"
    written = broker_cli(config, "admin", "audit", "export", "--to", str(export))
    assert written.returncode == 0 and "6 records, 1 checkpoints" in written.stdout
    assert export.stat().st_mode & 0o777 == 0o600
    pub = str(data / "audit.pub")
    offline = broker_cli(config, "admin", "audit", "verify", "--file", str(export), "--public-key", pub)
    assert offline.returncode == 0 and offline.stdout.startswith("audit trail intact: 6 records")
    edited = export.read_text().replace('"vc-3"', '"vc-9"')
    (tmp_path / "edited.jsonl").write_text(edited)
    caught = broker_cli(
        config, "admin", "audit", "verify", "--file", str(tmp_path / "edited.jsonl"), "--public-key", pub
    )
    assert caught.returncode == 1
    assert "first problem at record 3: record 3 altered: its content no longer matches its hash" in caught.stderr
    keyless = broker_cli(config, "admin", "audit", "verify", "--file", str(export))
    assert keyless.returncode == 2 and "needs the audit public key" in keyless.stderr

    db = Database(f"sqlite:///{data / 'broker.db'}")
    execute(db, update(audit).where(audit.c.seq == 6).values(reason="nothing to see"))
    db.close()
    tampered = broker_cli(config, "admin", "audit", "verify")
    assert tampered.returncode == 1
    assert tampered.stderr.startswith(
        f"audit trail NOT intact (sqlite:///{data / 'broker.db'}): first problem at record 6: "
        "record 6 altered: column reason differs from the hashed record"
    )
    listing = broker_cli(config, "admin", "audit", "--json")
    assert listing.returncode == 1 and json.loads(listing.stdout)["intact"] is False

    missing = broker_cli(config, "admin", "audit", "verify", "--public-key", str(tmp_path / "nope.pub"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "Traceback" not in missing.stderr
    assert "cannot read the audit public key" in missing.stderr


def test_brokers_on_one_database_share_one_audit_key(tmp_path, keys):
    """The first key used is recorded; another is refused (an auditor checks
    every checkpoint with one public key), in one line naming the fix."""
    db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        schema.upgrade(db)
        audit_trail.check_key(db, keys[0], Path("audit.key"))
        audit_trail.check_key(db, keys[0], Path("audit.key"))
        with pytest.raises(audit_trail.AuditKeyError, match="give every broker the same"):
            audit_trail.check_key(db, keys[1], Path("other.key"))
    finally:
        db.close()


def test_a_second_broker_is_told_to_copy_the_audit_key(tmp_path):
    """`init` of a second broker on the same database does not make a key of
    its own: it says to copy the first broker's, and accepts it once given."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"

    def config(name: str, extra: str = "") -> Path:
        path = tmp_path / f"{name}.toml"
        path.write_text(textwrap.dedent(f"""
            [broker]
            provider_name = "kms-test"
            data_dir = "{tmp_path / name}"

            [storage]
            db_url = "{url}"

            [master_key]
            file = "{tmp_path / 'first' / 'master.key'}"
            """) + extra)  # fmt: skip
        return path

    assert broker_cli(config("first"), "init").returncode == 0
    second = broker_cli(config("second"), "init")
    assert second.returncode == 2 and second.stderr.count("\n") == 1
    assert "copy it there" in second.stderr and str(tmp_path / "second" / "audit.key") in second.stderr
    shared = config("second", f'\n[audit]\nsigning_key_file = "{tmp_path / "first" / "audit.key"}"\n')
    again = broker_cli(shared, "init")
    assert again.returncode == 0, again.stderr
    assert "audit key" not in again.stdout


def test_checkpoints_are_signed_at_start_periodically_and_at_stop(tmp_path, keys):
    """The service's loop (fake clock, threads run inline): a checkpoint at
    start, one per period when the head moved, and a last one at stop."""
    from twisted.internet.task import Clock as FakeReactor

    class Reactor(FakeReactor):
        def callFromThread(self, f, *args, **kwargs):
            f(*args, **kwargs)

    class Pool:
        def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
            on_result(True, f(*args, **kwargs))

    db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
    try:
        schema.upgrade(db)
        registry = Registry(db, clock=Clock(), node="broker-1", audit_signer=keys[0])
        fill(registry, 2)
        reactor = Reactor()
        loop = audit_trail.CheckpointLoop(db, keys[0], "broker-1", reactor, Pool(), 60.0)
        loop.start()
        assert [c.seq for c in audit_trail.checkpoints(db)] == [2]
        fill(registry, 1)
        reactor.advance(59)
        assert [c.seq for c in audit_trail.checkpoints(db)] == [2]
        reactor.advance(1)
        assert [c.seq for c in audit_trail.checkpoints(db)] == [2, 3]
        reactor.advance(60)  # nothing new: nothing signed
        fill(registry, 2)
        loop.stop()
        assert [c.seq for c in audit_trail.checkpoints(db)] == [2, 3, 5]
        assert audit_trail.verify(db, keys[0].public).ok
    finally:
        db.close()
