"""A real SoftHSM2 token for the tests of the PKCS#11 master key.

SoftHSM2 reads SOFTHSM2_CONF once, when its library is initialized in a
process, and sees only the tokens that existed then: so one directory of
tokens is made per test process, before anything loads the library, and
every test uses those tokens (with its own key labels). Server processes
started by a test inherit SOFTHSM2_CONF.

Tests skip when SoftHSM2 is not installed, unless KMS_TEST_REQUIRE names
"softhsm2" (CI sets it): then they fail, so CI cannot pass without them.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

MODULE_PATHS = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
TOKEN = "kms-test"
OTHER_TOKEN = "kms-other"
PIN = "4096-kms-test-pin"
SO_PIN = "so-pin-never-used-by-kms"


@dataclass(frozen=True)
class SoftHsm:
    module: Path
    directory: Path
    pin_file: Path

    def master_key_settings(self, key_label: str, token_label: str = TOKEN, pin_file: Path | None = None) -> dict:
        """A [master_key] section's values naming a key in a token."""
        return {
            "pkcs11_module": str(self.module),
            "token_label": token_label,
            "key_label": key_label,
            "pin_file": str(pin_file or self.pin_file),
        }

    def toml(self, key_label: str, token_label: str = TOKEN) -> str:
        """The body of a [master_key] section for that key."""
        return "".join(f'{k} = "{v}"\n' for k, v in self.master_key_settings(key_label, token_label).items())


def new_label(prefix: str = "kms-master") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _module() -> Path | None:
    if shutil.which("softhsm2-util") is None:
        return None
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        return None
    return next((Path(p) for p in MODULE_PATHS if Path(p).is_file()), None)


def _missing(what: str) -> None:
    if "softhsm2" in os.environ.get("KMS_TEST_REQUIRE", ""):
        pytest.fail(f"{what}, and KMS_TEST_REQUIRE names softhsm2: apt-get install softhsm2; pip install python-pkcs11")
    pytest.skip(f"{what} (apt-get install softhsm2; pip install python-pkcs11)")


_instance: SoftHsm | None = None


def softhsm() -> SoftHsm:
    """This process's SoftHSM2 with two initialized tokens, TOKEN and
    OTHER_TOKEN, both with the user PIN in `pin_file` (mode 0600)."""
    global _instance
    if _instance is not None:
        return _instance
    module = _module()
    if module is None:
        _missing("SoftHSM2 (softhsm2-util and libsofthsm2.so) or python-pkcs11 is not installed")
    directory = Path(tempfile.mkdtemp(prefix="kms-softhsm-"))
    atexit.register(shutil.rmtree, directory, True)
    tokens = directory / "tokens"
    tokens.mkdir()
    conf = directory / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    for label in (TOKEN, OTHER_TOKEN):
        subprocess.run(
            ["softhsm2-util", "--init-token", "--free", "--label", label, "--pin", PIN, "--so-pin", SO_PIN],
            check=True,
            capture_output=True,
            timeout=60,
        )
    pin_file = directory / "user.pin"
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    os.write(fd, (PIN + "\n").encode())
    os.close(fd)
    _instance = SoftHsm(module=module, directory=directory, pin_file=pin_file)
    return _instance


def raw_session(hsm: SoftHsm, token_label: str = TOKEN):
    """A python-pkcs11 session on a token, outside kms_server, to look at
    what the token holds. PKCS#11 shares one login per process and token: if
    a master key of the tests is open, the session is already logged in."""
    import pkcs11

    token = pkcs11.lib(str(hsm.module)).get_token(token_label=token_label)
    try:
        return token.open(rw=True, user_pin=PIN)
    except pkcs11.exceptions.UserAlreadyLoggedIn:
        return token.open(rw=True)
