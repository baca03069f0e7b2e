"""`vtpm-host`: the host agent (an ESXi-like host's vTPM handling).

    vtpm-host [--state-dir D] init --name H --gateway HOST:PORT [--gateway ...] --api https://HOST:PORT --ca FILE
                                   [--tpm TCTI]
    vtpm-host [--state-dir D] install-cert --cert host.pem
    vtpm-host [--state-dir D] check-config
    vtpm-host [--state-dir D] power-on VMX [--json]
    vtpm-host [--state-dir D] power-off VMX [--json]
    vtpm-host [--state-dir D] status [--json]
    vtpm-host [--state-dir D] install-ek-certs VMX [--json]
    vtpm-host [--state-dir D] attest ek-pub [--out FILE]
    vtpm-host [--state-dir D] attest enroll
    vtpm-host [--state-dir D] attest now [--json]
    vtpm-host [--state-dir D] attest status [--json]

The state directory defaults to $VTPM_HOST_STATE_DIR, else /var/lib/vtpm-host
(its layout: broker/host/config.py). `power-on` prints the TCTI string on
stdout (for `tpm2-tools -T` or TPM2TOOLS_TCTI) and a summary on stderr.
`attest` is host attestation with the host's own TPM (init --tpm;
broker/host/attest.py, docs/host-agent.md "Host attestation").

Every failure is one line on stderr, ``vtpm-host: error: <problem>; <fix>``,
and exit status 2; a traceback is a bug.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

    from broker.host.config import HostConfig

__all__ = ["main"]

PROG = "vtpm-host"
DEFAULT_STATE_DIR = "/var/lib/vtpm-host"


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{message}; see '{PROG} --help'")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="vTPM host agent: power VMs' vTPMs on and off with keys from the broker")
    p.add_argument(
        "--state-dir",
        metavar="D",
        default=os.environ.get("VTPM_HOST_STATE_DIR", DEFAULT_STATE_DIR),
        help=f"the host's state directory (default: $VTPM_HOST_STATE_DIR or {DEFAULT_STATE_DIR})",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    init = sub.add_parser("init", help="make the host key and CSR (CN host:<name>) and write the config")
    init.add_argument("--name", required=True, metavar="H", help="the host's name at the broker")
    init.add_argument(
        "--gateway", required=True, action="append", metavar="HOST:PORT", help="the broker's KMIP gateway (repeatable)"
    )
    init.add_argument("--api", required=True, metavar="URL", help="the broker's management API, https://HOST:PORT")
    init.add_argument("--ca", required=True, metavar="FILE", help="the broker's trust CA (trust-ca.pem)")
    init.add_argument(
        "--tpm",
        metavar="TCTI",
        help="the host's own TPM, for host attestation (e.g. device:/dev/tpmrm0 or swtpm:path=SOCKET); "
        "default: the one config.toml names, else none (the host does not attest)",
    )
    cert = sub.add_parser("install-cert", help="store the host certificate POST /v1/hosts returned")
    cert.add_argument("--cert", required=True, metavar="FILE", help="the host certificate (PEM)")
    sub.add_parser("check-config", help="print the effective settings")
    for name, text in (
        ("power-on", "unwrap the DEK, unseal (or manufacture) the vTPM, start swtpm; print the TCTI"),
        ("power-off", "stop swtpm in order, seal the state as the next generation, wipe the clear copy"),
    ):
        command = sub.add_parser(name, help=text)
        command.add_argument("vmx", metavar="VMX", help="the VM's .vmx file")
        command.add_argument("--json", action="store_true", help="print the result as JSON")
    install = sub.add_parser(
        "install-ek-certs",
        help="write the broker's re-certified EK certificates (vtpm-broker ca recertify) into the vTPM's NV indices",
    )
    install.add_argument("vmx", metavar="VMX", help="the VM's .vmx file")
    install.add_argument("--json", action="store_true", help="print the result as JSON")
    status = sub.add_parser("status", help="the VMs whose vTPM runs on this host")
    status.add_argument("--json", action="store_true", help="print the result as JSON")
    attest = sub.add_parser("attest", help="host attestation with the host's own TPM ([attestation] in config.toml)")
    attest_sub = attest.add_subparsers(dest="attest_command", required=True, parser_class=_Parser)
    ek_pub = attest_sub.add_parser(
        "ek-pub",
        help="create the host TPM's EK and attestation key if needed; print the EK public key (PEM) "
        "for 'vtpm-broker admin attest pin-ek'",
    )
    ek_pub.add_argument("--out", metavar="FILE", help="write the PEM to FILE instead of stdout")
    attest_sub.add_parser(
        "enroll", help="enroll the host TPM's attestation key at the broker (after the EK was pinned there)"
    )
    now = attest_sub.add_parser("now", help="attest now: quote the broker's challenge, keep the token it returns")
    now.add_argument("--json", action="store_true", help="print the result as JSON")
    attest_status = attest_sub.add_parser(
        "status", help="the host TPM, its EK fingerprint, the enrollment and the cached token, as this host knows them"
    )
    attest_status.add_argument("--json", action="store_true", help="print the result as JSON")
    from kmip_core import __version__, cliopts

    # --state-dir, --json and --log-level before or after the command.
    return cliopts.conventions(
        p, version=__version__, everywhere=("--state-dir",), where_defined=("--json",), log_level=True
    )


def _run(args: argparse.Namespace) -> int:
    from broker.host import config as host_config

    state_dir = Path(args.state_dir)
    if args.command == "init":
        csr = host_config.init_state_dir(state_dir, args.name, args.gateway, args.api, args.ca, tpm=args.tpm)
        print(csr)
        print(
            f"{PROG}: have the management instance register host {args.name} with this CSR (POST /v1/hosts), "
            f"then run '{PROG} --state-dir {state_dir} install-cert --cert host.pem'",
            file=sys.stderr,
        )
        return 0
    if args.command == "install-cert":
        cert = host_config.install_certificate(state_dir, args.cert)
        print(
            f"installed the certificate of host {cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc}"
        )
        return 0
    if args.command == "check-config":
        cfg = host_config.load_config(state_dir)
        print(f"state_dir = {cfg.state_dir}")
        print(f"name = {cfg.name}")
        print(f"gateway = {', '.join(cfg.gateway)}")
        print(f"api = {cfg.api}")
        print(f"timeout = {cfg.timeout:g}")
        print(f"key = {cfg.key} (secret, not shown)")
        print(f"cert = {cfg.cert}" + ("" if cfg.cert.is_file() else " (missing: run install-cert)"))
        print(f"ca = {cfg.ca}")
        if cfg.attestation_tcti is None:
            print("attestation = off (no [attestation] in config.toml: this host does not attest)")
        else:
            print(f"attestation.tcti = {cfg.attestation_tcti}")
        return 0
    if args.command == "attest":
        return _attest(host_config.load_config(state_dir), args)

    from broker.host.agent import Agent

    agent = Agent(state_dir)
    if args.command == "power-on":
        result = agent.power_on(args.vmx)
        _warn(result.warnings)
        if args.json:
            print(json.dumps(_as_dict(result)))
        else:
            print(result.tcti)
            how = "manufactured, EK certificates from the broker" if result.manufactured else "unsealed"
            print(
                f"{PROG}: VM {result.name} ({result.vm_uuid}) powered on: vTPM {how}, .nvram generation "
                f"{result.generation}, swtpm pid {result.pid}, {result.seconds:.2f} s",
                file=sys.stderr,
            )
        return 0
    if args.command == "power-off":
        off = agent.power_off(args.vmx)
        _warn(off.warnings)
        if args.json:
            print(json.dumps(_as_dict(off)))
        else:
            print(
                f"VM {off.name} ({off.vm_uuid}) powered off: {off.nvram} sealed as generation "
                f"{off.generation}, {off.seconds:.2f} s"
            )
        return 0
    if args.command == "install-ek-certs":
        installed = agent.install_ek_certs(args.vmx)
        _warn(installed.warnings)
        if args.json:
            print(json.dumps(_as_dict(installed)))
            return 0
        for ek_cert in installed.certificates:
            done = "written" if ek_cert["written"] else "already there"
            print(
                f"NV {ek_cert['nv_index']}: {ek_cert['type']} certificate of the {ek_cert['key_type']} EK, "
                f"{ek_cert['size']} bytes, issued by {ek_cert['issuer']}: {done}"
            )
        how = (
            "through its running swtpm (sealed at power-off)"
            if installed.running
            else f"sealed as .nvram generation {installed.generation}"
        )
        print(f"VM {installed.name} ({installed.vm_uuid}): EK certificates installed {how}, {installed.seconds:.2f} s")
        return 0
    if args.command == "status":
        running = agent.status()
        if args.json:
            print(json.dumps([_as_dict(r) for r in running]))
            return 0
        if not running:
            print("no VM is powered on on this host")
            return 0
        rows = [("NAME", "UUID", "GEN", "SINCE", "STATE", "TCTI")]
        for r in running:
            since = dt.datetime.fromtimestamp(r.since, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
            state = "running" if r.running else "swtpm gone: power off to seal"
            rows.append((r.name, r.vm_uuid, str(r.generation), since, state, r.tcti))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])
        return 0
    raise _Usage(f"unknown command {args.command}")


def _attest(cfg: HostConfig, args: argparse.Namespace) -> int:
    from broker.host import attest
    from broker.host.broker_client import BrokerClient
    from broker.host.errors import HostError

    if cfg.attestation_tcti is None:
        raise HostError(
            f"host {cfg.name} has no host TPM configured; run '{PROG} --state-dir {cfg.state_dir} init ... "
            "--tpm TCTI' (e.g. --tpm device:/dev/tpmrm0) to add [attestation] to config.toml"
        )
    directory = cfg.attestation_dir
    if args.attest_command == "ek-pub":
        ek_public_pem, _ = attest.open_host_tpm(cfg.attestation_tcti, directory).ensure_keys()
        fingerprint = attest.ek_fingerprint(ek_public_pem)
        if args.out:
            from broker.host.config import write_public

            try:
                write_public(Path(args.out), ek_public_pem)
            except OSError as exc:
                raise HostError(f"cannot write {args.out} ({exc.strerror}); give a writable --out FILE") from None
        else:
            sys.stdout.write(ek_public_pem.decode("ascii"))
        print(
            f"{PROG}: EK of host {cfg.name}'s TPM, SHA-256 fingerprint {fingerprint}; have the security administrator "
            f"run 'vtpm-broker admin attest pin-ek {cfg.name} --ek-pub FILE', then run '{PROG} attest enroll'",
            file=sys.stderr,
        )
        return 0
    if args.attest_command == "status":
        client_tokens = attest.TokenCache(directory, binding=f"{cfg.name}@{cfg.api}")
        status = attest.attestation_status(
            cfg.attestation_tcti,
            directory,
            attest.open_host_tpm(cfg.attestation_tcti, directory),
            client_tokens,
            time.time(),
        )
        if args.json:
            print(json.dumps(_as_dict(status)))
            return 0
        print(f"tpm = {status.tcti}")
        if status.tpm_error:
            print(f"tpm error = {status.tpm_error}")
        print(f"ek fingerprint = {status.ek_fingerprint or 'none yet (run attest ek-pub)'}")
        if status.enrolled:
            print(f"enrolled = yes, AK name {status.ak_name_hex}, at {_utc(status.enrolled_at)}")
        elif status.ak_name_hex:
            print("enrolled = no: the enrollment recorded here is for another EK; run attest enroll")
        else:
            print("enrolled = no (run attest enroll)")
        if status.token_expires_at is None:
            print("token = none cached")
        else:
            state = "valid" if status.token_valid else "expired"
            print(f"token = {state} until {_utc(status.token_expires_at)}, policy {status.policy or '-'}")
        return 0

    client = BrokerClient(cfg)
    try:
        if args.attest_command == "enroll":
            ak_name = attest.enroll(client, client.host_tpm(), directory)
            print(f"host {cfg.name}'s TPM is enrolled at the broker: attestation key name {ak_name}")
            return 0
        if args.attest_command == "now":
            result = client.attest()
            if args.json:
                print(
                    json.dumps(
                        {"attested": result.token is not None, "expires_at": result.expires_at, "policy": result.policy}
                    )
                )
            elif result.token is None:
                print(f"host {cfg.name} attested; no attestation policy covers it: its unwraps need no token")
            else:
                print(
                    f"host {cfg.name} attested under policy {result.policy or '-'}: token valid until "
                    f"{_utc(result.expires_at)}"
                )
            return 0
    finally:
        client.close()
    raise _Usage(f"unknown attest command {args.attest_command}")


def _utc(when: float | None) -> str:
    if when is None:
        return "-"
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _as_dict(value: DataclassInstance) -> dict:
    import dataclasses

    data = dataclasses.asdict(value)
    if "warnings" in data:
        data["warnings"] = list(data["warnings"])
    return data


def _warn(warnings: Sequence[str]) -> None:
    for line in warnings:
        print(f"{PROG}: warning: {' '.join(line.split())}", file=sys.stderr)


def _fail(message: str) -> int:
    line = " ".join(message.split()) or "failed"
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    from broker.host.errors import HostError

    try:
        args = _parser().parse_args(argv)
        return _run(args)
    except (_Usage, HostError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted; run status to see what runs, power-off to seal a VM left running")
    except Exception as exc:  # one line, never a traceback; no message here carries a key
        return _fail(f"internal error ({type(exc).__name__}: {exc}); please report it")


if __name__ == "__main__":
    sys.exit(main())
