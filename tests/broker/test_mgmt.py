"""`vtpm-mgmt` without a broker: `vm check` on crafted datastores, the
state directory, and command-line errors (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker import nvram, vmx
from broker.keysafe import KeySafe, format_key_safe
from broker.mgmt import cli
from broker.mgmt.check import check_datastore, compare_generations
from broker.mgmt.client import BrokerError, parse_broker_url

PROVIDER = "kms-prod"
STATE = {"tpm2-00.permall": os.urandom(5000)}


def key_safe(provider: str = PROVIDER, key_id: str | None = None) -> str:
    return format_key_safe(
        KeySafe(provider, key_id or str(uuid.uuid4()), os.urandom(12), os.urandom(16), os.urandom(64))
    )


def make_vm(
    datastore: Path,
    name: str,
    *,
    provider: str = PROVIDER,
    nvram_for: str | None = None,
    with_nvram: bool = True,
    vm_uuid: str | None = None,
    ks: str | None = None,
) -> tuple[Path, vmx.Vmx]:
    """A VM directory with a .vmx and (unless told otherwise) a real sealed .nvram."""
    vm_uuid = vm_uuid or str(uuid.uuid4())
    ks = ks or key_safe(provider)
    config = vmx.Vmx.new(name, vm_uuid, ks, vtpm=True)
    directory = datastore / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.vmx"
    vmx.write(path, config)
    if with_nvram:
        from broker.keysafe import parse_key_safe

        parsed = parse_key_safe(ks)
        blob = nvram.seal(STATE, os.urandom(64), nvram_for or vm_uuid, 3, f"{parsed.provider}/{parsed.kms_key_id}")
        (directory / f"{name}.nvram").write_bytes(blob)
    return path, config


def problems(datastore: Path, provider: str | None = PROVIDER) -> dict[str, list[str]]:
    return {r.name: r.problems for r in check_datastore(datastore, provider)}


# --- vm check ------------------------------------------------------------------------------------


def test_healthy_datastore_has_no_problems(tmp_path):
    """Sealed .nvram files of the right VM and key, key safes of our
    provider: nothing to report, and the generation is read."""
    for name in ("web-01", "web-02"):
        make_vm(tmp_path, name)
    results = check_datastore(tmp_path, PROVIDER)
    assert [r.problems for r in results] == [[], []]
    assert {r.generation for r in results} == {3}


def test_missing_truncated_and_garbage_nvram_reported(tmp_path):
    """A backup without the .nvram, a truncated one, and a file that is not
    a .nvram at all are each named with the reason."""
    make_vm(tmp_path, "missing", with_nvram=False)
    make_vm(tmp_path, "truncated")
    blob = (tmp_path / "truncated" / "truncated.nvram").read_bytes()
    (tmp_path / "truncated" / "truncated.nvram").write_bytes(blob[: len(blob) - 100])
    make_vm(tmp_path, "garbage")
    (tmp_path / "garbage" / "garbage.nvram").write_bytes(b"not an nvram at all")
    make_vm(tmp_path, "empty")
    (tmp_path / "empty" / "empty.nvram").write_bytes(b"")
    make_vm(tmp_path, "trailing")
    with open(tmp_path / "trailing" / "trailing.nvram", "ab") as f:
        f.write(b"\0")
    found = problems(tmp_path)
    assert "missing" in found["missing"][0] and "cannot be recovered" in found["missing"][0]
    assert "truncated" in found["truncated"][0]
    assert "bad magic" in found["garbage"][0]
    assert found["empty"] and "truncated" in found["empty"][0]
    assert "trailing" in found["trailing"][0]


def test_unreadable_nvram_reported(tmp_path):
    """A .nvram the checker cannot read (permissions, or a directory)."""
    make_vm(tmp_path, "dir-nvram", with_nvram=False)
    (tmp_path / "dir-nvram" / "dir-nvram.nvram").mkdir()
    found = problems(tmp_path)
    assert "not a regular file" in found["dir-nvram"][0]
    if os.geteuid() != 0:
        make_vm(tmp_path, "locked")
        (tmp_path / "locked" / "locked.nvram").chmod(0)
        assert "unreadable" in problems(tmp_path)["locked"][0]


def test_nvram_of_another_vm_or_key_reported(tmp_path):
    """A .nvram copied from another VM (its header names another UUID), or
    sealed under another KEK, would not unseal: both are named."""
    make_vm(tmp_path, "swapped", nvram_for=str(uuid.uuid4()))
    make_vm(tmp_path, "rekeyed")
    other = nvram.seal(STATE, os.urandom(64), vmx.read(tmp_path / "rekeyed" / "rekeyed.vmx").vm_uuid, 1, "kms-prod/x")
    (tmp_path / "rekeyed" / "rekeyed.nvram").write_bytes(other)
    found = problems(tmp_path)
    assert "belongs to another VM" in found["swapped"][0]
    assert "sealed under key 'kms-prod/x'" in found["rekeyed"][0]


def test_key_safe_problems_reported(tmp_path):
    """A key safe that does not parse, or that names another key provider,
    means the DEK cannot be unwrapped by this instance's broker."""
    make_vm(tmp_path, "foreign", provider="kms-other")
    path, config = make_vm(tmp_path, "mangled")
    config.set("encryption.keySafe", config.key_safe.replace("AES-256-GCM", "AES-128-CBC"))
    vmx.write(path, config)
    found = problems(tmp_path)
    assert "names key provider 'kms-other', not 'kms-prod'" in found["foreign"][0]
    assert "does not parse" in found["mangled"][0]
    # Without a provider to compare with, only the parse is checked.
    assert problems(tmp_path, None)["foreign"] == []


def test_broken_vmx_and_copied_vm_reported(tmp_path):
    """A .vmx that does not parse, and two VMs with the same UUID and key
    (a copied VM: recovery would register only one)."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "broken.vmx").write_text("this is not a vmx line\n")
    vm_uuid = str(uuid.uuid4())
    ks = key_safe()
    make_vm(tmp_path, "orig", vm_uuid=vm_uuid, ks=ks)
    make_vm(tmp_path, "copy", vm_uuid=vm_uuid, ks=ks)
    found = problems(tmp_path)
    assert "does not parse" in found["broken"][0] and "line 1" in found["broken"][0]
    # The first found (sorted by path: copy/ before orig/) is kept, the other named.
    assert found["copy"] == []
    assert any("same UUID" in p for p in found["orig"]) and any("same KMS key" in p for p in found["orig"])


def test_vm_without_vtpm_needs_no_nvram(tmp_path):
    path = tmp_path / "plain" / "plain.vmx"
    path.parent.mkdir()
    vmx.write(path, vmx.Vmx.new("plain", str(uuid.uuid4()), key_safe(), vtpm=False))
    assert problems(tmp_path) == {"plain": []}


def test_nvram_older_than_the_brokers_generation_is_a_rollback(tmp_path):
    """Each .nvram here is generation 3. Against the broker's record: newer
    (4) is a rollback problem naming both generations; the same, an older
    record or none yet (0) are fine; a VM the broker did not list is returned
    as unchecked, and a VM without .nvram is neither."""
    uuids = {name: make_vm(tmp_path, name)[1].vm_uuid for name in ("behind", "same", "ahead", "fresh", "foreign")}
    make_vm(tmp_path, "lost", with_nvram=False)
    results = check_datastore(tmp_path, PROVIDER)
    recorded = {uuids["behind"]: 4, uuids["same"]: 3, uuids["ahead"]: 2, uuids["fresh"]: 0}
    unchecked = compare_generations(results, recorded)
    assert [r.name for r in unchecked] == ["foreign"]
    by_name = {r.name: r for r in results}
    [problem] = by_name["behind"].problems
    assert "generation 3" in problem and "generation 4" in problem and "rollback" in problem
    for name in ("same", "ahead", "fresh", "foreign"):
        assert by_name[name].ok, (name, by_name[name].problems)
    assert by_name["behind"].as_json()["broker_generation"] == 4
    assert by_name["foreign"].broker_generation is None
    assert not by_name["lost"].ok and by_name["lost"].broker_generation is None


def test_vm_check_offline_says_rollback_was_not_checked(tmp_path, capsys):
    make_vm(tmp_path, "good")
    assert cli.main(["vm", "check", "--datastore", str(tmp_path), "--provider", PROVIDER, "--offline"]) == 0
    assert ".nvram rollback not checked (--offline)" in capsys.readouterr().out
    assert cli.main(["vm", "check", "--datastore", str(tmp_path), "--provider", PROVIDER, "--json"]) == 0
    assert any("rollback not checked" in note for note in json.loads(capsys.readouterr().out)["notes"])


def test_vm_check_command_exit_status_and_json(tmp_path, capsys):
    """Exit 0 with a clean datastore, 1 with one line per problem; --json
    gives the same as data."""
    make_vm(tmp_path, "good")
    assert cli.main(["vm", "check", "--datastore", str(tmp_path), "--provider", PROVIDER]) == 0
    assert "every one can be recovered" in capsys.readouterr().out
    make_vm(tmp_path, "lost", with_nvram=False)
    assert cli.main(["vm", "check", "--datastore", str(tmp_path), "--provider", PROVIDER]) == 1
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("PROBLEM")] == [
        line for line in out.splitlines() if "lost" in line and line.startswith("PROBLEM")
    ]
    assert "1 would not recover" in out
    assert cli.main(["vm", "check", "--datastore", str(tmp_path), "--provider", PROVIDER, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["vms"] == 2 and report["problems"] == 1
    assert {r["name"]: r["ok"] for r in report["results"]} == {"good": True, "lost": False}


# --- The state directory and command-line errors --------------------------------------------


def ca_file(tmp_path: Path) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path = tmp_path / "broker-ca.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(result: tuple[int, str, str], words: str) -> None:
    status, _out, err = result
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("vtpm-mgmt: error: "), err
    assert words in err, err
    assert "Traceback" not in err


def test_init_writes_a_private_key_and_a_csr(tmp_path, capsys):
    state = tmp_path / "state"
    status, out, err = run_cli(
        capsys, "--state-dir", str(state), "init", "--name", "vcenter-a",
        "--broker", "https://127.0.0.1:8443", "--ca", str(ca_file(tmp_path)), "--provider", PROVIDER,
    )  # fmt: skip
    assert status == 0, err
    assert stat.S_IMODE((state / "instance.key").stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    csr = x509.load_pem_x509_csr((state / "instance.csr").read_bytes())
    assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "vcenter-a"
    assert json.loads((state / "instance.json").read_text()) == {
        "name": "vcenter-a",
        "broker": "https://127.0.0.1:8443",
        "provider": PROVIDER,
    }
    # A second init into the same directory is refused.
    assert_one_line_error(
        run_cli(
            capsys, "--state-dir", str(state), "init", "--name", "vcenter-b",
            "--broker", "https://127.0.0.1:8443", "--ca", str(ca_file(tmp_path)), "--provider", PROVIDER,
        ),
        "already holds instance vcenter-a",
    )  # fmt: skip
    # Not enrolled yet: commands that need the certificate say how to get it.
    assert_one_line_error(run_cli(capsys, "--state-dir", str(state), "vm", "list"), "not enrolled yet")
    assert_one_line_error(
        run_cli(capsys, "--state-dir", str(state), "host", "add", "--name", "h", "--csr", "/nonexistent", "--out", "x"),
        "cannot read /nonexistent",
    )


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["vm", "list"], "give --state-dir"),
        (["--state-dir", "/nonexistent-state", "vm", "list"], "not a vtpm-mgmt state directory"),
        (["vm"], "required"),
        (["vm", "create", "--datastore", "/tmp"], "--name"),
        (["enroll", "--wait", "soon"], "invalid float"),
        (["vm", "check", "--datastore", "/nonexistent-ds"], "not a directory"),
    ],
)
def test_command_line_errors_are_one_line(capsys, monkeypatch, argv, words):
    monkeypatch.delenv(cli.STATE_ENV, raising=False)
    assert_one_line_error(run_cli(capsys, *argv), words)


def test_init_errors_are_one_line(tmp_path, capsys):
    ca = str(ca_file(tmp_path))
    base = ["--state-dir", str(tmp_path / "s"), "init", "--name", "vc", "--provider", PROVIDER]
    assert_one_line_error(run_cli(capsys, *base, "--broker", "http://x:1", "--ca", ca), "https://HOST:PORT")
    assert_one_line_error(run_cli(capsys, *base, "--broker", "https://x:1/api", "--ca", ca), "without a path")
    assert_one_line_error(run_cli(capsys, *base, "--broker", "https://x:1", "--ca", "/nope.pem"), "cannot read")
    (tmp_path / "junk.pem").write_text("junk")
    assert_one_line_error(
        run_cli(capsys, *base, "--broker", "https://x:1", "--ca", str(tmp_path / "junk.pem")), "not a PEM"
    )
    bad_name = ["--state-dir", str(tmp_path / "s"), "init", "--name=-bad", "--provider", PROVIDER]
    assert_one_line_error(run_cli(capsys, *bad_name, "--broker", "https://x:1", "--ca", ca), "instance name")
    assert not (tmp_path / "s" / "instance.json").exists()


def test_unreachable_broker_is_one_line(tmp_path, capsys):
    """A broker that is not running: the enrollment names the URL and the likely fix."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = str(tmp_path / "state")
    ca = str(ca_file(tmp_path))
    assert cli.main(
        ["--state-dir", state, "init", "--name", "vc", "--broker", f"https://127.0.0.1:{port}", "--ca", ca,
         "--provider", PROVIDER]
    ) == 0  # fmt: skip
    capsys.readouterr()
    assert_one_line_error(
        run_cli(capsys, "--state-dir", state, "enroll", "--token", "t"), "(connection refused); is vtpm-broker running"
    )
    assert_one_line_error(run_cli(capsys, "--state-dir", state, "enroll"), "no enrollment is pending")
    # Tokens are base64url: one starting with '-' goes in a file or after '='.
    assert_one_line_error(run_cli(capsys, "--state-dir", state, "enroll", "--token=-x"), "connection refused")
    token_file = tmp_path / "token"
    token_file.write_text("-abc\n")
    assert_one_line_error(
        run_cli(capsys, "--state-dir", state, "enroll", "--token-file", str(token_file)), "connection refused"
    )
    token_file.write_text("\n")
    assert_one_line_error(run_cli(capsys, "--state-dir", state, "enroll", "--token-file", str(token_file)), "empty")
    assert_one_line_error(
        run_cli(capsys, "--state-dir", state, "enroll", "--token-file", str(tmp_path / "none")), "cannot read"
    )
    assert_one_line_error(
        run_cli(capsys, "--state-dir", state, "enroll", "--token-file", str(token_file), "--token=x"),
        "not allowed with",
    )


def test_broker_url_parsing():
    assert str(parse_broker_url("https://broker.example:8443")) == "https://broker.example:8443"
    assert str(parse_broker_url("https://[::1]:8443/")) == "https://[::1]:8443"
    assert parse_broker_url("https://b").port == 443
    for bad in ("ftp://b:1", "https://:1", "https://b:99999", "https://u:p@b:1", "https://b:1?x=1"):
        with pytest.raises(BrokerError):
            parse_broker_url(bad)
