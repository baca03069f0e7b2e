"""KMIP username/password Credentials (KMIP 1.4, 2.1.2), checked in
addition to the client certificate when `access.require_credential` is set.

The credentials file is TOML: `[users]` maps each username to an Argon2id
hash (argon2-cffi's encoded form, salted and memory-hard). Passwords
themselves are never stored; `kms-admin credentials set` writes hashes.

A credential is bound to client certificates: `[clients]` maps a username
to the certificate identities (as `[tls] identity` reads them) that may
present it. A user without a `[clients]` entry may be presented only by a
certificate whose identity is the username itself. A stolen password is
then of no use with another client's certificate.

An Argon2id verification costs a second or more on a loaded node, so a
verified (identity, username, password) is remembered for a short while,
under an HMAC with a per-process random key: the cache holds neither
passwords nor anything an offline guess could be checked against.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from kmip_core import files

_hasher = PasswordHasher()
log = logging.getLogger("kms_server.credentials")


class CredentialsError(Exception):
    pass


def hash_password(password: str) -> str:
    return _hasher.hash(password)


@dataclass
class CredentialsFile:
    """`users`: username -> Argon2id hash; `clients`: username -> the
    certificate identities that may present it."""

    users: dict[str, str] = field(default_factory=dict)
    clients: dict[str, list[str]] = field(default_factory=dict)


def load_file(path: str | Path) -> CredentialsFile:
    try:
        data = tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CredentialsError(
            f"credentials file {path} does not exist; add a user with 'kms-admin credentials set USER --password-file F'"
        ) from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CredentialsError(f"cannot read credentials file {path}: {exc}") from None
    users = data.get("users", {})
    if not isinstance(users, dict) or not all(isinstance(v, str) for v in users.values()):
        raise CredentialsError(f"credentials file {path}: [users] must map usernames to hash strings")
    clients = data.get("clients", {})
    if not isinstance(clients, dict) or not all(
        isinstance(v, list) and all(isinstance(i, str) for i in v) for v in clients.values()
    ):
        raise CredentialsError(
            f"credentials file {path}: [clients] must map usernames to lists of certificate identities"
        )
    return CredentialsFile(dict(users), {u: list(v) for u, v in clients.items()})


def load(path: str | Path) -> dict[str, str]:
    """The users and their hashes (see load_file for the bindings too)."""
    return load_file(path).users


def save(path: str | Path, users: dict[str, str], clients: dict[str, list[str]] | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "[users]\n" + "".join(f'"{u}" = "{h}"\n' for u, h in sorted(users.items()))
    bound = {u: v for u, v in (clients or {}).items() if u in users and v}
    if bound:
        body += "\n# The certificate identities that may present each user's password.\n[clients]\n"
        # JSON's string escapes are TOML's: any certificate identity is safe.
        body += "".join(f"{json.dumps(u)} = [{', '.join(json.dumps(i) for i in v)}]\n" for u, v in sorted(bound.items()))
    files.write_atomic(path, body.encode("utf-8"), 0o600)


# How long a verified credential is remembered, and how many are.
CACHE_SECONDS = 300.0
CACHE_ENTRIES = 4096


class Authenticator:
    """Callable (username, password, identity) -> bool over a loaded
    credentials file; `identity` is the presenting certificate's."""

    def __init__(
        self,
        users: dict[str, str],
        clients: dict[str, list[str]] | None = None,
        *,
        cache_seconds: float = CACHE_SECONDS,
        cache_entries: int = CACHE_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ):
        self._users = users
        self._clients = {u: frozenset(v) for u, v in (clients or {}).items()}
        self._cache_seconds = cache_seconds
        self._cache_entries = cache_entries
        self._clock = clock
        # HMAC key of this process: the cache's keys are useless elsewhere.
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()
        # Argon2id verifications run, for tests and the log.
        self.verifications = 0

    def allowed_identities(self, username: str) -> frozenset[str]:
        return self._clients.get(username, frozenset({username}))

    def __call__(self, username: str, password: str, identity: str) -> bool:
        encoded = self._users.get(username)
        if encoded is None or identity not in self.allowed_identities(username):
            # Spend the same effort as a real check so timing does not
            # reveal which usernames exist or whom they are bound to.
            self._verify(_DUMMY, password)
            return False
        key = hmac.new(
            self._cache_key, b"\0".join(s.encode() for s in (identity, username, password)), hashlib.sha256
        ).digest()
        now = self._clock()
        with self._lock:
            expires = self._verified.get(key)
            if expires is not None:
                if expires > now:
                    self._verified.move_to_end(key)
                    return True
                del self._verified[key]
        if not self._verify(encoded, password):
            return False
        log.info(
            "credential of %r presented by %r verified (Argon2id); remembered for %.0f s",
            username,
            identity,
            self._cache_seconds,
        )
        with self._lock:
            self._verified[key] = now + self._cache_seconds
            self._verified.move_to_end(key)
            while len(self._verified) > self._cache_entries:
                self._verified.popitem(last=False)
        return True

    def _verify(self, encoded: str, password: str) -> bool:
        self.verifications += 1
        try:
            return _hasher.verify(encoded, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


_DUMMY = _hasher.hash("not a real password")
