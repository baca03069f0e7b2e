"""VM keys through the KMS: a KEK per VM made by KMIP Create, a fresh 512-bit
DEK wrapped by the KMS (KMIP Encrypt, AES-256-GCM) so the KEK never leaves
it, and the checks that let a VM be re-registered from its key safe alone.

The broker is an ordinary KMIP client of the KMS cluster
(``kmip_core.client.KmipClient``, failover across nodes) with its own
client certificate. A DEK is only ever a local variable or a return value:
never logged, never in an exception.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets

from kmip.core.enums import ResultReason, RevocationReasonCode

from broker.keysafe import ALGORITHM, DEK_BYTES, IV_BYTES, TAG_BYTES, KeySafe
from broker.trust import Unprocessable
from kmip_core import __version__
from kmip_core.client import KmipClient, KmipError, NoNodeAvailable, OutcomeUnknown

__all__ = ["KmsUnavailable", "VmKeys", "kek_attributes"]

log = logging.getLogger("broker.vmkeys")

VENDOR = "kms_server project"
PRODUCT = "vtpm-broker"
COMPONENT = "Virtual Machine"


class KmsUnavailable(Exception):
    """No KMS node answered, or the outcome of a change is unknown (503)."""


def kek_attributes(vm_uuid: str, vm_name: str) -> dict[str, str]:
    """The custom attributes vCenter puts on a VM's KEK, with our values."""
    return {
        "x-Vendor": VENDOR,
        "x-Product": PRODUCT,
        "x-Product_Version": __version__,
        "x-Component": COMPONENT,
        "x-Name": vm_name,
        "x-Identifier": vm_uuid,
    }


def _unavailable(exc: KmipError, what: str) -> KmsUnavailable:
    # Node names and the operation only; KmipError messages never carry payloads.
    return KmsUnavailable(f"the KMS could not {what}: {exc}")


class VmKeys:
    """Key operations for VMs against one key provider (the KMS cluster)."""

    def __init__(self, client: KmipClient, provider_name: str):
        self.client = client
        self.provider_name = provider_name

    def create(self, vm_uuid: str, vm_name: str) -> KeySafe:
        """A new KEK for the VM (Create + Activate) and a fresh DEK wrapped
        under it by the KMS; returns the key safe. The DEK is dropped here."""
        uid = self._new_kek(vm_uuid, vm_name)
        dek = os.urandom(DEK_BYTES)
        try:
            key_safe = self._wrap(uid, dek)
        finally:
            del dek
        log.info("created KEK %s for VM %s", uid, vm_uuid)
        return key_safe

    def rewrap(self, key_safe: KeySafe, vm_uuid: str, vm_name: str) -> KeySafe:
        """Shallow rekey: a new KEK for the VM, and the DEK of `key_safe`
        (KMIP Decrypt under the old KEK) wrapped under it (KMIP Encrypt):
        both KEKs stay in the KMS. The DEK is dropped here."""
        dek = self.unwrap(key_safe)
        try:
            uid = self._new_kek(vm_uuid, vm_name)
            new = self._wrap(uid, dek)
        finally:
            del dek
        log.info("wrapped the DEK of VM %s under new KEK %s (was %s)", vm_uuid, uid, key_safe.kms_key_id)
        return new

    def same_dek(self, a: KeySafe, b: KeySafe) -> bool:
        """Do two key safes hold the same DEK? (Both unwrapped at the KMS.)"""
        first, second = self.unwrap(a), self.unwrap(b)
        try:
            return hmac.compare_digest(first, second)
        finally:
            del first, second

    def retire(self, uid: str) -> str:
        """Deactivate an old KEK (KMIP Revoke, Cessation of Operation):
        it encrypts nothing more. Returns what happened, for the trail."""
        try:
            self.client.revoke(uid, RevocationReasonCode.CESSATION_OF_OPERATION, "vtpm-broker: KEK rotated")
            return "deactivated (Revoke, cessation of operation)"
        except (OutcomeUnknown, KmipError) as exc:
            state = self.kek_state(uid)
            if state in ("DEACTIVATED", "COMPROMISED", "DESTROYED", "DESTROYED_COMPROMISED"):
                return f"already {state.lower()}"
            raise _unavailable(exc, f"deactivate the old KEK {uid}") from None

    def kek_state(self, uid: str) -> str | None:
        """The KEK's KMIP State name (None: the KMS has no such key for us)."""
        try:
            state = self.client.get_attributes(uid, ["State"]).get("State", [None])[0]
        except KmipError as exc:
            if exc.reason in (ResultReason.ITEM_NOT_FOUND, ResultReason.PERMISSION_DENIED):
                return None
            raise _unavailable(exc, f"read the state of key {uid}") from None
        return getattr(state, "name", None)

    def _new_kek(self, vm_uuid: str, vm_name: str) -> str:
        """Create + Activate an AES-256 KEK named and tagged for the VM."""
        name = f"vtpm-kek-{vm_uuid}-{secrets.token_hex(4)}"
        try:
            uid = self.client.create_symmetric_key("AES", 256, name=name, attributes=kek_attributes(vm_uuid, vm_name))
        except OutcomeUnknown as exc:
            uid = self._find_after_unknown(name, exc)
        except (NoNodeAvailable, KmipError) as exc:
            raise _unavailable(exc, "create the VM's KEK") from None
        try:
            self.client.activate(uid)
        except OutcomeUnknown as exc:
            log.warning("Activate of KEK %s: %s; checking its state", uid, exc)
            state = self.client.get_attributes(uid, ["State"]).get("State", [None])[0]
            if getattr(state, "name", None) != "ACTIVE":
                raise _unavailable(exc, "activate the VM's KEK") from None
        except KmipError as exc:
            raise _unavailable(exc, "activate the VM's KEK") from None
        return uid

    def _wrap(self, uid: str, dek: bytes) -> KeySafe:
        """The DEK wrapped under KEK `uid` by the KMS (KMIP Encrypt, AES-256-GCM)."""
        try:
            wrapped = self.client.encrypt(uid, dek, mode="GCM")
        except KmipError as exc:
            raise _unavailable(exc, "wrap the DEK") from None
        if wrapped.iv is None or len(wrapped.iv) != IV_BYTES or wrapped.tag is None or len(wrapped.tag) != TAG_BYTES:
            raise KmsUnavailable("the KMS answered Encrypt without a 12-byte IV and a 16-byte tag")
        return KeySafe(self.provider_name, uid, wrapped.iv, wrapped.tag, wrapped.data)

    def _find_after_unknown(self, name: str, exc: OutcomeUnknown) -> str:
        """A Create whose answer was lost: find the key by its unique Name."""
        log.warning("Create of %s: %s; looking for it", name, exc)
        try:
            found = self.client.locate({"Name": name})
        except KmipError as again:
            raise _unavailable(again, "confirm the KEK was created") from None
        if len(found) != 1:
            raise KmsUnavailable("the KMS did not confirm the KEK was created; try again")
        return found[0]

    def check_key_safe(self, key_safe: KeySafe, vm_uuid: str) -> None:
        """Refuse (Unprocessable) a key safe that another provider wrote,
        that names a key this KMS does not have, whose KEK is tagged with
        another VM, or whose wrapped DEK does not unwrap under its KEK."""
        if key_safe.provider != self.provider_name:
            raise Unprocessable(
                f"the key safe names key provider {key_safe.provider!r}, this broker is {self.provider_name!r}; "
                "recover the VM through the broker of that provider"
            )
        if key_safe.algorithm != ALGORITHM:
            raise Unprocessable(f"the key safe's wrapping {key_safe.algorithm} is not supported")
        uid = key_safe.kms_key_id
        try:
            attributes = self.client.get_attributes(uid, ["x-Identifier", "State"])
        except KmipError as exc:
            if exc.reason in (ResultReason.ITEM_NOT_FOUND, ResultReason.PERMISSION_DENIED):
                raise Unprocessable(f"the KMS has no key {uid!r} for this broker") from None
            raise _unavailable(exc, f"look up key {uid}") from None
        identifiers = attributes.get("x-Identifier") or []
        if identifiers and str(identifiers[0]).lower() != vm_uuid:
            raise Unprocessable(f"KMS key {uid!r} is the KEK of another VM, not of {vm_uuid}")
        state = getattr((attributes.get("State") or [None])[0], "name", None)
        if state is not None and state != "ACTIVE":
            # A rotated VM's old .vmx: its KEK was deactivated by the rekey.
            raise Unprocessable(
                f"KMS key {uid!r} is {state.lower()}: the VM's KEK was rotated; register the VM's current .vmx"
            )
        self.unwrap(key_safe, check_only=True)

    def unwrap(self, key_safe: KeySafe, *, check_only: bool = False) -> bytes:
        """The DEK (KMIP Decrypt at the KMS). A key safe whose wrapped DEK
        does not open is Unprocessable."""
        try:
            dek = self.client.decrypt(
                key_safe.kms_key_id, key_safe.wrapped_dek, iv=key_safe.iv, tag=key_safe.tag, mode="GCM"
            )
        except KmipError as exc:
            if exc.reason == ResultReason.CRYPTOGRAPHIC_FAILURE:
                raise Unprocessable(
                    f"the key safe's wrapped DEK does not unwrap under KMS key {key_safe.kms_key_id!r}"
                ) from None
            if exc.reason in (ResultReason.ITEM_NOT_FOUND, ResultReason.PERMISSION_DENIED):
                raise Unprocessable(f"the KMS has no usable key {key_safe.kms_key_id!r} for this broker") from None
            if exc.reason is not None:
                raise Unprocessable(
                    f"the KMS refused to unwrap with key {key_safe.kms_key_id!r} ({exc.reason.name})"
                ) from None
            raise _unavailable(exc, "unwrap the DEK") from None
        if len(dek) != DEK_BYTES:
            raise Unprocessable("the key safe's wrapped DEK is not a 512-bit key")
        if check_only:
            return b""
        return dek
