"""The management instance's state directory.

    instance.json     name, broker URL, key provider (what `init` was given)
    instance.key      the instance's private key (0600)
    instance.csr      its certificate signing request
    instance.pem      its certificate, once an enrollment is approved
    broker-ca.pem     the broker's trust CA (verifies the broker; copied at init)
    enrollment.json   a pending enrollment: id and poll secret (0600)
    inventory.json    hosts added and VMs created or registered by this instance

Losing this directory is the disaster the drill rehearses: nothing in it is
needed to recover the VMs (the datastore's .vmx files are), only to go on
acting as this instance.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import NameOID

from broker.mgmt.client import BrokerClient, BrokerError, parse_broker_url
from kmip_core import files, names

__all__ = ["MgmtError", "Settings", "StateDir", "check_name", "write_atomic"]

SETTINGS = "instance.json"
KEY = "instance.key"
CSR = "instance.csr"
CERT = "instance.pem"
BROKER_CA = "broker-ca.pem"
ENROLLMENT = "enrollment.json"
INVENTORY = "inventory.json"
LOCK = ".lock"

_PROVIDER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}\Z")


class MgmtError(Exception):
    """A one-line problem with the state directory or the command, and its fix."""


def check_name(kind: str, value: str) -> str:
    """An instance or host name, by the broker's rule (broker.trust.check_instance_name, check_host_name)."""
    return names.check_name(
        value, lambda rule: MgmtError(f"{kind} name {value!r} must be {rule}, starting with a letter or digit")
    )


def write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Temporary file beside `path` (created with `mode`), fsync, rename (kmip_core.files)."""
    try:
        files.write_atomic(path, data, mode)
    except OSError as exc:
        if exc.filename == str(path.parent):
            raise MgmtError(
                f"cannot write in {path.parent} ({exc.strerror}); check that it exists and is writable"
            ) from None
        raise MgmtError(f"cannot write {path} ({exc.strerror})") from None


@dataclass(frozen=True)
class Settings:
    name: str
    broker: str
    provider: str


class StateDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def file(self, name: str) -> Path:
        return self.path / name

    # init ---------------------------------------------------------------------------

    def create(self, name: str, broker: str, ca_file: Path, provider: str) -> Settings:
        check_name("instance", name)
        if not _PROVIDER.match(provider):
            raise MgmtError(f"key provider {provider!r} must be 1-128 letters, digits, '.', '_', '~' or '-'")
        url = str(parse_broker_url(broker))
        try:
            ca_pem = Path(ca_file).read_bytes()
        except OSError as exc:
            raise MgmtError(
                f"cannot read the broker CA {ca_file} ({exc.strerror}); give the broker's trust-ca.pem"
            ) from None
        try:
            x509.load_pem_x509_certificates(ca_pem)
        except ValueError:
            raise MgmtError(f"{ca_file} is not a PEM certificate; give the broker's trust-ca.pem") from None
        if self.file(SETTINGS).exists():
            raise MgmtError(f"{self.path} already holds instance {self.settings().name}; use another --state-dir")
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise MgmtError(f"cannot create {self.path} ({exc.strerror})") from None
        key = ec.generate_private_key(ec.SECP256R1())
        write_atomic(
            self.file(KEY),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            0o600,
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .sign(key, hashes.SHA256())
        )
        write_atomic(self.file(CSR), csr.public_bytes(serialization.Encoding.PEM))
        write_atomic(self.file(BROKER_CA), ca_pem)
        write_atomic(self.file(INVENTORY), _dumps({"hosts": {}, "vms": {}}))
        settings = Settings(name=name, broker=url, provider=provider)
        # Written last: its presence means the directory is complete.
        write_atomic(self.file(SETTINGS), _dumps(settings.__dict__))
        return settings

    # reading -------------------------------------------------------------------------

    def settings(self) -> Settings:
        path = self.file(SETTINGS)
        if not path.exists():
            raise MgmtError(
                f"{self.path} is not a vtpm-mgmt state directory; run "
                "'vtpm-mgmt --state-dir DIR init --name NAME --broker URL --ca CA --provider P' first"
            )
        data = self._read_json(path)
        try:
            return Settings(name=str(data["name"]), broker=str(data["broker"]), provider=str(data["provider"]))
        except (KeyError, TypeError):
            raise MgmtError(f"{path} lacks name, broker or provider; re-create the state directory") from None

    @property
    def enrolled(self) -> bool:
        return self.file(CERT).exists()

    def client(self, *, enrolled: bool = True, timeout: float = 60.0) -> BrokerClient:
        settings = self.settings()
        if enrolled and not self.enrolled:
            raise MgmtError(
                f"instance {settings.name} is not enrolled yet; run 'vtpm-mgmt enroll --token T' "
                "(a security administrator issues T with 'vtpm-broker admin token')"
            )
        try:
            if enrolled:
                return BrokerClient(
                    settings.broker, self.file(BROKER_CA), self.file(CERT), self.file(KEY), timeout=timeout
                )
            return BrokerClient(settings.broker, self.file(BROKER_CA), timeout=timeout)
        except BrokerError as exc:
            raise MgmtError(str(exc)) from None

    def csr_pem(self) -> str:
        try:
            return self.file(CSR).read_text("ascii")
        except (OSError, UnicodeDecodeError):
            raise MgmtError(f"cannot read {self.file(CSR)}; re-create the state directory") from None

    # enrollment --------------------------------------------------------------------

    def pending_enrollment(self) -> dict | None:
        path = self.file(ENROLLMENT)
        if not path.exists():
            return None
        data = self._read_json(path)
        if not isinstance(data.get("enrollment_id"), str) or not isinstance(data.get("poll_secret"), str):
            raise MgmtError(f"{path} is damaged; enroll again with a new token")
        return data

    def save_enrollment(self, enrollment_id: str, poll_secret: str) -> None:
        # The poll secret fetches the certificate: as private as the key.
        write_atomic(
            self.file(ENROLLMENT),
            _dumps({"enrollment_id": enrollment_id, "poll_secret": poll_secret, "at": time.time()}),
            0o600,
        )

    def finish_enrollment(self, certificate_pem: str) -> None:
        try:
            cert = x509.load_pem_x509_certificate(certificate_pem.encode("ascii"))
            key = serialization.load_pem_private_key(self.file(KEY).read_bytes(), password=None)
        except (ValueError, UnicodeEncodeError):
            raise MgmtError("the broker's certificate for this instance does not parse") from None
        except OSError as exc:
            raise MgmtError(f"cannot read {self.file(KEY)} ({exc.strerror})") from None
        if _spki(cert.public_key()) != _spki(key.public_key()):
            raise MgmtError("the broker's certificate is not for this instance's key; enroll again")
        write_atomic(self.file(CERT), certificate_pem.encode("ascii"))
        self.file(ENROLLMENT).unlink(missing_ok=True)

    # inventory -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # Several vtpm-mgmt processes may share one state directory.
        try:
            fd = os.open(self.file(LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise MgmtError(f"cannot lock {self.path} ({exc.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def inventory(self) -> dict:
        path = self.file(INVENTORY)
        if not path.exists():
            return {"hosts": {}, "vms": {}}
        data = self._read_json(path)
        data.setdefault("hosts", {})
        data.setdefault("vms", {})
        return data

    def update_inventory(self, change: Callable[[dict], Any]) -> None:
        self.settings()
        with self._locked():
            data = self.inventory()
            change(data)
            write_atomic(self.file(INVENTORY), _dumps(data), 0o600)

    def _read_json(self, path: Path) -> dict:
        try:
            data = json.loads(path.read_text("utf-8"))
        except OSError as exc:
            raise MgmtError(f"cannot read {path} ({exc.strerror})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise MgmtError(f"{path} is not valid JSON; restore it or re-create the state directory") from None
        if not isinstance(data, dict):
            raise MgmtError(f"{path} is not a JSON object; restore it or re-create the state directory")
        return data


def _dumps(value: object) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
