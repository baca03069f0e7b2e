"""The host's side of host attestation (issue 18): its own TPM proves what it booted.

A hypervisor host has a TPM of its own, distinct from its VMs' vTPMs. This
module drives it with tpm2-tools 5.4 over a TCTI (``swtpm:path=...`` in tests
and the drill, ``device:/dev/tpmrm0`` on a real host):

- `HostTpm.ensure_keys` makes the host's keys once and persists them, so they
  survive a reboot: the RSA endorsement key of the TCG default template at
  `EK_HANDLE` (tpm2_createek) and, under it, an RSA attestation key that only
  signs what the TPM itself generated (tpm2_createak: restricted, sign,
  RSASSA-SHA256) at `AK_HANDLE`.
- `HostTpm.activate_credential` answers the broker's TPM2_MakeCredential
  challenge: the TPM opens it only if it holds the EK it was made for and the
  AK it names, which is how the broker learns that the AK lives in that TPM.
- `HostTpm.quote` is a fresh TPM2_Quote with the broker's nonce over a PCR
  selection, with the PCR values it covers.

`HostTpmProcess` runs a host TPM on swtpm with persistent state (power on,
power cycle, power off) and `measure_boot` plays a boot's measurements into
PCRs 0-7, for tests and the drill.

swtpm has no resource manager in front of it, so a transient object a tool
loads stays loaded after the tool exits; `ensure_keys` flushes them (the
host's keys are persistent and need no transient copy). Every call holds
the instance's lock, so one HostTpm never interleaves its own tool runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import rsa

from broker.attest.tpm2 import (
    Tpm2Error,
    TpmPublic,
    digest_size,
    parse_public,
    parse_quote,
    pcr_digest,
)
from broker.host.errors import HostError
from broker.host.swtpm import STATE_FILE, SwtpmError, SwtpmInstance, manufacture, private_workdir, wipe

__all__ = [
    "AK_HANDLE",
    "DEFAULT_BOOT",
    "EK_HANDLE",
    "HostTpm",
    "HostTpmError",
    "HostTpmProcess",
    "measure_boot",
]

EK_HANDLE = 0x81010001  # TCG: the RSA 2048 EK's persistent handle
# The owner range (TCG "Registry of Reserved TPM 2.0 Handles": 0x81000000-
# 0x8100FFFF): 0x81010002 and the rest of 0x8101xxxx are the endorsement
# hierarchy's (an ECC EK lives at 0x81010002 on many platforms).
AK_HANDLE = 0x81000102
_TIMEOUT = 30
_QUOTE_TRIES = 3
_MAX_NONCE = 64  # TPM2B_DATA holds a TPMT_HA: a SHA-512 digest at most
_PCR_COUNT = 24
# TCG EK Credential Profile 2.0, B.3.3 template L-1: the RSA 2048 EK's attributes
# (fixedTPM, fixedParent, sensitiveDataOrigin, adminWithPolicy, restricted, decrypt)
# and its authPolicy, PolicySecret(TPM_RH_ENDORSEMENT).
_EK_ATTRIBUTES = 0x000300B2
_EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
# What a PC's firmware measures into PCRs 0-7 (TCG PC Client Platform Firmware Profile, 3.3.4).
DEFAULT_BOOT: tuple[bytes, ...] = (
    b"firmware",
    b"firmware-configuration",
    b"option-roms",
    b"option-rom-configuration",
    b"bootloader",
    b"bootloader-configuration",
    b"platform-state",
    b"secure-boot-policy",
)


class HostTpmError(HostError):
    """A host TPM operation failed: one line naming the tpm2 tool and what it said."""


class HostTpm:
    """The host's TPM, reached with tpm2-tools over `tcti`; `workdir` is a private directory for scratch files."""

    def __init__(self, tcti: str, workdir: str | os.PathLike[str]) -> None:
        self.tcti = tcti
        self.workdir = Path(workdir)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HostTpm(tcti={self.tcti!r})"

    # --- keys ---

    def ensure_keys(self) -> tuple[bytes, bytes]:
        """Create and persist the EK and the AK unless they already are; (EK public key PEM, AK TPM2B_PUBLIC).

        Idempotent: a TPM whose keys are persistent keeps them (and so the
        broker's enrollment of them stays valid across reboots and restarts).
        """
        with self._lock, self._scratch() as scratch:
            try:
                persistent = self._persistent_handles()
                if EK_HANDLE not in persistent:
                    self._run("tpm2_createek", "-c", hex(EK_HANDLE), "-G", "rsa", "-u", str(scratch / "ek.pub"))
                ek = self._endorsement_key(scratch)
                if AK_HANDLE not in persistent:
                    ctx = str(scratch / "ak.ctx")
                    self._run(
                        "tpm2_createak",
                        "-C",
                        hex(EK_HANDLE),
                        "-c",
                        ctx,
                        "-G",
                        "rsa",
                        "-g",
                        "sha256",
                        "-s",
                        "rsassa",
                        "-u",
                        str(scratch / "ak.pub"),
                    )
                    self._run("tpm2_evictcontrol", "-C", "o", "-c", ctx, hex(AK_HANDLE))
                ak_public = self._attestation_key(scratch)
            except HostTpmError:
                with contextlib.suppress(HostTpmError):  # The first failure is the one to report.
                    self._flush_transient()
                raise
            self._flush_transient()
        return ek.public_pem(), ak_public

    def ek_public_pem(self) -> bytes:
        """The persistent EK's public key, PEM (SubjectPublicKeyInfo)."""
        with self._lock, self._scratch() as scratch:
            return self._endorsement_key(scratch).public_pem()

    def ak_public(self) -> bytes:
        """The persistent AK's TPM2B_PUBLIC, as tpm2_readpublic writes it."""
        with self._lock, self._scratch() as scratch:
            return self._attestation_key(scratch)

    def _read_public(self, handle: int, scratch: Path) -> tuple[bytes, TpmPublic]:
        out = scratch / f"{handle:08x}.pub"
        self._run("tpm2_readpublic", "-c", hex(handle), "-o", str(out))
        blob = out.read_bytes()
        try:
            return blob, parse_public(blob)
        except Tpm2Error as exc:
            raise HostTpmError(f"the key at {handle:#010x} does not parse ({exc})") from None

    def _endorsement_key(self, scratch: Path) -> TpmPublic:
        _, ek = self._read_public(EK_HANDLE, scratch)
        if (
            not isinstance(ek.public_key, rsa.RSAPublicKey)
            or ek.public_key.key_size != 2048
            or ek.name_alg != "sha256"
            or ek.object_attributes != _EK_ATTRIBUTES
            or ek.auth_policy != _EK_POLICY
            or ek.symmetric != ("aes", 128, "cfb")
        ):
            raise HostTpmError(
                f"the key at {EK_HANDLE:#010x} is not an RSA 2048 EK of the TCG default template; "
                "evict it (tpm2_evictcontrol) and run again"
            )
        return ek

    def _attestation_key(self, scratch: Path) -> bytes:
        blob, ak = self._read_public(AK_HANDLE, scratch)
        problem = ak.attestation_key_problem()
        if problem:
            raise HostTpmError(f"the key at {AK_HANDLE:#010x} is {problem}; evict it (tpm2_evictcontrol) and run again")
        return blob

    # --- credential ---

    def activate_credential(self, id_object: bytes, encrypted_secret: bytes) -> bytes:
        """The secret of a credential the broker made for this TPM's EK and AK (TPM2_ActivateCredential).

        `id_object` and `encrypted_secret` are the TPM2B_ID_OBJECT and
        TPM2B_ENCRYPTED_SECRET that `broker.attest.tpm2.make_credential`
        returns. The EK's policy is satisfied with a PolicySecret(endorsement)
        session. HostTpmError when the TPM refuses: made for another EK or AK.
        """
        for what, blob in (("credential", id_object), ("encrypted secret", encrypted_secret)):
            if len(blob) < 2 or int.from_bytes(blob[:2], "big") != len(blob) - 2:
                raise HostTpmError(f"the broker's {what} is malformed: its size field does not match its length")
        with self._lock, self._scratch() as scratch:
            # tpm2-tools' credential file: magic 0xBADCC0DE, version 1, then the two TPM2B structures.
            cred = scratch / "credential"
            cred.write_bytes(b"\xba\xdc\xc0\xde" + (1).to_bytes(4, "big") + id_object + encrypted_secret)
            session = str(scratch / "session.ctx")
            out = scratch / "secret"
            self._run("tpm2_startauthsession", "--policy-session", "-S", session)
            try:
                self._run("tpm2_policysecret", "-S", session, "-c", "e")
                self._run(
                    "tpm2_activatecredential",
                    "-c",
                    hex(AK_HANDLE),
                    "-C",
                    hex(EK_HANDLE),
                    "-i",
                    str(cred),
                    "-o",
                    str(out),
                    "-P",
                    f"session:{session}",
                )
            finally:
                # The session may be gone already; a leftover one is flushed at the next reboot.
                with contextlib.suppress(HostTpmError):
                    self._run("tpm2_flushcontext", session)
            return out.read_bytes()

    # --- PCRs and quotes ---

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> tuple[bytes, bytes, dict[int, bytes]]:
        """A fresh TPM2_Quote with the AK over `bank`:`pcrs`, qualifying data `nonce`:
        (TPMS_ATTEST, TPMT_SIGNATURE, {PCR index: value}) with the values the quote covers."""
        if not 1 <= len(nonce) <= _MAX_NONCE:
            raise HostTpmError(f"the nonce must be 1 to {_MAX_NONCE} bytes, not {len(nonce)}")
        selection = _selection(bank, pcrs)
        with self._lock, self._scratch() as scratch:
            nonce_file = scratch / "nonce"
            nonce_file.write_bytes(nonce)
            attest_file, sig_file, pcr_file = scratch / "attest", scratch / "signature", scratch / "pcrs"
            for _ in range(_QUOTE_TRIES):
                self._run(
                    "tpm2_quote",
                    "-c",
                    hex(AK_HANDLE),
                    "-l",
                    selection,
                    "-q",
                    str(nonce_file.resolve()),
                    "-g",
                    "sha256",
                    "-m",
                    str(attest_file),
                    "-s",
                    str(sig_file),
                    "-o",
                    str(pcr_file),
                    "-F",
                    "values",
                )
                attest = attest_file.read_bytes()
                values = _split_values(bank, pcrs, pcr_file.read_bytes(), "tpm2_quote")
                try:
                    quoted = parse_quote(attest)
                except Tpm2Error as exc:
                    raise HostTpmError(f"tpm2_quote wrote a quote that does not parse ({exc})") from None
                # tpm2_quote reads the PCRs after the quote: a PCR extended in between would not match.
                if pcr_digest(bank, [values[i] for i in sorted(values)]) == quoted.pcr_digest:
                    return attest, sig_file.read_bytes(), values
        raise HostTpmError(f"the PCRs changed during each of {_QUOTE_TRIES} quotes; is something extending them?")

    def pcr_read(self, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
        """{PCR index: value} of `bank`:`pcrs` now."""
        selection = _selection(bank, pcrs)
        with self._lock, self._scratch() as scratch:
            out = scratch / "pcrs"
            self._run("tpm2_pcrread", selection, "-o", str(out))
            return _split_values(bank, pcrs, out.read_bytes(), "tpm2_pcrread")

    def pcr_extend(self, index: int, bank: str, digest: bytes) -> None:
        """Extend PCR `index` of `bank` with `digest` (a measurement; a digest of the bank's size)."""
        _selection(bank, [index])
        if len(digest) != digest_size(bank):
            raise HostTpmError(f"a {bank} measurement is {digest_size(bank)} bytes, not {len(digest)}")
        with self._lock:
            self._run("tpm2_pcrextend", f"{index}:{bank}={digest.hex()}")

    # --- internals ---

    @contextlib.contextmanager
    def _scratch(self) -> Iterator[Path]:
        try:
            self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
            scratch = tempfile.TemporaryDirectory(prefix="host-tpm-", dir=self.workdir)
        except OSError as exc:
            raise HostTpmError(f"no scratch directory for the host TPM in {self.workdir} ({exc.strerror})") from None
        with scratch as path:
            yield Path(path)

    def _persistent_handles(self) -> set[int]:
        listing = self._run("tpm2_getcap", "handles-persistent").decode(errors="replace")
        return {int(h, 16) for h in re.findall(r"0x[0-9a-fA-F]+", listing)}

    def _flush_transient(self) -> None:
        self._run("tpm2_flushcontext", "-t")

    def _run(self, tool: str, *args: str) -> bytes:
        try:
            done = subprocess.run(
                [tool, "-T", self.tcti, *args],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_TIMEOUT,
                check=False,
            )
        except FileNotFoundError:
            raise HostTpmError(f"{tool} not found: install Debian's tpm2-tools package") from None
        except subprocess.TimeoutExpired:
            raise HostTpmError(f"{tool} did not finish within {_TIMEOUT} s; is the host TPM busy?") from None
        if done.returncode != 0:
            raise HostTpmError(f"{tool} failed: {_last_error(done.stderr, done.returncode)}")
        return done.stdout


def _last_error(stderr: bytes, status: int) -> str:
    """The line of a tool's stderr that says why: its last ERROR line other than the closing
    'Unable to run', else its last line."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:") and "Unable to run" not in line]
    if errors:
        return errors[-1].removeprefix("ERROR:").strip()
    return lines[-1] if lines else f"exit status {status}"


def _selection(bank: str, pcrs: Sequence[int]) -> str:
    try:
        digest_size(bank)
    except Tpm2Error as exc:
        raise HostTpmError(str(exc)) from None
    indices = list(pcrs)
    if not indices or len(set(indices)) != len(indices) or any(not 0 <= i < _PCR_COUNT for i in indices):
        raise HostTpmError(f"the PCR selection must be distinct indices 0 to {_PCR_COUNT - 1}, not {indices}")
    return f"{bank}:{','.join(str(i) for i in sorted(indices))}"


def _split_values(bank: str, pcrs: Sequence[int], blob: bytes, tool: str) -> dict[int, bytes]:
    size = digest_size(bank)
    indices = sorted(pcrs)
    if not blob:
        raise HostTpmError(
            f"the TPM has no {bank} values for PCRs {indices}: is its {bank} bank active? (tpm2_pcrread)"
        )
    if len(blob) != size * len(indices):
        raise HostTpmError(f"{tool} wrote {len(blob)} bytes of PCR values for {len(indices)} {bank} PCRs")
    return {index: blob[n * size : (n + 1) * size] for n, index in enumerate(indices)}


def measure_boot(tpm: HostTpm, bank: str = "sha256", components: Sequence[bytes] = DEFAULT_BOOT) -> None:
    """Play a boot's measurements: PCR i is extended with H_bank(components[i]), for PCRs 0-7.

    Two hosts booted with the same components have the same PCRs 0-7 (a
    golden set); one more extension of any of them simulates a tampered boot.
    """
    if len(components) > 8:
        raise HostTpmError(f"a boot measures into PCRs 0-7: at most 8 components, not {len(components)}")
    for index, component in enumerate(components):
        tpm.pcr_extend(index, bank, hashlib.new(bank, component).digest())


class HostTpmProcess:
    """A host's TPM on swtpm with its persistent state in `state_dir`: power on, power cycle, power off.

    A `state_dir` without TPM state is manufactured first (swtpm_setup, with an
    RSA EK at `EK_HANDLE`), as a host's TPM comes from its maker. The sockets
    live in `socket_dir`, or in a private directory made at `start` and
    removed at `stop`. Use it as a context manager, or call `stop`.
    """

    def __init__(self, state_dir: str | os.PathLike[str], socket_dir: str | os.PathLike[str] | None = None) -> None:
        self.state_dir = Path(state_dir)
        self._given_socket_dir = Path(socket_dir) if socket_dir is not None else None
        self._socket_dir: Path | None = None
        self._swtpm: SwtpmInstance | None = None

    def __repr__(self) -> str:
        return f"HostTpmProcess(state_dir={str(self.state_dir)!r}, running={self.running})"

    @property
    def running(self) -> bool:
        return self._swtpm is not None and self._swtpm.running

    @property
    def tcti(self) -> str:
        if self._swtpm is None:
            raise HostTpmError("the host TPM was never started")
        return self._swtpm.tcti

    def start(self) -> None:
        """Power on: swtpm starts and sends itself TPM2_Startup(CLEAR), so the PCRs hold their reset values."""
        if self.running:
            raise HostTpmError(f"the host TPM in {self.state_dir} already runs")
        try:
            if not (self.state_dir / STATE_FILE).is_file():
                self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
                manufacture(self.state_dir, uuid.uuid4())
            if self._swtpm is None:
                self._socket_dir = self._given_socket_dir or private_workdir(prefix="host-tpm-")
                self._swtpm = SwtpmInstance(self.state_dir, self._socket_dir, startup="clear")
            self._swtpm.start()
        except SwtpmError as exc:
            raise HostTpmError(f"the host TPM did not start: {exc}") from None

    def reboot(self) -> None:
        """Power cycle: TPM2_Shutdown(CLEAR), stop, start with TPM2_Startup(CLEAR): a TPM Reset, so
        resetCount grows and the PCRs are reset; persistent keys stay."""
        swtpm = self._swtpm
        if swtpm is None or not swtpm.running:
            raise HostTpmError("the host TPM does not run")
        try:
            swtpm.shutdown("clear")
            swtpm.start()
        except SwtpmError as exc:
            raise HostTpmError(f"the host TPM did not reboot: {exc}") from None

    def stop(self) -> None:
        """Power off in an orderly way (swtpm is killed if that fails); safe to call more than once."""
        swtpm = self._swtpm
        if swtpm is None:
            return
        try:
            if swtpm.running:
                swtpm.shutdown("clear")
        except SwtpmError:
            swtpm.kill()
        finally:
            if self._given_socket_dir is None and self._socket_dir is not None:
                wipe(self._socket_dir)
            self._swtpm = None
            self._socket_dir = None

    def __enter__(self) -> HostTpmProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
