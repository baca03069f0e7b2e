"""KMIP username/password Credentials (KMIP 1.4, 2.1.2), checked in
addition to the client certificate when `access.require_credential` is set.

The credentials file is TOML: `[users]` maps each username to an Argon2id
hash (argon2-cffi's encoded form, salted and memory-hard). Passwords
themselves are never stored; `kms-admin credentials set` writes hashes.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()


class CredentialsError(Exception):
    pass


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def load(path: str | Path) -> dict[str, str]:
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
    return dict(users)


def save(path: str | Path, users: dict[str, str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "[users]\n" + "".join(f'"{u}" = "{h}"\n' for u, h in sorted(users.items()))
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(body)
    os.replace(tmp, path)


class Authenticator:
    """Callable (username, password) -> bool over a loaded credentials file."""

    def __init__(self, users: dict[str, str]):
        self._users = users

    def __call__(self, username: str, password: str) -> bool:
        encoded = self._users.get(username)
        if encoded is None:
            # Spend the same effort as a real check so timing does not
            # reveal which usernames exist.
            try:
                _hasher.verify(_DUMMY, password)
            except (VerificationError, InvalidHashError):
                pass
            return False
        try:
            return _hasher.verify(encoded, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


_DUMMY = _hasher.hash("not a real password")
