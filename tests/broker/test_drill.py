"""The drill's parts that need no servers: its command-line errors and the
forked command runner."""

from __future__ import annotations

import pytest

from broker.drill import cli
from broker.drill.runner import run_forked


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--vms", "0"], "--vms must be between 1 and 1000"),
        (["--hosts", "100"], "--hosts must be between 1 and 64"),
        (["--vms", "ten"], "invalid int value"),
        (["--jobs", "0"], "--jobs must be between 1 and 128"),
        (["--lose", "broker"], "--lose must be management or management,broker"),
        (["--lose", "management,kms"], "--lose must be management or management,broker"),
    ],
)
def test_command_line_errors_are_one_line(capsys, argv, words):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vtpm-drill: error: ") and words in err


def test_workdir_must_be_new_or_empty(tmp_path, capsys):
    (tmp_path / "leftover").write_text("x")
    assert cli.main(["--workdir", str(tmp_path)]) == 2
    assert "must be a new or empty directory" in capsys.readouterr().err


def test_forked_command_has_its_own_output_and_status(tmp_path):
    """A tool's main() runs in a forked child: its stdout, stderr and exit
    status come back; the parent's streams are untouched."""
    done = run_forked("vtpm-mgmt", "vm", "check", "--datastore", str(tmp_path), "--provider", "p")
    assert done.returncode == 0 and "checked 0 VMs" in done.stdout and done.stderr == ""
    failed = run_forked("vtpm-mgmt", "vm", "check", "--datastore", str(tmp_path / "nowhere"))
    assert failed.returncode == 2 and failed.stdout == ""
    assert failed.stderr.startswith("vtpm-mgmt: error:") and "not a directory" in failed.stderr
