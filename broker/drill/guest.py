"""The guest's side of the drill: tpm2-tools against a vTPM's swtpm socket.

What a guest OS would do with its TPM, with Debian's tpm2-tools 5.x and the
TCTI string `vtpm-host power-on` prints: keep a secret in an NV index of its
own, and read the EK certificate swtpm_setup stored at manufacture.
"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

__all__ = ["EK_CERT_RSA_INDEX", "SECRET_INDEX", "GuestError", "read_ek_certificate", "read_secret", "write_secret"]

# An owner-range index (TCG "Registry of Reserved TPM 2.0 Handles", 0x01000000-0x013FFFFF).
SECRET_INDEX = 0x01000100
# The RSA 2048 EK certificate (TCG EK Credential Profile, low range).
EK_CERT_RSA_INDEX = 0x01C00002
TIMEOUT = 30.0


class GuestError(Exception):
    """A tpm2-tools command failed; the message is its last line of output."""


def _tpm2(tool: str, tcti: str, args: Sequence[str], stdin: bytes | None = None) -> bytes:
    argv = [tool, "-T", tcti, *args]
    try:
        result = subprocess.run(argv, input=stdin, capture_output=True, timeout=TIMEOUT)
    except FileNotFoundError:
        raise GuestError(f"{tool} not found: install Debian's tpm2-tools") from None
    except subprocess.TimeoutExpired:
        raise GuestError(f"{tool} did not finish within {TIMEOUT:g} s") from None
    if result.returncode != 0:
        lines = [x for x in result.stderr.decode("utf-8", "replace").splitlines() if x.strip()]
        raise GuestError(f"{tool} failed: {lines[-1] if lines else f'exit status {result.returncode}'}")
    return result.stdout


def write_secret(tcti: str, secret: bytes, index: int = SECRET_INDEX) -> None:
    """Define an owner NV index of the secret's size and write the secret into it."""
    handle = f"{index:#010x}"
    _tpm2(
        "tpm2_nvdefine",
        tcti,
        [handle, "-C", "o", "-s", str(len(secret)), "-a", "ownerread|ownerwrite|authread|authwrite"],
    )
    _tpm2("tpm2_nvwrite", tcti, [handle, "-C", "o", "-i", "-"], stdin=secret)


def read_secret(tcti: str, size: int, index: int = SECRET_INDEX) -> bytes:
    return _tpm2("tpm2_nvread", tcti, [f"{index:#010x}", "-C", "o", "-s", str(size)])


def read_ek_certificate(tcti: str, index: int = EK_CERT_RSA_INDEX) -> bytes:
    """The DER EK certificate from its NV index (read with the index's own, empty, auth)."""
    data = _tpm2("tpm2_nvread", tcti, [f"{index:#010x}"])
    if not data:
        raise GuestError(f"NV index {index:#010x} holds no EK certificate")
    return data
