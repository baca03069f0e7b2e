"""Tests for broker.nvram: the encrypted .nvram format (round trips, tamper, truncation, rollback, atomic writes)."""

from __future__ import annotations

import base64
import logging
import os
import stat
import uuid

import pytest
from cryptography.hazmat.primitives import hashes, hmac
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker import nvram
from broker.nvram import (
    SECTOR_SIZE,
    NvramContents,
    NvramCorrupt,
    NvramError,
    NvramRollback,
    NvramUnknownStateFile,
    NvramWrongVm,
    read_header,
    read_state_dir,
    seal,
    unseal,
    write_atomic,
    write_state_dir,
)

PERMALL = "tpm2-00.permall"
VOLATILE = "tpm2-00.volatilestate"
SAVESTATE = "tpm2-00.savestate"
VM = uuid.UUID("5c3f0a52-8a3e-4d1e-9b7a-0f6c2d9e1a11")
REF = "kms-prod/4f1c9e2a-kmip-uid"
# Packing overhead for a state of one file: record count (2) + record header (1 + 4).
ONE_FILE_OVERHEAD = 7


@pytest.fixture
def dek() -> bytes:
    return os.urandom(64)


def state_of(size: int, fill: bytes | None = None) -> dict[str, bytes]:
    data = (fill * size)[:size] if fill is not None else os.urandom(size)
    return {PERMALL: data}


def flip(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


def seal_raw(plaintext: bytes, dek: bytes, generation: int = 1) -> bytes:
    """A correctly encrypted and MACed file around an arbitrary plaintext (to reach the record parser)."""
    salt = os.urandom(32)
    ref = REF.encode()
    ct_len = -(-len(plaintext) // SECTOR_SIZE) * SECTOR_SIZE
    header = (
        nvram._FIXED.pack(
            nvram.MAGIC,
            1,
            nvram._FIXED.size + len(ref),
            VM.bytes,
            generation,
            salt,
            SECTOR_SIZE,
            len(plaintext),
            ct_len,
            len(ref),
        )
        + ref
    )
    xts_key, mac_key = nvram._derive_keys(dek, salt)
    ciphertext = nvram._xts(xts_key, plaintext.ljust(ct_len, b"\0"), encrypt=True)
    mac = hmac.HMAC(mac_key, hashes.SHA256())
    mac.update(header + ciphertext)
    return header + ciphertext + mac.finalize()


# --- round trips -------------------------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [0, 1, 15, 16, 17, 4095, 4096, 4097, 3 * 4096 + 5]
    # and the sizes that put the packed plaintext itself on the sector boundaries
    + [4095 - ONE_FILE_OVERHEAD, 4096 - ONE_FILE_OVERHEAD, 4097 - ONE_FILE_OVERHEAD, 8192 - ONE_FILE_OVERHEAD],
)
def test_round_trip_named_sizes(dek, size):
    """The edge sizes of XTS (16-byte blocks) and of sectors come back byte for byte."""
    state = state_of(size)
    blob = seal(state, dek, VM, 7, REF)
    contents = unseal(blob, dek, expected_vm_uuid=VM, min_generation=7)
    assert contents.files == state
    header = contents.header
    assert (header.vm_uuid, header.generation, header.key_safe_ref) == (VM, 7, REF)
    assert header.plaintext_length == size + ONE_FILE_OVERHEAD
    assert header.ciphertext_length % SECTOR_SIZE == 0
    assert header.ciphertext_length >= header.plaintext_length
    assert len(blob) == header.total_length


def test_round_trip_every_size_up_to_three_sectors(dek):
    """Every state size from 0 to a little past three sectors round-trips."""
    data = os.urandom(3 * SECTOR_SIZE + 64)
    for size in range(len(data) + 1):
        state = {PERMALL: data[:size]}
        assert unseal(seal(state, dek, VM, 1, REF), dek).files == state, size


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    permall=st.binary(max_size=3 * SECTOR_SIZE + 100),
    volatile=st.none() | st.binary(max_size=2 * SECTOR_SIZE),
    savestate=st.none() | st.binary(max_size=300),
    generation=st.integers(min_value=0, max_value=2**64 - 1),
    ref=st.text(min_size=1, max_size=200),
    vm=st.uuids(),
)
def test_round_trip_property(dek, permall, volatile, savestate, generation, ref, vm):
    """unseal(seal(x)) == x for any mix of state files, generation, key-safe reference and VM."""
    state = {PERMALL: permall}
    if volatile is not None:
        state[VOLATILE] = volatile
    if savestate is not None:
        state[SAVESTATE] = savestate
    blob = seal(state, dek, vm, generation, ref)
    contents = unseal(blob, dek, expected_vm_uuid=vm, min_generation=generation)
    assert contents.files == state
    assert contents.header == read_header(blob)
    assert (contents.header.vm_uuid, contents.header.generation, contents.header.key_safe_ref) == (vm, generation, ref)


def test_seal_accepts_a_state_directory(dek, tmp_path):
    """A state directory is read (swtpm's .lock skipped) and sealed like the dict it holds."""
    (tmp_path / PERMALL).write_bytes(b"perm" * 100)
    (tmp_path / VOLATILE).write_bytes(b"vol" * 50)
    (tmp_path / ".lock").write_bytes(b"")
    contents = unseal(seal(tmp_path, dek, str(VM), 1, REF), dek, expected_vm_uuid=str(VM))
    assert contents.files == {PERMALL: b"perm" * 100, VOLATILE: b"vol" * 50}


# --- tamper, wrong key, truncation ------------------------------------------------------


def test_every_single_bit_flip_is_detected_exhaustively(dek):
    """Each of the ~34,000 single-bit flips of a small file is a clear NvramCorrupt, never a state."""
    blob = seal(state_of(20), dek, VM, 3, REF)
    for bit in range(len(blob) * 8):
        with pytest.raises(NvramCorrupt):
            unseal(flip(blob, bit), dek, expected_vm_uuid=VM, min_generation=3)


@pytest.fixture(scope="module")
def large_sealed():
    key = os.urandom(64)
    state = {PERMALL: os.urandom(3 * SECTOR_SIZE + 5), VOLATILE: os.urandom(999)}
    return key, seal(state, key, VM, 9, REF)


@settings(max_examples=2000, deadline=None)
@given(data=st.data())
def test_single_bit_flips_in_a_large_file_are_detected(large_sealed, data):
    """Sampled flips anywhere in a five-sector file, header and tag included, are detected."""
    key, blob = large_sealed
    bit = data.draw(st.integers(min_value=0, max_value=len(blob) * 8 - 1))
    with pytest.raises(NvramCorrupt):
        unseal(flip(blob, bit), key)


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=6000))
def test_garbage_is_corrupt_never_a_crash(garbage):
    """Arbitrary bytes give NvramCorrupt from read_header and unseal, no other exception."""
    key = b"\x01" * 64
    with pytest.raises(NvramCorrupt):
        unseal(garbage, key)
    with pytest.raises(NvramCorrupt):
        unseal(nvram.MAGIC + garbage, key)


def test_wrong_key_is_detected_with_a_clear_message(dek):
    """Another DEK cannot be told from a flipped bit after the MAC, and the message says both."""
    blob = seal(state_of(5000), dek, VM, 1, REF)
    with pytest.raises(NvramCorrupt, match="corrupt or was encrypted with another key") as excinfo:
        unseal(blob, os.urandom(64))
    assert excinfo.value.header == read_header(blob)


def test_mac_is_verified_before_anything_is_decrypted(dek, monkeypatch):
    """A tampered ciphertext never reaches the XTS decryption."""
    blob = seal(state_of(5000), dek, VM, 1, REF)
    calls = []
    real_xts = nvram._xts
    monkeypatch.setattr(nvram, "_xts", lambda *a, **k: calls.append(k) or real_xts(*a, **k))
    tampered = flip(blob, (read_header(blob).header_length + 10) * 8)
    with pytest.raises(NvramCorrupt):
        unseal(tampered, dek)
    assert calls == []
    unseal(blob, dek)
    assert calls == [{"encrypt": False}]


def test_truncation_at_every_length_is_detected(dek):
    """Every prefix of a file, from empty to one byte short, is reported as truncated."""
    blob = seal(state_of(4100), dek, VM, 1, REF)
    for length in range(len(blob)):
        with pytest.raises(NvramCorrupt, match="truncated"):
            unseal(blob[:length], dek)
        with pytest.raises(NvramCorrupt, match="truncated"):
            read_header(blob[:length])


def test_truncation_past_the_header_names_the_expected_size(dek):
    """Once the header is whole, the message gives the size the header announces, and the header."""
    blob = seal(state_of(100), dek, VM, 1, REF)
    with pytest.raises(NvramCorrupt, match=f"header says {len(blob)} bytes, the file has {len(blob) - 1}") as excinfo:
        read_header(blob[:-1])
    assert excinfo.value.header.vm_uuid == VM


def test_trailing_bytes_are_corrupt(dek):
    blob = seal(state_of(100), dek, VM, 1, REF)
    with pytest.raises(NvramCorrupt, match="trailing"):
        unseal(blob + b"\0", dek)


def test_bad_magic_and_unknown_version(dek):
    blob = seal(state_of(100), dek, VM, 1, REF)
    with pytest.raises(NvramCorrupt, match="bad magic"):
        read_header(b"NOTNVRAM" + blob[8:])
    with pytest.raises(NvramCorrupt, match="version 2 is not supported"):
        read_header(blob[:8] + b"\x00\x02" + blob[10:])


def test_authentic_records_with_an_unknown_file_id_are_refused(dek):
    """Even behind a valid MAC, a record naming no known state file is never written anywhere."""
    bad_id = nvram._COUNT.pack(2) + nvram._RECORD.pack(1, 3) + b"abc" + nvram._RECORD.pack(42, 2) + b"xy"
    with pytest.raises(NvramCorrupt, match="unknown state file id 42"):
        unseal(seal_raw(bad_id, dek), dek)
    overrun = nvram._COUNT.pack(1) + nvram._RECORD.pack(1, 100) + b"abc"
    with pytest.raises(NvramCorrupt, match="runs past the end"):
        unseal(seal_raw(overrun, dek), dek)
    twice = nvram._COUNT.pack(2) + (nvram._RECORD.pack(1, 1) + b"a") * 2
    with pytest.raises(NvramCorrupt, match="appears twice"):
        unseal(seal_raw(twice, dek), dek)
    extra = nvram._COUNT.pack(1) + nvram._RECORD.pack(1, 1) + b"a" + b"zz"
    with pytest.raises(NvramCorrupt, match="after the last record"):
        unseal(seal_raw(extra, dek), dek)
    assert unseal(seal_raw(nvram._COUNT.pack(1) + nvram._RECORD.pack(1, 1) + b"a", dek), dek).files == {PERMALL: b"a"}


# --- rollback, wrong VM, header ------------------------------------------------------------


def test_rollback_is_detected(dek):
    """A generation older than the broker last saw is refused; the same or newer is fine."""
    blob = seal(state_of(300), dek, VM, 5, REF)
    with pytest.raises(NvramRollback, match="generation 5, older than generation 6"):
        unseal(blob, dek, min_generation=6)
    assert unseal(blob, dek, min_generation=5).header.generation == 5
    assert unseal(blob, dek, min_generation=0).header.generation == 5
    assert issubclass(NvramRollback, NvramError)


def test_wrong_vm_is_detected(dek):
    """An authentic file of another VM (a copied VM sharing the DEK) is refused."""
    blob = seal(state_of(300), dek, VM, 1, REF)
    other = uuid.uuid4()
    with pytest.raises(NvramWrongVm, match=str(VM)):
        unseal(blob, dek, expected_vm_uuid=other)
    with pytest.raises(NvramWrongVm):
        unseal(blob, dek, expected_vm_uuid=str(other))
    assert unseal(blob, dek, expected_vm_uuid=str(VM)).header.vm_uuid == VM


def test_header_is_readable_without_the_key(dek):
    """vm check and recovery read the VM, generation and key-safe reference with no key at all."""
    blob = seal(state_of(5000), dek, VM, 12, "kms-prod/ünïcode-uid")
    header = read_header(blob)
    assert header.format_version == nvram.FORMAT_VERSION
    assert (header.vm_uuid, header.generation, header.key_safe_ref) == (VM, 12, "kms-prod/ünïcode-uid")
    assert header.sector_size == SECTOR_SIZE
    assert header.plaintext_length == 5000 + ONE_FILE_OVERHEAD
    assert header.ciphertext_length == 2 * SECTOR_SIZE
    assert len(header.salt) == 32
    assert blob[: len(nvram.MAGIC)] == nvram.MAGIC


def test_fresh_salt_on_every_seal(dek):
    """Two seals of the same state, VM and generation share no salt and no ciphertext."""
    state = state_of(9000)
    a, b = seal(state, dek, VM, 1, REF), seal(state, dek, VM, 1, REF)
    ha, hb = read_header(a), read_header(b)
    assert ha.salt != hb.salt
    assert a[ha.header_length : -32] != b[hb.header_length : -32]
    assert unseal(a, dek).files == unseal(b, dek).files == state


def test_xts_tweak_differs_per_sector(dek):
    """Identical plaintext sectors encrypt differently: the sector number is the tweak."""
    blob = seal(state_of(4 * SECTOR_SIZE, fill=b"\0"), dek, VM, 1, REF)
    header = read_header(blob)
    ciphertext = blob[header.header_length : header.header_length + header.ciphertext_length]
    sectors = [ciphertext[i : i + SECTOR_SIZE] for i in range(0, len(ciphertext), SECTOR_SIZE)]
    # Plaintext sectors 1, 2 and 3 lie wholly inside the zero-filled file.
    assert len({sectors[1], sectors[2], sectors[3]}) == 3
    # Within a sector, XTS also differs per 16-byte block (the tweak is multiplied per block).
    assert len({sectors[2][i : i + 16] for i in range(0, SECTOR_SIZE, 16)}) == SECTOR_SIZE // 16


# --- what may be sealed and unpacked ------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../etc/passwd", "/etc/shadow", "tpm2-00.permall/../x", "swtpm.log", "tpm2-01.permall"]
)
def test_unknown_state_file_names_are_refused(dek, name):
    with pytest.raises(NvramUnknownStateFile):
        seal({PERMALL: b"x", name: b"y"}, dek, VM, 1, REF)
    with pytest.raises(NvramUnknownStateFile):
        write_state_dir(os.getcwd(), {name: b"y"})


def test_state_without_permall_is_refused(dek, tmp_path):
    """Sealing an empty directory would replace the vTPM with nothing."""
    with pytest.raises(NvramError, match="no tpm2-00.permall"):
        seal({}, dek, VM, 1, REF)
    with pytest.raises(NvramError, match="no tpm2-00.permall"):
        seal(tmp_path, dek, VM, 1, REF)


def test_read_state_dir_refuses_unknown_files_links_and_directories(tmp_path):
    (tmp_path / PERMALL).write_bytes(b"p")
    (tmp_path / "swtpm.log").write_text("log")
    with pytest.raises(NvramUnknownStateFile, match="swtpm.log"):
        read_state_dir(tmp_path)
    (tmp_path / "swtpm.log").unlink()
    target = tmp_path.parent / f"{tmp_path.name}-outside"
    target.write_bytes(b"outside")
    (tmp_path / VOLATILE).symlink_to(target)
    with pytest.raises(NvramUnknownStateFile, match=VOLATILE):
        read_state_dir(tmp_path)
    (tmp_path / VOLATILE).unlink()
    (tmp_path / SAVESTATE).mkdir()
    with pytest.raises(NvramUnknownStateFile, match=SAVESTATE):
        read_state_dir(tmp_path)
    (tmp_path / SAVESTATE).rmdir()
    assert read_state_dir(tmp_path) == {PERMALL: b"p"}


def test_write_state_dir_writes_only_known_names_with_mode_0600(dek, tmp_path):
    state = {PERMALL: b"perm", VOLATILE: b"vol"}
    contents = unseal(seal(state, dek, VM, 1, REF), dek)
    write_state_dir(tmp_path, contents.files)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(state)
    for name, data in state.items():
        assert (tmp_path / name).read_bytes() == data
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_state_dir(tmp_path, {PERMALL: b"again"})
    assert (tmp_path / PERMALL).read_bytes() == b"perm"


def test_write_state_dir_does_not_follow_a_planted_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    target = tmp_path / "state"
    target.mkdir()
    (target / PERMALL).symlink_to(victim)
    with pytest.raises(FileExistsError):
        write_state_dir(target, {PERMALL: b"evil"})
    assert victim.read_bytes() == b"keep"


# --- atomic writes ------------------------------------------------------------------------


def test_write_atomic_writes_with_mode_0600(tmp_path):
    path = tmp_path / "vm.nvram"
    old_umask = os.umask(0)
    try:
        write_atomic(path, b"first")
    finally:
        os.umask(old_umask)
    assert path.read_bytes() == b"first"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    path.chmod(0o644)
    write_atomic(path, b"second")
    assert path.read_bytes() == b"second"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["vm.nvram"]


def test_write_atomic_leaves_the_old_file_if_interrupted(tmp_path, monkeypatch):
    """A failure before the rename (a crash, a full disk) leaves the old file whole and no temp file."""
    path = tmp_path / "vm.nvram"
    path.write_bytes(b"old generation")

    def failing_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        write_atomic(path, b"new generation")
    assert path.read_bytes() == b"old generation"
    assert [p.name for p in tmp_path.iterdir()] == ["vm.nvram"]


def test_write_atomic_leaves_the_old_file_if_the_write_fails(tmp_path, monkeypatch):
    path = tmp_path / "vm.nvram"
    path.write_bytes(b"old generation")

    def failing_fsync(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output"):
        write_atomic(path, b"new generation")
    assert path.read_bytes() == b"old generation"
    assert [p.name for p in tmp_path.iterdir()] == ["vm.nvram"]


# --- the DEK stays out of every message ---------------------------------------------------


def _dek_forms(dek: bytes) -> list[str]:
    return [dek.hex(), dek.hex().upper(), repr(dek), str(dek), base64.b64encode(dek).decode(), dek.decode("latin-1")]


def test_dek_never_appears_in_repr_str_or_exceptions(dek, tmp_path, caplog):
    """Every object and exception the module makes, in every failure path, is free of the DEK."""
    caplog.set_level(logging.DEBUG)
    state = state_of(5000)
    blob = seal(state, dek, VM, 4, REF)
    contents = unseal(blob, dek)
    texts = [repr(contents), str(contents), repr(contents.header), str(contents.header), repr(read_header(blob))]
    assert "5000 bytes" in repr(contents)
    assert repr(state[PERMALL]) not in repr(contents)  # the clear state stays out of repr as well

    failures = [
        lambda: unseal(blob, os.urandom(64)),
        lambda: unseal(flip(blob, 9000), dek),
        lambda: unseal(blob[:-1], dek),
        lambda: unseal(blob, dek, min_generation=5),
        lambda: unseal(blob, dek, expected_vm_uuid=uuid.uuid4()),
        lambda: unseal(blob, dek[:-1]),
        lambda: unseal(blob, dek.hex()),
        lambda: seal(state, dek + b"\0", VM, 1, REF),
        lambda: seal({PERMALL: b"", "x": dek}, dek, VM, 1, REF),
        lambda: seal(state, dek, VM, -1, REF),
        lambda: seal(state, dek, VM, 1, ""),
    ]
    for failure in failures:
        with pytest.raises((NvramError, ValueError, TypeError)) as excinfo:
            failure()
        exc = excinfo.value
        texts += [str(exc), repr(exc), *map(repr, exc.args)]
        if isinstance(exc, NvramCorrupt) and exc.header is not None:
            texts.append(repr(exc.header))
    texts += [record.getMessage() for record in caplog.records]
    for text in texts:
        for form in _dek_forms(dek):
            assert form not in text


def test_dek_must_be_512_bits(dek):
    with pytest.raises(ValueError, match="64 bytes"):
        seal(state_of(10), dek[:32], VM, 1, REF)
    with pytest.raises(TypeError, match="bytes"):
        seal(state_of(10), dek.hex(), VM, 1, REF)


def test_contents_repr_lists_sizes_only(dek):
    contents = NvramContents(header=read_header(seal(state_of(3), dek, VM, 1, REF)), files={PERMALL: b"abc"})
    assert "tpm2-00.permall: 3 bytes" in repr(contents)
    assert "abc" not in repr(contents).split("files=")[1]
