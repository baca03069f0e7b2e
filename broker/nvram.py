"""The encrypted ``<vm>.nvram`` file: a vTPM's swtpm state sealed under the VM's DEK.

Layout (all integers big-endian; docs/nvram-format.md has the full table)::

    header      magic, format version, header length, VM UUID, generation,
                salt, sector size, plaintext length, ciphertext length,
                key-safe reference
    ciphertext  AES-XTS-256 over the packed state, 4096-byte sectors,
                tweak = sector number (128-bit little-endian)
    tag         HMAC-SHA256 over header and ciphertext

The XTS key and the MAC key come from the 512-bit DEK through HKDF-SHA256 with
the header's salt, which is fresh on every save. The tag is verified (constant
time) before a single byte is decrypted: XTS detects nothing by itself, and a
wrong key or a flipped bit must be an error, never garbage handed to the TPM.

Only the state files swtpm writes are packed, as (name id, length, bytes)
records; names never travel as paths, so unpacking cannot write anywhere but
the known names in the target directory.

The DEK is only ever a function argument: nothing here stores it, logs it, or
puts it into a message.
"""

from __future__ import annotations

import os
import stat
import struct
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import kmip_core.files

__all__ = [
    "DEK_LENGTH",
    "FORMAT_VERSION",
    "MAGIC",
    "SECTOR_SIZE",
    "STATE_FILES",
    "Header",
    "NvramContents",
    "NvramCorrupt",
    "NvramError",
    "NvramRollback",
    "NvramUnknownStateFile",
    "NvramWrongVm",
    "read_header",
    "read_state_dir",
    "seal",
    "unseal",
    "write_atomic",
    "write_state_dir",
]

MAGIC = b"VTPMNVRM"
FORMAT_VERSION = 1
SECTOR_SIZE = 4096
DEK_LENGTH = 64
SALT_LENGTH = 32
TAG_LENGTH = 32
MAX_KEY_SAFE_REF = 1024
# swtpm's TPM 2 state is a few KiB to a few hundred KiB; the cap keeps a hostile
# header from asking for an absurd allocation.
MAX_PLAINTEXT = 64 * 1024 * 1024

# The files swtpm's directory backend writes for a TPM 2 ("tpm2-00." + name).
# The ids are part of the format: never renumber, only append.
STATE_FILES: dict[int, str] = {
    1: "tpm2-00.permall",
    2: "tpm2-00.volatilestate",
    3: "tpm2-00.savestate",
}
_STATE_IDS = {name: ident for ident, name in STATE_FILES.items()}
REQUIRED_STATE_FILE = "tpm2-00.permall"
# swtpm 0.7 keeps an empty lock file in the state directory; it is not state.
_IGNORED_FILES = frozenset({".lock"})

# magic, version, header length, VM UUID, generation, salt, sector size,
# plaintext length, ciphertext length, key-safe reference length
_FIXED = struct.Struct(">8sHH16sQ32sIQQH")
_RECORD = struct.Struct(">BI")
_COUNT = struct.Struct(">H")

_INFO_XTS = b"vtpm-nvram v1 aes-256-xts key"
_INFO_MAC = b"vtpm-nvram v1 hmac-sha256 key"

_CORRUPT_OR_OTHER_KEY = "the .nvram file is corrupt or was encrypted with another key"


class NvramError(Exception):
    """A .nvram file that must not reach the TPM, or a state that must not be sealed."""


class NvramCorrupt(NvramError):
    """Bad magic or version, truncation, trailing bytes, or a tag that does not verify.

    ``header`` is the parsed header when the damage is past it (truncation,
    trailing bytes, tag mismatch); its fields are *not* authenticated then.
    """

    def __init__(self, message: str, header: Header | None = None):
        super().__init__(message)
        self.header = header


class NvramRollback(NvramError):
    """An authentic file whose generation is older than the last one seen."""


class NvramWrongVm(NvramError):
    """An authentic file that belongs to another VM."""


class NvramUnknownStateFile(NvramError):
    """A file in a swtpm state directory that is not a known state file."""


@dataclass(frozen=True)
class Header:
    """The clear header. Authenticated by the tag, not secret."""

    format_version: int
    vm_uuid: uuid.UUID
    generation: int
    salt: bytes
    key_safe_ref: str
    sector_size: int
    plaintext_length: int
    ciphertext_length: int
    header_length: int

    @property
    def total_length(self) -> int:
        return self.header_length + self.ciphertext_length + TAG_LENGTH


@dataclass(frozen=True)
class NvramContents:
    """An unsealed file: the authenticated header and the clear state files."""

    header: Header
    # The clear vTPM state is as secret as the DEK: keep it out of repr.
    files: Mapping[str, bytes] = field(repr=False)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}: {len(data)} bytes" for name, data in sorted(self.files.items()))
        return f"NvramContents(header={self.header!r}, files={{{sizes}}})"


# --- sealing -----------------------------------------------------------------


def seal(
    state: Mapping[str, bytes] | str | os.PathLike[str],
    dek: bytes,
    vm_uuid: uuid.UUID | str,
    generation: int,
    key_safe_ref: str,
) -> bytes:
    """Return the .nvram bytes for a swtpm state (a dict of file name to bytes, or its directory).

    A fresh salt is drawn on every call, so two seals of the same state differ.
    """
    files = read_state_dir(state) if isinstance(state, str | os.PathLike) else dict(state)
    _check_dek(dek)
    vm = _as_uuid(vm_uuid)
    if not isinstance(generation, int) or not 0 <= generation < 2**64:
        raise ValueError("generation must be an integer in [0, 2**64)")
    ref = _encode_key_safe_ref(key_safe_ref)

    plaintext = _pack(files)
    if len(plaintext) > MAX_PLAINTEXT:
        raise NvramError(f"the vTPM state is {len(plaintext)} bytes; the format allows {MAX_PLAINTEXT}")
    salt = os.urandom(SALT_LENGTH)
    ciphertext_length = _sectors(len(plaintext)) * SECTOR_SIZE
    header = (
        _FIXED.pack(
            MAGIC,
            FORMAT_VERSION,
            _FIXED.size + len(ref),
            vm.bytes,
            generation,
            salt,
            SECTOR_SIZE,
            len(plaintext),
            ciphertext_length,
            len(ref),
        )
        + ref
    )
    xts_key, mac_key = _derive_keys(dek, salt)
    ciphertext = _xts(xts_key, plaintext.ljust(ciphertext_length, b"\0"), encrypt=True)
    mac = hmac.HMAC(mac_key, hashes.SHA256())
    mac.update(header)
    mac.update(ciphertext)
    return header + ciphertext + mac.finalize()


def unseal(
    blob: bytes,
    dek: bytes,
    expected_vm_uuid: uuid.UUID | str | None = None,
    min_generation: int | None = None,
) -> NvramContents:
    """Verify and decrypt a .nvram file.

    Order: structure, then the tag (nothing is decrypted before it verifies),
    then the VM and the generation (now authenticated), then the records.
    """
    _check_dek(dek)
    blob = bytes(blob)
    header = read_header(blob)
    xts_key, mac_key = _derive_keys(dek, header.salt)
    body_end = header.header_length + header.ciphertext_length
    mac = hmac.HMAC(mac_key, hashes.SHA256())
    mac.update(blob[:body_end])
    try:
        mac.verify(blob[body_end:])  # constant-time comparison
    except InvalidSignature:
        raise NvramCorrupt(_CORRUPT_OR_OTHER_KEY, header) from None

    if expected_vm_uuid is not None and header.vm_uuid != _as_uuid(expected_vm_uuid):
        raise NvramWrongVm(f"the .nvram file belongs to VM {header.vm_uuid}, not to VM {_as_uuid(expected_vm_uuid)}")
    if min_generation is not None and header.generation < min_generation:
        raise NvramRollback(
            f"the .nvram file is generation {header.generation}, older than generation {min_generation} "
            "last seen: an old copy was put back (rollback)"
        )

    padded = _xts(xts_key, blob[header.header_length : body_end], encrypt=False)
    plaintext = padded[: header.plaintext_length]
    if any(padded[header.plaintext_length :]):
        raise NvramCorrupt("the .nvram file has non-zero sector padding", header)
    return NvramContents(header=header, files=_unpack(plaintext, header))


def read_header(blob: bytes | memoryview) -> Header:
    """Parse and check the clear header without any key (for `vm check` and recovery).

    The fields are not authenticated until `unseal` verifies the tag.
    """
    blob = memoryview(bytes(blob))
    if len(blob) < len(MAGIC) or bytes(blob[: len(MAGIC)]) != MAGIC:
        if len(blob) < len(MAGIC) and bytes(blob) == MAGIC[: len(blob)]:
            raise NvramCorrupt(f"the .nvram file is truncated ({len(blob)} bytes, not even a header)")
        raise NvramCorrupt("not a vTPM .nvram file (bad magic)")
    if len(blob) < _FIXED.size:
        raise NvramCorrupt(f"the .nvram file is truncated ({len(blob)} bytes, not even a header)")
    (
        _magic,
        version,
        header_length,
        vm_bytes,
        generation,
        salt,
        sector_size,
        plaintext_length,
        ciphertext_length,
        ref_length,
    ) = _FIXED.unpack_from(blob)
    if version != FORMAT_VERSION:
        raise NvramCorrupt(f"the .nvram format version {version} is not supported (this build reads {FORMAT_VERSION})")
    if (
        header_length != _FIXED.size + ref_length
        or ref_length > MAX_KEY_SAFE_REF
        or sector_size != SECTOR_SIZE
        or plaintext_length > MAX_PLAINTEXT
        or ciphertext_length != _sectors(plaintext_length) * SECTOR_SIZE
    ):
        raise NvramCorrupt("the .nvram header is inconsistent (corrupt file)")
    if len(blob) < header_length:
        raise NvramCorrupt(f"the .nvram file is truncated ({len(blob)} bytes, inside the header)")
    try:
        key_safe_ref = bytes(blob[_FIXED.size : header_length]).decode("utf-8")
    except UnicodeDecodeError:
        raise NvramCorrupt("the .nvram header is inconsistent (key-safe reference is not UTF-8)") from None
    header = Header(
        format_version=version,
        vm_uuid=uuid.UUID(bytes=bytes(vm_bytes)),
        generation=generation,
        salt=bytes(salt),
        key_safe_ref=key_safe_ref,
        sector_size=sector_size,
        plaintext_length=plaintext_length,
        ciphertext_length=ciphertext_length,
        header_length=header_length,
    )
    if len(blob) < header.total_length:
        raise NvramCorrupt(
            f"the .nvram file is truncated: the header says {header.total_length} bytes, the file has {len(blob)}",
            header,
        )
    if len(blob) > header.total_length:
        raise NvramCorrupt(
            f"the .nvram file has {len(blob) - header.total_length} trailing bytes after the tag (corrupt file)",
            header,
        )
    return header


# --- state directories ---------------------------------------------------------


def read_state_dir(directory: str | os.PathLike[str]) -> dict[str, bytes]:
    """Read the known swtpm state files of a directory; refuse anything else.

    swtpm's own lock file is skipped. Symbolic links, subdirectories and
    unknown names are refused, so that nothing but TPM state is ever sealed.
    """
    directory = Path(directory)
    files: dict[str, bytes] = {}
    unknown: list[str] = []
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name in sorted(os.listdir(dir_fd)):
            info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if name in _IGNORED_FILES and stat.S_ISREG(info.st_mode):
                continue
            if name not in _STATE_IDS or not stat.S_ISREG(info.st_mode):
                unknown.append(name)
                continue
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=dir_fd)
            with os.fdopen(fd, "rb") as handle:
                files[name] = handle.read()
    finally:
        os.close(dir_fd)
    if unknown:
        raise NvramUnknownStateFile(
            f"{directory} holds files that are not swtpm state: {', '.join(unknown)} "
            f"(only {', '.join(STATE_FILES.values())} are sealed)"
        )
    return files


def write_state_dir(directory: str | os.PathLike[str], files: Mapping[str, bytes]) -> None:
    """Write unsealed state files into an existing directory, mode 0600.

    Only the known names are written; an existing file is an error rather than
    something to overwrite, so stale state never mixes with the unsealed one.
    """
    for name in files:
        if name not in _STATE_IDS:
            raise NvramUnknownStateFile(f"{name!r} is not a swtpm state file")
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for name, data in files.items():
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=dir_fd)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fchmod(handle.fileno(), 0o600)
    finally:
        os.close(dir_fd)


def write_atomic(path: str | os.PathLike[str], blob: bytes) -> None:
    """Replace ``path`` with ``blob`` so that a crash leaves the old or the new file, never a mix.

    Temporary file in the same directory, fsync, rename, fsync the directory; mode 0600
    (docs/nvram-format.md, "Atomic writes"). On failure the temporary file is removed
    and the OSError names ``path``.
    """
    kmip_core.files.write_atomic(path, blob, 0o600, sync_dir=True)


# --- internals -------------------------------------------------------------------


def _check_dek(dek: bytes) -> None:
    # Never echo the value, only its type and length.
    if not isinstance(dek, bytes | bytearray | memoryview):
        raise TypeError(f"the DEK must be bytes, not {type(dek).__name__}")
    if len(dek) != DEK_LENGTH:
        raise ValueError(f"the DEK must be {DEK_LENGTH} bytes (512 bits), got {len(dek)} bytes")


def _as_uuid(value: uuid.UUID | str) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def _encode_key_safe_ref(key_safe_ref: str) -> bytes:
    if not isinstance(key_safe_ref, str):
        raise TypeError("the key-safe reference must be a str")
    encoded = key_safe_ref.encode("utf-8")
    if not 0 < len(encoded) <= MAX_KEY_SAFE_REF:
        raise ValueError(f"the key-safe reference must be 1 to {MAX_KEY_SAFE_REF} bytes of UTF-8")
    return encoded


def _sectors(length: int) -> int:
    return -(-length // SECTOR_SIZE)


def _derive_keys(dek: bytes, salt: bytes) -> tuple[bytes, bytes]:
    xts_key = HKDF(algorithm=hashes.SHA256(), length=64, salt=salt, info=_INFO_XTS).derive(bytes(dek))
    mac_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_INFO_MAC).derive(bytes(dek))
    return xts_key, mac_key


def _xts(key: bytes, data: bytes, *, encrypt: bool) -> bytes:
    """AES-256-XTS over whole sectors; the tweak is the sector number (IEEE 1619 data unit, little-endian)."""
    algorithm = algorithms.AES(key)
    out = bytearray()
    view = memoryview(data)
    for number in range(len(data) // SECTOR_SIZE):
        cipher = Cipher(algorithm, modes.XTS(number.to_bytes(16, "little")))
        ctx = cipher.encryptor() if encrypt else cipher.decryptor()
        out += ctx.update(view[number * SECTOR_SIZE : (number + 1) * SECTOR_SIZE])
        out += ctx.finalize()
    return bytes(out)


def _pack(files: Mapping[str, bytes]) -> bytes:
    unknown = sorted(name for name in files if name not in _STATE_IDS)
    if unknown:
        raise NvramUnknownStateFile(
            f"not swtpm state files: {', '.join(map(repr, unknown))} (only {', '.join(STATE_FILES.values())})"
        )
    if REQUIRED_STATE_FILE not in files:
        # Sealing a directory without it would replace the vTPM (its EK, its NV) with nothing.
        raise NvramError(f"the swtpm state has no {REQUIRED_STATE_FILE}: nothing to seal")
    parts = [_COUNT.pack(len(files))]
    for name in sorted(files, key=_STATE_IDS.__getitem__):
        data = bytes(files[name])
        parts.append(_RECORD.pack(_STATE_IDS[name], len(data)))
        parts.append(data)
    return b"".join(parts)


def _unpack(plaintext: bytes, header: Header) -> dict[str, bytes]:
    # The tag verified, so a malformed record means a writer we do not understand, not an attacker.
    def bad(why: str) -> NvramCorrupt:
        return NvramCorrupt(f"the .nvram state records are malformed: {why}", header)

    if len(plaintext) < _COUNT.size:
        raise bad("no record count")
    (count,) = _COUNT.unpack_from(plaintext)
    offset = _COUNT.size
    files: dict[str, bytes] = {}
    for _ in range(count):
        if offset + _RECORD.size > len(plaintext):
            raise bad("a record header runs past the end")
        ident, length = _RECORD.unpack_from(plaintext, offset)
        offset += _RECORD.size
        name = STATE_FILES.get(ident)
        if name is None:
            raise bad(f"unknown state file id {ident}")
        if name in files:
            raise bad(f"{name} appears twice")
        if offset + length > len(plaintext):
            raise bad(f"{name} runs past the end")
        files[name] = plaintext[offset : offset + length]
        offset += length
    if offset != len(plaintext):
        raise bad(f"{len(plaintext) - offset} bytes after the last record")
    if REQUIRED_STATE_FILE not in files:
        raise bad(f"no {REQUIRED_STATE_FILE}")
    return files
