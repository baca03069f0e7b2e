"""AuditTrail over the in-memory storage: appends form one verifiable
chain, concurrent writers share transactions (group commit) without losing
or reordering a record, and a failed batch fails every record in it."""

from __future__ import annotations

import contextlib
import threading
import time

import pytest

from kmip_core.audit import chain
from kmip_core.audit.audit_key import generate, load_signer
from kmip_core.audit.record import AuditWriteFailed
from kms_server.audit.trail import AuditTrail, iter_records, verify_storage
from kms_server.storage.base import StorageError
from kms_server.storage.memory import MemoryStorage


def entry(i: int) -> dict:
    return {
        "event": "request",
        "operation": "GET",
        "uid": f"u{i}",
        "client": {"name": "alice"},
        "object": {},
        "result": {"status": "SUCCESS", "reason": None},
    }


class CountingStorage(MemoryStorage):
    def __init__(self):
        super().__init__()
        self.transactions = 0
        self.fail = False

    @contextlib.contextmanager
    def transaction(self, read_only: bool = False):
        if not read_only:
            self.transactions += 1
            if self.fail:
                raise StorageError("disk full")
        with super().transaction(read_only) as txn:
            yield txn
            if not read_only:
                # A commit takes time (a real one waits for the disk); writers
                # that arrive meanwhile queue for the next one.
                time.sleep(0.002)


def test_concurrent_writers_share_transactions_and_keep_one_chain(tmp_path):
    storage = CountingStorage()
    generate(tmp_path / "a.key", tmp_path / "a.pub")
    signer = load_signer(tmp_path / "a.key")
    trail = AuditTrail(storage, "n1", signer=signer)
    start = threading.Barrier(16)
    written: list[int] = []

    def worker(n):
        start.wait()
        for i in range(25):
            written.append(trail.write(entry(n * 100 + i)).seq)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(written) == list(range(1, 401))
    assert storage.transactions < 400  # some records shared a commit
    assert trail.checkpoint().seq == 400
    report = verify_storage(storage, signer.public)
    assert report.ok and report.records == 400 and report.checkpoints == 1
    uids = {r.uid for r in iter_records(storage)}
    assert uids == {f"u{n * 100 + i}" for n in range(16) for i in range(25)}


def test_a_failed_batch_fails_each_of_its_records():
    storage = CountingStorage()
    trail = AuditTrail(storage, "n1")
    trail.write(entry(1))
    storage.fail = True
    with pytest.raises(AuditWriteFailed, match="disk full"):
        trail.write(entry(2))
    storage.fail = False
    assert trail.write(entry(3)).seq == 2
    assert [r.uid for r in iter_records(storage)] == ["u1", "u3"]


def test_records_are_canonical_and_chained():
    storage = MemoryStorage()
    trail = AuditTrail(storage, "n1", clock=lambda: 1_800_000_000.123456)
    first, second = trail.write(entry(1)), trail.write(entry(2))
    assert chain.canonical(__import__("json").loads(second.body)) == second.body
    assert '"prev":"' + first.hash + '"' in second.body
    assert first.time == 1_800_000_000.123456 and '"time":"2027-01-15T08:00:00.123456Z"' in first.body
    assert second.hash == chain.record_hash(second.body)


# On the SQL backends: batches of records from two nodes of one database.


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kms.db'}"
    return request.getfixturevalue("postgres_url")


def test_batches_of_records_from_two_nodes_keep_one_chain(db_url, pg_statements):
    """Each node stores a batch's records together (`append_all`: the head
    read once, the records in one statement) and, on PostgreSQL, reads the
    head when its batch opens, once it holds the writers' lock: batches of
    two nodes interleave in the database and still make one chain, with no
    seq taken twice or skipped. The statements sent are counted: a batch of
    several records is one INSERT (executemany) and reads no head of its
    own on PostgreSQL."""
    from kms_server.storage import open_storage
    from kms_server.storage.sql import AUDIT_LOCK_KEY

    sent = pg_statements.start()
    nodes = [open_storage(db_url), open_storage(db_url)]
    try:
        trails = [AuditTrail(storage, f"n{i}") for i, storage in enumerate(nodes)]
        start = threading.Barrier(4)
        errors: list[BaseException] = []

        def worker(trail: AuditTrail, n: int) -> None:
            try:
                start.wait(10)
                for i in range(10):
                    records = trail.write_batch([entry(n * 1000 + i * 10 + j) for j in range(3)])
                    assert [r.seq for r in records] == list(range(records[0].seq, records[0].seq + 3))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=worker, args=(trails[n % 2], n)) for n in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert errors == []
        records = list(iter_records(nodes[0]))
        assert [r.seq for r in records] == list(range(1, 121))
        assert {r.node for r in records} == {"n0", "n1"}
        report = verify_storage(nodes[0], None)
        assert report.ok and report.records == 120
        if db_url.startswith("postgresql"):
            inserts = [many for statement, many in sent if statement.startswith("INSERT INTO kms_audit ")]
            assert len(inserts) <= 40 and all(inserts), "one executemany per batch of three records"
            heads = sent.ahead_of("SELECT kms_audit.seq, kms_audit.hash")
            lock = f"pg_advisory_xact_lock({AUDIT_LOCK_KEY})"
            assert heads and all(any(lock in statement for statement in ahead) for ahead in heads), (
                "the head is read when the batch opens, with the writers' lock, not by its records"
            )
    finally:
        for storage in nodes:
            storage.close()
