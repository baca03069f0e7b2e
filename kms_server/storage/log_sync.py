"""Syncing a SQLite database's write-ahead log to disk (issue 15), in the
process that writes it or in a helper process of its own.

`WalSync` is what makes a batch's commit durable once the writers' flock
is released (kms_server.storage.sql.WriteBatches). A node process's reactor
batches have theirs made by a helper process (`python log_sync.py`, run by
path, so that it imports nothing but the standard library), which does
nothing else: the reactor thread sends it the database's path, goes on, and
reads its answer when it comes (kms_server.storage.reactor_writes.
SyncProcess). A thread of the node's process could call fdatasync as well,
but every turn it takes at the GIL the reactor thread must hand it, and the
handing over cost more CPU than the wait it spared (bench/README.md, "The
reactor's syncs in a process of their own").

The helper's protocol, one line each way per sync: the database's path
(`request`); `0` when every frame written to its log so far is durable, or
`<errno> <message>` when the sync failed (`reply`, `outcome`). It exits at
the end of its input, that is once the node process that started it is
gone, and ignores SIGINT, SIGTERM and SIGHUP, which reach the whole
process group: a node that stops drains its requests first, and their
answers wait for syncs.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import BinaryIO

__all__ = ["WalSync", "main", "outcome", "reply", "request", "serve"]


class WalSync:
    """The write-ahead log of a SQLite database in WAL mode, made durable by
    this process after the writers' flock is released (issue 15).

    The batches' connection runs with `synchronous = NORMAL`: its COMMIT
    writes the transaction's frames to the log (the operating system's
    cache: they survive the process, not a power cut) and does not wait for
    the disk. `WriteBatches` then releases the flock, so that the node's
    other processes write meanwhile, and calls `sync`: one `fdatasync` of
    the log makes every frame written to it so far durable, this batch's
    and any before it. The members of the batch, and the answers that wait
    for it, learn its outcome only after that: nothing is answered before
    it is durable, as with `synchronous = FULL`, where SQLite synced inside
    COMMIT, the flock held. A reactor batch's log is synced by the
    process's sync process instead (`WriteBatches.end_reactor_batch`,
    UnsyncedCommit), with a WalSync of its own, so that the reactor goes
    on meanwhile. One lock keeps this object's syncs one at a time.

    Why this keeps everything the server answered: a frame is synced by
    this call, or copied into the database file by a checkpoint, which
    syncs the log before and the database file after (SQLite, WAL mode,
    NORMAL); the log is only deleted or restarted from its start after a
    complete checkpoint. A read that saw a batch before its sync answers
    only once its own audit record is durable, in a later commit of the same
    log, whose sync covers the earlier frames (docs/process-model.md).

    The log file's descriptor is kept while the file is the same (device,
    inode), so that an I/O error the kernel reports once reaches it; the
    directory is synced once per log file, for the file's own entry. A
    failed sync is final: `WriteBatches` leaves `<database>-sync-failed`,
    and every process of the database refuses to write, or to report a
    batch durable, while it exists. After a failed `fdatasync` Linux may
    drop the pages it could not write, and a later one, in any process,
    would succeed over a gap in the log."""

    def __init__(self, database: str):
        self.database = database
        self.path = database + "-wal"
        self._fd: int | None = None
        self._file: tuple[int, int] | None = None
        # A worker's batches sync on whichever thread ends them (the
        # reactor's, a pool thread's); their turn orders them already. The
        # lock keeps this object safe on its own: no sync, and no close,
        # replaces the descriptor under another thread's fdatasync.
        self._lock = threading.Lock()

    def sync(self) -> None:
        """Make what was written to the log durable; raises OSError."""
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            # No log: the last connection checkpointed it whole into the
            # database file, synced, and deleted it.
            self._close()
            return
        if self._file != (now.st_dev, now.st_ino):
            self._close()
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            opened = os.fstat(fd)
            self._fd, self._file = fd, (opened.st_dev, opened.st_ino)
            # The new log file's directory entry: once per file.
            directory = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(directory)
            finally:
                os.close(directory)
        assert self._fd is not None  # opened above
        os.fdatasync(self._fd)

    def _close(self) -> None:
        fd, self._fd, self._file = self._fd, None, None
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        with self._lock:
            self._close()



def request(database: str) -> bytes:
    """The line that asks the helper to sync `database`'s log."""
    if "\n" in database:
        raise ValueError("a database path with a line break cannot be sent to the sync process")
    return database.encode() + b"\n"


def reply(error: OSError | None) -> bytes:
    """The helper's answer to one request."""
    if error is None:
        return b"0\n"
    message = (error.strerror or str(error)).replace("\n", " ")
    return f"{error.errno or 0} {message}\n".encode()


def outcome(line: bytes) -> OSError | None:
    """What one line of the helper's answers says: None once the log is
    durable, or the OSError its sync raised (ValueError: not an answer)."""
    text = line.decode(errors="replace").rstrip("\n")
    code, _, message = text.partition(" ")
    if not code.isdigit():
        raise ValueError(f"not an answer of the sync process: {text[:80]!r}")
    if code == "0" and not message:
        return None
    return OSError(int(code), message or "the sync failed")


def serve(requests: BinaryIO, replies: BinaryIO, make: Callable[[str], WalSync] = WalSync) -> None:
    """The helper's loop: sync each database named on `requests`, answer on
    `replies`, until `requests` ends."""
    logs: dict[str, WalSync] = {}
    try:
        for line in requests:
            database = line.rstrip(b"\n").decode()
            wal = logs.get(database)
            if wal is None:
                wal = logs[database] = make(database)
            try:
                wal.sync()
            except OSError as exc:
                answer = reply(exc)
            else:
                answer = reply(None)
            replies.write(answer)
            replies.flush()
    finally:
        for wal in logs.values():
            wal.close()


def main() -> None:
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    try:
        serve(sys.stdin.buffer, sys.stdout.buffer)
    except BrokenPipeError:
        pass  # the node process is gone


if __name__ == "__main__":
    main()
