"""Cold migration of a VM between trusted instances, and the broker's roles, against a real kms-server and a
real vtpm-broker (set up with the operator's commands, broker.drill.processes) over real TLS: the owner
releases a VM to a named instance (or an administrator transfers it), only that instance registers it, the
old instance's hosts are refused, the .nvram generation and the audit history stay with the VM, and every
refusal is in the broker's audit trail. The roles are tested as a table: each role against each class of
endpoint."""

from __future__ import annotations

import base64
import itertools
import json
import uuid
from pathlib import Path

import broker_harness
import pytest
from broker_harness import (
    Identity,
    assert_error,
    call,
    enroll,
    issue_users,
    new_key_and_csr,
    register_new_host,
)

from broker.keysafe import parse_key_safe
from kmip_core.client import KmipClient, KmipError

PROVIDER = "kms-migration-test"
ROLES = """
[roles]
security_admins = ["secadmin"]
administrators = ["root-admin"]
no_crypto_administrators = ["ops"]
auditors = ["auditor"]
"""


# The shared module-scoped fixtures (tests/broker_harness.py); pytest finds them by these names.
kms = broker_harness.kms
broker = broker_harness.broker


@pytest.fixture(scope="module")
def users(broker, tmp_path_factory) -> dict[str, Identity]:
    """API users issued by the admin CLI; "nobody" has no role."""
    directory = tmp_path_factory.mktemp("users")
    return issue_users(broker, directory, ("root-admin", "ops", "auditor", "secadmin", "nobody"))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ids")


_serial = itertools.count(1)


def new_host(broker, identity: Identity, directory: Path, name: str | None = None) -> tuple[str, Identity]:
    """A host key and CSR made here, registered by `identity`: (name, host identity)."""
    name = name or f"esx-{next(_serial)}"
    return name, register_new_host(broker, identity, directory, name)


def new_vm(broker, identity: Identity, host: str | None = None) -> dict:
    body = {"vm_uuid": str(uuid.uuid4()), "name": f"vm-{next(_serial)}"}
    if host:
        body["host"] = host
    answer = call(broker, "POST", "/v1/vms", identity, json=body)
    assert answer.status_code == 201, answer.text
    return {**answer.json(), "name": body["name"]}


def trail(broker, auditor: Identity) -> list[dict]:
    answer = call(broker, "GET", "/v1/audit?limit=10000", auditor)
    assert answer.status_code == 200, answer.text
    assert answer.json()["problems"] == [], answer.json()["problems"]
    return answer.json()["records"]


def unwrap(broker, host: Identity, vm: dict) -> bytes:
    ks = parse_key_safe(vm["key_safe"])
    with KmipClient([broker.gateway], host[0], host[1], broker.trust_ca) as client:
        return client.decrypt(ks.kms_key_id, ks.wrapped_dek, iv=ks.iv, tag=ks.tag)


def refused_unwrap(broker, host: Identity, vm: dict) -> str:
    with pytest.raises(KmipError) as refused:
        unwrap(broker, host, vm)
    return refused.value.reason.name if refused.value.reason is not None else "NONE"


def report_generation(broker, host: Identity, vm_uuid: str, generation: int) -> None:
    answer = call(broker, "PUT", f"/v1/vms/{vm_uuid}/nvram-generation", host, json={"generation": generation})
    assert answer.status_code == 200, answer.text


def vm_of(broker, identity: Identity, vm_uuid: str) -> dict | None:
    answer = call(broker, "GET", "/v1/vms", identity)
    assert answer.status_code == 200, answer.text
    return next((v for v in answer.json()["vms"] if v["vm_uuid"] == vm_uuid), None)


# --- Roles: each role against each class of endpoint --------------------------------------------------------

# Class -> the audit action a refusal is recorded under.
ACTIONS = {
    "register host": "host.register",
    "remove host": "host.remove",
    "create VM": "vm.create",
    "register VM": "vm.register",
    "place VM": "vm.place",
    "list all VMs": "vms.read_all",
    "obtain a DEK": "dek.read",
    "remove VM": "vm.remove",
    "release VM": "vm.release",
    "transfer VM": "vm.transfer",
    "read audit trail": "audit.read",
    "manage trust": "trust.manage",
    "host: .nvram generation": "nvram.generation.read",
}
INVENTORY = {"register host", "remove host", "create VM", "register VM", "place VM", "list all VMs"}
# What each caller may do; everything else is a 403 (README: "Roles at the broker").
ALLOWED = {
    "instance (no role)": INVENTORY | {"release VM"},
    "administrator": INVENTORY | {"obtain a DEK", "remove VM", "transfer VM"},
    "no_crypto_administrator": INVENTORY,
    "auditor": {"read audit trail"},
    "security_admin": {"list all VMs", "read audit trail", "manage trust"},
    "user without a role": set(),
    "host": {"host: .nvram generation"},
}


def test_each_role_against_each_endpoint_class(broker, users, workdir):
    """A table of callers (an instance without a role, an administrator, a no-cryptography administrator, an
    auditor, a security administrator, a user without a role, a host) against every class of endpoint: the
    no-cryptography administrator registers hosts and VMs (for a named instance) but never obtains a DEK, an
    auditor only reads the trail, a host only its own calls; every refusal is a 403 recorded in the trail."""
    owner = enroll(broker, "vc-roles", workdir)
    enroll(broker, "vc-roles-2", workdir)
    host_name, host = new_host(broker, owner, workdir, "esx-roles")
    base = new_vm(broker, owner, host_name)
    callers = {
        "instance (no role)": ("instance:vc-roles", owner),
        "administrator": ("user:root-admin", users["root-admin"]),
        "no_crypto_administrator": ("user:ops", users["ops"]),
        "auditor": ("user:auditor", users["auditor"]),
        "security_admin": ("user:secadmin", users["secadmin"]),
        "user without a role": ("user:nobody", users["nobody"]),
        "host": ("host:esx-roles", host),
    }

    def attempt(kind: str, identity: Identity, what: str):
        def named(body: dict) -> dict:
            # A user acts for a named instance; an instance for itself.
            return body if kind.startswith("instance") else {**body, "instance": "vc-roles"}

        if what == "register host":
            _, csr = new_key_and_csr(workdir, f"r-{next(_serial)}")
            return call(
                broker, "POST", "/v1/hosts", identity, json=named({"name": f"esx-r-{next(_serial)}", "csr_pem": csr})
            )
        if what == "remove host":
            name, _ = new_host(broker, owner, workdir)
            return call(broker, "DELETE", f"/v1/hosts/{name}", identity)
        if what == "create VM":
            return call(broker, "POST", "/v1/vms", identity, json=named({"vm_uuid": str(uuid.uuid4()), "name": "r"}))
        if what == "register VM":
            body = {"vm_uuid": base["vm_uuid"], "name": base["name"], "key_safe": base["key_safe"]}
            return call(broker, "POST", "/v1/vms/register", identity, json=named(body))
        if what == "place VM":
            return call(broker, "PUT", f"/v1/vms/{base['vm_uuid']}/host", identity, json={"host": host_name})
        if what == "list all VMs":
            return call(broker, "GET", "/v1/vms", identity)
        if what == "obtain a DEK":
            return call(broker, "GET", f"/v1/vms/{base['vm_uuid']}/dek", identity)
        if what == "remove VM":
            return call(broker, "DELETE", f"/v1/vms/{new_vm(broker, owner)['vm_uuid']}", identity)
        if what in ("release VM", "transfer VM"):
            verb = what.split()[0]
            vm_uuid = new_vm(broker, owner)["vm_uuid"]
            return call(broker, "POST", f"/v1/vms/{vm_uuid}/{verb}", identity, json={"to": "vc-roles-2"})
        if what == "read audit trail":
            return call(broker, "GET", "/v1/audit?limit=1", identity)
        if what == "manage trust":
            return call(broker, "GET", "/v1/instances", identity)
        if what == "host: .nvram generation":
            return call(broker, "GET", f"/v1/vms/{base['vm_uuid']}/nvram-generation", identity)
        raise AssertionError(what)

    refusals = []
    outcome = {}
    for kind, (actor, identity) in callers.items():
        for what in ACTIONS:
            answer = attempt(kind, identity, what)
            outcome[kind, what] = answer.status_code
            if what in ALLOWED[kind]:
                assert 200 <= answer.status_code < 300, (kind, what, answer.text)
            else:
                assert answer.status_code == 403, (kind, what, answer.text)
                assert "Traceback" not in answer.text and "\n" not in answer.json()["error"]
                refusals.append((actor, ACTIONS[what]))
            if what == "obtain a DEK" and answer.status_code == 200:
                assert len(base64.b64decode(answer.json()["dek_b64"])) == 64
    assert len(refusals) == sum(len(ACTIONS) - len(allowed) for allowed in ALLOWED.values())

    records = trail(broker, users["auditor"])
    refused = {(r["actor"], r["action"]) for r in records if not r["allowed"]}
    missing = [pair for pair in refusals if pair not in refused]
    assert missing == [], f"refusals not in the audit trail: {missing}"
    # The no-cryptography administrator's DEK attempt is refused and recorded, never answered.
    assert ("user:ops", "dek.read") in refused
    # A user's registrations name the user and the instance they were made for.
    made = [r for r in records if r["actor"] == "user:ops" and r["allowed"] and r["action"] == "host.register"]
    assert made and "for instance vc-roles" in made[0]["reason"]


def test_no_crypto_administrator_gets_no_key_material_anywhere(broker, users, workdir):
    """The no-cryptography administrator's certificate opens neither the DEK route nor the hosts' gateway,
    and a user must name the instance it registers for (a missing or untrusted one is refused)."""
    owner = enroll(broker, "vc-nocrypto-keys", workdir)
    vm = new_vm(broker, owner)
    assert_error(call(broker, "GET", f"/v1/vms/{vm['vm_uuid']}/dek", users["ops"]), 403, "no_crypto_administrator")
    # The gateway serves registered host certificates only.
    assert refused_unwrap(broker, users["ops"], vm) in ("ITEM_NOT_FOUND", "PERMISSION_DENIED", "NONE")
    _, csr = new_key_and_csr(workdir, "ops-host")
    assert_error(
        call(broker, "POST", "/v1/hosts", users["ops"], json={"name": "esx-ops", "csr_pem": csr}), 400, "'instance'"
    )
    answer = call(
        broker, "POST", "/v1/hosts", users["ops"], json={"name": "esx-ops", "csr_pem": csr, "instance": "vc-none"}
    )
    assert_error(answer, 403, "not trusted")
    # An instance acts for itself only.
    other = call(broker, "POST", "/v1/hosts", owner, json={"name": "esx-ops", "csr_pem": csr, "instance": "vc-roles"})
    assert_error(other, 403, "for itself only")


# --- Cold migration over the API ------------------------------------------------------------------------------


def test_cold_migration_between_trusted_instances(broker, users, workdir):
    """B releases its VM to C; C registers it and places it on its host. The bad cases: a release to an unknown
    or a revoked instance, a replayed release (before and after C took it), a third instance D that was not
    named, the old instance's host, wrong identities (a host, a no-cryptography administrator, another
    instance): each a clear 4xx that changes nothing, recorded in the trail. The .nvram generation stays with
    the VM through the migration, an administrator's transfer back and a remove + re-register."""
    b = enroll(broker, "vc-b", workdir)
    c = enroll(broker, "vc-c", workdir)
    d = enroll(broker, "vc-d", workdir)
    enroll(broker, "vc-gone", workdir)
    broker.admin("revoke", "vc-gone")
    esx_b, host_b = new_host(broker, b, workdir, "esx-b")
    esx_c, host_c = new_host(broker, c, workdir, "esx-c")
    vm = new_vm(broker, b, esx_b)
    vm_uuid = vm["vm_uuid"]
    dek = unwrap(broker, host_b, vm)
    report_generation(broker, host_b, vm_uuid, 5)
    release = f"/v1/vms/{vm_uuid}/release"
    before = vm_of(broker, b, vm_uuid)
    assert before["host"] == esx_b and before["released_to"] is None and before["nvram_generation"] == 5

    # Bad targets: nothing changes.
    assert_error(call(broker, "POST", release, b, json={"to": "vc-nobody"}), 404, "no instance named vc-nobody")
    assert_error(call(broker, "POST", release, b, json={"to": "vc-gone"}), 409, "revoked, not trusted")
    assert_error(call(broker, "POST", release, b, json={"to": "not a name"}), 400, "instance name")
    assert_error(call(broker, "POST", release, b, json={"to": "vc-b"}), 400, "already")
    assert_error(call(broker, "POST", release, b, json={"to": "vc-c", "host": "x"}), 400, "unknown field")
    assert vm_of(broker, b, vm_uuid) == before
    assert unwrap(broker, host_b, vm) == dek
    # Wrong identities: a host, a no-cryptography administrator, another instance (which may not see the VM).
    assert_error(call(broker, "POST", release, host_b, json={"to": "vc-c"}), 403, "host certificate")
    assert_error(call(broker, "POST", release, users["ops"], json={"to": "vc-c"}), 403, "not allowed")
    assert_error(call(broker, "POST", release, d, json={"to": "vc-d"}), 404, f"no VM {vm_uuid}")
    assert_error(call(broker, "POST", f"/v1/vms/{vm_uuid}/transfer", b, json={"to": "vc-c"}), 403, "not allowed")
    assert vm_of(broker, b, vm_uuid) == before

    released = call(broker, "POST", release, b, json={"to": "vc-c"})
    assert released.status_code == 200, released.text
    assert released.json()["released_to"] == "vc-c" and released.json()["host"] is None
    # From the release on, the old instance's host is refused, and B cannot place it back.
    assert refused_unwrap(broker, host_b, vm) == "PERMISSION_DENIED"
    assert_error(
        call(broker, "PUT", f"/v1/vms/{vm_uuid}/host", b, json={"host": esx_b}), 409, "released to instance vc-c"
    )
    assert_error(call(broker, "POST", release, b, json={"to": "vc-c"}), 409, "already released")  # replayed

    register = {"vm_uuid": vm_uuid, "name": vm["name"], "key_safe": vm["key_safe"]}
    # A third instance not named in the release.
    assert_error(call(broker, "POST", "/v1/vms/register", d, json=register), 409, "not to vc-d")
    taken = call(broker, "POST", "/v1/vms/register", c, json=register)
    assert taken.status_code == 200, taken.text
    assert taken.json()["instance"] == "vc-c" and taken.json()["nvram_generation"] == 5
    assert taken.json()["released_to"] is None and taken.json()["host"] is None
    placed = call(broker, "PUT", f"/v1/vms/{vm_uuid}/host", c, json={"host": esx_c})
    assert placed.status_code == 200, placed.text
    assert unwrap(broker, host_c, vm) == dek
    # The old instance's host: refused at the gateway and at the generation endpoint (it may not know the VM).
    assert refused_unwrap(broker, host_b, vm) == "ITEM_NOT_FOUND"
    assert_error(call(broker, "GET", f"/v1/vms/{vm_uuid}/nvram-generation", host_b), 404, "no VM")
    generation = call(broker, "GET", f"/v1/vms/{vm_uuid}/nvram-generation", host_c)
    assert generation.json()["generation"] == 5
    # A stale report (an old .nvram written back) is still a rollback for the new instance.
    assert_error(
        call(broker, "PUT", f"/v1/vms/{vm_uuid}/nvram-generation", host_c, json={"generation": 4}), 409, "rollback"
    )
    # The release replayed after the move: B no longer has the VM.
    assert_error(call(broker, "POST", release, b, json={"to": "vc-c"}), 404, "no VM")
    assert vm_of(broker, b, vm_uuid) is None

    # An administrator transfers it back to B; B registers it: same generation.
    report_generation(broker, host_c, vm_uuid, 7)
    transfer = call(broker, "POST", f"/v1/vms/{vm_uuid}/transfer", users["root-admin"], json={"to": "vc-b"})
    assert transfer.status_code == 200 and transfer.json()["released_to"] == "vc-b", transfer.text
    assert refused_unwrap(broker, host_c, vm) == "PERMISSION_DENIED"
    back = call(broker, "POST", "/v1/vms/register", b, json=register)
    assert back.status_code == 200 and back.json()["nvram_generation"] == 7, back.text

    # Remove + re-register (the old way out) keeps the generation too, and no new vTPM takes the UUID.
    assert call(broker, "DELETE", f"/v1/vms/{vm_uuid}", users["root-admin"]).status_code == 204
    assert vm_of(broker, b, vm_uuid) is None
    fresh = call(broker, "POST", "/v1/vms", b, json={"vm_uuid": vm_uuid, "name": "reborn"})
    assert_error(fresh, 409, "generation 7")
    again = call(broker, "POST", "/v1/vms/register", c, json=register)
    assert again.status_code == 200 and again.json()["nvram_generation"] == 7, again.text

    # The VM's history, from its creation through both moves, is one trail, intact; each refusal is in it.
    records = [r for r in trail(broker, users["auditor"]) if r["target"] == vm_uuid]
    seen = [(r["actor"], r["action"], r["allowed"]) for r in records]
    for expected in [
        ("instance:vc-b", "vm.create", True),
        ("instance:vc-b", "vm.release", False),  # unknown, revoked, to itself, replayed
        ("host:esx-b", "vm.release", False),
        ("user:ops", "vm.release", False),
        ("instance:vc-d", "vm.release", False),
        ("instance:vc-b", "vm.transfer", False),
        ("instance:vc-b", "vm.release", True),
        ("instance:vc-b", "vm.place", False),
        ("instance:vc-d", "vm.register", False),
        ("instance:vc-c", "vm.register", True),
        ("user:root-admin", "vm.transfer", True),
        ("instance:vc-b", "vm.register", True),
        ("user:root-admin", "vm.remove", True),
        ("instance:vc-b", "vm.create", False),
        ("instance:vc-c", "vm.register", True),
    ]:
        assert expected in seen, expected
    reasons = [r["reason"] for r in records if r["action"] == "vm.release" and not r["allowed"]]
    assert any("vc-nobody" in x for x in reasons) and any("vc-gone" in x for x in reasons)
    assert any("already released" in x for x in reasons)
    assert any("migrated from vc-b" in r["reason"] for r in records if r["action"] == "vm.register")
    assert any("generation 7 kept" in r["reason"] for r in records if r["action"] == "vm.remove")


def test_host_remove_voids_the_host(broker, workdir):
    """DELETE /v1/hosts/{name}: the host's certificate no longer unwraps, its VMs are unplaced; another
    instance's host is not found (and the refusal is recorded)."""
    owner = enroll(broker, "vc-hosts", workdir)
    other = enroll(broker, "vc-hosts-2", workdir)
    name, host = new_host(broker, owner, workdir)
    vm = new_vm(broker, owner, name)
    assert len(unwrap(broker, host, vm)) == 64
    assert_error(call(broker, "DELETE", f"/v1/hosts/{name}", other), 404, f"no host named {name}")
    assert call(broker, "DELETE", f"/v1/hosts/{name}", owner).status_code == 204
    assert vm_of(broker, owner, vm["vm_uuid"])["host"] is None
    assert refused_unwrap(broker, host, vm) in ("ITEM_NOT_FOUND", "PERMISSION_DENIED", "NONE")
    assert_error(call(broker, "DELETE", f"/v1/hosts/{name}", owner), 404, "no host")


# --- Cold migration with the operator's commands, and a stale .nvram at power-on -----------------------------

SWTPM_TOOLS = ("swtpm", "swtpm_setup")


def _missing_tools() -> list[str]:
    import shutil

    return [tool for tool in SWTPM_TOOLS if shutil.which(tool) is None]


def _mgmt(state: Path, *args: str | Path, check: bool = True):
    from broker.drill.processes import run

    return run("vtpm-mgmt", "--state-dir", state, *args, check=check)


def _host(state: Path, *args: str | Path, check: bool = True):
    from broker.drill.processes import run

    return run("vtpm-host", "--state-dir", state, *args, check=check)


def _one_line_failure(result, prog: str) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    err = result.stderr
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _instance(broker, base: Path, name: str) -> Path:
    """`vtpm-mgmt init`, `enroll` with a token, the security administrator's approval, `enroll` again."""
    state = base / name
    _mgmt(state, "init", "--name", name, "--broker", broker.url, "--ca", broker.trust_ca, "--provider", PROVIDER)
    _mgmt(state, "enroll", f"--token={broker.token(name)}")
    broker.admin("approve", name)
    assert f"{name} is enrolled" in _mgmt(state, "enroll", "--wait", "30").stdout
    return state


def _vtpm_host(broker, instance: Path, base: Path, name: str) -> Path:
    """`vtpm-host init`, `vtpm-mgmt host add` with the CSR it wrote, `vtpm-host install-cert`."""
    state = base / f"host-{name}"
    init = _host(
        state, "init", "--name", name, "--gateway", broker.gateway, "--api", broker.url, "--ca", broker.trust_ca
    )
    cert = base / f"{name}.pem"
    _mgmt(instance, "host", "add", "--name", name, "--csr", init.stdout.strip(), "--out", cert)
    _host(state, "install-cert", "--cert", cert)
    return state


@pytest.mark.skipif(bool(_missing_tools()), reason="needs Debian's swtpm and swtpm-tools")
def test_cold_migration_with_the_cli_and_a_stale_nvram_left_behind(broker, tmp_path):
    """The operator's commands, real hosts (vtpm-host) and real swtpm: B's VM runs on esx-mb and leaves an old
    copy of its .nvram behind; `vtpm-mgmt vm release web --to C` (after a refused release to an unknown
    instance), C's `vm register --vm web`, and the VM powers on under C's host with its state. B's host is
    refused; the stale copy is found by C's `vm check` and refused at power-on. An administrator's
    `vtpm-broker admin transfer` brings it back to B with the same generation; a plain instance may not
    `vm remove`; `host remove` voids a host."""
    b = _instance(broker, tmp_path, "vc-mig-b")
    c = _instance(broker, tmp_path, "vc-mig-c")
    esx_b = _vtpm_host(broker, b, tmp_path, "esx-mb")
    esx_c = _vtpm_host(broker, c, tmp_path, "esx-mc")
    datastore = tmp_path / "datastore"
    datastore.mkdir()
    _mgmt(b, "vm", "create", "--name", "web", "--name", "db", "--datastore", datastore, "--vtpm", "--host", "esx-mb")
    web = datastore / "web" / "web.vmx"
    nvram_path = web.with_suffix(".nvram")
    try:
        _host(esx_b, "power-on", web)  # manufactures the vTPM: generation 1
        _host(esx_b, "power-off", web)  # generation 2
        stale = nvram_path.read_bytes()
        _host(esx_b, "power-on", web)
        _host(esx_b, "power-off", web)  # generation 3
        newest = nvram_path.read_bytes()

        unknown = _one_line_failure(_mgmt(b, "vm", "release", "web", "--to", "vc-nobody", check=False), "vtpm-mgmt")
        assert "no instance named vc-nobody" in unknown
        out = _mgmt(b, "vm", "release", "web", "--to", "vc-mig-c").stdout
        assert "released to vc-mig-c" in out and "vm register" in out
        replay = _one_line_failure(_mgmt(b, "vm", "release", "web", "--to", "vc-mig-c", check=False), "vtpm-mgmt")
        assert "already released" in replay
        # B's host may no longer unwrap it.
        assert "refused to unwrap" in _one_line_failure(_host(esx_b, "power-on", web, check=False), "vtpm-host")

        done = _mgmt(c, "vm", "register", "--datastore", datastore, "--vm", "web", "--host", "esx-mc").stdout
        assert "1 of 1 VMs registered to vc-mig-c" in done
        assert [v["name"] for v in json.loads(_mgmt(c, "vm", "list", "--json").stdout)] == ["web"]
        assert [v["name"] for v in json.loads(_mgmt(b, "vm", "list", "--json").stdout)] == ["db"]

        # The stale copy left behind: found by `vm check` and refused at power-on.
        nvram_path.write_bytes(stale)
        check = _mgmt(c, "vm", "check", "--datastore", datastore, "--json", check=False)
        found = {r["name"]: r for r in json.loads(check.stdout)["results"]}
        assert found["web"]["generation"] == 2 and found["web"]["broker_generation"] == 3
        assert any("rollback" in p for p in found["web"]["problems"])
        refused = _one_line_failure(_host(esx_c, "power-on", web, check=False), "vtpm-host")
        assert "rollback" in refused and "generation 3" in refused

        nvram_path.write_bytes(newest)
        check = _mgmt(c, "vm", "check", "--datastore", datastore, "--json", check=False)
        assert {r["name"]: r["problems"] for r in json.loads(check.stdout)["results"]}["web"] == []
        _host(esx_c, "power-on", web)
        _host(esx_c, "power-off", web)  # generation 4, under C
        assert "refused to unwrap" in _one_line_failure(_host(esx_b, "power-on", web, check=False), "vtpm-host")

        # A plain instance may not remove a VM; an administrator moves it back to B: same generation.
        removal = _one_line_failure(_mgmt(c, "vm", "remove", "web", check=False), "vtpm-mgmt")
        assert "administrators" in removal
        moved = broker.admin("transfer", "web", "--to", "vc-mig-b").stdout
        assert "released to vc-mig-b" in moved
        _mgmt(b, "vm", "register", "--datastore", datastore, "--vm", "web", "--host", "esx-mb")
        nvram_path.write_bytes(stale)
        assert "rollback" in _one_line_failure(_host(esx_b, "power-on", web, check=False), "vtpm-host")
        nvram_path.write_bytes(newest)  # generation 3, older than the 4 that C sealed
        assert "rollback" in _one_line_failure(_host(esx_b, "power-on", web, check=False), "vtpm-host")

        # host remove: the host's certificate is void.
        assert "esx-mc removed" in _mgmt(c, "host", "remove", "esx-mc").stdout
        gone = _one_line_failure(_mgmt(c, "host", "remove", "esx-mc", check=False), "vtpm-mgmt")
        assert "no host esx-mc" in gone
    finally:
        for state in (esx_b, esx_c):
            _host(state, "power-off", web, check=False)

    audit = json.loads(broker.admin("audit", "--json").stdout)["records"]
    web_uuid = [r for r in audit if r["action"] == "vm.transfer" and r["allowed"]][-1]["target"]
    actions = [(r["actor"], r["action"], r["allowed"]) for r in audit if r["target"] == web_uuid]
    assert ("instance:vc-mig-b", "vm.release", False) in actions
    assert ("instance:vc-mig-b", "vm.release", True) in actions
    assert ("instance:vc-mig-c", "vm.register", True) in actions
    assert ("instance:vc-mig-c", "vm.remove", False) in actions
    assert ("local-security-admin", "vm.transfer", True) in actions
