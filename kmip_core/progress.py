"""Progress of long work, the same everywhere (issue 17, point 4): a rich
progress bar when the stream is a terminal; otherwise plain lines, so that a
log (`make demo > log`, a scheduled backup) is never silent for long:

    <prefix><label>: 0/16 rows
    <prefix><label>: 9/16 rows (4.1 s, 2.2 rows/s)
    <prefix><label>: 16/16 rows (6.3 s, 2.5 rows/s)

A plain line is printed when the work starts (`announce`), then every
`every` seconds from a timer thread whatever the work does (a step that
counts nothing still says how long it has run), at every tenth of the work
if `tenths` is set, and once more at the end (`final`).

    with Progress("loading keys", total=n, unit="keys") as p:
        for batch in batches:
            ...
            p.advance(len(batch))

`callback()` gives the `(done, total)` function kmip_core.backup_format and
the backups take. Used by kms-admin (backup, restore, db verify, master-key
rotate), vtpm-broker backup/restore, vtpm-drill (every phase), vtpm-mgmt's
bulk commands and the benchmarks' loading.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["Callback", "Progress", "is_terminal"]

# (done, total): what a long operation reports as it goes.
Callback = Callable[[int, int], None]


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """One piece of work of `total` units (None: not counted, only timed)."""

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        unit: str = "",
        done: int = 0,
        stream: IO[str] | None = None,
        tty: bool | None = None,
        prefix: str = "",
        every: float = 5.0,
        announce: bool = True,
        final: bool = True,
        tenths: bool = False,
        transient: bool = False,
        console: Any = None,
    ):
        self.label, self.total, self.unit, self.prefix = label, total, unit, prefix
        self.done = self.first = done
        self.stream = stream if stream is not None else (console.file if console is not None else sys.stderr)
        self.tty = is_terminal(self.stream) if tty is None else tty
        self.every, self.announce, self.final, self.tenths = every, announce, final, tenths
        self.transient, self.console = transient, console
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._shown_tenth = -1
        self._printed_done: int | None = None
        self._bar: Any = None
        self._task: Any = None
        self._timer: threading.Thread | None = None
        self._open = False

    # --- life ---------------------------------------------------------------------------------

    def start(self) -> Progress:
        if self._open:
            return self
        self._open = True
        self.started = time.monotonic()
        if self.tty:
            self._start_bar()
        else:
            if self.announce:
                self._print(self.line(timed=False))
                self._shown_tenth = self._tenth()
            self._timer = threading.Thread(target=self._tick, name=f"progress: {self.label}", daemon=True)
            self._timer.start()
        return self

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._stop.set()
        if self._timer is not None:
            self._timer.join(timeout=5)
        if self._bar is not None:
            self._bar.stop()
        elif self.final and self._printed_done != self.done:
            self._print(self.line())

    def __enter__(self) -> Progress:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reporting ----------------------------------------------------------------------------

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
        self._changed()

    def update(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
        self._changed()

    def callback(self) -> Callback:
        """`(done, total)` reports, started at the first one."""

        def report(done: int, total: int) -> None:
            if not self._open:
                with self._lock:
                    self.done, self.first, self.total = done, done, total
                self.start()
            self.update(done, total)

        return report

    def line(self, *, timed: bool = True) -> str:
        """The plain line: done/total (or done), elapsed, rate."""
        with self._lock:
            done, total = self.done, self.total
        unit = f" {self.unit}" if self.unit else ""
        count = f"{done}/{total}{unit}" if total is not None else (f"{done}{unit}" if done or self.unit else "")
        if not timed:
            return f"{self.prefix}{self.label}: {count or 'started'}"
        elapsed = time.monotonic() - self.started
        parts = [f"{elapsed:.1f} s"]
        if (total is not None or done) and elapsed > 0:
            parts.append(f"{(done - self.first) / elapsed:.1f}{unit}/s")
        text = f"{count} ({', '.join(parts)})" if count else f"{', '.join(parts)} elapsed"
        return f"{self.prefix}{self.label}: {text}"

    # --- inside ---------------------------------------------------------------------------------

    def _tenth(self) -> int:
        if not self.total:
            return 10 if self.total == 0 else -1
        return min(10, self.done * 10 // self.total)

    def _changed(self) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, total=self.total)
            return
        if self.tenths and self._open:
            tenth = self._tenth()
            if tenth > self._shown_tenth:
                self._shown_tenth = tenth
                self._print(self.line())

    def _tick(self) -> None:
        while not self._stop.wait(self.every):
            self._print(self.line())

    def _print(self, text: str) -> None:
        self._printed_done = self.done
        try:  # one write: a line never interleaves with another thread's output
            self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is never fatal
            pass

    def _start_bar(self) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        console = self.console or Console(file=self.stream, force_terminal=True)
        if self.total is None:
            columns: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()]
        else:
            columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
            if self.unit:
                columns.append(TextColumn(self.unit))
            columns += [TimeElapsedColumn(), TimeRemainingColumn()]
        self._bar = RichProgress(*columns, console=console, transient=self.transient)
        self._task = self._bar.add_task(self.label, total=self.total, completed=self.done)
        self._bar.start()
