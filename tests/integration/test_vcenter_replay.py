"""Replay of the captured vCenter 7.0.3 session (../shared/vectors/vcenter/)
against a real node over mutual TLS. The unique identifiers vCenter saw
("1", "2") are mapped to the ones this server returns; everything else is
sent byte for byte as vCenter sent it."""

from __future__ import annotations

import concurrent.futures

import pytest
import vcenter_vectors
from kmip.core.enums import ObjectType, Operation, ResultStatus, State, Tags
from kmip_client import RawClient

from kmip_core import ttlv

T = Tags


def _rewrite_uids(item: ttlv.Item, mapping: dict[str, str]) -> ttlv.Item:
    if item.tag == T.UNIQUE_IDENTIFIER.value and item.value in mapping:
        return ttlv.Item(item.tag, item.type, mapping[item.value])
    if item.type == ttlv.ItemType.STRUCTURE:
        return ttlv.Item(item.tag, item.type, tuple(_rewrite_uids(c, mapping) for c in item.value))
    return item


def _payload(batch_item: ttlv.Item) -> ttlv.Item:
    return batch_item.find(T.RESPONSE_PAYLOAD.value)


def replay(client: RawClient, exchanges) -> tuple[list[tuple[ttlv.Item, ttlv.Item]], dict[str, str]]:
    mapping: dict[str, str] = {}
    results = []
    for exchange in exchanges:
        request = _rewrite_uids(ttlv.decode(exchange.request), mapping)
        response = client.request(ttlv.encode(request))
        assert response is not None, "server closed the connection"
        results.append((request, response))
        if exchange.response is None:
            continue
        expected = ttlv.decode(exchange.response)
        for theirs, ours in zip(expected.find_all(T.BATCH_ITEM.value), response.find_all(T.BATCH_ITEM.value), strict=False):
            if theirs.get(T.OPERATION.value) == Operation.CREATE.value and theirs.get(T.RESULT_STATUS.value) == 0:
                mapping[_payload(theirs).get(T.UNIQUE_IDENTIFIER.value)] = _payload(ours).get(T.UNIQUE_IDENTIFIER.value)
    return results, mapping


def test_vcenter_session_replays_with_every_item_successful(kms_module, pki_dir):
    """Every request of the session succeeds (including the AddAttribute
    batches that PyKMIP's server rejected), each response is in KMIP 1.1 and
    echoes the batch item ids, and the payloads are what vCenter expects."""
    exchanges = vcenter_vectors.load()
    assert len(exchanges) >= 50
    with RawClient(kms_module.host, kms_module.port, pki_dir, "alice") as client:
        results, mapping = replay(client, exchanges)
    assert len(mapping) == 2
    seen_ops = set()
    for request, response in results:
        header = response.find(T.RESPONSE_HEADER.value)
        version = header.find(T.PROTOCOL_VERSION.value)
        assert (version.get(T.PROTOCOL_VERSION_MAJOR.value), version.get(T.PROTOCOL_VERSION_MINOR.value)) == (1, 1)
        request_items = request.find_all(T.BATCH_ITEM.value)
        response_items = response.find_all(T.BATCH_ITEM.value)
        assert header.get(T.BATCH_COUNT.value) == len(request_items) == len(response_items)
        for req_item, resp_item in zip(request_items, response_items, strict=True):
            op = Operation(req_item.get(T.OPERATION.value))
            seen_ops.add(op)
            assert resp_item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value, (op, resp_item)
            assert resp_item.get(T.OPERATION.value) == op.value
            assert resp_item.get(T.UNIQUE_BATCH_ITEM_ID.value) == req_item.get(T.UNIQUE_BATCH_ITEM_ID.value)
            payload = _payload(resp_item)
            if op == Operation.CREATE:
                assert payload.get(T.OBJECT_TYPE.value) == ObjectType.SYMMETRIC_KEY.value
                assert payload.get(T.UNIQUE_IDENTIFIER.value) in mapping.values()
            elif op == Operation.GET:
                block = payload.find(T.SYMMETRIC_KEY.value).find(T.KEY_BLOCK.value)
                assert block.get(T.KEY_FORMAT_TYPE.value) == 1  # Raw
                assert len(block.find(T.KEY_VALUE.value).get(T.KEY_MATERIAL.value)) == 32
                assert block.get(T.CRYPTOGRAPHIC_ALGORITHM.value) == 3  # AES
                assert block.get(T.CRYPTOGRAPHIC_LENGTH.value) == 256
            elif op == Operation.ADD_ATTRIBUTE:
                attribute = payload.find(T.ATTRIBUTE.value)
                sent = req_item.find(T.REQUEST_PAYLOAD.value).find(T.ATTRIBUTE.value)
                assert attribute.get(T.ATTRIBUTE_NAME.value) == sent.get(T.ATTRIBUTE_NAME.value)
                assert attribute.get(T.ATTRIBUTE_VALUE.value) == sent.get(T.ATTRIBUTE_VALUE.value)
            elif op == Operation.DISCOVER_VERSIONS:
                versions = [
                    (v.get(T.PROTOCOL_VERSION_MAJOR.value), v.get(T.PROTOCOL_VERSION_MINOR.value))
                    for v in payload.find_all(T.PROTOCOL_VERSION.value)
                ]
                assert versions[0] == (2, 1) and (1, 1) in versions
            elif op == Operation.QUERY:
                assert payload.get(T.VENDOR_IDENTIFICATION.value).startswith("kms-server")
    assert {Operation.DISCOVER_VERSIONS, Operation.QUERY, Operation.CREATE, Operation.GET_ATTRIBUTES,
            Operation.ADD_ATTRIBUTE, Operation.GET, Operation.ACTIVATE} <= seen_ops


def _request(version, *batch_items):
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            ttlv.structure(
                T.PROTOCOL_VERSION.value,
                [ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, version[0]), ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, version[1])],
            ),
            ttlv.integer(T.BATCH_COUNT.value, len(batch_items)),
        ],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, *batch_items]))


def _item(op: Operation, *payload):
    return ttlv.structure(
        T.BATCH_ITEM.value,
        [ttlv.enumeration(T.OPERATION.value, op.value), ttlv.structure(T.REQUEST_PAYLOAD.value, payload)],
    )


def test_vcenter_flow_then_locate_by_x_identifier(kms, pki_dir):
    """After the captured flow (create, tag, get, activate) on a fresh node,
    the key is Active and Locate by its x-Identifier finds exactly it."""
    with RawClient(kms.host, kms.port, pki_dir, "alice") as client:
        results, mapping = replay(client, vcenter_vectors.load())
        # The x-Identifier vCenter gave each key.
        identifiers = {}
        for request, _ in results:
            for item in request.find_all(T.BATCH_ITEM.value):
                payload = item.find(T.REQUEST_PAYLOAD.value)
                attribute = payload.find(T.ATTRIBUTE.value) if payload is not None else None
                if attribute is not None and attribute.get(T.ATTRIBUTE_NAME.value) == "x-Identifier":
                    identifiers[payload.get(T.UNIQUE_IDENTIFIER.value)] = attribute.get(T.ATTRIBUTE_VALUE.value)
        assert identifiers, "the session tags keys with x-Identifier"
        for uid, identifier in identifiers.items():
            locate = _item(
                Operation.LOCATE,
                ttlv.structure(
                    T.ATTRIBUTE.value,
                    [ttlv.text(T.ATTRIBUTE_NAME.value, "x-Identifier"), ttlv.text(T.ATTRIBUTE_VALUE.value, identifier)],
                ),
            )
            response = client.request(_request((1, 1), locate))
            item = response.find(T.BATCH_ITEM.value)
            assert item.get(T.RESULT_STATUS.value) == 0
            assert [u.value for u in _payload(item).find_all(T.UNIQUE_IDENTIFIER.value)] == [uid]
            state = client.request(
                _request(
                    (1, 1),
                    _item(Operation.GET_ATTRIBUTES, ttlv.text(T.UNIQUE_IDENTIFIER.value, uid), ttlv.text(T.ATTRIBUTE_NAME.value, "State")),
                )
            )
            attribute = _payload(state.find(T.BATCH_ITEM.value)).find(T.ATTRIBUTE.value)
            assert attribute.get(T.ATTRIBUTE_VALUE.value) == State.ACTIVE.value


def test_parallel_vcenter_sessions(kms_module, pki_dir):
    """vCenter opens several TLS sessions at once; four concurrent replays
    all succeed and create distinct keys."""

    def one():
        with RawClient(kms_module.host, kms_module.port, pki_dir, "alice") as client:
            results, mapping = replay(client, vcenter_vectors.load())
        failures = [
            item
            for _, response in results
            for item in response.find_all(T.BATCH_ITEM.value)
            if item.get(T.RESULT_STATUS.value) != 0
        ]
        return failures, set(mapping.values())

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(lambda _: one(), range(4)))
    all_uids = set()
    for failures, uids in outcomes:
        assert failures == []
        assert len(uids) == 2
        all_uids |= uids
    assert len(all_uids) == 8


@pytest.mark.parametrize("name", ["vcenter-probe-session.log"])
def test_probe_session(kms_module, pki_dir, name):
    """The probe log's DiscoverVersions and Query all succeed."""
    exchanges = vcenter_vectors.load(name)
    with RawClient(kms_module.host, kms_module.port, pki_dir, "alice") as client:
        results, _ = replay(client, exchanges)
    for _, response in results:
        for item in response.find_all(T.BATCH_ITEM.value):
            assert item.get(T.RESULT_STATUS.value) == 0
