"""What `require_credential` costs per request: a real kms-server with a
username/password required, N DiscoverVersions requests carrying the
credential (over one connection, then a new connection per request),
against a node that requires none.

    .venv/bin/python bench/credential_cost.py [--requests 10]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for p in (str(REPO / "tests"), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from conftest import start_server  # noqa: E402
from kmip.core.enums import Operation, ResultStatus  # noqa: E402
from kmip.core.enums import Tags as T  # noqa: E402
from kmip_client import RawClient  # noqa: E402

from kmip_core.client.messages import request_message  # noqa: E402
from kmip_core.pki import init_pki  # noqa: E402

USER, PASSWORD = "alice", "s3cret-enough-password"


def _timed(server, pki, requests: int, credential, reconnect: bool) -> list[float]:
    data = request_message((1, 4), Operation.DISCOVER_VERSIONS, [], credential=credential)
    times = []
    client = None
    try:
        for _ in range(requests):
            if client is None or reconnect:
                if client is not None:
                    client.close()
                client = RawClient(server.host, server.port, pki, "alice", timeout=60)
            t0 = time.perf_counter()
            response = client.request(data)
            times.append(time.perf_counter() - t0)
            item = response.find(T.BATCH_ITEM.value)
            assert item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value, item
    finally:
        if client is not None:
            client.close()
    return times


def _show(label: str, times: list[float]) -> None:
    print(
        f"{label:<44} first {times[0] * 1000:7.1f} ms, median {statistics.median(times) * 1000:7.1f} ms, "
        f"mean {statistics.mean(times) * 1000:7.1f} ms over {len(times)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pki = tmp / "pki"
        init_pki(pki, server_names=["localhost"], clients=["alice"])
        workdir = tmp / "node"
        workdir.mkdir()
        (tmp / "pw").write_text(PASSWORD + "\n")
        helper = workdir / "creds.toml"
        helper.write_text(f'[access]\ncredentials_file = "{workdir / "credentials.toml"}"\n')
        subprocess.run(
            [sys.executable, "-m", "kms_server.admin.cli", "credentials", "set", USER,
             "--password-file", str(tmp / "pw"), "--config", str(helper)],
            check=True, capture_output=True, cwd=REPO,
        )
        server = start_server(
            workdir,
            pki,
            extra_config=f"""
            [access]
            require_credential = true
            credentials_file = "{workdir / 'credentials.toml'}"
            """,
        )
        try:
            _show("credential, one connection", _timed(server, pki, args.requests, (USER, PASSWORD), False))
            _show("credential, a new connection per request", _timed(server, pki, args.requests, (USER, PASSWORD), True))
        finally:
            server.stop()
        plain = start_server(tmp / "plain", pki)
        try:
            _show("no credential required, one connection", _timed(plain, pki, args.requests, None, False))
        finally:
            plain.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
