"""The host agent (`vtpm-host`, broker/host/) with the real swtpm, swtpm_setup and tpm2-tools, and a fake
broker: DEKs and the generation record live in the test. EK certificates come from vtpm-ek-certtool in local
mode here; tests/integration/test_host_agent.py runs the same flows against a real broker.

Also the broker's side of rollback protection (`GET`/`PUT /v1/vms/{uuid}/nvram-generation`) through
`broker.api.Api.dispatch` on a real registry, and `SwtpmInstance.attach`."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import pytest
from broker_process import csr_pem
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker import nvram, vmx
from broker.ek_certtool import write_local_ca
from broker.host import agent as agent_module
from broker.host import cli as host_cli
from broker.host.agent import Agent
from broker.host.config import init_state_dir, install_certificate, load_config
from broker.host.errors import (
    AlreadyRunning,
    BrokerRefused,
    BrokerUnavailable,
    HostError,
    NotRunning,
    NvramRefused,
    RollbackRefused,
    SwtpmFailed,
)
from broker.host.swtpm import SwtpmInstance, manufacture, private_workdir, wipe
from broker.keysafe import KeySafe, format_key_safe
from broker.vtpm_ca import EkCa, verify_ek_certificate

TOOLS = ("swtpm", "swtpm_setup", "tpm2_nvdefine", "tpm2_nvwrite", "tpm2_nvread", "tpm2_readpublic")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
needs_swtpm = pytest.mark.skipif(
    bool(MISSING), reason=f"needs Debian's swtpm, swtpm-tools and tpm2-tools; missing: {', '.join(MISSING)}"
)

RSA_EK_CERT = 0x01C00002
ECC_EK_CERT = 0x01C00016
NV_SECRET = "0x1500020"


# --- Fakes and fixtures ----------------------------------------------------------------------------


class FakeBroker:
    """The broker as the agent sees it: DEKs by KMS key id, the generation record, refusals on demand."""

    def __init__(self) -> None:
        self.deks: dict[str, bytes] = {}
        self.generations: dict[str, int] = {}
        self.refuse: str | None = None
        self.unavailable_reports = False
        self.calls: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def unwrap(self, key_safe: KeySafe, vm_uuid: str, vm_name: str) -> bytes:
        self.calls.append(("unwrap", vm_uuid))
        if self.refuse:
            raise BrokerRefused(f"the broker refused to unwrap the DEK of VM {vm_name} ({vm_uuid}): {self.refuse}")
        return self.deks[key_safe.kms_key_id]

    def nvram_generation(self, vm_uuid: str) -> int:
        self.calls.append(("get", vm_uuid))
        return self.generations.get(vm_uuid, 0)

    def report_generation(self, vm_uuid: str, generation: int) -> int:
        self.calls.append(("put", vm_uuid))
        if self.unavailable_reports:
            raise BrokerUnavailable("cannot reach the broker's API at https://broker (connection refused)")
        with self._lock:
            if generation < self.generations.get(vm_uuid, 0):
                raise RollbackRefused("the broker refused the .nvram generation (HTTP 409)")
            self.generations[vm_uuid] = generation
        return generation


@pytest.fixture(scope="module")
def ek_ca(tmp_path_factory):
    """A local EK CA and a swtpm_setup.conf whose create_certs_tool (vtpm-ek-certtool) signs with it."""
    directory = tmp_path_factory.mktemp("ekca")
    ca = EkCa.create("vtpm-host unit test EK CA")
    write_local_ca(ca, directory / "ca")
    tool_conf = directory / "ek-certtool.toml"
    tool_conf.write_text('mode = "local"\n\n[local]\nca_dir = "ca"\n')
    script = Path(sys.executable).parent / "vtpm-ek-certtool"
    if not script.exists():
        script = directory / "vtpm-ek-certtool"
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m broker.ek_certtool "$@"\n')
        script.chmod(0o755)
    conf = directory / "swtpm_setup.conf"
    conf.write_text(
        f"create_certs_tool = {script}\ncreate_certs_tool_config = {tool_conf}\nactive_pcr_banks = sha256\n"
    )
    return ca, conf


@pytest.fixture(scope="module")
def trust_ca():
    from broker.trust_ca import create_trust_ca

    return create_trust_ca("kms-test")


def issue_host_cert(trust_ca, state_dir: Path, name: str) -> Path:
    csr = x509.load_pem_x509_csr((state_dir / "host.csr").read_bytes())
    cert = trust_ca.issue_client(f"host:{name}", csr.public_key())
    path = state_dir.parent / f"{name}-issued.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


@pytest.fixture
def host_dir(tmp_path, trust_ca):
    """An initialized host with its certificate installed."""
    ca_file = tmp_path / "trust-ca.pem"
    ca_file.write_text(trust_ca.cert_pem)
    state = tmp_path / "host"
    init_state_dir(state, "esx-1", ["127.0.0.1:5697"], "https://127.0.0.1:8443", ca_file)
    install_certificate(state, issue_host_cert(trust_ca, state, "esx-1"))
    return state


@pytest.fixture
def broker():
    return FakeBroker()


@pytest.fixture
def agents(host_dir, broker, ek_ca):
    """Agents on the host; every swtpm they leave running is killed and every working directory wiped."""
    made: list[Agent] = []

    def make(**kwargs) -> Agent:
        kwargs.setdefault("broker", broker)
        kwargs.setdefault("setup_config", ek_ca[1])
        agent = Agent(kwargs.pop("state_dir", host_dir), **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        for path in (agent.state_dir / "running").glob("*.json"):
            record = json.loads(path.read_text())
            SwtpmInstance.attach(record["state_dir"], record["socket_dir"], record["pid"]).kill()
            wipe(record["workdir"])


@pytest.fixture
def agent(agents):
    return agents()


@pytest.fixture
def datastore(tmp_path):
    path = tmp_path / "datastore"
    path.mkdir()
    return path


def make_vm(datastore: Path, broker: FakeBroker, name: str, *, vtpm: bool = True, dek: bytes | None = None) -> Path:
    """A VM directory with its .vmx; the fake broker knows its DEK."""
    vm_uuid = str(uuid.uuid4())
    kms_key_id = str(uuid.uuid4())
    broker.deks[kms_key_id] = dek or os.urandom(64)
    key_safe = KeySafe("kms-test", kms_key_id, os.urandom(12), os.urandom(16), os.urandom(64))
    directory = datastore / name
    directory.mkdir()
    path = directory / f"{name}.vmx"
    vmx.write(path, vmx.Vmx.new(name, vm_uuid, format_key_safe(key_safe), vtpm))
    return path


def vm_uuid_of(vmx_path: Path) -> str:
    return vmx.read(vmx_path).vm_uuid


def nvram_of(vmx_path: Path) -> Path:
    return vmx_path.parent / vmx.read(vmx_path).nvram_name


def tpm2(tool: str, tcti: str, *args: str) -> bytes:
    done = subprocess.run([tool, "-T", tcti, *args], capture_output=True, timeout=20)
    assert done.returncode == 0, f"{tool} {' '.join(args)} failed: {done.stderr.decode(errors='replace')}"
    return done.stdout


def shm_workdirs(*vmx_paths: Path) -> set[str]:
    """The agent's working directories of these VMs (the agent names them vtpm-<first 8 of the VM UUID>-...).
    Only these VMs': other tests (xdist workers, other checkouts) make and wipe vtpm-* directories at the same
    time in the same /dev/shm."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else Path(os.environ.get("TMPDIR", "/tmp"))
    return {p.name for path in vmx_paths for p in base.glob(f"vtpm-{vm_uuid_of(path)[:8]}-*")}


def swtpm_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.fixture(scope="module")
def permall(tmp_path_factory) -> bytes:
    """A real manufactured TPM state (no EK certificates), for .nvram files that must be refused."""
    if MISSING:
        pytest.skip("needs swtpm_setup")
    state = tmp_path_factory.mktemp("permall")
    manufacture(state, uuid.uuid4())
    return (state / "tpm2-00.permall").read_bytes()


def seal_for(vmx_path: Path, broker: FakeBroker, permall: bytes, generation: int, dek: bytes | None = None) -> None:
    parsed = vmx.read(vmx_path)
    from broker.keysafe import parse_key_safe

    ks = parse_key_safe(parsed.key_safe)
    blob = nvram.seal(
        {"tpm2-00.permall": permall},
        dek or broker.deks[ks.kms_key_id],
        parsed.vm_uuid,
        generation,
        f"{ks.provider}/{ks.kms_key_id}",
    )
    nvram.write_atomic(nvram_of(vmx_path), blob)


# --- init and install-cert ----------------------------------------------------------------------------


def test_init_makes_a_private_key_a_csr_and_the_config(tmp_path, trust_ca):
    """init writes the key mode 0600 in a 0700 directory, a CSR for CN host:<name> signed by that key, the CA and
    the config; again with the same name it keeps the key, with another name it refuses."""
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(trust_ca.cert_pem)
    state = tmp_path / "h"
    csr_path = init_state_dir(state, "esx-7", ["127.0.0.1:1", "127.0.0.2:2"], "https://127.0.0.1:8443/", ca_file)
    assert csr_path == state / "host.csr"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "host.key").stat().st_mode) == 0o600
    csr = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert csr.is_signature_valid
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "host:esx-7"
    config = load_config(state)
    assert (config.name, config.gateway, config.api) == (
        "esx-7",
        ("127.0.0.1:1", "127.0.0.2:2"),
        "https://127.0.0.1:8443",
    )
    assert config.ca.read_text() == trust_ca.cert_pem

    key_before = (state / "host.key").read_bytes()
    init_state_dir(state, "esx-7", ["127.0.0.1:1"], "https://127.0.0.1:8443", ca_file)
    assert (state / "host.key").read_bytes() == key_before
    with pytest.raises(HostError, match="already holds host esx-7"):
        init_state_dir(state, "esx-8", ["127.0.0.1:1"], "https://127.0.0.1:8443", ca_file)
    for kwargs, words in (
        (dict(name="bad name"), "not valid"),
        (dict(gateway=["nohost"]), "HOST:PORT"),
        (dict(api="http://x"), "https://"),
        (dict(ca=tmp_path / "missing.pem"), "cannot read the CA file"),
    ):
        args = dict(name="esx-9", gateway=["127.0.0.1:1"], api="https://x:1", ca=ca_file) | kwargs
        with pytest.raises(HostError, match=words):
            init_state_dir(tmp_path / "other", args["name"], args["gateway"], args["api"], args["ca"])


def test_install_cert_checks_key_name_and_issuer(tmp_path, trust_ca):
    """Only a certificate for this host's key and name, issued by the broker's trust CA, is installed."""
    from broker.trust_ca import create_trust_ca

    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(trust_ca.cert_pem)
    state = tmp_path / "h"
    init_state_dir(state, "esx-1", ["127.0.0.1:1"], "https://127.0.0.1:8443", ca_file)
    other_key = ec.generate_private_key(ec.SECP256R1())
    wrong_key = tmp_path / "wrong-key.pem"
    wrong_key.write_bytes(
        trust_ca.issue_client("host:esx-1", other_key.public_key()).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(HostError, match="not for this host's key"):
        install_certificate(state, wrong_key)
    csr = x509.load_pem_x509_csr((state / "host.csr").read_bytes())
    wrong_name = tmp_path / "wrong-name.pem"
    wrong_name.write_bytes(
        trust_ca.issue_client("host:esx-2", csr.public_key()).public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(HostError, match="not host:esx-1"):
        install_certificate(state, wrong_name)
    stranger = create_trust_ca("other")
    wrong_ca = tmp_path / "wrong-ca.pem"
    wrong_ca.write_bytes(stranger.issue_client("host:esx-1", csr.public_key()).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(HostError, match="not issued by the broker's trust CA"):
        install_certificate(state, wrong_ca)
    assert not (state / "host.pem").exists()
    cert = install_certificate(state, issue_host_cert(trust_ca, state, "esx-1"))
    assert (state / "host.pem").read_bytes() == cert.public_bytes(serialization.Encoding.PEM)


# --- Power on, power off ------------------------------------------------------------------------------


@needs_swtpm
def test_power_cycle_manufactures_seals_and_restores_the_same_vtpm(agent, broker, datastore, ek_ca, tmp_path):
    """The first power-on manufactures the vTPM (EK certificates from the EK CA) and seals it at once as
    generation 1; a guest writes an NV secret; power-off seals generation 2 and wipes the clear copy; the next
    power-on brings back the same NV secret and the byte-identical EK certificate."""
    ca, _ = ek_ca
    vmx_path = make_vm(datastore, broker, "web-1")
    vm_uuid = vm_uuid_of(vmx_path)

    on = agent.power_on(vmx_path)
    assert on.manufactured and on.generation == 1 and on.tcti.startswith("swtpm:path=")
    assert nvram.read_header(nvram_of(vmx_path).read_bytes()).generation == 1
    assert broker.generations[vm_uuid] == 1
    record = json.loads((agent.state_dir / "running" / f"{vm_uuid}.json").read_text())
    assert record["pid"] == on.pid and record["generation"] == 1 and swtpm_alive(on.pid)
    work = Path(record["workdir"])
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
    if os.access("/dev/shm", os.W_OK):
        assert str(work).startswith("/dev/shm/")

    ek_cert = tpm2("tpm2_nvread", on.tcti, hex(RSA_EK_CERT))
    verify_ek_certificate(ek_cert, ca.ca_pem)
    verify_ek_certificate(tpm2("tpm2_nvread", on.tcti, hex(ECC_EK_CERT)), ca.ca_pem)
    secret = os.urandom(32)
    (tmp_path / "secret").write_bytes(secret)
    tpm2("tpm2_nvdefine", on.tcti, NV_SECRET, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite")
    tpm2("tpm2_nvwrite", on.tcti, NV_SECRET, "-C", "o", "-i", str(tmp_path / "secret"))

    with pytest.raises(AlreadyRunning, match="already powered on"):
        agent.power_on(vmx_path)

    off = agent.power_off(vmx_path)
    assert off.generation == 2 and off.warnings == ()
    assert nvram.read_header(nvram_of(vmx_path).read_bytes()).generation == 2
    assert broker.generations[vm_uuid] == 2
    assert stat.S_IMODE(nvram_of(vmx_path).stat().st_mode) == 0o600
    assert not work.exists() and not swtpm_alive(on.pid)
    assert agent.status() == []
    with pytest.raises(NotRunning):
        agent.power_off(vmx_path)

    again = agent.power_on(vmx_path)
    assert not again.manufactured and again.generation == 2
    assert tpm2("tpm2_nvread", again.tcti, NV_SECRET, "-C", "o") == secret
    assert tpm2("tpm2_nvread", again.tcti, hex(RSA_EK_CERT)) == ek_cert
    assert agent.power_off(vmx_path).generation == 3


@needs_swtpm
def test_the_dek_is_never_written(agent, broker, datastore):
    """Neither the running record nor anything else in the state directory or on the datastore holds the DEK,
    in any spelling, while the VM runs or after."""
    vmx_path = make_vm(datastore, broker, "db-1")
    dek = next(iter(broker.deks.values()))
    spellings = [dek, dek.hex().encode(), base64.b64encode(dek), base64.urlsafe_b64encode(dek)]

    def scan() -> None:
        for root in (agent.state_dir, datastore):
            for path in root.rglob("*"):
                if path.is_file():
                    data = path.read_bytes()
                    assert not any(s in data for s in spellings), path

    agent.power_on(vmx_path)
    scan()
    agent.power_off(vmx_path)
    scan()


@needs_swtpm
def test_bad_nvram_is_refused_and_swtpm_never_starts(agent, broker, datastore, permall):
    """A flipped bit, a truncated file, another key, another VM's file, an older generation than the broker saw
    (rollback) and a missing file the broker knows existed: each a one-line NvramRefused, and no swtpm, no running
    record, no clear state left behind."""
    vmx_path = make_vm(datastore, broker, "app-1")
    vm_uuid = vm_uuid_of(vmx_path)
    path = nvram_of(vmx_path)
    twin_dek = broker.deks[next(iter(broker.deks))]
    twin = make_vm(datastore, broker, "app-2", dek=twin_dek)  # same DEK: only the VM UUID tells them apart
    before = shm_workdirs(vmx_path, twin)

    def refused(kind: type[Exception], words: str) -> None:
        with pytest.raises(kind) as caught:
            agent.power_on(vmx_path)
        message = str(caught.value)
        assert words in message and "\n" not in message, message
        assert agent.status() == []
        assert shm_workdirs(vmx_path, twin) == before

    seal_for(vmx_path, broker, permall, generation=5)
    good = path.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x10
    path.write_bytes(bytes(flipped))
    refused(NvramRefused, "corrupt or was encrypted with another key")
    path.write_bytes(good[:-100])
    refused(NvramRefused, "truncated")
    seal_for(vmx_path, broker, permall, generation=5, dek=os.urandom(64))
    refused(NvramRefused, "another key")
    seal_for(twin, broker, permall, generation=5)
    shutil.copy(nvram_of(twin), path)
    refused(NvramRefused, f"not to VM {vm_uuid}")
    seal_for(vmx_path, broker, permall, generation=5)
    broker.generations[vm_uuid] = 6
    refused(RollbackRefused, "rollback")
    path.unlink()
    refused(NvramRefused, "is missing, but the broker saw generation 6")
    path.symlink_to(nvram_of(twin))
    refused(NvramRefused, "symbolic link")
    path.unlink()

    # The same file at the recorded generation is fine; a newer one is reported to the broker.
    seal_for(vmx_path, broker, permall, generation=7)
    assert agent.power_on(vmx_path).generation == 7
    assert broker.generations[vm_uuid] == 7
    assert agent.power_off(vmx_path).generation == 8


@needs_swtpm
def test_refused_unwrap_starts_nothing_and_power_off_keeps_the_vm_running(agent, broker, datastore):
    """A broker refusal on power-on leaves no trace; on power-off the VM keeps running and can be powered off
    once the broker agrees again."""
    vmx_path = make_vm(datastore, broker, "refused-1")
    broker.refuse = "VM refused-1 is not placed on host esx-1"
    with pytest.raises(BrokerRefused, match="not placed on host esx-1"):
        agent.power_on(vmx_path)
    assert not nvram_of(vmx_path).exists() and agent.status() == []

    broker.refuse = None
    on = agent.power_on(vmx_path)
    broker.refuse = "its management instance was revoked"
    with pytest.raises(BrokerRefused, match="keeps running"):
        agent.power_off(vmx_path)
    assert swtpm_alive(on.pid) and [r.running for r in agent.status()] == [True]
    broker.refuse = None
    assert agent.power_off(vmx_path).generation == 2


@needs_swtpm
def test_unreachable_broker_on_report_is_a_warning_and_caught_up_later(agent, broker, datastore):
    """If the broker cannot be told the new generation, power-off still completes with a warning, and the next
    power-on reports the newer file."""
    vmx_path = make_vm(datastore, broker, "late-1")
    vm_uuid = vm_uuid_of(vmx_path)
    agent.power_on(vmx_path)
    broker.unavailable_reports = True
    off = agent.power_off(vmx_path)
    assert off.generation == 2 and "the next power-on reports it" in off.warnings[0]
    assert broker.generations[vm_uuid] == 1
    broker.unavailable_reports = False
    agent.power_on(vmx_path)
    assert broker.generations[vm_uuid] == 2
    agent.power_off(vmx_path)


@needs_swtpm
def test_a_crashed_swtpm_is_sealed_by_power_off(agent, broker, datastore, tmp_path):
    """When swtpm dies under a running VM, power-on refuses to start a second copy and power-off seals the state
    swtpm last wrote (NV writes included) as the next generation."""
    vmx_path = make_vm(datastore, broker, "crash-1")
    on = agent.power_on(vmx_path)
    (tmp_path / "s").write_bytes(b"kept across a crash!")
    tpm2("tpm2_nvdefine", on.tcti, NV_SECRET, "-C", "o", "-s", "20", "-a", "ownerread|ownerwrite")
    tpm2("tpm2_nvwrite", on.tcti, NV_SECRET, "-C", "o", "-i", str(tmp_path / "s"))
    os.kill(on.pid, 9)
    for _ in range(500):
        if not swtpm_alive(on.pid):
            break
        import time

        time.sleep(0.01)
    assert [r.running for r in agent.status()] == [False]
    with pytest.raises(HostError, match="did not power off cleanly"):
        agent.power_on(vmx_path)
    off = agent.power_off(vmx_path)
    assert off.generation == 2 and "no longer running" in off.warnings[0]
    again = agent.power_on(vmx_path)
    assert tpm2("tpm2_nvread", again.tcti, NV_SECRET, "-C", "o") == b"kept across a crash!"
    agent.power_off(vmx_path)


@needs_swtpm
def test_a_record_left_by_a_host_restart_is_dropped(agent, broker, datastore):
    """After a restart (swtpm gone, /dev/shm emptied) the running record is dropped with a warning: power-off
    writes nothing, power-on starts from the .nvram on the datastore."""
    vmx_path = make_vm(datastore, broker, "reboot-1")
    vm_uuid = vm_uuid_of(vmx_path)
    for command in ("power_off", "power_on"):
        on = agent.power_on(vmx_path)
        record = json.loads((agent.state_dir / "running" / f"{vm_uuid}.json").read_text())
        SwtpmInstance.attach(record["state_dir"], record["socket_dir"], on.pid).kill()
        wipe(record["workdir"])
        before = nvram_of(vmx_path).read_bytes()
        result = getattr(agent, command)(vmx_path)
        assert "host restarted?" in result.warnings[0] and nvram_of(vmx_path).read_bytes() == before
        if command == "power_on":
            assert result.generation == 1 and agent.status()[0].running
            agent.power_off(vmx_path)
        else:
            assert agent.status() == []


@needs_swtpm
def test_swtpm_failures_are_clear(agents, broker, datastore, permall):
    """swtpm that will not start and swtpm_setup that fails are one-line SwtpmFailed, with nothing left behind."""
    vmx_path = make_vm(datastore, broker, "fail-1")
    fresh = make_vm(datastore, broker, "fail-2")
    before = shm_workdirs(vmx_path, fresh)
    seal_for(vmx_path, broker, permall, generation=1)
    with pytest.raises(SwtpmFailed, match="swtpm did not start"):
        agents(swtpm_binary="/bin/false").power_on(vmx_path)
    with pytest.raises(SwtpmFailed, match="manufacturing the vTPM of VM fail-2 failed"):
        agents(swtpm_setup="/nonexistent/swtpm_setup").power_on(fresh)
    assert not nvram_of(fresh).exists()
    assert shm_workdirs(vmx_path, fresh) == before


def test_a_vm_without_vtpm_or_encryption_is_refused(agent, broker, datastore, tmp_path):
    with pytest.raises(HostError, match="has no vTPM"):
        agent.power_on(make_vm(datastore, broker, "plain", vtpm=False))
    bare = tmp_path / "bare.vmx"
    bare.write_text(f'displayName = "bare"\nuuid.bios = "{uuid.uuid4()}"\n')
    with pytest.raises(HostError, match="not encrypted"):
        agent.power_on(bare)
    with pytest.raises(HostError, match="cannot read"):
        agent.power_on(tmp_path / "missing.vmx")
    assert broker.calls == []


# --- Concurrency ---------------------------------------------------------------------------------------


@needs_swtpm
def test_different_vms_power_on_side_by_side_and_one_vm_waits_for_its_lock(agents, broker, datastore, host_dir):
    """Power-ons of different VMs run at the same time; a command for a VM whose lock is held waits, then gives up
    with a clear message."""
    paths = [make_vm(datastore, broker, f"par-{i}") for i in range(3)]
    results: dict[int, object] = {}

    def run(i: int) -> None:
        try:
            results[i] = agents().power_on(paths[i])
        except Exception as exc:  # reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(not isinstance(r, Exception) for r in results.values()), results
    assert len({r.tcti for r in results.values()}) == 3
    assert len(agents().status()) == 3

    lock = host_dir / "locks" / f"{vm_uuid_of(paths[0])}.lock"
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(HostError, match="another vtpm-host command"):
            agents(lock_timeout=0.2).power_off(paths[0])
    finally:
        os.close(fd)
    for path in paths:
        agents().power_off(path)


# --- swtpm re-attach ---------------------------------------------------------------------------------------


@needs_swtpm
def test_attach_finds_a_running_swtpm_and_never_signals_a_stranger(permall):
    """An instance attached by pid and sockets shuts the swtpm down in order; a pid that is not that swtpm counts
    as exited and is never killed."""
    work = private_workdir(prefix="vtpm-attach-")
    stranger = subprocess.Popen(["sleep", "30"])
    started = SwtpmInstance(work / "state", work / "run")
    try:
        (work / "state").mkdir()
        (work / "run").mkdir()
        (work / "state" / "tpm2-00.permall").write_bytes(permall)
        started.start()
        attached = SwtpmInstance.attach(work / "state", work / "run", started.pid)
        assert attached.running and attached.pid == started.pid
        assert attached.shutdown() == 0
        assert not attached.running and not started.running

        impostor = SwtpmInstance.attach(work / "state", work / "run", stranger.pid)
        assert not impostor.running
        impostor.kill()
        assert impostor.shutdown() == 0
        assert stranger.poll() is None
    finally:
        started.kill()
        stranger.kill()
        stranger.wait()
        wipe(work)


# --- The command line ------------------------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch, broker, ek_ca, capsys):
    """vtpm-host's main() in-process, its broker the fake."""
    monkeypatch.setattr(agent_module, "BrokerClient", lambda config: broker)
    original = agent_module.Agent.__init__

    def init(self, state_dir, **kwargs):
        kwargs.setdefault("setup_config", ek_ca[1])
        original(self, state_dir, **kwargs)

    monkeypatch.setattr(agent_module.Agent, "__init__", init)

    def run(*args: str) -> tuple[int, str, str]:
        code = host_cli.main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def one_line_error(code: int, err: str, words: str) -> None:
    assert code == 2, err
    assert err.startswith("vtpm-host: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err, err


@needs_swtpm
def test_cli_power_cycle_status_and_errors(cli, host_dir, broker, datastore):
    """power-on prints the TCTI, status lists the VM, power-off seals; refusals are one line and exit 2."""
    vmx_path = make_vm(datastore, broker, "cli-1")
    code, out, err = cli("--state-dir", str(host_dir), "power-on", str(vmx_path))
    assert code == 0, err
    tcti = out.strip()
    assert tcti.startswith("swtpm:path=") and "powered on" in err and "generation 1" in err
    code, out, _ = cli("--state-dir", str(host_dir), "status")
    assert code == 0 and "cli-1" in out and tcti in out and "running" in out
    code, out, _ = cli("--state-dir", str(host_dir), "status", "--json")
    assert json.loads(out)[0]["tcti"] == tcti
    one_line_error(*cli("--state-dir", str(host_dir), "power-on", str(vmx_path))[::2], "already powered on")
    code, out, err = cli("--state-dir", str(host_dir), "power-off", str(vmx_path), "--json")
    assert code == 0 and json.loads(out)["generation"] == 2

    nvram_path = nvram_of(vmx_path)
    blob = bytearray(nvram_path.read_bytes())
    blob[-1] ^= 1
    nvram_path.write_bytes(bytes(blob))
    one_line_error(*cli("--state-dir", str(host_dir), "power-on", str(vmx_path))[::2], "corrupt")
    broker.refuse = "VM cli-1 is not placed on host esx-1; place it here"
    one_line_error(*cli("--state-dir", str(host_dir), "power-on", str(vmx_path))[::2], "refused to unwrap")


def test_cli_usage_and_setup_errors_are_one_line(cli, tmp_path, host_dir):
    one_line_error(*cli("--state-dir", str(tmp_path / "nowhere"), "status")[::2], "not a vtpm-host state directory")
    code, out, err = cli("--state-dir", str(tmp_path / "nowhere"), "power-on", str(tmp_path / "x.vmx"))
    one_line_error(code, err, "init")
    one_line_error(*cli("power-on")[::2], "required")
    one_line_error(*cli("--state-dir", str(tmp_path), "frobnicate")[::2], "invalid choice")
    one_line_error(*cli("--state-dir", str(host_dir), "install-cert", "--cert", str(tmp_path / "none.pem"))[::2], "")
    code, out, err = cli("--state-dir", str(host_dir), "check-config")
    assert code == 0 and "name = esx-1" in out and "BEGIN" not in out


def test_cli_init_and_install_cert(cli, tmp_path, trust_ca):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text(trust_ca.cert_pem)
    state = tmp_path / "cli-host"
    code, out, err = cli(
        "--state-dir", str(state), "init", "--name", "esx-c", "--gateway", "127.0.0.1:5697",
        "--api", "https://127.0.0.1:8443", "--ca", str(ca_file),
    )  # fmt: skip
    assert code == 0 and out.strip() == str(state / "host.csr") and "install-cert" in err
    code, out, err = cli(
        "--state-dir", str(state), "install-cert", "--cert", str(issue_host_cert(trust_ca, state, "esx-c"))
    )
    assert code == 0 and "host:esx-c" in out


# --- The broker's generation record ----------------------------------------------------------------------------


VM = "33333333-3333-4333-8333-333333333333"


@pytest.fixture
def api(tmp_path, trust_ca):
    from broker.api import Api
    from broker.config import load_config as load_broker_config
    from broker.db import Database
    from broker.trust import Registry

    db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
    db.create_all()
    registry = Registry(db, trust_ca)
    cfg = load_broker_config(None, {"broker": {"provider_name": "kms-test", "data_dir": str(tmp_path)}})
    yield Api(cfg, registry, None), registry
    db.close()


def test_generation_endpoint_for_the_placed_host_only(api):
    """Only the host the VM is placed on reads and raises the generation; lower is 409, equal is fine; another
    host of the instance gets 403, a host of another instance 404, an instance 403; every change and refusal is
    audited."""
    from broker.api import ApiRequest
    from broker.trust_ca import fingerprint

    api, registry = api

    def trusted(name: str) -> str:
        registry.enroll(name, registry.issue_token(name), csr_pem())
        return fingerprint(registry.approve(name))

    inst_a, _ = trusted("vc-a"), trusted("vc-b")
    host_1 = fingerprint(registry.register_host("vc-a", "esx-1", csr_pem()))
    host_2 = fingerprint(registry.register_host("vc-a", "esx-2", csr_pem()))
    host_b = fingerprint(registry.register_host("vc-b", "esx-b", csr_pem()))
    registry.add_vm("vc-a", VM, "vm", "kek-1", "ks", "esx-1")
    path = f"/v1/vms/{VM}/nvram-generation"

    def call(method: str, fp: str, body: object = None):
        data = b"" if body is None else json.dumps(body).encode()
        return api.dispatch(ApiRequest(method, path, data, client_fingerprint=fp))

    assert call("GET", host_1).body == {"vm_uuid": VM, "generation": 0}
    assert call("PUT", host_1, {"generation": 1}).status == 200
    assert call("PUT", host_1, {"generation": 3}).body["generation"] == 3
    assert call("PUT", host_1, {"generation": 3}).status == 200
    refused = call("PUT", host_1, {"generation": 2})
    assert refused.status == 409 and "rollback" in refused.body["error"]
    assert call("GET", host_1).body["generation"] == 3
    assert call("GET", host_2).status == 403 and "not placed" in call("GET", host_2).body["error"]
    assert call("PUT", host_b, {"generation": 9}).status == 404
    assert call("GET", inst_a).status == 403
    for bad in ({"generation": -1}, {"generation": "4"}, {"generation": True}, {"generation": 2**63}, {"gen": 1}):
        assert call("PUT", host_1, bad).status == 400, bad
    assert call("GET", host_1).body["generation"] == 3
    records = [(r.actor, r.action, r.allowed) for r in registry.audit_records() if r.action.startswith("nvram")]
    assert ("host:esx-1", "nvram.generation", True) in records
    assert ("host:esx-1", "nvram.generation", False) in records
    assert ("host:esx-2", "nvram.generation.read", False) in records
    assert registry.verify_audit() == []

    # Re-registration by a new instance keeps the record, and so does removing the VM.
    registry.revoke("vc-a")
    registry.register_vm("vc-b", VM, "vm", "kek-1", "ks")
    registry.place_vm("vc-b", VM, "esx-b")
    assert call("GET", host_b).body["generation"] == 3
    registry.remove_vm(VM, "test", None)
    assert registry.nvram_generation(VM) == 3
