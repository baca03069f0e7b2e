"""`vtpm-mgmt`: a management instance (vCenter's part) on the command line.

    vtpm-mgmt [--state-dir D] init --name NAME --broker https://HOST:PORT --ca broker-ca.pem --provider P
    vtpm-mgmt [--state-dir D] enroll [--token-file F | --token=T] [--wait SECONDS]
    vtpm-mgmt [--state-dir D] host add --name H --csr host.csr --out host.pem
    vtpm-mgmt [--state-dir D] host remove H
    vtpm-mgmt [--state-dir D] vm create --name N [--name N2 ...] --datastore DIR [--vtpm] [--host H ...]
    vtpm-mgmt [--state-dir D] vm register --datastore DIR [--vm NAME|UUID ...] [--host H ...] [--jobs J]
    vtpm-mgmt [--state-dir D] vm release VM --to INSTANCE     (cold migration; VM: name or UUID)
    vtpm-mgmt [--state-dir D] vm remove VM
    vtpm-mgmt [--state-dir D] vm rekey VM [--deep | --abort] [--datastore DIR]
    vtpm-mgmt [--state-dir D] vm rekey --all --datastore DIR [--deep] [--jobs J]
    vtpm-mgmt [--state-dir D] vm list [--json]
    vtpm-mgmt [--state-dir D] vm check --datastore DIR [--provider P] [--offline] [--json]

The state directory defaults to $VTPM_MGMT_STATE_DIR. Exit status: 0 done,
1 some VMs failed (`vm register`) or have problems (`vm check`), 2 the
command failed (one line on stderr; a traceback is a bug).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from broker import vmx
from broker.keysafe import KeySafeError, parse_key_safe
from broker.mgmt.client import BrokerClient, BrokerError, BrokerRefused
from broker.mgmt.state import CERT, KEY, MgmtError, StateDir, check_name, write_atomic
from kmip_core.progress import Progress

__all__ = ["main"]

PROG = "vtpm-mgmt"
STATE_ENV = "VTPM_MGMT_STATE_DIR"
POLL_SECONDS = 0.5


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    # argparse exits 2 with a usage block; keep it, but one line of error.
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Management instance (vCenter's part) of the vTPM key broker")
    p.add_argument("--state-dir", metavar="D", help=f"the instance's state directory (default: ${STATE_ENV})")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)

    init = sub.add_parser("init", help="make the instance's key and CSR and remember the broker")
    init.add_argument("--name", required=True, help="instance name, e.g. vcenter-a")
    init.add_argument("--broker", required=True, metavar="URL", help="https://HOST:PORT of the broker's API")
    init.add_argument("--ca", required=True, metavar="F", help="the broker's trust-ca.pem")
    init.add_argument("--provider", required=True, metavar="P", help="the key provider name the broker serves")

    enroll = sub.add_parser("enroll", help="enroll with a one-time token and fetch the certificate once approved")
    given = enroll.add_mutually_exclusive_group()
    given.add_argument(
        "--token-file", metavar="F", help="file holding the one-time token from 'vtpm-broker admin token' ('-': stdin)"
    )
    given.add_argument("--token", metavar="T", help="the token itself (write --token=T: tokens may start with '-')")
    enroll.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="wait this long for approval")

    host = sub.add_parser("host", help="hosts")
    hsub = host.add_subparsers(dest="host_command", required=True, parser_class=_Parser)
    add = hsub.add_parser("add", help="register a host and write its certificate")
    add.add_argument("--name", required=True, help="the host's name, as in its vtpm-host init")
    add.add_argument("--csr", required=True, metavar="F", help="the host's CSR (vtpm-host init writes it)")
    add.add_argument("--out", required=True, metavar="F", help="where to write the host certificate")
    hsub.add_parser("list", help="the hosts this instance added")
    hremove = hsub.add_parser("remove", help="forget a host: its certificate is void, its VMs are unplaced")
    hremove.add_argument("host", metavar="HOST")

    vm = sub.add_parser("vm", help="virtual machines")
    vsub = vm.add_subparsers(dest="vm_command", required=True, parser_class=_Parser)
    create = vsub.add_parser("create", help="create encrypted VMs and write their .vmx")
    create.add_argument("--name", required=True, action="append", help="VM name (repeat for several VMs)")
    create.add_argument("--datastore", required=True, metavar="DIR", help="where to write <name>/<name>.vmx")
    create.add_argument("--vtpm", action="store_true", help="give the VM a vTPM (the host manufactures it at power-on)")
    create.add_argument("--host", action="append", default=[], help="place on this host (repeat: round-robin)")
    register = vsub.add_parser("register", help="re-register every VM found on a datastore (recovery)")
    register.add_argument("--datastore", required=True, metavar="DIR", help="the datastore whose .vmx files to read")
    register.add_argument("--host", action="append", default=[], help="place on this host (repeat: round-robin)")
    register.add_argument("--jobs", type=int, default=8, metavar="J", help="requests in flight (default 8)")
    register.add_argument(
        "--vm", action="append", default=[], metavar="NAME|UUID", help="only this VM (repeat; default: all)"
    )
    release = vsub.add_parser(
        "release", help="cold migration: hand a powered-off VM over to another trusted instance, which registers it"
    )
    release.add_argument("vm", metavar="VM", help="VM name or UUID")
    release.add_argument("--to", required=True, metavar="INSTANCE", help="the trusted instance that takes it over")
    remove = vsub.add_parser(
        "remove", help="forget a VM at the broker (administrators; its KEK, generation and trail are kept)"
    )
    remove.add_argument("vm", metavar="VM", help="VM name or UUID")
    rekey = vsub.add_parser(
        "rekey",
        help="rotate a VM's keys: its DEK under a new KEK, or with --deep a new DEK (re-sealed at next power-on)",
    )
    rekey.add_argument("vm", nargs="?", metavar="VM", help="VM name or UUID (or --all)")
    rekey.add_argument("--all", action="store_true", help="every VM of this instance on --datastore")
    rekey.add_argument("--datastore", metavar="DIR", help="where the .vmx is (default: where this instance wrote it)")
    kind = rekey.add_mutually_exclusive_group()
    kind.add_argument("--deep", action="store_true", help="a new DEK too; the host re-seals the .nvram at power-on")
    kind.add_argument("--abort", action="store_true", help="roll back a rekey that is pending, not yet switched")
    rekey.add_argument("--jobs", type=int, default=4, metavar="J", help="VMs in flight with --all (default 4)")
    listing = vsub.add_parser("list", help="this instance's VMs, as the broker knows them")
    listing.add_argument("--json", action="store_true", help="print the result as JSON")
    check = vsub.add_parser("check", help="find VMs whose vTPM could not be recovered")
    check.add_argument("--datastore", required=True, metavar="DIR", help="the datastore to check")
    check.add_argument("--provider", help="expected key provider (default: this instance's)")
    check.add_argument(
        "--offline",
        action="store_true",
        help="do not ask the broker for the last .nvram generations (no rollback check)",
    )
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    from kmip_core import __version__, cliopts

    # --state-dir, --json and --log-level before or after the command.
    return cliopts.conventions(
        p, version=__version__, everywhere=("--state-dir",), where_defined=("--json",), log_level=True
    )


def _fail(message: str) -> int:
    line = (message.splitlines() or ["failed"])[0]
    print(f"{PROG}: error: {line}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        return _fail(f"{exc} (see '{PROG} --help')")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return _run(args)
    except (MgmtError, BrokerError, vmx.VmxError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return _fail("interrupted")
    except Exception as exc:  # A traceback is a bug; still one line.
        return _fail(f"unexpected {type(exc).__name__}: {exc}")


def _state(args) -> StateDir:
    path = args.state_dir or os.environ.get(STATE_ENV)
    if not path:
        raise MgmtError(f"give --state-dir D (or set ${STATE_ENV})")
    return StateDir(path)


def _run(args) -> int:
    if args.command == "vm" and args.vm_command == "check":
        return _vm_check(args)
    state = _state(args)
    if args.command == "init":
        return _init(state, args)
    if args.command == "enroll":
        return _enroll(state, args)
    if args.command == "host":
        if args.host_command == "remove":
            return _host_remove(state, args)
        return _host_add(state, args) if args.host_command == "add" else _host_list(state)
    if args.vm_command == "create":
        return _vm_create(state, args)
    if args.vm_command == "register":
        return _vm_register(state, args)
    if args.vm_command == "release":
        return _vm_release(state, args)
    if args.vm_command == "remove":
        return _vm_remove(state, args)
    if args.vm_command == "rekey":
        return _vm_rekey(state, args)
    return _vm_list(state, args)


# --- init, enroll ----------------------------------------------------------------------------


def _init(state: StateDir, args) -> int:
    settings = state.create(args.name, args.broker, Path(args.ca), args.provider)
    print(f"instance {settings.name}: key {state.file(KEY)} (0600), CSR {state.file('instance.csr')}")
    print(f"broker {settings.broker}, key provider {settings.provider}")
    print(f"next: a security administrator runs 'vtpm-broker admin token --instance {settings.name}';")
    print(f"      then: {PROG} --state-dir {state.path} enroll --token-file TOKEN-FILE --wait 300")
    return 0


def _token(args) -> str | None:
    if args.token_file is None:
        return None if args.token is None else args.token.strip()
    try:
        if args.token_file == "-":
            text = sys.stdin.readline()
        else:
            text = Path(args.token_file).read_text("utf-8")
    except OSError as exc:
        raise MgmtError(f"cannot read the token file {args.token_file} ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise MgmtError(f"the token file {args.token_file} is not text") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise MgmtError(f"the token file {args.token_file} is empty; 'vtpm-broker admin token' prints the token")
    return lines[0]


def _enroll(state: StateDir, args) -> int:
    settings = state.settings()
    client = state.client(enrolled=False)
    token = _token(args)
    if token is not None:
        answer = client.enroll(settings.name, token, state.csr_pem())
        try:
            state.save_enrollment(str(answer["enrollment_id"]), str(answer["poll_secret"]))
        except (KeyError, TypeError):
            raise MgmtError("the broker's enrollment answer lacks enrollment_id or poll_secret") from None
        print(f"enrollment of {settings.name} sent; waiting for a security administrator:", file=sys.stderr)
        print(f"  vtpm-broker admin approve {settings.name}", file=sys.stderr)
    pending = state.pending_enrollment()
    if pending is None:
        if state.enrolled:
            print(f"{settings.name} is already enrolled ({state.file(CERT)})")
            return 0
        raise MgmtError(f"no enrollment is pending for {settings.name}; give --token-file F (or --token=T)")
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        try:
            answer = client.poll_enrollment(pending["enrollment_id"], pending["poll_secret"])
        except BrokerRefused as exc:
            if exc.status == 404:
                raise MgmtError(
                    f"the broker does not know this enrollment of {settings.name}; enroll again with a new token"
                ) from None
            raise
        status = answer.get("state") if isinstance(answer, dict) else None
        if status == "approved":
            certificate = answer.get("certificate_pem")
            if not isinstance(certificate, str):
                raise MgmtError("the broker approved the enrollment but sent no certificate")
            state.finish_enrollment(certificate)
            print(f"{settings.name} is enrolled: certificate {state.file(CERT)}")
            return 0
        if status == "rejected":
            state.file("enrollment.json").unlink(missing_ok=True)
            raise MgmtError(f"a security administrator rejected the enrollment of {settings.name}; ask for a new token")
        if status != "pending":
            raise MgmtError(f"the broker answered enrollment state {status!r}")
        if time.monotonic() >= deadline:
            if args.wait > 0:
                raise MgmtError(
                    f"the enrollment of {settings.name} is still pending after {args.wait:g} s; after "
                    f"'vtpm-broker admin approve {settings.name}' run '{PROG} enroll --wait 60'"
                )
            print(f"enrollment pending; after approval run: {PROG} --state-dir {state.path} enroll --wait 60")
            return 0
        time.sleep(POLL_SECONDS)


# --- hosts -------------------------------------------------------------------------------------


def _host_add(state: StateDir, args) -> int:
    name = check_name("host", args.name)
    try:
        csr = Path(args.csr).read_text("ascii")
    except OSError as exc:
        raise MgmtError(f"cannot read {args.csr} ({exc.strerror}); 'vtpm-host init' writes the host's CSR") from None
    except UnicodeDecodeError:
        raise MgmtError(f"{args.csr} is not a PEM CSR") from None
    out = Path(args.out)
    if not out.parent.is_dir():
        raise MgmtError(f"cannot write {out}: {out.parent} is not a directory")
    client = state.client()
    answer = client.add_host(name, csr)
    cert, ca = answer.get("certificate_pem"), answer.get("ca_pem")
    if not isinstance(cert, str) or not isinstance(ca, str):
        raise MgmtError("the broker's answer lacks certificate_pem or ca_pem")
    write_atomic(out, cert.encode("ascii"))
    ca_path = out.parent / "trust-ca.pem"
    write_atomic(ca_path, ca.encode("ascii"))

    def record(inventory: dict) -> None:
        inventory["hosts"][name] = {"certificate": str(out.resolve()), "added_at": time.time()}

    state.update_inventory(record)
    print(f"host {name} registered: certificate {out}, trust CA {ca_path}")
    return 0


def _host_remove(state: StateDir, args) -> int:
    name = check_name("host", args.host)
    client = state.client()
    try:
        client.remove_host(name)
    except BrokerRefused as exc:
        if exc.status == 404:
            raise MgmtError(f"the broker has no host {name} of this instance ('{PROG} host list')") from None
        raise

    def record(inventory: dict) -> None:
        inventory["hosts"].pop(name, None)
        for vm in inventory["vms"].values():
            if vm.get("host") == name:
                vm["host"] = None

    state.update_inventory(record)
    print(f"host {name} removed: its certificate is void and the VMs placed on it are unplaced")
    return 0


def _host_list(state: StateDir) -> int:
    hosts = state.inventory()["hosts"]
    if not hosts:
        print("no hosts")
    for name, info in sorted(hosts.items()):
        print(f"{name:24} {info.get('certificate', '')}")
    return 0


# --- VMs ---------------------------------------------------------------------------------------


def _vm_create(state: StateDir, args) -> int:
    settings = state.settings()
    datastore = Path(args.datastore)
    if not datastore.is_dir():
        raise MgmtError(f"datastore {datastore} is not a directory")
    hosts = [check_name("host", h) for h in args.host]
    names = list(args.name)
    if len(set(names)) != len(names):
        raise MgmtError("a VM name is given twice")
    # Every refusal that needs no broker comes before any KEK exists.
    for name in names:
        vmx.Vmx.new(name, str(uuid.uuid4()), "-", args.vtpm)
        if (datastore / name / f"{name}.vmx").exists():
            raise MgmtError(f"{datastore / name / (name + '.vmx')} exists; choose another name")
    client = state.client()
    for index, name in enumerate(names):
        host = hosts[index % len(hosts)] if hosts else None
        vm_uuid = str(uuid.uuid4())
        answer = client.create_vm(vm_uuid, name, host)
        key_safe = answer.get("key_safe")
        if not isinstance(key_safe, str):
            raise MgmtError(f"the broker created VM {vm_uuid} but sent no key safe")
        try:
            provider = parse_key_safe(key_safe).provider
        except KeySafeError as exc:
            raise MgmtError(f"the broker's key safe for VM {vm_uuid} does not parse ({exc})") from None
        directory = datastore / name
        try:
            directory.mkdir(exist_ok=True)
        except OSError as exc:
            raise MgmtError(f"cannot create {directory} ({exc.strerror}); VM {vm_uuid} exists at the broker") from None
        path = directory / f"{name}.vmx"
        vmx.write(path, vmx.Vmx.new(name, vm_uuid, key_safe, args.vtpm))

        def record(inventory: dict, vm_uuid=vm_uuid, name=name, path=path, host=host, answer=answer) -> None:
            inventory["vms"][vm_uuid] = {
                "name": name,
                "vmx": str(path.resolve()),
                "host": host,
                "kms_key_id": answer.get("kms_key_id"),
            }

        state.update_inventory(record)
        placed = f" on host {host}" if host else ""
        print(f"VM {name} ({vm_uuid}) created{placed}: {path}")
        if provider != settings.provider:
            print(
                f"{PROG}: warning: the broker's key provider is {provider!r}, this instance was set up for "
                f"{settings.provider!r}",
                file=sys.stderr,
            )
    return 0


@dataclass
class _Outcome:
    path: Path
    name: str = ""
    vm_uuid: str = ""
    host: str | None = None
    kms_key_id: str | None = None
    error: str | None = None


def _register_one(client: BrokerClient, path: Path, provider: str, host: str | None) -> _Outcome:
    outcome = _Outcome(path, name=path.stem)
    try:
        config = vmx.read(path)
        outcome.name = config.name or path.stem
        outcome.vm_uuid = config.vm_uuid
        key_safe = parse_key_safe(config.key_safe)
        outcome.kms_key_id = key_safe.kms_key_id
        if key_safe.provider != provider:
            raise MgmtError(f"its key safe names key provider {key_safe.provider!r}, not {provider!r}")
        client.register_vm(outcome.vm_uuid, outcome.name, config.key_safe)
        if host is not None:
            client.place_vm(outcome.vm_uuid, host)
            outcome.host = host
    except BrokerRefused as exc:
        outcome.error = f"the broker refused: {exc.error} (HTTP {exc.status})"
    except (vmx.VmxError, KeySafeError, MgmtError, BrokerError) as exc:
        outcome.error = str(exc)
    return outcome


def _vm_register(state: StateDir, args) -> int:
    settings = state.settings()
    datastore = Path(args.datastore)
    if not datastore.is_dir():
        raise MgmtError(f"datastore {datastore} is not a directory")
    if not 1 <= args.jobs <= 64:
        raise MgmtError("--jobs must be between 1 and 64")
    hosts = [check_name("host", h) for h in args.host]
    paths = vmx.find_vms(datastore)
    if not paths:
        raise MgmtError(f"no VMs on {datastore} (looked for {datastore}/*/*.vmx)")
    if args.vm:
        paths = _only_vms(paths, args.vm, datastore)
    client = state.client()
    started = time.monotonic()
    outcomes: list[_Outcome] = []
    # A bar on a terminal, a plain line every 5 s otherwise (kmip_core.progress).
    with Progress("registering VMs", len(paths), unit="VMs", prefix=f"{PROG}: ") as progress:
        with ThreadPoolExecutor(max_workers=min(args.jobs, len(paths))) as pool:
            futures = [
                pool.submit(_register_one, client, path, settings.provider, hosts[i % len(hosts)] if hosts else None)
                for i, path in enumerate(paths)
            ]
            for future in futures:
                outcome = future.result()
                outcomes.append(outcome)
                progress.advance()
    client.close()

    done = [o for o in outcomes if o.error is None]

    def record(inventory: dict) -> None:
        for o in done:
            inventory["vms"][o.vm_uuid] = {
                "name": o.name,
                "vmx": str(o.path.resolve()),
                "host": o.host,
                "kms_key_id": o.kms_key_id,
            }

    state.update_inventory(record)
    failed = [o for o in outcomes if o.error is not None]
    seconds = time.monotonic() - started
    placed = f", placed round-robin on {', '.join(hosts)}" if hosts else ", not placed on a host"
    print(f"{len(done)} of {len(outcomes)} VMs registered to {settings.name}{placed} in {seconds:.1f} s")
    for o in failed:
        print(f"FAILED {o.path}: {o.error}")
    return 1 if failed else 0


def _only_vms(paths: list[Path], wanted: list[str], datastore: Path) -> list[Path]:
    """The .vmx files whose VM name or UUID is one of `wanted`; each must be found."""
    keep, found = [], set()
    for path in paths:
        try:
            config = vmx.read(path)
            vm_uuid = config.vm_uuid
        except vmx.VmxError:
            continue
        hits = {w for w in wanted if w in (config.name, path.stem) or w.lower() == vm_uuid}
        if hits:
            keep.append(path)
            found |= hits
    missing = [w for w in wanted if w not in found]
    if missing:
        raise MgmtError(f"no VM {missing[0]!r} on {datastore} (give a VM name or UUID from a .vmx there)")
    return keep


def _resolve_vm(client: BrokerClient, state: StateDir, text: str) -> dict:
    """This instance's VM named `text` (or with that UUID), as the broker lists it."""
    vms = client.list_vms()
    by_uuid = [vm for vm in vms if str(vm.get("vm_uuid", "")).lower() == text.lower()]
    if by_uuid:
        return by_uuid[0]
    by_name = [vm for vm in vms if vm.get("name") == text]
    if len(by_name) > 1:
        uuids = ", ".join(sorted(str(vm.get("vm_uuid")) for vm in by_name))
        raise MgmtError(f"{len(by_name)} VMs are named {text!r} ({uuids}); give the VM's UUID")
    if not by_name:
        raise MgmtError(f"{state.settings().name} has no VM {text!r} at the broker ('{PROG} vm list' shows its VMs)")
    return by_name[0]


def _forget_vm(state: StateDir, vm_uuid: str) -> None:
    def record(inventory: dict) -> None:
        inventory["vms"].pop(vm_uuid, None)

    state.update_inventory(record)


def _vm_release(state: StateDir, args) -> int:
    to = check_name("instance", args.to)
    client = state.client()
    vm = _resolve_vm(client, state, args.vm)
    vm_uuid = str(vm.get("vm_uuid"))
    try:
        client.release_vm(vm_uuid, to)
    except BrokerRefused as exc:
        raise MgmtError(f"the broker refused to release VM {vm.get('name')} ({vm_uuid}) to {to}: {exc.error}") from None
    _forget_vm(state, vm_uuid)
    if to == state.settings().name:
        print(f"VM {vm.get('name')} ({vm_uuid}): release cancelled; place it on a host again to power it on")
        return 0
    print(f"VM {vm.get('name')} ({vm_uuid}) released to {to}; no host of {state.settings().name} may unwrap it now")
    print(f"next, on {to}: {PROG} vm register --datastore DIR --vm {vm_uuid} --host H")
    return 0


def _vm_remove(state: StateDir, args) -> int:
    client = state.client()
    vm = _resolve_vm(client, state, args.vm)
    vm_uuid = str(vm.get("vm_uuid"))
    try:
        client.remove_vm(vm_uuid)
    except BrokerRefused as exc:
        if exc.status == 403:
            raise MgmtError(
                f"the broker refused to remove VM {vm.get('name')} ({vm_uuid}): {exc.error}; removing a VM is for "
                "administrators ([roles] administrators in the broker's config)"
            ) from None
        raise
    _forget_vm(state, vm_uuid)
    print(
        f"VM {vm.get('name')} ({vm_uuid}) removed from the broker; its KEK, .nvram generation and audit trail are "
        f"kept: '{PROG} vm register --datastore DIR --vm {vm_uuid}' brings it back"
    )
    return 0


def _vm_rekey(state: StateDir, args) -> int:
    """One VM, or every VM of this instance on a datastore with a progress bar (broker/mgmt/rekey.py)."""
    from broker.mgmt import rekey

    if args.all == (args.vm is not None):
        raise MgmtError("name one VM, or give --all --datastore DIR")
    if args.all and (args.datastore is None or args.abort):
        raise MgmtError("--all needs --datastore DIR (and rotates; --abort is for one VM)")
    if not 1 <= args.jobs <= 32:
        raise MgmtError("--jobs must be between 1 and 32")
    client = state.client()
    if not args.all:
        path = _vmx_of(state, client, args.vm, args.datastore)
        outcome = rekey.abort_vm(client, path) if args.abort else rekey.rekey_vm(client, path, args.deep)
        client.close()
        if outcome.error is not None:
            raise MgmtError(outcome.describe())
        _remember_keys(state, [outcome])
        print(outcome.describe())
        return 0
    datastore = Path(args.datastore)
    if not datastore.is_dir():
        raise MgmtError(f"datastore {datastore} is not a directory")
    mine = {str(vm.get("vm_uuid")) for vm in client.list_vms()}
    paths, others = [], 0
    for path in vmx.find_vms(datastore):
        try:
            vm_uuid = vmx.read(path).vm_uuid
        except vmx.VmxError:
            vm_uuid = ""
        if vm_uuid in mine:
            paths.append(path)
        else:
            others += 1
    if not paths:
        raise MgmtError(f"no VM of {state.settings().name} on {datastore} ('{PROG} vm list' shows its VMs)")
    outcomes = _with_progress(
        f"{'deep' if args.deep else 'shallow'} rekey",
        paths,
        lambda path: rekey.rekey_vm(client, path, args.deep),
        args.jobs,
    )
    client.close()
    _remember_keys(state, [o for o in outcomes if o.error is None])
    failed = [o for o in outcomes if o.error is not None]
    done = {
        result: sum(1 for o in outcomes if o.error is None and o.result == result)
        for result in ("rekeyed", "finished", "pending")
    }
    skipped = f"; {others} VMs of other instances skipped" if others else ""
    print(
        f"{len(outcomes) - len(failed)} of {len(outcomes)} VMs on {datastore}: {done['rekeyed']} rekeyed, "
        f"{done['finished']} interrupted rekeys finished, {done['pending']} deep rekeys pending a power-on{skipped}"
    )
    for o in outcomes:
        print(("FAILED " if o.error else "") + o.describe())
    return 1 if failed else 0


def _with_progress(label: str, items: list, work, jobs: int) -> list:
    """Run `work` on every item, `jobs` at a time, with progress on stderr
    (kmip_core.progress: a bar on a terminal, a plain line every 5 s otherwise)."""
    outcomes = []
    with Progress(label, len(items), unit="VMs", prefix=f"{PROG}: ") as progress:
        with ThreadPoolExecutor(max_workers=min(jobs, len(items))) as pool:
            for outcome in pool.map(work, items):
                outcomes.append(outcome)
                progress.advance()
    return outcomes


def _vmx_of(state: StateDir, client: BrokerClient, text: str, datastore: str | None) -> Path:
    """The .vmx of this instance's VM `text` (name or UUID): found on --datastore, or where this instance wrote it."""
    vm = _resolve_vm(client, state, text)
    vm_uuid = str(vm.get("vm_uuid"))
    if datastore is not None:
        return _only_vms(vmx.find_vms(Path(datastore)), [vm_uuid], Path(datastore))[0]
    known = state.inventory()["vms"].get(vm_uuid, {}).get("vmx")
    if not known or not Path(known).is_file():
        raise MgmtError(f"this instance does not know where VM {text}'s .vmx is; give --datastore DIR")
    return Path(known)


def _remember_keys(state: StateDir, outcomes: list) -> None:
    def record(inventory: dict) -> None:
        for o in outcomes:
            if o.kms_key_id and o.vm_uuid in inventory["vms"] and o.result in ("rekeyed", "finished"):
                inventory["vms"][o.vm_uuid]["kms_key_id"] = o.kms_key_id

    state.update_inventory(record)


def _vm_list(state: StateDir, args) -> int:
    client = state.client()
    vms = client.list_vms()
    inventory = state.inventory()["vms"]
    rows = []
    for vm in sorted(vms, key=lambda v: (str(v.get("name")), str(v.get("vm_uuid")))):
        known = inventory.get(vm.get("vm_uuid"), {})
        rows.append(
            {
                "vm_uuid": vm.get("vm_uuid"),
                "name": vm.get("name"),
                "host": vm.get("host"),
                "kms_key_id": vm.get("kms_key_id"),
                "vmx": known.get("vmx"),
                "released_to": vm.get("released_to"),
                "rekey": vm.get("rekey"),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no VMs")
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"VMs of {state.settings().name}")
    for column in ("name", "VM UUID", "host", "KMS key id", ".vmx"):
        table.add_column(column)
    for row in rows:
        host = f"(released to {row['released_to']})" if row["released_to"] else row["host"] or "-"
        key = str(row["kms_key_id"])
        if isinstance(row["rekey"], dict):
            key += f" ({row['rekey'].get('kind')} rekey {row['rekey'].get('state')})"
        table.add_row(str(row["name"]), str(row["vm_uuid"]), host, key, row["vmx"] or "-")
    Console(width=max(160, Console().width)).print(table)
    return 0


def _vm_check(args) -> int:
    from broker.mgmt.check import check_datastore, compare_generations

    datastore = Path(args.datastore)
    if not datastore.is_dir():
        raise MgmtError(f"datastore {datastore} is not a directory")
    provider = args.provider
    state = _state(args) if (args.state_dir or os.environ.get(STATE_ENV)) else None
    if provider is None and state is not None:
        provider = state.settings().provider
    results = check_datastore(datastore, provider)
    notes = []
    if provider is None:
        notes.append("key provider not checked: give --provider or --state-dir")
    if args.offline:
        notes.append(".nvram rollback not checked (--offline)")
    elif state is None or not state.enrolled:
        notes.append(".nvram rollback not checked: give --state-dir of an enrolled instance")
    else:
        recorded = _recorded_generations(state)
        unchecked = compare_generations(results, recorded)
        if unchecked:
            notes.append(
                f".nvram rollback not checked for {len(unchecked)} VMs that {state.settings().name} "
                "has not registered (vm register)"
            )
    bad = [r for r in results if not r.ok]
    if args.json:
        print(
            json.dumps(
                {"vms": len(results), "problems": len(bad), "notes": notes, "results": [r.as_json() for r in results]},
                indent=2,
            )
        )
        return 1 if bad else 0
    for result in results:
        for problem in result.problems:
            print(f"PROBLEM {result.name} ({result.vmx_path}): {problem}")
    vtpms = sum(1 for r in results if r.has_vtpm)
    checked = f"checked {len(results)} VMs ({vtpms} with a vTPM) on {datastore}"
    if notes:
        checked += f" ({'; '.join(notes)})"
    if bad:
        print(f"{checked}: {len(bad)} would not recover; restore their .nvram from a backup that has it")
        return 1
    print(f"{checked}: every one can be recovered")
    return 0


def _recorded_generations(state: StateDir) -> dict[str, int]:
    """VM UUID -> the last .nvram generation the broker recorded, for this
    instance's VMs."""
    client = state.client(timeout=30.0)
    try:
        vms = client.list_vms()
    except BrokerError as exc:
        raise MgmtError(
            f"cannot ask the broker for the last .nvram generations ({exc}); "
            "give --offline to check the datastore alone"
        ) from None
    finally:
        client.close()
    recorded = {}
    for vm in vms:
        generation = vm.get("nvram_generation") if isinstance(vm, dict) else None
        if isinstance(generation, bool) or not isinstance(generation, int) or generation < 0:
            raise MgmtError("the broker's VM list carries no .nvram generations; upgrade the broker or give --offline")
        recorded[str(vm.get("vm_uuid"))] = generation
    return recorded


if __name__ == "__main__":
    sys.exit(main())
