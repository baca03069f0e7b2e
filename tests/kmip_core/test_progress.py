"""kmip_core.progress: the one progress display (issue 17, point 4)."""

from __future__ import annotations

import io
import re
import time

from kmip_core.progress import Progress

LINE = re.compile(r"^p: work: (\d+)/(\d+) rows \((\d+\.\d) s, (\d+\.\d) rows/s\)$")


def test_plain_lines_start_tenths_and_end_with_done_total_rate_elapsed():
    stream = io.StringIO()
    with Progress("work", 20, unit="rows", stream=stream, prefix="p: ", tenths=True, every=60) as p:
        for _ in range(20):
            p.advance()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "p: work: 0/20 rows"
    assert [LINE.match(x).group(1) for x in lines[1:]] == [str(n) for n in range(2, 21, 2)]  # every tenth, once
    assert all(LINE.match(x).group(2) == "20" for x in lines[1:])


def test_plain_lines_keep_coming_while_nothing_advances():
    """Off a terminal a step that counts nothing still says it runs, every `every` s."""
    stream = io.StringIO()
    with Progress("audit trail", stream=stream, prefix="vtpm-drill: ", every=0.2, announce=False, final=False):
        time.sleep(1.1)
    lines = stream.getvalue().splitlines()
    assert 3 <= len(lines) <= 6, lines
    assert all(re.fullmatch(r"vtpm-drill: audit trail: \d+\.\d s elapsed", x) for x in lines), lines


def test_counted_work_reports_rate_between_advances():
    stream = io.StringIO()
    with Progress("loading keys", 1000, unit="keys", stream=stream, every=0.2, announce=False, final=False) as p:
        p.advance(100)
        time.sleep(0.5)
    lines = stream.getvalue().splitlines()
    assert lines and all(x.startswith("loading keys: 100/1000 keys (") and "keys/s" in x for x in lines), lines


def test_callback_takes_done_total_reports_and_starts_at_the_first():
    stream = io.StringIO()
    p = Progress("backing up", unit="rows", stream=stream, prefix="kms-admin: ", tenths=True, every=60)
    report = p.callback()
    assert stream.getvalue() == ""
    for done in (0, 8, 16):
        report(done, 16)
    p.close()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "kms-admin: backing up: 0/16 rows"
    assert lines[-1].startswith("kms-admin: backing up: 16/16 rows (")
    assert len([x for x in lines if x.startswith("kms-admin: backing up: 16/16")]) == 1


def test_a_terminal_gets_a_rich_bar_not_lines():
    stream = io.StringIO()
    with Progress("registering VMs", 3, unit="VMs", stream=stream, tty=True, every=0.1) as p:
        for _ in range(3):
            p.advance()
            time.sleep(0.05)
    text = stream.getvalue()
    assert "registering VMs" in text and "3/3" in text
    assert "\x1b[" in text  # drawn with terminal control sequences
    assert "VMs/s" not in text  # no plain lines on a terminal


def test_a_closed_stream_never_fails_the_work():
    stream = io.StringIO()
    p = Progress("x", 2, stream=stream, every=0.05).start()
    stream.close()
    p.advance(2)
    time.sleep(0.15)
    p.close()
