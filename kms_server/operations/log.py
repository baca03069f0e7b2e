"""KMIP 2.0, 6.1.27 Log: a client asks the server to write a message to
its log. The message goes to the server log with the request id and the
client's name; the audit trail records the item like any other."""

import logging

from kmip.core.enums import Operation, Tags

from kmip_core import errors
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import Item, ItemType
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.LOG

log = logging.getLogger("kms_server.operations.log")

# A client's message is kept to one readable line of bounded length.
MAX_LOG_MESSAGE = 1024


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    if not ctx.v2:
        raise errors.OperationNotSupported("Log is a KMIP 2.0 operation")
    message = common.require(payload, Tags.LOG_MESSAGE, ItemType.TEXT_STRING).value
    if len(message) > MAX_LOG_MESSAGE:
        raise errors.InvalidField(f"Log Message is longer than {MAX_LOG_MESSAGE} characters")
    log.info("request %s: client %s logs: %r", ctx.request_id, ctx.principal.name, message)
    return []
