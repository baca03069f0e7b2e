"""The Client Correlation Value (KMIP 1.4, 6.20; 2.0, 7.17) from the
client's request header to the KMS audit record: the client sends it only
in versions that define it, the dispatcher records it as an optional field,
and a trail mixing records with and without it still verifies."""

from __future__ import annotations

import json
import os

from kmip.core.enums import Operation, ResultStatus
from kmip.core.enums import Tags as T

from kmip_core import ttlv
from kmip_core.client import correlation, current_correlation, messages
from kmip_core.sealing.barrier import Barrier
from kmip_core.server.dispatcher import Dispatcher
from kms_server.audit import query
from kms_server.audit.trail import AuditTrail, iter_records, verify_storage
from kms_server.keystore.keystore import Keystore
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage
from tests.kms_server.dispatch.test_dispatcher import create_payload, handle, only_item, status

CORRELATION = "broker-req=0123456789abcdef;host=esx-01"


def _header(data: bytes):
    return ttlv.decode(data).find(T.REQUEST_HEADER.value)


def test_the_client_sends_the_correlation_value_only_from_kmip_1_4_on():
    with correlation(CORRELATION):
        assert current_correlation() == CORRELATION
        for version in ((1, 4), (2, 0)):
            data = messages.request_message(version, Operation.QUERY, [], correlation=current_correlation())
            assert _header(data).get(T.CLIENT_CORRELATION_VALUE.value) == CORRELATION
        old = messages.request_message((1, 2), Operation.QUERY, [], correlation=current_correlation())
        assert _header(old).find(T.CLIENT_CORRELATION_VALUE.value) is None
    assert current_correlation() is None
    plain = messages.request_message((1, 4), Operation.QUERY, [])
    assert _header(plain).find(T.CLIENT_CORRELATION_VALUE.value) is None


def test_the_kms_records_the_correlation_value_and_old_records_still_verify():
    storage = open_storage("memory://")
    trail = AuditTrail(storage, "node-1")
    dispatcher = Dispatcher(Keystore(storage, Barrier(os.urandom(32))), OPERATIONS, node="node-1", trail=trail)
    # A record from before: no correlation field at all.
    plain = messages.request_message((1, 4), Operation.CREATE, create_payload())
    assert status(only_item(handle(dispatcher, plain))) == ResultStatus.SUCCESS
    tagged = messages.request_message((1, 4), Operation.CREATE, create_payload(), correlation=CORRELATION)
    assert status(only_item(handle(dispatcher, tagged))) == ResultStatus.SUCCESS
    # 1.2 does not define the field: not recorded even if a client sends it.
    old = messages.request_message((1, 4), Operation.CREATE, create_payload(), correlation=CORRELATION)
    old = old.replace(ttlv.encode(messages.protocol_version((1, 4))), ttlv.encode(messages.protocol_version((1, 2))))
    assert status(only_item(handle(dispatcher, old))) == ResultStatus.SUCCESS
    bodies = [json.loads(r.body) for r in iter_records(storage)]
    assert "correlation" not in bodies[0]
    assert bodies[1]["correlation"] == CORRELATION
    assert "correlation" not in bodies[2]
    assert verify_storage(storage, None).ok

    # kms-admin audit show --request-id: the broker's id inside the value, or the KMS's own.
    found = query.find(storage, query.Filters(request_id="0123456789abcdef"))[1]
    assert [json.loads(r.body)["request_id"] for r in found] == [bodies[1]["request_id"]]
    own = query.find(storage, query.Filters(request_id=bodies[0]["request_id"]))[1]
    assert len(own) == 1 and own[0].seq == 1
    assert query.find(storage, query.Filters(request_id="esx-0"))[0] == 0
    storage.close()
