"""Database failover: a node on a primary with a synchronous standby (libpq
multi-host URL, target_session_attrs=read-write). Under load the primary is
killed with SIGKILL and the standby promoted; the node reconnects to the new
primary by itself, and every key it acknowledged is there."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pg_cluster
import pytest
from conftest import start_server
from kmip.core.enums import CryptographicAlgorithm, ObjectType, Operation, ResultStatus, Tags
from kmip_client import RawClient

from kmip_core import ttlv

T = Tags

pytestmark = pytest.mark.skipif(pg_cluster.available() is not None, reason=str(pg_cluster.available()))


def _message(op: Operation, payload: list) -> bytes:
    header = ttlv.structure(T.REQUEST_HEADER.value, [
        ttlv.structure(T.PROTOCOL_VERSION.value, [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1),
                                                 ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4)]),
        ttlv.integer(T.BATCH_COUNT.value, 1)])
    item = ttlv.structure(T.BATCH_ITEM.value, [ttlv.enumeration(T.OPERATION.value, op.value),
                                               ttlv.structure(T.REQUEST_PAYLOAD.value, payload)])
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, item]))


def _attribute(name: str, value: ttlv.Item) -> ttlv.Item:
    return ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name),
                                              value.retag(T.ATTRIBUTE_VALUE.value)])


def create_request(n: int) -> bytes:
    return _message(Operation.CREATE, [
        ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SYMMETRIC_KEY.value),
        ttlv.structure(T.TEMPLATE_ATTRIBUTE.value, [
            _attribute("Cryptographic Algorithm", ttlv.enumeration(0, CryptographicAlgorithm.AES.value)),
            _attribute("Cryptographic Length", ttlv.integer(0, 256)),
            _attribute("x-loader-seq", ttlv.integer(0, n)),
        ]),
    ])


class Loader(threading.Thread):
    """Creates keys one after another through one node and records what the
    node acknowledged, what it refused, and when."""

    def __init__(self, server, pki):
        super().__init__(daemon=True)
        self.server, self.pki = server, pki
        self.acknowledged: list[tuple[float, str]] = []
        self.failed: list[tuple[float, int | None]] = []
        self.stop_event = threading.Event()

    def run(self):
        n = 0
        client = None
        while not self.stop_event.is_set():
            try:
                if client is None:
                    client = RawClient(self.server.host, self.server.port, self.pki, "alice", timeout=60)
                response = client.request(create_request(n))
                n += 1
                if response is None:
                    client.close()
                    client = None
                    self.failed.append((time.monotonic(), None))
                    continue
                item = response.find(T.BATCH_ITEM.value)
                if item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value:
                    uid = item.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
                    self.acknowledged.append((time.monotonic(), uid))
                else:
                    self.failed.append((time.monotonic(), item.get(T.RESULT_REASON.value)))
            except OSError:
                if client is not None:
                    client.close()
                client = None
                self.failed.append((time.monotonic(), None))
                time.sleep(0.1)
        if client is not None:
            client.close()


def test_primary_killed_and_standby_promoted_loses_no_acknowledged_key(tmp_path, pki_dir):
    cluster = pg_cluster.PgCluster().start()
    server = None
    try:
        server = start_server(tmp_path / "node", pki_dir, db_url=cluster.multi_host_url())
        loader = Loader(server, pki_dir)
        loader.start()
        time.sleep(1.5)
        before_kill = len(loader.acknowledged)
        assert before_kill > 0, server.stderr_text()
        killed_at = time.monotonic()
        cluster.primary.kill9()
        deadline = time.monotonic() + 10
        while cluster.primary.pid() is not None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cluster.primary.pid() is None, "the primary survived SIGKILL"
        cluster.standby.promote()
        promoted_at = time.monotonic()
        time.sleep(3.0)
        loader.stop_event.set()
        loader.join(60)

        acknowledged = [uid for _, uid in loader.acknowledged]
        after = [t for t, _ in loader.acknowledged if t > killed_at]
        assert after, f"the loader made no progress after the failover\n{server.stderr_text()}"
        times = [killed_at] + after
        stalled = max(b - a for a, b in zip(times, times[1:], strict=False))
        stored = set(cluster.standby.psql("SELECT uid FROM kms_objects").split())
        missing = [uid for uid in acknowledged if uid not in stored]
        print(
            f"\nfailover: {len(acknowledged)} keys acknowledged ({before_kill} before the kill), "
            f"{len(acknowledged) - len(missing)} found on the new primary, "
            f"{len(loader.failed)} refused (GENERAL_FAILURE/closed), "
            f"longest gap between acknowledgements after the kill {stalled:.2f} s (promotion took {promoted_at - killed_at:.2f} s)"
        )
        assert missing == []
        # Every acknowledged Create has its audit record on the new primary
        # (they committed together), and the trail there verifies.
        audited = set(cluster.standby.psql("SELECT uid FROM kms_audit WHERE operation = 'CREATE' AND result = 'SUCCESS'").split())
        assert [uid for uid in acknowledged if uid not in audited] == []
        config = server.workdir / "kms.toml"
        verified = subprocess.run(
            [sys.executable, "-m", "kms_server.admin.cli", "audit", "verify", "--config", str(config),
             "--db-url", cluster.standby.url],
            capture_output=True, text=True, timeout=120,
        )
        assert verified.returncode == 0, verified.stderr
        # Refusals are GENERAL_FAILURE or a dropped connection, never anything
        # that could be taken for success.
        assert all(reason in (None, 0x0100) for _, reason in loader.failed)
    finally:
        if server is not None:
            server.stop()
        cluster.close()
