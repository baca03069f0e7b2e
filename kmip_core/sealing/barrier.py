"""The at-rest barrier: key material is sealed, and every object row is
authenticated, before it reaches storage (docs/at-rest-sealing.md).

Key hierarchy:

    master key (file, passphrase, or a PKCS#11 token; keystore/master_key.py)
      wraps the keyring (meta "keyring"): numbered data keys ("terms"), one
      of them active, and the store-digest key
        each term seals objects' key material (AES-256-GCM) and, through
        HKDF, keys the row MACs of the rows it sealed

Sealed blob, format 2: 0x02 || term (4 bytes) || nonce (12) || AES-256-GCM
ciphertext and tag, associated data "kms-object:v2:" || Unique Identifier.
Format 1 (0x01 || nonce || ciphertext, associated data "kms-object:" || uid)
is what stores made before the keyring hold; it opens under the legacy term
(the old master key, carried into the keyring by `open_barrier`).

A `Barrier` made from 32 raw bytes (unit tests, the broker's own sealing)
has one term of those bytes and seals in format 1, as before.
"""

from __future__ import annotations

import base64
import hmac
import json
import logging
import os
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmip_core.sealing import master_key as master_keys
from kmip_core.sealing.master_key import (
    SALT_META,
    SCRYPT_N,
    SCRYPT_P,
    SCRYPT_R,
    MasterKey,
    MasterKeyError,
    derive_from_passphrase,
)
from kmip_core.sealing.opener import open_master_key

__all__ = [
    "CHECK_META",
    "KEYRING_META",
    "SALT_META",
    "SCRYPT_N",
    "SCRYPT_P",
    "SCRYPT_R",
    "Barrier",
    "BarrierError",
    "Keyring",
    "UnknownTerm",
    "derive_from_passphrase",
    "open_barrier",
    "opens_check_record",
    "read_key_file",
    "read_passphrase_file",
]

log = logging.getLogger("kmip_core.sealing.barrier")


class MetaReader(Protocol):
    """What reading the keyring needs: a store's meta records."""

    def get_meta(self, key: str, for_update: bool = False) -> bytes | None: ...


class Transaction(MetaReader, Protocol):
    """What the barrier needs of a store's transaction: its meta records,
    and the store's writers' lock (`audit_head(lock=True)`: the lock the
    audit chain's appenders take, held until commit), so that nodes or
    worker processes opening a new store together take turns."""

    def set_meta(self, key: str, value: bytes) -> None: ...

    def audit_head(self, lock: bool = False) -> object: ...


class Storage(Protocol):
    """What the barrier needs of a store: transactions."""

    def transaction(self) -> AbstractContextManager[Transaction]: ...


VERSION = 1
VERSION_2 = 2
NONCE_SIZE = 12
TERM_SIZE = 4
CHECK_META = "barrier.check"
KEYRING_META = "keyring"
_CHECK_ID = "barrier-check"
_CHECK_PLAINTEXT = b"kms-server master key check v1"
_KEYRING_CONTEXT = b"kms-keyring:v1"
# The legacy term: the master key of a store made before the keyring.
LEGACY_TERM = 1
# How often a node re-reads the keyring to learn of a rotation made by
# another process (kms-admin master-key rotate).
REFRESH_SECONDS = 5.0


class BarrierError(Exception):
    """The master key is missing, malformed or wrong, or a blob is corrupt."""


class UnknownTerm(BarrierError):
    """A blob or row names a data key this node's keyring does not hold
    (yet: a rotation may have added it since the node read the keyring)."""


def _aad(uid: str) -> bytes:
    return b"kms-object:" + uid.encode("utf-8")


def _aad_v2(uid: str) -> bytes:
    return b"kms-object:v2:" + uid.encode("utf-8")


def _hkdf(secret: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


@dataclass
class Keyring:
    """The data keys. `terms` maps a term number to its 32-byte key;
    `active` seals new material; `digest_key` keys the store digest (see
    keystore/row_auth.py); `rotating_from` is the term a rotation in
    progress moves rows away from."""

    terms: dict[int, bytes]
    active: int
    digest_key: bytes
    rotating_from: int | None = None
    # Format-1 blobs (and rows without a term) belong to this term.
    legacy_term: int | None = None
    # Set once every row carries a MAC: from then on a store without its
    # digest is refused instead of having its rows adopted as they stand
    # (which would launder rows stripped of their MACs).
    rows_authenticated: bool = False

    def to_bytes(self) -> bytes:
        return json.dumps(
            {
                "active": self.active,
                "terms": {str(t): k.hex() for t, k in sorted(self.terms.items())},
                "digest_key": self.digest_key.hex(),
                "rotating_from": self.rotating_from,
                "legacy_term": self.legacy_term,
                "rows_authenticated": self.rows_authenticated,
            },
            sort_keys=True,
        ).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Keyring:
        try:
            doc = json.loads(data)
            terms = {int(t): bytes.fromhex(k) for t, k in doc["terms"].items()}
            ring = cls(
                terms=terms,
                active=int(doc["active"]),
                digest_key=bytes.fromhex(doc["digest_key"]),
                rotating_from=doc.get("rotating_from"),
                legacy_term=doc.get("legacy_term"),
                rows_authenticated=doc.get("rows_authenticated") is True,
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            raise BarrierError("the keyring is malformed") from None
        if ring.active not in ring.terms or any(len(k) != 32 for k in ring.terms.values()):
            raise BarrierError("the keyring is malformed")
        return ring

    @classmethod
    def new(cls) -> Keyring:
        return cls(terms={1: os.urandom(32)}, active=1, digest_key=os.urandom(32))

    @classmethod
    def single(cls, key: bytes) -> Keyring:
        """One term of `key`, which also seals format 1: a raw-key barrier."""
        if len(key) != 32:
            raise BarrierError("master key must be 32 bytes")
        return cls(
            terms={LEGACY_TERM: key},
            active=LEGACY_TERM,
            digest_key=_hkdf(key, b"kms-store-digest-key"),
            legacy_term=LEGACY_TERM,
        )


class Barrier:
    def __init__(self, keyring: Keyring | bytes, *, seal_format: int | None = None):
        if isinstance(keyring, (bytes, bytearray)):
            keyring = Keyring.single(bytes(keyring))
            seal_format = seal_format or VERSION
        self._seal_format = seal_format or VERSION_2
        self._lock = threading.Lock()
        self._install(keyring)
        # Set by open_barrier: how to re-read the keyring from storage, and
        # the stored record it was read from.
        self._master: MasterKey | None = None
        self._record: bytes | None = None
        self._loaded_at = time.monotonic()

    def _install(self, keyring: Keyring) -> None:
        self.keyring = keyring
        self._aeads = {t: AESGCM(k) for t, k in keyring.terms.items()}
        self._mac_keys = {t: _hkdf(k, b"kms-row-mac-v1") for t, k in keyring.terms.items()}
        self._digest_mac_key = _hkdf(keyring.digest_key, b"kms-store-digest-mac-v1")

    # Key material.
    @property
    def active_term(self) -> int:
        return self.keyring.active

    def seal(self, uid: str, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        if self._seal_format == VERSION:
            if self.keyring.legacy_term is None:
                raise BarrierError("this keyring has no term for the legacy format")
            aead = self._aeads[self.keyring.legacy_term]
            return bytes([VERSION]) + nonce + aead.encrypt(nonce, plaintext, _aad(uid))
        term = self.keyring.active
        head = bytes([VERSION_2]) + term.to_bytes(TERM_SIZE, "big")
        return head + nonce + self._aeads[term].encrypt(nonce, plaintext, _aad_v2(uid))

    def blob_term(self, blob: bytes) -> int | None:
        """The term a sealed blob is under (None: malformed)."""
        if blob[:1] == bytes([VERSION]):
            return self.keyring.legacy_term if self.keyring.legacy_term is not None else LEGACY_TERM
        if blob[:1] == bytes([VERSION_2]) and len(blob) >= 1 + TERM_SIZE:
            return int.from_bytes(blob[1 : 1 + TERM_SIZE], "big")
        return None

    def unseal(self, uid: str, blob: bytes) -> bytes:
        if len(blob) >= 1 + NONCE_SIZE + 16 and blob[0] == VERSION:
            term, nonce, body, aad = self.keyring.legacy_term, blob[1 : 1 + NONCE_SIZE], blob[1 + NONCE_SIZE :], _aad(uid)
            if term is None:
                raise BarrierError(f"sealed material of object {uid} is in the legacy format, which this keyring cannot open")
        elif len(blob) >= 1 + TERM_SIZE + NONCE_SIZE + 16 and blob[0] == VERSION_2:
            term = int.from_bytes(blob[1 : 1 + TERM_SIZE], "big")
            start = 1 + TERM_SIZE
            nonce, body, aad = blob[start : start + NONCE_SIZE], blob[start + NONCE_SIZE :], _aad_v2(uid)
        else:
            raise BarrierError(f"sealed material of object {uid} is malformed")
        aead = self._aeads.get(term)
        if aead is None:
            raise UnknownTerm(f"sealed material of object {uid} is under data key {term}, which this keyring lacks")
        try:
            return aead.decrypt(nonce, body, aad)
        except InvalidTag:
            raise BarrierError(f"sealed material of object {uid} does not open under this master key") from None

    # Row authentication (keystore/row_auth.py builds the messages).
    def row_mac(self, message: bytes) -> bytes:
        """term (4 bytes) || HMAC-SHA256 under the active term's MAC key."""
        term = self.keyring.active
        return term.to_bytes(TERM_SIZE, "big") + hmac.digest(self._mac_keys[term], message, "sha256")

    def mac_term(self, mac: bytes) -> int | None:
        return int.from_bytes(mac[:TERM_SIZE], "big") if len(mac) == TERM_SIZE + 32 else None

    def knows_mac_term(self, mac: bytes | None) -> bool:
        """True if `mac` names a data key this keyring holds."""
        return mac is not None and self.mac_term(mac) in self._mac_keys

    def row_mac_matches(self, mac: bytes, message: bytes) -> bool:
        """True if `mac` authenticates `message`; raises UnknownTerm if it
        names a term this keyring lacks."""
        term = self.mac_term(mac)
        if term is None:
            return False
        key = self._mac_keys.get(term)
        if key is None:
            raise UnknownTerm(f"a row is authenticated under data key {term}, which this keyring lacks")
        return hmac.compare_digest(mac[TERM_SIZE:], hmac.digest(key, message, "sha256"))

    def digest_element(self, message: bytes) -> int:
        return int.from_bytes(hmac.digest(self.keyring.digest_key, message, "sha256"), "big")

    def digest_mac(self, message: bytes) -> bytes:
        return hmac.digest(self._digest_mac_key, message, "sha256")

    def mark_rows_authenticated(self, txn: Transaction) -> None:
        """Record in the keyring that every row carries a MAC (once, when a
        store's digest is made). A barrier without a master key (a raw-key
        barrier of unit tests) has no stored keyring to record it in."""
        if self.keyring.rows_authenticated:
            return
        self.keyring.rows_authenticated = True
        if self._master is None:
            return
        with self._lock:
            ring = read_keyring(txn, self._master)
            if ring is None:
                return
            ring.rows_authenticated = True
            # Only this master's copy can be re-wrapped; a copy under
            # another master (a rotation begun before) is kept as it is.
            copies = _copies(txn)
            copies[self._master.key_id] = base64.b64encode(
                self._master.wrap(ring.to_bytes(), _KEYRING_CONTEXT)
            ).decode()
            txn.set_meta(KEYRING_META, json.dumps({"format": 1, "copies": copies}, sort_keys=True).encode())
            self._record = txn.get_meta(KEYRING_META)
            self._install(ring)

    # Keeping up with rotations made elsewhere.
    def attach(self, master: MasterKey) -> None:
        self._master = master

    def close(self) -> None:
        """Let go of the master key this barrier re-reads the keyring with
        (a token session); the data keys it holds keep serving."""
        if self._master is not None:
            self._master.close()
            self._master = None

    def refresh(self, txn: Transaction, force: bool = False) -> bool:
        """Re-read the keyring if it is older than REFRESH_SECONDS (or
        `force`); True if it changed."""
        if self._master is None:
            return False
        now = time.monotonic()
        if not force and now - self._loaded_at < REFRESH_SECONDS:
            return False
        with self._lock:
            self._loaded_at = now
            # Unwrapping may be a call into a token: only when the record changed.
            record = txn.get_meta(KEYRING_META)
            if record is not None and record == self._record:
                return False
            self._record = record
            try:
                ring = read_keyring(txn, self._master)
            except BarrierError as exc:
                # A rotation finished and dropped this node's master key:
                # the keyring it holds still serves until it restarts with
                # the new key.
                log.warning("keyring not re-read: %s; restart this node with the new master key", exc)
                return False
            if ring is None or ring.to_bytes() == self.keyring.to_bytes():
                return False
            self._install(ring)
            return True


# --- the keyring in storage -----------------------------------------------------------


def _copies(txn: MetaReader) -> dict[str, str]:
    raw = txn.get_meta(KEYRING_META)
    if raw is None:
        return {}
    try:
        copies = json.loads(raw)["copies"]
        if not isinstance(copies, dict):
            raise TypeError
        return copies
    except (ValueError, KeyError, TypeError):
        raise BarrierError("the stored keyring record is malformed; restore the database from a backup") from None


def read_keyring(txn: MetaReader, master: MasterKey) -> Keyring | None:
    """The keyring as `master` opens it; None if the store has none yet.
    Raises BarrierError if no stored copy is wrapped under `master` or the
    copy does not open."""
    copies = _copies(txn)
    if not copies:
        return None
    wrapped = copies.get(master.key_id)
    if wrapped is None:
        raise BarrierError(
            f"the master key does not open this database (configured: {master.description}; "
            "wrong key file, passphrase or token key)"
        )
    try:
        return Keyring.from_bytes(master.unwrap(base64.b64decode(wrapped), _KEYRING_CONTEXT))
    except (MasterKeyError, ValueError):
        raise BarrierError(
            f"the master key does not open this database's keyring (configured: {master.description})"
        ) from None


def write_keyring(txn: Transaction, ring: Keyring, masters: list[MasterKey]) -> None:
    """Store `ring` wrapped under each of `masters` (and nothing else)."""
    copies = {m.key_id: base64.b64encode(m.wrap(ring.to_bytes(), _KEYRING_CONTEXT)).decode() for m in masters}
    txn.set_meta(KEYRING_META, json.dumps({"format": 1, "copies": copies}, sort_keys=True).encode())


def keyring_master_ids(txn: Transaction) -> list[str]:
    return sorted(_copies(txn))


def opens_check_record(barrier: Barrier, check: bytes) -> bool:
    """True if `barrier`'s (raw) master key sealed the store's check record:
    the format-1 check of stores made before the keyring."""
    try:
        return barrier.unseal(_CHECK_ID, check) == _CHECK_PLAINTEXT
    except BarrierError:
        return False


def read_key_file(path: str | Path) -> bytes:
    try:
        return master_keys.read_key_file(path)
    except MasterKeyError as exc:
        raise BarrierError(str(exc)) from None


def read_passphrase_file(path: str | Path) -> bytes:
    try:
        return master_keys.read_passphrase_file(path)
    except MasterKeyError as exc:
        raise BarrierError(str(exc)) from None


@dataclass(frozen=True)
class _KeySource:
    file: str | None = None
    passphrase_file: str | None = None


def open_barrier(
    storage: Storage,
    key_file: str | None = None,
    passphrase_file: str | None = None,
    master: MasterKey | None = None,
    source: object = None,
) -> Barrier:
    """The barrier for this store. On first use makes the keyring and wraps
    it under `master` (or the key file / passphrase given); afterwards opens
    it, refusing a master key that does not. A store made before the
    keyring (format-1 objects under the master key itself) gets a keyring
    whose legacy term is that master key, so its objects open unchanged.
    `source` is a [master_key] configuration section (MasterKeyConfig)."""
    opened = None  # the master key opened here, closed again if the store refuses it
    try:
        with storage.transaction() as txn:
            if txn.get_meta(KEYRING_META) is None:
                # A new store: the first opener makes the keyring (and a
                # passphrase's salt); others that start at the same moment
                # (a node's worker processes, a cluster's nodes) wait for
                # its commit and then open that keyring, instead of each
                # making one of their own and the last write winning.
                txn.audit_head(lock=True)
            if master is None:
                try:
                    master = opened = open_master_key(
                        source if source is not None else _KeySource(key_file, passphrase_file),
                        txn.get_meta,
                        txn.set_meta,
                    )
                except MasterKeyError as exc:
                    raise BarrierError(str(exc)) from None
            ring = read_keyring(txn, master)
            if ring is None:
                check = txn.get_meta(CHECK_META)
                if check is None:
                    ring = Keyring.new()
                else:
                    legacy = master.legacy_key()
                    if legacy is None or not opens_check_record(Barrier(legacy), check):
                        raise BarrierError(
                            f"the master key does not open this database (configured: {master.description}; "
                            "wrong key file or passphrase)"
                        )
                    ring = Keyring.single(legacy)
                    ring.digest_key = os.urandom(32)
                write_keyring(txn, ring, [master])
            barrier = Barrier(ring)
            barrier.attach(master)
            barrier._record = txn.get_meta(KEYRING_META)
    except BaseException:
        if opened is not None:
            opened.close()
        raise
    return barrier
