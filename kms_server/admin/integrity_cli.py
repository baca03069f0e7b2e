"""``kms-admin db verify`` and ``kms-admin master-key rotate``: the
operator's side of authenticated rows and the keyring
(docs/at-rest-sealing.md).

`db verify` exits 0 when every object row and the store digest check, 1
naming each object that fails (and the digest's problem), 2 with a one-line
error when the store or its master key cannot be opened. `--reset-digest` accepts the rows as they are now (after
an operator has decided so): rows that fail their own MAC stay refused.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

from kmip_core.config import ConfigError
from kms_server.admin.backup_cli import ProgressReporter
from kms_server.admin.errors import CommandError
from kms_server.config import load_config

__all__ = ["master_key_rotate", "db_verify", "add_verify_arguments", "add_rotate_arguments"]

ADMIN_NODE = "kms-admin"


def _error(message: str) -> Exception:
    return CommandError(message)


def _open(args: argparse.Namespace):
    """(config, storage, barrier, master key) for the configured store."""
    from kmip_core.sealing.barrier import BarrierError, open_barrier
    from kms_server.storage import open_storage
    from kms_server.storage.base import StorageError

    overrides = {"storage": {"db_url": args.db_url}} if getattr(args, "db_url", None) else None
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        raise _error(str(exc)) from None
    if cfg.storage.db_url.startswith("memory:"):
        raise _error("the in-memory store holds nothing to check; give a sqlite:// or postgresql:// --db-url")
    try:
        storage = open_storage(cfg.storage.db_url, schema="check")
    except StorageError as exc:
        raise _error(f"{exc}; check storage.db_url") from None
    try:
        barrier = open_barrier(storage, source=cfg.master_key)
    except BarrierError as exc:
        storage.close()
        raise _error(str(exc)) from None
    return cfg, storage, barrier


def _audit(storage, operation: str, detail: str, uids: list[str] | None = None) -> None:
    """An administrative record in the audit trail."""
    from kmip_core.audit.record import system_entry
    from kms_server.audit.trail import AuditTrail

    entry = system_entry(ADMIN_NODE, operation, detail, uids or [])
    trail = AuditTrail(storage, node=ADMIN_NODE)
    with storage.transaction() as txn:
        trail.append(txn, entry)


# --- db verify ----------------------------------------------------------------------


def db_verify(args: argparse.Namespace) -> int:
    from kms_server.keystore import row_auth

    _cfg, storage, barrier = _open(args)
    try:
        reporter = ProgressReporter()
        with storage.transaction(read_only=True) as txn:
            from kms_server.storage.base import LocateQuery

            # Locate of everything: just the uids, to size the progress bar.
            total = len(txn.locate(LocateQuery()))
        with reporter.running():
            step = reporter.phase("verifying")
            seen = [0]

            def tick() -> None:
                seen[0] += 1
                step(seen[0], total)

            step(0, total)
            with storage.transaction(read_only=not args.reset_digest) as txn:
                report = row_auth.verify_store(txn, barrier, unseal=True, progress=tick)
                if args.reset_digest and report.digest_problem is not None:
                    row_auth.reset_digest(txn, barrier)
        result = {
            "objects": report.objects,
            "failures": [{"uid": uid, "problem": problem} for uid, problem in report.failures],
            "digest": report.digest_problem or "ok",
        }
        if args.json:
            print(json.dumps(result, sort_keys=True))
        else:
            for uid, problem in report.failures:
                print(f"object {uid}: {problem}")
            if report.digest_problem:
                print(f"store digest: {report.digest_problem}")
            print(
                f"{report.objects} objects checked: {len(report.failures)} fail their integrity check; "
                f"store digest {'ok' if report.digest_problem is None else 'FAILS'}"
            )
        if args.reset_digest and report.digest_problem is not None:
            _audit(
                storage,
                "DB_RESET_DIGEST",
                f"store digest reset over {report.objects} rows ({report.digest_problem})",
                [uid for uid, _ in report.failures],
            )
            print("store digest reset: the rows as they stand now are accepted (recorded in the audit trail)")
            return 0 if not report.failures else 1
        return 0 if report.ok else 1
    finally:
        barrier.close()
        storage.close()


def add_verify_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--json", action="store_true", help="print the result as one JSON object")
    cmd.add_argument(
        "--reset-digest",
        action="store_true",
        help="accept the rows as they are now (after a restore or an investigation); recorded in the audit trail",
    )


# --- master-key rotate ------------------------------------------------------------------


@dataclass(frozen=True)
class _NewKey:
    file: Path | None = None
    passphrase_file: Path | None = None
    pkcs11_module: Path | None = None
    token_label: str | None = None
    key_label: str | None = None
    pin_file: Path | None = None


def _new_master(args: argparse.Namespace, storage):
    from kmip_core.sealing.master_key import MasterKeyError
    from kmip_core.sealing.opener import open_master_key

    given = [x for x in (args.new_key_file, args.new_passphrase_file, args.new_config) if x]
    if len(given) != 1:
        raise _error("give the new master key with exactly one of --new-key-file, --new-passphrase-file, --new-config")
    source: object
    if args.new_config:
        try:
            source = load_config(args.new_config).master_key
        except ConfigError as exc:
            raise _error(f"--new-config: {exc}") from None
    else:
        source = _NewKey(file=args.new_key_file, passphrase_file=args.new_passphrase_file)
    try:
        with storage.transaction() as txn:
            return open_master_key(source, txn.get_meta, txn.set_meta)
    except MasterKeyError as exc:
        raise _error(str(exc)) from None


def master_key_rotate(args: argparse.Namespace) -> int:
    from kmip_core.sealing.barrier import Barrier
    from kms_server.keystore import rotation

    cfg, storage, barrier = _open(args)
    opened = [barrier]
    try:
        from kmip_core.sealing.master_key import MasterKeyError
        from kmip_core.sealing.opener import open_master_key

        try:
            with storage.transaction() as txn:
                old = open_master_key(cfg.master_key, txn.get_meta)
        except MasterKeyError as exc:
            raise _error(str(exc)) from None
        opened.append(old)
        if args.finish:
            try:
                ring = rotation.finish(storage, old, Barrier)
            except rotation.RotationError as exc:
                raise _error(str(exc)) from None
            _audit(storage, "MASTER_KEY_ROTATE_FINISH", f"keyring now only under {old.key_id}, data key {ring.active}")
            print(f"rotation finished: data key {ring.active} only, wrapped under {old.description} alone")
            return 0
        new = _new_master(args, storage)
        opened.append(new)
        try:
            state = rotation.begin(storage, old, new)
        except rotation.RotationError as exc:
            raise _error(str(exc)) from None
        if not state.resumed:
            _audit(
                storage,
                "MASTER_KEY_ROTATE_BEGIN",
                f"data key {state.new_term} replaces {state.old_term}; keyring under {old.key_id} and {new.key_id}",
            )
        print(
            f"{'resuming' if state.resumed else 'started'} rotation: data key {state.new_term} "
            f"replaces {state.old_term}; keyring wrapped under {old.description} and {new.description}"
        )
        ring_barrier = Barrier(state.keyring)
        left = rotation.pending(storage, ring_barrier)
        total, done, refused = len(left), 0, []
        started = time.monotonic()
        reporter = ProgressReporter()
        with reporter.running():
            step = reporter.phase("re-sealing")
            step(0, total)
            for start in range(0, total, args.batch):
                count, bad = rotation.reseal_batch(storage, ring_barrier, left[start : start + args.batch])
                done += count
                refused += bad
                step(min(start + args.batch, total), total)
        for uid, problem in refused:
            print(f"object {uid}: not re-sealed: {problem}")
        _audit(
            storage,
            "MASTER_KEY_ROTATE_RESEAL",
            f"{done} objects re-sealed under data key {state.new_term}; {len(refused)} refused",
            [uid for uid, _ in refused],
        )
        print(f"{done} objects re-sealed under data key {state.new_term} in {time.monotonic() - started:.1f} s")
        still = rotation.pending(storage, ring_barrier)
        if still:
            print(f"{len(still)} objects are still under the old data key; run this command again")
            return 1
        print(
            "next: configure every node with the new master key and restart (or reload) them, "
            "then run 'kms-admin master-key rotate --finish --config <the new configuration>'"
        )
        return 0
    finally:
        # A token allows one login per process: let go of every session.
        for holder in opened:
            holder.close()
        storage.close()


def add_rotate_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument("--config", help="kms-server configuration file naming the current master key")
    cmd.add_argument("--db-url", help="database URL (overrides the configuration)")
    cmd.add_argument("--new-key-file", type=Path, help="the new master key file (kms-admin master-key new --out F)")
    cmd.add_argument("--new-passphrase-file", type=Path, help="file holding the new master passphrase")
    cmd.add_argument(
        "--new-config", type=Path, help="a configuration whose [master_key] names the new key (e.g. a PKCS#11 token)"
    )
    cmd.add_argument("--batch", type=int, default=200, help="objects re-sealed per transaction (default 200)")
    cmd.add_argument(
        "--finish",
        action="store_true",
        help="after every node runs with the new key: drop the old data key and the old master key's copy",
    )
