"""The deployment guide's Patroni + etcd configuration, run for real: three
Patroni nodes in strict synchronous mode (tests/patroni_cluster.py reads the
guide's config.yml), a KMS node on the guide's multi-host URL, a loader
creating keys through it. The leader's host is lost (Patroni and PostgreSQL
SIGKILLed, its leader key left in etcd until the ttl runs out); Patroni
promotes the synchronous standby by itself, the node reconnects, and every
key it acknowledged is on the new leader.

Patroni waits for the dead leader's key to expire (ttl 20 s, refreshed every
loop_wait 5 s), which is longer than the node's storage retry window
(~15 s, kmip_core/server/dispatcher.py STORAGE_RETRY_DELAYS): requests in
that window are answered GENERAL_FAILURE, never success."""

from __future__ import annotations

import os
import time

import patroni_cluster
import pytest
from conftest import start_server

from tests.integration.test_db_failover import Loader

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(150),
    pytest.mark.skipif(patroni_cluster.available() is not None, reason=str(patroni_cluster.available())),
]

# The role and password the guide creates for the KMS nodes.
KMS_USER = "kms"
KMS_PASSWORD = "from-a-secret-store"


def test_patroni_promotes_sync_standby_and_no_acknowledged_key_is_lost(tmp_path, pki_dir, monkeypatch):
    started = time.monotonic()
    cluster = patroni_cluster.PatroniCluster()
    server = None
    loader = None
    try:
        cluster.start(timeout=60)
        bootstrapped = time.monotonic() - started
        old_leader = cluster.leader()
        sync_standby = cluster.sync_standby()
        # The guide's step "create the KMS role and database once, on the leader".
        old_leader.psql(f"CREATE ROLE {KMS_USER} LOGIN PASSWORD '{KMS_PASSWORD}'", db="postgres")
        old_leader.psql(f"CREATE DATABASE kms OWNER {KMS_USER}", db="postgres")
        # The password in a libpq passfile, never in the URL (as the guide says);
        # kms-admin db upgrade and kms-server both read it.
        passfile = tmp_path / "pgpass"
        fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, cluster.passfile_lines(KMS_USER, KMS_PASSWORD).encode())
        os.close(fd)
        monkeypatch.setenv("PGPASSFILE", str(passfile))

        server = start_server(tmp_path / "node", pki_dir, db_url=cluster.multi_host_url(KMS_USER))
        loader = Loader(server, pki_dir)
        loader.start()
        time.sleep(2.0)
        before_kill = len(loader.acknowledged)
        assert before_kill > 0, server.stderr_text()

        killed = cluster.kill_leader()
        killed_at = killed.killed_at
        new_leader = cluster.wait_new_leader(timeout=45)
        promoted_at = time.monotonic()
        assert new_leader.name == sync_standby.name, "Patroni promoted a node that was not the sync standby"
        # Let the loader go on against the new leader (strict mode: its
        # commits wait until the remaining replica is its sync standby).
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if sum(1 for t, _ in loader.acknowledged if t > promoted_at) >= 20:
                break
            time.sleep(0.1)
        time.sleep(1.0)
        loader.stop_event.set()
        loader.join(65)
        assert not loader.is_alive(), "the loader is stuck in a request"

        # RPO 0 again: Patroni makes the remaining replica synchronous.
        new_sync = cluster.wait_sync_standby(timeout=20)
        resynced_at = time.monotonic()
        third = (set(cluster.nodes) - {killed.name, new_leader.name}).pop()
        assert new_sync.name == third, f"unexpected sync standby after the failover: {cluster.members()}"

        acknowledged = [uid for _, uid in loader.acknowledged]
        after = [t for t, _ in loader.acknowledged if t > killed_at]
        assert any(t > promoted_at for t in after), (
            f"the loader made no progress after the failover\n{server.stderr_text()}")
        last_before = max((t for t, _ in loader.acknowledged if t <= killed_at), default=killed_at)
        times = [last_before] + after
        stalled = max(b - a for a, b in zip(times, times[1:], strict=False))
        stored = set(new_leader.psql("SELECT uid FROM kms_objects").split())
        missing = [uid for uid in acknowledged if uid not in stored]
        first_write = next(t for t in after if t > promoted_at)
        # Responses already on their way when the host died (committed and
        # confirmed by the sync standby before the kill).
        in_flight = sum(1 for t in after if t <= promoted_at)
        print(
            f"\npatroni failover: bootstrap {bootstrapped:.1f} s; {killed.name} (leader) killed, "
            f"{new_leader.name} (sync standby) promoted {promoted_at - killed_at:.1f} s later; "
            f"first write acknowledged {first_write - promoted_at:+.1f} s after the promotion; "
            f"{new_sync.name} sync standby in etcd by {resynced_at - promoted_at:+.1f} s; "
            f"{len(acknowledged)} keys acknowledged ({len(acknowledged) - len(after)} before the kill, "
            f"{in_flight} in flight at the kill, {len(after) - in_flight} after the promotion), "
            f"{len(acknowledged) - len(missing)} found on the new leader, "
            f"{len(loader.failed)} refused (GENERAL_FAILURE/closed); "
            f"loader stalled {stalled:.1f} s; test {time.monotonic() - started:.1f} s"
        )
        assert missing == []
        # Refusals are GENERAL_FAILURE or a dropped connection, never
        # anything that could be taken for success.
        assert all(reason in (None, 0x0100) for _, reason in loader.failed)
    finally:
        if loader is not None:
            loader.stop_event.set()
        if server is not None:
            server.stop()
        if loader is not None:
            loader.join(10)
        cluster.close()
