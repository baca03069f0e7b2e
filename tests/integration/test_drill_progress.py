"""`vtpm-drill > log` is never silent for long (issue 17, point 4): off a
terminal every phase prints plain progress lines (a ticker every 5 s while a
step runs, done/total for the VMs' batches and the audit step), so the gap
between two lines of its output stays well under 15 s. A real drill, small."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


def test_drill_output_off_a_terminal_has_no_long_silence(tmp_path):
    missing = [t for t in ("swtpm", "swtpm_setup", "tpm2_nvdefine") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the drill needs {', '.join(missing)}")
    proc = subprocess.Popen(
        [str(BIN / "vtpm-drill"), "--vms", "2", "--hosts", "1", "--workdir", str(tmp_path / "drill")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines: list[tuple[float, str]] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.monotonic(), line.rstrip("\n")))

    started = time.monotonic()
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        reader.join(timeout=10)
    text = "\n".join(line for _, line in lines)
    assert proc.returncode == 0, text
    times = [started] + [t for t, _ in lines]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < 10, f"{max(gaps):.1f} s without a line:\n{text}"
    # Counted phases: the VMs' batches and the audit step, as done/total with rate and time.
    assert re.search(r"^vtpm-drill: first power-on: 2/2 \(\d+\.\d s, [\d.]+/s\)$", text, re.M), text
    assert re.search(r"^vtpm-drill: power-on after recovery: 2/2 \(", text, re.M), text
    assert re.search(r"^vtpm-drill: audit trails: .*: 3/3 \(", text, re.M), text
    assert "\x1b[" not in text  # plain text, no terminal drawing
