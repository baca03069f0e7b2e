"""A KMIP username/password Credential required in addition to the client
certificate (access.require_credential), with hashes written by
`kms-admin credentials set`. The credential is bound to the certificates
that may present it (`--client`), and a node verifies it with Argon2id once,
not on every request (issue 19)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from conftest import start_server
from kmip.core import enums
from kmip.pie import exceptions as pie_exceptions
from kmip.pie.client import ProxyKmipClient


@pytest.fixture
def credential_server(tmp_path, pki_dir):
    workdir = tmp_path / "node"
    workdir.mkdir()
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret-enough-password\n")
    config = workdir / "creds.toml"
    config.write_text(f'[access]\ncredentials_file = "{workdir / "credentials.toml"}"\n')
    result = subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", "credentials", "set", "vcenter-svc",
         "--password-file", str(password_file), "--client", "alice", "--config", str(config)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "s3cret" not in (workdir / "credentials.toml").read_text()
    server = start_server(
        workdir,
        pki_dir,
        extra_config=f"""
        [access]
        require_credential = true
        credentials_file = "{workdir / 'credentials.toml'}"
        """,
    )
    yield server
    server.stop()


def _client(server, pki, username=None, password=None, certificate="alice"):
    c = ProxyKmipClient(
        hostname=server.host, port=server.port,
        cert=str(pki / f"{certificate}.pem"), key=str(pki / f"{certificate}.key"), ca=str(pki / "ca.pem"),
        username=username, password=password, kmip_version=enums.KMIPVersion.KMIP_1_2,
    )
    c.open()
    return c


def _assert_refused(c) -> None:
    """A Create on client `c` fails with Authentication Not Successful; `c` is closed after."""
    try:
        with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
            c.create(enums.CryptographicAlgorithm.AES, 128)
        assert failure.value.reason == enums.ResultReason.AUTHENTICATION_NOT_SUCCESSFUL
    finally:
        c.close()


def test_right_password_is_accepted(credential_server, pki_dir):
    c = _client(credential_server, pki_dir, "vcenter-svc", "s3cret-enough-password")
    try:
        assert c.create(enums.CryptographicAlgorithm.AES, 128)
    finally:
        c.close()


@pytest.mark.parametrize("username, password", [(None, None), ("vcenter-svc", "wrong"), ("nobody", "s3cret-enough-password")])
def test_missing_or_wrong_credential_is_refused(credential_server, pki_dir, username, password):
    _assert_refused(_client(credential_server, pki_dir, username, password))


def test_right_password_from_another_certificate_is_refused(credential_server, pki_dir):
    """vcenter-svc is bound to alice's certificate: bob, who learnt the
    password, is refused with it."""
    _assert_refused(_client(credential_server, pki_dir, "vcenter-svc", "s3cret-enough-password", certificate="bob"))


def test_credential_is_verified_once_not_per_request(credential_server, pki_dir):
    """Six requests over three connections: one Argon2id verification (the
    node logs each), where every request used to run one."""
    before = sum("verified (Argon2id)" in line for line in credential_server.log)
    for _ in range(3):
        c = _client(credential_server, pki_dir, "vcenter-svc", "s3cret-enough-password")
        try:
            uid = c.create(enums.CryptographicAlgorithm.AES, 128)
            assert c.get_attribute_list(uid)
        finally:
            c.close()
    time.sleep(0.2)  # Let the log reader catch up.
    verified = sum("verified (Argon2id)" in line for line in credential_server.log) - before
    assert verified <= 1, "\n".join(credential_server.log)
    # A wrong password is still checked (and refused), never taken from the cache.
    _assert_refused(_client(credential_server, pki_dir, "vcenter-svc", "s3cret-enough-passwore"))
