"""broker.host.host_tpm against real host TPMs (Debian's swtpm, driven with tpm2-tools 5.4 on
Unix sockets in private directories), checked with the broker's own verifier,
broker.attest.tpm2: the broker's credential opens only in the TPM and for the AK it
was made for, quotes verify with their host's AK and no other, PCRs and resetCount
behave as on a host that boots, reboots and is tampered with."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from broker.attest import tpm2
from broker.attest.tpm2 import QuoteError
from broker.host.host_tpm import (
    AK_HANDLE,
    DEFAULT_BOOT,
    EK_HANDLE,
    HostTpm,
    HostTpmError,
    HostTpmProcess,
    measure_boot,
)
from broker.host.swtpm import STATE_FILE, manufacture

TOOLS = (
    "swtpm",
    "swtpm_setup",
    "tpm2_createek",
    "tpm2_createak",
    "tpm2_evictcontrol",
    "tpm2_readpublic",
    "tpm2_activatecredential",
    "tpm2_quote",
    "tpm2_pcrread",
    "tpm2_pcrextend",
    "tpm2_flushcontext",
)
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"needs Debian's swtpm, swtpm-tools and tpm2-tools (apt-get install swtpm swtpm-tools tpm2-tools); "
    f"missing: {', '.join(MISSING)}",
)

BOOT_PCRS = tuple(range(8))
Host = tuple[HostTpmProcess, HostTpm]


@pytest.fixture(scope="module")
def enrolled_states(tmp_path_factory) -> dict[str, bytes]:
    """The TPM states of two hosts, "a" and "b", each manufactured and with its EK and AK
    persistent (made once: an RSA key generation takes a TPM up to a second)."""
    states = {}
    for host in ("a", "b"):
        state = tmp_path_factory.mktemp(f"host-{host}")
        manufacture(state, uuid.uuid4())
        with HostTpmProcess(state) as process:
            HostTpm(process.tcti, tmp_path_factory.mktemp(f"scratch-{host}")).ensure_keys()
        states[host] = (state / STATE_FILE).read_bytes()
    return states


@pytest.fixture
def start_host(workdir, enrolled_states) -> Iterator[Callable[..., Host]]:
    """Starts a host TPM from one of the enrolled states (or a fresh one); all are stopped at the end."""
    started: list[HostTpmProcess] = []

    def start(which: str | None = "a") -> Host:
        work: Path = workdir()
        if which is not None:
            (work / "state" / STATE_FILE).write_bytes(enrolled_states[which])
        (work / "scratch").mkdir(mode=0o700)
        process = HostTpmProcess(work / "state", work / "run")
        started.append(process)
        process.start()
        return process, HostTpm(process.tcti, work / "scratch")

    yield start
    for process in started:
        process.stop()


def booted(index: int) -> bytes:
    return hashlib.sha256(bytes(32) + hashlib.sha256(DEFAULT_BOOT[index]).digest()).digest()


def getcap(tcti: str, capability: str) -> str:
    done = subprocess.run(["tpm2_getcap", "-T", tcti, capability], capture_output=True, timeout=10, check=True)
    return done.stdout.decode()


def ak_of(tpm: HostTpm) -> tpm2.TpmPublic:
    return tpm2.parse_public(tpm.ak_public())


# --- keys ------------------------------------------------------------------------------


def test_ensure_keys_makes_persistent_keys_once_and_they_survive_a_reboot(start_host):
    """A new TPM gets its EK and AK at the TCG handles; a second call and a power cycle change nothing."""
    process, tpm = start_host(None)
    ek_pem, ak_blob = tpm.ensure_keys()
    ak = tpm2.parse_public(ak_blob)
    assert ak.attestation_key_problem() is None
    assert ak.scheme == ("rsassa", "sha256")
    assert tpm2.ek_public_from_pem(ek_pem).key_size == 2048
    assert tpm.ensure_keys() == (ek_pem, ak_blob)
    process.reboot()
    assert tpm.ensure_keys() == (ek_pem, ak_blob)
    assert (tpm.ek_public_pem(), tpm.ak_public()) == (ek_pem, ak_blob)
    handles = getcap(process.tcti, "handles-persistent")
    assert hex(EK_HANDLE) in handles and hex(AK_HANDLE) in handles
    assert getcap(process.tcti, "handles-transient").strip() == ""  # no transient copy left loaded


# --- credential ------------------------------------------------------------------------


def test_credential_made_by_the_broker_activates_in_the_real_tpm(start_host):
    """make_credential (Python) -> TPM2_ActivateCredential (swtpm) gives the secret back."""
    _, tpm = start_host("a")
    ek_pem, ak_blob = tpm.ensure_keys()
    secret = bytes(range(1, 33))
    id_object, encrypted = tpm2.make_credential(
        tpm2.ek_public_from_pem(ek_pem), tpm2.parse_public(ak_blob).name, secret
    )
    assert tpm.activate_credential(id_object, encrypted) == secret
    # A second challenge with a shorter secret works too: no session or object is left behind.
    id_object, encrypted = tpm2.make_credential(tpm2.ek_public_from_pem(ek_pem), tpm2.parse_public(ak_blob).name, b"x")
    assert tpm.activate_credential(id_object, encrypted) == b"x"


def test_credential_for_another_ak_name_does_not_activate(start_host):
    """The TPM checks the outer HMAC over the AK's Name: a credential for another key is refused."""
    _, tpm_a = start_host("a")
    _, tpm_b = start_host("b")
    other_name = ak_of(tpm_b).name
    id_object, encrypted = tpm2.make_credential(tpm2.ek_public_from_pem(tpm_a.ek_public_pem()), other_name, b"s" * 32)
    with pytest.raises(HostTpmError, match=r"^tpm2_activatecredential failed: .*integrity check failed"):
        tpm_a.activate_credential(id_object, encrypted)


def test_credential_for_another_tpms_ek_does_not_activate(start_host):
    """A credential encrypted to host b's EK, even for host a's AK Name, does not open in host a's TPM."""
    _, tpm_a = start_host("a")
    _, tpm_b = start_host("b")
    id_object, encrypted = tpm2.make_credential(
        tpm2.ek_public_from_pem(tpm_b.ek_public_pem()), ak_of(tpm_a).name, b"s" * 32
    )
    with pytest.raises(HostTpmError, match=r"^tpm2_activatecredential failed: ") as refused:
        tpm_a.activate_credential(id_object, encrypted)
    assert "\n" not in str(refused.value)


def test_malformed_credential_is_refused_before_the_tpm_sees_it(start_host):
    _, tpm = start_host("a")
    with pytest.raises(HostTpmError, match="credential is malformed"):
        tpm.activate_credential(b"\x00\x05abc", b"\x00\x01x")
    with pytest.raises(HostTpmError, match="encrypted secret is malformed"):
        tpm.activate_credential(b"\x00\x01x", b"")


# --- quotes ----------------------------------------------------------------------------


def test_quote_verifies_with_the_hosts_ak_and_covers_the_values_returned(start_host):
    """A booted host's quote: signature, nonce and PCR digest all check out, and the values are the boot's."""
    _, tpm = start_host("a")
    measure_boot(tpm)
    nonce = bytes(range(32))
    attest, signature, values = tpm.quote(nonce, "sha256", BOOT_PCRS)
    quote = tpm2.verify_quote(ak_of(tpm), attest, signature)
    assert quote.extra_data == nonce
    assert (quote.pcr_bank, quote.pcrs) == ("sha256", BOOT_PCRS)
    assert sorted(values) == list(BOOT_PCRS)
    assert tpm2.pcr_digest("sha256", [values[i] for i in BOOT_PCRS]) == quote.pcr_digest
    assert values == {i: booted(i) for i in BOOT_PCRS}
    assert tpm.pcr_read("sha256", BOOT_PCRS) == values


def test_quote_checked_with_another_tpms_ak_fails(start_host):
    _, tpm_a = start_host("a")
    _, tpm_b = start_host("b")
    attest, signature, _ = tpm_a.quote(b"nonce", "sha256", BOOT_PCRS)
    with pytest.raises(QuoteError, match="does not verify with the host's attestation key"):
        tpm2.verify_quote(ak_of(tpm_b), attest, signature)


def test_quote_with_a_flipped_byte_fails(start_host):
    _, tpm = start_host("a")
    attest, signature, _ = tpm.quote(b"nonce", "sha256", BOOT_PCRS)
    ak = ak_of(tpm)
    tpm2.verify_quote(ak, attest, signature)
    changed = bytearray(attest)
    changed[-1] ^= 0x01  # the last byte of the PCR digest
    with pytest.raises(QuoteError, match="does not verify"):
        tpm2.verify_quote(ak, bytes(changed), signature)


def test_pcr_extend_changes_the_value_and_the_quoted_digest(start_host):
    """One more measurement into PCR 7 (a tampered boot) is visible in the value and in the quote."""
    _, tpm = start_host("a")
    measure_boot(tpm)
    golden = tpm.pcr_read("sha256", BOOT_PCRS)
    before = tpm2.parse_quote(tpm.quote(b"n1", "sha256", BOOT_PCRS)[0])
    measurement = hashlib.sha256(b"unexpected bootloader").digest()
    tpm.pcr_extend(7, "sha256", measurement)
    after = tpm.pcr_read("sha256", BOOT_PCRS)
    assert after[7] == hashlib.sha256(golden[7] + measurement).digest()
    assert {i: after[i] for i in range(7)} == {i: golden[i] for i in range(7)}
    attest, signature, values = tpm.quote(b"n2", "sha256", BOOT_PCRS)
    quote = tpm2.verify_quote(ak_of(tpm), attest, signature)
    assert values == after
    assert quote.pcr_digest != before.pcr_digest
    assert quote.pcr_digest != tpm2.pcr_digest("sha256", [golden[i] for i in BOOT_PCRS])


def test_reboot_resets_pcrs_and_grows_reset_count_and_keeps_the_keys(start_host):
    process, tpm = start_host("a")
    ek_pem, ak = tpm.ek_public_pem(), ak_of(tpm)
    measure_boot(tpm)
    before = tpm2.verify_quote(ak, *tpm.quote(b"before", "sha256", BOOT_PCRS)[:2])
    process.reboot()
    attest, signature, values = tpm.quote(b"after", "sha256", BOOT_PCRS)
    after = tpm2.verify_quote(ak, attest, signature)  # the AK enrolled before the reboot still verifies
    assert after.reset_count > before.reset_count
    assert values == {i: bytes(32) for i in BOOT_PCRS}
    assert tpm.ek_public_pem() == ek_pem
    assert ak_of(tpm).name == ak.name


class RacingHostTpm(HostTpm):
    """Extends PCR 7 in the gap tpm2_quote leaves between TPM2_Quote and its PCR read, `races` times:
    the race a boot-time measurement can cause, made to happen on demand."""

    races = 0

    def _run(self, tool: str, *args: str) -> bytes:
        if tool != "tpm2_quote" or self.races == 0:
            return super()._run(tool, *args)
        self.races -= 1
        pcr_file = Path(args[args.index("-o") + 1])
        out = super()._run(tool, *args)
        super()._run("tpm2_pcrextend", f"7:sha256={hashlib.sha256(b'late measurement').hexdigest()}")
        super()._run("tpm2_pcrread", "sha256:" + ",".join(map(str, BOOT_PCRS)), "-o", str(pcr_file))
        return out


def test_quote_retries_when_a_pcr_moves_between_the_quote_and_the_read(start_host):
    """The values returned are always the ones the quote covers; a TPM that never settles is an error."""
    process, tpm = start_host("a")
    racing = RacingHostTpm(process.tcti, tpm.workdir)
    racing.races = 2
    attest, signature, values = racing.quote(b"n", "sha256", BOOT_PCRS)
    quote = tpm2.verify_quote(ak_of(tpm), attest, signature)
    assert racing.races == 0
    assert tpm2.pcr_digest("sha256", [values[i] for i in BOOT_PCRS]) == quote.pcr_digest
    assert values == tpm.pcr_read("sha256", BOOT_PCRS)
    racing.races = 3
    with pytest.raises(HostTpmError, match="the PCRs changed during each of 3 quotes"):
        racing.quote(b"n", "sha256", BOOT_PCRS)


def test_two_hosts_booted_alike_have_equal_pcrs_and_different_eks(start_host):
    _, tpm_a = start_host("a")
    _, tpm_b = start_host("b")
    for tpm in (tpm_a, tpm_b):
        measure_boot(tpm)
    golden = tpm_a.pcr_read("sha256", BOOT_PCRS)
    assert tpm_b.pcr_read("sha256", BOOT_PCRS) == golden
    assert golden == {i: booted(i) for i in BOOT_PCRS}
    assert tpm_a.ek_public_pem() != tpm_b.ek_public_pem()
    assert ak_of(tpm_a).name != ak_of(tpm_b).name


# --- bad input and failures ------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda tpm: tpm.quote(b"", "sha256", BOOT_PCRS), "nonce must be 1 to 64 bytes"),
        (lambda tpm: tpm.quote(bytes(65), "sha256", BOOT_PCRS), "nonce must be 1 to 64 bytes"),
        (lambda tpm: tpm.quote(b"n", "md5", BOOT_PCRS), "unknown PCR bank"),
        (lambda tpm: tpm.quote(b"n", "sha256", []), "PCR selection"),
        (lambda tpm: tpm.pcr_read("sha256", [0, 0]), "PCR selection"),
        (lambda tpm: tpm.pcr_read("sha256", [24]), "PCR selection"),
        (lambda tpm: tpm.pcr_extend(7, "sha256", bytes(20)), "sha256 measurement is 32 bytes, not 20"),
        (lambda tpm: measure_boot(tpm, components=[b"x"] * 9), "at most 8 components"),
        (lambda tpm: tpm.pcr_read("sha1", BOOT_PCRS), "is its sha1 bank active"),  # swtpm_setup activated sha256 only
        (lambda tpm: tpm.quote(b"n", "sha384", BOOT_PCRS), "is its sha384 bank active"),
    ],
)
def test_bad_arguments_are_one_line_errors(start_host, call, match):
    _, tpm = start_host("a")
    with pytest.raises(HostTpmError, match=match) as refused:
        call(tpm)
    assert "\n" not in str(refused.value)


def test_a_tool_failure_names_the_tool_and_its_error(tmp_path):
    """No TPM behind the socket: the message names tpm2_getcap and the TCTI's complaint, in one line."""
    tpm = HostTpm(f"swtpm:path={tmp_path / 'absent.sock'}", tmp_path / "scratch")
    with pytest.raises(HostTpmError, match=r"^tpm2_getcap failed: .*tcti") as failed:
        tpm.ensure_keys()
    assert "\n" not in str(failed.value)


def test_an_unusable_scratch_directory_is_a_one_line_error(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    tpm = HostTpm("swtpm:path=/nonexistent.sock", tmp_path / "file" / "scratch")
    with pytest.raises(HostTpmError, match="no scratch directory for the host TPM"):
        tpm.ak_public()


def test_process_with_private_socket_dir_starts_stops_and_cleans_up(workdir):
    """Without a socket directory the process makes a private one and removes it at stop."""
    work = workdir()
    with HostTpmProcess(work / "state") as process:
        socket = Path(process.tcti.removeprefix("swtpm:path="))
        assert socket.exists()
        assert (work / "state" / STATE_FILE).is_file()  # manufactured on first start
        assert process.running
    assert not socket.parent.exists()
    assert not process.running
    process.stop()  # a second stop is harmless
    with pytest.raises(HostTpmError, match="never started"):
        _ = process.tcti
