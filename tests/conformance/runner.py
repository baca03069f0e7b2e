"""Run OASIS KMIP profile test flows against a real kms-server.

Each flow runs on its own mutual-TLS connection with its own client
identity (a certificate issued for the flow), so the objects of one flow are
invisible to the Locate of another, as on the fresh server each test case
assumes. Requests are sent in the order of the file; the first response
that differs from the expected one ends the flow and is its failure.

`python tests/conformance/runner.py` (what `make conformance` runs) starts
its own server, runs every flow of 1.4, 2.0 and 2.1, prints the figures and
writes the per-flow list to build/conformance.txt.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
REPO = TESTS.parent
for p in (str(TESTS), str(REPO)):
    if p not in sys.path:
        sys.path.insert(0, p)

from conformance import compare, kmip_xml  # noqa: E402
from conformance.known import KNOWN, reason_for  # noqa: E402
from kmip_client import RawClient  # noqa: E402

from kmip_core import ttlv  # noqa: E402


def _vectors_dir() -> Path:
    """../shared/vectors/oasis beside the checkout (how CI lays it out), or
    the workplace's copy when the checkout sits elsewhere (a clone in /tmp);
    KMS_OASIS_VECTORS overrides both."""
    import os

    if os.environ.get("KMS_OASIS_VECTORS"):
        return Path(os.environ["KMS_OASIS_VECTORS"]).resolve()
    for candidate in (REPO.parent / "shared" / "vectors" / "oasis", Path("/work/shared/vectors/oasis")):
        if candidate.is_dir():
            return candidate.resolve()
    return (REPO.parent / "shared" / "vectors" / "oasis").resolve()


VECTORS = _vectors_dir()
VERSIONS = ("1.4", "2.0", "2.1")
KINDS = ("mandatory", "optional")
SERIES = ("SASED", "TL")


@dataclass(frozen=True)
class Flow:
    version: str
    kind: str
    path: Path

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def series(self) -> str | None:
        """Flows that build on the objects of the one before (SASED-M-3
        locates what SASED-M-2 registered) share a client identity and run
        in file order."""
        prefix = self.name.split("-", 1)[0]
        return f"{self.version}-{prefix}" if prefix in SERIES else None

    @property
    def client(self) -> str:
        if self.series:
            return "conf-" + self.series
        return "conf-" + re.sub(r"[^A-Za-z0-9_.-]", "_", self.name)


@dataclass
class Result:
    flow: Flow
    status: str  # "passed", "failed" or "skipped"
    detail: str = ""
    seconds: float = 0.0


def flows(root: Path = VECTORS, versions=VERSIONS, kinds=KINDS) -> list[Flow]:
    found = []
    for version in versions:
        for kind in kinds:
            directory = root / f"v{version}" / "XML" / kind
            found += [Flow(version, kind, p) for p in sorted(directory.glob("*.xml"), key=_natural)]
    return found


def _natural(path: Path):
    return [int(s) if s.isdigit() else s for s in re.split(r"(\d+)", path.stem)]


# The PKI: one CA and server certificate, one client certificate per flow.
class FlowPki:
    def __init__(self, directory: Path):
        from kmip_core.pki import init_pki

        self.directory = directory
        init_pki(directory, server_names=["localhost"], clients=[], key_type="ec")
        self._lock = threading.Lock()

    def client(self, name: str) -> str:
        from kmip_core.pki import issue_client

        with self._lock:
            if not (self.directory / f"{name}.pem").exists():
                issue_client(self.directory, name, key_type="ec")
        return name


class TlsTransport:
    """A real server over mutual TLS, one client certificate per flow."""

    def __init__(self, host: str, port: int, pki: FlowPki):
        self.host, self.port, self.pki = host, port, pki

    def connect(self, client_name: str):
        return RawClient(self.host, self.port, self.pki.directory, client=self.pki.client(client_name), timeout=60)


class InProcessTransport:
    """The dispatcher and operations in this process over an in-memory
    store, no TLS: for working on the server, not for the figures."""

    def __init__(self):
        import os

        from kmip_core.sealing.barrier import Barrier
        from kmip_core.server.dispatcher import Dispatcher
        from kms_server.keystore.keystore import Keystore
        from kms_server.operations import OPERATIONS
        from kms_server.storage import open_storage

        self.dispatcher = Dispatcher(Keystore(open_storage("memory://"), Barrier(os.urandom(32))), OPERATIONS)

    def connect(self, client_name: str):
        from kmip_core.policy import Principal
        from kmip_core.server.dispatcher import ConnectionInfo

        dispatcher = self.dispatcher
        conn = ConnectionInfo(Principal(client_name), "in-process")

        class _Client:
            def request(self, data: bytes):
                response = dispatcher.handle(data, conn)
                return None if response is None else ttlv.decode(response)

            def close(self):
                pass

        return _Client()


# Objects whose key material the server generated, per series identity
# (unique identifiers are unique per server, so sharing across runs is safe).
_SERIES_GENERATED: dict[str, set[str]] = {}


def run_flow(flow: Flow, host: str, port: int, pki: FlowPki, tolerance: float = 120.0) -> Result:
    return run_flow_on(flow, TlsTransport(host, port, pki), tolerance)


def run_flow_on(flow: Flow, transport, tolerance: float = 120.0) -> Result:
    started = time.monotonic()
    try:
        exchanges = kmip_xml.load(flow.path)
        # Any tag, type or enumeration this converter cannot map makes the
        # flow unrunnable rather than failed.
        for exchange in exchanges:
            _check_convertible(exchange.request)
            _check_convertible(exchange.response)
    except kmip_xml.VectorError as exc:
        return Result(flow, "skipped", f"cannot encode the test case: {exc}", time.monotonic() - started)
    state = compare.FlowState()
    if flow.series:
        # TL-M-3 gets the key TL-M-2 had the server generate: its material
        # is the server's choice there too.
        state.generated = _SERIES_GENERATED.setdefault(flow.client, set())
    client = transport.connect(flow.client)
    try:
        for exchange in exchanges:
            where = f"message {exchange.index + 1} ({_operations(exchange.request)})"
            now = time.time()
            state.bind_unbound(exchange.request)
            try:
                request = kmip_xml.encode_request(exchange.request, state.bindings, now, state.substitutions)
            except kmip_xml.VectorError as exc:
                return Result(flow, "failed", f"{where}: {exc}", time.monotonic() - started)
            response = client.request(request)
            request_item = ttlv.decode(request)
            if response is None:
                # The server closed the connection; later requests need a new one.
                client.close()
                client = transport.connect(flow.client)
            try:
                compare.Comparator(state, now, tolerance).message(exchange.response, response, request_item)
            except compare.Difference as exc:
                return Result(flow, "failed", f"{where}: {exc}", time.monotonic() - started)
    finally:
        client.close()
    return Result(flow, "passed", "", time.monotonic() - started)


def _check_convertible(element) -> None:
    for el in element.iter():
        kmip_xml.tag_of(el)
        item_type = kmip_xml.type_of(el)
        value = el.get("value")
        if value is None or kmip_xml.is_placeholder(value) or kmip_xml.now_value(value, 0) is not None:
            continue
        if item_type.name == "ENUMERATION":
            parent = _parent_attribute_name(element, el)
            kmip_xml.enum_value(value, el.tag, parent)


def _parent_attribute_name(root, target):
    for parent in root.iter():
        if target in list(parent):
            return kmip_xml.attribute_name_for(parent)
    return None


def _operations(request) -> str:
    ops = [el.get("value") for el in request.findall("BatchItem/Operation")]
    return ", ".join(ops)


def run_all(selected: list[Flow], transport, workers: int) -> list[Result]:
    """Flows in parallel, except that a series runs in order in one worker."""
    groups: dict[str, list[Flow]] = {}
    for flow in selected:
        groups.setdefault(flow.series or flow.path.as_posix(), []).append(flow)
    with ThreadPoolExecutor(workers) as pool:
        done = pool.map(lambda group: [run_flow_on(f, transport) for f in group], groups.values())
        by_flow = {r.flow: r for rs in done for r in rs}
    return [by_flow[f] for f in selected]


# `make conformance`.
def summarize(results: list[Result]) -> list[str]:
    lines = [f"{'version':8} {'set':10} {'passed':>6} {'failed':>6} {'skipped':>7} {'total':>5}"]
    for version in VERSIONS:
        for kind in KINDS:
            rs = [r for r in results if r.flow.version == version and r.flow.kind == kind]
            if not rs:
                continue
            counts = {s: sum(r.status == s for r in rs) for s in ("passed", "failed", "skipped")}
            lines.append(
                f"{version:8} {kind:10} {counts['passed']:>6} {counts['failed']:>6} {counts['skipped']:>7} {len(rs):>5}"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--versions", default=",".join(VERSIONS))
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--only", default="", help="regular expression on flow names")
    parser.add_argument("--out", default=str(REPO / "build" / "conformance.txt"))
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--vectors", default=str(VECTORS))
    parser.add_argument("--in-process", action="store_true", help="no server process, no TLS (development only)")
    parser.add_argument("--doc", default="", help="also write the figures and the reasons as Markdown here")
    args = parser.parse_args(argv)

    from conftest import start_server

    selected = [
        f
        for f in flows(Path(args.vectors), tuple(args.versions.split(",")), tuple(args.kinds.split(",")))
        if not args.only or re.search(args.only, f.name)
    ]
    started = time.monotonic()
    if args.in_process:
        transport = InProcessTransport()
        results = run_all(selected, transport, args.workers)
        return report(results, time.monotonic() - started, Path(args.out), args.doc, "in-process")
    with tempfile.TemporaryDirectory(prefix="kms-conformance-") as tmp:
        pki = FlowPki(Path(tmp) / "pki")
        server = start_server(Path(tmp) / "node", pki.directory, log_level="WARNING")
        try:
            results = run_all(selected, TlsTransport(server.host, server.port, pki), args.workers)
        finally:
            server.stop()
    return report(results, time.monotonic() - started, Path(args.out), args.doc, "kms-server over mutual TLS")


def report(results: list[Result], elapsed: float, out: Path, doc: str = "", how: str = "") -> int:
    lines = [f"{r.flow.version} {r.flow.kind:9} {r.flow.name:28} {r.status.upper():7} {r.detail}" for r in results]
    for r in results:
        if r.status != "passed" and r.flow.name in KNOWN:
            lines[results.index(r)] += f"  [known: {reason_for(r.flow.name)}]"
    out.parent.mkdir(parents=True, exist_ok=True)
    summary = summarize(results)
    out.write_text("\n".join(summary + ["", f"{len(results)} flows in {elapsed:.1f} s", ""] + lines) + "\n")
    print("\n".join(summary))
    print(f"{len(results)} flows in {elapsed:.1f} s; per-flow list in {out}")
    if doc:
        write_doc(Path(doc), results, elapsed, how, summary)
    unexpected = [r for r in results if r.status == "passed" and r.flow.name in KNOWN]
    regressions = [r for r in results if r.status != "passed" and r.flow.name not in KNOWN]
    for r in unexpected:
        print(f"now passes, remove from tests/conformance/known.py: {r.flow.name}")
    for r in regressions:
        print(f"fails and is not listed as known: {r.flow.name}: {r.detail}")
    return 0


def write_doc(path: Path, results: list[Result], elapsed: float, how: str, summary: list[str]) -> None:
    """docs/conformance.md: the figures of this run and, for every flow that
    does not pass, the reason from known.py (or the failure itself)."""
    lines = [
        "# OASIS KMIP profile conformance",
        "",
        "The OASIS KMIP profile test flows (the published XML test cases, 1.4, 2.0 and 2.1,",
        "mandatory and optional) run against the server by `make conformance`",
        "(tests/conformance/runner.py: one flow per client identity, responses compared",
        "field by field as tests/conformance/compare.py describes). `make test` runs the",
        "1.4 mandatory flows as pytest cases, the ones below marked xfail(strict).",
        "",
        f"Figures of one run ({how}, {len(results)} flows in {elapsed:.1f} s):",
        "",
        "```",
        *summary,
        "```",
        "",
        "## Flows that do not pass",
        "",
        "| version | set | flow | reason |",
        "| --- | --- | --- | --- |",
    ]
    for r in results:
        if r.status == "passed":
            continue
        reason = reason_for(r.flow.name)
        if not reason:
            reason = f"{r.status}: {r.detail}"
        elif r.status == "failed" and not _matches_known(r):
            reason = f"{reason}. In this run: {r.detail}"
        reason = reason.replace("|", "\\|")
        lines.append(f"| {r.flow.version} | {r.flow.kind} | {r.flow.name} | {reason} |")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _matches_known(result: Result) -> bool:
    """Whether the failure is the one known.py explains (same refusal);
    used only to add this run's detail where it differs."""
    return "GENERAL_FAILURE" not in result.detail and "RESULT_STATUS" not in result.detail


if __name__ == "__main__":
    sys.exit(main())
