"""The chain: canonical encoding of a record, its hash, and verification of
a whole trail (records and signed checkpoints).

Pure functions over plain data, so the same code checks the live database
(`kms-admin audit verify`) and an exported file offline.

Record hash: SHA-256 over b"kms-audit-v1\\n" + the record's canonical JSON,
where the record carries its own `seq` and the previous record's hash as
`prev` (the first record's `prev` is GENESIS). Checkpoint signature:
Ed25519 over b"kms-audit-checkpoint-v1\\n" + canonical JSON of
{"seq", "head_hash", "time", "node"}.

Both services keep their trail with this module (the public API below; no
`_name` is meant for other packages). Each product has its own `Domain`:
the tags above are the KMS's, the broker's are "vtpm-broker-audit-v1" and
"vtpm-broker-audit-checkpoint-v1", so a record or a checkpoint of one
product never verifies as the other's. `verify` walks a trail and
`verdict` turns its report into the exit status and the lines that
`kms-admin audit verify` and `vtpm-broker admin audit verify` print.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

GENESIS = "0" * 64

# Exit statuses of the verify commands (both products).
EXIT_INTACT = 0
EXIT_TAMPERED = 1
EXIT_USAGE = 2

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

# The broker's records table (broker/db.py, broker_audit) repeats these.
BROKER_INDEXED_FIELDS = (
    ("prev_hash", ("prev",)),
    ("actor", ("actor",)),
    ("action", ("action",)),
    ("target", ("target",)),
    ("allowed", ("allowed",)),
    ("reason", ("reason",)),
)


@dataclass(frozen=True)
class Domain:
    """One product's trail: the tags that prefix what it hashes and what it
    signs (domain separation), and the columns of its records table that
    repeat a field of the hashed body."""

    name: str
    record_tag: bytes
    checkpoint_tag: bytes
    indexed_fields: tuple[tuple[str, tuple[str, ...]], ...]


KMS = Domain("kms-server", b"kms-audit-v1\n", b"kms-audit-checkpoint-v1\n", INDEXED_FIELDS)
BROKER = Domain("vtpm-broker", b"vtpm-broker-audit-v1\n", b"vtpm-broker-audit-checkpoint-v1\n", BROKER_INDEXED_FIELDS)


# One encoder for every record: json.dumps with these options builds one
# per call.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical(value: dict) -> str:
    """Sorted keys, no spaces, UTF-8 text, no floats: the same record
    always has the same bytes."""
    return _CANONICAL.encode(value)


def record_hash(body: str, domain: Domain = KMS) -> str:
    return hashlib.sha256(domain.record_tag + body.encode("utf-8")).hexdigest()


def checkpoint_message(seq: int, head_hash: str, time: float, node: str, domain: Domain = KMS) -> bytes:
    return domain.checkpoint_tag + canonical(
        {"seq": seq, "head_hash": head_hash, "time": format_time(time), "node": node}
    ).encode("utf-8")


def format_time(t: float) -> str:
    return stamp(t)[0]


def stamp(t: float) -> tuple[str, float]:
    """A record's time: its text (``format_time``) and the float that text
    parses back to (``parse_time``: to the microsecond), without the
    strptime a round trip costs on every record, nor a datetime (issue 15).

    The microseconds are rounded as ``datetime.fromtimestamp`` rounds them
    (half to even, carried into the second), and the float is computed as
    ``datetime.timestamp`` computes it (whole microseconds / 10**6)."""
    fraction, whole = math.modf(t)
    micro = round(fraction * 1e6)
    second = int(whole)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    elif micro < 0:
        second, micro = second - 1, micro + 1_000_000
    cached = _LAST_SECOND[0]
    if cached[0] != second:
        cached = _LAST_SECOND[0] = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{micro:06d}Z", (second * 1_000_000 + micro) / 1_000_000


# The last second `stamp` formatted, and its text (one tuple, replaced
# whole, so threads never see a second with another's text): records come
# many to a second.
_LAST_SECOND: list[tuple[int | None, str]] = [(None, "")]


def parse_time(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


def body_field(body: dict, path: tuple[str, ...]) -> Any:
    value: Any = body
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
    *,
    domain: Domain = KMS,
    first_seq: int = 1,
    first_prev: str = GENESIS,
) -> Report:
    """Walk the records (objects with seq, time, body, hash and the indexed
    columns; in seq order) and the checkpoints (seq, time, node, head_hash,
    key_id, signature). `check_signature(message, signature_hex)` says
    whether a checkpoint signature is good; None skips signatures (and is
    reported as a problem if there are checkpoints).

    `first_seq` and `first_prev` are where the chain starts: record 1 after
    GENESIS, unless it continues an older trail (the broker's records from
    before this format, checked by their own rule up to there)."""
    report = Report()
    expected, prev = first_seq, first_prev
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
        except (TypeError, ValueError):
            problem(r.seq, f"record {r.seq} altered: its body is not a JSON record")
            body = {}
        if body and canonical(body) != r.body:
            problem(r.seq, f"record {r.seq} altered: its body is not in canonical form")
        if body and body.get("prev") != prev:
            earlier = recent.get(body["prev"]) if "prev" in body else None
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
        if record_hash(r.body, domain) != r.hash:
            problem(r.seq, f"record {r.seq} altered: its content no longer matches its hash")
        for column, path in domain.indexed_fields:
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

    last_good = first_seq - 1
    for c in cps:
        report.checkpoints += 1
        report.last_checkpoint = c.seq
        if check_signature is None:
            problem(c.seq, f"checkpoint {c.seq}: no audit public key given, signature not checked")
        elif key_id is not None and c.key_id != key_id:
            problem(c.seq, f"checkpoint {c.seq}: signed by key {c.key_id}, not the audit key {key_id}")
        elif not check_signature(checkpoint_message(c.seq, c.head_hash, c.time, c.node, domain), c.signature):
            problem(c.seq, f"checkpoint {c.seq}: signature does not verify with the audit public key (forged)")
            continue
        if report.last_seq is None or c.seq > report.last_seq:
            end = report.last_seq or first_seq - 1
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


@dataclass(frozen=True)
class Verdict:
    """What a verify command says about a report: its exit status, the
    lines for stdout (intact) and for stderr (not intact)."""

    status: int
    out: tuple[str, ...] = ()
    err: tuple[str, ...] = ()

    def emit(self, out: TextIO | None = None, err: TextIO | None = None) -> int:
        out = out or sys.stdout
        err = err or sys.stderr
        for line in self.out:
            print(line, file=out)
        for line in self.err:
            print(line, file=err)
        return self.status


def verdict(report: Report, where: str, signatures_checked: bool) -> Verdict:
    """The words of `kms-admin audit verify` and `vtpm-broker admin audit
    verify`: exit 0 when intact, 1 naming the first bad record."""
    if report.ok:
        span = f"records {report.first_seq} to {report.last_seq}" if report.records else "no records"
        out = [f"audit trail intact: {report.records} records ({span}), {report.checkpoints} signed checkpoints"]
        if not signatures_checked:
            out.append(
                "checkpoint signatures were not checked: no audit key given (--public-key or [audit] signing_key_file)"
            )
        if report.unsigned_tail:
            out.append(
                f"{report.unsigned_tail} records after the last checkpoint "
                f"({report.last_checkpoint or 'none yet'}) are chained but not yet signed"
            )
        return Verdict(EXIT_INTACT, tuple(out))
    first = report.first_problem
    assert first is not None  # not ok: it has problems
    err = [f"audit trail NOT intact ({where}): first problem at record {first.seq}: {first.text}"]
    for problem in sorted(report.problems, key=lambda p: p.seq)[1:]:
        err.append(f"  also at record {problem.seq}: {problem.text}")
    return Verdict(EXIT_TAMPERED, (), tuple(err))


def read_export(
    path: Path,
    *,
    export_format: str,
    record_type: Callable[..., Any],
    checkpoint_type: Callable[..., Any],
    what: str,
    made_by: str,
    error: type[Exception],
) -> tuple[list, list]:
    """Records and checkpoints of an export file (JSON lines: a header, then
    rows tagged "record" or "checkpoint"), each sorted by seq.

    Both products export this way; each names its own `export_format`, row
    types, wording (`what`, e.g. "an audit export", and the `made_by`
    command) and the one-line `error` it raises for an unusable file.
    """
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not {what} (not UTF-8 text)") from None
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if not isinstance(header, dict) or header.get("format") != export_format:
        raise error(f"{path} is not {what} (made by: {made_by})")
    records, cps = [], []
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            kind = row.pop("type")
            if kind == "record":
                records.append(record_type(**row))
            elif kind == "checkpoint":
                cps.append(checkpoint_type(**row))
            else:
                raise ValueError(kind)
        except (ValueError, TypeError, KeyError, AttributeError):
            raise error(f"{path}, line {number}: not an audit record or checkpoint") from None
    records.sort(key=lambda r: r.seq)
    cps.sort(key=lambda c: c.seq)
    return records, cps
