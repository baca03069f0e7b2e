"""Key rotation (issue 13 item 4) against the real thing: a kms-server, a vtpm-broker, a management instance
driven by `vtpm-mgmt`, a host driven by `vtpm-host` with real swtpm, and tpm2-tools as the guest.

A shallow rekey wraps the same DEK under a new KEK (the .nvram is untouched, the old KEK is deactivated in the
KMS); a deep rekey gives the VM a new DEK and the host re-seals the .nvram under it at the next power-on. A rekey
interrupted after any step leaves a VM that powers on with its NV secret, and running it again completes it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import broker_harness
import pytest
from broker_harness import call, mgmt

from broker import nvram, vmx
from broker.drill.processes import run
from broker.host.agent import Agent
from broker.keysafe import parse_key_safe
from broker.mgmt import rekey
from broker.mgmt.state import StateDir

TOOLS = ("swtpm", "swtpm_setup", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"needs Debian's swtpm, swtpm-tools and tpm2-tools; missing: {', '.join(MISSING)}"
)

PROVIDER = "kms-rekey"
NV_SECRET = "0x1500031"


# The shared module-scoped fixtures (tests/broker_harness.py); pytest finds them by these names.
kms = broker_harness.kms
broker = broker_harness.broker
kms_admin = broker_harness.kms_admin


class Crash(BaseException):
    """A kill between two steps: nothing the code under test catches."""


def instance(broker, directory: Path, name: str) -> Path:
    """A management instance set up with `vtpm-mgmt init` and `enroll`, approved by the security admin."""
    state = directory / name
    mgmt(state, "init", "--name", name, "--broker", broker.url, "--ca", broker.trust_ca, "--provider", PROVIDER)
    mgmt(state, "enroll", f"--token={broker.token(name)}")
    broker.admin("approve", name)
    assert "is enrolled" in mgmt(state, "enroll").stdout
    return state


class Host:
    def __init__(self, state_dir: Path):
        self.state_dir = state_dir

    def run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
        return run("vtpm-host", "--state-dir", self.state_dir, *args, check=check)

    def power_on(self, vmx_path: Path) -> dict:
        return json.loads(self.run("power-on", vmx_path, "--json").stdout)

    def power_off(self, vmx_path: Path) -> dict:
        return json.loads(self.run("power-off", vmx_path, "--json").stdout)

    def agent(self) -> Agent:
        return Agent(self.state_dir)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, broker):
    base = tmp_path_factory.mktemp("rekey")
    a = instance(broker, base, "vc-a")
    host = Host(base / "esx-1")
    csr = Path(
        host.run(
            "init", "--name", "esx-1", "--gateway", broker.gateway, "--api", broker.url, "--ca", broker.trust_ca
        ).stdout.strip()
    )
    mgmt(a, "host", "add", "--name", "esx-1", "--csr", csr, "--out", base / "esx-1.pem")
    host.run("install-cert", "--cert", base / "esx-1.pem")
    datastore = base / "datastore"
    datastore.mkdir()
    yield {"a": a, "host": host, "datastore": datastore, "base": base}
    for path in (host.state_dir / "running").glob("*.json"):
        record = json.loads(path.read_text())
        subprocess.run(["kill", str(record["pid"])], check=False)


def create(setup, name: str, state: Path | None = None, host: str | None = "esx-1") -> Path:
    args = ["vm", "create", "--name", name, "--datastore", setup["datastore"], "--vtpm"]
    if host:
        args += ["--host", host]
    mgmt(state or setup["a"], *args)
    return setup["datastore"] / name / f"{name}.vmx"


def tpm2(tool: str, tcti: str, *args: str) -> bytes:
    done = subprocess.run([tool, "-T", tcti, *args], capture_output=True, timeout=30)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def vm_with_secret(setup, name: str, tmp_path: Path) -> tuple[Path, bytes]:
    """A VM whose vTPM was manufactured and holds an NV secret, powered off."""
    path = create(setup, name)
    tcti = setup["host"].power_on(path)["tcti"]
    secret = os.urandom(32)
    (tmp_path / f"{name}.secret").write_bytes(secret)
    tpm2("tpm2_nvdefine", tcti, NV_SECRET, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
    tpm2("tpm2_nvwrite", tcti, NV_SECRET, "-C", "o", "-i", str(tmp_path / f"{name}.secret"))
    setup["host"].power_off(path)
    return path, secret


def powers_on_with(setup, path: Path, secret: bytes) -> dict:
    """Power on, read the NV secret back, power off."""
    result = setup["host"].power_on(path)
    try:
        assert tpm2("tpm2_nvread", result["tcti"], NV_SECRET, "-C", "o") == secret
    finally:
        setup["host"].power_off(path)
    return result


def unwrap(setup, path: Path) -> bytes:
    """The DEK of the .vmx's key safe in use, through the broker's gateway with the host's certificate."""
    client = setup["host"].agent().broker
    try:
        config = vmx.read(path)
        return client.unwrap(parse_key_safe(config.key_safe), config.vm_uuid, config.name)
    finally:
        client.close()


def kek(path: Path) -> str:
    return parse_key_safe(vmx.read(path).key_safe).kms_key_id


def state_of(kms_admin, uid: str) -> str:
    return kms_admin.get_attributes(uid, ["State"])["State"][0].name


def settled(path: Path) -> None:
    """No rotation is left half done in the .vmx."""
    config = vmx.read(path)
    assert config.pending_key_safe is None and config.previous_key_safe is None, config.entries
    assert vmx.PENDING_REKEY not in config.entries


def trail(broker, vm_uuid: str) -> list[dict]:
    records = json.loads(broker.admin("audit", "--json").stdout)["records"]
    return [r for r in records if r["target"] == vm_uuid]


def test_shallow_rekey_keeps_the_nv_secret_and_deactivates_the_old_kek(setup, broker, kms_admin, tmp_path):
    """`vm rekey VM`: a new KEK in the KMS (tagged with the VM like the first), the same DEK under it, the .nvram
    byte for byte untouched, the .vmx's key safe switched with nothing left pending, the old KEK Deactivated
    (Revoke, cessation of operation) and the new one Active; the VM powers on with its NV secret; a stale copy
    of the old .vmx is refused by the gateway and by register; the trail shows begin, switch and retirement."""
    path, secret = vm_with_secret(setup, "shallow-1", tmp_path)
    old, vm_uuid = kek(path), vmx.read(path).vm_uuid
    stale = tmp_path / "stale.vmx"
    shutil.copy(path, stale)
    nvram_before = (path.parent / "shallow-1.nvram").read_bytes()

    out = mgmt(setup["a"], "vm", "rekey", "shallow-1").stdout
    new = kek(path)
    assert new != old and f"shallow rekey done: KEK {new}, old KEK {old} deactivated" in out
    settled(path)
    assert (path.parent / "shallow-1.nvram").read_bytes() == nvram_before
    assert state_of(kms_admin, old) == "DEACTIVATED" and state_of(kms_admin, new) == "ACTIVE"
    attributes = kms_admin.get_attributes(new, ["x-Identifier", "x-Name", "x-Component"])
    assert attributes["x-Identifier"] == [vm_uuid] and attributes["x-Name"] == ["shallow-1"]
    assert attributes["x-Component"] == ["Virtual Machine"]
    listed = {v["vm_uuid"]: v for v in json.loads(mgmt(setup["a"], "vm", "list", "--json").stdout)}
    assert listed[vm_uuid]["kms_key_id"] == new

    # The .nvram's header still names the old KEK (same DEK): vm check knows it from the .vmx.
    assert vmx.read(path).get(vmx.NVRAM_KEY_REF) == f"{PROVIDER}/{old}"
    checked = mgmt(setup["a"], "vm", "check", "--datastore", path.parent.parent, "--json", check=False)
    [report] = [r for r in json.loads(checked.stdout)["results"] if r["vm_uuid"] == vm_uuid]
    assert report["problems"] == [], report

    powers_on_with(setup, path, secret)

    # The old key safe opens nothing any more.
    stale_vmx = stale.parent / "stale" / "shallow-1.vmx"
    stale_vmx.parent.mkdir()
    shutil.copy(stale, stale_vmx)
    shutil.copy(path.parent / "shallow-1.nvram", stale_vmx.parent / "shallow-1.nvram")
    refused = setup["host"].run("power-on", stale_vmx, check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    identity = (str(setup["a"] / "instance.pem"), str(setup["a"] / "instance.key"))
    answer = call(
        broker,
        "POST",
        "/v1/vms/register",
        identity,
        json={"vm_uuid": vm_uuid, "name": "shallow-1", "key_safe": vmx.read(stale).key_safe},
    )
    assert answer.status_code == 422 and "rotated" in answer.json()["error"], answer.text

    actions = [(r["action"], r["allowed"]) for r in trail(broker, vm_uuid)]
    assert ("vm.rekey", True) in actions and ("vm.rekey.retire", True) in actions
    reasons = " | ".join(r["reason"] for r in trail(broker, vm_uuid) if r["action"].startswith("vm.rekey"))
    assert "shallow rekey begun" in reasons and "switched" in reasons and f"old KEK {old} deactivated" in reasons


def test_deep_rekey_reseals_the_nvram_under_a_new_dek_at_power_on(setup, broker, kms_admin, tmp_path):
    """`vm rekey VM --deep`: the .vmx gets a pending key safe beside the one in use and nothing else changes
    until the next power-on, which unseals with the old DEK, re-seals the .nvram under the new one (next
    generation, header naming the new KEK), switches the .vmx and has the broker retire the old KEK. The NV
    secret is the same; the old DEK no longer opens the .nvram; the new one does."""
    path, secret = vm_with_secret(setup, "deep-1", tmp_path)
    nvram_path = path.parent / "deep-1.nvram"
    old, vm_uuid = kek(path), vmx.read(path).vm_uuid
    old_dek = unwrap(setup, path)
    before = nvram.read_header(nvram_path.read_bytes())

    out = mgmt(setup["a"], "vm", "rekey", "deep-1", "--deep").stdout
    assert "deep rekey pending" in out
    config = vmx.read(path)
    assert config.pending_rekey == "deep" and kek(path) == old
    new = parse_key_safe(config.pending_key_safe).kms_key_id
    assert state_of(kms_admin, old) == "ACTIVE" and state_of(kms_admin, new) == "ACTIVE"
    assert nvram.read_header(nvram_path.read_bytes()) == before
    listed = {v["vm_uuid"]: v for v in json.loads(mgmt(setup["a"], "vm", "list", "--json").stdout)}
    assert listed[vm_uuid]["rekey"] == {"kind": "deep", "state": "pending"}

    result = powers_on_with(setup, path, secret)
    assert result["generation"] == before.generation + 1
    settled(path)
    assert kek(path) == new
    header = nvram.read_header(nvram_path.read_bytes())
    assert header.key_safe_ref == f"{PROVIDER}/{new}" and header.generation == before.generation + 2
    with pytest.raises(nvram.NvramCorrupt):
        nvram.unseal(nvram_path.read_bytes(), old_dek)
    new_dek = unwrap(setup, path)
    assert new_dek != old_dek
    assert nvram.unseal(nvram_path.read_bytes(), new_dek, expected_vm_uuid=vm_uuid).header.generation > 0
    assert state_of(kms_admin, old) == "DEACTIVATED" and state_of(kms_admin, new) == "ACTIVE"
    listed = {v["vm_uuid"]: v for v in json.loads(mgmt(setup["a"], "vm", "list", "--json").stdout)}
    assert listed[vm_uuid]["rekey"] is None and listed[vm_uuid]["kms_key_id"] == new
    actions = [(r["action"], r["actor"]) for r in trail(broker, vm_uuid) if r["action"].startswith("vm.rekey")]
    assert ("vm.rekey.retire", "host:esx-1") in actions


SHALLOW_STEPS = ("begin", "write_beside", "switch", "commit", "drop_previous")


@pytest.mark.parametrize("step", SHALLOW_STEPS)
def test_shallow_rekey_interrupted_after_each_step_powers_on_and_completes_when_run_again(
    setup, broker, kms_admin, tmp_path, monkeypatch, step
):
    """The management instance is killed right after `step` of a shallow rekey. The VM still powers on with
    its NV secret (whatever the .vmx and the broker hold then), and `vm rekey` run again completes the rotation:
    nothing pending in the .vmx, the KEK begun before the crash is the one in use (no second KEK), the old KEK
    deactivated."""
    name = f"cut-{step.replace('_', '-')}"
    path, secret = vm_with_secret(setup, name, tmp_path)
    old = kek(path)
    began: list[str] = []
    original = getattr(rekey, step)

    def crash_after(*args, **kwargs):
        result = original(*args, **kwargs)
        if step == "begin":
            began.append(parse_key_safe(result["key_safe"]).kms_key_id)
        raise Crash(step)

    if step != "begin":
        original_begin = rekey.begin

        def recording_begin(*args, **kwargs):
            result = original_begin(*args, **kwargs)
            began.append(parse_key_safe(result["key_safe"]).kms_key_id)
            return result

        monkeypatch.setattr(rekey, "begin", recording_begin)
    monkeypatch.setattr(rekey, step, crash_after)
    client = StateDir(setup["a"]).client()
    with pytest.raises(Crash):
        rekey.rekey_vm(client, path, deep=False)
    client.close()
    monkeypatch.undo()

    powers_on_with(setup, path, secret)
    config = vmx.read(path)
    finished_by_power_on = config.previous_key_safe is None and config.pending_key_safe is None and kek(path) != old
    if finished_by_power_on:
        # Switched before the crash: the power-on finished it (the host has the broker retire the old KEK).
        assert step in ("switch", "commit", "drop_previous") and kek(path) == began[0]
        assert state_of(kms_admin, old) == "DEACTIVATED"

    out = mgmt(setup["a"], "vm", "rekey", name).stdout
    settled(path)
    if finished_by_power_on:  # Nothing was left to finish: this run is a rotation of its own.
        assert "shallow rekey done" in out and kek(path) != began[0]
        assert state_of(kms_admin, began[0]) == "DEACTIVATED"
    else:
        assert kek(path) == began[0], out
    assert state_of(kms_admin, old) == "DEACTIVATED" and state_of(kms_admin, kek(path)) == "ACTIVE"
    powers_on_with(setup, path, secret)


DEEP_STEPS = ("_reseal", "_switch_vmx", "_commit_rekey", "_drop_previous")


@pytest.mark.parametrize("step", DEEP_STEPS)
def test_deep_rekey_interrupted_at_power_on_after_each_step_completes_at_the_next(
    setup, kms_admin, tmp_path, monkeypatch, step
):
    """The host is killed right after `step` of a deep rekey's power-on (re-seal under the new DEK, .vmx switch,
    the broker's retirement of the old KEK, the old key safe's removal). The next power-on brings the NV secret
    back and finishes the rotation: the .vmx settled on the new key safe, the .nvram under the new KEK, the old
    KEK deactivated."""
    name = f"deep-cut{step.replace('_', '-')}"
    path, secret = vm_with_secret(setup, name, tmp_path)
    old = kek(path)
    mgmt(setup["a"], "vm", "rekey", name, "--deep")
    new = parse_key_safe(vmx.read(path).pending_key_safe).kms_key_id
    original = getattr(Agent, step)

    def crash_after(self, *args, **kwargs):
        original(self, *args, **kwargs)
        raise Crash(step)

    monkeypatch.setattr(Agent, step, crash_after)
    with pytest.raises(Crash):
        setup["host"].agent().power_on(path)
    monkeypatch.undo()

    powers_on_with(setup, path, secret)
    settled(path)
    assert kek(path) == new
    assert nvram.read_header((path.parent / f"{name}.nvram").read_bytes()).key_safe_ref == f"{PROVIDER}/{new}"
    assert state_of(kms_admin, old) == "DEACTIVATED" and state_of(kms_admin, new) == "ACTIVE"


def test_deep_rekey_interrupted_before_power_on_is_resumed_or_aborted(setup, kms_admin, tmp_path, monkeypatch):
    """A deep rekey whose instance was killed after the broker made the new key (the .vmx untouched) resumes
    with the same new KEK when run again; `--abort` then rolls it back: the .vmx as before, the unused KEK
    deactivated, the VM on its old key with its NV secret."""
    path, secret = vm_with_secret(setup, "deep-abort", tmp_path)
    old = kek(path)
    original = rekey.begin
    began = []

    def crash_after(*args, **kwargs):
        began.append(original(*args, **kwargs))
        raise Crash("begin")

    monkeypatch.setattr(rekey, "begin", crash_after)
    client = StateDir(setup["a"]).client()
    with pytest.raises(Crash):
        rekey.rekey_vm(client, path, deep=True)
    client.close()
    monkeypatch.undo()
    settled(path)
    powers_on_with(setup, path, secret)

    mgmt(setup["a"], "vm", "rekey", "deep-abort", "--deep")
    assert vmx.read(path).pending_key_safe == began[0]["key_safe"]
    shallow = mgmt(setup["a"], "vm", "rekey", "deep-abort", check=False)
    assert shallow.returncode == 2 and "deep rekey is pending" in shallow.stderr
    out = mgmt(setup["a"], "vm", "rekey", "deep-abort", "--abort").stdout
    assert "rolled back" in out
    settled(path)
    assert kek(path) == old and state_of(kms_admin, old) == "ACTIVE"
    assert state_of(kms_admin, began[0]["kms_key_id"]) == "DEACTIVATED"
    powers_on_with(setup, path, secret)


def test_rekey_of_a_vm_the_instance_does_not_own_is_refused(setup, broker, kms_admin):
    """Instance B may not rotate A's VM: the API answers 404 (as for a VM that does not exist) and the trail
    records the refusal; `vtpm-mgmt vm rekey` of B names the problem in one line; the KEK is unchanged."""
    path = create(setup, "owned-by-a")
    vm_uuid, old = vmx.read(path).vm_uuid, kek(path)
    b = instance(broker, setup["base"], "vc-b")
    identity = (str(b / "instance.pem"), str(b / "instance.key"))
    for route, body in (
        ("rekey", {"kind": "shallow", "key_safe": vmx.read(path).key_safe}),
        ("rekey/commit", {"key_safe": vmx.read(path).key_safe}),
        ("rekey/abort", {}),
    ):
        answer = call(broker, "POST", f"/v1/vms/{vm_uuid}/{route}", identity, json=body)
        assert answer.status_code == 404 and answer.json() == {"error": f"no VM {vm_uuid}"}, answer.text
    refused = mgmt(b, "vm", "rekey", vm_uuid, "--datastore", setup["datastore"], check=False)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "has no VM" in refused.stderr
    assert kek(path) == old and state_of(kms_admin, old) == "ACTIVE"
    settled(path)
    refusals = [r for r in trail(broker, vm_uuid) if r["action"] == "vm.rekey" and not r["allowed"]]
    assert refusals and all(r["actor"] == "instance:vc-b" for r in refusals)


def test_bulk_rekey_of_a_datastore(setup, broker, kms_admin, tmp_path):
    """`vm rekey --all --datastore DS` rotates every VM of the instance found there with a progress bar (one
    line per VM in the report), skips the VMs of other instances on the same datastore, and leaves every .vmx
    settled with its old KEK deactivated."""
    datastore = tmp_path / "bulk"
    datastore.mkdir()
    bulk = dict(setup, datastore=datastore)
    paths = [create(bulk, f"bulk-{i}") for i in range(4)]
    before = {p: kek(p) for p in paths}
    b = setup["base"] / "vc-b"
    if not (b / "instance.pem").exists():
        b = instance(broker, setup["base"], "vc-b")
    other = create(bulk, "bulk-other", state=b, host=None)
    other_kek = kek(other)

    done = mgmt(setup["a"], "vm", "rekey", "--all", "--datastore", datastore, "--jobs", "2")
    assert "4 of 4 VMs" in done.stdout and "4 rekeyed" in done.stdout, done.stdout
    assert "1 VMs of other instances skipped" in done.stdout
    assert "shallow rekey" in done.stderr  # the progress bar's line
    for path in paths:
        settled(path)
        assert kek(path) != before[path]
        assert state_of(kms_admin, before[path]) == "DEACTIVATED" and state_of(kms_admin, kek(path)) == "ACTIVE"
    assert kek(other) == other_kek and state_of(kms_admin, other_kek) == "ACTIVE"


def test_rekey_of_a_running_vm_completes_at_its_power_off(setup, kms_admin, tmp_path):
    """A running VM: a shallow rekey completes at once (same DEK; the power-off seals under the new KEK's
    reference); a deep rekey then completes at the power-off, which seals under the new DEK directly, switches
    the .vmx and retires the old KEK. The NV secret survives both."""
    path, secret = vm_with_secret(setup, "running-1", tmp_path)
    nvram_path = path.parent / "running-1.nvram"
    first = kek(path)
    tcti = setup["host"].power_on(path)["tcti"]
    try:
        mgmt(setup["a"], "vm", "rekey", "running-1")
        second = kek(path)
        settled(path)
        assert state_of(kms_admin, first) == "DEACTIVATED"
        mgmt(setup["a"], "vm", "rekey", "running-1", "--deep")
        third = parse_key_safe(vmx.read(path).pending_key_safe).kms_key_id
        assert tpm2("tpm2_nvread", tcti, NV_SECRET, "-C", "o") == secret
    finally:
        off = setup["host"].power_off(path)
    settled(path)
    assert kek(path) == third and state_of(kms_admin, second) == "DEACTIVATED"
    header = nvram.read_header(nvram_path.read_bytes())
    assert header.key_safe_ref == f"{PROVIDER}/{third}" and header.generation == off["generation"]
    powers_on_with(setup, path, secret)
