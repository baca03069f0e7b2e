"""One command-line convention for every console script (issue 17, point 5):
every option and subcommand of every parser has help text, `--version` works,
global options are accepted before and after the subcommand, and a usage
error is one line that says where to look. The parsers are the real ones,
found through setup.cfg's console_scripts; the behaviour is checked by
running the installed commands."""

from __future__ import annotations

import argparse
import configparser
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

from kmip_core import __version__, cliopts

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _console_scripts() -> dict[str, str]:
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    lines = cfg["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict((part.strip() for part in line.split("=", 1)) for line in lines if line.strip())


SCRIPTS = _console_scripts()


class _Captured(BaseException):  # past the entry points' "except Exception"
    def __init__(self, parser: argparse.ArgumentParser):
        self.parser = parser


def _root_parser(target: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser the entry point builds: its first parse_args call is stopped and kept."""
    module, function = target.split(":")
    entry = getattr(importlib.import_module(module), function)

    def capture(self, args=None, namespace=None):  # noqa: ARG001
        raise _Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    monkeypatch.setattr(sys, "argv", [module, "--help"])
    with pytest.raises(_Captured) as caught:
        entry(["--help"])
    return caught.value.parser


def test_every_console_script_is_checked():
    assert {"kms-server", "kms-admin", "vtpm-broker", "vtpm-mgmt", "vtpm-host", "vtpm-drill"} <= set(SCRIPTS)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_every_option_and_subcommand_has_help(script, monkeypatch):
    root = _root_parser(SCRIPTS[script], monkeypatch)
    missing = []
    count = 0
    for parser in cliopts.parsers(root):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    count += 1
                    if not choice.help:
                        missing.append(f"{parser.prog} {choice.dest} (subcommand)")
                continue
            if not action.option_strings:
                continue
            count += 1
            if action.help is None or (action.help != argparse.SUPPRESS and not action.help.strip()):
                missing.append(f"{parser.prog} {'/'.join(action.option_strings)}")
    assert count > 1
    assert not missing, f"options without help text: {missing}"


@pytest.mark.parametrize("script", ["kms-server", "kms-admin", "vtpm-broker", "vtpm-mgmt", "vtpm-host", "vtpm-drill"])
def test_version(script):
    result = subprocess.run([str(BIN / script), "--version"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{script} {__version__}"


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60, env=env)


def _one_line(result: subprocess.CompletedProcess, prog: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    "before, after",
    [
        (["kms-admin", "--config", "{missing}", "db", "status"], ["kms-admin", "db", "status", "--config", "{missing}"]),
        (["vtpm-broker", "--config", "{missing}", "admin", "list"], ["vtpm-broker", "admin", "list", "--config", "{missing}"]),
        (["vtpm-broker", "--log-level", "DEBUG", "--config", "{missing}", "admin", "list"],
         ["vtpm-broker", "admin", "list", "--log-level", "DEBUG", "--config", "{missing}"]),
        (["vtpm-broker", "--json", "--config", "{missing}", "admin", "list"],
         ["vtpm-broker", "admin", "list", "--json", "--config", "{missing}"]),
        (["vtpm-mgmt", "--state-dir", "{missing}", "vm", "list"], ["vtpm-mgmt", "vm", "list", "--state-dir", "{missing}"]),
        (["vtpm-mgmt", "--json", "--state-dir", "{missing}", "vm", "list"],
         ["vtpm-mgmt", "vm", "list", "--json", "--state-dir", "{missing}"]),
        (["vtpm-host", "--state-dir", "{missing}", "status"], ["vtpm-host", "status", "--state-dir", "{missing}"]),
        (["vtpm-host", "--json", "--state-dir", "{missing}", "status"],
         ["vtpm-host", "status", "--json", "--state-dir", "{missing}"]),
    ],
    ids=lambda argv: " ".join(argv[:2]) if argv[0] != "vtpm-broker" else " ".join(argv[:3]),
)
def test_global_options_before_and_after_the_command(before, after, tmp_path):
    """The same command with the global option before or after the subcommand
    gets as far as using its value: the same one-line error naming the
    missing file or directory (no 'unrecognized arguments')."""
    missing = str(tmp_path / "missing")
    results = [_run(*(missing if a == "{missing}" else a for a in argv)) for argv in (before, after)]
    lines = [_one_line(r, before[0]) for r in results]
    assert lines[0] == lines[1]
    assert missing in lines[0] and "unrecognized" not in lines[0]


def test_after_wins_over_before(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    line = _one_line(_run("vtpm-host", "--state-dir", str(first), "status", "--state-dir", str(second)), "vtpm-host")
    assert str(second) in line and str(first) not in line


@pytest.mark.parametrize(
    "argv, says",
    [
        (["kms-admin", "--json", "pki", "init", "--dir", "x"], "does not take --json"),
        (["kms-admin", "--config", "x.toml", "pki", "init", "--dir", "x"], "does not take --config"),
        (["vtpm-broker", "--json", "init"], "does not take --json"),
        (["vtpm-mgmt", "--json", "init", "--name", "a", "--broker", "https://b", "--ca", "c", "--provider", "p"],
         "does not take --json"),
        (["vtpm-broker", "admin", "no-such-command"], "invalid choice"),
        (["vtpm-drill", "--no-such-option"], "unrecognized arguments"),
    ],
)
def test_usage_errors_are_one_line_with_where_to_look(argv, says, tmp_path):
    result = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    line = _one_line(result, argv[0])
    assert says in line and "--help" in line, line
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_log_level_shows_records_of_that_level(where, tmp_path):
    """kms-admin has no logging configuration of its own: --log-level INFO
    (before or after the command) shows the schema migration's INFO records;
    without it they stay hidden, as before."""
    (tmp_path / "data").mkdir()
    config = tmp_path / "kms.toml"
    config.write_text('[server]\ndata_dir = "data"\n[master_key]\nfile = "m.key"\n')
    argv = ["db", "upgrade", "--config", str(config)]
    argv = ["--log-level", "info", *argv] if where == "before" else [*argv, "--log-level", "INFO"]
    shown = _run("kms-admin", *argv)
    assert shown.returncode == 0, shown.stderr
    assert "kms-admin: INFO alembic.runtime.migration: Running upgrade" in shown.stderr
    (tmp_path / "data" / "kms.db").unlink()
    quiet = _run("kms-admin", "db", "upgrade", "--config", str(config))
    assert quiet.returncode == 0 and "INFO" not in quiet.stderr, quiet.stderr


@pytest.mark.parametrize("script", ["kms-admin", "vtpm-broker", "vtpm-mgmt", "vtpm-host", "vtpm-drill"])
def test_every_tool_takes_log_level(script, monkeypatch):
    root = _root_parser(SCRIPTS[script], monkeypatch)
    assert "--log-level" in root._option_string_actions
