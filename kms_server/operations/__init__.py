"""The operation table: one module per KMIP operation, each with an
`OPERATION` (kmip.core.enums.Operation) and `handle(ctx, keystore,
payload) -> list of response payload items`."""

from __future__ import annotations

import importlib

from kmip.core.enums import Operation

_MODULES = (
    "discover_versions",
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
    "sign",
    "signature_verify",
    "interop",
)


def _load() -> dict[Operation, object]:
    table = {}
    for name in _MODULES:
        try:
            module = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # Not written yet: answers OPERATION_NOT_SUPPORTED.
            raise
        table[module.OPERATION] = module.handle
    return table


OPERATIONS = _load()
