"""Pages each KMIP request writes to SQLite's write-ahead log, by B-tree
(issue 15).

    .venv/bin/python bench/wal_pages.py                    # 3,000 keys, 200 of each request
    .venv/bin/python bench/wal_pages.py --keys 100000 --json pages.json

Every page a commit changes is written whole to the log (a frame), and
written again into the database file by the next checkpoint: the pages a
request changes are most of its I/O, and each is B-tree work in SQLite.
This script runs kms-server's request path in process (the dispatcher, the
keystore, the audit trail, SQLite, as `request_cpu.py` does), one request
at a time, so each is a batch of its own. It reads back the frames each
request appended and names the table or index of each frame's page (SQLite's
`dbstat` table). Requests: `get` (a key read once before, so that its
first read's write of Fresh is not counted), `create` (AES-256 with a
Name), `destroy` (a key read before). It prints, per request, the mean
pages over `--requests` of them and, for the last one, its pages by B-tree.
With a batch of several requests (the server under load) pages that the
batch's members share are written once.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sqlite3
import struct
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

REQUESTS = ("get", "create", "destroy")
_WAL_HEADER = 32
_FRAME_HEADER = 24


def wal_frames(path: str, page_size: int) -> int:
    """How many frames the log of the database `path` holds."""
    try:
        size = os.path.getsize(path + "-wal")
    except FileNotFoundError:
        return 0
    return max(0, size - _WAL_HEADER) // (_FRAME_HEADER + page_size)


def wal_pages(path: str, page_size: int, first: int, count: int) -> list[int]:
    """The page numbers of `count` frames of the log from frame `first`."""
    frame = _FRAME_HEADER + page_size
    with open(path + "-wal", "rb") as log:
        log.seek(_WAL_HEADER + first * frame)
        data = log.read(count * frame)
    return [struct.unpack_from(">I", data, i * frame)[0] for i in range(len(data) // frame)]


def measure(keys: int, requests: int, directory: str) -> dict[str, dict]:
    """{request: {"pages": mean pages per request, "btrees": {name: pages}
    of the last one}}."""
    from kmip.core.enums import Operation, ResultStatus
    from kmip.core.enums import Tags as T
    from ttlv_messages import create_aes, on_object

    from kmip_core import ttlv
    from kmip_core.policy import Principal
    from kmip_core.sealing.barrier import Barrier
    from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher
    from kms_server.audit.trail import AuditTrail
    from kms_server.keystore.keystore import Keystore
    from kms_server.operations import OPERATIONS
    from kms_server.storage import open_storage

    path = os.path.join(directory, "kms.db")
    conn = ConnectionInfo(principal=Principal("bench"), peer="127.0.0.1:1")
    storage = open_storage(f"sqlite:///{path}")
    try:
        dispatcher = Dispatcher(
            Keystore(storage, Barrier(os.urandom(32))), OPERATIONS, node="bench", trail=AuditTrail(storage, "bench")
        )
        names = itertools.count()

        def send(message: bytes) -> ttlv.Item:
            raw = dispatcher.handle(message, conn)
            assert raw is not None
            answer = ttlv.decode(raw).find(T.BATCH_ITEM.value)
            if answer.get(T.RESULT_STATUS.value) != ResultStatus.SUCCESS.value:
                raise SystemExit(f"wal_pages: {answer.get(T.RESULT_MESSAGE.value)}")
            return answer.find(T.RESPONSE_PAYLOAD.value)

        def create() -> str:
            return send(create_aes(f"key-{next(names)}")).get(T.UNIQUE_IDENTIFIER.value)

        uids = [create() for _ in range(max(keys, 2 * requests))]
        for uid in uids[: 2 * requests]:
            send(on_object(Operation.GET, uid))  # Fresh cleared: a later Get only reads
        # The node's checkpointer would copy the log into the file and
        # SQLite would then write it again from its start, under the count:
        # it is stopped, and the log emptied once, before counting.
        checkpointer = storage.writes.checkpointer
        if checkpointer is not None:
            checkpointer.close()
        raw = sqlite3.connect(path)
        try:
            raw.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            page_size = raw.execute("PRAGMA page_size").fetchone()[0]
        finally:
            raw.close()
        runs = {
            "get": lambda i: send(on_object(Operation.GET, uids[i])),
            "create": lambda i: create(),
            "destroy": lambda i: send(on_object(Operation.DESTROY, uids[requests + i])),
        }
        counted: dict[str, tuple[float, list[int]]] = {}
        for name in REQUESTS:
            start = written = wal_frames(path, page_size)
            last: list[int] = []
            for i in range(requests):
                runs[name](i)
                frames = wal_frames(path, page_size)
                if frames <= written:
                    raise SystemExit("wal_pages: the log was copied and restarted during the count; fewer --requests")
                if i == requests - 1:
                    last = wal_pages(path, page_size, written, frames - written)
                written = frames
            counted[name] = ((written - start) / requests, last)
        # Each page's B-tree as the database stands now, the log included:
        # pages the requests added (a table's new leaf) have theirs too.
        raw = sqlite3.connect(path)
        try:
            owner = {page: btree for btree, page in raw.execute("SELECT name, pageno FROM dbstat")}
        finally:
            raw.close()
        return {
            name: {
                "pages": mean,
                "last": len(last),
                "btrees": dict(collections.Counter(owner.get(p, "(freed since)") for p in last)),
            }
            for name, (mean, last) in counted.items()
        }
    finally:
        storage.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=3000, help="keys in the store before the count (default 3000)")
    parser.add_argument("--requests", type=int, default=200, help="requests of each kind counted (default 200)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    if args.keys < 1 or args.requests < 1:
        parser.error("--keys and --requests must be at least 1")
    with tempfile.TemporaryDirectory() as directory:
        figures = measure(args.keys, args.requests, directory)
    print(f"Pages written to the log per request, SQLite, {args.keys} keys, {args.requests} of each, one per batch")
    for name in REQUESTS:
        f = figures[name]
        parts = ", ".join(f"{btree} {n}" for btree, n in sorted(f["btrees"].items(), key=lambda kv: (-kv[1], kv[0])))
        print(f"  {name:8} {f['pages']:6.2f} per request; the last one {f['last']}: {parts}")
    if args.json:
        Path(args.json).write_text(json.dumps({"keys": args.keys, "requests": args.requests, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
