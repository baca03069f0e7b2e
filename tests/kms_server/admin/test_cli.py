"""Tests for kms-admin: commands do what they print, errors are one line."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from kms_server.admin import cli

REPO = Path(__file__).resolve().parents[3]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kms-admin: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


def test_pki_init_then_rerun(tmp_path, capsys):
    directory = tmp_path / "dev"
    code, out, err = run(
        capsys,
        "pki",
        "init",
        "--dir",
        str(directory),
        "--client",
        "alice",
        "--key-type",
        "ec",
    )
    assert code == 0, err
    assert f"wrote {directory / 'ca.key'}" in out
    assert f"wrote {directory / 'alice.pem'}" in out
    assert (directory / "server.pem").exists()

    code, out, err = run(
        capsys, "pki", "init", "--dir", str(directory), "--key-type", "ec"
    )
    assert code == 0
    assert "wrote" not in out
    assert f"kept {directory / 'server.pem'}" in out


def test_pki_init_repeatable_options(tmp_path, capsys):
    directory = tmp_path / "dev"
    argv = ["pki", "init", "--dir", str(directory), "--key-type", "ec"]
    argv += ["--server-name", "kms1.example", "--server-name", "10.1.1.1"]
    argv += ["--client", "a", "--client", "b"]
    assert run(capsys, *argv)[0] == 0
    server = x509.load_pem_x509_certificate((directory / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "kms1.example" in sans.get_values_for_type(x509.DNSName)
    assert (directory / "a.pem").exists() and (directory / "b.pem").exists()


def test_issue_client_and_duplicate(tmp_path, capsys):
    directory = tmp_path / "dev"
    run(capsys, "pki", "init", "--dir", str(directory), "--key-type", "ec")
    code, out, _ = run(
        capsys,
        "pki",
        "issue-client",
        "--dir",
        str(directory),
        "--name",
        "vc",
        "--key-type",
        "ec",
    )
    assert code == 0 and f"wrote {directory / 'vc.pem'}" in out
    code, out, err = run(
        capsys, "pki", "issue-client", "--dir", str(directory), "--name", "vc"
    )
    assert code == 2 and out == ""
    assert_one_line_error(err, "already has vc.pem", "--force")


def test_sign_csr_default_ca_dir(tmp_path, capsys, monkeypatch):
    """Without --ca-dir the CA in certs/dev (relative to cwd) signs."""
    monkeypatch.chdir(tmp_path)
    run(capsys, "pki", "init", "--dir", "certs/dev", "--key-type", "ec")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vc01")]))
        .sign(key, hashes.SHA256())
    )
    Path("vc.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    code, out, err = run(
        capsys, "pki", "sign-csr", "--csr", "vc.csr", "--out", "vc.pem"
    )
    assert code == 0, err
    assert "wrote vc.pem for CN=vc01" in out
    cert = x509.load_pem_x509_certificate(Path("vc.pem").read_bytes())
    ca = x509.load_pem_x509_certificate(Path("certs/dev/ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)


def make_client_cert(path: Path, eku=None) -> Path:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pinned-vc")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    path.write_bytes(
        builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
    )
    return path


def test_clients_trust_list_untrust_use_config_dir(tmp_path, capsys):
    config = tmp_path / "kms.toml"
    config.write_text('[tls]\ntrusted_clients_dir = "pins"\n')
    cert = make_client_cert(tmp_path / "vc.pem", [ExtendedKeyUsageOID.CLIENT_AUTH])

    code, out, err = run(capsys, "clients", "trust", str(cert), "--config", str(config))
    assert code == 0, err
    fingerprint = out.split()[1]
    assert (tmp_path / "pins" / f"{fingerprint}.pem").exists()

    code, out, _ = run(capsys, "clients", "list", "--config", str(config))
    assert code == 0
    assert fingerprint in out and "CN=pinned-vc" in out

    code, out, _ = run(
        capsys, "clients", "untrust", fingerprint, "--config", str(config)
    )
    assert code == 0 and "removed" in out
    code, out, _ = run(capsys, "clients", "list", "--config", str(config))
    assert "no trusted client certificates" in out


def test_clients_trust_prints_warning_for_missing_eku(tmp_path, capsys):
    config = tmp_path / "kms.toml"
    config.write_text("")
    cert = make_client_cert(tmp_path / "vc.pem")
    code, _, err = run(capsys, "clients", "trust", str(cert), "--config", str(config))
    assert code == 0
    assert err.startswith("kms-admin: warning: ") and "no extended key usage" in err


def test_clients_without_config_use_cwd_var(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cert = make_client_cert(tmp_path / "vc.pem", [ExtendedKeyUsageOID.CLIENT_AUTH])
    assert run(capsys, "clients", "trust", str(cert))[0] == 0
    assert len(list((tmp_path / "var" / "trusted-clients").glob("*.pem"))) == 1


def test_master_key_new(tmp_path, capsys):
    out_path = tmp_path / "master.key"
    code, out, _ = run(capsys, "master-key", "new", "--out", str(out_path))
    assert code == 0 and f"wrote {out_path}" in out
    data = out_path.read_bytes()
    code, out, err = run(capsys, "master-key", "new", "--out", str(out_path))
    assert code == 2
    assert_one_line_error(err, "already exists")
    assert out_path.read_bytes() == data


@pytest.mark.parametrize(
    "argv, fragments",
    [
        ([], ["required: GROUP", "--help"]),
        (["pki"], ["required: COMMAND"]),
        (["pki", "init"], ["required: --dir", "kms-admin pki init --help"]),
        (["pki", "init", "--dir", "d", "--key-type", "dsa"], ["invalid choice: 'dsa'"]),
        (
            ["pki", "sign-csr", "--csr", "x", "--out", "y", "--days", "ten"],
            ["invalid int"],
        ),
        (
            ["pki", "sign-csr", "--csr", "x", "--out", "y"],
            ["ca.pem is missing", "pki init"],
        ),
        (["clients", "list", "--config", "/nonexistent/kms.toml"], ["does not exist"]),
        (["clients", "untrust", "zz"], ["not a SHA-256 fingerprint"]),
        (["bogus"], ["invalid choice: 'bogus'"]),
    ],
)
def test_errors_are_one_line_with_exit_2(
    tmp_path, capsys, monkeypatch, argv, fragments
):
    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert_one_line_error(err, *fragments)


def test_bad_config_is_reported_not_raised(tmp_path, capsys):
    config = tmp_path / "kms.toml"
    config.write_text('[server]\nport = "abc"\n')
    code, _, err = run(capsys, "clients", "list", "--config", str(config))
    assert code == 2
    assert_one_line_error(err, "server.port must be an integer between 1 and 65535")


def test_os_error_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(
        capsys, "pki", "init", "--dir", str(blocker / "sub"), "--key-type", "ec"
    )
    assert code == 2
    assert_one_line_error(err, "cannot create directory")


def test_help_exits_zero(capsys):
    code, out, _ = run(capsys, "pki", "init", "--help")
    assert code == 0 and "--server-name" in out


def test_registry_lets_new_groups_plug_in(capsys):
    def register_demo(subparsers: argparse._SubParsersAction) -> None:
        demo = subparsers.add_parser("demo")
        demo.set_defaults(func=lambda args: 7)

    parser = cli.build_parser([*cli.COMMAND_GROUPS, register_demo])
    args = parser.parse_args(["demo"])
    assert args.func(args) == 7
    assert "pki" in parser.subparsers.choices
    late = cli.build_parser()
    late.subparsers.add_parser("later")
    assert "later" in late.subparsers.choices


def test_real_process_has_no_traceback(tmp_path):
    """The console entry point, run as a process, fails with one line and 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from kms_server.admin.cli import main; sys.exit(main())",
        ]
        + ["pki", "issue-client", "--dir", str(tmp_path), "--name", "x"],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert proc.returncode == 2
    assert_one_line_error(proc.stderr, "run 'kms-admin pki init")
