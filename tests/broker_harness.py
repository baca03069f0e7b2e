"""The management steps integration tests take against a running broker, over its real HTTPS API.

The processes themselves (a `kms-server`, a `vtpm-broker` set up with `vtpm-broker init` and the KMS CA's
`kms-admin pki sign-csr`) come from `broker.drill.processes` (`start_kms`, `start_broker`), which runs the
operator's own commands. This module adds what a management instance does through the API: enroll with a
one-time token and the security administrator's approval, register a host from its CSR, create a VM with a
vTPM and write its .vmx; and the broker database helpers a test needs to check results (the EK CA).

It also holds the module-scoped fixtures those tests share: `kms` (a kms-server), `broker` (a vtpm-broker on
it, for the test module's `PROVIDER` and, if it has one, its `ROLES`) and `kms_admin` (a KMIP client with the
KMS's admin certificate). A test module imports them by name, which is how pytest finds them.

Used by the broker tests in tests/integration/; reusable by any test with a `broker.drill.processes.Broker`.
The key/CSR and error-checking helpers are tests/broker_process.py's, shared with the tests that run the
broker through that module's own `Broker`.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from broker_process import assert_error, new_key_and_csr

from broker import vmx
from broker.drill.processes import Broker, Kms, run, start_broker, start_kms
from kmip_core.client import KmipClient

__all__ = [
    "Identity",
    "assert_error",
    "broker",
    "call",
    "create_vm",
    "ek_ca_pem",
    "enroll",
    "issue_users",
    "kms",
    "kms_admin",
    "mgmt",
    "new_key_and_csr",
    "register_host",
    "register_new_host",
    "write_vmx",
]


@pytest.fixture(scope="module")
def kms(tmp_path_factory) -> Iterator[Kms]:
    server = start_kms(tmp_path_factory.mktemp("kms"))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def broker(request, tmp_path_factory, kms) -> Iterator[Broker]:
    """A broker for the test module's PROVIDER, with its ROLES if it sets them."""
    b = start_broker(
        tmp_path_factory.mktemp("broker"), kms, request.module.PROVIDER, roles=getattr(request.module, "ROLES", "")
    )
    yield b
    b.stop()


@pytest.fixture(scope="module")
def kms_admin(kms) -> Iterator[KmipClient]:
    with KmipClient([f"127.0.0.1:{kms.port}"], kms.pki / "admin.pem", kms.pki / "admin.key", kms.ca) as client:
        yield client


def mgmt(state: Path, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """`vtpm-mgmt --state-dir STATE ARGS`."""
    return run("vtpm-mgmt", "--state-dir", state, *args, check=check)


# (certificate file, key file), as `requests` takes a client certificate.
Identity = tuple[str, str]


def call(broker: Broker, method: str, path: str, identity: Identity | None = None, **kwargs) -> requests.Response:
    return requests.request(method, broker.url + path, cert=identity, verify=str(broker.trust_ca), timeout=60, **kwargs)


def enroll(broker: Broker, name: str, directory: Path | None = None) -> Identity:
    """Token (admin CLI), POST /v1/enroll, approval (admin CLI), poll: the instance's (cert, key) files."""
    directory = directory or broker.workdir
    token = broker.token(name)
    key_path, csr = new_key_and_csr(directory, name)
    answer = call(broker, "POST", "/v1/enroll", json={"instance": name, "token": token, "csr_pem": csr})
    assert answer.status_code == 202, answer.text
    enrollment = answer.json()
    broker.admin("approve", name)
    poll = {"Authorization": f"Bearer {enrollment['poll_secret']}"}
    done = call(broker, "GET", f"/v1/enrollments/{enrollment['enrollment_id']}", headers=poll).json()
    assert done["state"] == "approved", done
    cert_path = directory / f"{name}.pem"
    cert_path.write_text(done["certificate_pem"])
    return str(cert_path), str(key_path)


def register_host(broker: Broker, identity: Identity, name: str, csr_pem: str) -> str:
    """POST /v1/hosts with the host's own CSR: the host certificate (PEM)."""
    answer = call(broker, "POST", "/v1/hosts", identity, json={"name": name, "csr_pem": csr_pem})
    assert answer.status_code == 201, answer.text
    return answer.json()["certificate_pem"]


def register_new_host(broker: Broker, identity: Identity, directory: Path, name: str) -> Identity:
    """A host key and CSR made in `directory`, registered by `identity`: the host's (cert, key) files."""
    key_path, csr = new_key_and_csr(directory, f"host-{name}")
    cert_path = directory / f"host-{name}.pem"
    cert_path.write_text(register_host(broker, identity, name, csr))
    return str(cert_path), str(key_path)


def issue_users(broker: Broker, directory: Path, names: tuple[str, ...]) -> dict[str, Identity]:
    """`vtpm-broker admin issue-user` for each name: {name: (cert, key)}."""
    made = {}
    for name in names:
        broker.admin("issue-user", name, "--out-dir", str(directory))
        made[name] = (str(directory / f"{name}.pem"), str(directory / f"{name}.key"))
    return made


def create_vm(broker: Broker, identity: Identity, name: str, host: str | None = None) -> dict:
    """POST /v1/vms: {"vm_uuid", "key_safe", "kms_key_id", "host"}."""
    body = {"vm_uuid": str(uuid.uuid4()), "name": name}
    if host:
        body["host"] = host
    answer = call(broker, "POST", "/v1/vms", identity, json=body)
    assert answer.status_code == 201, answer.text
    return answer.json()


def write_vmx(datastore: Path, name: str, vm: dict, vtpm: bool = True) -> Path:
    """DATASTORE/NAME/NAME.vmx for a VM the API created."""
    directory = datastore / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.vmx"
    vmx.write(path, vmx.Vmx.new(name, vm["vm_uuid"], vm["key_safe"], vtpm))
    return path


def ek_ca_pem(broker: Broker) -> str:
    """The broker's active vTPM EK CA certificate, read from its database (as `vtpm-broker ca show` does)."""
    from broker.db import Database

    db = Database(f"sqlite:///{broker.data_dir / 'broker.db'}")
    try:
        row = db.get_ca("ca:ek")
        assert row is not None, "the broker has no EK CA"
        return row.cert_pem + (row.chain_pem or "")
    finally:
        db.close()
