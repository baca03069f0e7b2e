"""The broker's attestation policy API, hosts' attestation status and its
metrics (issue 18, docs/attestation.md), against a real kms-server and
vtpm-broker over mutual TLS, with two hosts whose TPMs are real swtpm
instances driven with tpm2-tools.

- Who may set, list and remove policies: a security administrator any scope,
  a trusted instance only its own hosts and its own group, nobody else; every
  refusal is in the audit trail.
- Bad input is refused in one line and changes nothing.
- An instance sees only its own hosts and policies.
- `admin list`, `admin list --hosts --json`, `admin attest status --json`
  and /metrics agree on each host's status, and the counters of quotes and
  refused unwraps move.

Instances vc-a (hosts esx-a1 and esx-a2 with TPMs, esx-a3 pinned to a TPM
that never enrolls) and vc-b (host esx-b1, no TPM).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import broker_harness
import pytest
import requests
from attest_harness import attest, pin_and_enroll
from broker_harness import Identity, assert_error, call, create_vm, enroll, issue_users, register_new_host
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from kmip.core.enums import ResultReason
from pg_cluster import free_port
from prometheus_text import sample

from broker.drill.processes import Broker, Kms, start_broker
from broker.host.host_tpm import HostTpm, HostTpmProcess, measure_boot
from broker.keysafe import parse_key_safe
from kmip_core.client import KmipClient, KmipError

pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("tpm2_quote") is None,
    reason="attestation API tests need swtpm and tpm2-tools (tpm2_quote)",
)

PROVIDER = "kms-attest-api-test"
ROLES = """
[roles]
security_admins = ["secadmin"]
administrators = ["root-admin"]
no_crypto_administrators = ["ops"]
auditors = ["auditor"]
"""
POLICIES = "/v1/attestation/policies"
HOSTS = "/v1/attestation/hosts"
STATUSES = ("attested", "failed", "stale", "enrolled", "pinned", "revoked", "none")

kms = broker_harness.kms


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, kms: Kms, metrics_port: int) -> Iterator[Broker]:
    """A broker with the four roles and its monitoring listener on `metrics_port`."""
    b = start_broker(
        tmp_path_factory.mktemp("broker"), kms, PROVIDER, roles=ROLES + f"\n[metrics]\nport = {metrics_port}\n"
    )
    yield b
    b.stop()


@dataclass
class Host:
    name: str
    identity: Identity
    tpm: HostTpm | None = None
    process: HostTpmProcess | None = None
    vm: dict | None = None

    def post(self, broker: Broker, path: str, body: dict) -> requests.Response:
        return call(broker, "POST", path, self.identity, json=body)


@dataclass
class Site:
    """Who calls: users by name, instances by name, hosts by name."""

    users: dict[str, Identity]
    instances: dict[str, Identity]
    hosts: dict[str, Host]


def some_rsa_public_pem() -> bytes:
    """An RSA public key no TPM holds: pinning it leaves the host 'pinned' for good."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.fixture(scope="module")
def site(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """The users, the instances vc-a and vc-b, and their hosts. esx-a1 and
    esx-a2 have TPMs, booted alike, pinned, enrolled and quoted once (no
    policy yet, so their quotes are kept as evidence); esx-a3 is pinned to a
    key no TPM holds; esx-b1 has no TPM. A VM is placed on esx-a2."""
    work = tmp_path_factory.mktemp("attest-api")
    users = issue_users(broker, work, ("secadmin", "auditor", "root-admin", "ops"))
    instances = {name: enroll(broker, name, work) for name in ("vc-a", "vc-b")}
    hosts: dict[str, Host] = {}
    try:
        for name, instance in (("esx-a1", "vc-a"), ("esx-a2", "vc-a"), ("esx-a3", "vc-a"), ("esx-b1", "vc-b")):
            hosts[name] = Host(name, register_new_host(broker, instances[instance], work, name))
        for name in ("esx-a1", "esx-a2"):
            host = hosts[name]
            (work / f"{name}-tpm").mkdir(mode=0o700)
            (work / f"{name}-scratch").mkdir(mode=0o700)
            host.process = HostTpmProcess(work / f"{name}-tpm")
            host.process.start()
            host.tpm = HostTpm(host.process.tcti, work / f"{name}-scratch")
            host.tpm.ensure_keys()
            measure_boot(host.tpm)
            pin_and_enroll(broker, host, work)
            first = attest(broker, host)
            assert first.status_code == 200, first.text
            assert first.json()["token"] is None
        hosts["esx-a2"].vm = create_vm(broker, instances["vc-a"], "vm-on-esx-a2", host="esx-a2")
        unknown_ek = work / "unknown-ek.pem"
        unknown_ek.write_bytes(some_rsa_public_pem())
        broker.admin("attest", "pin-ek", "esx-a3", "--ek-pub", str(unknown_ek))
        yield Site(users, instances, hosts)
    finally:
        for host in hosts.values():
            if host.process is not None:
                host.process.stop()


def policies(broker: Broker, identity: Identity) -> dict[str, dict]:
    """GET /v1/attestation/policies as `identity`: {scope: policy}."""
    answer = call(broker, "GET", POLICIES, identity)
    assert answer.status_code == 200, answer.text
    return {p["scope"]: p for p in answer.json()["policies"]}


def put_policy(broker: Broker, identity: Identity, scope: str, body: dict) -> requests.Response:
    return call(broker, "PUT", f"{POLICIES}/{scope}", identity, json=body)


def audit_records(broker: Broker) -> list[dict]:
    """The broker's audit trail (`admin audit --json`), after checking its chain is intact."""
    listing = json.loads(broker.admin("audit", "--json").stdout)
    assert listing["intact"], listing["problems"]
    return listing["records"]


def refusals(broker: Broker) -> Counter[tuple[str, str]]:
    """How many refusals the trail holds, by (actor, action)."""
    return Counter((r["actor"], r["action"]) for r in audit_records(broker) if not r["allowed"])


def zeros(hex_byte: str, size: int = 32) -> str:
    return hex_byte * size


def test_a_security_admin_sets_lists_and_removes_policies_of_any_scope(broker, site):
    """Captured for `default`, given for `host:` and `instance:`; each set is
    audited with the user as actor, and each removal leaves GET without it."""
    admin = site.users["secadmin"]
    captured = put_policy(broker, admin, "default", {"capture_from_host": "esx-a1", "pcr_indices": [0, 7]})
    assert captured.status_code == 200, captured.text
    assert captured.json()["scope"] == "default"
    assert captured.json()["pcr_bank"] == "sha256"
    assert sorted(captured.json()["pcrs"]) == ["0", "7"]
    assert "captured from host esx-a1" in captured.json()["source"]
    given = put_policy(broker, admin, "host:esx-a2", {"pcr_bank": "sha256", "pcrs": {"7": zeros("ab")}})
    assert given.status_code == 200, given.text
    assert given.json()["pcrs"] == {"7": zeros("ab")}
    group = put_policy(broker, admin, "instance:vc-b", {"pcr_bank": "sha1", "pcrs": {"0": zeros("01", 20)}})
    assert group.status_code == 200, group.text

    listed = policies(broker, admin)
    assert {"default", "host:esx-a2", "instance:vc-b"} <= set(listed)
    assert listed["host:esx-a2"]["pcrs"] == {"7": zeros("ab")}
    assert listed["instance:vc-b"]["pcr_bank"] == "sha1"
    assert listed["default"]["digest"] == captured.json()["digest"]
    assert listed["default"]["created_by"] == "user:secadmin"
    sets = [r for r in audit_records(broker) if r["action"] == "attest.policy.set" and r["allowed"]]
    assert {r["target"] for r in sets if r["actor"] == "user:secadmin"} >= {"default", "host:esx-a2", "instance:vc-b"}

    # Replacing a policy changes its digest.
    replaced = put_policy(broker, admin, "host:esx-a2", {"pcr_bank": "sha256", "pcrs": {"7": zeros("cd")}})
    assert replaced.status_code == 200 and replaced.json()["digest"] != given.json()["digest"]

    # A client that percent-encodes the scope's colon names the same policy.
    encoded = put_policy(broker, admin, "host%3Aesx-a2", {"pcr_bank": "sha256", "pcrs": {"7": zeros("cd")}})
    assert encoded.status_code == 200 and encoded.json()["scope"] == "host:esx-a2"

    for scope in ("default", "host%3Aesx-a2", "instance:vc-b"):
        gone = call(broker, "DELETE", f"{POLICIES}/{scope}", admin)
        assert gone.status_code == 204, gone.text
    assert not {"default", "host:esx-a2", "instance:vc-b"} & set(policies(broker, admin))
    # Removing what is not there is a one-line 404.
    assert_error(call(broker, "DELETE", f"{POLICIES}/default", admin), 404, "no attestation policy for default")


def test_an_instance_manages_policies_of_its_own_hosts_and_group_only(broker, site):
    """vc-a may set host:esx-a1 and instance:vc-a; default, another
    instance's host or group are 403 and audited; capturing from another
    instance's host is a 404 that does not say whether it exists."""
    admin, vc_a = site.users["secadmin"], site.instances["vc-a"]
    before = refusals(broker)

    own_host = put_policy(broker, vc_a, "host:esx-a1", {"capture_from_host": "esx-a1"})
    assert own_host.status_code == 200, own_host.text
    assert own_host.json()["created_by"] == "instance:vc-a"
    own_group = put_policy(broker, vc_a, "instance:vc-a", {"pcr_bank": "sha256", "pcrs": {"0": zeros("11")}})
    assert own_group.status_code == 200, own_group.text

    forbidden = (
        ("PUT", "default", {"pcr_bank": "sha256", "pcrs": {"0": zeros("11")}}),
        ("PUT", "host:esx-b1", {"pcr_bank": "sha256", "pcrs": {"0": zeros("11")}}),
        ("PUT", "instance:vc-b", {"capture_from_host": "esx-a1"}),
        ("PUT", "host:esx-nowhere", {"capture_from_host": "esx-a1"}),
        ("DELETE", "default", None),
        ("DELETE", "instance:vc-b", None),
    )
    for method, scope, body in forbidden:
        answer = call(broker, method, f"{POLICIES}/{scope}", vc_a, json=body)
        assert_error(answer, 403, "own hosts and instance:vc-a only")

    elsewhere = put_policy(broker, vc_a, "instance:vc-a", {"capture_from_host": "esx-b1"})
    assert_error(elsewhere, 404, "no host named esx-b1")

    after = refusals(broker)
    assert after[("instance:vc-a", "attest.policy.set")] - before[("instance:vc-a", "attest.policy.set")] == 4
    assert after[("instance:vc-a", "attest.policy.remove")] - before[("instance:vc-a", "attest.policy.remove")] == 2
    listed = policies(broker, admin)
    assert "default" not in listed and "host:esx-b1" not in listed and "instance:vc-b" not in listed
    assert "host:esx-nowhere" not in listed

    for scope in ("host:esx-a1", "instance:vc-a"):
        assert call(broker, "DELETE", f"{POLICIES}/{scope}", vc_a).status_code == 204
    assert not {"host:esx-a1", "instance:vc-a"} & set(policies(broker, admin))


def test_an_instance_sees_only_its_own_hosts_and_policies(broker, site):
    admin = site.users["secadmin"]
    vc_a, vc_b = site.instances["vc-a"], site.instances["vc-b"]
    for scope in ("default", "instance:vc-b", "host:esx-b1", "host:esx-a1", "instance:vc-a"):
        answer = put_policy(broker, admin, scope, {"pcr_bank": "sha256", "pcrs": {"0": zeros("22")}})
        assert answer.status_code == 200, answer.text
    try:
        assert set(policies(broker, vc_a)) == {"host:esx-a1", "instance:vc-a"}
        assert set(policies(broker, vc_b)) == {"host:esx-b1", "instance:vc-b"}
        assert {"default", "host:esx-a1", "host:esx-b1", "instance:vc-a", "instance:vc-b"} <= set(
            policies(broker, admin)
        )
    finally:
        for scope in ("default", "instance:vc-b", "host:esx-b1", "host:esx-a1", "instance:vc-a"):
            call(broker, "DELETE", f"{POLICIES}/{scope}", admin)

    def hosts_seen(identity: Identity) -> dict[str, dict]:
        answer = call(broker, "GET", HOSTS, identity)
        assert answer.status_code == 200, answer.text
        return {h["host"]: h for h in answer.json()["hosts"]}

    assert set(hosts_seen(vc_a)) == {"esx-a1", "esx-a2", "esx-a3"}
    assert set(hosts_seen(vc_b)) == {"esx-b1"}
    every = hosts_seen(admin)
    assert {"esx-a1", "esx-a2", "esx-a3", "esx-b1"} <= set(every)
    assert every["esx-a3"]["status"] == "pinned" and every["esx-b1"]["status"] == "none"
    assert every["esx-a1"]["instance"] == "vc-a" and every["esx-a1"]["tpm_state"] == "enrolled"


@pytest.mark.parametrize("user", ["auditor", "root-admin", "ops"])
def test_users_without_the_security_admin_role_are_refused_and_audited(broker, site, user):
    """An auditor, an administrator and a no-crypto administrator may not
    read, set or remove policies nor read hosts' status: 403 each, each in
    the trail with the user as actor."""
    identity, admin = site.users[user], site.users["secadmin"]
    shown = policies(broker, admin)
    before = refusals(broker)
    calls = (
        ("GET", POLICIES, None),
        ("GET", HOSTS, None),
        ("PUT", f"{POLICIES}/default", {"capture_from_host": "esx-a1"}),
        ("DELETE", f"{POLICIES}/default", None),
    )
    for method, path, body in calls:
        assert_error(call(broker, method, path, identity, json=body), 403, "is not allowed for role")
    after = refusals(broker)
    actor = f"user:{user}"
    assert after[(actor, "attest.read")] - before[(actor, "attest.read")] == 2
    assert after[(actor, "attest.policy.set")] - before[(actor, "attest.policy.set")] == 1
    assert after[(actor, "attest.policy.remove")] - before[(actor, "attest.policy.remove")] == 1
    assert policies(broker, admin) == shown


def test_a_host_certificate_is_refused_and_audited(broker, site):
    host, admin = site.hosts["esx-a1"], site.users["secadmin"]
    shown = policies(broker, admin)
    before = refusals(broker)
    for method, path, body in (
        ("GET", POLICIES, None),
        ("GET", HOSTS, None),
        ("PUT", f"{POLICIES}/host:esx-a1", {"capture_from_host": "esx-a1"}),
        ("DELETE", f"{POLICIES}/host:esx-a1", None),
    ):
        answer = call(broker, method, path, host.identity, json=body)
        assert_error(answer, 403, "not allowed with a host certificate")
    after = refusals(broker)
    assert after[("host:esx-a1", "attest.read")] - before[("host:esx-a1", "attest.read")] == 2
    assert after[("host:esx-a1", "attest.policy.set")] - before[("host:esx-a1", "attest.policy.set")] == 1
    assert after[("host:esx-a1", "attest.policy.remove")] - before[("host:esx-a1", "attest.policy.remove")] == 1
    assert policies(broker, admin) == shown


GOOD_PCR = {"pcr_bank": "sha256", "pcrs": {"7": "ab" * 32}}
BAD_POLICIES = (
    # (scope, body as JSON or raw bytes, status, words in the error)
    ("group:esx", GOOD_PCR, 400, "a policy's scope is"),
    ("host:", GOOD_PCR, 400, ""),
    ("host:esx-a1", {"pcr_bank": "md5", "pcrs": {"7": "ab" * 32}}, 400, "unknown PCR bank 'md5'"),
    ("host:esx-a1", {"pcr_bank": "sha256", "pcrs": {"7": "ab" * 20}}, 400, "a sha256 PCR is 32 bytes"),
    ("host:esx-a1", {"pcr_bank": "sha256", "pcrs": {"7": "not hex"}}, 400, "pcrs maps PCR indices to hexadecimal"),
    ("host:esx-a1", {"pcr_bank": "sha256", "pcrs": {"7": "ab" * 32, "07": "cd" * 32}}, 400, "pcrs gives PCR 7 twice"),
    ("host:esx-a1", {"pcr_bank": "sha256", "pcrs": {"24": "ab" * 32}}, 400, "index 0 to 23"),
    ("host:esx-a1", {"pcr_bank": "sha256", "pcrs": {}}, 400, "pcrs must be an object"),
    ("host:esx-a1", {"pcr_bank": "sha256", "pcrs": ["ab" * 32]}, 400, "pcrs must be an object"),
    ("host:esx-a1", {"pcr_bank": "sha256"}, 400, "missing field 'pcrs'"),
    ("host:esx-a1", {"capture_from_host": "esx-a1", "pcr_indices": [24]}, 400, "not 24"),
    ("host:esx-a1", {"capture_from_host": "esx-a1", "pcr_indices": []}, 400, "at least one PCR"),
    ("host:esx-a1", {"capture_from_host": "esx-a1", "pcr_indices": "0-7"}, 400, "pcr_indices must be a list"),
    ("host:esx-a1", {"capture_from_host": "esx-a1", "pcrs": {"7": "ab" * 32}}, 400, "give either"),
    ("host:esx-a1", {"capture_from_host": "esx-a1", "pcr_bank": "sha256"}, 400, "give either"),
    ("host:esx-a1", {"capture_from_host": "esx-a3"}, 403, "host esx-a3 has no verified quote"),
    ("host:esx-a1", {"capture_from_host": "esx-b1"}, 403, "host esx-b1 has no verified quote"),
    ("host:esx-a1", {"capture_from_host": "Not A Host!"}, 400, ""),
    ("host:esx-a1", {**GOOD_PCR, "comment": "x"}, 400, "unknown field 'comment'"),
    ("host:esx-a1", b"pcr_bank=sha256", 400, "malformed JSON"),
    ("host:esx-a1", b"[1, 2]", 400, "the body must be a JSON object"),
    ("host:esx-a1", b"", 400, "the body must be a JSON object"),
)


def test_bad_policies_are_refused_in_one_line_and_change_nothing(broker, site):
    """Each bad PUT, as a security administrator, is a one-line error, and
    GET shows the same policies afterwards (a good one set beforehand among
    them); the 403s are audited."""
    admin = site.users["secadmin"]
    kept = put_policy(broker, admin, "host:esx-a1", {"capture_from_host": "esx-a1"})
    assert kept.status_code == 200, kept.text
    try:
        shown = policies(broker, admin)
        seen = len(audit_records(broker))
        forbidden = []
        for scope, body, status, words in BAD_POLICIES:
            if isinstance(body, bytes):
                answer = call(broker, "PUT", f"{POLICIES}/{scope}", admin, data=body)
            else:
                answer = put_policy(broker, admin, scope, body)
            assert answer.status_code == status, (scope, body, answer.text)
            error = assert_error(answer, status, words)
            if status == 403:
                forbidden.append(error)
        assert policies(broker, admin) == shown
        assert len(forbidden) == 2
        refused = [
            r["reason"]
            for r in audit_records(broker)[seen:]
            if not r["allowed"] and r["actor"] == "user:secadmin" and r["action"] == "attest.policy.set"
        ]
        for error in forbidden:
            assert any(error in reason for reason in refused), (error, refused)
        assert_error(call(broker, "DELETE", f"{POLICIES}/elsewhere", admin), 400, "a policy's scope is")
    finally:
        call(broker, "DELETE", f"{POLICIES}/host:esx-a1", admin)


def scrape(metrics_port: int) -> str:
    answer = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.text


def test_status_and_metrics_agree_after_hosts_attest(broker, site, metrics_port):
    """A default policy captured from esx-a1; esx-a1 attests, esx-a2 boots
    tampered and fails, and its VM's unwrap is refused. `admin list` shows
    each host's status, `admin list --hosts --json` and `admin attest status
    --json` agree, and /metrics counts the quotes, the refused unwrap and the
    hosts by status as the listings do."""
    admin = site.users["secadmin"]
    good, tampered = site.hosts["esx-a1"], site.hosts["esx-a2"]
    assert tampered.tpm is not None and tampered.vm is not None
    before = scrape(metrics_port)
    captured = put_policy(broker, admin, "default", {"capture_from_host": "esx-a1"})
    assert captured.status_code == 200, captured.text
    try:
        ok = attest(broker, good)
        assert ok.status_code == 200, ok.text
        assert ok.json()["policy"] == "default" and ok.json()["token"]
        tampered.tpm.pcr_extend(7, "sha256", b"\x66" * 32)
        refused = attest(broker, tampered)
        assert_error(refused, 403, "PCR 7 differs from policy default")

        safe = parse_key_safe(tampered.vm["key_safe"])
        cert, key = tampered.identity
        with KmipClient([broker.gateway], cert, key, broker.trust_ca, request_timeout=30.0) as client:
            with pytest.raises(KmipError) as unwrap:
                client.decrypt(safe.kms_key_id, safe.wrapped_dek, iv=safe.iv, tag=safe.tag, mode="GCM")
        assert unwrap.value.reason == ResultReason.ATTESTATION_REQUIRED

        listed = json.loads(broker.admin("list", "--hosts", "--json").stdout)
        status = json.loads(broker.admin("attest", "status", "--json").stdout)
        after = scrape(metrics_port)
        assert listed == status
        by_host = {h["host"]: h for h in status}
        assert by_host["esx-a1"]["status"] == "attested" and by_host["esx-a1"]["policy"] == "default"
        assert by_host["esx-a2"]["status"] == "failed" and "PCR 7" in by_host["esx-a2"]["last_reason"]
        assert by_host["esx-a3"]["status"] == "pinned"
        assert by_host["esx-b1"]["status"] == "none"

        text = broker.admin("list").stdout
        assert "vc-a" in text and "vc-b" in text  # the instances' table comes first
        rows = {line.split()[0]: line.split() for line in text.splitlines() if line.startswith("esx-")}
        assert rows["esx-a1"][1:3] == ["vc-a", "attested"]
        assert rows["esx-a2"][1:3] == ["vc-a", "failed"]
        assert rows["esx-a3"][1:3] == ["vc-a", "pinned"]
        assert rows["esx-b1"][1:3] == ["vc-b", "none"]

        def moved(name: str, **labels: str) -> float:
            return sample(after, name, **labels) - sample(before, name, **labels)

        assert moved("vtpm_broker_attestations_total", result="attested") == 1
        assert moved("vtpm_broker_attestations_total", result="failed") == 1
        assert moved("vtpm_broker_unwraps_total", result="attestation_refused") == 1
        assert moved("vtpm_broker_unwraps_total", result="allowed") == 0
        counts = Counter(h["status"] for h in status)
        for name in STATUSES:
            assert sample(after, "vtpm_broker_hosts_by_attestation", status=name) == counts[name], name
    finally:
        call(broker, "DELETE", f"{POLICIES}/default", admin)
