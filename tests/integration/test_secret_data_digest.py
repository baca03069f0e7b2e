"""Secret Data of type Password gets no Digest (issue 19): its unsalted
SHA-256 let whoever reads the database or an attribute listing test
password guesses offline. A Seed, random by definition, keeps its Digest,
and a Get that names no format still answers in the registered one."""

from __future__ import annotations

import hashlib
import sqlite3

import pytest
from kmip.core.enums import KeyFormatType, ObjectType, Operation, ResultStatus, SecretDataType
from kmip.core.enums import Tags as T
from kmip_client import RawClient

from kmip_core import ttlv
from kmip_core.ttlv import Item, ItemType

PASSWORD = b"correct horse battery staple"


def _message(version: tuple[int, int], operation: Operation, payload: list[Item]) -> bytes:
    header = ttlv.structure(
        T.REQUEST_HEADER.value,
        [
            ttlv.structure(
                T.PROTOCOL_VERSION.value,
                [
                    ttlv.integer(T.PROTOCOL_VERSION_MAJOR.value, version[0]),
                    ttlv.integer(T.PROTOCOL_VERSION_MINOR.value, version[1]),
                ],
            ),
            ttlv.integer(T.BATCH_COUNT.value, 1),
        ],
    )
    item = ttlv.structure(
        T.BATCH_ITEM.value,
        [ttlv.enumeration(T.OPERATION.value, operation.value), ttlv.structure(T.REQUEST_PAYLOAD.value, payload)],
    )
    return ttlv.encode(ttlv.structure(T.REQUEST_MESSAGE.value, [header, item]))


def _ok(server, pki, version, operation, payload) -> Item:
    with RawClient(server.host, server.port, pki, "alice") as client:
        response = client.request(_message(version, operation, payload))
    item = response.find(T.BATCH_ITEM.value)
    assert item.get(T.RESULT_STATUS.value) == ResultStatus.SUCCESS.value, item.get(T.RESULT_MESSAGE.value)
    return item.find(T.RESPONSE_PAYLOAD.value)


def _register(server, pki, version, secret_type: SecretDataType, secret: bytes, fmt=KeyFormatType.RAW) -> str:
    block = ttlv.structure(
        T.KEY_BLOCK.value,
        [
            ttlv.enumeration(T.KEY_FORMAT_TYPE.value, fmt.value),
            ttlv.structure(T.KEY_VALUE.value, [ttlv.byte_string(T.KEY_MATERIAL.value, secret)]),
        ],
    )
    attributes = (
        ttlv.structure(T.ATTRIBUTES.value, [])
        if version >= (2, 0)
        else ttlv.structure(T.TEMPLATE_ATTRIBUTE.value, [])
    )
    payload = _ok(
        server,
        pki,
        version,
        Operation.REGISTER,
        [
            ttlv.enumeration(T.OBJECT_TYPE.value, ObjectType.SECRET_DATA.value),
            attributes,
            ttlv.structure(
                T.SECRET_DATA.value, [ttlv.enumeration(T.SECRET_DATA_TYPE.value, secret_type.value), block]
            ),
        ],
    )
    return payload.get(T.UNIQUE_IDENTIFIER.value)


def _listing(server, pki, version, uid) -> bytes:
    """Every attribute the client can read, encoded."""
    payload = _ok(server, pki, version, Operation.GET_ATTRIBUTES, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])
    return ttlv.encode(payload)


def _has_digest(listing: bytes, version) -> bool:
    payload = ttlv.decode(listing)
    if version >= (2, 0):
        return payload.find(T.ATTRIBUTES.value).find(T.DIGEST.value) is not None
    return any(a.get(T.ATTRIBUTE_NAME.value) == "Digest" for a in payload.find_all(T.ATTRIBUTE.value))


@pytest.mark.parametrize("version", [(1, 4), (2, 0)], ids=["1.4", "2.0"])
def test_password_has_no_digest_in_listing_or_database(kms_module, pki_dir, version):
    sha256 = hashlib.sha256(PASSWORD).digest()
    uid = _register(kms_module, pki_dir, version, SecretDataType.PASSWORD, PASSWORD)
    listing = _listing(kms_module, pki_dir, version, uid)
    assert not _has_digest(listing, version)
    assert sha256 not in listing
    # Nor anywhere in the database (attributes, WAL included: read live).
    data = kms_module.workdir / "data" / "kms.db"
    with sqlite3.connect(f"file:{data}?mode=ro", uri=True) as db:
        rows = db.execute("select name, value from kms_attributes where uid = ?", (uid,)).fetchall()
    assert rows
    assert all(sha256 not in bytes(value) for _, value in rows)
    assert "Digest" not in [name for name, _ in rows]


def test_password_comes_back_in_the_format_it_was_registered_in(kms_module, pki_dir):
    """BL-M-4-21 without a Digest to remember the format by."""
    for version in ((1, 4), (2, 1)):
        for fmt in (KeyFormatType.RAW, KeyFormatType.OPAQUE):
            uid = _register(kms_module, pki_dir, version, SecretDataType.PASSWORD, PASSWORD, fmt)
            payload = _ok(kms_module, pki_dir, version, Operation.GET, [ttlv.text(T.UNIQUE_IDENTIFIER.value, uid)])
            block = payload.find(T.SECRET_DATA.value).find(T.KEY_BLOCK.value)
            assert block.get(T.KEY_FORMAT_TYPE.value) == fmt.value
            assert block.find(T.KEY_VALUE.value).get(T.KEY_MATERIAL.value) == PASSWORD


def test_seed_keeps_its_digest(kms_module, pki_dir):
    seed = bytes(range(32))
    uid = _register(kms_module, pki_dir, (2, 0), SecretDataType.SEED, seed)
    listing = ttlv.decode(_listing(kms_module, pki_dir, (2, 0), uid))
    digest = listing.find(T.ATTRIBUTES.value).find(T.DIGEST.value)
    assert digest is not None and digest.type == ItemType.STRUCTURE
    assert digest.get(T.DIGEST_VALUE.value) == hashlib.sha256(seed).digest()
