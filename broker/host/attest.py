"""Host attestation, the host's side (issue 18; the protocol: docs/attestation.md).

The broker lets a host unwrap its VMs' keys only while the host proves, with
its own TPM (the host TPM, not a VM's vTPM), that it booted what it should.
The host's part, over the management API with its host certificate:

- enrollment, once (after the security administrator pinned the host's EK
  public key at the broker): the host creates its EK and an attestation key
  (AK) under it, sends both; the broker answers with a TPM2_MakeCredential for
  the AK's name under the EK; only the TPM holding that EK can recover the
  secret (TPM2_ActivateCredential), which proves the AK lives in it (`enroll`);
- attestation, before unwraps: a fresh nonce and PCR selection from the
  broker, a TPM2_Quote over them with the AK, and the broker's answer, a
  short-lived token (`attest`), or none when no attestation policy covers the
  host;
- the token travels with each KMIP Decrypt to the gateway as a Ticket
  credential (`broker.host.broker_client.BrokerClient.unwrap`).

`TokenCache` keeps the token in memory and in ``<state_dir>/attestation/
token.json`` (mode 0600), so that successive `vtpm-host power-on` processes
reuse a valid token instead of quoting each time; a token read back is
dropped once expired. The token is a bearer credential for this host's
unwraps: it is never logged or put into a message.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from broker.attest import tpm2
from broker.host.errors import HostError
from kmip_core.files import write_atomic

__all__ = [
    "Attestation",
    "AttestationApi",
    "AttestationStatus",
    "AttestingTpm",
    "Challenge",
    "Enrollment",
    "TokenCache",
    "attest",
    "attestation_status",
    "ek_fingerprint",
    "enroll",
    "open_host_tpm",
    "read_enrollment",
]

TOKEN_FILE = "token.json"
LOCK_FILE = "lock"
ENROLLED_FILE = "enrolled.json"
TPM_WORKDIR = "tpm"
FILE_VERSION = 1
# A token this close to its end is not presented: it could expire on its way
# to the gateway, and a refusal costs more than a new quote.
EXPIRY_MARGIN = 5.0


@dataclass(frozen=True)
class Challenge:
    """The broker's challenge: quote these PCRs of this bank with this nonce."""

    nonce: bytes
    pcr_bank: str
    pcrs: tuple[int, ...]
    expires_in: int


@dataclass(frozen=True)
class Attestation:
    """The broker's answer to a quote. `token` None: no attestation policy
    covers this host, so its unwraps need no token. `expires_at` is on this
    host's clock (seconds since the epoch), taken from the broker's
    `expires_in` so that a skew between the two clocks does not matter."""

    token: str | None
    expires_at: float | None
    policy: str | None

    def __repr__(self) -> str:  # The token is a credential: never in a repr.
        token = None if self.token is None else f"str[{len(self.token)}]"
        return f"Attestation(token={token}, expires_at={self.expires_at!r}, policy={self.policy!r})"

    def usable_at(self, now: float) -> bool:
        """A token that may still be presented at `now` (or no token needed)."""
        if self.token is None:
            return True
        return self.expires_at is not None and now < self.expires_at - EXPIRY_MARGIN


class AttestationApi(Protocol):
    """The broker's attestation calls (`BrokerClient`; a fake in unit tests)."""

    def attestation_enroll(self, ek_public_pem: bytes, ak_public: bytes) -> tuple[bytes, bytes]: ...

    def attestation_activate(self, secret: bytes) -> str: ...

    def attestation_challenge(self) -> Challenge: ...

    def attestation_quote(
        self, nonce: bytes, attest: bytes, signature: bytes, pcr_values: Mapping[int, bytes]
    ) -> Attestation: ...


class AttestingTpm(Protocol):
    """What the flows need of the host TPM (`broker.host.host_tpm.HostTpm`).
    Failures are `HostError`s (`open_host_tpm` wraps the real one)."""

    def ensure_keys(self) -> tuple[bytes, bytes]: ...

    def ek_public_pem(self) -> bytes: ...

    def activate_credential(self, id_object: bytes, encrypted_secret: bytes) -> bytes: ...

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> tuple[bytes, bytes, dict[int, bytes]]: ...


# --- The flows ------------------------------------------------------------------------------


def enroll(broker_client: AttestationApi, tpm: AttestingTpm, directory: Path | None = None) -> str:
    """Enroll the host TPM's AK at the broker; returns the AK's name (hex).

    The EK and AK are created (and made persistent) if the TPM has none yet.
    With `directory` (the state directory's attestation/), the enrollment is
    recorded there for `attest status`, and any cached token is dropped: the
    broker attests with the new AK from now on."""
    ek_public_pem, ak_public = tpm.ensure_keys()
    id_object, encrypted_secret = broker_client.attestation_enroll(ek_public_pem, ak_public)
    secret = tpm.activate_credential(id_object, encrypted_secret)
    ak_name_hex = broker_client.attestation_activate(secret)
    if directory is not None:
        TokenCache(directory).drop()
        record = {
            "version": FILE_VERSION,
            "ak_name_hex": ak_name_hex,
            "ek_fingerprint": ek_fingerprint(ek_public_pem),
            "enrolled_at": time.time(),
        }
        _private_dir(directory)
        write_atomic(directory / ENROLLED_FILE, json.dumps(record).encode(), 0o600)
    return ak_name_hex


def attest(broker_client: AttestationApi, tpm: AttestingTpm) -> Attestation:
    """Attest now: the broker's challenge, a quote of the host TPM over it, the broker's verdict.

    A refusal (the PCRs differ from the policy's, the TPM is not enrolled or
    revoked...) is the `BrokerRefused` the client raises, one line."""
    challenge = broker_client.attestation_challenge()
    attest_bytes, signature, values = tpm.quote(challenge.nonce, challenge.pcr_bank, challenge.pcrs)
    missing = [index for index in challenge.pcrs if index not in values]
    if missing:
        raise HostError(
            f"the host TPM's quote lacks {challenge.pcr_bank} PCR {', '.join(map(str, missing))} the broker asked for; "
            "check that the bank is active in the host TPM"
        )
    return broker_client.attestation_quote(
        challenge.nonce, attest_bytes, signature, {index: values[index] for index in challenge.pcrs}
    )


# --- The token cache ------------------------------------------------------------------------


class TokenCache:
    """The last attestation, in memory and, when `directory` is given, in
    ``directory/token.json`` (mode 0600) for the next processes of this host.

    `binding` names the broker and host the token is for (e.g. "host@api"):
    a file written for another one is ignored. An answer without a token (no
    policy covers the host) is kept in memory only: a policy set later makes
    the gateway refuse, and the client attests then. `clock` is the host's
    clock (time.time), injected by tests."""

    def __init__(self, directory: Path | None, *, binding: str = "", clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self.binding = binding
        self.clock = clock
        self._memory: Attestation | None = None

    @property
    def path(self) -> Path | None:
        return None if self.directory is None else self.directory / TOKEN_FILE

    def get(self) -> Attestation | None:
        """The attestation to present now, or None (none, or expired)."""
        now = self.clock()
        if self._memory is not None:
            if self._memory.usable_at(now):
                return self._memory
            self._memory = None
        stored = self._read()
        if stored is None:
            return None
        if not stored.usable_at(now):
            self._remove_file()
            return None
        self._memory = stored
        return stored

    def put(self, attestation: Attestation) -> None:
        self._memory = attestation
        if self.directory is None:
            return
        if attestation.token is None or attestation.expires_at is None:
            self._remove_file()
            return
        record = {
            "version": FILE_VERSION,
            "binding": self.binding,
            "token": attestation.token,
            "expires_at": attestation.expires_at,
            "policy": attestation.policy,
        }
        _private_dir(self.directory)
        write_atomic(self.directory / TOKEN_FILE, json.dumps(record).encode(), 0o600)

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Held while this host attests: one attestation at a time across
        the host's processes (``directory/lock``, flock). Power-ons that
        start together would otherwise drive the host TPM at once (it has
        no resource manager under swtpm) and race their quotes to the
        broker, which refuses the older one. In memory only: a no-op."""
        if self.directory is None:
            yield
            return
        _private_dir(self.directory)
        with open(self.directory / LOCK_FILE, "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def drop(self) -> None:
        """Forget the token (the gateway refused it, or the AK changed)."""
        self._memory = None
        self._remove_file()

    def stored(self) -> Attestation | None:
        """What the file holds (expired or not), for `attest status`."""
        return self._read()

    def _read(self) -> Attestation | None:
        path = self.path
        if path is None:
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return None  # Unreadable or torn: attesting again costs one quote.
        if not isinstance(data, dict) or data.get("version") != FILE_VERSION or data.get("binding") != self.binding:
            return None
        token, expires_at, policy = data.get("token"), data.get("expires_at"), data.get("policy")
        if (
            not isinstance(token, str)
            or not token
            or isinstance(expires_at, bool)
            or not isinstance(expires_at, int | float)
            or not (policy is None or isinstance(policy, str))
        ):
            return None
        return Attestation(token, float(expires_at), policy)

    def _remove_file(self) -> None:
        path = self.path
        if path is not None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _private_dir(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)


# --- The host TPM and status ----------------------------------------------------------------


def ek_fingerprint(ek_public_pem: bytes) -> str:
    """Hex SHA-256 of the EK's SubjectPublicKeyInfo (DER), as the broker shows it."""
    try:
        key = tpm2.ek_public_from_pem(ek_public_pem)
    except tpm2.Tpm2Error as exc:
        raise HostError(f"the host TPM's EK public key does not load ({exc})") from None
    return tpm2.spki_fingerprint(key)


class _CheckedTpm:
    """The real host TPM, its failures turned into one-line `HostError`s."""

    def __init__(self, tpm: Any, tcti: str) -> None:
        self._tpm = tpm
        self.tcti = tcti

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[None]:
        from broker.host.host_tpm import HostTpmError

        try:
            yield
        except HostTpmError as exc:
            raise HostError(
                f"the host TPM ({self.tcti}) could not {what}: {' '.join(str(exc).split())}; "
                "check the TPM and [attestation] tcti in config.toml"
            ) from None

    def ensure_keys(self) -> tuple[bytes, bytes]:
        with self._step("create or read its EK and attestation key"):
            return self._tpm.ensure_keys()

    def ek_public_pem(self) -> bytes:
        with self._step("read its EK"):
            return self._tpm.ek_public_pem()

    def activate_credential(self, id_object: bytes, encrypted_secret: bytes) -> bytes:
        with self._step("activate the broker's credential (is the EK the one pinned at the broker?)"):
            return self._tpm.activate_credential(id_object, encrypted_secret)

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> tuple[bytes, bytes, dict[int, bytes]]:
        with self._step(f"quote {bank} PCRs {','.join(map(str, pcrs))}"):
            return self._tpm.quote(nonce, bank, pcrs)


def open_host_tpm(tcti: str, directory: Path) -> AttestingTpm:
    """The host TPM at `tcti`, with its scratch files in `directory`/tpm (mode 0700)."""
    from broker.host.host_tpm import HostTpm

    workdir = directory / TPM_WORKDIR
    _private_dir(directory)
    _private_dir(workdir)
    return _CheckedTpm(HostTpm(tcti, workdir), tcti)


@dataclass(frozen=True)
class Enrollment:
    ak_name_hex: str
    ek_fingerprint: str
    enrolled_at: float


def read_enrollment(directory: Path) -> Enrollment | None:
    """The enrollment this host recorded (`enroll`), or None."""
    try:
        data = json.loads((directory / ENROLLED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    name, fingerprint, when = data.get("ak_name_hex"), data.get("ek_fingerprint"), data.get("enrolled_at")
    if not isinstance(name, str) or not isinstance(fingerprint, str) or not isinstance(when, int | float):
        return None
    return Enrollment(name, fingerprint, float(when))


@dataclass(frozen=True)
class AttestationStatus:
    """What this host knows of its attestation (`vtpm-host attest status`)."""

    tcti: str | None
    ek_fingerprint: str | None
    tpm_error: str | None
    enrolled: bool
    ak_name_hex: str | None
    enrolled_at: float | None
    token_expires_at: float | None
    token_valid: bool
    policy: str | None


def attestation_status(
    tcti: str | None, directory: Path, tpm: AttestingTpm | None, cache: TokenCache, now: float
) -> AttestationStatus:
    """The host's view: its TPM's EK (read from `tpm` if given; a TPM that
    does not answer is reported, not raised), the recorded enrollment (is it
    for this EK?), the cached token."""
    fingerprint = tpm_error = None
    if tpm is not None:
        try:
            fingerprint = ek_fingerprint(tpm.ek_public_pem())
        except HostError as exc:
            tpm_error = str(exc)
    enrollment = read_enrollment(directory)
    enrolled = enrollment is not None and (fingerprint is None or enrollment.ek_fingerprint == fingerprint)
    stored = cache.stored()
    return AttestationStatus(
        tcti=tcti,
        ek_fingerprint=fingerprint or (enrollment.ek_fingerprint if enrollment else None),
        tpm_error=tpm_error,
        enrolled=enrolled,
        ak_name_hex=enrollment.ak_name_hex if enrollment else None,
        enrolled_at=enrollment.enrolled_at if enrollment else None,
        token_expires_at=stored.expires_at if stored else None,
        token_valid=stored is not None and stored.usable_at(now),
        policy=stored.policy if stored else None,
    )
