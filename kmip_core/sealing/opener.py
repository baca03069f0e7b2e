"""The one master-key opener: the server, `kms-admin` (backup, restore,
db verify, master-key rotate) and the broker open the key a `[master_key]`
section names through it. It sits beside master_key.py (the MasterKey
interface and the AES key of a file or passphrase) and pkcs11_key.py (a key
in a PKCS#11 token), which it chooses between."""

from __future__ import annotations

import os
from collections.abc import Callable

from kmip_core.sealing.master_key import (
    SALT_META,
    AesMasterKey,
    MasterKey,
    MasterKeyError,
    derive_from_passphrase,
    read_key_file,
    read_passphrase_file,
)

__all__ = ["open_master_key"]


def open_master_key(
    cfg: object,
    get_meta: Callable[[str], bytes | None],
    set_meta: Callable[[str, bytes], None] | None = None,
) -> MasterKey:
    """The master key a `[master_key]` section names (MasterKeyConfig, or
    any object with the same fields). A passphrase needs the store's scrypt
    salt: `get_meta` reads it, and `set_meta`, when given, records a new one
    for a store that has none (first start)."""
    key_file = getattr(cfg, "file", None)
    passphrase_file = getattr(cfg, "passphrase_file", None)
    pkcs11_module = getattr(cfg, "pkcs11_module", None)
    if pkcs11_module:
        try:
            from kmip_core.sealing import pkcs11_key
        except ModuleNotFoundError as exc:
            if exc.name != "pkcs11":
                raise
            raise MasterKeyError(
                "python-pkcs11 is not installed, and master_key.pkcs11_module needs it; "
                "run: pip install 'python-pkcs11>=0.9'"
            ) from None

        return pkcs11_key.open_token_key(cfg)
    if key_file:
        return AesMasterKey(read_key_file(key_file), f"master key file {key_file}")
    if passphrase_file:
        passphrase = read_passphrase_file(passphrase_file)
        salt = get_meta(SALT_META)
        if salt is None:
            if set_meta is None:
                raise MasterKeyError(
                    "the database has no scrypt salt, so its master key is not a passphrase; "
                    "set master_key.file (or the token) its servers use"
                )
            salt = os.urandom(16)
            set_meta(SALT_META, salt)
        return AesMasterKey(derive_from_passphrase(passphrase, salt), f"passphrase file {passphrase_file}")
    raise MasterKeyError(
        "no master key configured: set master_key.file, master_key.passphrase_file or master_key.pkcs11_module"
    )
