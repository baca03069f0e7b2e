"""kmip_core.files: the one atomic file write of kms_server and the broker."""

from __future__ import annotations

import errno
import os
import stat
import tempfile

import pytest

from kmip_core.files import atomic_file, write_atomic


def names(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def mode_of(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_zero():
    old = os.umask(0)
    yield
    os.umask(old)


# --- the result ---------------------------------------------------------------------------


def test_writes_the_content_with_mode_0600_by_default(tmp_path, umask_zero):
    path = tmp_path / "key.pem"
    write_atomic(path, b"secret")
    assert path.read_bytes() == b"secret"
    assert mode_of(path) == 0o600
    assert names(tmp_path) == ["key.pem"]


@pytest.mark.parametrize("mode", [0o600, 0o644, 0o400])
def test_the_mode_is_exactly_the_one_given_whatever_the_umask(tmp_path, mode):
    path = tmp_path / "file"
    old = os.umask(0o077)
    try:
        write_atomic(path, b"data", mode)
    finally:
        os.umask(old)
    assert mode_of(path) == mode


def test_the_mode_is_set_before_any_data_is_written(tmp_path, monkeypatch):
    """A private key is never readable by others, even for an instant."""
    seen = []
    real_fchmod = os.fchmod

    def spy(fd, mode):
        seen.append((os.fstat(fd).st_size, stat.S_IMODE(os.fstat(fd).st_mode)))
        real_fchmod(fd, mode)

    monkeypatch.setattr(os, "fchmod", spy)
    write_atomic(tmp_path / "key.pem", b"secret" * 1000, 0o600)
    # The temporary file was empty and private (mkstemp) when the mode was applied.
    assert seen == [(0, 0o600)]


def test_accepts_a_string_path(tmp_path):
    write_atomic(str(tmp_path / "f"), b"x", 0o644)
    assert (tmp_path / "f").read_bytes() == b"x"


def test_an_existing_file_is_replaced_never_truncated_in_place(tmp_path):
    path = tmp_path / "vm.nvram"
    path.write_bytes(b"old generation")
    path.chmod(0o644)
    witness = tmp_path / "witness"
    os.link(path, witness)  # a second name for the old inode
    old_inode = path.stat().st_ino
    write_atomic(path, b"new generation")
    assert path.read_bytes() == b"new generation"
    assert mode_of(path) == 0o600
    assert path.stat().st_ino != old_inode
    # The old file was never opened for writing: its content is whole.
    assert witness.read_bytes() == b"old generation"
    assert names(tmp_path) == ["vm.nvram", "witness"]


def test_a_symlink_at_the_path_is_replaced_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    path = tmp_path / "link"
    path.symlink_to(victim)
    write_atomic(path, b"new")
    assert not path.is_symlink()
    assert path.read_bytes() == b"new"
    assert victim.read_bytes() == b"keep"


# --- failures: OSError naming the path, no temporary file left ----------------------------


def test_a_missing_directory_names_the_directory(tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError) as info:
        write_atomic(missing / "key.pem", b"secret")
    assert info.value.errno == errno.ENOENT
    assert info.value.strerror == os.strerror(errno.ENOENT)
    assert info.value.filename == str(missing)
    assert names(tmp_path) == []


def test_a_failing_fchmod_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")

    def failing_fchmod(fd, mode):
        raise PermissionError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", failing_fchmod)
    with pytest.raises(PermissionError) as info:
        write_atomic(path, b"new")
    assert (info.value.errno, info.value.strerror) == (errno.EPERM, "Operation not permitted")
    assert info.value.filename == str(path)
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["key.pem"]


def test_a_failing_write_leaves_the_old_file_and_no_temporary_file(tmp_path):
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["key.pem"]


def test_a_failing_fsync_names_the_path_not_the_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error") as info:
        write_atomic(path, b"new")
    assert info.value.errno == errno.EIO
    assert info.value.filename == str(path)
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["key.pem"]


def test_a_failing_rename_names_the_path_alone(tmp_path, monkeypatch):
    path = tmp_path / "key.pem"
    path.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", os.fspath(src), None, os.fspath(dst))

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError) as info:
        write_atomic(path, b"new")
    assert (info.value.errno, info.value.filename, info.value.filename2) == (errno.ENOSPC, str(path), None)
    assert str(info.value) == f"[Errno {errno.ENOSPC}] No space left on device: '{path}'"
    assert path.read_bytes() == b"old"
    assert names(tmp_path) == ["key.pem"]


def test_an_unwritable_directory_names_the_directory(tmp_path, monkeypatch):
    def failing_mkstemp(**kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", os.path.join(kwargs["dir"], ".f.abc.tmp"))

    monkeypatch.setattr(tempfile, "mkstemp", failing_mkstemp)
    with pytest.raises(PermissionError) as info:
        write_atomic(tmp_path / "f", b"x")
    assert (info.value.errno, info.value.filename) == (errno.EACCES, str(tmp_path))
    assert names(tmp_path) == []


# --- the directory fsync ------------------------------------------------------------------


def _record_fsyncs(monkeypatch) -> list[str]:
    calls: list[str] = []
    real_fsync = os.fsync

    def spy(fd):
        calls.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return calls


def test_the_directory_is_synced_after_the_rename_when_asked(tmp_path, monkeypatch):
    calls = _record_fsyncs(monkeypatch)
    real_replace = os.replace

    def replace(src, dst):
        calls.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_atomic(tmp_path / "vm.nvram", b"blob", sync_dir=True)
    assert calls == ["file", "rename", "directory"]


def test_the_directory_is_not_synced_unless_asked(tmp_path, monkeypatch):
    calls = _record_fsyncs(monkeypatch)
    write_atomic(tmp_path / "cert.pem", b"cert", 0o644)
    assert calls == ["file"]


def test_not_durable_skips_the_fsync_and_is_still_atomic(tmp_path, monkeypatch):
    calls = _record_fsyncs(monkeypatch)
    target = tmp_path / "running.json"
    target.write_bytes(b"old")
    keep = tmp_path / "link"
    os.link(target, keep)  # the old inode: replaced, never rewritten
    write_atomic(target, b"new", durable=False)
    assert calls == [] and target.read_bytes() == b"new" and keep.read_bytes() == b"old"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


# --- the streaming form -------------------------------------------------------------------


def test_atomic_file_writes_in_pieces_and_appears_only_when_done(tmp_path, umask_zero):
    path = tmp_path / "out.backup"
    path.write_bytes(b"previous backup")
    with atomic_file(path, 0o600, sync_dir=True) as fh:
        for piece in (b"one ", b"two ", b"three"):
            fh.write(piece)
        assert path.read_bytes() == b"previous backup"
    assert path.read_bytes() == b"one two three"
    assert mode_of(path) == 0o600
    assert names(tmp_path) == ["out.backup"]


def test_atomic_file_removes_the_temporary_file_on_an_exception(tmp_path):
    path = tmp_path / "out.backup"
    path.write_bytes(b"previous backup")
    failure = OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as info, atomic_file(path) as fh:
        fh.write(b"half")
        raise failure
    assert info.value is failure and info.value.filename is None  # the block's own error, unchanged
    assert path.read_bytes() == b"previous backup"
    assert names(tmp_path) == ["out.backup"]


def test_atomic_file_without_replace_refuses_a_file_that_appeared(tmp_path):
    path = tmp_path / "out.backup"
    with pytest.raises(FileExistsError) as info, atomic_file(path, replace=False) as fh:
        fh.write(b"new")
        path.write_bytes(b"someone else's")
    assert info.value.filename == str(path)
    assert path.read_bytes() == b"someone else's"
    assert names(tmp_path) == ["out.backup"]


def test_atomic_file_without_replace_creates_a_new_file(tmp_path, monkeypatch):
    calls = _record_fsyncs(monkeypatch)
    path = tmp_path / "out.backup"
    with atomic_file(path, 0o640, sync_dir=True, replace=False) as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new"
    assert mode_of(path) == 0o640
    assert names(tmp_path) == ["out.backup"]
    assert calls == ["file", "directory"]
