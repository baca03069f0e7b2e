"""Get and Locate by x-Identifier as the store grows to a million keys
(issue 15, "Scale"): the latency at each size, on SQLite and PostgreSQL.

    .venv/bin/python bench/key_scale.py [--sizes 1000,100000,1000000] [--db-url URL] [--samples 300]

Keys are loaded in bulk through the real dispatcher and operation table
(Create batches of 1,000 items run with Batch Error Continuation Option
Undo, so that one batch is one transaction; `--load-processes` processes
at once, each with its own connection), each AES-256 key with its own
x-Identifier, sealed and row-authenticated like any other. At each size the
bench times `--samples` Gets of random keys (each served once before: the
first Get of a key also writes that it is no longer Fresh) and as many
Locates by a random
key's x-Identifier, in process (dispatcher, keystore, database: no TLS, no
audit trail), and prints p50/p99 per operation and size. A progress bar
shows the loading on a terminal; without one, a line every few seconds.
On PostgreSQL each load ends with ANALYZE of the loaded tables, as
`kms-admin restore` does: the planner's statistics, which autovacuum would
otherwise gather later, if it is on.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kmip.core.enums import (  # noqa: E402
    BatchErrorContinuationOption,
    CryptographicAlgorithm,
    ObjectType,
    Operation,
    ResultStatus,
)
from kmip.core.enums import Tags as T  # noqa: E402
from stats import percentile  # noqa: E402
from ttlv_messages import attribute, item, request  # noqa: E402

from kmip_core import ttlv  # noqa: E402
from kmip_core.db.engine import refresh_statistics  # noqa: E402
from kmip_core.policy import Principal  # noqa: E402
from kmip_core.progress import Progress  # noqa: E402
from kmip_core.sealing.barrier import Barrier  # noqa: E402
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher  # noqa: E402
from kms_server.keystore.keystore import Keystore  # noqa: E402
from kms_server.keystore.verified_rows import DEFAULT_SIZE as VERIFIED_ROWS  # noqa: E402
from kms_server.operations import OPERATIONS  # noqa: E402
from kms_server.storage import open_storage  # noqa: E402

ALICE = ConnectionInfo(principal=Principal("alice"), peer="bench")
BATCH = 1000


def identifier(i: int) -> str:
    return f"vm-{i:08d}"


def _create(i: int) -> ttlv.Item:
    return item(
        Operation.CREATE,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            ttlv.structure(
                T.TEMPLATE_ATTRIBUTE.value,
                [
                    attribute("Cryptographic Algorithm", ttlv.enumeration(0, CryptographicAlgorithm.AES.value)),
                    attribute("Cryptographic Length", ttlv.integer(0, 256)),
                    attribute("Cryptographic Usage Mask", ttlv.integer(0, 12)),
                    attribute("x-Identifier", ttlv.text(0, identifier(i))),
                ],
            ),
        ],
    )


def _answers(dispatcher: Dispatcher, items: list[ttlv.Item], undo: bool = False) -> list[ttlv.Item]:
    raw = dispatcher.handle(request(items, BatchErrorContinuationOption.UNDO if undo else None), ALICE)
    assert raw is not None
    answers = ttlv.decode(raw).find_all(T.BATCH_ITEM.value)
    failed = [a for a in answers if a.get(T.RESULT_STATUS.value) != ResultStatus.SUCCESS.value]
    if failed:
        raise SystemExit(f"key_scale: a request failed: {failed[0].get(T.RESULT_MESSAGE.value)}")
    return answers


def _create_range(dispatcher: Dispatcher, start: int, end: int) -> list[str]:
    answers = _answers(dispatcher, [_create(i) for i in range(start, end)], undo=True)
    return [a.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value) for a in answers]


def _loader(url: str, master: bytes, start: int, end: int, results) -> None:
    """A loading process: keys start..end-1, a batch at a time, through
    its own storage and dispatcher (same master key, so the same keyring)."""
    code = 0
    try:
        storage = open_storage(url)
        try:
            dispatcher = Dispatcher(Keystore(storage, Barrier(master)), OPERATIONS, node="bench")
            for first in range(start, end, BATCH):
                last = min(first + BATCH, end)
                results.put((first, _create_range(dispatcher, first, last)))
        finally:
            storage.close()
    except BaseException as exc:  # reported to the parent, which stops
        results.put((None, f"{type(exc).__name__}: {exc}"))
        code = 1
    results.close()
    results.join_thread()  # what was put is flushed to the parent
    os._exit(code)  # nothing inherited from the parent is cleaned up here


def load(dispatcher: Dispatcher, uids: list[str], target: int, processes: int = 1, url: str = "",
         master: bytes = b"", storage=None) -> float:  # fmt: skip
    started = time.monotonic()
    # A rich bar on a terminal; a plain line every 5 s otherwise (kmip_core.progress).
    with Progress("  loading keys", target, unit="keys", done=len(uids), announce=False) as progress:
        if not uids or processes <= 1 or target - len(uids) < 2 * BATCH:
            while len(uids) < target:
                n = min(BATCH, target - len(uids))
                uids.extend(_create_range(dispatcher, len(uids), len(uids) + n))
                progress.advance(n)
            return time.monotonic() - started
        # Several loading processes, each a contiguous share of the indexes
        # (key i carries x-Identifier identifier(i)); the keyring exists.
        if storage is not None:
            storage.engine.dispose()  # no pooled connection is inherited
        ctx = multiprocessing.get_context("fork")
        results = ctx.Queue()
        base, count = len(uids), target - len(uids)
        uids.extend([""] * count)
        bounds = [base + count * k // processes for k in range(processes + 1)]
        workers = [
            ctx.Process(target=_loader, args=(url, master, bounds[k], bounds[k + 1], results), daemon=True)
            for k in range(processes)
        ]
        for w in workers:
            w.start()
        try:
            remaining = count
            while remaining:
                first, got = results.get()
                if first is None:
                    raise SystemExit(f"key_scale: a loading process failed: {got}")
                uids[first : first + len(got)] = got
                remaining -= len(got)
                progress.advance(len(got))
        finally:
            for w in workers:
                w.join(timeout=5)
                if w.is_alive():
                    w.kill()
    return time.monotonic() - started


def measure(dispatcher: Dispatcher, uids: list[str], samples: int, rng: random.Random) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"Get": [], "Locate by x-Identifier": []}
    for _ in range(samples):
        index = rng.randrange(len(uids))
        get = [item(Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uids[index])])]
        # A key's first Get also records that it is no longer Fresh (a
        # write, KMIP 1.4 3.34); the warm Get after it is the one timed, as a
        # management server re-reading its keys after a restart does.
        _answers(dispatcher, get)
        t0 = time.perf_counter()
        answer = _answers(dispatcher, get)[0]
        timings["Get"].append(time.perf_counter() - t0)
        assert answer.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value) == uids[index]
        t0 = time.perf_counter()
        answer = _answers(
            dispatcher, [item(Operation.LOCATE, [attribute("x-Identifier", ttlv.text(0, identifier(index)))])]
        )[0]
        timings["Locate by x-Identifier"].append(time.perf_counter() - t0)
        found = answer.find(T.RESPONSE_PAYLOAD.value).find_all(T.UNIQUE_IDENTIFIER.value)
        assert [f.value for f in found] == [uids[index]], "Locate by x-Identifier found another key"
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000,1000000", help="store sizes to measure at, comma-separated")
    parser.add_argument("--db-url", help="default: a SQLite file in a temporary directory (a PostgreSQL URL must name an empty database)")
    parser.add_argument("--samples", type=int, default=300, help="Gets and Locates timed at each size")
    parser.add_argument(
        "--load-processes",
        type=int,
        default=os.cpu_count() or 1,
        help="processes loading keys at once, each with its own database connection (default: the cores)",
    )
    parser.add_argument(
        "--verified-rows",
        type=int,
        default=VERIFIED_ROWS,
        help=f"rows the keystore keeps once authenticated, as [storage] verified_rows (default {VERIFIED_ROWS}, "
        "the server's; 0: the storage alone, every read authenticated and decoded)",
    )
    args = parser.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as tmp:
        url = args.db_url or f"sqlite:///{tmp}/kms.db"
        storage = open_storage(url)
        master = os.urandom(32)
        keystore = Keystore(storage, Barrier(master), verified_rows=args.verified_rows)
        dispatcher = Dispatcher(keystore, OPERATIONS, node="bench")
        uids: list[str] = []
        rows = []
        try:
            for size in sizes:
                seconds = load(dispatcher, uids, size, args.load_processes, url, master, storage)
                # As after any bulk load (kms-admin restore does the same):
                # PostgreSQL's planner statistics for the rows just loaded.
                # Without them, at 1M keys, an object's attribute lookup was
                # planned as a parallel scan with JIT: Get p50 36 ms.
                started = time.perf_counter()
                refresh_statistics(storage.engine, ("kms_objects", "kms_attributes"))
                analyzed = time.perf_counter() - started
                timings = measure(dispatcher, uids, args.samples, rng)
                rows.append((size, seconds, timings))
                cells = "  ".join(
                    f"{op}: p50 {percentile(t, 0.5) * 1000:.2f} ms, p99 {percentile(t, 0.99) * 1000:.2f} ms"
                    for op, t in timings.items()
                )
                note = f", ANALYZE {analyzed:.1f} s" if storage.engine.dialect.name == "postgresql" else ""
                print(f"{size:>9} keys ({seconds:.0f} s to load{note})  {cells}", flush=True)
        finally:
            storage.close()
    backend = url.split(":", 1)[0]
    print(f"\nverified_rows = {args.verified_rows}")
    print(f"keys       | {backend}: Get p50 / p99 (ms) | Locate by x-Identifier p50 / p99 (ms)")
    for size, _, timings in rows:
        get, loc = timings["Get"], timings["Locate by x-Identifier"]
        print(
            f"{size:>10} | {percentile(get, 0.5) * 1000:.2f} / {percentile(get, 0.99) * 1000:.2f}"
            f" | {percentile(loc, 0.5) * 1000:.2f} / {percentile(loc, 0.99) * 1000:.2f}"
        )
    first = rows[0][2]
    for size, _, timings in rows[1:]:
        for op in timings:
            ratio = percentile(timings[op], 0.5) / percentile(first[op], 0.5)
            print(f"{op} p50 at {size} keys: {ratio:.2f}x its latency at {rows[0][0]} keys")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
