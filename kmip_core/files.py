"""Writing a file atomically: one implementation for kms_server and the broker.

A reader (or a crash) sees the old file or the whole new one, never a part:
the data goes to a temporary file in the same directory (same file system,
so the rename is atomic), is flushed and fsynced, and is then renamed onto
the target with ``os.replace``. An existing file is replaced, never
truncated in place. On any failure the temporary file is removed.

The temporary file is created by ``tempfile.mkstemp`` (mode 0600, never
following a symlink, never reusing a name) and gets ``mode`` with ``fchmod``
before any data is written, so a private key is never readable by others,
even for an instant, and the umask plays no part in the result.

Failures are ``OSError`` with the original errno and strerror, so each caller
turns them into its own error and message. Its ``filename`` is the path the
write failed on: the directory when the temporary file cannot be created in
it (or, with ``sync_dir``, the directory cannot be synced), the target path
otherwise -- never the temporary name, which means nothing to the user.

Standard library only: light tools (``broker.ek_certtool``) import it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "flock_within", "write_atomic"]


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o600,
    *,
    sync_dir: bool = False,
    durable: bool = True,
) -> None:
    """Replace ``path`` with ``data``, atomically, with ``mode`` from the first byte.

    ``sync_dir`` also fsyncs the directory after the rename, so the new name
    itself survives a crash (not only the new content). ``durable=False``
    skips the fsync of the data: still atomic for readers, but a crash may
    leave the old file; for records that mean nothing after a reboot.
    """
    path = Path(path)
    with atomic_file(path, mode, sync_dir=sync_dir, durable=durable) as fh, _failing_on(path):
        fh.write(data)


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str],
    mode: int = 0o600,
    *,
    sync_dir: bool = False,
    replace: bool = True,
    durable: bool = True,
) -> Iterator[BinaryIO]:
    """A binary file to write that becomes ``path`` only when the block ends cleanly.

    The block writes the content (in as many pieces as it likes); on a clean
    exit the file is flushed, fsynced (unless ``durable`` is False) and put in
    place; on an exception it is
    removed and the exception propagates unchanged. ``replace=False`` puts it
    in place with ``os.link`` instead, so a file that appeared at ``path``
    meanwhile is kept and the write fails with ``FileExistsError``.
    """
    path = Path(path)
    directory = path.parent
    with _failing_on(directory):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            with _failing_on(path):
                os.fchmod(fd, mode)
            yield fh
            with _failing_on(path):
                fh.flush()
                if durable:
                    os.fsync(fd)
        with _failing_on(path):
            if replace:
                os.replace(tmp, path)
            else:
                os.link(tmp, path)
                tmp.unlink()
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if sync_dir:
        with _failing_on(directory):
            _fsync_directory(directory)


def _fsync_directory(directory: Path) -> None:
    """Make a rename (or a new link) in ``directory`` durable."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@contextlib.contextmanager
def _failing_on(filename: Path) -> Iterator[None]:
    """Name ``filename`` in an OSError raised inside, instead of a temporary name or none."""
    try:
        yield
    except OSError as exc:
        exc.filename = os.fspath(filename)
        del exc.filename2  # unset, not None: str(exc) would end in "-> None"
        raise


def flock_within(fd: int, timeout: float, poll: float) -> bool:
    """Take an exclusive flock on `fd`, trying again every `poll` seconds
    for up to `timeout` seconds; False if another holder kept it that long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(poll)
