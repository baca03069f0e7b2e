"""The reactor's batches synced to disk by a process of their own
(kms_server/storage/log_sync.py, kms_server.storage.reactor_writes.
SyncProcess): the reactor thread commits, sends the helper the database's
path and goes on; the batch's answers wait for the helper's answer; a
helper that dies leaves its syncs of unknown outcome and another one
starts; a failed sync refuses every later write, as in the node's own
process; with no helper at all, the reactor thread syncs itself.

A real helper process runs each of these tests; the reactor is twisted's
Clock with a reader list, and the test reads the helper's answers when
they are there (`Reactor.pump`), as the reactor would."""

from __future__ import annotations

import errno
import io
import os
import select
import signal
import sys
import time

import pytest
from twisted.internet import task
from twisted.internet.interfaces import IReactorFDSet
from zope.interface import implementer

from kmip_core.nonblocking import in_reactor
from kms_server.storage import log_sync
from kms_server.storage.base import StorageError
from kms_server.storage.reactor_writes import ReactorWrites, SyncProcess
from kms_server.storage.sql import SqlStorage


@implementer(IReactorFDSet)
class Reactor(task.Clock):
    """Clock, plus the readers SyncProcess adds."""

    def __init__(self):
        super().__init__()
        self.readers: list = []

    def addReader(self, reader):
        self.readers.append(reader)

    def removeReader(self, reader):
        self.readers.remove(reader)

    def addWriter(self, writer):
        raise AssertionError("not used")

    def removeWriter(self, writer):
        raise AssertionError("not used")

    def removeAll(self):
        readers, self.readers = self.readers, []
        return readers

    def getReaders(self):
        return list(self.readers)

    def getWriters(self):
        return []

    def pump(self, until, timeout: float = 10.0) -> None:
        """Read what the helper answers until `until()` is true."""
        deadline = time.monotonic() + timeout
        while not until():
            assert time.monotonic() < deadline, "no answer from the sync process"
            ready, _, _ = select.select([r.fileno() for r in self.readers] or [], [], [], 0.05)
            for reader in list(self.readers):
                if reader.fileno() in ready:
                    reader.doRead()


@pytest.fixture
def storage(sqlite_storage):
    return sqlite_storage  # SQLite only (conftest.py)


@pytest.fixture
def node(storage):
    reactor = Reactor()
    syncer = SyncProcess(reactor)
    writes = ReactorWrites(storage.reactor_batches(), reactor, lambda f: pytest.fail("no pool thread"), syncer)
    yield writes, reactor, syncer
    syncer.stop()


def write(storage: SqlStorage, key: str, hooks: list | None = None) -> None:
    with in_reactor(), storage.transaction() as txn:
        txn.set_meta(key, key.encode())
        if hooks is not None:
            txn.after_commit(lambda: hooks.append(key))


def committed(storage: SqlStorage, key: str) -> bytes | None:
    with storage.transaction(read_only=True) as txn:
        return txn.get_meta(key)


def answer(writes: ReactorWrites, storage: SqlStorage, key: str, hooks: list | None = None) -> list:
    got: list = []
    # As the records of reads are queued (server.py): their batch is the
    # helper's to sync.
    writes.when_free(lambda: write(storage, key, hooks) or writes.committed(), reads=True).addBoth(got.append)
    return got


def answered(writes: ReactorWrites, reactor: Reactor, storage: SqlStorage, key: str) -> list:
    """A write of `key` in its own batch, once its sync's answer is read."""
    got = answer(writes, storage, key)
    reactor.advance(0)
    reactor.pump(lambda: got)
    return got


def open_files(pid: int) -> set[str]:
    files = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            files.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return files


def dead(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_the_helper_syncs_the_log_and_the_answers_wait_for_it_while_the_reactor_thread_never_syncs(
    storage, node, monkeypatch
):
    writes, reactor, syncer = node
    here: list = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: here.append(fd) or real(fd))
    hooks: list = []
    got = answer(writes, storage, "a", hooks)
    reactor.advance(0)  # the batch commits; its sync goes to the helper
    assert committed(storage, "a") == b"a"
    assert syncer.pid is not None and syncer.started == 1
    assert got == [] and hooks == [], "nobody is told before the helper has answered"
    reactor.pump(lambda: got)
    assert got == [None] and hooks == ["a"]
    assert here == [], "this process never called fdatasync"
    # The helper holds the log open: the descriptor its syncs go through.
    assert f"{storage.writes.wal.database}-wal" in open_files(syncer.pid)
    # And again: the same helper.
    second = answered(writes, reactor, storage, "b")
    assert second == [None] and syncer.started == 1


def answer_reads(writes: ReactorWrites, storage: SqlStorage, key: str, reads: int) -> list:
    """As `answer`, for a job that tells the batch `reads` reads' answers
    wait on it (as the node's job of reads' records does: server.py)."""
    got: list = []

    def job():
        write(storage, key)
        writes.reads_joined(reads)
        return writes.committed()

    writes.when_free(job, reads=True).addBoth(got.append)
    return got


def test_a_reads_batch_every_client_waits_on_is_synced_in_place(storage, monkeypatch):
    """Given the process's client connections (the node's
    KmipFactory.connections), a reads' batch goes to the helper only if
    more clients are connected than answers wait on it: one of them may
    send a request, which the reactor serves during the sync. Otherwise
    the reactor syncs itself and tells the answers in the same turn. What
    waits on a batch is its reads' answers (as its jobs say:
    `reads_joined`) and one request per other write transaction."""
    reactor = Reactor()
    syncer = SyncProcess(reactor)
    clients = [0]
    writes = ReactorWrites(
        storage.reactor_batches(),
        reactor,
        lambda f: pytest.fail("no pool thread"),
        syncer,
        clients=lambda: clients[0],
    )
    here: list = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: here.append(fd) or real(fd))
    try:
        # One client, its read waiting: synced here, in the turn.
        clients[0] = 1
        alone = answer_reads(writes, storage, "alone", 1)
        reactor.advance(0)
        assert alone == [None] and len(here) == 1
        assert syncer.started == 0 and syncer.pid is None, "the helper was not asked"
        # Four clients: three reads and a write in one batch.
        clients[0] = 4
        reads = answer_reads(writes, storage, "three", 3)
        wrote: list = []
        writes.when_free(lambda: write(storage, "write") or writes.committed()).addBoth(wrote.append)
        reactor.advance(0)
        assert reads == [None] and wrote == [None] and len(here) == 2
        # A fifth client, whose request is not in the batch: the helper
        # syncs, and the reactor serves on.
        clients[0] = 5
        beside = answer_reads(writes, storage, "beside", 4)
        reactor.advance(0)
        assert beside == [], "nobody is told before the helper has answered"
        assert syncer.started == 1 and len(here) == 2
        reactor.pump(lambda: beside)
        assert beside == [None] and len(here) == 2
        assert [committed(storage, k) for k in ("alone", "three", "write", "beside")] == [
            b"alone", b"three", b"write", b"beside"
        ]
    finally:
        syncer.stop()


def test_the_helper_ignores_the_signals_that_reach_the_process_group(storage, node):
    """A node stopped with SIGTERM or ^C drains its requests first: their
    answers wait for syncs."""
    writes, reactor, syncer = node
    assert answered(writes, reactor, storage, "a") == [None]
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        os.kill(syncer.pid, signum)
    time.sleep(0.2)
    second = answered(writes, reactor, storage, "b")
    assert second == [None] and syncer.started == 1


def test_a_helper_that_dies_leaves_its_sync_of_unknown_outcome_and_the_next_batch_has_a_new_one(storage, node):
    writes, reactor, syncer = node
    assert answered(writes, reactor, storage, "a") == [None]
    pid = syncer.pid
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not dead(pid):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    hooks: list = []
    lost = answer(writes, storage, "b", hooks)
    reactor.advance(0)
    reactor.pump(lambda: lost)
    assert len(lost) == 1 and isinstance(lost[0].value, StorageError)
    assert "may or may not be stored" in str(lost[0].value)
    assert hooks == [], "no follow-up work of a batch not known durable"
    assert committed(storage, "b") == b"b", "committed, and the next sync covers it"
    # No sync failed: writes go on, with a new helper.
    later = answered(writes, reactor, storage, "c")
    assert later == [None] and syncer.started == 2 and syncer.pid != pid


def test_a_sync_the_helper_reports_failed_refuses_every_later_write(storage, tmp_path):
    """Its fdatasync failed (EIO): the same rule as a failure in this
    process (test_wal_sync.py): the batch is not durable, and the file
    <database>-sync-failed stops every process's writes. The helper here
    answers every request as log_sync.serve does when fdatasync raises."""
    helper = tmp_path / "failing_helper.py"
    helper.write_text(
        "import sys\n"
        "for line in sys.stdin:\n"
        "    sys.stdout.write('5 Input/output error\\n')\n"
        "    sys.stdout.flush()\n"
    )
    reactor = Reactor()
    syncer = SyncProcess(reactor, command=[sys.executable, "-I", "-S", str(helper)])
    writes = ReactorWrites(storage.reactor_batches(), reactor, lambda f: pytest.fail("no pool thread"), syncer)
    try:
        hooks: list = []
        got = answer(writes, storage, "a", hooks)
        reactor.advance(0)
        reactor.pump(lambda: got)
        assert len(got) == 1 and isinstance(got[0].value, StorageError)
        assert "could not be synced" in str(got[0].value) and "Input/output error" in str(got[0].value)
        assert hooks == []
        assert os.path.exists(f"{storage.writes.wal.database}-sync-failed")
        later = answer(writes, storage, "b")
        reactor.advance(0)
        assert len(later) == 1 and "restart the node" in str(later[0].value)
        assert committed(storage, "b") is None
    finally:
        syncer.stop()


def test_stopping_closes_the_helpers_input_and_it_exits(storage, node):
    writes, reactor, syncer = node
    assert answered(writes, reactor, storage, "a") == [None]
    pid = syncer.pid
    syncer.stop()
    assert syncer.pid is None and reactor.readers == []
    assert dead(pid)


def test_with_no_helper_the_reactor_thread_syncs_itself(storage, caplog):
    reactor = Reactor()
    syncer = SyncProcess(reactor, command=["/nonexistent/python3"])
    writes = ReactorWrites(storage.reactor_batches(), reactor, lambda f: pytest.fail("no pool thread"), syncer)
    got = answer(writes, storage, "a")
    reactor.advance(0)
    assert got == [None], "synced at once, in this thread"
    second = answer(writes, storage, "b")
    reactor.advance(0)
    assert second == [None]
    assert syncer.started == 0
    assert [r.message for r in caplog.records].count(
        next(r.message for r in caplog.records if "could not start" in r.message)
    ) == 1, "said once"


# The protocol, on its own.


def test_a_request_is_the_database_path_on_one_line_and_a_path_with_a_line_break_is_refused():
    assert log_sync.request("/var/lib/kms/kms.db") == b"/var/lib/kms/kms.db\n"
    with pytest.raises(ValueError, match="line break"):
        log_sync.request("/tmp/a\nb.db")


def test_answers_say_durable_or_the_error_and_anything_else_is_not_an_answer():
    assert log_sync.outcome(log_sync.reply(None)) is None
    error = log_sync.outcome(log_sync.reply(OSError(errno.ENOSPC, "No space left on device")))
    assert isinstance(error, OSError) and error.errno == errno.ENOSPC and "No space" in str(error)
    for bogus in (b"", b"ok", b"-1 x", b"Traceback (most recent call last):"):
        with pytest.raises(ValueError, match="not an answer"):
            log_sync.outcome(bogus)


def test_the_helper_loop_syncs_each_database_named_through_its_own_log_and_answers_each_request():
    made: dict[str, list] = {}

    class Log:
        def __init__(self, database):
            self.database = database
            self.calls = made.setdefault(database, [])

        def sync(self):
            self.calls.append("sync")
            if self.database.endswith("full.db"):
                raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            self.calls.append("close")

    requests = io.BytesIO(b"/a/kms.db\n/a/kms.db\n/b/full.db\n")
    replies = io.BytesIO()
    log_sync.serve(requests, replies, make=Log)
    lines = replies.getvalue().splitlines()
    assert [log_sync.outcome(line) for line in lines[:2]] == [None, None]
    failed = log_sync.outcome(lines[2])
    assert isinstance(failed, OSError) and failed.errno == errno.ENOSPC
    assert made == {"/a/kms.db": ["sync", "sync", "close"], "/b/full.db": ["sync", "close"]}


def test_a_nodes_gets_are_answered_once_the_helper_has_synced_their_records(tmp_path, pki_dir, monkeypatch):
    """The node as it runs on SQLite (kms_server.server.KmsService): the
    records of a turn's reads commit at the end of the turn and are synced
    by the helper while a client that does not wait on them is connected;
    the answers leave only after its answer. With every client waiting on
    them the reactor thread syncs them itself, and they leave in the turn."""
    from kmip.core.enums import Operation, ResultStatus
    from kmip.core.enums import Tags as T

    from kmip_core import ttlv
    from kmip_core.policy import Principal
    from kmip_core.server.dispatcher import ConnectionInfo
    from kms_server.config import load_config
    from kms_server.server import KmsService
    from tests.conftest import write_node_config
    from tests.kms_server.dispatch.test_dispatcher import batch_item, only_item, request, status
    from tests.kms_server.test_reactor_answers import created_key, sent

    here: list = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: here.append(fd) or real(fd))
    conn = ConnectionInfo(principal=Principal(name="alice"), peer="127.0.0.1:1")
    reactor = Reactor()
    service = KmsService(load_config(write_node_config(tmp_path / "node", pki_dir)), reactor)
    # The node's client connections (the test hands its requests to the
    # service itself, past the connections the factory keeps).
    service.factory.connections = {object(), object(), object()}
    try:
        assert service.log_syncer is not None
        uid = created_key(service, reactor)  # a batch of a write alone: the reactor synced it
        synced_here = len(here)
        assert synced_here >= 1
        read = request([batch_item(Operation.GET_ATTRIBUTES, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])])
        answers = [sent(service._handle_inline(read, conn)) for _ in range(2)]
        reactor.advance(0)  # the records commit; the helper syncs
        assert answers == [[], []], "not before the helper's answer"
        assert service.log_syncer.pid is not None
        reactor.pump(lambda: all(answers))
        assert [status(only_item(ttlv.decode(got[0]))) for got in answers] == [ResultStatus.SUCCESS] * 2
        assert len(here) == synced_here, "the reads' batch was not synced in this process"
        # The same two reads, from the only two clients.
        service.factory.connections = {object(), object()}
        again = [sent(service._handle_inline(read, conn)) for _ in range(2)]
        reactor.advance(0)
        assert [status(only_item(ttlv.decode(got[0]))) for got in again] == [ResultStatus.SUCCESS] * 2
        assert len(here) == synced_here + 1, "synced in this process, in the turn"
    finally:
        if service.log_syncer is not None:
            service.log_syncer.stop()
        service.storage.close()


def test_an_answer_written_just_before_the_helper_exits_still_counts(storage, tmp_path):
    """The helper answers, then its output ends (it exited): the answer
    read with the end of its output is the batch's outcome, not a loss."""
    helper = tmp_path / "answer_once.py"
    helper.write_text("import sys\nsys.stdin.readline()\nsys.stdout.write('0\\n')\n")
    reactor = Reactor()
    syncer = SyncProcess(reactor, command=[sys.executable, "-I", "-S", str(helper)])
    writes = ReactorWrites(storage.reactor_batches(), reactor, lambda f: pytest.fail("no pool thread"), syncer)
    try:
        got = answer(writes, storage, "a")
        reactor.advance(0)
        pid = syncer.pid
        deadline = time.monotonic() + 10
        while not dead(pid):  # answered and gone before the reactor reads
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reactor.pump(lambda: got)
        assert got == [None]
        assert syncer.pid is None, "its end was seen: the next batch starts another"
    finally:
        syncer.stop()
