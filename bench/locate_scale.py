"""Locate's cost as the number of keys grows: N AES keys created through the
real dispatcher and operation table on a SQLite (or PostgreSQL) database,
then a Locate by Cryptographic Algorithm, timed.

    .venv/bin/python bench/locate_scale.py --keys 3000 [--db-url URL]

Locate should grow with the matches, not with their square (issue 19).
"""

from __future__ import annotations

import argparse
import os
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
from ttlv_messages import attribute, item, request  # noqa: E402

from kmip_core import ttlv  # noqa: E402
from kmip_core.policy import Principal  # noqa: E402
from kmip_core.sealing.barrier import Barrier  # noqa: E402
from kmip_core.server.dispatcher import ConnectionInfo, Dispatcher  # noqa: E402
from kms_server.keystore.keystore import Keystore  # noqa: E402
from kms_server.operations import OPERATIONS  # noqa: E402
from kms_server.storage import open_storage  # noqa: E402

ALICE = ConnectionInfo(principal=Principal("alice"), peer="bench")


def _algorithm(algorithm: CryptographicAlgorithm) -> ttlv.Item:
    return attribute("Cryptographic Algorithm", ttlv.enumeration(0, algorithm.value))


def _create() -> ttlv.Item:
    return item(
        Operation.CREATE,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
            ttlv.structure(
                T.TEMPLATE_ATTRIBUTE.value,
                [
                    _algorithm(CryptographicAlgorithm.AES),
                    attribute("Cryptographic Length", ttlv.integer(0, 256)),
                    attribute("Cryptographic Usage Mask", ttlv.integer(0, 12)),
                ],
            ),
        ],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=3000)
    parser.add_argument("--db-url", help="default: a SQLite file in a temporary directory")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        storage = open_storage(args.db_url or f"sqlite:///{tmp}/kms.db")
        dispatcher = Dispatcher(Keystore(storage, Barrier(os.urandom(32))), OPERATIONS, node="bench")
        started = time.perf_counter()
        made = 0
        while made < args.keys:
            n = min(100, args.keys - made)
            response = ttlv.decode(dispatcher.handle(request([_create() for _ in range(n)], BatchErrorContinuationOption.CONTINUE), ALICE))
            ok = [i for i in response.find_all(T.BATCH_ITEM.value) if i.get(T.RESULT_STATUS.value) == 0]
            assert len(ok) == n, "a Create failed"
            made += n
        print(f"created {made} AES keys in {time.perf_counter() - started:.1f} s")
        for label, payload in (
            ("Cryptographic Algorithm = AES (all match)", [_algorithm(CryptographicAlgorithm.AES)]),
            ("Cryptographic Algorithm = RSA (none match)", [_algorithm(CryptographicAlgorithm.RSA)]),
        ):
            best = None
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                response = ttlv.decode(dispatcher.handle(request([item(Operation.LOCATE, payload)], BatchErrorContinuationOption.CONTINUE), ALICE))
                elapsed = time.perf_counter() - t0
                best = elapsed if best is None else min(best, elapsed)
            answer = response.find(T.BATCH_ITEM.value)
            assert answer.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value
            found = len(answer.find(T.RESPONSE_PAYLOAD.value).find_all(T.UNIQUE_IDENTIFIER.value))
            print(f"Locate {label}: {found} ids in {best:.3f} s (best of {args.repeat})")
        storage.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
