"""Tests for broker.host.swtpm with the real swtpm, swtpm_setup and tpm2-tools (Unix sockets only)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import uuid
from pathlib import Path

import pytest

from broker import nvram
from broker.host.swtpm import SwtpmError, SwtpmInstance, manufacture, private_workdir, wipe

TOOLS = (
    "swtpm",
    "swtpm_setup",
    "tpm2_nvdefine",
    "tpm2_nvwrite",
    "tpm2_nvread",
    "tpm2_readpublic",
    "tpm2_pcrextend",
    "tpm2_pcrread",
    "tpm2_getcap",
    "tpm2_startup",
)
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs Debian's swtpm, swtpm-tools and tpm2-tools (apt-get install swtpm swtpm-tools tpm2-tools); "
    f"missing: {', '.join(MISSING)}",
)

RSA_EK = 0x81010001
ECC_EK = 0x81010016
NV_INDEX = "0x1500016"


@pytest.fixture(scope="module")
def permall(tmp_path_factory) -> bytes:
    """One manufactured TPM state shared by the tests that do not test manufacturing itself."""
    state = tmp_path_factory.mktemp("manufactured")
    manufacture(state, uuid.uuid4())
    return (state / "tpm2-00.permall").read_bytes()


def tpm2(tool: str, tcti: str, *args: str, input: bytes | None = None) -> bytes:
    done = subprocess.run([tool, "-T", tcti, *args], input=input, capture_output=True, timeout=10)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def read_ek_publics(tcti: str, scratch: Path) -> dict[int, bytes]:
    publics = {}
    for handle in (RSA_EK, ECC_EK):
        out = scratch / f"ek-{handle:x}.pub"
        tpm2("tpm2_readpublic", tcti, "-c", hex(handle), "-o", str(out))
        publics[handle] = out.read_bytes()
        out.unlink()
    return publics


def start(work: Path, swtpms: list[SwtpmInstance], **kwargs) -> SwtpmInstance:
    instance = SwtpmInstance(work / "state", work / "run", **kwargs)
    swtpms.append(instance)
    instance.start()
    return instance


def test_vtpm_survives_seal_wipe_unseal(workdir, swtpms, tmp_path):
    """Manufacture, write an NV secret, power off, seal, wipe, unseal elsewhere, power on: same secret, same EKs."""
    vm = uuid.uuid4()
    dek = os.urandom(64)
    secret = f"vm {vm} secret ".encode() + os.urandom(8).hex().encode()

    first = workdir()
    made = manufacture(first / "state", vm)
    assert (made.rsa_ek_handle, made.ecc_ek_handle) == (RSA_EK, ECC_EK)
    tpm = start(first, swtpms)
    tpm2("tpm2_nvdefine", tpm.tcti, NV_INDEX, "-C", "o", "-s", str(len(secret)), "-a", "ownerread|ownerwrite")
    tpm2("tpm2_nvwrite", tpm.tcti, NV_INDEX, "-C", "o", "-i", "-", input=secret)
    assert tpm2("tpm2_nvread", tpm.tcti, NV_INDEX, "-C", "o", "-s", str(len(secret))) == secret
    eks_before = read_ek_publics(tpm.tcti, first / "run")
    assert tpm.shutdown() == 0
    assert not tpm.running

    datastore_file = tmp_path / "vm.nvram"
    nvram.write_atomic(datastore_file, nvram.seal(first / "state", dek, vm, 2, "kms-test/kek-1"))
    wipe(first)
    assert not first.exists()

    second = workdir()
    contents = nvram.unseal(datastore_file.read_bytes(), dek, expected_vm_uuid=vm, min_generation=2)
    nvram.write_state_dir(second / "state", contents.files)
    tpm = start(second, swtpms)
    assert tpm2("tpm2_nvread", tpm.tcti, NV_INDEX, "-C", "o", "-s", str(len(secret))) == secret
    assert read_ek_publics(tpm.tcti, second / "run") == eks_before
    assert tpm.shutdown() == 0


def test_manufacture_makes_only_known_state_files_mode_0600(workdir):
    """swtpm_setup 0.7 leaves tpm2-00.permall (and its empty .lock); the result seals as-is."""
    work = workdir()
    made = manufacture(work / "state", uuid.uuid4())
    assert (made.rsa_ek_handle, made.ecc_ek_handle) == (RSA_EK, ECC_EK)
    names = sorted(p.name for p in (work / "state").iterdir())
    assert names in (["tpm2-00.permall"], [".lock", "tpm2-00.permall"])
    assert stat.S_IMODE((work / "state" / "tpm2-00.permall").stat().st_mode) == 0o600
    assert list(nvram.read_state_dir(work / "state")) == ["tpm2-00.permall"]


def test_manufacture_refuses_to_replace_an_existing_tpm(workdir, permall):
    work = workdir()
    (work / "state" / "tpm2-00.permall").write_bytes(permall)
    with pytest.raises(SwtpmError, match="already holds a TPM"):
        manufacture(work / "state", uuid.uuid4())
    assert (work / "state" / "tpm2-00.permall").read_bytes() == permall


def test_sockets_tcti_and_idempotent_stop(workdir, swtpms, permall):
    """The TCTI names the server socket; sockets are 0600 while running and gone after the stop."""
    work = workdir()
    (work / "state" / "tpm2-00.permall").write_bytes(permall)
    tpm = start(work, swtpms)
    assert tpm.tcti == f"swtpm:path={work / 'run' / 'swtpm.sock'}"
    for sock in (tpm.server_socket, tpm.ctrl_socket):
        mode = sock.stat().st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert tpm.ctrl_socket == Path(f"{tpm.server_socket}.ctrl")  # where tpm2-tss's swtpm TCTI looks
    with pytest.raises(SwtpmError, match="already runs"):
        tpm.start()
    assert tpm.shutdown() == 0
    assert tpm.shutdown() == 0
    tpm.kill()
    assert not tpm.server_socket.exists() and not tpm.ctrl_socket.exists()
    assert nvram.read_state_dir(work / "state").keys() == {"tpm2-00.permall"}


def test_kill_stops_at_once(workdir, swtpms, permall):
    work = workdir()
    (work / "state" / "tpm2-00.permall").write_bytes(permall)
    tpm = start(work, swtpms)
    pid = tpm.pid
    tpm.kill()
    assert not tpm.running
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    tpm.kill()


def test_shutdown_state_resumes_pcrs_and_clear_resets_them(workdir, swtpms, permall):
    """TPM2_Shutdown(STATE) + startup-state keeps PCRs (as a resume does); CLEAR starts them afresh."""
    work = workdir()
    (work / "state" / "tpm2-00.permall").write_bytes(permall)
    zero = "0x" + "00" * 32
    tpm = start(work, swtpms)
    tpm2("tpm2_pcrextend", tpm.tcti, "0:sha256=" + "11" * 32)
    extended = tpm2("tpm2_pcrread", tpm.tcti, "sha256:0")
    assert zero.upper()[2:] not in extended.decode().upper()
    tpm.shutdown(mode="state")

    tpm = start(work, swtpms, startup="state")
    assert tpm2("tpm2_pcrread", tpm.tcti, "sha256:0") == extended
    tpm.shutdown(mode="clear")

    tpm = start(work, swtpms, startup="clear")
    assert "0x" + "00" * 32 in tpm2("tpm2_pcrread", tpm.tcti, "sha256:0").decode().lower()
    tpm.shutdown()


def test_without_startup_flags_the_guest_sends_startup(workdir, swtpms, permall):
    """startup=None leaves TPM2_Startup to the guest, as firmware does; the stop is still clean."""
    work = workdir()
    (work / "state" / "tpm2-00.permall").write_bytes(permall)
    tpm = start(work, swtpms, startup=None)
    assert "--flags" in tpm.command() and "not-need-init" in tpm.command()
    assert tpm.shutdown() == 0  # TPM2_Shutdown before any TPM2_Startup is TPM_RC_INITIALIZE, not an error

    tpm = start(work, swtpms, startup=None)
    tpm2("tpm2_startup", tpm.tcti, "-c")
    assert tpm2("tpm2_getcap", tpm.tcti, "handles-persistent").split() == [b"-", b"0x81010001", b"-", b"0x81010016"]
    assert tpm.shutdown() == 0


def test_start_without_state_is_refused(workdir):
    """An empty state directory would make swtpm invent a new TPM with a new EK: refused."""
    work = workdir()
    with pytest.raises(SwtpmError, match="manufacture it first"):
        SwtpmInstance(work / "state", work / "run").start()


def test_start_reports_why_swtpm_failed(workdir, swtpms):
    """A state libtpms cannot read makes swtpm exit; the error carries its log line."""
    work = workdir()
    (work / "state" / "tpm2-00.permall").write_bytes(os.urandom(3000))
    with pytest.raises(SwtpmError, match="exited with status .*libtpms"):
        start(work, swtpms)


def test_start_refuses_bad_socket_directories(workdir, permall, tmp_path):
    work = workdir()
    (work / "state" / "tpm2-00.permall").write_bytes(permall)
    with pytest.raises(SwtpmError, match="must not be the state directory"):
        SwtpmInstance(work / "state", work / "state").start()
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    with pytest.raises(SwtpmError, match="too long"):
        SwtpmInstance(work / "state", deep).start()
    with pytest.raises(SwtpmError, match="does not exist"):
        SwtpmInstance(work / "state", work / "nowhere").start()


def test_private_workdir_is_0700_and_in_ram_when_possible():
    path = private_workdir()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
            assert path.parent == Path("/dev/shm")
    finally:
        wipe(path)


def test_wipe_overwrites_before_removing_and_never_follows_links(tmp_path):
    """A file still open elsewhere reads back as zeros: the bytes were overwritten, not just unlinked."""
    root = tmp_path / "work"
    (root / "state").mkdir(parents=True)
    secret_file = root / "state" / "tpm2-00.permall"
    secret_file.write_bytes(b"clear TPM state" * 300)
    outside = tmp_path / "outside"
    outside.write_bytes(b"not ours")
    (root / "link").symlink_to(outside)
    (root / "dirlink").symlink_to(tmp_path)
    with open(secret_file, "rb") as still_open:
        wipe(root)
        assert still_open.read() == bytes(len(b"clear TPM state" * 300))
    assert not root.exists()
    assert outside.read_bytes() == b"not ours"
    wipe(root)  # already gone: not an error
