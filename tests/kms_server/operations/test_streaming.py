"""Multi-part Encrypt and Decrypt (Init Indicator, Correlation Value, Final
Indicator) through the dispatcher and the real operation table: the parts
give exactly the one-shot result, the stream belongs to one client, key and
operation, and misuse gets the right Result Reason."""

from __future__ import annotations

import os

import pytest
from kmip.core.enums import BlockCipherMode, Operation, PaddingMethod, ResultReason
from kmip.core.enums import Tags as T

from kmip_core import ttlv
from kmip_core.sealing.barrier import Barrier
from kmip_core.server.dispatcher import Dispatcher
from kms_server.keystore.keystore import Keystore
from kms_server.operations import OPERATIONS
from kms_server.storage import open_storage
from tests.kms_server.operations.test_key_operations import (
    Client,
    ObjectType,
    create_aes,
    params,
    register,
    symmetric_key,
    uid_item,
    usage,
)

GCM = params(mode=BlockCipherMode.GCM)


@pytest.fixture
def keystore():
    return Keystore(open_storage("memory://"), Barrier(os.urandom(32)))


@pytest.fixture
def alice(keystore):
    return Client(Dispatcher(keystore, OPERATIONS), "alice")


@pytest.fixture
def bob(keystore):
    return Client(Dispatcher(keystore, OPERATIONS), "bob")


def flag(tag, value=True):
    return ttlv.boolean(tag.value, value)


def data(value: bytes):
    return ttlv.byte_string(T.DATA.value, value)


def correlation(value: bytes):
    return ttlv.byte_string(T.CORRELATION_VALUE.value, value)


def in_parts(client, op, uid, parts, first=(), last=()):
    """Send `parts` as one multi-part operation; (outputs, last payload, first payload)."""
    first_payload = client.ok(op, [uid_item(uid), *first, data(parts[0]), flag(T.INIT_INDICATOR)])
    value = first_payload.get(T.CORRELATION_VALUE.value)
    assert isinstance(value, bytes) and len(value) == 16
    outputs = [first_payload.get(T.DATA.value)]
    payload = first_payload
    for index, part in enumerate(parts[1:], start=1):
        final = index == len(parts) - 1
        extra = [flag(T.FINAL_INDICATOR), *last] if final else []
        payload = client.ok(op, [uid_item(uid), data(part), correlation(value), *extra])
        outputs.append(payload.get(T.DATA.value))
        if not final:
            assert payload.get(T.CORRELATION_VALUE.value) == value
    return outputs, payload, first_payload


@pytest.mark.parametrize(
    "mode, padding, size",
    [
        (BlockCipherMode.GCM, None, 61),
        (BlockCipherMode.CTR, None, 61),
        (BlockCipherMode.CBC, PaddingMethod.PKCS5, 61),
        (BlockCipherMode.CBC, None, 64),
        (BlockCipherMode.ECB, PaddingMethod.PKCS5, 61),
    ],
)
def test_parts_give_the_one_shot_ciphertext_and_back(alice, mode, padding, size):
    uid = create_aes(alice)
    plaintext = os.urandom(size)
    chunks = [plaintext[:5], plaintext[5:40], plaintext[40:]]
    cipher_params = params(mode=mode, padding=padding) if padding else params(mode=mode)
    outputs, last, first = in_parts(alice, Operation.ENCRYPT, uid, chunks, first=(cipher_params,))
    ciphertext = b"".join(outputs)
    iv = first.get(T.IV_COUNTER_NONCE.value)
    assert (iv is None) == (mode == BlockCipherMode.ECB)
    whole = [uid_item(uid), cipher_params, data(plaintext)]
    if iv is not None:
        whole.append(ttlv.byte_string(T.IV_COUNTER_NONCE.value, iv))
    one_shot = alice.ok(Operation.ENCRYPT, whole)
    assert ciphertext == one_shot.get(T.DATA.value)
    tag = last.get(T.AUTHENTICATED_ENCRYPTION_TAG.value)
    assert tag == one_shot.get(T.AUTHENTICATED_ENCRYPTION_TAG.value)
    assert (tag is not None) == (mode == BlockCipherMode.GCM)

    setup = [cipher_params] + ([ttlv.byte_string(T.IV_COUNTER_NONCE.value, iv)] if iv else [])
    final = [ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, tag)] if tag else []
    pieces = [ciphertext[:7], ciphertext[7:33], ciphertext[33:]]
    outputs, _, _ = in_parts(alice, Operation.DECRYPT, uid, pieces, first=setup, last=final)
    assert b"".join(outputs) == plaintext


def test_the_oasis_gcm_vector_in_two_parts(alice):
    """CS-BC-M-GCM-3: the test case's key, IV, additional data and parts."""
    key = bytes.fromhex("feffe9928665731c6d6a8f9467308308")
    uid = register(alice, ObjectType.SYMMETRIC_KEY, symmetric_key(key), usage(12))
    alice.ok(Operation.ACTIVATE, [uid_item(uid)])
    first = (
        GCM,
        ttlv.byte_string(T.IV_COUNTER_NONCE.value, bytes.fromhex("cafebabefacedbad")),
        ttlv.byte_string(
            T.AUTHENTICATED_ENCRYPTION_ADDITIONAL_DATA.value, bytes.fromhex("feedfacedeadbeeffeedfacedeadbeefabaddad2")
        ),
    )
    parts = [
        bytes.fromhex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"),
        bytes.fromhex("1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"),
    ]
    outputs, last, first_payload = in_parts(alice, Operation.ENCRYPT, uid, parts, first=first)
    assert outputs == [
        bytes.fromhex("61353b4c2806934a777ff51fa22a4755699b2a714fcdc6f83766e5f97b6c7423"),
        bytes.fromhex("73806900e49f24b22b097544d4896b424989b5e1ebac0f07c23f4598"),
    ]
    assert last.get(T.AUTHENTICATED_ENCRYPTION_TAG.value) == bytes.fromhex("3612d2e79e3b0785561be14aaca2fccb")
    # The client gave the IV: it is not returned.
    assert first_payload.get(T.IV_COUNTER_NONCE.value) is None


def test_a_wrong_gcm_tag_fails_the_last_part_and_ends_the_stream(alice):
    uid = create_aes(alice)
    outputs, last, first = in_parts(alice, Operation.ENCRYPT, uid, [b"a" * 20, b"b" * 20], first=(GCM,))
    iv = ttlv.byte_string(T.IV_COUNTER_NONCE.value, first.get(T.IV_COUNTER_NONCE.value))
    started = alice.ok(Operation.DECRYPT, [uid_item(uid), GCM, iv, data(outputs[0]), flag(T.INIT_INDICATOR)])
    value = started.get(T.CORRELATION_VALUE.value)
    bad = bytes(16)
    ending = [uid_item(uid), data(outputs[1]), correlation(value), flag(T.FINAL_INDICATOR)]
    alice.fails(Operation.DECRYPT, ending[:-1] + [flag(T.FINAL_INDICATOR)], ResultReason.MISSING_DATA)
    started = alice.ok(Operation.DECRYPT, [uid_item(uid), GCM, iv, data(outputs[0]), flag(T.INIT_INDICATOR)])
    value = started.get(T.CORRELATION_VALUE.value)
    ending = [uid_item(uid), data(outputs[1]), correlation(value), flag(T.FINAL_INDICATOR)]
    alice.fails(
        Operation.DECRYPT,
        ending + [ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, bad)],
        ResultReason.CRYPTOGRAPHIC_FAILURE,
    )
    # The stream is gone: the right tag cannot finish it now.
    tag = last.get(T.AUTHENTICATED_ENCRYPTION_TAG.value)
    alice.fails(
        Operation.DECRYPT,
        ending + [ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, tag)],
        ResultReason.INVALID_FIELD,
    )


def test_a_stream_is_its_clients_for_its_key_and_operation(alice, bob, keystore):
    uid = create_aes(alice)
    other = create_aes(alice)
    started = alice.ok(Operation.ENCRYPT, [uid_item(uid), GCM, data(b"x" * 16), flag(T.INIT_INDICATOR)])
    value = started.get(T.CORRELATION_VALUE.value)
    # Bob cannot see alice's key, let alone her stream.
    bob.fails(Operation.ENCRYPT, [uid_item(uid), data(b"y"), correlation(value)], ResultReason.ITEM_NOT_FOUND)
    message = alice.fails(Operation.ENCRYPT, [uid_item(other), data(b"y"), correlation(value)], ResultReason.INVALID_FIELD)
    assert uid in message
    alice.fails(Operation.DECRYPT, [uid_item(uid), data(b"y"), correlation(value)], ResultReason.INVALID_FIELD)
    alice.fails(
        Operation.ENCRYPT, [uid_item(uid), data(b"y"), correlation(os.urandom(16))], ResultReason.INVALID_FIELD
    )
    # The stream survived the refusals and still finishes.
    done = alice.ok(Operation.ENCRYPT, [uid_item(uid), data(b"z" * 4), correlation(value), flag(T.FINAL_INDICATOR)])
    assert done.get(T.AUTHENTICATED_ENCRYPTION_TAG.value) is not None
    assert len(keystore.streams) == 0


def test_misplaced_fields_are_refused(alice):
    uid = create_aes(alice)
    started = alice.ok(Operation.ENCRYPT, [uid_item(uid), GCM, data(b"x"), flag(T.INIT_INDICATOR)])
    value = started.get(T.CORRELATION_VALUE.value)
    iv = ttlv.byte_string(T.IV_COUNTER_NONCE.value, bytes(12))
    cases = [
        [uid_item(uid), data(b"y"), correlation(value), iv],  # IV after the first part
        [uid_item(uid), data(b"y"), flag(T.FINAL_INDICATOR)],  # Final without Correlation Value
        [uid_item(uid), GCM, data(b"y"), flag(T.INIT_INDICATOR), correlation(value)],  # Init with one
        [uid_item(uid), data(b"y"), correlation(value), ttlv.byte_string(T.AUTHENTICATED_ENCRYPTION_TAG.value, bytes(16))],
    ]
    for payload in cases:
        alice.fails(Operation.DECRYPT if payload is cases[-1] else Operation.ENCRYPT, payload, ResultReason.INVALID_FIELD)


@pytest.mark.parametrize("mode", [BlockCipherMode.XTS, BlockCipherMode.NIST_KEY_WRAP])
def test_modes_that_need_the_whole_message_are_refused(alice, mode):
    uid = create_aes(alice)
    alice.fails(
        Operation.ENCRYPT,
        [uid_item(uid), params(mode=mode), data(bytes(32)), flag(T.INIT_INDICATOR)],
        ResultReason.CRYPTOGRAPHIC_FAILURE,
    )


def test_init_and_final_together_is_a_whole_operation(alice):
    uid = create_aes(alice)
    payload = alice.ok(
        Operation.ENCRYPT, [uid_item(uid), GCM, data(b"whole"), flag(T.INIT_INDICATOR), flag(T.FINAL_INDICATOR)]
    )
    assert payload.get(T.CORRELATION_VALUE.value) is None
    assert payload.get(T.AUTHENTICATED_ENCRYPTION_TAG.value) is not None
