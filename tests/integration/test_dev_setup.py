"""The development set-up the README promises (issue 17, point 6): the README
and docs/ name nothing outside the repository; `make pki` issues the
auditor's certificate that etc/kms-dev.toml names; `make run` prints the ports
the configuration really uses and takes PORT= and CONFIG=;
`make vcenter-session` reaches a node on the configuration's port or PORT=.

Real make, real kms-server, in a temporary copy of the top-level files (the
code comes from the project's editable .venv).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest
from pg_cluster import free_port, free_ports

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _links(text: str) -> list[str]:
    """Markdown link targets and `path`-like code spans that name a file."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    targets += re.findall(r"`((?:\.\./|docs/|etc/|tools/|bench/|broker/|kms_server/|kmip_core/)[^`\s]*)`", text)
    return targets


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_docs_name_nothing_outside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text
    assert not re.search(r"(?<![\w.])shared/", text), "a path under shared/ is not in a clone"
    for target in _links(text):
        if re.match(r"[a-z]+://", target) or target.startswith("#"):
            continue
        path = target.split("#")[0].rstrip(".,;:")
        if not path or any(ch in path for ch in "<>*{}$"):
            continue
        base = doc.parent if doc.parent.name == "docs" and target.startswith("../") else ROOT
        resolved = (base / path).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc.name} links {target}, outside the repository"
        if "(" + target + ")" in text:  # a real markdown link must lead somewhere
            candidates = [resolved, (doc.parent / path).resolve()]
            assert any(c.exists() for c in candidates), f"{doc.name} links {target}, which does not exist"


def test_repository_paths_the_readme_names_exist():
    """Every `docs/...`, `etc/...`, `tools/...` file the README names is in the repository."""
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"`((?:docs|etc|tools|bench)/[\w./-]+\.(?:md|json|toml|py|yml|yaml))`", text))
    named |= set(re.findall(r"\]\(((?:docs|etc|tools)/[\w./-]+)\)", text))
    assert len(named) > 10
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"README.md names files that are not in the repository: {missing}"


def test_dev_config_has_the_auditor_make_pki_issues():
    cfg = tomllib.loads((ROOT / "etc" / "kms-dev.toml").read_text())
    assert "auditor" in cfg["access"]["auditors"]
    make = (ROOT / "Makefile").read_text()
    pki = make[make.index("\npki:") :]
    assert "--client auditor" in pki.split("\n\n", 2)[1]


def _copy(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    for name in ("Makefile", "setup.cfg", "pyproject.toml", "etc", "tools"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / name)
    (repo / ".venv").symlink_to(ROOT / ".venv")
    stamp = (ROOT / ".venv" / ".installed").stat().st_mtime
    for name in ("setup.cfg", "pyproject.toml"):  # make must not reinstall the shared venv
        os.utime(repo / name, (stamp - 1, stamp - 1))
    return repo


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PORT", "CONFIG", "MAKEFLAGS", "MAKELEVEL")}


class _MakeRun:
    """`make run ARGS` in the background until its node listens; its process group stopped at the end."""

    def __init__(self, repo: Path, log: Path, *args: str):
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                ["make", "--no-print-directory", "run", *args],
                cwd=repo,
                env=_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_for(self, pattern: str, timeout: float = 90.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log.read_text())
            if m:
                return m
            if self.proc.poll() is not None:
                pytest.fail(f"make run exited ({self.proc.returncode}):\n{self.log.read_text()}")
            time.sleep(0.2)
        pytest.fail(f"make run never printed {pattern!r}:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def repo(tmp_path):
    if shutil.which("make") is None or not (ROOT / ".venv" / "bin" / "kms-server").exists():
        pytest.skip("needs make and the project's .venv")
    return _copy(tmp_path)


@pytest.mark.slow
def test_make_run_port_0_banner_and_vcenter_session(repo, tmp_path):
    # The copy's configuration: its own audit page and metrics ports, free ones.
    config = repo / "etc" / "kms-dev.toml"
    web, metrics = free_ports(2)
    text = config.read_text().replace("web_port = 5698", f"web_port = {web}").replace("port = 9696", f"port = {metrics}")
    config.write_text(text)
    run = _MakeRun(repo, tmp_path / "run.log", "PORT=0")
    try:
        port = int(run.wait_for(r"kms-server listening on 127\.0\.0\.1:(\d+)").group(1))
        banner = run.log.read_text()
        assert "KMIP (mutual TLS):  127.0.0.1: a free port, printed by kms-server below" in banner
        assert f"https://127.0.0.1:{web}/" in banner and f"http://127.0.0.1:{metrics}/metrics" in banner
        assert "5696" not in banner.split("kms-server listening")[0]
        assert (repo / "certs/dev/auditor.pem").is_file() and (repo / "certs/dev/auditor.key").is_file()

        # Without PORT= the session goes to the configuration's port (5696 here, where
        # nothing of ours listens): the port the node printed must be given.
        session = subprocess.run(
            ["make", "--no-print-directory", "vcenter-session", f"PORT={port}"],
            cwd=repo, env=_env(), capture_output=True, text=True, timeout=120,
        )
        assert session.returncode == 0, session.stdout + session.stderr
        assert "0 items failed" in session.stdout
    finally:
        run.stop()
    assert run.proc.returncode is not None


@pytest.mark.slow
def test_make_run_config_and_vcenter_session_follow_the_configuration(repo, tmp_path):
    port, web = free_ports(2)
    other = repo / "etc" / "other.toml"
    text = (repo / "etc" / "kms-dev.toml").read_text()
    text = text.replace("port = 5696", f"port = {port}").replace("web_port = 5698", f"web_port = {web}")
    text = re.sub(r"\[metrics\].*", "", text, flags=re.S)  # no metrics listener in this one
    other.write_text(text)
    run = _MakeRun(repo, tmp_path / "run.log", "CONFIG=etc/other.toml")
    try:
        run.wait_for(rf"kms-server listening on 127\.0\.0\.1:{port}\b")
        banner = run.log.read_text()
        assert "Starting one KMS node with etc/other.toml:" in banner
        assert f"KMIP (mutual TLS):  127.0.0.1:{port}" in banner
        assert f"https://127.0.0.1:{web}/" in banner
        assert "metrics" not in banner.split("kms-server listening")[0].lower().replace("/metrics", "")
        session = subprocess.run(
            ["make", "--no-print-directory", "vcenter-session", "CONFIG=etc/other.toml"],
            cwd=repo, env=_env(), capture_output=True, text=True, timeout=120,
        )
        assert session.returncode == 0, session.stdout + session.stderr
        assert "0 items failed" in session.stdout
    finally:
        run.stop()


def test_vcenter_session_with_a_free_port_configuration_says_which_port_to_give(tmp_path):
    config = tmp_path / "kms.toml"
    config.write_text('[server]\nhost = "127.0.0.1"\nport = 0\n[master_key]\nfile = "master.key"\n')
    result = subprocess.run(
        [str(ROOT / ".venv/bin/python"), str(ROOT / "tools/vcenter_session.py"), "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "make vcenter-session PORT=P" in lines[0], result.stderr


@pytest.mark.slow
def test_make_demo_port_is_the_drill_kms_port(repo):
    if any(shutil.which(t) is None for t in ("swtpm", "swtpm_setup", "tpm2_nvdefine")):
        pytest.skip("the drill needs swtpm and tpm2-tools")
    port = free_port()
    result = subprocess.run(
        ["make", "--no-print-directory", "demo", f"PORT={port}", "DEMO_ARGS=--vms 1 --hosts 1 --json"],
        cwd=repo, env={**_env(), "COLUMNS": "200"}, capture_output=True, text=True, timeout=240,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"kms-server on 127.0.0.1:{port}" in result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["vms"] == summary["recovered"] == 1


def test_make_demo_refuses_a_config(repo):
    result = subprocess.run(
        ["make", "--no-print-directory", "demo", "CONFIG=etc/other.toml"],
        cwd=repo, env=_env(), capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    assert "make demo: the drill writes its own KMS configuration" in result.stdout + result.stderr
    assert "vtpm-drill:" not in result.stdout + result.stderr  # refused before the drill starts
