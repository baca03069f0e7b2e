"""Real processes on 127.0.0.1, set up the way an operator sets them up.

Every step runs the project's own command-line tools (`kms-admin`,
`kms-server`, `vtpm-broker`, `vtpm-mgmt`, `vtpm-host`) as separate
processes, so the drill and the integration tests exercise exactly what an
operator would type. Ports are chosen by the servers (port 0) and read from
the line they announce.
"""

from __future__ import annotations

import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Broker",
    "Kms",
    "StepFailed",
    "checked",
    "command",
    "restore_broker",
    "run",
    "start_broker",
    "start_kms",
]

# The console scripts and the module each one runs (setup.cfg).
TOOLS = {
    "kms-server": "kms_server.cli",
    "kms-admin": "kms_server.admin.cli",
    "vtpm-broker": "broker.cli",
    "vtpm-mgmt": "broker.mgmt.cli",
    "vtpm-host": "broker.host.cli",
}


class StepFailed(Exception):
    """A command or a process did not do what the step needed; one line."""


def command(tool: str, *args: str | os.PathLike[str]) -> list[str]:
    """The argv that runs `tool`: its console script beside this Python, or
    `python -m module` where the script is not installed."""
    script = Path(sys.executable).parent / tool
    head = [str(script)] if script.exists() else [sys.executable, "-m", TOOLS[tool]]
    return [*head, *(str(a) for a in args)]


# How a step runs a command-line tool: `run` (a new process) or the drill's
# `ToolPool.run` (a process forked from a worker that imported the tools).
Runner = Callable[..., subprocess.CompletedProcess]


def run(
    tool: str,
    *args: str | os.PathLike[str],
    check: bool = True,
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    argv = command(tool, *args)
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{tool} {_show(args)} did not finish within {timeout:g} s") from None
    return checked(result, check)


def checked(result: subprocess.CompletedProcess, check: bool = True) -> subprocess.CompletedProcess:
    """The result, or StepFailed naming the command and its last line of stderr."""
    if check and result.returncode != 0:
        tool, *args = result.args
        tool = Path(str(tool)).name
        raise StepFailed(f"{tool} {_show(args)} failed: {_last_line(result.stderr) or result.returncode}")
    return result


def _show(args: Sequence[object]) -> str:
    return shlex.join(str(a) for a in args)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


@dataclass
class Service:
    """A long-running server process whose stderr is kept for diagnosis."""

    name: str
    proc: subprocess.Popen
    log: list[str] = field(default_factory=list)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def _start(
    name: str, argv: list[str], markers: dict[str, str], timeout: float = 60.0
) -> tuple[Service, dict[str, int]]:
    """Start a server and wait for each marker line ("... listening on HOST:PORT")."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    service = Service(name, proc)
    stdout, stderr = proc.stdout, proc.stderr
    assert stdout is not None and stderr is not None  # both are PIPEs

    def log() -> None:
        for line in stderr:
            service.log.append(line.rstrip())

    threading.Thread(target=log, daemon=True).start()
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        for line in stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, daemon=True).start()
    ports: dict[str, int] = {}
    deadline = time.monotonic() + timeout
    while len(ports) < len(markers):
        try:
            line = lines.get(timeout=max(0.05, deadline - time.monotonic()))
        except queue.Empty:
            break
        if not line:
            break
        for key, marker in markers.items():
            if marker in line:
                ports[key] = int(line.strip().rsplit(":", 1)[1])
    if len(ports) < len(markers):
        service.stop(5)
        time.sleep(0.1)
        raise StepFailed(f"{name} did not start: {_last_line(chr(10).join(service.log)) or 'no output'}")
    return service, ports


# --- The KMS ---------------------------------------------------------------------------------


@dataclass
class Kms:
    workdir: Path
    pki: Path
    port: int
    service: Service

    @property
    def ca(self) -> Path:
        return self.pki / "ca.pem"

    @property
    def config(self) -> Path:
        return self.workdir / "kms.toml"

    def stop(self) -> None:
        self.service.stop()


def start_kms(workdir: Path, runner: Runner = run, audit: bool = True, port: int = 0) -> Kms:
    """`kms-admin pki init`, `kms-admin master-key new`, a config, `kms-server`
    (on `port`; 0: a free one)."""
    workdir.mkdir(parents=True, exist_ok=True)
    pki = workdir / "pki"
    runner("kms-admin", "pki", "init", "--dir", pki, "--server-name", "127.0.0.1", "--client", "admin")
    master = workdir / "master.key"
    if not master.exists():
        runner("kms-admin", "master-key", "new", "--out", master)
    audit_key = workdir / "audit.key"
    if not audit_key.exists():
        runner("kms-admin", "audit", "key", "new", "--out", audit_key)
    config = workdir / "kms.toml"
    config.write_text(
        f"""\
[server]
host = "127.0.0.1"
port = {int(port)}
node_name = "kms-1"
data_dir = "{workdir / "data"}"

[tls]
cert = "{pki / "server.pem"}"
key = "{pki / "server.key"}"
ca = "{pki / "ca.pem"}"

[master_key]
file = "{master}"

[access]
administrators = ["admin"]

[logging]
level = "WARNING"

[audit]
signing_key_file = "{audit_key}"
enabled = {"true" if audit else "false"}
"""
    )
    service, ports = _start("kms-server", command("kms-server", "--config", config), {"kmip": "listening on"})
    return Kms(workdir, pki, ports["kmip"], service)


# --- The broker ------------------------------------------------------------------------------


@dataclass
class Broker:
    workdir: Path
    config: Path
    provider: str
    service: Service | None = None
    api_port: int = 0
    gateway_port: int = 0
    runner: Runner = run

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def trust_ca(self) -> Path:
        return self.data_dir / "trust-ca.pem"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def gateway(self) -> str:
        return f"127.0.0.1:{self.gateway_port}"

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.runner("vtpm-broker", "--config", self.config, "admin", *args, check=check)

    def token(self, instance: str) -> str:
        return self.admin("token", "--instance", instance).stdout.strip()

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()

    def kill(self) -> None:
        """The host is lost: no orderly stop, no last checkpoint."""
        if self.service is not None and self.service.proc.poll() is None:
            self.service.proc.kill()
            self.service.proc.wait(10)


def _broker_config(workdir: Path, kms: Kms, provider: str, roles: str = "") -> Path:
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "broker.toml"
    config.write_text(
        f"""\
[broker]
provider_name = "{provider}"
data_dir = "data"
node_name = "broker-1"

[api]
host = "127.0.0.1"
port = 0

[gateway]
host = "127.0.0.1"
port = 0

[kms]
nodes = ["127.0.0.1:{kms.port}"]
ca = "{kms.ca}"

[logging]
level = "WARNING"
{roles}
"""
    )
    return config


def _serve(broker: Broker) -> Broker:
    service, ports = _start(
        "vtpm-broker",
        command("vtpm-broker", "--config", broker.config, "run"),
        {"api": "api listening on", "gateway": "gateway listening on"},
    )
    broker.service = service
    broker.api_port = ports["api"]
    broker.gateway_port = ports["gateway"]
    return broker


def start_broker(workdir: Path, kms: Kms, provider: str, roles: str = "", runner: Runner = run) -> Broker:
    """`vtpm-broker init`, the KMS CA signs its KMIP client CSR
    (`kms-admin pki sign-csr`), `vtpm-broker run`."""
    config = _broker_config(workdir, kms, provider, roles)
    broker = Broker(workdir, config, provider, runner=runner)
    runner("vtpm-broker", "--config", config, "init")
    client_cert = broker.data_dir / "kms-client.pem"
    if not client_cert.exists():
        runner(
            "kms-admin", "pki", "sign-csr",
            "--csr", broker.data_dir / "kms-client.csr", "--out", client_cert, "--ca-dir", kms.pki,
        )  # fmt: skip
    return _serve(broker)


def restore_broker(
    workdir: Path, kms: Kms, provider: str, backup: Path, master_key: Path, roles: str = "", runner: Runner = run
) -> Broker:
    """A broker on a new host: its configuration, the master key kept apart
    from the backups copied into a new data directory (mode 0600),
    `vtpm-broker restore --from BACKUP`, `vtpm-broker run` (new ports)."""
    config = _broker_config(workdir, kms, provider, roles)
    broker = Broker(workdir, config, provider, runner=runner)
    broker.data_dir.mkdir(mode=0o700, parents=True)
    key = broker.data_dir / "master.key"
    key.touch(mode=0o600)
    key.write_bytes(master_key.read_bytes())
    runner("vtpm-broker", "--config", config, "restore", "--from", backup)
    return _serve(broker)
