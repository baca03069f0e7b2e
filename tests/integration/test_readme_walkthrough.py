"""README.md's "first hour" walkthrough, run as it is written.

The ```sh blocks under the heading "The first hour" are taken from README.md
itself, so this test fails when the text drifts from what works. They run in
a temporary copy of the repository's top-level files (Makefile, etc/, tools/,
setup files; the code comes from the project's editable .venv, linked in), in
order, each block as one `bash -eu` script; a block whose first line is
"# shell N: ..." starts a server that stays in the foreground, so it runs in
the background until the test ends. The only change to the text: the
development ports (5696, 5697, 5698, 8443, 9696, 9697) become free ports, in
the copied etc/*-dev.toml and in the commands alike, as the README says.

Every process the walkthrough starts is stopped at the end: the two servers
(their process groups) and any swtpm a failed step left running.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from pg_cluster import free_ports

ROOT = Path(__file__).resolve().parents[2]
HEADING = "## The first hour"
DEV_PORTS = (5696, 5697, 5698, 8443, 9696, 9697)
COPIED = ("Makefile", "setup.cfg", "pyproject.toml", "README.md", "etc", "tools")
STEP_TIMEOUT = 90.0
SERVER_TIMEOUT = 60.0

pytestmark = pytest.mark.slow


def walkthrough_blocks(readme: str) -> list[str]:
    """The ```sh blocks of the walkthrough section, in order."""
    start = readme.index(HEADING)
    end = readme.find("\n## ", start + len(HEADING))
    section = readme[start : end if end != -1 else len(readme)]
    return [m.group(1) for m in re.finditer(r"^```sh\n(.*?)^```$", section, re.M | re.S)]


def _server_shell(block: str) -> str | None:
    first = block.lstrip().splitlines()[0]
    m = re.match(r"#\s*shell\s+(\d+)\b", first)
    return m.group(1) if m else None


def _substitute(text: str, ports: dict[int, int]) -> str:
    return re.sub(r"\b(" + "|".join(map(str, ports)) + r")\b", lambda m: str(ports[int(m.group(1))]), text)


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = SERVER_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}) before listening on {port}:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"nothing listens on {port} after {timeout:g} s:\n{log.read_text()}")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)


def _stop_swtpms(repo: Path) -> None:
    """A failed step can leave a vTPM running: stop the swtpm of every running record."""
    for record in repo.glob("var/*/running/*.json"):
        try:
            pid = int(json.loads(record.read_text())["pid"])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if b"swtpm" in cmdline:
            os.kill(pid, signal.SIGKILL)


def test_walkthrough_blocks_are_found():
    blocks = walkthrough_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 5
    assert [_server_shell(b) for b in blocks if _server_shell(b)] == ["1", "2"]
    assert blocks[0].strip().splitlines()[-1] == "make run"
    assert "tpm2_nvread" in blocks[-1]


def test_readme_first_hour(tmp_path):
    missing = [t for t in ("swtpm", "swtpm_setup", "tpm2_nvdefine", "curl", "make") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the walkthrough needs {', '.join(missing)}")
    if not (ROOT / ".venv" / "bin" / "vtpm-broker").exists():
        pytest.skip("no .venv with the project installed (make venv)")
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    # The virtualenv is the project's (editable install): make must not
    # reinstall it from the copy, so the copied setup files are dated before
    # its .installed stamp (the walkthrough is not about `make venv`).
    (repo / ".venv").symlink_to(ROOT / ".venv")
    stamp = (ROOT / ".venv" / ".installed").stat().st_mtime
    for name in ("setup.cfg", "pyproject.toml"):
        os.utime(repo / name, (stamp - 1, stamp - 1))
    ports = dict(zip(DEV_PORTS, free_ports(len(DEV_PORTS)), strict=True))
    for config in (repo / "etc").glob("*-dev.toml"):
        config.write_text(_substitute(config.read_text(), ports))

    blocks = walkthrough_blocks((repo / "README.md").read_text())
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "CONFIG", "MAKEFLAGS", "MAKELEVEL")}
    servers: list[subprocess.Popen] = []
    outputs: list[str] = []
    try:
        for number, block in enumerate(blocks, 1):
            script = _substitute(block, ports)
            shell = _server_shell(block)
            if shell is not None:
                log = tmp_path / f"shell-{shell}.log"
                with log.open("wb") as out:
                    proc = subprocess.Popen(
                        ["bash", "-eu", "-c", script],
                        cwd=repo,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                servers.append(proc)
                # shell 1 is the KMS (KMIP port), shell 2 the broker (API and gateway).
                for port in (ports[5696],) if shell == "1" else (ports[8443], ports[5697]):
                    _wait_port(port, proc, log)
                continue
            result = subprocess.run(
                ["bash", "-eu", "-c", script],
                cwd=repo,
                env=env,
                capture_output=True,
                text=True,
                timeout=STEP_TIMEOUT,
            )
            outputs.append(result.stdout)
            assert result.returncode == 0, (
                f"README walkthrough block {number} failed ({result.returncode}):\n{script}\n"
                f"--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
            )
        banner = (tmp_path / "shell-1.log").read_text()
    finally:
        _stop_swtpms(repo)
        for proc in reversed(servers):
            _stop(proc)

    # What the walkthrough says each step shows.
    assert f"KMIP (mutual TLS):  127.0.0.1:{ports[5696]}" in banner, banner
    assert f"https://127.0.0.1:{ports[5698]}/" in banner
    joined = "\n".join(outputs)
    assert "0 items failed" in outputs[0]
    assert "test01" in outputs[0]  # audit show --vm test01 found the session's records
    # curl -f: the auditor's certificate was served the chain's report (no 403).
    report = json.loads(outputs[0].strip().splitlines()[-1])
    assert isinstance(report, dict) and report
    assert "refused, as it must be" in joined
    assert "guest secret" in outputs[-1].splitlines(), outputs[-1]
    assert all(p.returncode is not None for p in servers)
