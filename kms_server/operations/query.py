"""KMIP 1.4, 4.25 Query: the operations and object types this server
supports, and who it is."""

from kmip.core.enums import ObjectType, Operation, QueryFunction

from kmip_core import __version__, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore.keystore import Keystore

OPERATION = Operation.QUERY

VENDOR_IDENTIFICATION = f"kms-server {__version__}"
OBJECT_TYPES = (
    ObjectType.SYMMETRIC_KEY,
    ObjectType.PUBLIC_KEY,
    ObjectType.PRIVATE_KEY,
    ObjectType.CERTIFICATE,
    ObjectType.SECRET_DATA,
    ObjectType.OPAQUE_DATA,
    ObjectType.SPLIT_KEY,
)


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    from kms_server.operations import OPERATIONS  # The table is built from this package.

    functions = {i.value for i in payload.find_all(TAG.QUERY_FUNCTION)}
    out = []
    if QueryFunction.QUERY_OPERATIONS.value in functions:
        for op in sorted(OPERATIONS, key=lambda o: o.value):
            # 1.x defines operations up to Export (0x2B); Log and later are 2.0.
            if op.value <= 0x2B or ctx.v2:
                out.append(ttlv.enumeration(TAG.OPERATION, op.value))
    if QueryFunction.QUERY_OBJECTS.value in functions:
        out += [ttlv.enumeration(TAG.OBJECT_TYPE, t.value) for t in OBJECT_TYPES]
    if QueryFunction.QUERY_SERVER_INFORMATION.value in functions:
        out.append(ttlv.text(TAG.VENDOR_IDENTIFICATION, VENDOR_IDENTIFICATION))
        # KMIP 1.4, 4.25: Server Information is vendor-specific; this server
        # has nothing to add beyond its Vendor Identification.
        out.append(ttlv.structure(TAG.SERVER_INFORMATION, []))
    return out
