"""The kms-server process as an operator runs it: configuration checks,
one-line errors, graceful stop, keys sealed at rest, no key bytes in logs,
and a reactor that keeps answering while slow cryptography runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import start_server
from kmip.core import enums
from kmip.core.enums import Operation, Tags
from kmip.pie import objects
from kmip_client import RawClient, pykmip

from kmip_core import ttlv

T = Tags


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "kms_server.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )


def _request(op: Operation, *payload, version=(1, 4), count: int = 1) -> bytes:
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            ttlv.structure(
                T.PROTOCOL_VERSION.value,
                [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, version[0]), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, version[1])],
            ),
            ttlv.integer(T.BATCH_COUNT.value, count),
        ],
    )
    item = ttlv.structure(
        T.BATCH_ITEM.value,
        [ttlv.enumeration(T.OPERATION.value, op.value), ttlv.structure(T.REQUEST_PAYLOAD.value, payload)],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header] + [item] * count))


def rsa4096_request(count: int = 1) -> bytes:
    def attribute(name, item):
        return ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), item.retag(T.ATTRIBUTE_VALUE.value)])

    common = ttlv.structure(
        T.COMMON_TEMPLATE_ATTRIBUTE.value,
        [
            attribute("Cryptographic Algorithm", ttlv.enumeration(0, enums.CryptographicAlgorithm.RSA.value)),
            attribute("Cryptographic Length", ttlv.integer(0, 4096)),
        ],
    )
    return _request(Operation.CREATE_KEY_PAIR, common, count=count)


def test_check_config_prints_settings_without_secrets(tmp_path, pki_dir):
    key = tmp_path / "master.key"
    key.write_text("ab" * 32 + "\n")
    key.chmod(0o600)
    result = run_cli(
        "--check-config",
        "--port", "6000",
        "--tls-cert", str(pki_dir / "server.pem"),
        "--tls-key", str(pki_dir / "server.key"),
        "--tls-ca", str(pki_dir / "ca.pem"),
        "--master-key-file", str(key),
        "--data-dir", str(tmp_path / "data"),
    )
    assert result.returncode == 0, result.stderr
    assert "port = 6000" in result.stdout
    assert str(key) in result.stdout
    assert "ab" * 32 not in result.stdout
    private_key_text = (pki_dir / "server.key").read_text().splitlines()[1]
    assert private_key_text not in result.stdout


def test_flags_override_the_config_file(tmp_path, pki_dir):
    config = tmp_path / "kms.toml"
    config.write_text('[server]\nport = 7000\nhost = "127.0.0.2"\n[master_key]\nfile = "m.key"\n')
    result = run_cli("--config", str(config), "--port", "7001", "--check-config")
    assert "port = 7001" in result.stdout
    assert 'host = "127.0.0.2"' in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--port", "notanumber"], "invalid int value"),
        (["--config", "/nonexistent/kms.toml"], "/nonexistent/kms.toml"),
    ],
)
def test_bad_command_line_is_one_line_without_traceback(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_master_key_is_a_clear_error(tmp_path, pki_dir):
    result = run_cli(
        "--tls-cert", str(pki_dir / "server.pem"),
        "--tls-key", str(pki_dir / "server.key"),
        "--tls-ca", str(pki_dir / "ca.pem"),
        "--data-dir", str(tmp_path),
    )
    assert result.returncode == 2
    assert "master" in result.stderr and "kms-admin master-key new" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_wrong_master_key_refuses_to_start(tmp_path, pki_dir):
    """A node started with another master key than the one that sealed the
    database refuses to serve, with a one-line reason."""
    server = start_server(tmp_path / "n", pki_dir)
    server.stop()
    (tmp_path / "n" / "master.key").write_text("cd" * 32 + "\n")
    result = run_cli("--config", str(tmp_path / "n" / "kms.toml"))
    assert result.returncode == 2
    assert "master key does not open this database" in result.stderr
    assert "Traceback" not in result.stderr


def test_port_in_use_is_a_clear_error(kms, tmp_path, pki_dir):
    config = (kms.workdir / "kms.toml").read_text().replace("port = 0", f"port = {kms.port}")
    (tmp_path / "kms.toml").write_text(config)
    result = run_cli("--config", str(tmp_path / "kms.toml"))
    assert result.returncode == 2
    assert "cannot listen" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_drains_in_flight_request_and_exits_zero(kms, pki_dir):
    """SIGTERM while an RSA-4096 key pair is being generated: the client
    still gets its successful response, then the process exits 0."""
    client = RawClient(kms.host, kms.port, pki_dir, "alice", timeout=60)
    try:
        client.send(rsa4096_request(count=6))
        time.sleep(0.3)  # Let the request reach a worker thread.
        kms.proc.send_signal(signal.SIGTERM)
        response = client.recv_message()
    finally:
        client.close()
    assert response is not None, kms.stderr_text()
    item = ttlv.decode(response).find(T.BATCH_ITEM.value)
    assert item.get(T.RESULT_STATUS.value) == 0
    assert kms.proc.wait(30) == 0


def test_reactor_answers_while_rsa_key_generation_runs(kms, pki_dir):
    """A slow RSA-4096 CreateKeyPair on one connection does not hold up a
    DiscoverVersions on another: the second answer arrives first. (A batch
    of twelve key pairs keeps the first request busy for seconds.)"""
    order: list[str] = []
    slow = RawClient(kms.host, kms.port, pki_dir, "alice", timeout=60)
    fast = RawClient(kms.host, kms.port, pki_dir, "bob", timeout=60)
    try:
        def run_slow():
            slow.send(rsa4096_request(count=12))
            slow.recv_message()
            order.append("rsa")

        thread = threading.Thread(target=run_slow)
        thread.start()
        time.sleep(0.2)
        assert fast.request(_request(Operation.DISCOVER_VERSIONS)) is not None
        order.append("discover")
        thread.join(60)
    finally:
        slow.close()
        fast.close()
    assert order == ["discover", "rsa"]


def _store_bytes(workdir: Path) -> bytes:
    data = b""
    for path in (workdir / "data").glob("kms.db*"):
        data += path.read_bytes()
    return data


def test_no_key_material_in_database_or_logs(tmp_path, pki_dir):
    """Keys created and registered through the server appear nowhere in the
    SQLite files (main database and WAL), nor in the server's debug log."""
    server = start_server(tmp_path / "n", pki_dir, log_level="DEBUG")
    secrets = []
    try:
        client = pykmip(server, pki_dir)
        try:
            for _ in range(5):
                uid = client.create(enums.CryptographicAlgorithm.AES, 256)
                secrets.append(client.get(uid).value)
            marker = os.urandom(24)
            uid = client.register(objects.SecretData(marker, enums.SecretDataType.PASSWORD))
            secrets.append(marker)
            assert client.get(uid).value == marker
        finally:
            client.close()
    finally:
        server.stop()
    stored = _store_bytes(tmp_path / "n")
    assert len(stored) > 0
    log = server.stderr_text()
    for secret in secrets:
        assert len(secret) >= 24
        assert secret not in stored
        assert secret.hex() not in log and secret.hex().upper() not in log
        assert secret.hex() not in stored.decode("latin-1")
