"""One story in two audit trails (issue 13, item 5), against a real kms-server and a real vtpm-broker:
the broker passes its request id and the host (or instance, or user) it acts for to the KMS in the KMIP
request header's Client Correlation Value; the KMS records it; `kms-admin audit show --request-id` and
`vtpm-broker admin audit --request-id` then find the two halves of one unwrap, and `--vm/--host/--since`
tell the same story. Refused API writes (403 and 409) are in the broker's trail with their request id."""

from __future__ import annotations

import itertools
import json
import uuid
from pathlib import Path

import broker_harness
import pytest
from broker_harness import call, enroll, issue_users, new_key_and_csr, register_new_host

from broker.drill.processes import run
from broker.keysafe import parse_key_safe
from kmip_core.client import KmipClient

PROVIDER = "kms-join-test"
ROLES = """
[roles]
security_admins = ["secadmin"]
administrators = ["root-admin"]
auditors = ["auditor"]
"""
_serial = itertools.count(1)


# The shared module-scoped fixtures (tests/broker_harness.py); pytest finds them by these names.
kms = broker_harness.kms
broker = broker_harness.broker


@pytest.fixture(scope="module")
def ids(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ids")


@pytest.fixture(scope="module")
def users(broker, ids):
    return issue_users(broker, ids, ("root-admin", "auditor", "secadmin"))


def kms_show(kms, *filters: str) -> list[dict]:
    done = run("kms-admin", "audit", "show", "--config", kms.config, "--json", *filters)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


def broker_audit(broker, *filters: str) -> dict:
    done = broker.admin("audit", *filters, "--json")
    return json.loads(done.stdout)


def test_one_unwrap_has_one_id_in_both_trails_and_names_the_host(kms, broker, ids):
    """A host unwraps a VM's DEK through the gateway: the broker's gateway.unwrap record and the KMS's
    DECRYPT record carry the same request id, and the KMS's record names the host the broker acted for.
    Each command finds the other's record by that id, and `--vm NAME` (KMS) and `--vm NAME --host H
    --since 1h` (broker) list the story of that VM."""
    instance = enroll(broker, "vc-join", ids)
    host = register_new_host(broker, instance, ids, "esx-join-1")
    name = f"vm-join-{next(_serial)}"
    answer = call(broker, "POST", "/v1/vms", instance, json={"vm_uuid": str(uuid.uuid4()), "name": name,
                                                            "host": "esx-join-1"})  # fmt: skip
    assert answer.status_code == 201, answer.text
    create_id = answer.headers["X-Request-Id"]
    vm = answer.json()
    ks = parse_key_safe(vm["key_safe"])
    with KmipClient([broker.gateway], host[0], host[1], broker.trust_ca) as client:
        assert len(client.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)) == 64

    listing = broker_audit(broker, "--vm", name, "--host", "esx-join-1", "--since", "1h")
    assert listing["intact"] is True
    unwraps = [r for r in listing["records"] if r["action"] == "gateway.unwrap"]
    assert len(unwraps) == 1 and unwraps[0]["allowed"] and unwraps[0]["actor"] == "host:esx-join-1"
    request_id = unwraps[0]["request_id"]
    assert request_id and len(request_id) == 16

    # The KMS's half: one Decrypt by the broker's identity, for host esx-join-1, under the same id.
    decrypts = kms_show(kms, "--request-id", request_id)
    assert [r["operation"] for r in decrypts] == ["DECRYPT"]
    assert decrypts[0]["correlation"] == f"broker-req={request_id};host=esx-join-1"
    assert decrypts[0]["uid"] == ks.kms_key_id and decrypts[0]["result"]["status"] == "SUCCESS"
    # ...and the broker's half, found by the id alone.
    by_id = broker_audit(broker, "--request-id", request_id)["records"]
    assert [(r["action"], r["request_id"]) for r in by_id] == [("gateway.unwrap", request_id)]

    # The VM's story in the KMS: Create, Activate and Encrypt (for the instance, one API request) and the
    # Decrypt (for the host); the same ids are in the broker's records of that VM.
    story = kms_show(kms, "--vm", name)
    assert [r["operation"] for r in story] == ["CREATE", "ACTIVATE", "ENCRYPT", "DECRYPT"]
    assert {r["correlation"] for r in story[:3]} == {f"broker-req={create_id};instance=vc-join"}
    broker_ids = {r["request_id"] for r in broker_audit(broker, "--vm", name)["records"]}
    assert {create_id, request_id} <= broker_ids

    # The table names the id and the host in both commands.
    table = run("kms-admin", "audit", "show", "--config", kms.config, "--request-id", request_id).stdout
    assert request_id in table and "host:esx-join-1" in table
    lines = broker.admin("audit", "--request-id", request_id).stdout
    assert request_id in lines and "audit trail intact" in lines


def test_refused_writes_are_recorded_with_their_request_id(kms, broker, ids, users):
    """403 on POST /v1/hosts and /v1/vms (an auditor; a revoked instance's certificate) and every 409
    (a host name another trusted instance holds, a VM created twice, revoking a revoked instance) are in
    the broker's trail as refusals, each once, under the request id the answer names."""
    a = enroll(broker, "vc-join-a", ids)
    b = enroll(broker, "vc-join-b", ids)
    register_new_host(broker, a, ids, "esx-join-a")
    auditor, admin = users["auditor"], users["root-admin"]
    _key, csr = new_key_and_csr(ids, "spare")
    vm_uuid = str(uuid.uuid4())

    refusals = [
        (call(broker, "POST", "/v1/hosts", auditor, json={"name": "esx-x", "csr_pem": csr, "instance": "vc-join-a"}),
         403, "host.register"),
        (call(broker, "POST", "/v1/vms", auditor, json={"vm_uuid": vm_uuid, "name": "vm-x", "instance": "vc-join-a"}),
         403, "vm.create"),
        (call(broker, "POST", "/v1/hosts", b, json={"name": "esx-join-a", "csr_pem": csr}), 409, "host.register"),
    ]  # fmt: skip
    first = call(broker, "POST", "/v1/vms", a, json={"vm_uuid": vm_uuid, "name": "vm-twice"})
    assert first.status_code == 201, first.text
    refusals.append(
        (call(broker, "POST", "/v1/vms", a, json={"vm_uuid": vm_uuid, "name": "vm-twice"}), 409, "vm.create")
    )
    broker.admin("revoke", "vc-join-b")
    refusals.append(
        (call(broker, "POST", "/v1/hosts", b, json={"name": "esx-y", "csr_pem": csr}), 403, "host.register")
    )
    refusals.append((call(broker, "POST", "/v1/instances/vc-join-b/revoke", admin), 403, "trust.manage"))
    refusals.append((call(broker, "POST", "/v1/instances/vc-join-b/revoke", users["secadmin"]), 409, "trust.manage"))

    records = broker_audit(broker)["records"]
    for answer, status, action in refusals:
        assert answer.status_code == status, answer.text
        request_id = answer.headers["X-Request-Id"]
        mine = [r for r in records if r["request_id"] == request_id]
        assert len(mine) == 1, (status, action, mine)
        assert mine[0]["action"] == action and mine[0]["allowed"] is False, mine[0]
    # The revoked instance's certificate is named by its fingerprint and address.
    revoked = next(r for r in records if r["request_id"] == refusals[4][0].headers["X-Request-Id"])
    assert revoked["actor"].startswith("certificate:") and "not trusted" in revoked["reason"]
