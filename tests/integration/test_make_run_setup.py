"""What `make run` does, step by step, in a scratch copy of the layout:
`kms-admin pki init` into certs/dev, `kms-admin master-key new` and
`kms-admin audit key new` into var/, then `kms-server --config
etc/kms-dev.toml` (here with --port 0 --audit-web-port 0 --metrics-port 0) serves the vcenter
client certificate it made, and the accesses are in a verified trail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

from kmip.core import enums
from kmip.pie.client import ProxyKmipClient

REPO = Path(__file__).resolve().parents[2]


def admin(*args, cwd):
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_dev_setup_serves_the_vcenter_certificate(tmp_path):
    (tmp_path / "etc").mkdir()
    shutil.copy(REPO / "etc" / "kms-dev.toml", tmp_path / "etc" / "kms-dev.toml")
    admin("pki", "init", "--dir", "certs/dev", "--server-name", "localhost", "--client", "vcenter", "--client", "admin",
          cwd=tmp_path)
    (tmp_path / "var").mkdir(mode=0o700)
    admin("master-key", "new", "--out", "var/master.key", cwd=tmp_path)
    assert (tmp_path / "var" / "master.key").stat().st_mode & 0o777 == 0o600
    admin("audit", "key", "new", "--out", "var/audit.key", cwd=tmp_path)
    assert (tmp_path / "var" / "audit.key").stat().st_mode & 0o777 == 0o600
    # Running it twice keeps what exists (make run is re-run every day).
    admin("pki", "init", "--dir", "certs/dev", "--server-name", "localhost", "--client", "vcenter", "--client", "admin",
          cwd=tmp_path)

    proc = subprocess.Popen(
        [sys.executable, "-m", "kms_server.cli", "--config", "etc/kms-dev.toml", "--port", "0", "--audit-web-port", "0",
         "--metrics-port", "0"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        assert "listening on 127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()
        assert "audit page on https://127.0.0.1:" in proc.stdout.readline()
        port = int(line.strip().rsplit(":", 1)[1])
        client = ProxyKmipClient(
            hostname="127.0.0.1", port=port,
            cert=str(tmp_path / "certs/dev/vcenter.pem"), key=str(tmp_path / "certs/dev/vcenter.key"),
            ca=str(tmp_path / "certs/dev/ca.pem"),
        )
        client.open()
        try:
            uid = client.create(enums.CryptographicAlgorithm.AES, 256)
            assert len(client.get(uid).value) == 32
        finally:
            client.close()
        # `make vcenter-session`: the captured vCenter session, replayed.
        session = subprocess.run(
            [sys.executable, str(REPO / "tools" / "vcenter_session.py"), "--port", str(port),
             "--cert", "certs/dev/vcenter.pem", "--key", "certs/dev/vcenter.key", "--ca", "certs/dev/ca.pem"],
            cwd=tmp_path, capture_output=True, text=True, timeout=120,
        )
        assert session.returncode == 0, session.stdout + session.stderr
        assert "58 requests replayed, 0 items failed" in session.stdout
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    assert (tmp_path / "var" / "kms.db").exists()
    shown = admin("audit", "show", "--config", "etc/kms-dev.toml", "--json", "--object", uid, cwd=tmp_path)
    assert [json.loads(line)["operation"] for line in shown.splitlines()] == ["CREATE", "GET"]
    # What the README's quick start promises: the VM's key, found by VM name.
    vm = [json.loads(line) for line in admin(
        "audit", "show", "--config", "etc/kms-dev.toml", "--json", "--vm", "test01", cwd=tmp_path).splitlines()]
    assert {"CREATE", "ADD_ATTRIBUTE", "GET", "ACTIVATE"} <= {r["operation"] for r in vm}
    assert all(r["client"]["name"] == "vcenter" for r in vm)
    table = admin("audit", "show", "--config", "etc/kms-dev.toml", "--vm", "test01", cwd=tmp_path)
    assert "test01" in table and "ADD_ATTRIBUTE" in table
    assert "audit trail intact" in admin("audit", "verify", "--config", "etc/kms-dev.toml", cwd=tmp_path)
