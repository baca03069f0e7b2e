"""A real `vtpm-broker` process for integration tests, and the management
steps every broker test takes (enroll an instance, register a host, create a
VM): set up with `vtpm-broker init`, its KMS client certificate signed by the
test PKI's CA, started with `vtpm-broker run`, spoken to over real TLS.

Used by tests/integration/test_broker_api.py, test_broker_swtpm_setup.py
and test_broker_postgresql.py.
"""

from __future__ import annotations

import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from kmip_core import pki

PROVIDER = "kms-test"


class Broker:
    """One `vtpm-broker run` process; `cli` runs admin commands against the
    same configuration."""

    def __init__(self, workdir: Path, config: Path, data_dir: Path):
        self.workdir = workdir
        self.config = config
        self.data_dir = data_dir
        self.proc: subprocess.Popen | None = None
        self.log: list[str] = []
        self.port = 0
        self.gateway_port = 0
        self.ca = data_dir / "trust-ca.pem"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [sys.executable, "-m", "broker.cli", "--config", str(self.config), *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"vtpm-broker {' '.join(args)} failed: {result.stderr}")
        return result

    def start(self, timeout: float = 60.0, metrics: bool = False) -> None:
        """Start `vtpm-broker run` and wait until its API and gateway listen;
        with `metrics` (a configuration with [metrics]), until its monitoring
        listener does too: it is started after the gateway's announcement,
        and a test scraping it at once could otherwise come first on a busy
        machine."""
        self.log = []
        self.port = self.gateway_port = 0
        metrics_seen = not metrics
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "broker.cli", "--config", str(self.config), "run"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        proc = self.proc
        threading.Thread(target=lambda: [self.log.append(x.rstrip()) for x in proc.stderr], daemon=True).start()
        lines: queue.Queue[str] = queue.Queue()

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put("")

        threading.Thread(target=read, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not (self.port and self.gateway_port and metrics_seen):
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if not line:
                break
            if "api listening on" in line:
                self.port = int(line.strip().rsplit(":", 1)[1])
                deadline = min(deadline, time.monotonic() + 10)  # the gateway announces right after
            elif "gateway listening on" in line:
                self.gateway_port = int(line.strip().rsplit(":", 1)[1])
            elif "metrics on" in line:
                metrics_seen = True
        if not self.port or not metrics_seen:
            proc.kill()
            proc.wait(5)
            time.sleep(0.2)  # let the reader thread collect stderr
            what = "start" if not self.port else "start its metrics listener"
            raise RuntimeError(f"vtpm-broker did not {what}:\n" + "\n".join(self.log))

    def stop(self) -> int:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode if self.proc else 0

    def url(self, path: str = "") -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def call(self, method: str, path: str, identity: tuple[str, str] | None = None, **kwargs) -> requests.Response:
        return requests.request(method, self.url(path), cert=identity, verify=str(self.ca), timeout=60, **kwargs)


def write_config(
    workdir: Path,
    kms_port: int,
    pki_dir: Path,
    *,
    node_name: str = "broker-test",
    db_url: str | None = None,
    master_key: Path | None = None,
    extra: str = "",
) -> Path:
    """A broker configuration in workdir (data in workdir/data). Replicas
    share db_url and master_key."""
    config = workdir / "broker.toml"
    text = textwrap.dedent(
        f"""
        [broker]
        provider_name = "{PROVIDER}"
        data_dir = "data"
        node_name = "{node_name}"

        [api]
        port = 0

        [gateway]
        port = 0

        [kms]
        nodes = ["127.0.0.1:{kms_port}"]
        ca = "{pki_dir / "ca.pem"}"

        [roles]
        security_admins = ["secadmin"]
        administrators = ["vc-admin"]
        auditors = ["auditor"]
        """
    )
    if db_url:
        text += f'\n[storage]\ndb_url = "{db_url}"\n'
    if master_key:
        # Replicas share the master key and the audit key beside it.
        text += f'\n[master_key]\nfile = "{master_key}"\n'
        text += f'\n[audit]\nsigning_key_file = "{master_key.with_name("audit.key")}"\n'
    config.write_text(text + textwrap.dedent(extra))
    return config


def set_up(workdir: Path, config: Path, pki_dir: Path) -> Broker:
    """`vtpm-broker init`, then the operator's step: the KMS CA signs the
    broker's KMS client CSR. Not started."""
    broker = Broker(workdir, config, workdir / "data")
    broker.cli("init")
    pki.sign_csr(pki_dir, broker.data_dir / "kms-client.csr", broker.data_dir / "kms-client.pem")
    return broker


def csr_pem(common_name: str = "x") -> str:
    """A CSR (PEM) for a fresh P-256 key that is not kept: for requests whose key nobody uses."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def new_key_and_csr(directory: Path, name: str) -> tuple[Path, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    key_path = directory / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    return key_path, csr.public_bytes(serialization.Encoding.PEM).decode()


def enroll(broker: Broker, name: str, *, approver: Broker | None = None, poller: Broker | None = None):
    """Token, enrollment, approval by the admin CLI, poll: (cert, key) paths.
    The approval and the poll may go through other replicas."""
    token = broker.cli("admin", "token", "--instance", name).stdout.strip()
    key_path, csr = new_key_and_csr(broker.workdir, name)
    answer = broker.call("POST", "/v1/enroll", json={"instance": name, "token": token, "csr_pem": csr})
    assert answer.status_code == 202, answer.text
    enrollment = answer.json()
    (approver or broker).cli("admin", "approve", name)
    poll = {"Authorization": f"Bearer {enrollment['poll_secret']}"}
    done = (poller or broker).call("GET", f"/v1/enrollments/{enrollment['enrollment_id']}", headers=poll)
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "approved"
    cert_path = broker.workdir / f"{name}.pem"
    cert_path.write_text(done.json()["certificate_pem"])
    return str(cert_path), str(key_path)


def register_host(broker: Broker, identity, name: str) -> tuple[str, str]:
    """A host key and CSR made here, the host certificate issued by the broker."""
    key_path, csr = new_key_and_csr(broker.workdir, f"host-{name}")
    answer = broker.call("POST", "/v1/hosts", identity, json={"name": name, "csr_pem": csr})
    assert answer.status_code == 201, answer.text
    cert_path = broker.workdir / f"host-{name}.pem"
    cert_path.write_text(answer.json()["certificate_pem"])
    return str(cert_path), str(key_path)


def create_vm(broker: Broker, identity, host: str | None = None) -> dict:
    vm_uuid = str(uuid.uuid4())
    body = {"vm_uuid": vm_uuid, "name": f"vm-{vm_uuid[:8]}"}
    if host:
        body["host"] = host
    answer = broker.call("POST", "/v1/vms", identity, json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


def assert_error(answer: requests.Response, status: int, words: str) -> str:
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert words in error, error
    assert "\n" not in error and "Traceback" not in answer.text
    return error
