"""The broker's management API end to end: a real kms-server, a real
`vtpm-broker` process set up with `vtpm-broker init` and the KMS CA's
`sign_csr`, real TLS on 127.0.0.1, and the admin CLI as the security
administrator."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import broker_process
import pytest
import requests
from broker_process import Broker, assert_error, create_vm, new_key_and_csr
from conftest import start_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker.keysafe import KeySafe, format_key_safe, parse_key_safe
from kmip_core import pki
from kmip_core.client import KmipClient

PROVIDER = broker_process.PROVIDER


# --- The broker process ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def kms(tmp_path_factory, pki_dir):
    server = start_server(
        tmp_path_factory.mktemp("kms"),
        pki_dir,
        extra_config="""
        [access]
        administrators = ["admin"]
        """,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def broker(tmp_path_factory, pki_dir, kms):
    workdir = tmp_path_factory.mktemp("broker")
    config = workdir / "broker.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [broker]
            provider_name = "{PROVIDER}"
            data_dir = "data"
            node_name = "broker-test"

            [api]
            port = 0
            max_body = 65536

            [gateway]
            port = 0

            [kms]
            nodes = ["127.0.0.1:{kms.port}"]
            ca = "{pki_dir / "ca.pem"}"

            [roles]
            security_admins = ["secadmin"]
            administrators = ["vc-admin", "root-admin"]
            no_crypto_administrators = ["vc-nocrypto", "ops"]
            auditors = ["auditor"]
            """
        )
    )
    b = Broker(workdir, config, workdir / "data")
    init = b.cli("init")
    csr = workdir / "data" / "kms-client.csr"
    assert f"kms-admin pki sign-csr --csr {csr} --out {workdir / 'data' / 'kms-client.pem'}" in init.stdout
    assert (workdir / "data" / "master.key").stat().st_mode & 0o777 == 0o600
    # The operator's step: the KMS CA signs the broker's CSR.
    pki.sign_csr(pki_dir, csr, workdir / "data" / "kms-client.pem")
    # init is idempotent: a second run keeps everything.
    assert "created" not in b.cli("init").stdout
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def kms_admin(kms, pki_dir):
    with KmipClient(
        [f"127.0.0.1:{kms.port}"], pki_dir / "admin.pem", pki_dir / "admin.key", pki_dir / "ca.pem"
    ) as client:
        yield client


# --- Helpers ----------------------------------------------------------------------------------


def enroll(broker: Broker, name: str) -> tuple[str, str]:
    """Token, enrollment, approval by the admin CLI, poll: (cert, key) paths."""
    token = broker.cli("admin", "token", "--instance", name).stdout.strip()
    key_path, csr = new_key_and_csr(broker.workdir, name)
    answer = broker.call("POST", "/v1/enroll", json={"instance": name, "token": token, "csr_pem": csr})
    assert answer.status_code == 202, answer.text
    enrollment = answer.json()
    poll = {"Authorization": f"Bearer {enrollment['poll_secret']}"}
    assert (
        broker.call("GET", f"/v1/enrollments/{enrollment['enrollment_id']}", headers=poll).json()["state"] == "pending"
    )
    broker.cli("admin", "approve", name)
    done = broker.call("GET", f"/v1/enrollments/{enrollment['enrollment_id']}", headers=poll).json()
    assert done["state"] == "approved"
    assert done["ca_pem"] == broker.ca.read_text()
    cert_path = broker.workdir / f"{name}.pem"
    cert_path.write_text(done["certificate_pem"])
    return str(cert_path), str(key_path)


def register_host(broker: Broker, identity, name: str) -> tuple[str, str]:
    cert_path, key_path = broker_process.register_host(broker, identity, name)
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"host:{name}"
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(broker.ca.read_bytes()))
    return cert_path, key_path


def vms_of(broker: Broker, identity) -> list[dict]:
    answer = broker.call("GET", "/v1/vms", identity)
    assert answer.status_code == 200, answer.text
    return answer.json()["vms"]


# --- Enrollment ---------------------------------------------------------------------------------


def test_enrollment_with_token_and_approval(broker):
    """An instance enrolls with a one-time token and a CSR, the security
    administrator approves it, and its certificate opens the API."""
    identity = enroll(broker, "vc-a")
    assert vms_of(broker, identity) == []
    listing = broker.cli("admin", "list").stdout
    line = next(x for x in listing.splitlines() if x.startswith("vc-a "))
    assert "trusted" in line and "never" not in line


def test_replayed_token_refused(broker):
    """A token works once; the replay is refused and enrolls nothing."""
    token = broker.cli("admin", "token", "--instance", "vc-replay").stdout.strip()
    _, csr = new_key_and_csr(broker.workdir, "vc-replay")
    body = {"instance": "vc-replay", "token": token, "csr_pem": csr}
    assert broker.call("POST", "/v1/enroll", json=body).status_code == 202
    assert_error(broker.call("POST", "/v1/enroll", json=body), 403, "already used")


def test_wrong_and_expired_tokens_refused(broker):
    """A wrong token and an expired one get 403 with a clear reason and
    create no instance."""
    _, csr = new_key_and_csr(broker.workdir, "vc-late")
    token = broker.cli("admin", "token", "--instance", "vc-late", "--ttl", "1").stdout.strip()
    wrong = {"instance": "vc-late", "token": token[:-2] + "xx", "csr_pem": csr}
    assert_error(broker.call("POST", "/v1/enroll", json=wrong), 403, "not valid")
    time.sleep(1.5)
    late = {"instance": "vc-late", "token": token, "csr_pem": csr}
    assert_error(broker.call("POST", "/v1/enroll", json=late), 403, "expired")
    assert "vc-late" not in broker.cli("admin", "list").stdout
    assert broker.cli("admin", "approve", "vc-late", check=False).returncode == 2
    empty = {"instance": "vc-late", "token": "", "csr_pem": csr}
    assert_error(broker.call("POST", "/v1/enroll", json=empty), 400, "token")


def test_cli_errors_are_one_line(broker):
    """Admin mistakes name the problem in one line, exit 2, no traceback."""
    result = broker.cli("admin", "approve", "nobody", check=False)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "no instance named nobody" in result.stderr
    result = broker.cli("admin", "pin", "x", "--cert", "/nonexistent.pem", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_everything_but_enrollment_needs_a_certificate(broker):
    """Without a client certificate only enrollment answers."""
    assert_error(broker.call("GET", "/v1/vms"), 401, "client certificate")
    assert_error(broker.call("POST", "/v1/hosts", json={}), 401, "client certificate")
    assert_error(broker.call("GET", "/v1/audit"), 401, "client certificate")


def test_certificate_from_another_ca_refused(broker, pki_dir):
    """A KMS client certificate is not a broker identity (TLS or 403)."""
    try:
        answer = broker.call("GET", "/v1/vms", (str(pki_dir / "alice.pem"), str(pki_dir / "alice.key")))
    except requests.exceptions.SSLError:
        return
    assert answer.status_code in (401, 403)


# --- Hosts and VMs ---------------------------------------------------------------------------------


def test_host_vm_and_kek_in_kms(broker, kms_admin):
    """A trusted instance registers a host (CSR made here) and creates a VM:
    the KEK exists in the KMS with vCenter's x- attributes, the key safe
    names our provider and key, and the VM re-registers from it alone."""
    identity = enroll(broker, "vc-vm")
    register_host(broker, identity, "esx-vm-1")
    vm = create_vm(broker, identity, host="esx-vm-1")
    key_safe = parse_key_safe(vm["key_safe"])
    assert key_safe.provider == PROVIDER and key_safe.kms_key_id == vm["kms_key_id"]
    attributes = kms_admin.get_attributes(vm["kms_key_id"])
    assert attributes["x-Identifier"] == [vm["vm_uuid"]]
    assert attributes["x-Component"] == ["Virtual Machine"]
    assert attributes["x-Name"] == [f"vm-{vm['vm_uuid'][:8]}"]
    for name in ("x-Vendor", "x-Product", "x-Product_Version"):
        assert attributes[name] and attributes[name][0]
    assert attributes["Cryptographic Length"] == [256]
    assert attributes["State"][0].name == "ACTIVE"
    # The KMS wrapped a 512-bit DEK under the KEK; the KEK never left it.
    dek = kms_admin.decrypt(vm["kms_key_id"], key_safe.wrapped_dek, iv=key_safe.iv, tag=key_safe.tag)
    assert len(dek) == 64

    again = broker.call(
        "POST",
        "/v1/vms/register",
        identity,
        json={"vm_uuid": vm["vm_uuid"], "name": "renamed", "key_safe": vm["key_safe"]},
    )
    assert again.status_code == 200, again.text
    assert again.json()["host"] == "esx-vm-1" and again.json()["name"] == "renamed"
    assert_error(
        broker.call("POST", "/v1/vms", identity, json={"vm_uuid": vm["vm_uuid"], "name": "dup"}), 409, "already"
    )
    # Unknown host and another instance's VM look the same: not found.
    assert_error(
        broker.call("PUT", f"/v1/vms/{vm['vm_uuid']}/host", identity, json={"host": "esx-nope"}), 404, "no host"
    )
    assert broker.call("DELETE", "/v1/hosts/esx-vm-1", identity).status_code == 204
    assert [v["host"] for v in vms_of(broker, identity) if v["vm_uuid"] == vm["vm_uuid"]] == [None]


def test_revoked_instance_refused_and_vm_recovered_by_new_instance(broker):
    """Revocation ends an instance's trust at once; a new instance recovers
    its VM from the key safe alone, places it on its own host, and the
    policy lets exactly that host unwrap."""
    old = enroll(broker, "vc-old")
    register_host(broker, old, "esx-old")
    vm = create_vm(broker, old, host="esx-old")
    broker.cli("admin", "revoke", "vc-old")
    try:
        answer = broker.call("GET", "/v1/vms", old)
    except requests.exceptions.SSLError:
        answer = None
    if answer is not None:
        assert_error(answer, 403, "not trusted")

    new = enroll(broker, "vc-new")
    register_host(broker, new, "esx-new")
    recovered = broker.call(
        "POST",
        "/v1/vms/register",
        new,
        json={"vm_uuid": vm["vm_uuid"], "name": "recovered", "key_safe": vm["key_safe"]},
    )
    assert recovered.status_code == 200, recovered.text
    assert recovered.json()["instance"] == "vc-new" and recovered.json()["host"] is None
    placed = broker.call("PUT", f"/v1/vms/{vm['vm_uuid']}/host", new, json={"host": "esx-new"})
    assert placed.status_code == 200 and placed.json()["host"] == "esx-new"

    # The policy, as the gateway will ask it, from the broker's database.
    from broker.config import load_config
    from broker.db import Database
    from broker.trust import Registry
    from broker.trust_ca import fingerprint

    cfg = load_config(broker.config)
    db = Database(cfg.storage.db_url)
    try:
        registry = Registry(db)

        def host_fp(name: str) -> str:
            return fingerprint(x509.load_pem_x509_certificate((broker.workdir / f"host-{name}.pem").read_bytes()))

        assert registry.authorize_unwrap(host_fp("esx-new"), vm["kms_key_id"]).allowed
        refused = registry.authorize_unwrap(host_fp("esx-old"), vm["kms_key_id"])
        assert not refused.allowed and "revoked" in refused.reason
    finally:
        db.close()


def test_host_of_instance_a_not_given_vm_of_instance_b(broker):
    """Instance A cannot place B's VM on its host, nor see it."""
    a = enroll(broker, "vc-x")
    b = enroll(broker, "vc-y")
    register_host(broker, a, "esx-x")
    vm_b = create_vm(broker, b)
    assert_error(broker.call("PUT", f"/v1/vms/{vm_b['vm_uuid']}/host", a, json={"host": "esx-x"}), 404, "no VM")
    assert vm_b["vm_uuid"] not in [v["vm_uuid"] for v in vms_of(broker, a)]
    taken = broker.call(
        "POST", "/v1/vms/register", a, json={"vm_uuid": vm_b["vm_uuid"], "name": "mine", "key_safe": vm_b["key_safe"]}
    )
    assert_error(taken, 409, "another trusted instance")


# --- Bad input ----------------------------------------------------------------------------------------


def test_bad_input_gets_4xx_and_changes_nothing(broker, kms_admin):
    """Malformed JSON, unknown fields, an oversized body, a key safe that does
    not parse, of another provider, or naming a key the KMS lacks: each a
    4xx with one line, and the instance's VMs are unchanged."""
    identity = enroll(broker, "vc-bad")
    vm = create_vm(broker, identity)
    before = vms_of(broker, identity)
    good = parse_key_safe(vm["key_safe"])
    fresh = str(uuid.uuid4())
    cases = [
        (dict(data=b'{"vm_uuid": ', headers={"content-type": "application/json"}), "/v1/vms", 400, "malformed JSON"),
        (dict(data=b"[1, 2]"), "/v1/vms", 400, "JSON object"),
        (dict(data=b"\xff\xfe"), "/v1/vms", 400, "UTF-8"),
        (dict(data=b'{"vm_uuid": "a", "vm_uuid": "b", "name": "x"}'), "/v1/vms", 400, "appears twice"),
        (dict(data=b"[" * 5000 + b"]" * 5000), "/v1/vms", 400, ""),
        (dict(json={"vm_uuid": fresh, "name": "x", "color": "red"}), "/v1/vms", 400, "unknown field 'color'"),
        (dict(json={"name": "x"}), "/v1/vms", 400, "missing field 'vm_uuid'"),
        (dict(json={"vm_uuid": "not-a-uuid", "name": "x"}), "/v1/vms", 400, "vm_uuid must be a UUID"),
        (dict(json={"vm_uuid": fresh, "name": "x\n"}), "/v1/vms", 400, "control characters"),
        (dict(json={"vm_uuid": fresh, "name": "x", "host": "esx-none"}), "/v1/vms", 404, "no host"),
        (dict(data=b'{"vm_uuid": "' + b"a" * 70000 + b'"}'), "/v1/vms", 413, "larger than 65536"),
        (
            dict(json={"vm_uuid": fresh, "name": "x", "key_safe": "vmware:key/list/(pair/x)"}),
            "/v1/vms/register",
            400,
            "must start with",
        ),
        (
            dict(
                json={
                    "vm_uuid": vm["vm_uuid"],
                    "name": "x",
                    "key_safe": format_key_safe(
                        KeySafe("kms-other", good.kms_key_id, good.iv, good.tag, good.wrapped_dek)
                    ),
                }
            ),
            "/v1/vms/register",
            422,
            "kms-other",
        ),  # fmt: skip
        (
            dict(
                json={
                    "vm_uuid": fresh,
                    "name": "x",
                    "key_safe": format_key_safe(
                        KeySafe(PROVIDER, "no-such-key-id", good.iv, good.tag, good.wrapped_dek)
                    ),
                }
            ),
            "/v1/vms/register",
            422,
            "no key",
        ),  # fmt: skip
        (
            dict(json={"vm_uuid": fresh, "name": "x", "key_safe": vm["key_safe"]}),
            "/v1/vms/register",
            422,
            "another VM",
        ),
        (
            dict(
                json={
                    "vm_uuid": vm["vm_uuid"],
                    "name": "x",
                    "key_safe": format_key_safe(
                        KeySafe(PROVIDER, good.kms_key_id, good.iv, bytes(16), good.wrapped_dek)
                    ),
                }
            ),
            "/v1/vms/register",
            422,
            "does not unwrap",
        ),  # fmt: skip
    ]
    for kwargs, path, status, words in cases:
        answer = broker.call("POST", path, identity, **kwargs)
        assert_error(answer, status, words)
    assert_error(broker.call("PATCH", "/v1/vms", identity), 405, "not allowed")
    assert_error(broker.call("GET", "/v1/nothing", identity), 404, "no such endpoint")
    assert vms_of(broker, identity) == before
    # No KEK was made for the refused creations.
    assert kms_admin.locate({"x-Identifier": fresh}) == []


# --- Roles --------------------------------------------------------------------------------------------


def test_no_crypto_administrator_refused_a_dek(broker, kms_admin):
    """A no-cryptography administrator (instance or user) may register VMs
    but never obtains a DEK; an administrator does; both attempts are in
    the audit trail, which only auditors and security admins read."""
    nocrypto = enroll(broker, "vc-nocrypto")
    vm = create_vm(broker, nocrypto)
    assert_error(broker.call("GET", f"/v1/vms/{vm['vm_uuid']}/dek", nocrypto), 403, "not allowed")
    assert_error(broker.call("DELETE", f"/v1/vms/{vm['vm_uuid']}", nocrypto), 403, "not allowed")

    plain = enroll(broker, "vc-plain")  # an instance with no role: no DEK either
    assert_error(broker.call("GET", f"/v1/vms/{create_vm(broker, plain)['vm_uuid']}/dek", plain), 403, "role none")

    users = broker.workdir / "users"
    for name in ("ops", "root-admin", "auditor", "secadmin"):
        broker.cli("admin", "issue-user", name, "--out-dir", str(users))

    def user(name):
        return (str(users / f"{name}.pem"), str(users / f"{name}.key"))

    assert_error(broker.call("GET", f"/v1/vms/{vm['vm_uuid']}/dek", user("ops")), 403, "no_crypto_administrator")
    assert vm["vm_uuid"] in [v["vm_uuid"] for v in vms_of(broker, user("ops"))]

    admin_answer = broker.call("GET", f"/v1/vms/{vm['vm_uuid']}/dek", user("root-admin"))
    assert admin_answer.status_code == 200, admin_answer.text
    dek = base64.b64decode(admin_answer.json()["dek_b64"])
    ks = parse_key_safe(vm["key_safe"])
    assert dek == kms_admin.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
    assert admin_answer.headers["cache-control"] == "no-store"

    admin_instance = enroll(broker, "vc-admin")
    own = create_vm(broker, admin_instance)
    assert broker.call("GET", f"/v1/vms/{own['vm_uuid']}/dek", admin_instance).status_code == 200
    # An administrator instance only for its own VMs.
    assert_error(broker.call("GET", f"/v1/vms/{vm['vm_uuid']}/dek", admin_instance), 404, "no VM")

    assert_error(broker.call("GET", "/v1/audit", user("ops")), 403, "not allowed")
    assert_error(broker.call("GET", f"/v1/vms/{vm['vm_uuid']}/dek", user("auditor")), 403, "not allowed")
    trail = broker.call("GET", "/v1/audit", user("auditor"))
    assert trail.status_code == 200, trail.text
    assert trail.json()["problems"] == []
    reads = [(r["actor"], r["target"], r["allowed"]) for r in trail.json()["records"] if r["action"] == "dek.read"]
    assert ("user:root-admin", vm["vm_uuid"], True) in reads
    assert ("instance:vc-nocrypto", vm["vm_uuid"], False) in reads
    assert ("user:ops", vm["vm_uuid"], False) in reads
    assert broker.call("GET", "/v1/instances", user("secadmin")).status_code == 200
    assert_error(broker.call("GET", "/v1/instances", user("root-admin")), 403, "not allowed")
    # No DEK ever reaches the broker's log.
    assert base64.b64encode(dek).decode() not in "\n".join(broker.log)
    assert dek.hex() not in "\n".join(broker.log)


def test_pinned_instance_certificate(broker):
    """An instance's own certificate, pinned by the CLI, opens the API
    (exactly that certificate) once the broker has picked up the pin."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vcenter-own")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path = broker.workdir / "pinned.pem"
    key_path = broker.workdir / "pinned.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    identity = (str(cert_path), str(key_path))
    broker.cli("admin", "pin", "vc-pinned", "--cert", str(cert_path))
    deadline = time.monotonic() + 15
    while True:
        try:
            answer = broker.call("GET", "/v1/vms", identity)
            if answer.status_code == 200:
                break
        except requests.exceptions.SSLError:
            pass
        assert time.monotonic() < deadline, "the pinned certificate was not accepted"
        time.sleep(0.5)
    assert answer.json() == {"vms": []}
    listing = json.loads(broker.cli("admin", "list", "--json").stdout)
    assert {i["name"]: i["pinned"] for i in listing}["vc-pinned"] is True


def test_master_key_and_ca_keys_not_in_database_or_log(broker):
    """The database holds the CA keys sealed only, and the log holds no key."""
    data = broker.workdir / "data"
    master = bytes.fromhex((data / "master.key").read_text().strip())
    blob = b"".join(p.read_bytes() for p in data.glob("broker.db*"))
    assert master not in blob and master.hex().encode() not in blob
    assert b"PRIVATE KEY" not in blob
    log = "\n".join(broker.log)
    assert master.hex() not in log and "PRIVATE KEY" not in log
    assert os.stat(data / "broker-tls.key").st_mode & 0o777 == 0o600


# --- The host side: gateway and EK certificates through the running broker ---------------------


def test_host_unwraps_through_the_gateway(broker, kms_admin):
    """The gateway hook is wired: the host the VM is placed on gets its DEK
    over KMIP/TLS with its host certificate; another host of the same
    instance is refused."""
    assert broker.gateway_port, "the broker started without its KMIP gateway"
    from kmip_core.client import KmipError

    identity = enroll(broker, "vc-gw")
    placed = register_host(broker, identity, "esx-gw-1")
    other = register_host(broker, identity, "esx-gw-2")
    vm = create_vm(broker, identity, host="esx-gw-1")
    ks = parse_key_safe(vm["key_safe"])
    expected = kms_admin.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
    node = f"127.0.0.1:{broker.gateway_port}"
    with KmipClient([node], placed[0], placed[1], broker.ca) as host:
        assert host.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag) == expected
    with KmipClient([node], other[0], other[1], broker.ca) as host:
        with pytest.raises(KmipError) as refused:
            host.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)
        assert refused.value.reason.name == "PERMISSION_DENIED"


def _ek_request(vm_uuid: str) -> tuple[dict, str]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    ek = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = (
        ek.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    body = {
        "vm_uuid": vm_uuid,
        "type": "ek",
        "key_type": "rsa",
        "public_key_pem": public_pem,
        "tpm_manufacturer": "id:00001014",
        "tpm_model": "swtpm",
        "tpm_version": "id:20191023",
        "tpm_spec_family": "2.0",
        "tpm_spec_level": 0,
        "tpm_spec_revision": 164,
    }
    return body, public_pem


def test_ek_certificate_for_the_host_of_the_vm_then_ca_swap(broker):
    """A host gets an EK certificate for a VM placed on it (and only then);
    after the EK CA is replaced, 'ca recertify' re-issues the same EK under
    the new CA."""
    from broker import vtpm_ca
    identity = enroll(broker, "vc-ek")
    host = register_host(broker, identity, "esx-ek-1")
    stranger = register_host(broker, identity, "esx-ek-2")
    vm = create_vm(broker, identity, host="esx-ek-1")
    body, public_pem = _ek_request(vm["vm_uuid"])

    answer = broker.call("POST", "/v1/vtpm/ek-certificates", host, json=body)
    assert answer.status_code == 201, answer.text
    der = base64.b64decode(answer.json()["certificate_der_b64"])
    old_ca_pem = answer.json()["ca_pem"]
    info = vtpm_ca.verify_ek_certificate(der, old_ca_pem, public_key_pem=public_pem)
    assert info.tpm_model == "swtpm"

    assert_error(broker.call("POST", "/v1/vtpm/ek-certificates", stranger, json=body), 403, "may not")
    unknown = dict(body, vm_uuid=str(uuid.uuid4()))
    assert_error(broker.call("POST", "/v1/vtpm/ek-certificates", host, json=unknown), 404, "no VM")
    assert_error(broker.call("POST", "/v1/vtpm/ek-certificates", identity, json=body), 403, "hosts only")
    assert_error(broker.call("POST", "/v1/vtpm/ek-certificates", host, json=dict(body, color=1)), 400, "unknown")

    # The operator replaces the EK CA with a third-party CA (certificate + key).
    third = vtpm_ca.EkCa.create("Example Corp vTPM CA")
    cert_file = broker.workdir / "third-ca.pem"
    key_file = broker.workdir / "third-ca.key"
    cert_file.write_bytes(third.cert_pem)
    key_file.write_bytes(
        third.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    broker.cli("ca", "import", "--cert", str(cert_file), "--key", str(key_file))
    assert "Example Corp vTPM CA" in broker.cli("ca", "show").stdout
    out = broker.workdir / "recertified"
    broker.cli("ca", "recertify", "--vm", vm["vm_uuid"], "--out-dir", str(out))
    new_der = (out / "ek-rsa.cert").read_bytes()
    assert vtpm_ca.verify_ek_certificate(new_der, third.ca_pem, public_key_pem=public_pem).tpm_model == "swtpm"
    # The old certificate still verifies under the old CA; new requests get the new CA.
    vtpm_ca.verify_ek_certificate(der, old_ca_pem, public_key_pem=public_pem)
    again = broker.call("POST", "/v1/vtpm/ek-certificates", host, json=_ek_request(vm["vm_uuid"])[0])
    assert again.status_code == 201 and again.json()["ca_pem"] == third.ca_pem.decode()


def test_api_port_in_use_is_a_one_line_error(broker):
    """A second broker on a port the first one holds stops at start-up with
    one line that names the address and the fix, and exit status 2."""
    busy = broker.workdir / "busy.toml"
    text = broker.config.read_text()
    assert "[api]\nport = 0\n" in text
    busy.write_text(text.replace("[api]\nport = 0\n", f"[api]\nport = {broker.port}\n"))
    result = subprocess.run(
        [sys.executable, "-m", "broker.cli", "--config", str(busy), "run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert any(f"cannot listen on 127.0.0.1:{broker.port}" in line and "choose another port" in line for line in errors), result.stderr
    assert "Traceback" not in result.stderr
