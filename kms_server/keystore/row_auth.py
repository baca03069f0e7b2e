"""Authenticated object rows: storage cannot widen anyone's access.

Every object row carries a MAC (`StoredObject.row_mac`) over everything
the keystore reads from it: the Unique Identifier, the owner, the row
version, the sealed material and every attribute value (State and its
dates, Cryptographic Usage Mask, Sensitive, Extractable, usage limits,
x- attributes...). A row whose MAC fails is refused, never served.

The row version is in the MAC, and a store digest (meta "rows.digest")
sums a keyed hash of (uid, version, MAC) over every row, itself under a
MAC: an old copy of a row written back over a newer one (a Destroy or a
Revoke rolled back) keeps a valid row MAC but no longer adds up to the
digest, which `kms-admin db verify` and every node start check. A node
also remembers the highest version it has seen of each object and refuses
an older one at once. docs/at-rest-sealing.md says what each check covers.
"""

from __future__ import annotations

import json
import logging
import operator
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass

from kmip_core.sealing.barrier import Barrier, UnknownTerm
from kms_server.storage.base import StoredObject, Transaction, iter_objects

__all__ = [
    "DIGEST_META",
    "RowIntegrityError",
    "SeenVersions",
    "StoreDigest",
    "VerifyReport",
    "apply",
    "ensure_digest",
    "reset_digest",
    "sign",
    "verify",
    "verify_store",
]

log = logging.getLogger("kms_server.keystore.row_auth")

DIGEST_META = "rows.digest"
_MODULUS = 2**256
_ROW_DOMAIN = b"kms-row:v1\x00"
_ELEMENT_DOMAIN = b"kms-row-element:v1\x00"
_DIGEST_DOMAIN = b"kms-store-digest:v1\x00"


class RowIntegrityError(Exception):
    """A row (or the store digest) fails its authentication."""

    def __init__(self, uid: str | None, problem: str):
        super().__init__(f"object {uid}: {problem}" if uid else problem)
        self.uid = uid
        self.problem = problem


def _field(out: bytearray, data: bytes) -> None:
    out += len(data).to_bytes(4, "big") + data


_LENGTH = struct.Struct(">I").pack
_NAME_KEY = operator.attrgetter("name", "index")


def message(stored: StoredObject, version: int) -> bytes:
    """The canonical bytes a row MAC covers, for the row at `version`.
    Every Get and every write builds it once: the parts are joined once
    (issue 15); `tests/kms_server/keystore/test_row_auth.py` pins the bytes."""
    if not 0 <= version < 2**63:
        raise RowIntegrityError(stored.uid, f"the row's version {version} is out of range (edited outside the server)")
    uid, owner = stored.uid.encode(), stored.owner.encode()
    parts = [_ROW_DOMAIN, _LENGTH(len(uid)), uid, _LENGTH(len(owner)), owner, version.to_bytes(8, "big")]
    if stored.sealed_material is None:
        parts.append(b"\x00")
    else:
        parts += (b"\x01", _LENGTH(len(stored.sealed_material)), stored.sealed_material)
    attributes = sorted(stored.attributes, key=_NAME_KEY)
    parts.append(_LENGTH(len(attributes)))
    for a in attributes:
        if not -(2**31) <= a.index < 2**31:
            raise RowIntegrityError(stored.uid, f"attribute {a.name!r} has an index out of range (edited outside the server)")
        name = a.name.encode()
        parts += (
            _LENGTH(len(name)),
            name,
            a.index.to_bytes(4, "big", signed=True),
            _LENGTH(len(a.value)),
            a.value,
        )
    return b"".join(parts)


def sign(barrier: Barrier, stored: StoredObject, version: int) -> bytes:
    """Set `stored.row_mac` for the row as it will be stored at `version`;
    returns it."""
    stored.row_mac = mac = barrier.row_mac(message(stored, version))
    return mac


def verify(barrier: Barrier, stored: StoredObject) -> bytes:
    """Raise RowIntegrityError unless the row's MAC covers what it holds
    (UnknownTerm if it names a data key the keyring lacks); returns the MAC."""
    if stored.row_mac is None:
        raise RowIntegrityError(stored.uid, "the row carries no MAC (written outside the server)")
    if not barrier.row_mac_matches(stored.row_mac, message(stored, stored.version)):
        raise RowIntegrityError(stored.uid, "the row does not match its MAC (edited outside the server)")
    return stored.row_mac


def element(barrier: Barrier, uid: str, version: int, row_mac: bytes) -> int:
    if not 0 <= version < 2**63:
        raise RowIntegrityError(uid, f"the row's version {version} is out of range (edited outside the server)")
    out = bytearray(_ELEMENT_DOMAIN)
    _field(out, uid.encode())
    out += version.to_bytes(8, "big")
    _field(out, row_mac)
    return barrier.digest_element(bytes(out))


@dataclass
class StoreDigest:
    total: int
    count: int

    def mac_message(self) -> bytes:
        return _DIGEST_DOMAIN + self.total.to_bytes(32, "big") + self.count.to_bytes(8, "big")

    def to_bytes(self, barrier: Barrier) -> bytes:
        # What json.dumps(sort_keys=True) makes of the three fields (pinned
        # by a test), without building it through the encoder on each write.
        mac = barrier.digest_mac(self.mac_message()).hex()
        return f'{{"count": {self.count}, "mac": "{mac}", "sum": "{self.total:064x}"}}'.encode()

    @classmethod
    def from_bytes(cls, barrier: Barrier, raw: bytes) -> StoreDigest:
        try:
            doc = json.loads(raw)
            digest = cls(int(doc["sum"], 16), int(doc["count"]))
            mac = bytes.fromhex(doc["mac"])
            if not (0 <= digest.total < _MODULUS and 0 <= digest.count < 2**63):
                raise ValueError("out of range")
        except (ValueError, KeyError, TypeError):
            raise RowIntegrityError(None, "the store digest is malformed (edited outside the server)") from None
        import hmac

        if not hmac.compare_digest(mac, barrier.digest_mac(digest.mac_message())):
            raise RowIntegrityError(None, "the store digest does not match its MAC (edited outside the server)")
        return digest


def read_digest(txn: Transaction, barrier: Barrier, for_update: bool = False) -> StoreDigest | None:
    raw = txn.get_meta(DIGEST_META, for_update=for_update)
    return None if raw is None else StoreDigest.from_bytes(barrier, raw)


class LastDigest:
    """The store digest as this process last wrote it, bytes and value: a
    write that finds those very bytes stored (the usual case: the writes
    of a node take turns) takes the value as it stands instead of parsing
    it and checking its MAC again. Other bytes (another node's write, a
    rollback, an edit) are parsed and checked as always. One per barrier:
    the bytes carry a MAC under its digest key."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: tuple[bytes, int, int] | None = None

    def value(self, barrier: Barrier, raw: bytes) -> StoreDigest:
        last = self._last
        if last is not None and last[0] == raw:
            return StoreDigest(last[1], last[2])
        return StoreDigest.from_bytes(barrier, raw)

    def wrote(self, raw: bytes, digest: StoreDigest) -> None:
        self._last = (raw, digest.total, digest.count)


def apply(
    txn: Transaction, barrier: Barrier, removed: list[int], added: list[int], last: LastDigest | None = None
) -> None:
    """Move the store digest by one write: `removed` rows' elements out,
    `added` ones in. Locks the digest until the transaction ends. `last`:
    the digest this process last wrote (remembered for the next write)."""
    raw = txn.get_meta(DIGEST_META, for_update=True)
    if raw is None:
        raise RowIntegrityError(None, "the store digest is missing (deleted outside the server)")
    digest = StoreDigest.from_bytes(barrier, raw) if last is None else last.value(barrier, raw)
    digest.total = (digest.total - sum(removed) + sum(added)) % _MODULUS
    digest.count += len(added) - len(removed)
    written = digest.to_bytes(barrier)
    txn.set_meta(DIGEST_META, written)
    if last is not None:
        last.wrote(written, digest)


def ensure_digest(txn: Transaction, barrier: Barrier) -> int:
    """Give a store without a digest (new, or made before rows were
    authenticated) one: each existing row without a MAC is authenticated
    as it stands, once, and logged. Returns the number of such rows."""
    if txn.get_meta(DIGEST_META) is not None:
        return 0
    # Nodes that start together take turns (the audit appenders' lock);
    # the first one makes the digest, the others find it.
    txn.audit_head(lock=True)
    if txn.get_meta(DIGEST_META) is not None:
        return 0
    rows = list(iter_objects(txn))
    if barrier.keyring.rows_authenticated or any(stored.row_mac is not None for stored in rows):
        # Rows were authenticated, so the digest existed: someone removed it
        # (the keyring, which only the master key opens, remembers that).
        raise RowIntegrityError(
            None,
            "the store digest is missing although the rows are authenticated (deleted outside the server); "
            "run 'kms-admin db verify' and restore from a backup, or accept the rows with "
            "'kms-admin db verify --reset-digest'",
        )
    total, count, adopted = 0, 0, 0
    for stored in rows:
        if stored.row_mac is None:
            sign(barrier, stored, stored.version + 1)
            txn.update_object(stored)
            adopted += 1
        total += element(barrier, stored.uid, stored.version, stored.row_mac)
        count += 1
    txn.set_meta(DIGEST_META, StoreDigest(total % _MODULUS, count).to_bytes(barrier))
    barrier.mark_rows_authenticated(txn)
    if adopted:
        log.warning(
            "authenticated %d existing object rows as they stand (first start with row authentication); "
            "from now on a row changed outside the server is refused",
            adopted,
        )
    return adopted


@dataclass
class VerifyReport:
    objects: int
    failures: list[tuple[str, str]]
    digest_problem: str | None

    @property
    def ok(self) -> bool:
        return not self.failures and self.digest_problem is None


def verify_store(txn: Transaction, barrier: Barrier, unseal: bool = True, progress=None) -> VerifyReport:
    """Check every row's MAC (and, with `unseal`, that its material opens)
    and the store digest against the rows."""
    failures: list[tuple[str, str]] = []
    total, count = 0, 0
    for stored in iter_objects(txn):
        uid = stored.uid
        if progress is not None:
            progress()
        count += 1
        try:
            verify(barrier, stored)
            if unseal and stored.sealed_material is not None:
                barrier.unseal(uid, stored.sealed_material)
        except RowIntegrityError as exc:
            failures.append((uid, exc.problem))
        except UnknownTerm as exc:
            failures.append((uid, str(exc)))
        except Exception as exc:  # noqa: BLE001 - a sealing failure of any kind is reported per object
            failures.append((uid, f"the sealed material does not open ({exc})"))
        if stored.row_mac is not None:
            try:
                total += element(barrier, uid, stored.version, stored.row_mac)
            except RowIntegrityError:
                pass  # Reported above; the digest then fails to add up too.
    total %= _MODULUS
    digest_problem = None
    try:
        digest = read_digest(txn, barrier)
    except RowIntegrityError as exc:
        digest_problem = exc.problem
    else:
        if digest is None:
            digest_problem = "the store digest is missing (deleted outside the server)"
        elif digest.count != count:
            digest_problem = (
                f"the store digest counts {digest.count} objects, the database holds {count} "
                "(rows removed or inserted outside the server)"
            )
        elif digest.total != total:
            digest_problem = (
                "the rows do not add up to the store digest: a row was replaced by an older copy "
                "of itself (rolled back) or edited outside the server"
            )
    return VerifyReport(count, failures, digest_problem)


def reset_digest(txn: Transaction, barrier: Barrier) -> StoreDigest:
    """Make the store digest match the rows as they are now (an operator's
    explicit decision after `kms-admin db verify`). Rows that fail their own
    MAC stay refused: only the digest is rewritten."""
    total, count = 0, 0
    txn.get_meta(DIGEST_META, for_update=True)
    for stored in iter_objects(txn):
        count += 1
        if stored.row_mac is not None and 0 <= stored.version < 2**63:
            total += element(barrier, stored.uid, stored.version, stored.row_mac)
    digest = StoreDigest(total % _MODULUS, count)
    txn.set_meta(DIGEST_META, digest.to_bytes(barrier))
    return digest


class SeenVersions:
    """The highest row version this node has seen of recent objects: an
    older version read later is a rollback. Bounded (least recently used
    objects are forgotten): safe to lose, like every node cache."""

    def __init__(self, capacity: int = 100_000):
        self._capacity = capacity
        self._versions: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()

    def check(self, uid: str, version: int) -> None:
        with self._lock:
            seen = self._versions.get(uid)
            if seen is not None and version < seen:
                raise RowIntegrityError(
                    uid, f"the row is at version {version}, older than version {seen} seen before (rolled back)"
                )

    def note(self, uid: str, version: int) -> None:
        with self._lock:
            if self._versions.get(uid, 0) < version:
                self._versions[uid] = version
            self._versions.move_to_end(uid)
            while len(self._versions) > self._capacity:
                self._versions.popitem(last=False)
