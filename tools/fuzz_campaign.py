#!/usr/bin/env python3
"""A bounded fuzz campaign against real server processes on 127.0.0.1.

    tools/fuzz_campaign.py [--target kms|broker-api] [--messages N] [--seconds S]
        [--batch B] [--timeout T] [--seed N] [--report FILE] [--keep]

`--target kms` (the default) starts a kms-server (mutual TLS, a free port,
a temporary directory, set up with the operator's own commands as
broker.drill.processes does) and sends it mutated KMIP messages made from
the captured vCenter and OASIS requests in tests/fixtures/fuzz/: bit flips,
corrupted lengths and type bytes, truncation, deep nesting, oversized
declared lengths, structure-aware value and shape changes, pipelined frames
and abrupt closes. `--target broker-api` starts a KMS and a vtpm-broker,
enrolls a management instance and a host, and sends mutated HTTPS requests
(methods, paths, headers, JSON bodies) to the broker's API.

After every batch it checks that the server still answers a well-formed
request (DiscoverVersions; GET /v1/vms for the broker) within the timeout.
It stops after N messages or S seconds, whichever comes first, stops the
servers it started and reports: messages sent, connections, crashes
(server exits; the server is restarted and the campaign goes on), hangs
(no answer and no close within the timeout, for a complete frame or a
health check), malformed answers, 5xx answers, tracebacks in the server's
log, open file descriptors and the RSS growth of the server process (from
/proc). Inputs that hung, crashed or got a 5xx are written beside the
report. The exit status is 1 if there was a crash or a hang.

Only 127.0.0.1 is ever contacted.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import socket
import ssl
import struct
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kmip.core import enums  # noqa: E402

from broker.drill import processes  # noqa: E402
from kmip_core import ttlv  # noqa: E402
from kmip_core.ttlv import Item, ItemType  # noqa: E402

HOST = "127.0.0.1"
SEED_FILES = [ROOT / "tests" / "fixtures" / "fuzz" / name for name in ("vcenter-requests.hex", "oasis-requests.hex")]
REQUEST_MESSAGE = enums.Tags.REQUEST_MESSAGE.value
MAX_MESSAGE = 1 << 20  # kms-server's default [server] max_message_size
T = enums.Tags


# --- Figures ----------------------------------------------------------------------------------


@dataclass
class Figures:
    target: str
    messages: int = 0
    connections: int = 0
    answers: int = 0
    closed_by_server: int = 0
    malformed_answers: int = 0
    server_errors: int = 0  # broker: 5xx answers
    crashes: int = 0
    hangs: int = 0
    health_checks: int = 0
    health_failures: int = 0
    tracebacks: int = 0
    traceback_kinds: dict[str, int] = field(default_factory=dict)
    error_lines: int = 0
    rss_start_kib: int = 0
    rss_peak_kib: int = 0
    rss_end_kib: int = 0
    fds_start: int = 0
    fds_end: int = 0
    files_start: dict[str, int] = field(default_factory=dict)
    files_end: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    samples: list[dict] = field(default_factory=list)

    def sample(self, kind: str, data: bytes, note: str = "") -> None:
        if len(self.samples) < 50:
            self.samples.append({"kind": kind, "note": note, "hex": data[:4096].hex()})


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a live process, from /proc."""
    rss = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return 0, 0
    return rss, fds


def open_files(pid: int) -> dict[str, int]:
    """What the process's descriptors point at, by kind (socket, pipe, a
    file's name): a connection the server never closed is a socket too many."""
    kinds: dict[str, int] = {}
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            kind = target.split(":", 1)[0] if target.startswith(("socket:", "pipe:", "anon_inode:")) else Path(target).name
            kinds[kind] = kinds.get(kind, 0) + 1
    except (FileNotFoundError, PermissionError):
        pass
    return kinds


TRACEBACK_END = re.compile(r"^[\w.]+(Error|Exception|Exit|Interrupt)\b.*")


def count_tracebacks(log: list[str], figures: Figures, start: int) -> int:
    """Count the tracebacks in log[start:] and the kind of each (its last
    line); returns the new start."""
    in_traceback = False
    for line in log[start:]:
        if " ERROR " in line or " CRITICAL " in line:
            figures.error_lines += 1
        if line.startswith("Traceback (most recent call last)"):
            figures.tracebacks += 1
            in_traceback = True
        elif in_traceback and TRACEBACK_END.match(line):
            kind = line[:160]
            figures.traceback_kinds[kind] = figures.traceback_kinds.get(kind, 0) + 1
            in_traceback = False
    return len(log)


# --- Mutations of KMIP messages ---------------------------------------------------------------


def load_seeds() -> list[bytes]:
    seeds = []
    for path in SEED_FILES:
        seeds += [bytes.fromhex(line) for line in path.read_text().splitlines() if line and not line.startswith("#")]
    return seeds


EDGE_INTS = [0, 1, -1, 2**31 - 1, -(2**31), 255, 256, 4096, 0x7FFFFFF8]
EDGE_LENGTHS = [0, 1, 7, 8, 9, 16, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFF8, MAX_MESSAGE, MAX_MESSAGE + 8, 2**31]
ALL_TAGS = [t.value for t in enums.Tags]


def random_value(rng: random.Random, item_type: ItemType):
    if item_type == ItemType.INTEGER:
        return rng.choice([rng.choice(EDGE_INTS), rng.randint(-(2**31), 2**31 - 1)])
    if item_type in (ItemType.LONG_INTEGER, ItemType.DATE_TIME, ItemType.DATE_TIME_EXTENDED):
        return rng.choice([0, -1, 2**63 - 1, -(2**63), rng.randint(-(2**63), 2**63 - 1)])
    if item_type == ItemType.BIG_INTEGER:
        return rng.choice([0, -1, 2**64, -(2**2047), rng.randint(-(2**300), 2**300)])
    if item_type in (ItemType.ENUMERATION, ItemType.INTERVAL):
        return rng.choice([0, 1, 2**32 - 1, 0x80000000, rng.randint(0, 2**32 - 1), rng.randint(0, 64)])
    if item_type == ItemType.BOOLEAN:
        return rng.random() < 0.5
    if item_type == ItemType.TEXT_STRING:
        return rng.choice(["", "1", "x-Name", "Cryptographic Algorithm", "State", "\x00", "é" * 300, "A" * rng.randint(0, 5000)])
    if item_type == ItemType.BYTE_STRING:
        return rng.choice([b"", bytes(16), bytes(32), os.urandom(rng.randint(0, 64)), bytes(rng.randint(0, 70000))])
    raise AssertionError(item_type)


def _positions(item: Item, path=()):
    yield path
    for i, child in enumerate(item.children()):
        yield from _positions(child, path + (i,))


def _at(item: Item, path):
    for i in path:
        item = item.value[i]
    return item


def _replace(item: Item, path, new: Item | None) -> Item:
    if not path:
        return new
    children = list(item.value)
    if len(path) == 1:
        if new is None:
            del children[path[0]]
        else:
            children[path[0]] = new
    else:
        children[path[0]] = _replace(children[path[0]], path[1:], new)
    return Item(item.tag, item.type, tuple(children))


def mutate_tree(rng: random.Random, item: Item) -> Item:
    for _ in range(rng.randint(1, 4)):
        spots = list(_positions(item))
        path = rng.choice(spots)
        target = _at(item, path)
        kind = rng.choice(["value", "value", "value", "retype", "remove", "duplicate", "retag", "insert", "wrap"])
        if kind == "value" and target.type != ItemType.STRUCTURE:
            item = _replace(item, path, Item(target.tag, target.type, random_value(rng, target.type)))
        elif kind == "retype" and path:
            new_type = rng.choice([t for t in ItemType if t != ItemType.STRUCTURE])
            item = _replace(item, path, Item(target.tag, new_type, random_value(rng, new_type)))
        elif kind == "remove" and path:
            item = _replace(item, path, None)
        elif kind == "duplicate" and path:
            parent = _at(item, path[:-1])
            children = list(parent.value)
            children.insert(path[-1], target)
            item = _replace(item, path[:-1], Item(parent.tag, parent.type, tuple(children)))
        elif kind == "retag" and path:
            item = _replace(item, path, target.retag(rng.choice(ALL_TAGS)))
        elif kind == "insert" and target.type == ItemType.STRUCTURE:
            leaf_type = rng.choice([t for t in ItemType if t != ItemType.STRUCTURE])
            children = list(target.value)
            children.insert(rng.randint(0, len(children)), Item(rng.choice(ALL_TAGS), leaf_type, random_value(rng, leaf_type)))
            item = _replace(item, path, Item(target.tag, target.type, tuple(children)))
        elif kind == "wrap" and path:
            wrapped = target
            for _ in range(rng.randint(1, 40)):
                wrapped = Item(target.tag, ItemType.STRUCTURE, (wrapped,))
            item = _replace(item, path, wrapped)
    return item


def header_offsets(data: bytes) -> list[int]:
    """Offsets of the item headers of a well-formed encoding."""
    found, stack = [], [(0, len(data))]
    while stack:
        pos, end = stack.pop()
        while pos + 8 <= end:
            found.append(pos)
            length = int.from_bytes(data[pos + 4 : pos + 8], "big")
            padded = (length + 7) // 8 * 8
            if data[pos + 3] == ItemType.STRUCTURE:
                stack.append((pos + 8, min(end, pos + 8 + length)))
            pos += 8 + padded
    return found


def mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    headers = header_offsets(data) or [0]
    for _ in range(rng.randint(1, 4)):
        if not out:
            out += os.urandom(8)
        kind = rng.choice(["length", "length", "type", "tag", "bitflip", "bitflip", "truncate", "splice", "delete"])
        offset = rng.choice([h for h in headers if h + 8 <= len(out)] or [0])
        if kind == "length" and offset + 8 <= len(out):
            old = int.from_bytes(out[offset + 4 : offset + 8], "big")
            new = rng.choice(EDGE_LENGTHS + [old + 1, old - 1, old + 8, old - 8, old * 2])
            out[offset + 4 : offset + 8] = (new % 2**32).to_bytes(4, "big")
        elif kind == "type" and offset + 4 <= len(out):
            out[offset + 3] = rng.randint(0, 255)
        elif kind == "tag" and offset + 3 <= len(out):
            out[offset : offset + 3] = rng.randint(0, 2**24 - 1).to_bytes(3, "big")
        elif kind == "bitflip":
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(len(out))
                out[position] ^= 1 << rng.randint(0, 7)
        elif kind == "truncate":
            out = out[: rng.randint(0, len(out))]
        elif kind == "splice":
            position = rng.randint(0, len(out))
            out[position:position] = os.urandom(rng.randint(1, 24))
        elif kind == "delete":
            start = rng.randrange(len(out))
            del out[start : start + rng.randint(1, 16)]
    return bytes(out)


def reframe(body_and_header: bytes) -> bytes:
    """The bytes with a valid Request Message frame header around what
    follows the first 8, padded to a multiple of 8: the server reads the
    whole frame and hands it to the decoder."""
    body = body_and_header[8:]
    body += bytes(-len(body) % 8)
    return REQUEST_MESSAGE.to_bytes(3, "big") + bytes([ItemType.STRUCTURE]) + len(body).to_bytes(4, "big") + body


def deep_nesting(rng: random.Random, seed: Item) -> bytes:
    levels = rng.choice([31, 32, 33, 100, 1000, 20000])
    inner = b""
    for _ in range(levels):
        inner = (0x420001).to_bytes(3, "big") + b"\x01" + len(inner).to_bytes(4, "big") + inner
    encoded = ttlv.encode(seed)
    return reframe(encoded[:8] + encoded[8:] + inner)


def oversized(rng: random.Random) -> bytes:
    length = rng.choice([MAX_MESSAGE, MAX_MESSAGE + 8, 0x7FFFFFF8, 0xFFFFFFF8, 2**31])
    return REQUEST_MESSAGE.to_bytes(3, "big") + b"\x01" + length.to_bytes(4, "big") + os.urandom(rng.choice([0, 8, 64]))


class Messages:
    def __init__(self, rng: random.Random):
        self.rng = rng
        self.seeds = load_seeds()
        self.items = [ttlv.decode(s) for s in self.seeds]

    def valid(self) -> bytes:
        return self.rng.choice(self.seeds)

    def mutated(self) -> bytes:
        rng = self.rng
        kind = rng.choices(["tree", "bytes", "bytes-framed", "nesting", "oversized", "garbage"], [30, 25, 30, 5, 5, 5])[0]
        seed = rng.choice(self.items)
        if kind == "tree":
            for _ in range(5):
                try:
                    return ttlv.encode(mutate_tree(rng, seed))
                except (ttlv.TTLVError, OverflowError, struct.error):
                    continue
            return ttlv.encode(seed)
        if kind == "bytes":
            return mutate_bytes(rng, ttlv.encode(seed))
        if kind == "bytes-framed":
            return reframe(mutate_bytes(rng, ttlv.encode(seed)))
        if kind == "nesting":
            return deep_nesting(rng, seed)
        if kind == "oversized":
            return oversized(rng)
        return os.urandom(rng.randint(1, 64))


def complete_frame(data: bytes) -> bool:
    """Whether the server has all of a frame it must answer or refuse."""
    if len(data) < 8:
        return False
    length = int.from_bytes(data[4:8], "big")
    return data[:3] == REQUEST_MESSAGE.to_bytes(3, "big") and data[3] == 1 and 8 + length == len(data) and length % 8 == 0 and len(data) <= MAX_MESSAGE


def discover_versions() -> bytes:
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            ttlv.structure(
                T.PROTOCOL_VERSION.value,
                [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, 1), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, 4)],
            ),
            ttlv.integer(T.BATCH_COUNT.value, 1),
        ],
    )
    item = ttlv.structure(
        T.BATCH_ITEM.value,
        [ttlv.enumeration(T.OPERATION.value, enums.Operation.DISCOVER_VERSIONS.value), ttlv.structure(T.REQUEST_PAYLOAD.value, [])],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, item]))


# --- The KMS target ----------------------------------------------------------------------------


class KmsTarget:
    name = "kms"

    def __init__(self, workdir: Path, timeout: float):
        self.workdir = workdir
        self.timeout = timeout
        self.kms = processes.start_kms(workdir / "kms")
        pki = self.kms.pki
        self.context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
        self.context.load_cert_chain(str(pki / "admin.pem"), str(pki / "admin.key"))

    @property
    def proc(self):
        return self.kms.service.proc

    @property
    def log(self) -> list[str]:
        return self.kms.service.log

    def restart(self) -> None:
        # The same directory: the node comes back with its database, as
        # after a real crash (`kms-admin pki init` keeps what exists).
        self.kms.service.stop(5)
        self.kms = processes.start_kms(self.workdir / "kms")

    def stop(self) -> int | None:
        return self.kms.service.stop()

    def connect(self, timeout: float | None = None) -> ssl.SSLSocket:
        raw = socket.create_connection((HOST, self.kms.port), timeout=timeout or self.timeout)
        return self.context.wrap_socket(raw, server_hostname=HOST)

    def read_frame(self, sock: ssl.SSLSocket, deadline: float) -> bytes | None:
        """One answer; b"" when the server closed; None at the deadline."""
        data = b""
        need = 8
        while len(data) < need:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = sock.recv(min(65536, need - len(data)))
            except TimeoutError:
                return None
            except (ssl.SSLError, OSError):
                return b""
            if not chunk:
                return b""
            data += chunk
            if len(data) == 8 and need == 8:
                need = 8 + int.from_bytes(data[4:8], "big")
        return data

    def health(self) -> bool:
        try:
            with self.connect() as sock:
                sock.sendall(discover_versions())
                answer = self.read_frame(sock, time.monotonic() + self.timeout)
        except (OSError, ssl.SSLError):
            return False
        if not answer:
            return False
        try:
            response = ttlv.decode(answer)
        except ttlv.TTLVError:
            return False
        item = response.find(T.BATCH_ITEM.value)
        return item is not None and item.get(T.RESULT_STATUS.value) == enums.ResultStatus.SUCCESS.value

    def session(self, rng: random.Random, messages: Messages, figures: Figures, budget: int) -> None:
        """One connection doing one of the things a hostile client does."""
        mode = rng.choices(["sequential", "pipelined", "abrupt", "reset", "no-tls"], [45, 30, 13, 8, 4])[0]
        if mode == "no-tls":
            self._no_tls(rng, figures)
            return
        try:
            sock = self.connect()
        except (OSError, ssl.SSLError):
            return
        figures.connections += 1
        try:
            if mode == "sequential":
                for _ in range(min(budget, rng.randint(1, 8))):
                    data = messages.mutated() if rng.random() < 0.85 else messages.valid()
                    sock.sendall(data)
                    figures.messages += 1
                    if not self._react(sock, data, figures, 1):
                        break
            elif mode == "pipelined":
                frames = [messages.mutated() if rng.random() < 0.5 else messages.valid() for _ in range(min(budget, rng.randint(2, 20)))]
                sock.sendall(b"".join(frames))
                figures.messages += len(frames)
                expected = 0
                for frame in frames:
                    if not complete_frame(frame):
                        break
                    expected += 1
                self._react(sock, b"".join(frames[:expected]), figures, expected, pipelined=True)
            else:
                frames = [messages.mutated() if rng.random() < 0.5 else messages.valid() for _ in range(rng.randint(1, 5))]
                data = b"".join(frames)
                if rng.random() < 0.5:
                    data = data[: rng.randint(1, len(data))]
                sock.sendall(data)
                figures.messages += len(frames)
                if mode == "reset":
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except (OSError, ssl.SSLError):
            figures.closed_by_server += 1
        finally:
            try:
                sock.close()
            except OSError:
                pass

    def _no_tls(self, rng: random.Random, figures: Figures) -> None:
        """A client that never completes TLS: a KMIP frame in the clear,
        garbage, or a ClientHello cut short, then a close."""
        try:
            with socket.create_connection((HOST, self.kms.port), timeout=self.timeout) as sock:
                figures.connections += 1
                figures.messages += 1
                sock.sendall(
                    rng.choice(
                        [
                            discover_versions(),
                            os.urandom(rng.randint(1, 512)),
                            bytes.fromhex("16030100") + os.urandom(rng.randint(0, 64)),
                        ]
                    )
                )
                sock.settimeout(0.2)
                try:
                    sock.recv(4096)
                except (TimeoutError, OSError):
                    pass
        except OSError:
            pass

    def _react(self, sock, data: bytes, figures: Figures, expected: int, pipelined: bool = False) -> bool:
        """Read up to `expected` answers; True while the connection is open.
        A frame the server cannot have whole (cut short, or declaring more
        than was sent) gets a short look only: waiting for the rest is right."""
        complete = pipelined or complete_frame(data)
        deadline = time.monotonic() + (self.timeout if complete and expected else 0.3)
        for _ in range(max(1, expected)):
            answer = self.read_frame(sock, deadline)
            if answer is None:
                if expected and complete:
                    figures.hangs += 1
                    figures.sample("hang", data, f"no answer or close within {self.timeout:g} s")
                return False
            if answer == b"":
                figures.closed_by_server += 1
                return False
            figures.answers += 1
            try:
                response = ttlv.decode(answer)
                if response.tag != T.RESPONSE_MESSAGE.value:
                    raise ttlv.TTLVError("not a Response Message")
            except ttlv.TTLVError as exc:
                figures.malformed_answers += 1
                figures.sample("malformed-answer", data, str(exc))
        return True


# --- The broker API target -------------------------------------------------------------------------

API_PATHS = [
    "/v1/enroll",
    "/v1/enrollments/{}",
    "/v1/hosts",
    "/v1/hosts/{}",
    "/v1/vms/register",
    "/v1/vms",
    "/v1/vms/{}/host",
    "/v1/vms/{}/dek",
    "/v1/vms/{}/nvram-generation",
    "/v1/vms/{}",
    "/v1/vtpm/ek-certificates",
    "/v1/audit",
    "/v1/instances",
    "/v1/instances/{}/approve",
    "/v1/instances/{}/reject",
    "/v1/instances/{}/revoke",
]
FIELDS = ["instance", "token", "csr_pem", "name", "vm_uuid", "host", "key_safe", "generation", "type", "key_type", "public_key_pem"]


def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randint(0, 9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**63, 10**30, rng.randint(-(10**6), 10**6)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-300])
    if kind in (4, 5, 6):
        return rng.choice(["", "vc-fuzz", "esx-fuzz", str(uuid.uuid4()), "x" * rng.randint(0, 70000), "\u0000", "é", "a\nb", "ek"])
    if kind in (7, 8):
        return [random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(FIELDS + ["x"]): random_json(rng, depth + 1) for _ in range(rng.randint(0, 5))}


class BrokerApiTarget:
    name = "broker-api"

    def __init__(self, workdir: Path, timeout: float):
        self.workdir = workdir
        self.timeout = timeout
        self.generation = 0
        self.kms = processes.start_kms(workdir / "kms")
        self._start_broker()

    def _start_broker(self) -> None:
        # A restart after a crash starts a broker of its own (`vtpm-broker
        # init` is for a new data directory) and enrolls again.
        self.generation += 1
        self.broker = processes.start_broker(self.workdir / f"broker-{self.generation}", self.kms, "kms-fuzz")
        self.anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.broker.trust_ca))
        self.identity = self._enroll("vc-fuzz")

    def _enroll(self, name: str) -> ssl.SSLContext:
        """Token, POST /v1/enroll, approval, poll: a context with the
        instance's certificate."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        csr_pem = csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
        token = self.broker.token(name)
        status, answer = self.call(self.anonymous, "POST", "/v1/enroll", {"instance": name, "token": token, "csr_pem": csr_pem})
        if status != 202:
            raise processes.StepFailed(f"enrollment refused: {status} {answer}")
        self.broker.admin("approve", name)
        status, done = self.call(
            self.anonymous, "GET", f"/v1/enrollments/{answer['enrollment_id']}", headers={"Authorization": f"Bearer {answer['poll_secret']}"}
        )
        directory = self.broker.workdir / "identity"
        directory.mkdir(exist_ok=True)
        (directory / f"{name}.pem").write_text(done["certificate_pem"])
        (directory / f"{name}.key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.broker.trust_ca))
        context.load_cert_chain(str(directory / f"{name}.pem"), str(directory / f"{name}.key"))
        return context

    def call(self, context, method: str, path: str, body=None, headers=None):
        connection = http.client.HTTPSConnection(HOST, self.broker.api_port, context=context, timeout=self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            connection.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            data = response.read()
            return response.status, (json.loads(data) if data else None)
        finally:
            connection.close()

    @property
    def proc(self):
        return self.broker.service.proc

    @property
    def log(self) -> list[str]:
        return self.broker.service.log

    def restart(self) -> None:
        self.broker.stop()
        self._start_broker()

    def stop(self) -> int | None:
        code = self.broker.service.stop()
        self.kms.stop()
        return code

    def health(self) -> bool:
        try:
            status, body = self.call(self.identity, "GET", "/v1/vms")
        except (OSError, ssl.SSLError, http.client.HTTPException, ValueError):
            return False
        return status == 200 and isinstance(body, dict) and "vms" in body

    def raw_request(self, rng: random.Random) -> bytes:
        method = rng.choice([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"HEAD", b"OPTIONS", b"\xff", b"G ET"])
        path = rng.choice(API_PATHS).replace("{}", rng.choice(["vc-fuzz", "esx-fuzz", str(uuid.uuid4()), "..", "%00", "x" * 300, "é"]))
        path_bytes = path.encode()
        if rng.random() < 0.2:
            path_bytes = mutate_bytes(rng, path_bytes).replace(b" ", b"").replace(b"\r", b"").replace(b"\n", b"") or b"/"
        if rng.random() < 0.2:
            path_bytes += b"?" + rng.choice([b"limit=0", b"after=-1&limit=5", b"%ff=%fe", b"limit=" + b"9" * 50])
        body = json.dumps(random_json(rng)).encode() if rng.random() < 0.8 else os.urandom(rng.randint(0, 64))
        if rng.random() < 0.05:
            body = b"[" * rng.choice([100, 5000, 60000])
        headers = [b"Host: 127.0.0.1", b"Content-Type: application/json"]
        headers.append(b"Content-Length: " + str(rng.choice([len(body)] * 8 + [0, len(body) + 10, 10**9])).encode())
        if rng.random() < 0.2:
            headers.append(b"Authorization: " + rng.choice([b"Bearer x", b"Bearer \xff", b"\x00", b"Bearer " + b"a" * 10000]))
        if rng.random() < 0.1:
            headers.append(rng.choice([b"Transfer-Encoding: chunked", b"Expect: 100-continue", b"X: " + b"y" * 20000]))
        return method + b" " + path_bytes + b" HTTP/1.1\r\n" + b"\r\n".join(headers) + b"\r\nConnection: close\r\n\r\n" + body

    def session(self, rng: random.Random, messages: Messages, figures: Figures, budget: int) -> None:
        context = self.identity if rng.random() < 0.7 else self.anonymous
        data = self.raw_request(rng)
        try:
            raw = socket.create_connection((HOST, self.broker.api_port), timeout=self.timeout)
            sock = context.wrap_socket(raw, server_hostname=HOST)
        except (OSError, ssl.SSLError):
            return
        figures.connections += 1
        figures.messages += 1
        try:
            if rng.random() < 0.1:
                sock.sendall(data[: rng.randint(1, len(data))])
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
            sock.sendall(data)
            head, _, body = data.partition(b"\r\n\r\n")
            declared = re.search(rb"(?i)content-length: (\d+)", head)
            # A request whose body is not all there is rightly waited for:
            # a short look only (the server's own deadline ends it).
            waits_for_more = bool(declared and int(declared.group(1)) > len(body)) or b"chunked" in head
            deadline = time.monotonic() + (0.5 if waits_for_more else self.timeout)
            answer = b""
            while time.monotonic() < deadline:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                answer += chunk
                if b"\r\n\r\n" in answer and self._whole(answer):
                    break
            if not answer:
                if time.monotonic() >= deadline and not waits_for_more:
                    figures.hangs += 1
                    figures.sample("hang", data, f"no answer or close within {self.timeout:g} s")
                else:
                    figures.closed_by_server += 1
                return
            figures.answers += 1
            status_line = answer.split(b"\r\n", 1)[0].split()
            status = int(status_line[1]) if len(status_line) > 1 and status_line[1].isdigit() else 0
            if status >= 500 and status != 503:
                figures.server_errors += 1
                figures.sample(f"http-{status}", data, answer[:200].decode("latin-1"))
            elif status == 0:
                figures.malformed_answers += 1
                figures.sample("malformed-answer", data, answer[:200].decode("latin-1"))
        except (OSError, ssl.SSLError):
            figures.closed_by_server += 1
        finally:
            try:
                sock.close()
            except OSError:
                pass

    @staticmethod
    def _whole(answer: bytes) -> bool:
        head, _, body = answer.partition(b"\r\n\r\n")
        match = re.search(rb"(?i)content-length: (\d+)", head)
        return bool(match) and len(body) >= int(match.group(1))


# --- The campaign -------------------------------------------------------------------------------------


def campaign(args: argparse.Namespace) -> Figures:
    rng = random.Random(args.seed)
    messages = Messages(rng)
    figures = Figures(args.target)
    with tempfile.TemporaryDirectory(prefix="fuzz-campaign-") as tmp:
        workdir = Path(args.workdir or tmp)
        print(f"starting the {args.target} target in {workdir} ...", flush=True)
        target = (KmsTarget if args.target == "kms" else BrokerApiTarget)(workdir, args.timeout)
        log_start = 0
        try:
            if not target.health():
                raise processes.StepFailed("the server does not answer its health check before the campaign")
            figures.rss_start_kib, figures.fds_start = proc_status(target.proc.pid)
            figures.files_start = open_files(target.proc.pid)
            started = time.monotonic()
            next_report = started + 10
            while figures.messages < args.messages and time.monotonic() - started < args.seconds:
                batch_end = figures.messages + args.batch
                while figures.messages < min(batch_end, args.messages) and time.monotonic() - started < args.seconds:
                    target.session(rng, messages, figures, args.messages - figures.messages)
                    if target.proc.poll() is not None:
                        break
                log_start = count_tracebacks(target.log, figures, log_start)
                if target.proc.poll() is not None:
                    figures.crashes += 1
                    figures.sample("crash", b"", f"exit status {target.proc.returncode}: " + " | ".join(target.log[-5:]))
                    print(f"server exited with status {target.proc.returncode}; restarting", flush=True)
                    target.restart()
                    log_start = 0
                    # RSS and descriptors are those of the server now running.
                    figures.rss_start_kib, figures.fds_start = proc_status(target.proc.pid)
                    figures.files_start = open_files(target.proc.pid)
                    continue
                figures.health_checks += 1
                if not target.health():
                    figures.health_failures += 1
                    figures.hangs += 1
                    figures.sample("health", b"", "no well-formed answer to the health check")
                rss, _ = proc_status(target.proc.pid)
                figures.rss_peak_kib = max(figures.rss_peak_kib, rss)
                if time.monotonic() >= next_report:
                    next_report += 10
                    print(
                        f"  {time.monotonic() - started:5.0f} s  {figures.messages} messages, {figures.connections} connections, "
                        f"RSS {rss / 1024:.0f} MiB, {figures.tracebacks} tracebacks",
                        flush=True,
                    )
            figures.seconds = time.monotonic() - started
            time.sleep(2)  # Let the server notice the last closes.
            figures.rss_end_kib, figures.fds_end = proc_status(target.proc.pid)
            figures.files_end = open_files(target.proc.pid)
            figures.rss_peak_kib = max(figures.rss_peak_kib, figures.rss_end_kib)
            count_tracebacks(target.log, figures, log_start)
        finally:
            code = target.stop()
            print(f"server stopped (exit status {code})", flush=True)
    return figures


def report(figures: Figures) -> str:
    growth = figures.rss_end_kib - figures.rss_start_kib
    lines = [
        f"target            {figures.target}",
        f"duration          {figures.seconds:.0f} s",
        f"messages sent     {figures.messages} ({figures.messages / max(figures.seconds, 1e-9):.0f}/s)",
        f"connections       {figures.connections}",
        f"answers           {figures.answers} (closed by the server: {figures.closed_by_server})",
        f"malformed answers {figures.malformed_answers}",
        f"5xx answers       {figures.server_errors}" if figures.target == "broker-api" else None,
        f"crashes           {figures.crashes}",
        f"hangs             {figures.hangs} (health checks failed: {figures.health_failures} of {figures.health_checks})",
        f"tracebacks in log {figures.tracebacks} (ERROR lines: {figures.error_lines})",
        *(f"    {n} x {kind}" for kind, n in sorted(figures.traceback_kinds.items(), key=lambda kv: -kv[1])[:10]),
        f"RSS               {figures.rss_start_kib / 1024:.1f} MiB -> {figures.rss_end_kib / 1024:.1f} MiB "
        f"(growth {growth / 1024:+.1f} MiB, peak {figures.rss_peak_kib / 1024:.1f} MiB)",
        f"open descriptors  {figures.fds_start} -> {figures.fds_end} (after the last connection closed)",
        *(
            f"    {kind}: {figures.files_start.get(kind, 0)} -> {figures.files_end.get(kind, 0)}"
            for kind in sorted(set(figures.files_start) | set(figures.files_end))
            if figures.files_start.get(kind, 0) != figures.files_end.get(kind, 0)
        ),
    ]
    return "\n".join(line for line in lines if line is not None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="Only 127.0.0.1 is contacted.")
    parser.add_argument("--target", choices=["kms", "broker-api"], default="kms")
    parser.add_argument("--messages", type=int, default=20000, help="stop after this many messages (default 20000)")
    parser.add_argument("--seconds", type=float, default=120.0, help="stop after this many seconds (default 120)")
    parser.add_argument("--batch", type=int, default=200, help="messages between health checks (default 200)")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for an answer (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, to repeat a campaign")
    parser.add_argument("--report", type=Path, default=None, help="also write the figures and samples as JSON here")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the servers' files here instead of a temporary directory")
    args = parser.parse_args(argv)
    if args.messages < 1 or args.seconds <= 0 or args.batch < 1 or args.timeout <= 0:
        parser.error("--messages, --seconds, --batch and --timeout must be positive")
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(2**32)
    print(f"fuzz campaign: --target {args.target} --messages {args.messages} --seconds {args.seconds:g} --seed {args.seed}", flush=True)
    try:
        figures = campaign(args)
    except processes.StepFailed as exc:
        print(f"fuzz campaign: {exc}", file=sys.stderr)
        return 2
    print(report(figures))
    if args.report:
        args.report.write_text(json.dumps({"seed": args.seed, **figures.__dict__}, indent=2))
        print(f"figures and samples written to {args.report}")
    return 1 if figures.crashes or figures.hangs else 0


if __name__ == "__main__":
    sys.exit(main())
