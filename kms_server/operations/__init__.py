"""The operation table: one module per KMIP operation, each with an
`OPERATION` (kmip.core.enums.Operation) and `handle(ctx, keystore,
payload) -> list of response payload items`."""

from __future__ import annotations

import importlib

from kmip.core.enums import Operation

from kmip_core import errors

# Modules of this package; DiscoverVersions is the framework's own
# (kmip_core.server.discover_versions), answered the same by every service.
_MODULES = (
    "kmip_core.server.discover_versions",
    "query",
    "create",
    "create_key_pair",
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


def _load() -> dict[Operation, object]:
    table = {}
    for name in _MODULES:
        module = importlib.import_module(name if "." in name else f"{__name__}.{name}")
        table[module.OPERATION] = _answering_per_version(module.handle)
    return table


def _answering_per_version(handle):
    """Lifecycle refusals get the Result Reason the request's version calls
    for (errors.LifecycleRefused)."""

    def run(ctx, keystore, payload):
        try:
            return handle(ctx, keystore, payload)
        except errors.LifecycleRefused as exc:
            raise exc.for_version(ctx.version) from None

    run.__name__ = run.__qualname__ = getattr(handle, "__module__", "handle")
    return run


OPERATIONS = _load()
