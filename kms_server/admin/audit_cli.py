"""``kms-admin audit``: the signing key, verification, search, export and
checkpoints of the audit trail (docs/audit-trail.md).

`verify` exits 0 when the trail is intact, 1 naming the first record where
it was altered, removed, reordered, inserted or truncated, and 2 on a usage
error. It needs only the audit public key: against the database (--config)
or offline against an exported file (--file).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kmip_core.audit import audit_key, chain
from kms_server.admin.errors import CommandError
from kms_server.audit import query
from kms_server.audit import trail as audit_trail
from kms_server.storage.base import StorageError

__all__ = ["register_audit"]

EXIT_TAMPERED = chain.EXIT_TAMPERED
EXIT_USAGE = chain.EXIT_USAGE


def _command(func):
    """Report operator errors in one line (whether kms-admin runs as the
    console script or as `python -m`)."""

    def run(args) -> int:
        from kmip_core.config import ConfigError

        try:
            return func(args)
        except (CommandError, ConfigError) as exc:
            print(f"kms-admin: error: {exc}", file=sys.stderr)
            return EXIT_USAGE

    return run


# --- opening -----------------------------------------------------------------------


def _config(args):
    from kms_server.config import load_config

    overrides = {"storage": {"db_url": getattr(args, "db_url", None)}}
    return load_config(args.config, overrides, require_master_key=False)


def _storage(args):
    from kms_server.storage import open_storage

    cfg = _config(args)
    try:
        return open_storage(cfg.storage.db_url, schema="check"), cfg
    except (StorageError, ValueError) as exc:
        text = str(exc)
        raise CommandError(text if "db upgrade" in text else f"{text}; check --config and --db-url") from None


def _verifier(args, cfg):
    try:
        if args.public_key is not None:
            return audit_key.load_verifier(args.public_key)
        if cfg is not None and cfg.audit.signing_key_file is not None:
            return audit_key.load_signer(cfg.audit.signing_key_file).public
    except audit_key.AuditKeyError as exc:
        raise CommandError(str(exc)) from None
    return None


# --- key ---------------------------------------------------------------------------


def _key_new(args) -> int:
    public = args.public_out or args.out.with_name(args.out.name.removesuffix(".key") + ".pub")
    try:
        verifier = audit_key.generate(args.out, public)
    except audit_key.AuditKeyError as exc:
        raise CommandError(str(exc)) from None
    print(f"wrote audit signing key {args.out} (mode 0600) and public key {public} (key id {verifier.key_id})")
    print(f'set [audit] signing_key_file = "{args.out}" in the server configuration; give {public} to the auditors')
    return 0


# --- verify ------------------------------------------------------------------------


def _verify(args) -> int:
    if args.file is not None:
        if args.public_key is None:
            raise CommandError("verifying an export needs the audit public key; add --public-key FILE")
        verifier = _verifier(args, None)
        try:
            records, checkpoints = audit_trail.read_export(args.file)
        except audit_trail.ExportError as exc:
            raise CommandError(str(exc)) from None
        report = chain.verify(records, checkpoints, verifier.check, verifier.key_id)
        where = str(args.file)
    else:
        storage, cfg = _storage(args)
        verifier = _verifier(args, cfg)
        try:
            report = audit_trail.verify_storage(storage, verifier)
        finally:
            storage.close()
        where = storage_shown(cfg)
    # The same words and exit statuses as vtpm-broker admin audit verify.
    return chain.verdict(report, where, signatures_checked=verifier is not None).emit()


def storage_shown(cfg) -> str:
    from kmip_core.config import redact_url

    return redact_url(cfg.storage.db_url)


# --- show / export -----------------------------------------------------------------

def query_records(storage, args) -> list:
    """Records matching the show filters (kms_server/audit/query.py)."""
    try:
        status, reason = query.result_filter(args.result) if args.result else (None, None)
        filters = query.Filters(
            vm=args.vm,
            host=args.host,
            object=args.object,
            client=args.client,
            operation=query.operation_name(args.operation) if args.operation else None,
            result=status,
            reason=reason,
            since=query.parse_time(args.since) if args.since else None,
            until=query.parse_time(args.until) if args.until else None,
            request_id=args.request_id,
            limit=args.limit,
        )
    except ValueError as exc:
        raise CommandError(f"{exc}; see 'kms-admin audit show --help'") from None
    return query.find(storage, filters)[1]


def _show(args) -> int:
    storage, _cfg = _storage(args)
    try:
        records = query_records(storage, args)
    finally:
        storage.close()
    if args.json:
        for record in records:
            body = json.loads(record.body)
            body["hash"] = record.hash
            print(json.dumps(body, ensure_ascii=False, sort_keys=True))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"audit trail: {len(records)} records")
    for column in ("seq", "time (UTC)", "client", "on behalf of", "request", "operation", "object", "x-Name"):
        table.add_column(column, no_wrap=True)
    table.add_column("result", no_wrap=True)
    table.add_column("details", overflow="fold")
    for record in records:
        body = json.loads(record.body)
        reason = (body.get("result") or {}).get("reason")
        table.add_row(
            str(record.seq),
            body.get("time", "")[:23].replace("T", " "),
            record.client,
            _on_behalf_of(body),
            _request_shown(body),
            record.operation if body.get("event") == "request" else f"{body.get('event')}",
            record.uid or "",
            record.x_name or "",
            {"SUCCESS": "ok", "OPERATION_UNDONE": "undone"}.get(record.result) or reason or "failed",
            _details(body),
        )
    console = Console()
    # A pipe or a file gets the whole table, not 80 columns of it.
    Console(soft_wrap=False, width=console.width if console.is_terminal else 220).print(table)
    return 0


def _on_behalf_of(body: dict) -> str:
    """Whom a client such as the broker acted for, from its correlation
    value ("host=esx-01"), else the peer address."""
    parts = query.correlation_parts(body.get("correlation"))
    named = [f"{k}:{v}" for k, v in parts.items() if k in ("host", "instance", "user") and v]
    return " ".join(named) or (body.get("peer") or "")


def _request_shown(body: dict) -> str:
    """The id that joins this record to the client's own trail: the
    broker's request id when it passed one, else the KMS's."""
    parts = query.correlation_parts(body.get("correlation"))
    return parts.get("broker-req") or body.get("correlation") or body.get("request_id") or ""


def _details(body: dict, width: int = 60) -> str:
    """The attributes the client supplied (name=value), or why it was
    refused; cut to `width` characters for the table (--json has it all)."""
    if body.get("detail") and (body.get("result") or {}).get("status") != "SUCCESS":
        text = str(body["detail"])
    else:
        parts = []
        for attribute in body.get("attributes") or []:
            value = attribute.get("value")
            parts.append(attribute.get("name", "?") if value is None else f"{attribute.get('name')}={value}")
        text = ", ".join(parts)
    return text if len(text) <= width else text[: width - 1] + "…"


def _export(args) -> int:
    storage, _cfg = _storage(args)
    if args.to.exists() and not args.force:
        raise CommandError(f"{args.to} exists; choose another file or add --force")
    tmp = args.to.with_name(args.to.name + ".part")
    count = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            records = audit_trail.iter_records(storage)
            cps = audit_trail.checkpoints(storage)

            def counted():
                nonlocal count
                for r in records:
                    count += 1
                    yield r

            for line in audit_trail.export_lines(counted(), cps):
                out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, args.to)
    finally:
        storage.close()
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {args.to}: {count} records, {len(cps)} checkpoints")
    print(f"verify it offline with: kms-admin audit verify --file {args.to} --public-key <audit.pub>")
    return 0


def _checkpoint(args) -> int:
    storage, cfg = _storage(args)
    if cfg.audit.signing_key_file is None:
        raise CommandError("no [audit] signing_key_file in the configuration; create one with: kms-admin audit key new")
    try:
        signer = audit_key.load_signer(cfg.audit.signing_key_file)
    except audit_key.AuditKeyError as exc:
        raise CommandError(str(exc)) from None
    try:
        checkpoint = audit_trail.AuditTrail(storage, f"kms-admin@{cfg.server.node_name}", signer).checkpoint()
    finally:
        storage.close()
    if checkpoint is None:
        print("nothing to sign: the last checkpoint already covers the newest record (or the trail is empty)")
    else:
        print(f"signed checkpoint at record {checkpoint.seq} (key id {checkpoint.key_id})")
    return 0


# --- parser ------------------------------------------------------------------------


def _db_args(p) -> None:
    p.add_argument("--config", type=Path, metavar="FILE", help="kms-server configuration file (storage.db_url, [audit])")
    p.add_argument("--db-url", metavar="URL", help="database URL (overrides the configuration)")


def register_audit(subparsers: argparse._SubParsersAction) -> None:
    group = subparsers.add_parser("audit", help="the audit trail: verify, show, export, checkpoint, key")
    commands = group.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)

    key = commands.add_parser("key", help="the Ed25519 key that signs checkpoints")
    key_commands = key.add_subparsers(dest="key_command", metavar="COMMAND", required=True)
    new = key_commands.add_parser("new", help="write a new signing key (0600) and its public key")
    new.add_argument("--out", required=True, type=Path, metavar="FILE", help="private key file to write")
    new.add_argument("--public-out", type=Path, metavar="FILE", help="public key file (default: FILE with .pub)")
    new.set_defaults(func=_command(_key_new))

    verify = commands.add_parser(
        "verify",
        help="check the chain and the signed checkpoints (exit 1 naming the first bad record)",
    )
    _db_args(verify)
    verify.add_argument("--file", type=Path, metavar="EXPORT", help="verify an exported file instead of the database")
    verify.add_argument("--public-key", type=Path, metavar="FILE", help="audit public key (PEM)")
    verify.set_defaults(func=_command(_verify))

    show = commands.add_parser("show", help="list records, filtered; a table, or JSON lines with --json")
    _db_args(show)
    show.add_argument("--object", metavar="UID", help="records of one object")
    show.add_argument("--vm", metavar="NAME_OR_UUID", help="records of every key of a VM (x-Name or x-Identifier)")
    show.add_argument("--host", metavar="NAME_OR_UUID", help="records of every key of a host (x-Name or x-Identifier)")
    show.add_argument("--client", metavar="NAME", help="records of one client identity")
    show.add_argument("--operation", metavar="OP", help="e.g. Get, Create, AddAttribute")
    show.add_argument("--since", metavar="TIME", help="ISO 8601 time or an age such as 12h, 7d")
    show.add_argument("--until", metavar="TIME", help="ISO 8601 time or an age")
    show.add_argument("--result", metavar="RESULT", help="success, failure, or a reason such as Item_Not_Found")
    show.add_argument(
        "--request-id",
        metavar="ID",
        help="records of one request: the KMS's request id, or the id a client such as vtpm-broker passed "
        "in its Client Correlation Value",
    )
    show.add_argument("--limit", type=int, metavar="N", help="only the newest N matching records")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.set_defaults(func=_command(_show))

    export = commands.add_parser("export", help="write the whole trail and its checkpoints to a JSON-lines file")
    _db_args(export)
    export.add_argument("--to", required=True, type=Path, metavar="FILE", help="file to write (mode 0600)")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    export.set_defaults(func=_command(_export))

    checkpoint = commands.add_parser("checkpoint", help="sign a checkpoint of the current head now")
    _db_args(checkpoint)
    checkpoint.set_defaults(func=_command(_checkpoint))
