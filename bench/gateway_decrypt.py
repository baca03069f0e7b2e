#!/usr/bin/env python3
"""Decrypts per second through the broker's host gateway versus directly
against the KMS, on the same run (issue 5, "Done when").

One kms-server (embedded SQLite) holds a VM's KEK; a 512-bit DEK is
wrapped under it by KMIP Encrypt (AES-256-GCM), as the broker does. Then
the same unwrap (KMIP Decrypt of that wrapped DEK) is timed two ways:

- direct: each client process talks to the KMS with the broker's own
  client certificate (what the broker does for the host behind the gateway);
- gateway: each client process is a host with its own trust-CA certificate,
  talking to a gateway process (tests/integration/test_gateway.py,
  run_gateway_for_tests: the real broker.gateway listener with a stand-in
  registry that allows every host and writes each decision to a JSON-lines
  audit file), which forwards to the same KMS through one KmipClient with
  a pool of `--kms-connections` connections (the broker's [kms] connections,
  default 8).

N client processes (not threads: the client must not be the bottleneck),
each with one TLS connection opened and used once before the clock starts,
each doing a fixed number of Decrypts; every result is checked against the
DEK. Figures are printed side by side (and written with --json). Nothing
here asserts a timing.

    .venv/bin/python bench/gateway_decrypt.py [--ops 2000] [--clients 4]
        [--kms-connections 1,4] [--rounds 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "integration")]

from conftest import start_server  # noqa: E402
from test_gateway import BROKER_IDENTITY, run_gateway_for_tests  # noqa: E402

from bench.stats import percentile  # noqa: E402
from kmip_core.pki import fingerprint_sha256, init_pki  # noqa: E402


def _worker(job: dict, barrier, results) -> None:
    from kmip_core.client import KmipClient, KmipError

    latencies, errors = [], 0
    try:
        with KmipClient([job["node"]], cert=job["cert"], key=job["key"], ca=job["ca"], request_timeout=60) as client:
            wrapped = job["wrapped"]

            def unwrap() -> bytes:
                return client.decrypt(
                    wrapped["kek"],
                    bytes.fromhex(wrapped["data"]),
                    iv=bytes.fromhex(wrapped["iv"]),
                    tag=bytes.fromhex(wrapped["tag"]),
                    mode="GCM",
                )

            dek = bytes.fromhex(wrapped["dek"])
            if unwrap() != dek:  # Connect and warm up before the clock starts.
                raise RuntimeError("warm-up unwrap returned the wrong key")
            barrier.wait()
            start = time.perf_counter()
            for _ in range(job["ops"]):
                t0 = time.perf_counter()
                try:
                    ok = unwrap() == dek
                except KmipError:
                    ok = False
                if ok:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors += 1
            end = time.perf_counter()
    except Exception as exc:  # Reported, never dropped.
        barrier.abort()
        results.put({"error": f"{type(exc).__name__}: {exc}"})
        return
    results.put({"start": start, "end": end, "latencies": latencies, "errors": errors})


def measure(label: str, jobs: list[dict]) -> dict:
    context = mp.get_context("spawn")
    barrier = context.Barrier(len(jobs))
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(job, barrier, results)) for job in jobs]
    for p in processes:
        p.start()
    collected = [results.get(timeout=600) for _ in processes]
    for p in processes:
        p.join(30)
    failures = [r["error"] for r in collected if "error" in r]
    if failures:
        raise RuntimeError(f"{label}: a client failed: {failures[0]}")
    elapsed = max(r["end"] for r in collected) - min(r["start"] for r in collected)
    latencies = sorted(x for r in collected for x in r["latencies"])
    done = len(latencies)

    def pct(p: float) -> float:
        return percentile(latencies, p, float("nan")) * 1000

    return {
        "path": label,
        "clients": len(jobs),
        "decrypts": done,
        "errors": sum(r["errors"] for r in collected),
        "seconds": round(elapsed, 3),
        "decrypts_per_second": round(done / elapsed, 1),
        "p50_ms": round(pct(0.5), 2),
        "p95_ms": round(pct(0.95), 2),
    }


def wrap_dek(node: str, pki: Path) -> dict:
    from kmip_core.client import KmipClient

    dek = os.urandom(64)
    with KmipClient(
        [node], cert=pki / f"{BROKER_IDENTITY}.pem", key=pki / f"{BROKER_IDENTITY}.key", ca=pki / "ca.pem"
    ) as kms:
        kek = kms.create_symmetric_key(name="bench-vm-kek", attributes={"x-Identifier": "bench-vm"})
        kms.activate(kek)
        result = kms.encrypt(kek, dek, mode="GCM")
    return {"kek": kek, "dek": dek.hex(), "data": result.data.hex(), "iv": result.iv.hex(), "tag": result.tag.hex()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--ops", type=int, default=2000, help="decrypts per path, split over the clients (default 2000)"
    )
    parser.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    parser.add_argument(
        "--kms-connections",
        default="1,4",
        help="gateway configurations: KMS connections the gateway uses, comma-separated (default 1,4)",
    )
    parser.add_argument("--threads", type=int, default=16, help="gateway worker threads (default 16)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every path this many times (default 1)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    connections = [int(c) for c in args.kms_connections.split(",") if c.strip()]
    per_client = max(1, args.ops // args.clients)

    work = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    pki, trust = work / "pki", work / "trust"
    hosts = [f"host-{i}" for i in range(args.clients)]
    init_pki(pki, server_names=["localhost"], clients=[BROKER_IDENTITY])
    init_pki(trust, server_names=["localhost"], clients=hosts)
    from cryptography import x509

    fingerprints = {
        h: fingerprint_sha256(x509.load_pem_x509_certificate((trust / f"{h}.pem").read_bytes())) for h in hosts
    }

    kms = start_server(work / "kms", pki, log_level="WARNING")
    gateways = []
    rows = []
    try:
        node = f"{kms.host}:{kms.port}"
        wrapped = wrap_dek(node, pki)
        for n in connections:
            gateways.append(
                run_gateway_for_tests(
                    work / f"gateway-{n}",
                    trust,
                    [node],
                    pki,
                    hosts={fp: h for h, fp in fingerprints.items()},
                    allow={fp: [wrapped["kek"]] for fp in fingerprints.values()},
                    threads=args.threads,
                    kms_connections=n,
                    log_level="WARNING",
                )
            )
        direct_jobs = [
            {
                "node": node,
                "cert": pki / f"{BROKER_IDENTITY}.pem",
                "key": pki / f"{BROKER_IDENTITY}.key",
                "ca": pki / "ca.pem",
                "ops": per_client,
                "wrapped": wrapped,
            }
            for _ in hosts
        ]
        for _ in range(args.rounds):
            rows.append(measure("direct to the KMS", direct_jobs))
            for n, gw in zip(connections, gateways, strict=True):
                jobs = [
                    {
                        "node": gw.address,
                        "cert": trust / f"{h}.pem",
                        "key": trust / f"{h}.key",
                        "ca": trust / "ca.pem",
                        "ops": per_client,
                        "wrapped": wrapped,
                    }
                    for h in hosts
                ]
                row = measure(f"gateway, {n} KMS connection{'s' if n > 1 else ''}", jobs)
                row["audit_records"] = len(gw.audit())
                rows.append(row)
    finally:
        for gw in gateways:
            gw.stop()
        kms.stop()

    direct = [r["decrypts_per_second"] for r in rows if r["path"].startswith("direct")]
    baseline = sum(direct) / len(direct)
    for r in rows:
        r["vs_direct"] = round(r["decrypts_per_second"] / baseline, 2)

    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"KMIP Decrypt (unwrap a 512-bit DEK, AES-256-GCM): {args.clients} client processes x {per_client} ops, "
        f"{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}"
    )
    columns = ("path", "decrypts", "errors", "seconds", "decrypts/s", "p50 ms", "p95 ms", "vs direct")
    keys = ("path", "decrypts", "errors", "seconds", "decrypts_per_second", "p50_ms", "p95_ms", "vs_direct")
    for column in columns:
        table.add_column(column, justify="left" if column == "path" else "right")
    for r in rows:
        table.add_row(*(str(r[k]) for k in keys))
    Console(width=max(Console().width, 150)).print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
