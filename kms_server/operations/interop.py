"""KMIP 2.0, 6.1.28 Interop: a test harness tells the server that a test
case begins or ends (Interop Function Begin/End, Interop Identifier naming
the test case). Begin and End change nothing; the server only notes them in
its log, and the audit trail records the item like any other. Reset asks
the server to return to its initial state, which a key store holding real
keys must never do on a client's word: it is refused."""

import logging

from kmip.core.enums import InteropFunction, Operation, Tags

from kmip_core import errors
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import Item, ItemType
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.INTEROP

log = logging.getLogger("kms_server.operations.interop")


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    if not ctx.v2:
        raise errors.OperationNotSupported("Interop is a KMIP 2.0 operation")
    function = common.optional_enum(payload, Tags.INTEROP_FUNCTION, InteropFunction)
    if function is None:
        raise errors.MissingData("Interop Function is required")
    identifier = common.require(payload, Tags.INTEROP_IDENTIFIER, ItemType.TEXT_STRING).value
    if function == InteropFunction.RESET:
        raise errors.FeatureNotSupported("Interop Reset is not supported: the server never discards its objects")
    log.info("request %s: interop test case %r %s", ctx.request_id, identifier, function.name.lower())
    return []
