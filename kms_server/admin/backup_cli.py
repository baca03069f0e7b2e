"""``kms-admin backup`` and ``kms-admin restore`` (the logic is in backup.py).

Progress goes to stderr (kmip_core.progress): a rich progress bar when
stderr is a terminal, otherwise a plain line at every tenth of the work and
every 5 s, so logs of scheduled backups stay short. Results go to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from kmip_core.progress import Progress, is_terminal
from kms_server.admin import backup as backup_mod
from kms_server.admin.errors import CommandError

__all__ = ["ProgressReporter", "register_backup"]

PROG = "kms-admin"


class ProgressReporter:
    """Turns (done, total) callbacks into a progress display on `stream`
    (kmip_core.progress): rich bars on a terminal, plain lines otherwise (the
    start, every tenth, every 5 s)."""

    def __init__(self, stream: IO[str] | None = None, *, tty: bool | None = None):
        self._stream = stream if stream is not None else sys.stderr
        self._tty = is_terminal(self._stream) if tty is None else tty
        self._current: Progress | None = None

    @contextlib.contextmanager
    def running(self) -> Iterator[ProgressReporter]:
        try:
            yield self
        finally:
            self._finish()

    def _finish(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None

    def phase(self, label: str) -> backup_mod.Progress:
        """A callback for one phase of the work ("backing up", "verifying");
        a phase's first report ends the one before it."""
        progress = Progress(label, unit="rows", stream=self._stream, tty=self._tty, prefix=f"{PROG}: ", tenths=True)
        report = progress.callback()

        def on_report(done: int, total: int) -> None:
            if self._current is not progress:
                self._finish()
                self._current = progress
            report(done, total)

        return on_report


def _config(args: argparse.Namespace):
    from kms_server.config import load_config

    overrides = {"storage": {"db_url": args.db_url}} if args.db_url else None
    return load_config(args.config, overrides)


def _backup(args: argparse.Namespace) -> int:
    cfg = _config(args)
    reporter = ProgressReporter()
    try:
        with reporter.running():
            summary = backup_mod.backup(cfg, args.out, reporter.phase("backing up"), overwrite=args.force)
    except backup_mod.BackupError as exc:
        raise CommandError(str(exc)) from None
    print(
        f"wrote {summary.path} (mode 0600, {summary.size} bytes): {backup_mod.describe_rows(summary.rows)}; "
        f"schema revision {summary.schema_revision}",
        flush=True,
    )
    print(
        "its key is wrapped by the master key: keep that key file, passphrase or token key, apart from the backup, "
        "for as long as the backup is kept",
        flush=True,
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    cfg = _config(args)
    reporter = ProgressReporter()
    try:
        with reporter.running():
            summary = backup_mod.restore(
                cfg,
                args.from_file,
                reporter.phase("restoring"),
                verify_progress=reporter.phase("verifying"),
            )
    except backup_mod.BackupError as exc:
        raise CommandError(str(exc)) from None
    print(
        f"restored {backup_mod.describe_rows(summary.rows)} into {summary.database} "
        f"from the backup made {summary.backup_created_at} on {summary.backup_node}",
        flush=True,
    )
    print("start kms-server on it with the same master key", flush=True)
    return 0


def register_backup(subparsers: argparse._SubParsersAction) -> None:
    """Add `backup` and `restore` to kms-admin."""
    out = subparsers.add_parser(
        "backup",
        help="write an encrypted, authenticated backup of the key store",
        description="Write every object, attribute and server value of the store to FILE, in one "
        "consistent snapshot (servers may keep running). The file is encrypted and authenticated "
        "under a random key that the master key wraps; sealed keys stay sealed. See docs/backup-format.md.",
    )
    out.add_argument("--out", required=True, type=Path, metavar="FILE", help="backup file to write (mode 0600)")
    out.add_argument(
        "--config", type=Path, metavar="FILE", help="kms-server configuration file (storage.db_url, master_key)"
    )
    out.add_argument("--db-url", metavar="URL", help="database URL (overrides the configuration)")
    out.add_argument("--force", action="store_true", help="replace FILE if it exists")
    out.set_defaults(func=_backup)

    back = subparsers.add_parser(
        "restore",
        help="restore a backup into an empty database",
        description="Check the whole backup under the master key, then restore it into an empty "
        "database in one transaction: either everything is restored or nothing is written.",
    )
    back.add_argument("--from", dest="from_file", required=True, type=Path, metavar="FILE", help="backup file")
    back.add_argument(
        "--config", type=Path, metavar="FILE", help="kms-server configuration file (storage.db_url, master_key)"
    )
    back.add_argument("--db-url", metavar="URL", help="database URL to restore into (overrides the configuration)")
    back.set_defaults(func=_restore)
