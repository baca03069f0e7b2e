"""The operation table: one module per KMIP operation, each with an
`OPERATION` (kmip.core.enums.Operation) and `handle(ctx, keystore,
payload) -> list of response payload items`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from kmip.core.enums import Operation

from kmip_core import errors
from kmip_core.server.context import RequestContext
from kmip_core.server.dispatcher import Handler
from kmip_core.ttlv import Item

if TYPE_CHECKING:
    from kms_server.keystore.keystore import Keystore

# Modules of this package; DiscoverVersions is the framework's own
# (kmip_core.server.discover_versions), answered the same by every service.
_MODULES = (
    "kmip_core.server.discover_versions",
    "query",
    "create",
    "create_key_pair",
    "derive_key",
    "register",
    "get",
    "get_attributes",
    "get_attribute_list",
    "add_attribute",
    "modify_attribute",
    "delete_attribute",
    "set_attribute",
    "locate",
    "activate",
    "revoke",
    "destroy",
    "rekey",
    "encrypt",
    "decrypt",
    "mac",
    "mac_verify",
    "hash",
    "rng_retrieve",
    "rng_seed",
    "sign",
    "signature_verify",
    "interop",
    "check",
    "log",
    "obtain_lease",
)


def _load() -> dict[Operation, Handler]:
    table: dict[Operation, Handler] = {}
    for name in _MODULES:
        module = importlib.import_module(name if "." in name else f"{__name__}.{name}")
        table[module.OPERATION] = _answering_per_version(module.handle)
    return table


def _answering_per_version(handle: Handler) -> Handler:
    """Lifecycle refusals get the Result Reason the request's version calls
    for (errors.LifecycleRefused)."""

    def run(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
        try:
            return handle(ctx, keystore, payload)
        except errors.LifecycleRefused as exc:
            raise exc.for_version(ctx.version) from None

    run.__name__ = run.__qualname__ = getattr(handle, "__module__", "handle")
    return run


OPERATIONS = _load()


if TYPE_CHECKING:
    # The table is loaded by name; here mypy checks every handler against the
    # dispatcher's Handler signature (ctx, keystore, payload) -> items.
    from kmip_core.server import discover_versions
    from kms_server.operations import (
        activate,
        add_attribute,
        check,
        create,
        create_key_pair,
        decrypt,
        delete_attribute,
        derive_key,
        destroy,
        encrypt,
        get,
        get_attribute_list,
        get_attributes,
        hash,
        interop,
        locate,
        log,
        mac,
        mac_verify,
        modify_attribute,
        obtain_lease,
        query,
        register,
        rekey,
        revoke,
        rng_retrieve,
        rng_seed,
        set_attribute,
        sign,
        signature_verify,
    )

    _HANDLERS: tuple[Handler, ...] = (
        discover_versions.handle,
        query.handle,
        create.handle,
        create_key_pair.handle,
        derive_key.handle,
        register.handle,
        get.handle,
        get_attributes.handle,
        get_attribute_list.handle,
        add_attribute.handle,
        modify_attribute.handle,
        delete_attribute.handle,
        set_attribute.handle,
        locate.handle,
        activate.handle,
        revoke.handle,
        destroy.handle,
        rekey.handle,
        encrypt.handle,
        decrypt.handle,
        mac.handle,
        mac_verify.handle,
        hash.handle,
        rng_retrieve.handle,
        rng_seed.handle,
        sign.handle,
        signature_verify.handle,
        interop.handle,
        check.handle,
        log.handle,
        obtain_lease.handle,
    )
