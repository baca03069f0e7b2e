"""CPU time one request costs kms-server's request path, in process and on
one thread: the dispatcher, the operation, the keystore (row check, seal,
unseal), the audit trail and SQLite, with no TLS, no reactor and no thread
hand-offs (issue 15).

    .venv/bin/python bench/request_cpu.py                          # this tree
    .venv/bin/python bench/request_cpu.py --tree /tmp/before --tree .   # two trees, alternating

The full-stack figures (`kmip_throughput.py`) move by 20-40 % between runs
on a shared 2-core machine, as its speed and the threads' phases change;
this one measures the part of a request a code change to the request path
usually touches, and repeats it (`--rounds`, alternating between trees) so
that the minimum and the median of each can be compared. `--tree DIR` runs
the measurement with DIR's packages (a `git worktree` of the commit before
a change, say); PyKMIP's server has no comparable in-process path, so this
script has no PyKMIP column: `kmip_throughput.py` has the side-by-side.

Only the CPU time inside `Dispatcher.handle` is counted (not the
script's own encoding of requests and checking of answers). With
`--db-url postgresql://user@host/db` each workload runs on a fresh
PostgreSQL database made on that server (and dropped after) instead of
SQLite: the node's CPU per request there, without PostgreSQL's own, one
request at a time (so each write is a batch of its own). Workloads, each
on a fresh database with the audit trail on:
`get` (Get, round robin over 16 keys each read once before), `create`
(Create AES-256) and `cycle` (Create with a unique Name, Get, Locate by
Name, Destroy: per request).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

WORKLOADS = ("get", "create", "cycle")


def _measure(iterations: int, db_url: str | None = None) -> dict[str, float]:
    """ms of CPU per request of each workload, with the packages on sys.path;
    on SQLite, or on a scratch database of the PostgreSQL server `db_url`."""
    from kmip.core.enums import Operation, ResultStatus
    from kmip.core.enums import Tags as T
    from ttlv_messages import attribute, create_aes, item, on_object, request

    from kmip_core import ttlv
    from kmip_core.policy import Principal
    from kmip_core.sealing.barrier import Barrier
    from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher
    from kms_server.audit.trail import AuditTrail
    from kms_server.keystore.keystore import Keystore
    from kms_server.operations import OPERATIONS
    from kms_server.storage import open_storage

    conn = ConnectionInfo(principal=Principal("bench"), peer="127.0.0.1:1")

    def locate(name: str) -> bytes:
        value = ttlv.structure(0, [ttlv.text(T.NAME_VALUE.value, name), ttlv.enumeration(T.NAME_TYPE.value, 1)])
        return request([item(Operation.LOCATE, [attribute("Name", value)])])

    def run(workload: str, path: str) -> float:
        with _database(db_url, path) as url:
            return measure(workload, url)

    def measure(workload: str, url: str) -> float:
        storage = open_storage(url)
        try:
            trail = AuditTrail(storage, "bench")
            dispatcher = Dispatcher(
                Keystore(storage, Barrier(os.urandom(32))), OPERATIONS, node="bench", trail=trail
            )

            spent = [0.0]  # CPU time inside dispatcher.handle only

            def send(message: bytes) -> ttlv.Item:
                started = time.process_time()
                raw = dispatcher.handle(message, conn)
                spent[0] += time.process_time() - started
                assert raw is not None
                answer = ttlv.decode(raw).find(T.BATCH_ITEM.value)
                if answer.get(T.RESULT_STATUS.value) != ResultStatus.SUCCESS.value:
                    raise SystemExit(f"request_cpu: {workload}: {answer.get(T.RESULT_MESSAGE.value)}")
                return answer.find(T.RESPONSE_PAYLOAD.value)

            uids = [send(create_aes()).get(T.UNIQUE_IDENTIFIER.value) for _ in range(16)]
            gets = [on_object(Operation.GET, uid) for uid in uids]
            for message in gets:
                send(message)
            counter = [0]

            def one_iteration() -> int:
                """Requests sent."""
                if workload == "get":
                    send(gets[counter[0] % len(gets)])
                    counter[0] += 1
                    return 1
                if workload == "create":
                    send(create_aes())
                    return 1
                name = f"cycle-{counter[0]}"
                counter[0] += 1
                uid = send(create_aes(name)).get(T.UNIQUE_IDENTIFIER.value)
                send(on_object(Operation.GET, uid))
                found = send(locate(name)).find_all(T.UNIQUE_IDENTIFIER.value)
                assert [f.value for f in found] == [uid], "Locate by Name found another key"
                send(on_object(Operation.DESTROY, uid))
                return 4

            for _ in range(20):  # warm-up
                one_iteration()
            requests = 0
            spent[0] = 0.0
            for _ in range(iterations if workload != "cycle" else max(1, iterations // 4)):
                requests += one_iteration()
            return spent[0] / requests * 1000
        finally:
            storage.close()

    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        for workload in WORKLOADS:
            figures[workload] = run(workload, f"{tmp}/{workload}.db")
    return figures


@contextlib.contextmanager
def _database(db_url: str | None, path: str) -> Iterator[str]:
    """A fresh database: the SQLite file `path`, or a scratch database on
    the PostgreSQL server of `db_url`, dropped afterwards."""
    if db_url is None:
        yield f"sqlite:///{path}"
        return
    from sqlalchemy import create_engine, text

    from kmip_core.db.engine import parse_db_url

    url, _ = parse_db_url(db_url)
    name = f"request_cpu_{os.getpid()}_{Path(path).stem}"
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield url.set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", action="append", help="a checkout whose packages to measure (repeatable; default: this one)")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per tree, alternating (default 5)")
    parser.add_argument("--iterations", type=int, default=1000, help="requests per workload per round (default 1000)")
    parser.add_argument("--json", help="also write every figure to this file")
    parser.add_argument(
        "--db-url",
        help="a PostgreSQL server (postgresql://user@host/db) on which each workload gets a scratch database; default SQLite",
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.db_url is not None and not args.db_url.startswith("postgresql"):
        raise SystemExit("request_cpu: --db-url takes a PostgreSQL URL (postgresql://user@host/db); SQLite is the default")
    if args.child:
        print(json.dumps(_measure(args.iterations, args.db_url)))
        return 0
    trees = [str(Path(t).resolve()) for t in (args.tree or [str(HERE.parent)])]
    for tree in trees:
        if not (Path(tree) / "kms_server").is_dir():
            raise SystemExit(f"request_cpu: {tree} holds no kms_server package; give a checkout of this project")
    runs: dict[str, list[dict[str, float]]] = {tree: [] for tree in trees}
    for round_no in range(args.rounds):
        for tree in trees:
            env = {**os.environ, "PYTHONPATH": tree}
            out = subprocess.run(
                [sys.executable, __file__, "--child", "--iterations", str(args.iterations)]
                + (["--db-url", args.db_url] if args.db_url else []),
                env=env,
                cwd=tree,
                capture_output=True,
                text=True,
            )
            if out.returncode != 0:
                raise SystemExit(f"request_cpu: the measurement failed on {tree}: {out.stderr.strip().splitlines()[-1:]}")
            runs[tree].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"round {round_no + 1} {tree}: " + ", ".join(f"{w} {v:.3f}" for w, v in runs[tree][-1].items()), flush=True)
    where = "PostgreSQL" if args.db_url else "SQLite"
    print(f"\nCPU ms per request, one thread, in process, {where} ({args.rounds} rounds of {args.iterations}): min / median")
    print("tree".ljust(40) + "".join(w.rjust(18) for w in WORKLOADS))
    for tree in trees:
        cells = "".join(
            f"{min(r[w] for r in runs[tree]):.3f} / {statistics.median(r[w] for r in runs[tree]):.3f}".rjust(18)
            for w in WORKLOADS
        )
        print(tree[-40:].ljust(40) + cells)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
