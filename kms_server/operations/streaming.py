"""Multi-part Encrypt and Decrypt (KMIP 1.4, 4.29 and 4.30; 2.0, 6.1.18
and 6.1.13): the first part carries Init Indicator and gets a Correlation
Value, later parts carry it, the last one also Final Indicator. A request
with neither indicator, or with both, is a whole operation. The cipher's
state between parts is kept by `kms_server.keystore.streams` on this node.

The first part fixes key, parameters, IV and additional data; later parts
give only Data (and, for a GCM decryption, the tag with the last part).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kmip.core.enums import BlockCipherMode, ObjectType, Operation, Tags
from kmip.core.enums import Tags as T

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item, ItemType
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import ManagedObject
from kms_server.operations import common, key_use


@dataclass(frozen=True)
class Part:
    init: bool
    final: bool
    correlation: bytes | None


def part_of(payload: Item) -> Part | None:
    """The request's place in a multi-part operation; None for a whole one."""
    init = _flag(payload, T.INIT_INDICATOR)
    final = _flag(payload, T.FINAL_INDICATOR)
    item = payload.find(TAG.CORRELATION_VALUE)
    if item is not None and item.type != ItemType.BYTE_STRING:
        raise errors.InvalidField("Correlation Value must be a byte string")
    correlation = item.value if item is not None else None
    if correlation is None and not init:
        if final:
            raise errors.InvalidField("Final Indicator ends a multi-part operation: give its Correlation Value")
        return None
    if init and final:
        if correlation is not None:
            raise errors.InvalidField("a whole operation (Init and Final Indicator) takes no Correlation Value")
        return None
    if init and correlation is not None:
        raise errors.InvalidField("Init Indicator begins a multi-part operation: it takes no Correlation Value")
    return Part(init=init, final=final, correlation=correlation)


def run(
    ctx: RequestContext,
    keystore: Keystore,
    obj: ManagedObject,
    operation: Operation,
    part: Part,
    data: bytes,
    begin: Callable[[], crypto.CipherStream] | None = None,
    *,
    tag: bytes | None = None,
) -> tuple[list[Item], crypto.CipherStream]:
    """One part: `begin()` makes the cipher for the first one (later parts
    need none: the key's checks have run again, not its set-up). Returns the
    response items (Unique Identifier, Data, and the Correlation Value, or
    the Authenticated Encryption Tag of a finished GCM encryption) and the
    cipher."""
    if obj.object_type != ObjectType.SYMMETRIC_KEY:
        raise errors.FeatureNotSupported(f"multi-part {operation.name} needs a symmetric key")
    streams, client = keystore.streams, ctx.principal.name
    if part.init:
        assert begin is not None
        try:
            cipher = begin()
            out = cipher.update(data)
        except crypto.CryptoError as exc:
            raise key_use.crypto_failure(exc) from None
        correlation = streams.begin(client, obj.uid, operation.name, cipher)
        return [common.uid_item(obj.uid), _data(out), _correlation(correlation)], cipher
    if tag is not None and not part.final:
        raise errors.InvalidField("the Authenticated Encryption Tag comes with the last part (Final Indicator)")
    assert part.correlation is not None  # read_part refuses a later part without one
    stream = streams.take(part.correlation, client, obj.uid, operation.name, part.final)
    cipher = stream.cipher
    try:
        if part.final and cipher.decrypting and cipher.mode == BlockCipherMode.GCM and tag is None:
            raise errors.MissingData("Authenticated Encryption Tag is required with the last part of a GCM decryption")
        out = cipher.update(data)
        if not part.final:
            return [common.uid_item(obj.uid), _data(out), _correlation(part.correlation)], cipher
        rest, made_tag = cipher.finalize(tag)
    except crypto.CryptoError as exc:
        streams.abandon(part.correlation)
        raise key_use.crypto_failure(exc) from None
    finally:
        stream.done()
    items = [common.uid_item(obj.uid), _data(out + rest)]
    if made_tag is not None:
        items.append(ttlv.byte_string(TAG.AUTHENTICATED_ENCRYPTION_TAG, made_tag))
    return items, cipher


def check_later_part(payload: Item, part: Part, fields: tuple[Tags, ...]) -> None:
    """Fields only the first part may give (IV, additional data): the
    cipher was set up with them and cannot take them later."""
    if part.init:
        return
    for t in fields:
        if payload.find(t.value) is not None:
            raise errors.InvalidField(
                f"{t.name.replace('_', ' ').title()} is given with the first part (Init Indicator) only"
            )


def _flag(payload: Item, t: Tags) -> bool:
    item = payload.find(t.value)
    if item is None:
        return False
    if item.type != ItemType.BOOLEAN:
        raise errors.InvalidField(f"{t.name.replace('_', ' ').title()} must be a boolean")
    return item.value is True


def _data(value: bytes) -> Item:
    return ttlv.byte_string(TAG.DATA, value)


def _correlation(value: bytes) -> Item:
    return ttlv.byte_string(TAG.CORRELATION_VALUE, value)
