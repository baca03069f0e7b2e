"""Who may do what to which object.

A client sees the objects it owns. Roles from the configuration widen or
narrow that: an administrator sees and may do everything; a no-cryptography
administrator sees every object and may manage it (attributes, Activate,
Revoke) but never touch key material (Get, Encrypt, Decrypt, MAC, Sign,
Destroy, or make new keys); an auditor has no key operation at all.
An object the caller may not see is reported as not found, so a refusal
never reveals that it exists.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass

from kmip_core import errors


class Role(enum.Enum):
    USER = "user"
    ADMINISTRATOR = "administrator"
    NO_CRYPTO_ADMINISTRATOR = "no_crypto_administrator"
    AUDITOR = "auditor"


class Action(enum.Enum):
    CREATE = "create"  # Create, CreateKeyPair, Register, ReKey
    READ_ATTRIBUTES = "read_attributes"  # GetAttributes, GetAttributeList, Locate
    MANAGE = "manage"  # Add/Modify/Delete/SetAttribute, Activate, Revoke
    READ_MATERIAL = "read_material"  # Get
    USE = "use"  # Encrypt, Decrypt, MAC, Sign, SignatureVerify, wrapping
    DESTROY = "destroy"


_ROLE_ACTIONS = {
    Role.USER: set(Action),
    Role.ADMINISTRATOR: set(Action),
    Role.NO_CRYPTO_ADMINISTRATOR: {Action.READ_ATTRIBUTES, Action.MANAGE},
    Role.AUDITOR: set(),
}


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: identity from the client certificate, the
    KMIP username if a Credential was given, and the role the configuration
    grants that identity."""

    name: str
    role: Role = Role.USER
    subject: str = ""
    fingerprint: str = ""
    username: str | None = None

    @property
    def sees_all(self) -> bool:
        return self.role in (Role.ADMINISTRATOR, Role.NO_CRYPTO_ADMINISTRATOR)


def may_see(principal: Principal, owner: str) -> bool:
    return principal.sees_all or owner == principal.name


def check(principal: Principal, action: Action, owner: str | None = None) -> None:
    """Raise unless `principal` may do `action` on an object owned by
    `owner` (None for actions that create objects)."""
    if owner is not None and not may_see(principal, owner):
        raise errors.ItemNotFound("no such object")
    if action not in _ROLE_ACTIONS[principal.role]:
        raise errors.PermissionDenied(f"role {principal.role.value} may not {action.value.replace('_', ' ')}")


def role_for(
    identity: str,
    administrators: Collection[str],
    no_crypto_administrators: Collection[str],
    auditors: Collection[str],
) -> Role:
    if identity in administrators:
        return Role.ADMINISTRATOR
    if identity in no_crypto_administrators:
        return Role.NO_CRYPTO_ADMINISTRATOR
    if identity in auditors:
        return Role.AUDITOR
    return Role.USER
