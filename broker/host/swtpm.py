"""Run Debian's swtpm for one vTPM on Unix sockets, manufacture a vTPM, and keep its clear state private.

The clear state lives only in a private working directory (mode 0700, in
/dev/shm where it can) between unsealing the .nvram and sealing it again, and
`wipe` overwrites it before removing it.

The server socket is ``<socket_dir>/swtpm.sock`` and the control socket
``<socket_dir>/swtpm.sock.ctrl``: tpm2-tss's swtpm TCTI (``swtpm:path=X``)
derives the control channel's path as ``X.ctrl``, so tpm2-tools 5.x reach the
TPM with the string `SwtpmInstance.tcti` returns.

The orderly shutdown speaks the two tiny protocols directly instead of running
`tpm2_shutdown` and `swtpm_ioctl`: TPM2_Shutdown is a 12-byte TPM command on
the server socket, and CMD_SHUTDOWN a 4-byte code on the control socket
(swtpm's include/swtpm/tpm_ioctl.h). That keeps a power-off to a few
milliseconds, which a boot storm of many VMs needs.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

__all__ = [
    "ManufactureResult",
    "SwtpmError",
    "SwtpmInstance",
    "manufacture",
    "private_workdir",
    "wipe",
]

STATE_FILE = "tpm2-00.permall"
SERVER_SOCKET = "swtpm.sock"
CTRL_SOCKET = "swtpm.sock.ctrl"
LOG_FILE = "swtpm.log"
# sockaddr_un.sun_path is 108 bytes, including the terminating NUL.
_MAX_SOCKET_PATH = 107

# Control channel codes (swtpm include/swtpm/tpm_ioctl.h, "Commands used by the non-CUSE TPMs").
_CMD_GET_CAPABILITY = 0x01
_CMD_SHUTDOWN = 0x03

# TPM 2.0 Part 2: TPM_ST_NO_SESSIONS, TPM_CC_Shutdown, TPM_SU_CLEAR / TPM_SU_STATE.
_TPM_ST_NO_SESSIONS = 0x8001
_TPM_CC_SHUTDOWN = 0x00000145
_TPM_SU = {"clear": 0x0000, "state": 0x0001}
_TPM_RC_SUCCESS = 0x000
_TPM_RC_INITIALIZE = 0x100  # TPM2_Startup never ran: there is nothing to shut down orderly.

_STARTUP_FLAGS = {"clear": "startup-clear", "state": "startup-state", None: None}


class SwtpmError(Exception):
    """swtpm or swtpm_setup failed; the message says what and, where it can, why."""


class SwtpmInstance:
    """One swtpm process serving one vTPM on Unix sockets.

    ``state_dir`` holds the clear TPM state (swtpm's ``--tpmstate dir=``);
    ``socket_dir`` holds the sockets and swtpm's log, and must be another
    directory so that the state directory holds state files only.

    ``startup`` chooses the TPM2_Startup swtpm sends itself: ``"clear"`` (the
    default) when a tool such as tpm2-tools plays the guest, ``"state"`` to
    resume after a TPM2_Shutdown(STATE), or ``None`` when real guest firmware
    sends TPM2_Startup, as it would to a hardware TPM. swtpm always runs with
    ``not-need-init``: tpm2-tss's swtpm TCTI does not send CMD_INIT.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str],
        socket_dir: str | os.PathLike[str],
        *,
        startup: str | None = "clear",
        swtpm: str = "swtpm",
        log_level: int = 1,
    ):
        if startup not in _STARTUP_FLAGS:
            raise ValueError(f"startup must be 'clear', 'state' or None, not {startup!r}")
        self.state_dir = Path(state_dir)
        self.socket_dir = Path(socket_dir)
        self.startup = startup
        self.swtpm = swtpm
        self.log_level = log_level
        self._proc: _Process | None = None

    def __repr__(self) -> str:
        return f"SwtpmInstance(state_dir={str(self.state_dir)!r}, pid={self.pid}, running={self.running})"

    @classmethod
    def attach(
        cls,
        state_dir: str | os.PathLike[str],
        socket_dir: str | os.PathLike[str],
        pid: int,
        *,
        startup: str | None = "clear",
        swtpm: str = "swtpm",
    ) -> SwtpmInstance:
        """The instance another process started, found again by its pid and sockets.

        `shutdown` and `kill` then work as on the instance that started it. The
        pid is trusted only while /proc shows a swtpm serving this instance's
        server socket: a pid the kernel has since given to another process is
        treated as an swtpm that has exited, and is never signalled.
        """
        instance = cls(state_dir, socket_dir, startup=startup, swtpm=swtpm)
        instance._proc = _AttachedProcess(int(pid), instance.server_socket)
        return instance

    @property
    def server_socket(self) -> Path:
        return self.socket_dir / SERVER_SOCKET

    @property
    def ctrl_socket(self) -> Path:
        return self.socket_dir / CTRL_SOCKET

    @property
    def log_path(self) -> Path:
        return self.socket_dir / LOG_FILE

    @property
    def tcti(self) -> str:
        """The TCTI string for tpm2-tools (``-T`` or TPM2TOOLS_TCTI) and other tpm2-tss users."""
        return f"swtpm:path={self.server_socket}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def command(self, server_fd: int | None = None, ctrl_fd: int | None = None) -> list[str]:
        """The swtpm command line this instance runs: with the listening
        sockets' file descriptors when `start` made them, else with their
        paths (swtpm then binds them itself)."""
        server = f"fd={server_fd}" if server_fd is not None else f"path={self.server_socket},mode=0600"
        ctrl = f"fd={ctrl_fd}" if ctrl_fd is not None else f"path={self.ctrl_socket},mode=0600"
        cmd = [
            self.swtpm,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state_dir},mode=0600",
            "--server",
            f"type=unixio,{server}",
            "--ctrl",
            f"type=unixio,{ctrl}",
            "--log",
            f"file={self.log_path},level={self.log_level}",
        ]
        flags = ["not-need-init"]
        startup_flag = _STARTUP_FLAGS[self.startup]
        if startup_flag:
            flags.append(startup_flag)
        cmd += ["--flags", ",".join(flags)]
        return cmd

    def start(self, timeout: float = 10.0) -> None:
        """Start swtpm and return once its control channel answers.

        The agent binds both Unix sockets (mode 0600) and hands swtpm the
        listening descriptors, so they exist before swtpm runs: a client
        that connects early waits in the backlog instead of finding no
        socket, and readiness is one control request that swtpm answers
        once the TPM is set up, not a polling loop.
        """
        if self.running:
            raise SwtpmError(f"swtpm already runs for {self.state_dir} (pid {self.pid})")
        self._check_dirs()
        for leftover in (self.server_socket, self.ctrl_socket):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        server, ctrl = _listen(self.server_socket), _listen(self.ctrl_socket)
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
        try:
            self._proc = subprocess.Popen(
                self.command(server.fileno(), ctrl.fileno()),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                close_fds=True,
                pass_fds=(server.fileno(), ctrl.fileno()),
                start_new_session=True,  # a Ctrl-C aimed at the agent does not kill the vTPM mid-write
            )
        except FileNotFoundError:
            raise SwtpmError(f"{self.swtpm} not found: install Debian's swtpm package") from None
        finally:
            os.close(log)
            server.close()
            ctrl.close()  # swtpm holds the only listening descriptors now.

        try:
            self._ctrl(_CMD_GET_CAPABILITY, timeout, expect=8)
            return
        except OSError:
            pass
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(1.0)
        if self._proc.poll() is not None:
            raise SwtpmError(f"swtpm exited with status {self._proc.returncode} at start: {self._log_tail()}")
        self.kill()
        raise SwtpmError(f"swtpm did not answer on its control socket within {timeout:g} s: {self._log_tail()}")

    def shutdown(self, mode: str = "clear", timeout: float = 10.0) -> int:
        """Orderly stop: TPM2_Shutdown(CLEAR or STATE), then swtpm's CMD_SHUTDOWN, then wait for exit.

        swtpm writes its state files as the TPM changes them; the TPM2_Shutdown
        records an orderly shutdown (so the next start is not counted as a
        power loss by the dictionary-attack logic), and waiting for the exit
        guarantees every write is done before the caller seals the directory.
        Returns swtpm's exit status. If the TPM refuses TPM2_Shutdown, swtpm is
        still stopped and then SwtpmError says why.
        """
        if mode not in _TPM_SU:
            raise ValueError(f"mode must be 'clear' or 'state', not {mode!r}")
        if self._proc is None:
            raise SwtpmError("swtpm was never started")
        exited = self._proc.poll()
        if exited is not None:
            self._remove_sockets()
            return exited

        deadline = time.monotonic() + timeout
        refusal = None
        try:
            rc = self._tpm2_shutdown(_TPM_SU[mode], timeout)
            if rc not in (_TPM_RC_SUCCESS, _TPM_RC_INITIALIZE):
                refusal = f"the TPM answered TPM2_Shutdown with response code {rc:#x}"
        except OSError as exc:
            refusal = f"TPM2_Shutdown failed ({exc}); is a guest still connected?"
        try:
            self._ctrl(_CMD_SHUTDOWN, max(0.1, deadline - time.monotonic()))
            status = self._proc.wait(max(0.1, deadline - time.monotonic()))
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.kill()
            raise SwtpmError(f"swtpm did not stop in an orderly way ({exc}); it was killed") from None
        self._remove_sockets()
        if refusal:
            raise SwtpmError(f"{refusal}; swtpm stopped with status {status}")
        return status

    def kill(self) -> None:
        """Kill swtpm at once (SIGKILL) and reap it; safe to call at any time, any number of times."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        # start() bound them, so they outlive swtpm (which removes only
        # sockets it bound itself).
        for path in (self.server_socket, self.ctrl_socket):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> SwtpmInstance:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    # --- internals ---

    def _check_dirs(self) -> None:
        if self.state_dir.resolve() == self.socket_dir.resolve():
            raise SwtpmError("the socket directory must not be the state directory (it would hold the log)")
        if not (self.state_dir / STATE_FILE).is_file():
            # Without it swtpm would quietly make a brand-new TPM with a new EK.
            raise SwtpmError(f"no TPM state in {self.state_dir} ({STATE_FILE} is missing): manufacture it first")
        if not self.socket_dir.is_dir():
            raise SwtpmError(f"the socket directory {self.socket_dir} does not exist")
        for path in (self.server_socket, self.ctrl_socket):
            if len(os.fsencode(path)) > _MAX_SOCKET_PATH:
                raise SwtpmError(f"socket path too long for a Unix socket ({_MAX_SOCKET_PATH} bytes at most): {path}")
        if "," in str(self.server_socket):
            raise SwtpmError(
                f"the socket path may not contain ',' (TCTI and swtpm options split on it): {self.socket_dir}"
            )

    def _ctrl(self, code: int, timeout: float, expect: int = 4) -> bytes:
        with _connect(self.ctrl_socket, timeout) as sock:
            sock.sendall(struct.pack(">I", code))
            response = _recv_exactly(sock, expect)
        # CMD_GET_CAPABILITY answers with the 64-bit capability mask; the others with a 32-bit result.
        if code != _CMD_GET_CAPABILITY and response[:4] != b"\0\0\0\0":
            raise OSError(f"swtpm control command {code:#x} failed with {response.hex()}")
        return response

    def _tpm2_shutdown(self, shutdown_type: int, timeout: float) -> int:
        with _connect(self.server_socket, timeout) as sock:
            sock.sendall(struct.pack(">HIIH", _TPM_ST_NO_SESSIONS, 12, _TPM_CC_SHUTDOWN, shutdown_type))
            _tag, size, rc = struct.unpack(">HII", _recv_exactly(sock, 10))
            if size > 10:
                _recv_exactly(sock, size - 10)
        return rc

    def _log_tail(self, limit: int = 2000) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        lines = [line for line in text.splitlines() if line.strip() and "client disconnected" not in line]
        tail = " | ".join(lines)[-limit:]
        return tail or "(empty log)"


class _Process(Protocol):
    """The part of `subprocess.Popen` that `SwtpmInstance` uses."""

    pid: int
    returncode: int | None

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def kill(self) -> None: ...


class _AttachedProcess:
    """The part of `subprocess.Popen` that `SwtpmInstance` uses, for an swtpm found by pid.

    When the swtpm is a child of this process (it was started here) it is
    reaped with waitpid and its exit status is known; otherwise (the usual
    case: `vtpm-host power-on` started it and has exited) only its
    disappearance can be seen, and the exit status is reported as 0.
    """

    def __init__(self, pid: int, server_socket: Path):
        self.pid = pid
        self.server_socket = server_socket
        self.returncode: int | None = None
        if not _serves(pid, server_socket):
            self.returncode = 0  # Gone, or the pid now belongs to another process.

    def poll(self) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            done, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            if not _serves(self.pid, self.server_socket):
                self.returncode = 0
            return self.returncode
        if done:
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if timeout is not None and deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"swtpm (pid {self.pid})", timeout)
            time.sleep(0.002)
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        if self.poll() is None and _serves(self.pid, self.server_socket):
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)


def _serves(pid: int, server_socket: Path) -> bool:
    """Is `pid` a live (not zombie) swtpm serving this server socket (its
    command line names the log file beside it)?"""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            # The state letter follows the parenthesised command name, which may itself hold ')'.
            state = handle.read().rsplit(b")", 1)[1].split()[0]
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read().split(b"\0")
    except (OSError, IndexError):
        return False
    if state in (b"Z", b"X") or not argv or not os.path.basename(argv[0]).startswith(b"swtpm"):
        return False
    # Its --log names this instance's socket directory (the sockets are
    # passed as descriptors and appear on no command line).
    prefix = b"file=" + os.fsencode(server_socket.parent / LOG_FILE) + b","
    return any(arg.startswith(prefix) for arg in argv)


@dataclass(frozen=True)
class ManufactureResult:
    """What swtpm_setup made: the persistent handles of the EKs it created."""

    rsa_ek_handle: int | None
    ecc_ek_handle: int | None
    output: str


def manufacture(
    state_dir: str | os.PathLike[str],
    vm_uuid: uuid.UUID | str,
    *,
    rsa_keysize: int = 2048,
    pcr_banks: Sequence[str] = ("sha256",),
    config: str | os.PathLike[str] | None = None,
    extra_args: Sequence[str] = (),
    overwrite: bool = False,
    swtpm_setup: str = "swtpm_setup",
    timeout: float = 120.0,
) -> ManufactureResult:
    """Manufacture a new vTPM in ``state_dir`` with swtpm_setup: EKs (RSA and ECC) made and persisted.

    No EK certificate yet: the broker's EK certificate tool will come in
    through ``config`` (a swtpm_setup.conf naming ``create_certs_tool``) and
    ``extra_args`` (``--create-ek-cert`` and friends). Without ``config`` an
    empty one is used, so neither /etc/swtpm_setup.conf nor a user's
    ~/.config changes what is made. ``vm_uuid`` is passed as ``--vmid``,
    which swtpm_setup hands to the certificate tool.
    """
    state_dir = Path(state_dir)
    vm = vm_uuid if isinstance(vm_uuid, uuid.UUID) else uuid.UUID(str(vm_uuid))
    if not state_dir.is_dir():
        raise SwtpmError(f"the state directory {state_dir} does not exist")
    if (state_dir / STATE_FILE).exists() and not overwrite:
        raise SwtpmError(f"{state_dir} already holds a TPM ({STATE_FILE}); refusing to replace its EK")
    if shutil.which(swtpm_setup) is None:
        raise SwtpmError(f"{swtpm_setup} not found: install Debian's swtpm-tools package")

    with tempfile.TemporaryDirectory(prefix="swtpm-setup-") as scratch:
        if config is None:
            config = Path(scratch) / "swtpm_setup.conf"
            Path(config).write_text("")
        cmd = [
            swtpm_setup,
            "--tpm2",
            "--tpmstate",
            str(state_dir),
            "--createek",
            "--rsa-keysize",
            str(rsa_keysize),
            "--pcr-banks",
            ",".join(pcr_banks),
            "--config",
            str(config),
            "--vmid",
            str(vm),
        ]
        if overwrite:
            cmd.append("--overwrite")
        cmd += list(extra_args)
        try:
            done = subprocess.run(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                env={**os.environ, "XDG_CONFIG_HOME": scratch},
            )
        except subprocess.TimeoutExpired:
            raise SwtpmError(f"swtpm_setup did not finish within {timeout:g} s") from None
    output = done.stdout.decode(errors="replace")
    if done.returncode != 0:
        raise SwtpmError(f"swtpm_setup failed with status {done.returncode}: {' | '.join(output.splitlines())}")
    for entry in state_dir.iterdir():
        if entry.is_file() and not entry.is_symlink():
            entry.chmod(0o600)

    def handle(kind: str) -> int | None:
        match = re.search(rf"created {kind}\b.*? EK with handle (0x[0-9a-fA-F]+)", output)
        return int(match.group(1), 16) if match else None

    return ManufactureResult(rsa_ek_handle=handle("RSA"), ecc_ek_handle=handle("ECC"), output=output)


def private_workdir(prefix: str = "vtpm-", base: str | os.PathLike[str] | None = None) -> Path:
    """A new directory, mode 0700, on /dev/shm when it is there and writable, else in the temp dir.

    RAM-backed, the clear TPM state never reaches a disk (or its journal).
    """
    if base is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        base = "/dev/shm"
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    os.chmod(path, 0o700)
    return path


def wipe(directory: str | os.PathLike[str]) -> None:
    """Overwrite every regular file under ``directory`` with zeros, then remove them and the directory.

    On tmpfs the zeros replace the pages that held the state; on a disk this is
    best effort (journals, SSD remapping), which is why the state belongs on
    tmpfs. Symbolic links are removed, never followed. A missing directory is
    not an error.
    """
    root = Path(directory)
    try:
        info = os.lstat(root)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(info.st_mode):
        raise SwtpmError(f"{root} is not a directory")
    if root.resolve() == Path("/"):
        raise SwtpmError("refusing to wipe /")
    for current, dirs, files in os.walk(root, topdown=False, followlinks=False):
        for name in files:
            path = os.path.join(current, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                _overwrite(path)
            os.unlink(path)
        for name in dirs:
            path = os.path.join(current, name)
            if os.path.islink(path):
                os.unlink(path)
            else:
                os.rmdir(path)
    os.rmdir(root)


def _overwrite(path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        remaining = os.fstat(fd).st_size
        chunk = bytes(min(remaining, 1 << 16))
        while remaining > 0:
            remaining -= os.write(fd, chunk[: min(remaining, len(chunk))])
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _connect(path: Path, timeout: float):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(os.fspath(path))
        yield sock
    finally:
        sock.close()


def listen_unix(path: Path, backlog: int = 16) -> socket.socket:
    """A listening Unix socket at `path`, mode 0600 (in a VM's private 0700
    run directory: swtpm's sockets, the EK certificate relay's). Raises
    OSError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(os.fspath(path))
        os.chmod(path, 0o600)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def _listen(path: Path) -> socket.socket:
    try:
        return listen_unix(path)
    except OSError as exc:
        raise SwtpmError(f"cannot listen on {path} ({exc.strerror})") from None


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"swtpm closed the connection after {len(data)} of {size} bytes")
        data += chunk
    return bytes(data)
