"""KMIP 1.4, 4.16 Obtain Lease / 2.0, 6.1.33: a client that holds an object
asks to keep using it for another Lease Time. The server grants its Lease
Time (the object's attribute) and answers the Last Change Date, so the
client can tell whether its copy of the attributes is current. A lease is
only granted for an object that may be used, i.e. an Active one."""

from kmip.core.enums import Operation, State

from kmip_core import errors, ttlv
from kmip_core.policy import Action
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore.keystore import Keystore
from kms_server.operations import common

OPERATION = Operation.OBTAIN_LEASE


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    uid = common.unique_identifier(ctx, payload)
    with keystore.transaction(read_only=True) as txn:
        obj = keystore.load(txn, ctx.principal, uid, Action.USE, ctx.now)
    common.refuse_destroyed(ctx, obj)
    lease = obj.value("Lease Time")
    if lease is None:
        raise errors.IllegalOperation(f"a {obj.object_type.name} is not held under a lease")
    if obj.state != State.ACTIVE:
        name = obj.state.name if obj.state else "stateless"
        raise errors.IllegalOperation(f"object is {name}; a lease is only granted on an ACTIVE object")
    return [
        common.uid_item(obj.uid),
        ttlv.interval(TAG.LEASE_TIME, lease),
        ttlv.date_time(TAG.LAST_CHANGE_DATE, obj.value("Last Change Date", ctx.now)),
    ]
