"""`vtpm-broker backup` while the broker serves and `vtpm-broker restore`
on a new directory, with real processes: a kms-server and a vtpm-broker set
up with the operator's commands (broker.drill.processes), real TLS.

The restored broker, on new ports, serves the same instances, hosts, VMs,
placements and .nvram generations to the same certificates (the trust CA
came back), unwraps through the KMS with its restored client key, and
still refuses an older .nvram generation. The power-on of a stale .nvram
by a real host agent and swtpm is tests/integration/test_drill.py's
(`--lose management,broker`)."""

from __future__ import annotations

import shutil
import threading
import time

import pytest
from broker_harness import call, create_vm, ek_ca_pem, enroll, new_key_and_csr, register_host

from broker.drill.processes import restore_broker, run, start_broker, start_kms

PROVIDER = "kms-backup-it"
ROLES = """
[roles]
administrators = ["root-admin"]
"""


@pytest.fixture(scope="module")
def kms(tmp_path_factory):
    server = start_kms(tmp_path_factory.mktemp("kms"), audit=False)
    yield server
    server.stop()


def test_backup_while_serving_then_restore_on_a_new_host(tmp_path, kms):
    """Instance, host, VMs and generations made; a backup taken while VMs
    are being created; the broker killed and its directory deleted; the
    restore on a new directory and ports serves the same state, the
    instance and host certificates still work, the DEK unwraps, and a lower
    .nvram generation is refused as before."""
    broker = start_broker(tmp_path / "old", kms, PROVIDER, ROLES)
    try:
        instance = enroll(broker, "vc-a", tmp_path)
        host_key, host_csr = new_key_and_csr(tmp_path, "host:esx-1")
        host_cert = tmp_path / "esx-1.pem"
        host_cert.write_text(register_host(broker, instance, "esx-1", host_csr))
        host = (str(host_cert), str(host_key))
        vms = [create_vm(broker, instance, f"vm-{i}", host="esx-1") for i in range(3)]
        for i, vm in enumerate(vms):
            answer = call(broker, "PUT", f"/v1/vms/{vm['vm_uuid']}/nvram-generation", host, json={"generation": 5 + i})
            assert answer.status_code == 200, answer.text
        trust_ca = broker.trust_ca.read_bytes()
        ek_ca = ek_ca_pem(broker)

        # More VMs are created while the backup runs: it must still be one snapshot.
        made_during: list[dict] = []
        stop = threading.Event()

        def create_more() -> None:
            while not stop.is_set() and len(made_during) < 10:
                made_during.append(create_vm(broker, instance, f"busy-{len(made_during)}", host="esx-1"))

        busy = threading.Thread(target=create_more)
        busy.start()
        time.sleep(0.3)
        backup = tmp_path / "backups" / "broker.vtbak"
        backup.parent.mkdir()
        try:
            done = run("vtpm-broker", "--config", broker.config, "backup", "--out", backup)
        finally:
            stop.set()
            busy.join(60)
        assert "wrote" in done.stdout and backup.stat().st_mode & 0o777 == 0o600
        vault = tmp_path / "vault.key"
        shutil.copy2(broker.data_dir / "master.key", vault)
    finally:
        broker.kill()
    old_port = broker.api_port
    shutil.rmtree(broker.workdir)

    restored = restore_broker(tmp_path / "new", kms, PROVIDER, backup, vault, ROLES)
    try:
        assert restored.api_port != old_port or restored.workdir != broker.workdir
        assert restored.trust_ca.read_bytes() == trust_ca
        assert ek_ca_pem(restored) == ek_ca

        # The instance's own certificate is accepted, and its VMs are all there.
        listed = call(restored, "GET", "/v1/vms", instance)
        assert listed.status_code == 200, listed.text
        by_uuid = {vm["vm_uuid"]: vm for vm in listed.json()["vms"]}
        for i, vm in enumerate(vms):
            got = by_uuid[vm["vm_uuid"]]
            assert (got["name"], got["host"], got["kms_key_id"]) == (f"vm-{i}", "esx-1", vm["kms_key_id"])
            assert got["nvram_generation"] == 5 + i
        # One snapshot: the busy VMs restored are exactly the first ones the API confirmed.
        busy_uuids = [vm["vm_uuid"] for vm in made_during]
        restored_busy = [u for u in busy_uuids if u in by_uuid]
        assert restored_busy == busy_uuids[: len(restored_busy)]
        assert set(by_uuid) <= {vm["vm_uuid"] for vm in vms} | set(busy_uuids)

        # The host's certificate still works; the restored KMS client key unwraps a DEK at the KMS.
        first = vms[0]["vm_uuid"]
        answer = call(restored, "GET", f"/v1/vms/{first}/nvram-generation", host)
        assert answer.status_code == 200 and answer.json()["generation"] == 5, answer.text
        restored.admin("issue-user", "root-admin", "--out-dir", str(tmp_path / "admin"))
        admin = (str(tmp_path / "admin" / "root-admin.pem"), str(tmp_path / "admin" / "root-admin.key"))
        dek = call(restored, "GET", f"/v1/vms/{first}/dek", admin)
        assert dek.status_code == 200, dek.text
        # A stale .nvram's generation is refused after the restore as it was before.
        stale = call(restored, "PUT", f"/v1/vms/{first}/nvram-generation", host, json={"generation": 4})
        assert stale.status_code == 409 and "older than generation 5" in stale.json()["error"], stale.text

        listing = restored.admin("list", "--json").stdout
        assert '"vc-a"' in listing and '"trusted"' in listing
        verify = restored.admin("audit", "verify", check=False)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        trail = restored.admin("audit").stdout
        assert "broker.restore" in trail
    finally:
        restored.stop()
