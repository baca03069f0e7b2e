"""The chain: canonical encoding of a record, its hash, and verification of
a whole trail (records and signed checkpoints).

Pure functions over plain data, so the same code checks the live database
(`kms-admin audit verify`) and an exported file offline.

Record hash: SHA-256 over b"kms-audit-v1\\n" + the record's canonical JSON,
where the record carries its own `seq` and the previous record's hash as
`prev` (the first record's `prev` is GENESIS). Checkpoint signature:
Ed25519 over b"kms-audit-checkpoint-v1\\n" + canonical JSON of
{"seq", "head_hash", "time", "node"}.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

GENESIS = "0" * 64
_RECORD_DOMAIN = b"kms-audit-v1\n"
_CHECKPOINT_DOMAIN = b"kms-audit-checkpoint-v1\n"

# Columns of the records table that repeat a field of the hashed body:
# (column, body path). Verification checks they still agree.
INDEXED_FIELDS = (
    ("node", ("node",)),
    ("operation", ("operation",)),
    ("uid", ("uid",)),
    ("client", ("client", "name")),
    ("result", ("result", "status")),
    ("x_component", ("object", "x-Component")),
    ("x_name", ("object", "x-Name")),
    ("x_identifier", ("object", "x-Identifier")),
)


def canonical(value: dict) -> str:
    """Sorted keys, no spaces, UTF-8 text, no floats: the same record
    always has the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(body: str) -> str:
    return hashlib.sha256(_RECORD_DOMAIN + body.encode("utf-8")).hexdigest()


def checkpoint_message(seq: int, head_hash: str, time: float, node: str) -> bytes:
    return _CHECKPOINT_DOMAIN + canonical(
        {"seq": seq, "head_hash": head_hash, "time": format_time(time), "node": node}
    ).encode("utf-8")


def format_time(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def body_field(body: dict, path: tuple[str, ...]):
    value = body
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


@dataclass(frozen=True)
class Problem:
    seq: int
    text: str


@dataclass
class Report:
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    last_checkpoint: int | None = None
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> Problem | None:
        return min(self.problems, key=lambda p: p.seq) if self.problems else None

    @property
    def unsigned_tail(self) -> int:
        """Records after the last checkpoint: protected against change by
        the chain, but not yet against removal or a forged append."""
        if self.last_seq is None:
            return 0
        return self.last_seq - (self.last_checkpoint or 0)


# How many recent hashes to remember to tell an inserted record from an
# altered one.
_WINDOW = 4096


def verify(
    records: Iterable,
    checkpoints: Iterable,
    check_signature: Callable[[bytes, str], bool] | None,
    key_id: str | None = None,
    max_problems: int = 20,
) -> Report:
    """Walk the records (objects with seq, time, body, hash and the indexed
    columns; in seq order) and the checkpoints (seq, time, node, head_hash,
    key_id, signature). `check_signature(message, signature_hex)` says
    whether a checkpoint signature is good; None skips signatures (and is
    reported as a problem if there are checkpoints)."""
    report = Report()
    expected, prev = 1, GENESIS
    recent: dict[str, int] = {}
    hashes: dict[int, str] = {}
    cps = list(checkpoints)
    wanted = {c.seq for c in cps}

    def problem(seq: int, text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(Problem(seq, text))

    for r in records:
        report.records += 1
        if report.first_seq is None:
            report.first_seq = r.seq
        report.last_seq = r.seq
        if r.seq > expected:
            span = f"record {expected}" if r.seq == expected + 1 else f"records {expected} to {r.seq - 1}"
            problem(expected, f"{span} missing: removed from the trail")
        try:
            body = json.loads(r.body)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            problem(r.seq, f"record {r.seq} altered: its body is not a JSON record")
            body = {}
        if body and canonical(body) != r.body:
            problem(r.seq, f"record {r.seq} altered: its body is not in canonical form")
        if body and body.get("prev") != prev:
            earlier = recent.get(body.get("prev"))
            if earlier is not None and earlier < r.seq - 1:
                problem(
                    earlier + 1,
                    f"record {earlier + 1} inserted: record {r.seq} (written as {body.get('seq')}) "
                    f"was chained to record {earlier}",
                )
            elif r.seq == expected:
                problem(r.seq, f"record {r.seq} does not follow record {r.seq - 1}: the chain is broken here")
        if body and body.get("seq") != r.seq:
            problem(
                r.seq,
                f"record {r.seq} out of place: it was written as record {body.get('seq')} (reordered or renumbered)",
            )
        if record_hash(r.body) != r.hash:
            problem(r.seq, f"record {r.seq} altered: its content no longer matches its hash")
        for column, path in INDEXED_FIELDS:
            if body and getattr(r, column) != body_field(body, path):
                problem(r.seq, f"record {r.seq} altered: column {column} differs from the hashed record")
        if body and isinstance(body.get("time"), str):
            try:
                if abs(parse_time(body["time"]) - r.time) > 0.001:
                    problem(r.seq, f"record {r.seq} altered: column time differs from the hashed record")
            except ValueError:
                problem(r.seq, f"record {r.seq} altered: its time is malformed")
        prev = r.hash
        recent[r.hash] = r.seq
        if len(recent) > _WINDOW:
            recent.pop(next(iter(recent)))
        if r.seq in wanted:
            hashes[r.seq] = r.hash
        expected = max(expected, r.seq + 1)

    last_good = 0
    for c in cps:
        report.checkpoints += 1
        report.last_checkpoint = c.seq
        if check_signature is None:
            problem(c.seq, f"checkpoint {c.seq}: no audit public key given, signature not checked")
        elif key_id is not None and c.key_id != key_id:
            problem(c.seq, f"checkpoint {c.seq}: signed by key {c.key_id}, not the audit key {key_id}")
        elif not check_signature(checkpoint_message(c.seq, c.head_hash, c.time, c.node), c.signature):
            problem(c.seq, f"checkpoint {c.seq}: signature does not verify with the audit public key (forged)")
            continue
        if report.last_seq is None or c.seq > report.last_seq:
            end = report.last_seq or 0
            problem(end + 1, f"trail truncated: checkpoint {c.seq} was signed but records end at {end}")
        elif c.seq not in hashes:
            problem(c.seq, f"record {c.seq} missing: checkpoint {c.seq} covers it")
        elif hashes[c.seq] != c.head_hash:
            if any(p.seq <= c.seq for p in report.problems):
                # Explained by the record problems already found.
                problem(c.seq, f"checkpoint {c.seq} no longer matches record {c.seq}")
            else:
                # A consistent rewrite: only the signature shows it.
                problem(
                    last_good + 1,
                    f"records {last_good + 1} to {c.seq} rewritten after checkpoint {c.seq} was signed",
                )
        else:
            last_good = c.seq
    return report
