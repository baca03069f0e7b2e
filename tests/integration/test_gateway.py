"""The host gateway over real TLS, in front of a real kms-server.

A KEK is created in the KMS by the broker's own identity (a client
certificate from the KMS CA) and a 512-bit DEK is wrapped under it by KMIP
Encrypt in AES-GCM. The gateway runs in its own process with its own
reactor (`run_gateway_for_tests`), its listener verifying host certificates
against a separate trust CA, and a stand-in trust registry that answers as
broker.trust.Registry does: host-a may unwrap the KEK, host-b belongs to
the same instance but does not hold the VM, host-c is not registered.
Every decision the gateway reports goes to a JSON-lines audit file the
tests read back.

    python tests/integration/test_gateway.py CONFIG.json   (what the fixture runs)
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from kmip.core.enums import Operation, ResultReason, ResultStatus, Tags

from kmip_core import ttlv
from kmip_core.client import KmipClient, KmipError
from kmip_core.client.messages import request_message
from kmip_core.pki import fingerprint_sha256, init_pki, issue_client

T = Tags
HERE = Path(__file__).resolve()
TESTS = HERE.parents[1]
FIXTURES = sorted((TESTS / "fixtures" / "malformed").glob("*.hex"))
BROKER_IDENTITY = "vtpm-broker"
MISSING_KEY = "no-such-key-in-the-kms"


# --- The gateway process ------------------------------------------------------------


@dataclass
class GatewayProcess:
    proc: subprocess.Popen
    host: str
    port: int
    log: list[str]
    audit_path: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def audit(self) -> list[dict]:
        if not self.audit_path.exists():
            return []
        return [json.loads(line) for line in self.audit_path.read_text().splitlines() if line]

    def stderr_text(self) -> str:
        return "\n".join(self.log)

    def stop(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode


def run_gateway_for_tests(
    workdir: Path,
    trust_dir: Path,
    kms_nodes: list[str],
    kms_pki: Path,
    hosts: dict[str, str],
    allow: dict[str, list[str]],
    *,
    threads: int = 8,
    kms_connections: int = 1,
    log_level: str = "DEBUG",
) -> GatewayProcess:
    """Start a gateway in a subprocess on a free 127.0.0.1 port.

    `trust_dir` is an init_pki directory (ca.pem is the trust CA, server.pem
    the gateway's certificate); the gateway reaches the KMS at `kms_nodes`
    as BROKER_IDENTITY from `kms_pki`. `hosts` maps certificate fingerprints
    to registered host names, `allow` fingerprints to the key ids they may
    unwrap. `kms_connections` is the size of the gateway's KMS connection
    pool (KmipClient(connections=...)), as [kms] connections in the broker."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "trust_dir": str(trust_dir),
        "kms_nodes": kms_nodes,
        "kms_cert": str(kms_pki / f"{BROKER_IDENTITY}.pem"),
        "kms_key": str(kms_pki / f"{BROKER_IDENTITY}.key"),
        "kms_ca": str(kms_pki / "ca.pem"),
        "hosts": hosts,
        "allow": allow,
        "audit": str(workdir / "audit.jsonl"),
        "threads": threads,
        "kms_connections": kms_connections,
        "log_level": log_level,
    }
    config_path = workdir / "gateway.json"
    config_path.write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, str(HERE), str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []
    threading.Thread(target=lambda: [log.append(line.rstrip()) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            host, port = line.strip().rsplit(" ", 1)[1].rsplit(":", 1)
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return GatewayProcess(proc, host, int(port), log, Path(config["audit"]))
    proc.kill()
    proc.wait(5)
    time.sleep(0.2)
    raise RuntimeError(f"gateway did not start: {line!r}\n" + "\n".join(log))


def _serve(config_path: str) -> None:
    """The subprocess: a gateway on the global reactor until SIGTERM."""
    import logging

    from twisted.internet import defer, reactor
    from twisted.python.threadpool import ThreadPool

    from broker.gateway import build_gateway_factory
    from kmip_core.config import TlsConfig

    cfg = json.loads(Path(config_path).read_text())
    logging.basicConfig(
        level=cfg["log_level"], stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    @dataclass(frozen=True)
    class Decision:
        allowed: bool
        reason: str
        host: str | None
        instance: str | None
        vm_uuid: str | None

    class Registry:
        def __init__(self):
            self.lock = threading.Lock()
            self.audit = open(cfg["audit"], "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life

        def authorize_unwrap(self, host_fingerprint, kms_key_id):
            host = cfg["hosts"].get(host_fingerprint)
            if host is None:
                return Decision(False, "unknown host certificate", None, None, None)
            if kms_key_id in cfg["allow"].get(host_fingerprint, []):
                return Decision(True, f"{host} holds the VM of key {kms_key_id}", host, "instance-a", "vm-1")
            if any(kms_key_id in keys for keys in cfg["allow"].values()):
                # A VM of the host's own instance, placed on another host.
                return Decision(
                    False, f"the VM of key {kms_key_id} is not placed on {host}", host, "instance-a", "vm-1"
                )
            return Decision(False, f"key {kms_key_id} is not the KEK of any registered VM", host, "instance-a", None)

        def authorize_gateway_unwrap(self, host_fingerprint, kms_key_id, ticket):
            # No attestation policy in this test (tests/integration/test_host_attestation.py has them).
            from broker.trust import AttestationCheck

            decision = self.authorize_unwrap(host_fingerprint, kms_key_id)
            if not decision.allowed:
                return decision, None
            return decision, AttestationCheck(True, False, "no attestation policy covers this host")

        def record_audit(self, actor, action, target, allowed, reason):
            line = json.dumps(
                {"actor": actor, "action": action, "target": target, "allowed": allowed, "reason": reason}
            )
            with self.lock:
                self.audit.write(line + "\n")
                self.audit.flush()

    kms = KmipClient(
        cfg["kms_nodes"],
        cert=cfg["kms_cert"],
        key=cfg["kms_key"],
        ca=cfg["kms_ca"],
        connect_timeout=2.0,
        connections=cfg["kms_connections"],
    )
    trust = Path(cfg["trust_dir"])
    tls_config = TlsConfig(
        cert=trust / "server.pem",
        key=trust / "server.key",
        ca=trust / "ca.pem",
        trusted_clients_dir=trust / "pinned",
        identity="cn",
        min_version="1.2",
    )
    pool = ThreadPool(minthreads=1, maxthreads=cfg["threads"], name="gateway-workers")
    factory, context_factory = build_gateway_factory(
        tls_config, Registry(), kms, reactor, pool, idle_timeout=30, handshake_timeout=5
    )
    pool.start()
    port = reactor.listenSSL(0, factory, context_factory, interface="127.0.0.1")

    @defer.inlineCallbacks
    def stop():
        yield port.stopListening()
        yield factory.drain()
        yield factory.close_all()
        pool.stop()
        kms.close()

    reactor.addSystemEventTrigger("before", "shutdown", stop)
    print(f"gateway listening on 127.0.0.1:{port.getHost().port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    _serve(sys.argv[1])
    sys.exit(0)


# --- Fixtures -----------------------------------------------------------------------

import pytest  # noqa: E402 - the subprocess above needs none of the test machinery
from kmip_client import RawClient  # noqa: E402


def broker_credentials(pki_dir: Path) -> None:
    """The broker's client certificate from the KMS CA (kms-admin pki
    issue-client vtpm-broker), made once per PKI."""
    if not (pki_dir / f"{BROKER_IDENTITY}.pem").exists():
        issue_client(pki_dir, BROKER_IDENTITY)


def kms_client(kms, pki_dir: Path) -> KmipClient:
    return KmipClient(
        [f"{kms.host}:{kms.port}"],
        cert=pki_dir / f"{BROKER_IDENTITY}.pem",
        key=pki_dir / f"{BROKER_IDENTITY}.key",
        ca=pki_dir / "ca.pem",
    )


@dataclass(frozen=True)
class WrappedDek:
    kek: str
    dek: bytes
    data: bytes
    iv: bytes
    tag: bytes


@pytest.fixture(scope="module")
def wrapped(kms_module, pki_dir) -> WrappedDek:
    """A VM's KEK made in the KMS and a fresh 512-bit DEK wrapped under it
    by the KMS, as the broker does when a VM is encrypted."""
    broker_credentials(pki_dir)
    dek = os.urandom(64)
    with kms_client(kms_module, pki_dir) as kms:
        kek = kms.create_symmetric_key(
            name="vm-1-kek", attributes={"x-Component": "Virtual Machine", "x-Identifier": "vm-1"}
        )
        kms.activate(kek)
        result = kms.encrypt(kek, dek, mode="GCM")
    assert result.iv is not None and result.tag is not None
    return WrappedDek(kek, dek, result.data, result.iv, result.tag)


@pytest.fixture(scope="module")
def trust_dir(tmp_path_factory) -> Path:
    """The broker's trust CA, separate from the KMS CA; host-c has a
    certificate from it but was never registered."""
    directory = tmp_path_factory.mktemp("trust")
    init_pki(directory, server_names=["localhost"], clients=["host-a", "host-b", "host-c"])
    return directory


def fingerprint(trust_dir: Path, host: str) -> str:
    from cryptography import x509

    return fingerprint_sha256(x509.load_pem_x509_certificate((trust_dir / f"{host}.pem").read_bytes()))


def registry_for(trust_dir: Path, kek: str) -> tuple[dict, dict]:
    a, b = fingerprint(trust_dir, "host-a"), fingerprint(trust_dir, "host-b")
    return {a: "host-a", b: "host-b"}, {a: [kek, MISSING_KEY]}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, trust_dir, kms_module, pki_dir, wrapped):
    hosts, allow = registry_for(trust_dir, wrapped.kek)
    process = run_gateway_for_tests(
        tmp_path_factory.mktemp("gateway"),
        trust_dir,
        [f"{kms_module.host}:{kms_module.port}"],
        pki_dir,
        hosts,
        allow,
    )
    yield process
    process.stop()


def host_client(gateway: GatewayProcess, trust_dir: Path, host: str, version=(1, 4)) -> KmipClient:
    return KmipClient(
        [gateway.address],
        cert=trust_dir / f"{host}.pem",
        key=trust_dir / f"{host}.key",
        ca=trust_dir / "ca.pem",
        version=version,
        request_timeout=15.0,
    )


def unwrap(client: KmipClient, w: WrappedDek, **overrides) -> bytes:
    args = {"uid": w.kek, "data": w.data, "iv": w.iv, "tag": w.tag, "mode": "GCM"} | overrides
    return client.decrypt(**args)


def discover_versions_request() -> bytes:
    return request_message((1, 4), Operation.DISCOVER_VERSIONS, [])


def assert_no_dek(text: str, dek: bytes) -> None:
    import base64

    for encoding in (dek.hex(), dek.hex().upper(), base64.b64encode(dek).decode(), repr(dek)[2:-1]):
        assert encoding not in text


# --- Tests --------------------------------------------------------------------------


def test_allowed_host_gets_the_dek_back_byte_identical(gateway, trust_dir, wrapped):
    """host-a, registered and holding the VM, unwraps the DEK through the
    gateway; the KMS did the decryption, the broker's audit shows the
    decision, and neither the audit nor the gateway's DEBUG log holds the DEK."""
    before = len(gateway.audit())
    with host_client(gateway, trust_dir, "host-a") as client:
        assert unwrap(client, wrapped) == wrapped.dek
    records = gateway.audit()[before:]
    assert len(records) == 1
    assert records[0]["actor"] == "host:host-a" and records[0]["allowed"] is True
    assert wrapped.kek in records[0]["target"]
    assert fingerprint(trust_dir, "host-a") in records[0]["reason"]
    time.sleep(0.2)  # Let the log reader catch up.
    assert_no_dek(gateway.audit_path.read_text(), wrapped.dek)
    assert_no_dek(gateway.stderr_text(), wrapped.dek)


def test_every_protocol_version_unwraps(gateway, trust_dir, wrapped):
    """Hosts speaking KMIP 1.1, 1.2, 1.4 and 2.0 are answered in their version
    (the gateway talks 1.4 to the KMS either way)."""
    for version in ((1, 1), (1, 2), (1, 4), (2, 0)):
        with host_client(gateway, trust_dir, "host-a", version=version) as client:
            assert unwrap(client, wrapped) == wrapped.dek, version


def test_registered_host_for_another_vm_is_denied(gateway, trust_dir, wrapped):
    """host-b is registered by the VM's instance, but the VM is not placed
    on it: PERMISSION_DENIED."""
    before = len(gateway.audit())
    with host_client(gateway, trust_dir, "host-b") as client, pytest.raises(KmipError) as caught:
        unwrap(client, wrapped)
    assert caught.value.reason == ResultReason.PERMISSION_DENIED
    [record] = gateway.audit()[before:]
    assert record["actor"] == "host:host-b" and record["allowed"] is False


def test_unregistered_host_learns_nothing(gateway, trust_dir, wrapped):
    """host-c has a valid trust-CA certificate but no registration: the key
    is reported as not found."""
    with host_client(gateway, trust_dir, "host-c") as client, pytest.raises(KmipError) as caught:
        unwrap(client, wrapped)
    assert caught.value.reason == ResultReason.ITEM_NOT_FOUND
    assert gateway.audit()[-1]["allowed"] is False


def test_kms_answers_are_passed_on(gateway, trust_dir, wrapped):
    """A tampered tag fails at the KMS (CRYPTOGRAPHIC_FAILURE) and a key the
    registry allows but the KMS lacks is ITEM_NOT_FOUND; the gateway keeps
    serving."""
    with host_client(gateway, trust_dir, "host-a") as client:
        with pytest.raises(KmipError) as caught:
            unwrap(client, wrapped, tag=bytes(b ^ 1 for b in wrapped.tag))
        assert caught.value.reason == ResultReason.CRYPTOGRAPHIC_FAILURE
        with pytest.raises(KmipError) as caught:
            unwrap(client, wrapped, uid=MISSING_KEY)
        assert caught.value.reason == ResultReason.ITEM_NOT_FOUND
        assert unwrap(client, wrapped) == wrapped.dek


def test_other_operations_are_not_supported(gateway, trust_dir, wrapped):
    """Even the host allowed to unwrap may not Get the KEK, make keys, or
    use the KEK to encrypt."""
    with host_client(gateway, trust_dir, "host-a") as client:
        for attempt in (
            lambda: client.get_key(wrapped.kek),
            lambda: client.create_symmetric_key(),
            lambda: client.locate({"x-Identifier": "vm-1"}),
            lambda: client.encrypt(wrapped.kek, b"\x00" * 16),
        ):
            with pytest.raises(KmipError) as caught:
                attempt()
            assert caught.value.reason == ResultReason.OPERATION_NOT_SUPPORTED
        assert set(client.query_operations()) == {Operation.DISCOVER_VERSIONS, Operation.QUERY, Operation.DECRYPT}


def refused_at_handshake(gateway: GatewayProcess, context: ssl.SSLContext) -> bool:
    """True when the gateway never answers a request on this TLS setup.
    With TLS 1.3 the client's side of the handshake can finish before the
    server has checked the client's certificate, so the refusal may only
    show on the first read."""
    try:
        raw = socket.create_connection((gateway.host, gateway.port), timeout=10)
        with context.wrap_socket(raw, server_hostname="localhost") as sock:
            sock.sendall(discover_versions_request())
            return sock.recv(8) == b""
    except (ssl.SSLError, ConnectionError):
        return True


def test_client_without_certificate_is_refused(gateway, trust_dir):
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(trust_dir / "ca.pem"))
    before = len(gateway.audit())
    assert refused_at_handshake(gateway, context)
    # The same set-up with a host certificate is served: the probe is sound.
    context.load_cert_chain(str(trust_dir / "host-a.pem"), str(trust_dir / "host-a.key"))
    assert not refused_at_handshake(gateway, context)
    assert len(gateway.audit()) == before


def test_client_with_a_kms_ca_certificate_is_refused(gateway, trust_dir, pki_dir):
    """A certificate from the KMS CA (even the broker's own) is no host
    certificate: only the trust CA vouches for hosts."""
    for identity in ("alice", BROKER_IDENTITY):
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(trust_dir / "ca.pem"))
        context.load_cert_chain(str(pki_dir / f"{identity}.pem"), str(pki_dir / f"{identity}.key"))
        assert refused_at_handshake(gateway, context), identity


def load_fixture(path: Path) -> bytes:
    lines = [line for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    return bytes.fromhex("".join(lines))


def test_malformed_messages_get_an_error_or_a_close(gateway, trust_dir, wrapped):
    """Every malformed fixture, sent by an authenticated host, is answered
    with a failure or the connection is closed; the gateway keeps serving."""
    for fixture in FIXTURES:
        data = load_fixture(fixture)
        with RawClient(gateway.host, gateway.port, trust_dir, "host-a", timeout=10) as client:
            client.send(data)
            if len(data) < 8 or int.from_bytes(data[4:8], "big") + 8 > len(data):
                client.sock.shutdown(socket.SHUT_WR)
            response = client.recv_message()
            if response is not None:
                items = ttlv.decode(response).find_all(T.BATCH_ITEM.value)
                assert items, fixture.stem
                assert all(i.get(T.RESULT_STATUS.value) != ResultStatus.SUCCESS.value for i in items), fixture.stem
    with RawClient(gateway.host, gateway.port, trust_dir, "host-a", timeout=10) as client:
        client.send(b"\x42\x00\x78\x01\xff\xff\xff\xf8" + os.urandom(64))  # Declares ~4 GiB.
        assert client.recv_message() is None
    assert gateway.proc.poll() is None
    with host_client(gateway, trust_dir, "host-a") as client:
        assert unwrap(client, wrapped) == wrapped.dek


def test_no_kms_node_answering_is_a_general_failure(tmp_path, trust_dir, pki_dir, wrapped):
    """A gateway whose KMS cluster is unreachable answers GENERAL_FAILURE
    (the host may retry) and says nothing about the KMS's addresses."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    hosts, allow = registry_for(trust_dir, wrapped.kek)
    process = run_gateway_for_tests(tmp_path / "gw", trust_dir, [f"127.0.0.1:{dead}"], pki_dir, hosts, allow)
    try:
        with host_client(process, trust_dir, "host-a") as client, pytest.raises(KmipError) as caught:
            unwrap(client, wrapped)
        assert caught.value.reason == ResultReason.GENERAL_FAILURE
        assert str(dead) not in caught.value.message
        [record] = process.audit()
        assert record["allowed"] is True and "no answer" in record["reason"]
    finally:
        process.stop()
