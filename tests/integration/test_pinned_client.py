"""Trust path B of the README: a vCenter's self-signed certificate is pinned
with `kms-admin clients trust`, applied with SIGHUP, and then accepted."""

from __future__ import annotations

import datetime as dt
import signal
import ssl
import subprocess
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kmip.core.enums import Operation, Tags

from kmip_core import ttlv


def self_signed(directory, name="vcenter-selfsigned"):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return directory / f"{name}.pem"


def discover(server, cert_dir, name):
    header = ttlv.structure(Tags.REQUEST_HEADER.value, [
        ttlv.structure(Tags.PROTOCOL_VERSION.value, [ttlv.integer(Tags.PROTOCOL_VERSION_MAJOR.value, 1),
                                                      ttlv.integer(Tags.PROTOCOL_VERSION_MINOR.value, 1)]),
        ttlv.integer(Tags.BATCH_COUNT.value, 1)])
    item = ttlv.structure(Tags.BATCH_ITEM.value, [ttlv.enumeration(Tags.OPERATION.value, Operation.DISCOVER_VERSIONS.value),
                                                   ttlv.structure(Tags.REQUEST_PAYLOAD.value, [])])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(str(cert_dir / f"{name}.pem"), str(cert_dir / f"{name}.key"))
    import socket

    with socket.create_connection((server.host, server.port), timeout=10) as raw:
        with ctx.wrap_socket(raw) as sock:
            sock.sendall(ttlv.encode(ttlv.structure(Tags.REQUEST_MESSAGE.value, [header, item])))
            data = sock.recv(8)
            return len(data) == 8


def test_pinned_self_signed_certificate_is_accepted_after_sighup(kms, tmp_path):
    cert = self_signed(tmp_path)
    try:
        accepted = discover(kms, tmp_path, "vcenter-selfsigned")
    except (ssl.SSLError, ConnectionError, OSError):
        accepted = False
    assert not accepted, "an unpinned self-signed certificate must be refused"

    result = subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", "clients", "trust", str(cert), "--config", str(kms.workdir / "kms.toml")],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    kms.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "TLS material reloaded" not in kms.stderr_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert discover(kms, tmp_path, "vcenter-selfsigned")
