"""What an audit record keeps of a request payload: the attributes a client
supplied, in the 1.x and 2.0 forms, and never anything inside an object."""

from __future__ import annotations

from kmip.core.enums import Tags

from kmip_core import ttlv
from kmip_core.audit.record import request_attributes

T = Tags
KEY = bytes(range(32))


def _v1_attribute(name, value):
    return ttlv.structure(T.ATTRIBUTE.value, [ttlv.text(T.ATTRIBUTE_NAME.value, name), value])


def test_v1_attributes_are_kept_with_their_values():
    payload = ttlv.structure(
        T.REQUEST_PAYLOAD.value,
        [
            ttlv.text(T.UNIQUE_IDENTIFIER.value, "1"),
            _v1_attribute("x-Name", ttlv.text(T.ATTRIBUTE_VALUE.value, "test01")),
            _v1_attribute("Cryptographic Length", ttlv.integer(T.ATTRIBUTE_VALUE.value, 256)),
        ],
    )
    assert request_attributes(payload) == [
        {"name": "x-Name", "value": "test01"},
        {"name": "Cryptographic Length", "value": 256},
    ]


def test_v2_attributes_and_vendor_attributes_are_named_as_in_1x():
    attributes = ttlv.structure(
        T.ATTRIBUTES.value,
        [
            ttlv.integer(T.CRYPTOGRAPHIC_LENGTH.value, 128),
            ttlv.structure(
                T.ATTRIBUTE.value,
                [
                    ttlv.text(T.VENDOR_IDENTIFICATION.value, "x"),
                    ttlv.text(T.ATTRIBUTE_NAME.value, "blob"),
                    ttlv.byte_string(T.ATTRIBUTE_VALUE.value, b"\x01\x02"),
                ],
            ),
        ],
    )
    found = request_attributes(ttlv.structure(T.REQUEST_PAYLOAD.value, [attributes]))
    assert found == [{"name": "Cryptographic Length", "value": 128}, {"name": "x-blob", "value": "0102"}]


def test_nothing_inside_an_object_or_a_data_field_is_read():
    """Register carries the key in Key Block / Key Value / Key Material, and
    1.x Key Values may hold attributes; Encrypt carries Data. None of it is
    kept."""
    key_block = ttlv.structure(
        T.KEY_BLOCK.value,
        [
            ttlv.structure(
                T.KEY_VALUE.value,
                [
                    ttlv.byte_string(T.KEY_MATERIAL.value, KEY),
                    _v1_attribute("x-secret", ttlv.byte_string(T.ATTRIBUTE_VALUE.value, KEY)),
                ],
            )
        ],
    )
    payload = ttlv.structure(
        T.REQUEST_PAYLOAD.value,
        [
            ttlv.structure(T.SYMMETRIC_KEY.value, [key_block]),
            ttlv.byte_string(T.DATA.value, KEY),
            _v1_attribute("x-Name", ttlv.text(T.ATTRIBUTE_VALUE.value, "vm")),
        ],
    )
    found = request_attributes(payload)
    assert found == [{"name": "x-Name", "value": "vm"}]
    assert KEY.hex() not in repr(found)
