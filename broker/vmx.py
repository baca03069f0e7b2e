"""The `.vmx` file of a VM on the datastore: `key = "value"` lines, as
VMware writes them. Everything needed to find the VM's KEK again is here
(the key safe), so a datastore alone is enough to recover a VM.

Keys this project writes and reads:

| key | meaning |
|---|---|
| `displayName` | the VM's name |
| `uuid.bios` | the VM's UUID (canonical lower-case form) |
| `encryption.keySafe` | the key safe (broker/keysafe.py): provider, KMS key id, wrapped DEK |
| `encryption.required` | `"TRUE"` |
| `vtpm.present` | `"TRUE"` when the VM has a vTPM |
| `nvram` | the `.nvram` file name, relative to the `.vmx` |
| `encryption.keySafe.pending` | a rotation's new key safe, written beside the one in use before the switch |
| `encryption.rekey.pending` | `"shallow"` or `"deep"`: the kind of that rotation |
| `encryption.keySafe.previous` | after the switch, the old key safe, until the broker has retired its KEK |
| `encryption.rekey.nvramKeyRef` | after a shallow rekey, the KEK the `.nvram` header still names (same DEK) |

Key rotation (docs/broker-design.md, "Key rotation"): the new key safe is
written beside the old one first, then switched in, then the old one is
retired; every step is one atomic write of the whole file, made under the
VM's `.vmx.lck` lock (`locked`) so that the management instance and a host
never interleave their read-modify-writes.

Unknown keys are kept as they are (a real `.vmx` has hundreds); the order of
lines is preserved when a file is rewritten.
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid as uuid_module
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kmip_core.files import flock_within, write_atomic

KEY_SAFE = "encryption.keySafe"
PENDING_KEY_SAFE = "encryption.keySafe.pending"
PENDING_REKEY = "encryption.rekey.pending"
PREVIOUS_KEY_SAFE = "encryption.keySafe.previous"
# After a shallow rekey the .nvram stays sealed under the same DEK, but its
# header still names the old KEK (`<provider>/<kms key id>`) until the next
# power-off: this says so, for `vtpm-mgmt vm check`.
NVRAM_KEY_REF = "encryption.rekey.nvramKeyRef"
REKEY_KINDS = ("shallow", "deep")

_LINE = re.compile(r'^\s*([A-Za-z0-9_.:\-]+)\s*=\s*"((?:[^"\\]|\\.)*)"\s*$')
MAX_BYTES = 1 << 20


class VmxError(ValueError):
    """The file is not a .vmx this project can use; the message says why."""


def _unescape(value: str) -> str:
    return re.sub(r"\\(.)", r"\1", value)


def _escape(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise VmxError("a .vmx value cannot hold a line break")
    return value.replace("\\", "\\\\").replace('"', '\\"')


@dataclass
class Vmx:
    entries: dict[str, str] = field(default_factory=dict)

    # Typed views of the keys the project uses.
    @property
    def name(self) -> str:
        return self.entries.get("displayName", "")

    @property
    def vm_uuid(self) -> str:
        raw = self.entries.get("uuid.bios")
        if not raw:
            raise VmxError("the .vmx has no uuid.bios")
        try:
            return str(uuid_module.UUID(raw.replace(" ", "").replace("-", "")))
        except ValueError:
            raise VmxError(f"uuid.bios {raw!r} is not a UUID") from None

    @property
    def key_safe(self) -> str:
        value = self.entries.get("encryption.keySafe")
        if not value:
            raise VmxError("the .vmx has no encryption.keySafe: the VM is not encrypted")
        return value

    @property
    def pending_key_safe(self) -> str | None:
        """A rotation's new key safe, not in use yet (None: none)."""
        return self.entries.get(PENDING_KEY_SAFE) or None

    @property
    def pending_rekey(self) -> str | None:
        """The kind of the pending rotation ("shallow" or "deep"), None without one."""
        if self.pending_key_safe is None:
            return None
        kind = self.entries.get(PENDING_REKEY, "")
        if kind not in REKEY_KINDS:
            raise VmxError(f"{PENDING_REKEY} must be one of {', '.join(REKEY_KINDS)}, not {kind[:20]!r}")
        return kind

    @property
    def previous_key_safe(self) -> str | None:
        """The key safe a rotation switched away from, until its KEK is retired."""
        return self.entries.get(PREVIOUS_KEY_SAFE) or None

    def remove(self, *keys: str) -> None:
        for key in keys:
            self.entries.pop(key, None)

    @property
    def has_vtpm(self) -> bool:
        return self.entries.get("vtpm.present", "FALSE").upper() == "TRUE"

    @property
    def nvram_name(self) -> str:
        name = self.entries.get("nvram") or f"{self.name}.nvram"
        if "/" in name or "\\" in name or name in ("", ".", ".."):
            raise VmxError(f"nvram {name!r} must be a file name beside the .vmx")
        return name

    def get(self, key: str, default: str | None = None) -> str | None:
        return self.entries.get(key, default)

    def set(self, key: str, value: str) -> None:
        self.entries[key] = value

    @classmethod
    def new(cls, name: str, vm_uuid: str, key_safe: str, vtpm: bool) -> Vmx:
        if not name or "/" in name or name.startswith("."):
            raise VmxError(f"VM name {name!r} cannot name files on a datastore")
        return cls(
            {
                "config.version": "8",
                "displayName": name,
                "uuid.bios": str(uuid_module.UUID(vm_uuid)),
                "encryption.required": "TRUE",
                "encryption.keySafe": key_safe,
                "vtpm.present": "TRUE" if vtpm else "FALSE",
                "nvram": f"{name}.nvram",
            }
        )


def parses(text: str) -> Vmx:
    entries: dict[str, str] = {}
    # Only \n ends a line (str.splitlines would also split on U+0085 etc.).
    for number, line in enumerate(text.split("\n"), 1):
        line = line.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.match(line)
        if match is None:
            raise VmxError(f'line {number} is not a key = "value" line')
        entries[match.group(1)] = _unescape(match.group(2))
    entries.pop(".encoding", None)
    return Vmx(entries)


def formats(vmx: Vmx) -> str:
    return '.encoding = "UTF-8"\n' + "".join(
        f'{key} = "{_escape(value)}"\n' for key, value in vmx.entries.items() if key != ".encoding"
    )


def read(path: str | Path) -> Vmx:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise VmxError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > MAX_BYTES:
        raise VmxError(f"{path} is larger than {MAX_BYTES} bytes")
    try:
        vmx = parses(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise VmxError(f"{path} is not UTF-8 text") from None
    except VmxError as exc:
        raise VmxError(f"{path}: {exc}") from None
    return vmx


def write(path: str | Path, vmx: Vmx) -> None:
    """Atomically (kmip_core.files): a temporary file beside it, fsync, rename; mode 0644."""
    write_atomic(path, formats(vmx).encode("utf-8"), 0o644)


@contextlib.contextmanager
def locked(path: str | Path, timeout: float = 60.0) -> Iterator[None]:
    """Hold the VM's `<name>.vmx.lck` (flock) for a read-modify-write of
    its .vmx. The .vmx itself cannot be locked: every write replaces it."""
    path = Path(path)
    lock = path.with_name(path.name + ".lck")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        raise VmxError(f"cannot open the lock {lock} ({exc.strerror})") from None
    try:
        if not flock_within(fd, timeout, poll=0.02):
            raise VmxError(f"{path} has been locked by another command for over {timeout:g} s")
        yield
    finally:
        os.close(fd)


def find_vms(datastore: str | Path) -> list[Path]:
    """Every `<dir>/<name>.vmx` under a datastore, sorted."""
    return sorted(Path(datastore).glob("*/*.vmx"))
