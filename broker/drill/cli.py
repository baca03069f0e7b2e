"""`vtpm-drill`: lose the management plane, recover every vTPM, and prove it.

    vtpm-drill [--vms N] [--hosts H] [--lose management[,broker]] [--attest] [--workdir DIR] [--jobs J] [--json]
               [--keep] [--kms-port P]

Runs on 127.0.0.1 with real processes: a KMS, the broker, management
instance A, H hosts, N VMs with a real vTPM (swtpm) each. A guest step
writes a distinct secret into an NV index and reads the EK certificate;
then A's state directory is destroyed and A revoked (a power-on now fails);
instance B enrolls, re-registers the hosts and the datastore's VMs, and
every VM must power on with the same NV secret, a byte-identical EK
certificate chaining to the broker's EK CA, and the same KEK.

`--lose management,broker` loses the broker host too: a backup is taken
while the broker serves (its master key kept apart), then after instance A
is lost the broker process is killed and its directory deleted, and a new
broker is restored from the backup in a new directory on new ports; before
the recovery's power-on, every VM's generation-1 copy of its .nvram is put
back and must be refused as a rollback by the restored broker's records.

`--attest` (at least 2 hosts) runs it with host attestation on: each host
has its own TPM (swtpm), enrolls it and attests against a default policy
captured from the first host; after the recovery the last host reboots into
a tampered boot (one unexpected measurement more in PCR 7), and its VMs'
power-ons must be refused while every other VM recovers.

Exit status: 0 every VM recovered (with `--attest`: every VM not on the
tampered host, and every one on it refused), 1 some did not, 2 the drill
could not run (one line on stderr). `--json` prints {vms, recovered,
nv_match, ek_match, kek_match, broker_restored, rollback_refused, attest,
attested_hosts, tampered_host, tampered_vms, tampered_refused, seconds,
failures, audit} on stdout, the narrative on stderr:
`ek_match` counts EK certificates byte-identical to the one read before the
disaster *and* chaining to the broker's EK CA; `recovered` counts VMs whose
every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NoReturn

from kmip_core.progress import Progress

__all__ = ["main"]

PROG = "vtpm-drill"
TOOLS = {
    "swtpm": "swtpm",
    "swtpm_setup": "swtpm-tools",
    "tpm2_nvdefine": "tpm2-tools",
    "tpm2_nvwrite": "tpm2-tools",
    "tpm2_nvread": "tpm2-tools",
}
# --attest: the host TPMs' tools too.
ATTEST_TOOLS = {
    "tpm2_createek": "tpm2-tools",
    "tpm2_createak": "tpm2-tools",
    "tpm2_activatecredential": "tpm2-tools",
    "tpm2_quote": "tpm2-tools",
    "tpm2_pcrextend": "tpm2-tools",
}


class _Usage(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _Usage(f"{message}; see '{PROG} --help'")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Disaster-recovery drill of the vTPM key broker, with real processes")
    p.add_argument("--vms", type=int, default=10, metavar="N", help="VMs with a vTPM (default 10)")
    p.add_argument("--hosts", type=int, default=2, metavar="H", help="hosts (default 2)")
    p.add_argument(
        "--lose",
        default="management",
        metavar="WHAT",
        help="what the disaster takes: management (the default) or management,broker (the broker host too)",
    )
    p.add_argument(
        "--attest",
        action="store_true",
        help="with host attestation: every host attests with its own TPM; after the recovery the last host boots "
        "tampered and must be refused its VMs (needs --hosts 2 or more)",
    )
    p.add_argument("--workdir", metavar="DIR", help="work here and keep it (default: a temporary directory, removed)")
    p.add_argument("--jobs", type=int, metavar="J", help="VMs handled at once (default: 4 per CPU, at most 32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument(
        "--kms-port", type=int, default=0, metavar="P", help="the drill's KMS listens here (default: a free port)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary work directory")
    from kmip_core import __version__, cliopts

    return cliopts.conventions(p, version=__version__, log_level=True)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {' '.join(message.split()) or 'failed'}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        _check_args(args)
    except _Usage as exc:
        return _fail(str(exc))
    tools = {**TOOLS, **ATTEST_TOOLS} if args.attest else TOOLS
    missing = sorted({package for tool, package in tools.items() if shutil.which(tool) is None})
    if missing:
        return _fail(f"the drill needs swtpm and tpm2-tools; on Debian: apt-get install {' '.join(missing)}")
    jobs = args.jobs or min(32, 4 * (os.cpu_count() or 1))

    from broker.drill.runner import ToolPool

    # The pool first: its workers are forked before any thread exists.
    with ToolPool(jobs) as pool:
        return _drill(args, pool, jobs)


def _check_args(args) -> None:
    if not 1 <= args.vms <= 1000:
        raise _Usage("--vms must be between 1 and 1000")
    if not 0 <= args.kms_port <= 65535:
        raise _Usage("--kms-port must be between 0 and 65535")
    if not 1 <= args.hosts <= 64:
        raise _Usage("--hosts must be between 1 and 64")
    if args.attest and args.hosts < 2:
        raise _Usage(
            "--attest needs --hosts 2 or more: the last host boots tampered, the others must recover their VMs"
        )
    if args.jobs is not None and not 1 <= args.jobs <= 128:
        raise _Usage("--jobs must be between 1 and 128")
    lose = frozenset(part.strip() for part in args.lose.split(","))
    if "management" not in lose or not lose <= {"management", "broker"}:
        raise _Usage("--lose must be management or management,broker")
    args.lose = lose
    if args.workdir is not None:
        workdir = Path(args.workdir)
        if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
            raise _Usage(f"--workdir {workdir} must be a new or empty directory")


def _drill(args, pool, jobs: int) -> int:
    from rich.console import Console

    from broker.drill.processes import StepFailed
    from broker.drill.scenario import Drill

    console = Console(stderr=args.json, highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)
    if args.workdir:
        workdir = Path(args.workdir).absolute()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="vtpm-drill-"))
    console.print(
        f"[bold]vtpm-drill[/bold]: {args.vms} VMs on {args.hosts} hosts, {jobs} at a time, in {workdir}; "
        f"the disaster takes {' and the '.join(sorted(args.lose, reverse=True))}"
        + ("; host attestation on, the last host boots tampered after the recovery" if args.attest else ""),
        markup=True,
    )
    started = time.monotonic()
    progress = _Progress(console)
    drill = Drill(
        workdir,
        args.vms,
        args.hosts,
        pool,
        jobs,
        say=console.print,
        progress=progress.batch,
        lose=args.lose,
        ticker=progress.ticker,
        kms_port=args.kms_port,
        attest=args.attest,
    )
    failure = None
    try:
        drill.run()
    except StepFailed as exc:
        failure = str(exc)
    except KeyboardInterrupt:
        failure = "interrupted"
    finally:
        try:
            drill.stop()
        finally:
            seconds = time.monotonic() - started
            if not args.workdir and not args.keep and failure is None:
                shutil.rmtree(workdir, ignore_errors=True)
    if failure is not None:
        print(f"{PROG}: the work directory is kept for inspection: {workdir}", file=sys.stderr)
        if args.json:
            print(json.dumps(_summary(drill, seconds, [f"the drill stopped: {failure}"])))
        return _fail(failure)
    return _report(console, drill, seconds, args.json)


class _Progress:
    """vtpm-drill's progress (kmip_core.progress): a bar per batch of VMs and
    per counted step, and around every step a ticker that says it still runs,
    so that `vtpm-drill > log` is never silent for more than 5 s. On a terminal
    rich draws them; off one, plain lines. One display at a time: a batch's
    bar ends its step's ticker."""

    def __init__(self, console):
        self.console = console
        self.tty = bool(console.is_terminal)
        self.step: Progress | None = None

    def _new(self, label: str, total: int | None, **kwargs) -> Progress:
        return Progress(
            label,
            total,
            stream=self.console.file,
            tty=self.tty,
            console=self.console if self.tty else None,
            prefix=f"{PROG}: ",
            transient=True,
            **kwargs,
        )

    @contextlib.contextmanager
    def ticker(self, title: str) -> Iterator[None]:
        self.step = self._new(title, None, announce=False, final=False)
        with self.step:
            yield
        self.step = None

    def batch(self, label: str, total: int) -> Callable[[], None]:
        if self.step is not None:
            self.step.close()
        progress = self._new(label, total).start()
        if total == 0:
            progress.close()

        def advance() -> None:
            progress.advance()
            if progress.done >= total:
                progress.close()

        return advance


def _report(console, drill, seconds: float, as_json: bool) -> int:
    from rich.table import Table

    vms = drill.vms
    tampered = {vm.name for vm in drill.tampered_vms()}
    failures = [f"{vm.name}: {error}" for vm in vms for error in vm.errors]
    for vm in vms:
        if vm.errors:
            continue
        checks = [("KEK changed or missing in the KMS", vm.kek_match)]
        if vm.name not in tampered:
            # A VM refused for its tampered host has no vTPM to compare; its KEK must still be intact.
            checks = [
                ("NV secret differs", vm.nv_match),
                ("EK certificate differs", vm.ek_match),
                ("EK certificate does not chain to the broker's EK CA", vm.ek_chains),
                *checks,
            ]
        failures += [f"{vm.name}: {what}" for what, ok in checks if not ok]

    table = Table(title="vTPMs before the disaster and after the recovery")
    for column in ("VM", "host A → B", "KEK (KMS key id)", "NV secret", "EK certificate", "chains to EK CA", "result"):
        table.add_column(column)
    for vm in vms:
        table.add_row(
            vm.name,
            f"{vm.host_before or '-'} → {vm.host_after or '-'}",
            (vm.kek_before[:18] + ("…" if len(vm.kek_before) > 18 else "")) + ("" if vm.kek_match else " ✗"),
            "same" if vm.nv_match else "DIFFERENT" if vm.secret_after is not None else "-",
            f"same ({len(vm.ek_after)} bytes)" if vm.ek_match and vm.ek_after else "DIFFERENT" if vm.ek_after else "-",
            "yes" if vm.ek_chains else "-" if vm.attestation_refused else "NO",
            "[green]recovered[/green]"
            if vm.recovered
            else "[yellow]refused: host tampered[/yellow]"
            if vm.attestation_refused and not vm.errors
            else "[red]FAILED[/red]",
        )
    console.print(table)
    for line in failures:
        console.print(f"[red]FAILED[/red] {line}", markup=True)
    summary = _summary(drill, seconds, failures)
    # With --attest, the tampered host's VMs are expected refusals, not VMs to recover.
    n = summary["vms"] - summary["tampered_vms"]
    lost = "vcenter-a and the broker host (restored from its backup)" if drill.lose_broker else "vcenter-a"
    rollback = f", stale .nvram refused {summary['rollback_refused']}/{summary['vms']}" if drill.lose_broker else ""
    console.print(
        f"[bold]{summary['recovered']}/{n} VMs recovered[/bold] after losing {lost}: "
        f"NV secret {summary['nv_match']}/{n}, EK certificate {summary['ek_match']}/{n}, "
        f"KEK {summary['kek_match']}/{summary['vms']}{rollback}; {seconds:.1f} s end to end",
        markup=True,
    )
    if drill.attest:
        console.print(
            f"[bold]host attestation[/bold]: {summary['attested_hosts']}/{len(drill.hosts)} hosts attested; "
            f"{drill.tampered_host} booted tampered after the recovery: {summary['tampered_refused']}/"
            f"{summary['tampered_vms']} of its VMs refused their power-on, as they must be"
            + (f" ({drill.tampered_error})" if drill.tampered_error else ""),
            markup=True,
        )
    if as_json:
        print(json.dumps(summary))
    ok = summary["recovered"] == n and summary["tampered_refused"] == summary["tampered_vms"] and not failures
    if drill.attest:
        ok = ok and summary["attested_hosts"] == len(drill.hosts)
    return 0 if ok else 1


def _summary(drill, seconds: float, failures: list[str]) -> dict:
    vms = drill.vms
    return {
        "vms": drill.vm_count,
        "recovered": sum(1 for vm in vms if vm.recovered),
        "nv_match": sum(1 for vm in vms if vm.nv_match),
        "ek_match": sum(1 for vm in vms if vm.ek_match and vm.ek_chains),
        "kek_match": sum(1 for vm in vms if vm.kek_match),
        "broker_restored": drill.broker_restored,
        "rollback_refused": sum(1 for vm in vms if vm.rollback_refused),
        "attest": drill.attest,
        "attested_hosts": drill.attested_hosts,
        "tampered_host": drill.tampered_host,
        "tampered_vms": len(drill.tampered_vms()),
        "tampered_refused": sum(1 for vm in drill.tampered_vms() if vm.attestation_refused),
        "seconds": round(seconds, 2),
        "failures": failures,
        "audit": {
            "broker_records": drill.audit.get("records", 0),
            "broker_intact": not drill.audit.get("problems"),
            "kms_records": drill.audit.get("kms", {}).get("records", 0),
            "kms_intact": drill.audit.get("kms", {}).get("intact", False),
            "steps": drill.audit.get("steps", []),
            "attest_refused": drill.audit.get("attest_refused", []),
        },
    }


if __name__ == "__main__":
    sys.exit(main())
