"""A master key held in a PKCS#11 token (docs/hsm-master-key.md).

The key is an AES-256 secret key object generated inside the token
(`generate_token_key`, run by `kms-admin master-key new --pkcs11-module ...`):
a token object, private, sensitive and not extractable, usable only to
encrypt and decrypt. Wrapping runs inside the token as AES-256-GCM
(CKM_AES_GCM) with a random 96-bit IV and the caller's context as associated
data, so a blob opens only under the context it was wrapped for and any
change to it is refused. Only the wrapped blobs leave the token.

A wrapped blob is: version 0x01 || IV (12 bytes) || ciphertext || tag (16).

The PIN comes from a file, never from a command line or the environment.
PKCS#11 keeps one login per process and token, so one logged-in session per
token is shared by every key opened on it in a process and closed with the
last of them; a session that the token dropped is opened again once before
an operation gives up.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11_errors

from kmip_core.sealing.master_key import MasterKey, MasterKeyError

__all__ = ["Pkcs11MasterKey", "generate_token_key", "open_token_key", "read_pin_file"]

VERSION = 1
IV_SIZE = 12
TAG_SIZE = 16
# The key's identifier is derived from a GMAC tag the token computes under
# the key with a fixed IV and a fixed message: it names the key material
# itself, so it is the same on every token that holds a copy of the key,
# whatever the labels, and it reveals nothing usable about the key.
_KEY_ID_AAD = b"kms-server master key id v1"
_KEY_ID_IV = bytes(IV_SIZE)
MAX_PIN_FILE_SIZE = 4096

# Errors after which the session is opened again (the token or its daemon
# restarted, a network HSM dropped the connection, the login timed out).
_SESSION_LOST = (
    p11_errors.SessionClosed,
    p11_errors.SessionHandleInvalid,
    p11_errors.UserNotLoggedIn,
    p11_errors.DeviceRemoved,
    p11_errors.TokenNotPresent,
    p11_errors.KeyHandleInvalid,
    p11_errors.ObjectHandleInvalid,
)


def read_pin_file(path: str | os.PathLike[str]) -> str:
    """The user PIN in a file (one trailing newline ignored)."""
    try:
        data = Path(path).read_bytes()[: MAX_PIN_FILE_SIZE + 1]
    except OSError as exc:
        raise MasterKeyError(f"cannot read PIN file {path} ({exc.strerror}); check master_key.pin_file") from None
    pin = data.rstrip(b"\r\n")
    if not pin or len(data) > MAX_PIN_FILE_SIZE:
        raise MasterKeyError(f"PIN file {path} is empty or too long; put the token's user PIN in it")
    try:
        return pin.decode("utf-8")
    except UnicodeDecodeError:
        raise MasterKeyError(f"PIN file {path} is not UTF-8 text; put the token's user PIN in it") from None


# python-pkcs11 initializes a module with C_Initialize(NULL), which tells it
# that the application does not call it from several threads at once: every
# call into a token is made under this lock.
_TOKEN_LOCK = threading.RLock()


def _error_name(exc: BaseException) -> str:
    return type(exc).__name__


class _TokenSession:
    """The one logged-in session of this process on a token."""

    def __init__(self, module: str, token_label: str, pin: str, pin_file: str):
        self.module, self.token_label, self.pin_file = module, token_label, pin_file
        self._pin = pin
        self.lock = _TOKEN_LOCK
        self.refs = 0
        # Bumped whenever the session is opened again: keys found in an older
        # session are looked up again.
        self.generation = 0
        self.lib = _load_module(module)
        self.token = _find_token(self.lib, module, token_label)
        self.session = self._login()

    def pin_matches(self, pin: str) -> bool:
        return hmac.compare_digest(pin.encode(), self._pin.encode())

    def _login(self) -> Any:
        label = self.token_label
        try:
            try:
                return self.token.open(rw=True, user_pin=self._pin)
            except p11_errors.TokenWriteProtected:
                return self.token.open(rw=False, user_pin=self._pin)
        except (p11_errors.PinIncorrect, p11_errors.PinInvalid, p11_errors.PinLenRange):
            raise MasterKeyError(
                f"token '{label}' refused the PIN in {self.pin_file} (wrong PIN); "
                "put the token's user PIN in that file (master_key.pin_file)"
            ) from None
        except p11_errors.PinLocked:
            raise MasterKeyError(
                f"the user PIN of token '{label}' is locked after too many wrong PINs; "
                "unlock it with the token's SO PIN, then fix master_key.pin_file"
            ) from None
        except p11_errors.PinExpired:
            raise MasterKeyError(f"the user PIN of token '{label}' has expired; set a new one on the token") from None
        except p11_errors.UserPinNotInitialized:
            raise MasterKeyError(
                f"token '{label}' has no user PIN yet; initialize it (softhsm2-util --init-token ... --pin ...)"
            ) from None
        except p11_errors.UserAlreadyLoggedIn:
            # Another library in this process logged in to the token: its
            # login is shared, so a session without a PIN is logged in too.
            return self.token.open(rw=True)
        except p11_errors.PKCS11Error as exc:
            raise MasterKeyError(
                f"token '{label}' refused the login ({_error_name(exc)}); check the token and master_key.pin_file"
            ) from None

    def reopen(self) -> None:
        """Open the session again after the token dropped it."""
        try:
            self.session.close()
        except p11_errors.PKCS11Error:
            pass
        self.token = _find_token(self.lib, self.module, self.token_label)
        self.session = self._login()
        self.generation += 1

    def close(self) -> None:
        try:
            self.session.close()
        except p11_errors.PKCS11Error:
            pass


_sessions: dict[tuple[str, str], _TokenSession] = {}


def _acquire(module: str, token_label: str, pin: str, pin_file: str) -> _TokenSession:
    with _TOKEN_LOCK:
        shared = _sessions.get((module, token_label))
        if shared is None:
            shared = _TokenSession(module, token_label, pin, pin_file)
            _sessions[(module, token_label)] = shared
        elif not shared.pin_matches(pin):
            raise MasterKeyError(
                f"token '{token_label}' is already open in this process with another PIN; "
                "give every key on one token the same master_key.pin_file"
            )
        shared.refs += 1
        return shared


def _release(shared: _TokenSession) -> None:
    with _TOKEN_LOCK:
        shared.refs -= 1
        if shared.refs <= 0 and _sessions.get((shared.module, shared.token_label)) is shared:
            del _sessions[(shared.module, shared.token_label)]
            shared.close()


def _load_module(module: str) -> Any:
    if not Path(module).is_file():
        raise MasterKeyError(
            f"PKCS#11 module {module} does not exist; install the token's library "
            "(SoftHSM2: apt-get install softhsm2) and set master_key.pkcs11_module to its path"
        )
    try:
        return pkcs11.lib(module)
    except p11_errors.PKCS11Error as exc:
        reason = str(exc).rsplit(": ", 1)[-1] or _error_name(exc)
        raise MasterKeyError(
            f"PKCS#11 module {module} cannot be loaded ({reason}); "
            "set master_key.pkcs11_module to the token's PKCS#11 library"
        ) from None


def _find_token(lib: Any, module: str, token_label: str) -> Any:
    try:
        return lib.get_token(token_label=token_label)
    except p11_errors.NoSuchToken:
        pass
    except p11_errors.MultipleTokensReturned:
        raise MasterKeyError(
            f"PKCS#11 module {module} has several tokens labelled '{token_label}'; give each a distinct label"
        ) from None
    except p11_errors.PKCS11Error as exc:
        raise MasterKeyError(
            f"PKCS#11 module {module} cannot list its tokens ({_error_name(exc)}); check the token is connected"
        ) from None
    try:
        labels = sorted({t.label for t in lib.get_tokens()} - {""})
    except p11_errors.PKCS11Error:
        labels = []
    present = f" (it has: {', '.join(labels)})" if labels else " (it has no initialized token)"
    raise MasterKeyError(
        f"no token labelled '{token_label}' in PKCS#11 module {module}{present}; "
        "fix master_key.token_label or initialize the token (docs/hsm-master-key.md)"
    )


def _key_template(key_label: str) -> dict[Any, Any]:
    """The master key's attributes: it never leaves the token, and only
    encrypts and decrypts."""
    return {
        Attribute.TOKEN: True,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.MODIFIABLE: False,
        Attribute.ENCRYPT: True,
        Attribute.DECRYPT: True,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.DERIVE: False,
        Attribute.LABEL: key_label,
        Attribute.ID: os.urandom(16),
    }


def _find_keys(session: Any, key_label: str) -> list[Any]:
    return list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES, Attribute.LABEL: key_label}
        )
    )


def _encrypt(key: Any, plaintext: bytes, iv: bytes, aad: bytes) -> bytes:
    return bytes(key.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=pkcs11.GCMParams(iv, aad)))


def _decrypt(key: Any, sealed: bytes, iv: bytes, aad: bytes) -> bytes:
    return bytes(key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=pkcs11.GCMParams(iv, aad)))


class Pkcs11MasterKey(MasterKey):
    """An AES-256 key that never leaves its token; wrap and unwrap run in it."""

    def __init__(self, shared: _TokenSession, key_label: str):
        self._shared = shared
        self.token_label = shared.token_label
        self.key_label = key_label
        self.description = f"key '{key_label}' in token '{shared.token_label}'"
        self._closed = False
        with shared.lock:
            self._key = self._lookup()
            self._generation = shared.generation
            try:
                tag = self._run(lambda key: _encrypt(key, b"", _KEY_ID_IV, _KEY_ID_AAD))
            except p11_errors.PKCS11Error as exc:
                raise MasterKeyError(
                    f"{self.description} does not compute AES-GCM ({_error_name(exc)}); "
                    "the token must support CKM_AES_GCM with an IV chosen by the caller"
                ) from None
        self.key_id = "pkcs11:" + hashlib.sha256(b"kms-master-key-id\x00" + tag).hexdigest()[:16]

    def _lookup(self) -> Any:
        shared = self._shared
        where = f"token '{shared.token_label}'"
        try:
            keys = _find_keys(shared.session, self.key_label)
        except p11_errors.PKCS11Error as exc:
            raise MasterKeyError(f"{where} cannot list its keys ({_error_name(exc)}); check the token") from None
        if not keys:
            raise MasterKeyError(
                f"no AES key labelled '{self.key_label}' in {where}; fix master_key.key_label or create it with "
                f"'kms-admin master-key new --pkcs11-module {shared.module} --token-label {shared.token_label} "
                f"--key-label {self.key_label} --pin-file {shared.pin_file}'"
            )
        if len(keys) > 1:
            raise MasterKeyError(
                f"{where} holds {len(keys)} AES keys labelled '{self.key_label}'; keep one, or use another label"
            )
        key = keys[0]
        try:
            length = key[Attribute.VALUE_LEN]
            leaves = key[Attribute.EXTRACTABLE] or not key[Attribute.SENSITIVE]
            usable = key[Attribute.ENCRYPT] and key[Attribute.DECRYPT]
        except p11_errors.PKCS11Error as exc:
            raise MasterKeyError(
                f"{where} does not describe key '{self.key_label}' ({_error_name(exc)}); check the token"
            ) from None
        if length != 32:
            raise MasterKeyError(
                f"key '{self.key_label}' in {where} is AES-{length * 8}, the master key must be AES-256; "
                "make one with 'kms-admin master-key new --pkcs11-module ...'"
            )
        if leaves:
            raise MasterKeyError(
                f"key '{self.key_label}' in {where} can leave the token (extractable or not sensitive); "
                "make a new one with 'kms-admin master-key new --pkcs11-module ...'"
            )
        if not usable:
            raise MasterKeyError(
                f"key '{self.key_label}' in {where} may not encrypt and decrypt; "
                "make a new one with 'kms-admin master-key new --pkcs11-module ...'"
            )
        return key

    def _run(self, operation: Any) -> bytes:
        """`operation(key)` in the token, with the session opened again
        once if the token dropped it. The caller holds the lock."""
        if self._closed:
            raise MasterKeyError(f"{self.description} was closed; open the master key again")
        shared = self._shared
        for attempt in (1, 2):
            try:
                if self._generation != shared.generation:
                    self._key = self._lookup()
                    self._generation = shared.generation
                return operation(self._key)
            except _SESSION_LOST:
                if attempt == 2:
                    raise
                shared.reopen()
        raise AssertionError("unreachable")  # pragma: no cover

    def wrap(self, plaintext: bytes, context: bytes) -> bytes:
        iv = os.urandom(IV_SIZE)
        with self._shared.lock:
            try:
                sealed = self._run(lambda key: _encrypt(key, plaintext, iv, context))
            except p11_errors.PKCS11Error as exc:
                raise MasterKeyError(f"{self.description} refused to wrap ({_error_name(exc)})") from None
        return bytes([VERSION]) + iv + sealed

    def unwrap(self, blob: bytes, context: bytes) -> bytes:
        if len(blob) < 1 + IV_SIZE + TAG_SIZE or blob[0] != VERSION:
            raise MasterKeyError(f"a blob wrapped by {self.description} is truncated or of an unknown version")
        iv, sealed = bytes(blob[1 : 1 + IV_SIZE]), bytes(blob[1 + IV_SIZE :])
        with self._shared.lock:
            try:
                return self._run(lambda key: _decrypt(key, sealed, iv, context))
            except _SESSION_LOST as exc:
                raise MasterKeyError(f"{self.description} cannot be reached ({_error_name(exc)})") from None
            except p11_errors.PKCS11Error:
                # Tokens report a failed GCM tag differently (SoftHSM2:
                # CKR_GENERAL_ERROR; others CKR_ENCRYPTED_DATA_INVALID).
                raise MasterKeyError(
                    f"{self.description} does not open this blob (wrong master key, or altered)"
                ) from None

    def close(self) -> None:
        """Let go of the token session (logged out with the last key)."""
        if not self._closed:
            self._closed = True
            _release(self._shared)

    def __enter__(self) -> Pkcs11MasterKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _settings(cfg: Any) -> tuple[str, str, str, str]:
    names = ("pkcs11_module", "token_label", "key_label", "pin_file")
    values = [getattr(cfg, name, None) for name in names]
    for name, value in zip(names, values, strict=True):
        if value is None or not str(value).strip():
            raise MasterKeyError(f"master_key.{name} is not set; a PKCS#11 master key needs {', '.join(names)}")
    module, token_label, key_label, pin_file = (str(v) for v in values)
    return module, token_label, key_label, pin_file


def _open(module: str, token_label: str, pin_file: str) -> _TokenSession:
    shared = _acquire(module, token_label, read_pin_file(pin_file), pin_file)
    try:
        with _TOKEN_LOCK:
            mechanisms = shared.token.slot.get_mechanisms()
    except p11_errors.PKCS11Error:
        return shared  # Not listed: the key's first use tries GCM anyway.
    if Mechanism.AES_GCM not in mechanisms:
        _release(shared)
        raise MasterKeyError(
            f"token '{token_label}' does not offer AES-GCM (CKM_AES_GCM), which the master key needs; "
            "use a token that does"
        )
    return shared


def open_token_key(cfg: Any) -> Pkcs11MasterKey:
    """The master key a `[master_key]` section with `pkcs11_module` names:
    the module loaded, the token found by label, logged in with the PIN in
    `pin_file`, the key found by label and checked to be a sensitive,
    non-extractable AES-256 key. Every failure is a one-line MasterKeyError
    that says what is wrong and how to fix it."""
    module, token_label, key_label, pin_file = _settings(cfg)
    shared = _open(module, token_label, pin_file)
    try:
        return Pkcs11MasterKey(shared, key_label)
    except BaseException:
        _release(shared)
        raise


def generate_token_key(cfg: Any) -> Pkcs11MasterKey:
    """Generate the master key inside the token, for a first setup. Refuses
    if the token already holds an AES key with that label: an existing key
    is never replaced."""
    module, token_label, key_label, pin_file = _settings(cfg)
    shared = _open(module, token_label, pin_file)
    try:
        with shared.lock:
            try:
                existing = _find_keys(shared.session, key_label)
            except p11_errors.PKCS11Error as exc:
                raise MasterKeyError(
                    f"token '{token_label}' cannot list its keys ({_error_name(exc)}); check the token"
                ) from None
            if existing:
                raise MasterKeyError(
                    f"token '{token_label}' already holds a key labelled '{key_label}'; it is kept as it is: "
                    "choose another --key-label, or use that key as master_key.key_label"
                )
            try:
                shared.session.generate_key(KeyType.AES, 256, template=_key_template(key_label))
            except p11_errors.SessionReadOnly:
                raise MasterKeyError(f"token '{token_label}' is write-protected; no key can be made in it") from None
            except p11_errors.PKCS11Error as exc:
                raise MasterKeyError(
                    f"token '{token_label}' refused to generate an AES-256 key ({_error_name(exc)}); check the token"
                ) from None
        return Pkcs11MasterKey(shared, key_label)
    except BaseException:
        _release(shared)
        raise
