"""The trust registry on a real SQLite file: tokens, enrollment, approval,
pinning, revocation, hosts, VM placement, the unwrap policy and the audit
chain."""

from __future__ import annotations

import datetime as dt

import pytest
from broker_process import csr_pem
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import update

from broker.db import Database, audit
from broker.trust import Conflict, InvalidRequest, NotFound, Refused, Registry
from broker.trust_ca import create_trust_ca, fingerprint

VM_A = "11111111-1111-4111-8111-111111111111"
VM_B = "22222222-2222-4222-8222-222222222222"


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def trust_ca():
    return create_trust_ca("kms-test")


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def registry(tmp_path, trust_ca, clock):
    db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
    db.create_all()
    yield Registry(db, trust_ca, clock=clock)
    db.close()


def self_signed(cn: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
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
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def trusted(registry: Registry, name: str) -> x509.Certificate:
    token = registry.issue_token(name)
    registry.enroll(name, token, csr_pem("ignored"))
    return registry.approve(name)


def state_of(registry: Registry, name: str) -> str:
    return {i.name: i.state for i in registry.list_instances()}[name]


# --- Tokens ------------------------------------------------------------------------------


def test_token_is_single_use(registry):
    """A replayed token is refused and does not create a second enrollment."""
    token = registry.issue_token("vc-a")
    registry.enroll("vc-a", token, csr_pem("ignored"))
    with pytest.raises(Refused, match="already used"):
        registry.enroll("vc-a", token, csr_pem("ignored"))
    assert [i.pending_enrollment for i in registry.list_instances()] == [True]


def test_expired_token_refused(registry, clock):
    token = registry.issue_token("vc-a", ttl=60)
    clock.now += 61
    with pytest.raises(Refused, match="expired"):
        registry.enroll("vc-a", token, csr_pem("ignored"))
    assert registry.list_instances() == []


def test_wrong_token_refused(registry):
    registry.issue_token("vc-a")
    with pytest.raises(Refused, match="not valid"):
        registry.enroll("vc-a", "not-the-token", csr_pem("ignored"))
    assert registry.list_instances() == []


def test_token_for_another_instance_refused(registry):
    """A token binds the instance name it was issued for."""
    token = registry.issue_token("vc-a")
    with pytest.raises(Refused, match="not valid"):
        registry.enroll("vc-b", token, csr_pem("ignored"))
    # And it was not consumed by the failed attempt.
    registry.enroll("vc-a", token, csr_pem("ignored"))


def test_bad_csr_does_not_consume_token(registry):
    token = registry.issue_token("vc-a")
    with pytest.raises(InvalidRequest, match="certificate signing request"):
        registry.enroll("vc-a", token, "garbage")
    registry.enroll("vc-a", token, csr_pem("ignored"))


def test_token_lifetime_bounds(registry):
    with pytest.raises(InvalidRequest):
        registry.issue_token("vc-a", ttl=0)
    with pytest.raises(InvalidRequest):
        registry.issue_token("bad name!")


# --- Approve, reject, pin, revoke ------------------------------------------------------------


def test_approve_issues_certificate_and_trusts(registry, trust_ca):
    token = registry.issue_token("vc-a")
    enrollment = registry.enroll("vc-a", token, csr_pem("whatever-the-instance-asks"))
    assert registry.poll_enrollment(enrollment.enrollment_id, enrollment.poll_secret)["state"] == "pending"
    cert = registry.approve("vc-a")
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "vc-a"
    cert.verify_directly_issued_by(trust_ca.cert)
    answer = registry.poll_enrollment(enrollment.enrollment_id, enrollment.poll_secret)
    assert answer["state"] == "approved" and "BEGIN CERTIFICATE" in answer["certificate_pem"]
    assert state_of(registry, "vc-a") == "trusted"
    caller = registry.identify(fingerprint(cert))
    assert caller is not None and caller.kind == "instance" and caller.name == "vc-a"


def test_poll_with_wrong_secret_is_not_found(registry):
    enrollment = registry.enroll("vc-a", registry.issue_token("vc-a"), csr_pem("ignored"))
    with pytest.raises(NotFound):
        registry.poll_enrollment(enrollment.enrollment_id, "wrong")


def test_reject(registry):
    registry.enroll("vc-a", registry.issue_token("vc-a"), csr_pem("ignored"))
    registry.reject("vc-a")
    assert state_of(registry, "vc-a") == "rejected"
    with pytest.raises(NotFound):
        registry.approve("vc-a")


def test_approve_without_enrollment(registry):
    with pytest.raises(NotFound):
        registry.approve("nobody")


def test_pin_trusts_exactly_that_certificate(registry):
    pem = self_signed("vcenter-own")
    fp = registry.pin("vc-p", pem)
    assert registry.identify(fp).name == "vc-p"
    assert registry.pinned_certificates() == [x509.load_pem_x509_certificate(pem.encode()).public_bytes(
        serialization.Encoding.PEM).decode()]  # fmt: skip
    with pytest.raises(Conflict):
        registry.pin("vc-other", pem)


def test_revoke_refuses_certificate_and_hosts(registry):
    cert = trusted(registry, "vc-a")
    host = registry.register_host("vc-a", "esx-1", csr_pem("ignored"))
    registry.revoke("vc-a")
    assert registry.identify(fingerprint(cert)) is None
    assert registry.identify(fingerprint(host)) is None
    assert registry.pinned_certificates() == []
    with pytest.raises(Refused, match="revoked"):
        registry.issue_token("vc-a")
    with pytest.raises(Conflict):
        registry.revoke("vc-a")


def test_reapproval_replaces_certificate(registry):
    """Re-enrolling a trusted instance rotates its certificate: the old one
    stops working."""
    old = trusted(registry, "vc-a")
    new = trusted(registry, "vc-a")
    assert registry.identify(fingerprint(old)) is None
    assert registry.identify(fingerprint(new)).name == "vc-a"


# --- Hosts, VMs and the unwrap policy -------------------------------------------------------------


def two_instances(registry) -> tuple[str, str, str]:
    """vc-a with hosts esx-a and esx-a2 and VM_A (KEK kek-a) placed on esx-a;
    vc-b with host esx-b. The three host certificates' fingerprints."""
    trusted(registry, "vc-a")
    trusted(registry, "vc-b")
    host_a = fingerprint(registry.register_host("vc-a", "esx-a", csr_pem("ignored")))
    host_a2 = fingerprint(registry.register_host("vc-a", "esx-a2", csr_pem("ignored")))
    host_b = fingerprint(registry.register_host("vc-b", "esx-b", csr_pem("ignored")))
    registry.add_vm("vc-a", VM_A, "vm-a", "kek-a", "ks-a", "esx-a")
    return host_a, host_a2, host_b


def test_authorize_unwrap_rules(registry):
    """Allowed only for the host the VM's own trusted instance placed it on."""
    host_a, host_a2, host_b = two_instances(registry)
    registry.add_vm("vc-b", VM_B, "vm-b", "kek-b", "ks-b", None)

    ok = registry.authorize_unwrap(host_a, "kek-a")
    assert ok.allowed and (ok.host, ok.instance, ok.vm_uuid) == ("esx-a", "vc-a", VM_A)

    # Another host of the same instance: known VM, not placed there.
    other = registry.authorize_unwrap(host_a2, "kek-a")
    assert not other.allowed and other.vm_uuid == VM_A and "placed" in other.reason

    # A host of instance A, a VM of instance B: the host may not learn it exists.
    cross = registry.authorize_unwrap(host_a, "kek-b")
    assert not cross.allowed and cross.vm_uuid is None and "another instance" in cross.reason
    cross_b = registry.authorize_unwrap(host_b, "kek-a")
    assert not cross_b.allowed and cross_b.vm_uuid is None

    # VM of B not placed anywhere yet.
    assert not registry.authorize_unwrap(host_b, "kek-b").allowed
    registry.place_vm("vc-b", VM_B, "esx-b")
    assert registry.authorize_unwrap(host_b, "kek-b").allowed

    unknown_key = registry.authorize_unwrap(host_a, "no-such-key")
    assert not unknown_key.allowed and unknown_key.vm_uuid is None
    unknown_host = registry.authorize_unwrap("00" * 32, "kek-a")
    assert not unknown_host.allowed and unknown_host.host is None


def test_generation_read_follows_the_unwrap_policy(registry):
    """nvram_generation_for_host (a power-on's one read) answers the same
    decision as authorize_vm_for_host and the generation only when allowed."""
    host_a, host_a2, host_b = two_instances(registry)
    registry.record_nvram_generation(VM_A, 7, "host:esx-a")

    decision, generation = registry.nvram_generation_for_host(host_a, VM_A)
    assert decision.allowed and generation == 7 and decision.vm_uuid == VM_A
    assert registry.authorize_vm_for_host(host_a, VM_A) == decision

    # Same instance, other host: refused with the VM named, generation withheld.
    decision, generation = registry.nvram_generation_for_host(host_a2, VM_A)
    assert not decision.allowed and decision.vm_uuid == VM_A and "placed" in decision.reason and generation == 0
    # Another instance's host: refused as if the VM did not exist.
    decision, generation = registry.nvram_generation_for_host(host_b, VM_A)
    assert not decision.allowed and decision.vm_uuid is None and generation == 0
    # No such VM; an unknown host.
    decision, _ = registry.nvram_generation_for_host(host_a, VM_B)
    assert not decision.allowed and decision.reason == "no such VM" and decision.host == "esx-a"
    decision, _ = registry.nvram_generation_for_host("00" * 32, VM_A)
    assert not decision.allowed and decision.host is None
    # A VM that never reported a generation reads 0; a revoked instance's host is refused.
    registry.add_vm("vc-a", VM_B, "vm-b", "kek-b", "ks-b", "esx-a")
    assert registry.nvram_generation_for_host(host_a, VM_B) == (registry.authorize_vm_for_host(host_a, VM_B), 0)
    registry.revoke("vc-a")
    decision, generation = registry.nvram_generation_for_host(host_a, VM_A)
    assert not decision.allowed and "revoked" in decision.reason and generation == 0


def test_revoked_instance_hosts_refused_then_recovered_by_another(registry):
    """After A is revoked its hosts are refused; B re-registers the VM (and
    the host), places it on B's host, and that host may unwrap."""
    trusted(registry, "vc-a")
    host_a = fingerprint(registry.register_host("vc-a", "esx-1", csr_pem("ignored")))
    registry.add_vm("vc-a", VM_A, "vm-a", "kek-a", "ks-a", "esx-1")
    assert registry.authorize_unwrap(host_a, "kek-a").allowed

    registry.revoke("vc-a")
    refused = registry.authorize_unwrap(host_a, "kek-a")
    assert not refused.allowed and "revoked" in refused.reason

    trusted(registry, "vc-b")
    # Before B registers the VM, B's host is refused.
    host_b = fingerprint(registry.register_host("vc-b", "esx-2", csr_pem("ignored")))
    assert not registry.authorize_unwrap(host_b, "kek-a").allowed
    record = registry.register_vm("vc-b", VM_A, "vm-a", "kek-a", "ks-a")
    assert record.instance == "vc-b" and record.host is None
    assert not registry.authorize_unwrap(host_b, "kek-a").allowed
    registry.place_vm("vc-b", VM_A, "esx-2")
    assert registry.authorize_unwrap(host_b, "kek-a").allowed
    # The revoked instance's host stays refused.
    assert not registry.authorize_unwrap(host_a, "kek-a").allowed
    # B may also take over the revoked instance's host name, with a new certificate.
    taken = fingerprint(registry.register_host("vc-b", "esx-1", csr_pem("ignored")))
    assert taken != host_a and registry.identify(host_a) is None


def test_vm_listing_carries_the_last_nvram_generation_across_recovery(registry):
    """list_vms and get_vm show the last generation a host reported (0 when
    none), and re-registration by another instance keeps it: vm check reads
    it to find rolled-back .nvram copies."""
    trusted(registry, "vc-a")
    registry.add_vm("vc-a", VM_A, "vm-a", "kek-a", "ks-a", None)
    registry.add_vm("vc-a", VM_B, "vm-b", "kek-b", "ks-b", None)
    assert {v.vm_uuid: v.nvram_generation for v in registry.list_vms("vc-a")} == {VM_A: 0, VM_B: 0}
    registry.record_nvram_generation(VM_A, 4, "host:esx-a")
    assert {v.vm_uuid: v.nvram_generation for v in registry.list_vms("vc-a")} == {VM_A: 4, VM_B: 0}
    assert registry.get_vm(VM_A).nvram_generation == 4
    assert [v.vm_uuid for v in registry.list_vms("vc-other")] == []

    registry.revoke("vc-a")
    trusted(registry, "vc-b")
    assert registry.register_vm("vc-b", VM_A, "vm-a", "kek-a", "ks-a").nvram_generation == 4
    assert [(v.vm_uuid, v.nvram_generation) for v in registry.list_vms("vc-b")] == [(VM_A, 4)]
    # A removed VM keeps its generation: registered again, a stale .nvram is
    # still refused, and no new vTPM may be created under its UUID.
    registry.remove_vm(VM_A, "admin", "vc-b")
    assert registry.nvram_generation(VM_A) == 4
    with pytest.raises(Conflict, match="generation 4"):
        registry.add_vm("vc-b", VM_A, "vm-a", "kek-a2", "ks-a2", None)
    assert registry.register_vm("vc-b", VM_A, "vm-a", "kek-a", "ks-a").nvram_generation == 4


def test_vm_of_trusted_instance_cannot_be_taken(registry):
    trusted(registry, "vc-a")
    trusted(registry, "vc-b")
    registry.add_vm("vc-a", VM_A, "vm-a", "kek-a", "ks-a", None)
    with pytest.raises(Conflict, match="another trusted instance"):
        registry.register_vm("vc-b", VM_A, "vm-a", "kek-a", "ks-a")
    with pytest.raises(Conflict, match="another VM"):
        registry.register_vm("vc-b", VM_B, "vm-x", "kek-a", "ks-a")


def test_host_rules(registry):
    trusted(registry, "vc-a")
    trusted(registry, "vc-b")
    registry.register_host("vc-a", "esx-1", csr_pem("ignored"))
    with pytest.raises(Conflict):
        registry.register_host("vc-b", "esx-1", csr_pem("ignored"))
    with pytest.raises(NotFound):
        registry.remove_host("vc-b", "esx-1")
    with pytest.raises(NotFound):
        registry.check_new_vm("vc-b", VM_A, "esx-1")
    registry.add_vm("vc-a", VM_A, "vm-a", "kek-a", "ks-a", "esx-1")
    with pytest.raises(NotFound):
        registry.place_vm("vc-b", VM_A, "esx-1")
    registry.remove_host("vc-a", "esx-1")
    assert registry.get_vm(VM_A).host is None


def test_untrusted_instance_cannot_register(registry):
    registry.enroll("vc-p", registry.issue_token("vc-p"), csr_pem("ignored"))
    with pytest.raises(Refused):
        registry.register_host("vc-p", "esx-1", csr_pem("ignored"))


# --- Audit ---------------------------------------------------------------------------------


def test_audit_chain_records_decisions_and_detects_tampering(registry):
    trusted(registry, "vc-a")
    registry.record_audit("host:esx-1", "unwrap", "kek-a", False, "not placed")
    records = registry.audit_records()
    assert [r.action for r in records][-1] == "unwrap"
    assert registry.verify_audit() == []
    with registry.db.begin() as conn:
        conn.execute(update(audit).where(audit.c.seq == 2).values(reason="edited"))
    assert any("record 2 altered" in p for p in registry.verify_audit())
    with registry.db.begin() as conn:
        conn.execute(audit.delete().where(audit.c.seq == 3))
    assert any("missing" in p for p in registry.verify_audit())


def test_refused_enrollment_is_audited(registry):
    registry.issue_token("vc-a")
    with pytest.raises(Refused):
        registry.enroll("vc-a", "wrong", csr_pem("ignored"))
    last = registry.audit_records()[-1]
    assert (last.action, last.allowed) == ("enroll", False)


def test_no_token_in_database(registry, tmp_path):
    """Only digests of tokens and poll secrets are stored."""
    token = registry.issue_token("vc-a")
    enrollment = registry.enroll("vc-a", token, csr_pem("ignored"))
    data = (tmp_path / "broker.db").read_bytes()
    for wal in tmp_path.glob("broker.db-wal"):
        data += wal.read_bytes()
    assert token.encode() not in data
    assert enrollment.poll_secret.encode() not in data


def test_concurrent_decisions_keep_the_chain_intact(registry):
    """The gateway's pattern from many threads at once: authorize, then
    record. Every record lands and the chain verifies."""
    import threading

    trusted(registry, "vc-a")
    host = fingerprint(registry.register_host("vc-a", "esx-1", csr_pem("ignored")))
    registry.add_vm("vc-a", VM_A, "vm-a", "kek-a", "ks-a", "esx-1")
    before = len(registry.audit_records(limit=100000))
    errors = []

    def work():
        try:
            for _ in range(25):
                decision = registry.authorize_unwrap(host, "kek-a")
                registry.record_audit("host:esx-1", "unwrap", "kek-a", decision.allowed, decision.reason)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(registry.audit_records(limit=100000)) == before + 200
    assert registry.verify_audit() == []


def test_unwritable_audit_record_raises_and_leaves_the_chain_intact(registry):
    """Fail closed: when the trail cannot be written (a trigger refuses
    every insert), record_audit raises DatabaseError in each thread whose
    record was in the failed batch; afterwards the trail takes records again
    and verifies."""
    import threading

    from sqlalchemy import text

    from broker.db import DatabaseError

    trusted(registry, "vc-a")
    before = len(registry.audit_records(limit=100000))
    with registry.db.begin() as conn:
        conn.execute(
            text("CREATE TRIGGER refuse_audit BEFORE INSERT ON broker_audit BEGIN SELECT RAISE(ABORT, 'full'); END")
        )
    failures = []

    def work():
        try:
            registry.record_audit("host:esx-1", "gateway.unwrap", "kek-a", True, "placed")
        except DatabaseError as exc:
            failures.append(str(exc))

    threads = [threading.Thread(target=work) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(failures) == 6 and all("full" in f for f in failures)
    assert len(registry.audit_records(limit=100000)) == before
    with registry.db.begin() as conn:
        conn.execute(text("DROP TRIGGER refuse_audit"))
    registry.record_audit("host:esx-1", "gateway.unwrap", "kek-a", True, "placed")
    assert len(registry.audit_records(limit=100000)) == before + 1
    assert registry.verify_audit() == []


# --- Cold migration ----------------------------------------------------------------------------------------


def test_release_hands_a_vm_to_the_named_instance_only(registry):
    """B releases its VM to C: the VM is unplaced at once (B's host is refused), only C may register it, with
    the generation B's host reported; a release to an unknown or revoked instance, a replay, a placement while
    released and a third instance's registration are refused, change nothing, and are in the trail."""
    for name in ("vc-b", "vc-c", "vc-d", "vc-gone"):
        trusted(registry, name)
    registry.revoke("vc-gone")
    host_b = fingerprint(registry.register_host("vc-b", "esx-b", csr_pem("ignored")))
    host_c = fingerprint(registry.register_host("vc-c", "esx-c", csr_pem("ignored")))
    registry.add_vm("vc-b", VM_A, "vm-a", "kek-a", "ks-a", "esx-b")
    registry.record_nvram_generation(VM_A, 6, "host:esx-b")
    assert registry.authorize_unwrap(host_b, "kek-a").allowed
    before = registry.get_vm(VM_A)

    with pytest.raises(NotFound, match="no instance named vc-nobody"):
        registry.release_vm(VM_A, "vc-nobody", "instance:vc-b", "vc-b")
    with pytest.raises(Conflict, match="revoked"):
        registry.release_vm(VM_A, "vc-gone", "instance:vc-b", "vc-b")
    with pytest.raises(NotFound):
        registry.release_vm(VM_A, "vc-d", "instance:vc-c", "vc-c")  # not C's VM
    with pytest.raises(InvalidRequest, match="already"):
        registry.release_vm(VM_A, "vc-b", "instance:vc-b", "vc-b")
    assert registry.get_vm(VM_A) == before

    released = registry.release_vm(VM_A, "vc-c", "instance:vc-b", "vc-b")
    assert released.released_to == "vc-c" and released.host is None and released.instance == "vc-b"
    assert not registry.authorize_unwrap(host_b, "kek-a").allowed
    with pytest.raises(Conflict, match="already released"):
        registry.release_vm(VM_A, "vc-c", "instance:vc-b", "vc-b")
    with pytest.raises(Conflict, match="released to instance vc-c"):
        registry.place_vm("vc-b", VM_A, "esx-b")
    with pytest.raises(Conflict, match="not to vc-d"):
        registry.register_vm("vc-d", VM_A, "vm-a", "kek-a", "ks-a")

    taken = registry.register_vm("vc-c", VM_A, "vm-a", "kek-a", "ks-a")
    assert (taken.instance, taken.host, taken.released_to, taken.nvram_generation) == ("vc-c", None, None, 6)
    registry.place_vm("vc-c", VM_A, "esx-c")
    assert registry.authorize_unwrap(host_c, "kek-a").allowed
    refused = registry.authorize_unwrap(host_b, "kek-a")
    assert not refused.allowed and refused.vm_uuid is None  # B's host may not learn of it
    with pytest.raises(NotFound):
        registry.release_vm(VM_A, "vc-c", "instance:vc-b", "vc-b")  # replayed after the move

    records = [(r.actor, r.action, r.allowed) for r in registry.audit_records() if r.target == VM_A]
    assert records.count(("instance:vc-b", "vm.release", False)) == 5  # unknown, revoked, itself, 2 replays
    assert ("instance:vc-c", "vm.release", False) in records
    assert ("instance:vc-b", "vm.place", False) in records
    assert ("instance:vc-d", "vm.register", False) in records
    assert ("instance:vc-c", "vm.register", True) in records
    assert registry.verify_audit() == []


def test_transfer_cancel_and_remove_keep_the_generation(registry):
    """An administrator's transfer (instance None) moves any VM; releasing to the owner cancels; removal keeps
    the generation, so no path brings the VM back at generation 0."""
    for name in ("vc-b", "vc-c"):
        trusted(registry, name)
    registry.add_vm("vc-b", VM_A, "vm-a", "kek-a", "ks-a", None)
    registry.record_nvram_generation(VM_A, 9, "host:esx-b")
    assert registry.release_vm(VM_A, "vc-c", "instance:vc-b", "vc-b").released_to == "vc-c"
    assert registry.release_vm(VM_A, "vc-b", "instance:vc-b", "vc-b").released_to is None  # cancelled
    assert registry.release_vm(VM_A, "vc-c", "user:root-admin", None).released_to == "vc-c"
    assert registry.register_vm("vc-c", VM_A, "vm-a", "kek-a", "ks-a").nvram_generation == 9
    registry.remove_vm(VM_A, "user:root-admin", None)
    assert registry.nvram_generation(VM_A) == 9
    with pytest.raises(Conflict, match="generation 9"):
        registry.check_new_vm("vc-b", VM_A, None)
    assert registry.register_vm("vc-b", VM_A, "vm-a", "kek-a", "ks-a").nvram_generation == 9
    actions = [(r.actor, r.action, r.allowed) for r in registry.audit_records() if r.target == VM_A]
    assert ("user:root-admin", "vm.transfer", True) in actions
    assert ("instance:vc-b", "vm.create", False) in actions


# Host attestation: the registry's administration (docs/attestation.md;
# quotes and tokens against real TPMs: tests/integration/test_host_attestation.py).
def _ek_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_removed_host_takes_its_tpm_pin_along_and_a_takeover_keeps_it(registry):
    trusted(registry, "vc-a")
    registry.register_host("vc-a", "esx-1", csr_pem("ignored"))
    registry.register_host("vc-a", "esx-2", csr_pem("ignored"))
    registry.pin_host_ek("esx-1", _ek_pem())
    registry.pin_host_ek("esx-2", _ek_pem())
    status = {h.host: h for h in registry.attestation_status()}
    assert status["esx-1"].tpm_state == status["esx-2"].tpm_state == "pinned"
    registry.remove_host("vc-a", "esx-1")
    registry.register_host("vc-a", "esx-1", csr_pem("ignored"))
    status = {h.host: h for h in registry.attestation_status()}
    # A new host under the same name is pinned anew.
    assert status["esx-1"].tpm_state == "none"
    # Instance B takes esx-2 over after A is revoked: the same machine, the same TPM.
    registry.revoke("vc-a")
    trusted(registry, "vc-b")
    registry.register_host("vc-b", "esx-2", csr_pem("ignored"))
    status = {h.host: h for h in registry.attestation_status()}
    assert status["esx-2"].tpm_state == "pinned" and status["esx-2"].instance == "vc-b"
    assert any("TPM's pin dropped" in r.reason for r in registry.audit_records() if r.action == "host.remove")


def test_attestation_administration_refuses_bad_input_and_audits_it(registry):
    trusted(registry, "vc-a")
    registry.register_host("vc-a", "esx-1", csr_pem("ignored"))
    with pytest.raises(InvalidRequest, match="does not load"):
        registry.pin_host_ek("esx-1", b"not a key")
    with pytest.raises(NotFound):
        registry.pin_host_ek("esx-9", _ek_pem())
    with pytest.raises(InvalidRequest, match="scope"):
        registry.set_attest_policy("cluster:x", "sha256", {"0": "00" * 32})
    with pytest.raises(InvalidRequest, match="32 bytes"):
        registry.set_attest_policy("default", "sha256", {"0": "00" * 20})
    with pytest.raises(InvalidRequest, match="bank"):
        registry.set_attest_policy("default", "md5", {"0": "00" * 16})
    with pytest.raises(Refused, match="no verified quote"):
        registry.capture_attest_policy("default", "esx-1")
    with pytest.raises(NotFound):
        registry.remove_attest_policy("default")
    assert registry.attest_policies() == []
    refused = [r for r in registry.audit_records() if not r.allowed]
    assert {r.action for r in refused} >= {"host.tpm.pin", "attest.policy.set", "attest.policy.remove"}
    info = registry.set_attest_policy("instance:vc-a", "sha256", {"7": "11" * 32, "0": "22" * 32})
    assert sorted(info.pcrs) == [0, 7]
    # The most specific policy applies: host, then its instance, then default.
    registry.set_attest_policy("default", "sha256", {"0": "33" * 32})
    assert {h.host: h.policy for h in registry.attestation_status()}["esx-1"] == "instance:vc-a"
    registry.set_attest_policy("host:esx-1", "sha256", {"1": "44" * 32})
    assert {h.host: h.policy for h in registry.attestation_status()}["esx-1"] == "host:esx-1"
