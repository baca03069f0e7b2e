"""The key safe: the string that goes into a VM's ``.vmx`` as
``encryption.keySafe`` and holds everything needed to unwrap its DEK again.

Format version 1 (docs/broker-design.md, README)::

    vtpm:keysafe/1/(pair/(fqid/<VTPM-NULL>/<provider>/<kms-key-id>,AES-256-GCM,<base64(iv || tag || wrapped DEK)>))

modelled on vSphere's ``vmware:key/list/(pair/(fqid/<VMWARE-NULL>/<provider>/
<keyId>,HMAC-SHA-256,<wrapped>))``. ``<provider>`` and ``<kms-key-id>`` are
percent-encoded, only RFC 3986 unreserved characters kept; the wrapped blob
is standard base64 with padding: a 12-byte GCM IV, the 16-byte tag, then the
64-byte DEK encrypted by the KMS under the KEK (KMIP Encrypt, AES-256-GCM).

Parsing is strict: exactly one spelling is accepted for each key safe (the
one ``format_key_safe`` writes), so a key safe is also a stable identifier.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote

__all__ = [
    "ALGORITHM",
    "DEK_BYTES",
    "FORMAT_VERSION",
    "IV_BYTES",
    "MAX_LENGTH",
    "TAG_BYTES",
    "KeySafe",
    "KeySafeError",
    "format_key_safe",
    "parse_key_safe",
]

FORMAT_VERSION = 1
ALGORITHM = "AES-256-GCM"
IV_BYTES = 12
TAG_BYTES = 16
DEK_BYTES = 64
MAX_LENGTH = 4096
MAX_FIELD = 1024
_PREFIX = "vtpm:keysafe/"
_NULL = "<VTPM-NULL>"
_ENCODED = r"[A-Za-z0-9._~%-]+"
_CONTROL = re.compile("[\x00-\x1f\x7f]")
_PATTERN = re.compile(
    r"vtpm:keysafe/(?P<version>[0-9]+)/\(pair/\(fqid/(?P<null>[^/]*)/(?P<provider>[^/,()]*)/(?P<key>[^/,()]*),"
    r"(?P<algorithm>[^,()]*),(?P<wrapped>[^,()]*)\)\)"
)


class KeySafeError(ValueError):
    """The string is not a version-1 key safe; one line says why."""


@dataclass(frozen=True)
class KeySafe:
    provider: str
    kms_key_id: str
    iv: bytes
    tag: bytes
    wrapped_dek: bytes
    algorithm: str = ALGORITHM
    version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        _check_text("provider", self.provider)
        _check_text("kms_key_id", self.kms_key_id)
        if self.algorithm != ALGORITHM:
            raise KeySafeError(f"key safe wrapping algorithm must be {ALGORITHM}")
        if self.version != FORMAT_VERSION:
            raise KeySafeError(f"key safe format version must be {FORMAT_VERSION}")
        for name, value, size in (("iv", self.iv, IV_BYTES), ("tag", self.tag, TAG_BYTES)):
            if not isinstance(value, bytes) or len(value) != size:
                raise KeySafeError(f"key safe {name} must be {size} bytes")
        if not isinstance(self.wrapped_dek, bytes) or len(self.wrapped_dek) != DEK_BYTES:
            raise KeySafeError(f"key safe wrapped DEK must be {DEK_BYTES} bytes")

    def __repr__(self) -> str:  # Lengths only, as the KMIP client does.
        return f"KeySafe(provider={self.provider!r}, kms_key_id={self.kms_key_id!r}, wrapped=bytes[{len(self.wrapped_dek)}])"

    def __str__(self) -> str:
        return format_key_safe(self)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value:
        raise KeySafeError(f"key safe {name} must be a non-empty string")
    if len(value) > MAX_FIELD:
        raise KeySafeError(f"key safe {name} is longer than {MAX_FIELD} characters")
    if _CONTROL.search(value):
        raise KeySafeError(f"key safe {name} must not contain control characters")


def _encode(value: str) -> str:
    # quote() with safe="" keeps exactly the RFC 3986 unreserved set.
    return quote(value, safe="", encoding="utf-8", errors="strict")


def format_key_safe(ks: KeySafe) -> str:
    wrapped = base64.b64encode(ks.iv + ks.tag + ks.wrapped_dek).decode("ascii")
    return (
        f"{_PREFIX}{ks.version}/(pair/(fqid/{_NULL}/{_encode(ks.provider)}/{_encode(ks.kms_key_id)},"
        f"{ks.algorithm},{wrapped}))"
    )


def _decode(name: str, encoded: str) -> str:
    if not encoded:
        raise KeySafeError(f"key safe {name} is empty")
    if not re.fullmatch(_ENCODED, encoded):
        raise KeySafeError(f"key safe {name} has characters that must be percent-encoded")
    try:
        value = unquote(encoded, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise KeySafeError(f"key safe {name} is not percent-encoded UTF-8") from None
    if _encode(value) != encoded:
        raise KeySafeError(f"key safe {name} is not in canonical percent-encoding")
    _check_text(name, value)
    return value


def parse_key_safe(text: object) -> KeySafe:
    """The KeySafe a string holds, or KeySafeError saying what is wrong."""
    if not isinstance(text, str):
        raise KeySafeError("key safe must be a string")
    if len(text) > MAX_LENGTH:
        raise KeySafeError(f"key safe is longer than {MAX_LENGTH} characters")
    if not text.startswith(_PREFIX):
        raise KeySafeError(f"key safe must start with {_PREFIX!r}")
    match = _PATTERN.fullmatch(text)
    if match is None:
        version = text[len(_PREFIX) :].split("/", 1)[0]
        if version.isdigit() and version != str(FORMAT_VERSION):
            raise KeySafeError(f"key safe format version {version} is not supported (this broker reads version 1)")
        raise KeySafeError(
            "key safe is malformed; expected vtpm:keysafe/1/(pair/(fqid/<VTPM-NULL>/<provider>/<key id>,"
            "AES-256-GCM,<base64>))"
        )
    if match["version"] != str(FORMAT_VERSION):
        raise KeySafeError(f"key safe format version {match['version']} is not supported (this broker reads version 1)")
    if match["null"] != _NULL:
        raise KeySafeError(f"key safe fqid must start with {_NULL}")
    provider = _decode("provider", match["provider"])
    key_id = _decode("key id", match["key"])
    if match["algorithm"] != ALGORITHM:
        raise KeySafeError(
            f"key safe wrapping algorithm {match['algorithm'][:40]!r} is not supported; expected {ALGORITHM}"
        )
    wrapped_text = match["wrapped"]
    try:
        blob = base64.b64decode(wrapped_text, validate=True)
    except (binascii.Error, ValueError):
        raise KeySafeError("key safe wrapped DEK is not valid base64") from None
    if base64.b64encode(blob).decode("ascii") != wrapped_text:
        raise KeySafeError("key safe wrapped DEK is not in canonical base64")
    expected = IV_BYTES + TAG_BYTES + DEK_BYTES
    if len(blob) != expected:
        raise KeySafeError(f"key safe wrapped DEK must decode to {expected} bytes (IV, tag, DEK), not {len(blob)}")
    return KeySafe(
        provider=provider,
        kms_key_id=key_id,
        iv=blob[:IV_BYTES],
        tag=blob[IV_BYTES : IV_BYTES + TAG_BYTES],
        wrapped_dek=blob[IV_BYTES + TAG_BYTES :],
    )
