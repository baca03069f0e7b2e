"""PyKMIP's ProxyKmipClient, an independent KMIP implementation, against a
real kms-server process over mutual TLS, at every protocol version."""

from __future__ import annotations

import pytest
from kmip.core import enums
from kmip.pie import exceptions as pie_exceptions
from kmip.pie import objects
from kmip.pie.client import ProxyKmipClient
from kmip_client import pykmip

VERSIONS = [
    enums.KMIPVersion.KMIP_1_0,
    enums.KMIPVersion.KMIP_1_1,
    enums.KMIPVersion.KMIP_1_2,
    enums.KMIPVersion.KMIP_1_3,
    enums.KMIPVersion.KMIP_1_4,
    enums.KMIPVersion.KMIP_2_0,
]


def client_for(server, pki, name="alice", version=enums.KMIPVersion.KMIP_1_2) -> ProxyKmipClient:
    return pykmip(server, pki, name, version)


@pytest.fixture
def client(kms_module, pki_dir, request):
    version = getattr(request, "param", enums.KMIPVersion.KMIP_1_2)
    c = client_for(kms_module, pki_dir, version=version)
    yield c
    c.close()


@pytest.mark.parametrize("version", VERSIONS, ids=lambda v: v.name)
def test_symmetric_key_lifecycle_at_every_version(kms_module, pki_dir, version):
    """Create, Get, GetAttributes, Activate, Revoke and Destroy of an AES key
    all succeed at each protocol version, and Get returns 32 key bytes."""
    c = client_for(kms_module, pki_dir, version=version)
    try:
        uid = c.create(
            enums.CryptographicAlgorithm.AES,
            256,
            name=f"lifecycle-{version.name}",
            cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
        )
        key = c.get(uid)
        assert isinstance(key, objects.SymmetricKey)
        assert len(key.value) == 32
        assert key.cryptographic_algorithm == enums.CryptographicAlgorithm.AES
        _, attributes = c.get_attributes(uid, ["State", "Cryptographic Length"])
        by_name = {a.attribute_name.value: a.attribute_value for a in attributes}
        assert by_name["State"].value == enums.State.PRE_ACTIVE
        assert by_name["Cryptographic Length"].value == 256
        c.activate(uid)
        _, attributes = c.get_attributes(uid, ["State"])
        assert attributes[0].attribute_value.value == enums.State.ACTIVE
        c.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, uid)
        c.destroy(uid)
        with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
            c.get(uid)
        # Issue 14: Item Not Found at 1.x, Object Destroyed at 2.0 (Key
        # Value Not Present was also taken before).
        expected = (
            enums.ResultReason.OBJECT_DESTROYED
            if version == enums.KMIPVersion.KMIP_2_0
            else enums.ResultReason.ITEM_NOT_FOUND
        )
        assert failure.value.reason == expected
    finally:
        c.close()


def test_destroy_of_active_key_is_illegal(client):
    """An Active key cannot be destroyed before it is revoked (KMIP 1.4, 4.21)."""
    uid = client.create(enums.CryptographicAlgorithm.AES, 128)
    client.activate(uid)
    with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
        client.destroy(uid)
    assert failure.value.reason == enums.ResultReason.ILLEGAL_OPERATION


def test_activate_twice_is_illegal(client):
    uid = client.create(enums.CryptographicAlgorithm.AES, 128)
    client.activate(uid)
    with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
        client.activate(uid)
    assert failure.value.reason == enums.ResultReason.ILLEGAL_OPERATION


def test_register_and_get_secret_data(client):
    secret = objects.SecretData(b"correct horse battery staple", enums.SecretDataType.PASSWORD)
    uid = client.register(secret)
    fetched = client.get(uid)
    assert isinstance(fetched, objects.SecretData)
    assert fetched.value == b"correct horse battery staple"


def test_locate_by_name_finds_only_that_key(client):
    uid = client.create(enums.CryptographicAlgorithm.AES, 256, name="locate-me-pykmip")
    client.create(enums.CryptographicAlgorithm.AES, 256, name="someone-else")
    from kmip.core.factories import attributes as attribute_factory

    f = attribute_factory.AttributeFactory()
    found = client.locate(attributes=[f.create_attribute(enums.AttributeType.NAME, "locate-me-pykmip")])
    assert found == [uid]


def test_another_clients_key_is_not_found(kms_module, pki_dir, client):
    """bob cannot see alice's key: ITEM_NOT_FOUND, as if it did not exist."""
    uid = client.create(enums.CryptographicAlgorithm.AES, 128)
    bob = client_for(kms_module, pki_dir, name="bob")
    try:
        with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
            bob.get(uid)
        assert failure.value.reason == enums.ResultReason.ITEM_NOT_FOUND
        assert uid not in bob.locate()
    finally:
        bob.close()


def test_administrator_sees_every_key(kms_module, pki_dir, client):
    uid = client.create(enums.CryptographicAlgorithm.AES, 128)
    admin = client_for(kms_module, pki_dir, name="admin")
    try:
        assert admin.get(uid).value
        assert uid in admin.locate()
    finally:
        admin.close()


def test_no_crypto_administrator_cannot_read_key_material(kms_module, pki_dir, client):
    uid = client.create(enums.CryptographicAlgorithm.AES, 128)
    nocrypto = client_for(kms_module, pki_dir, name="nocrypto")
    try:
        with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
            nocrypto.get(uid)
        assert failure.value.reason == enums.ResultReason.PERMISSION_DENIED
        nocrypto.activate(uid)  # Managing is allowed.
        assert uid in nocrypto.locate()
    finally:
        nocrypto.close()


def test_auditor_cannot_create_keys(kms_module, pki_dir):
    auditor = client_for(kms_module, pki_dir, name="auditor")
    try:
        with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
            auditor.create(enums.CryptographicAlgorithm.AES, 128)
        assert failure.value.reason == enums.ResultReason.PERMISSION_DENIED
    finally:
        auditor.close()


def test_create_key_pair_sign_and_verify(client):
    public_uid, private_uid = client.create_key_pair(
        enums.CryptographicAlgorithm.RSA,
        2048,
        public_usage_mask=[enums.CryptographicUsageMask.VERIFY],
        private_usage_mask=[enums.CryptographicUsageMask.SIGN],
    )
    client.activate(private_uid)
    client.activate(public_uid)
    params = {
        "cryptographic_algorithm": enums.CryptographicAlgorithm.RSA,
        "hashing_algorithm": enums.HashingAlgorithm.SHA_256,
        "padding_method": enums.PaddingMethod.PSS,
    }
    signature = client.sign(b"message to sign", uid=private_uid, cryptographic_parameters=params)
    assert client.signature_verify(b"message to sign", signature, uid=public_uid, cryptographic_parameters=params) == (
        enums.ValidityIndicator.VALID
    )
    assert client.signature_verify(b"message altered", signature, uid=public_uid, cryptographic_parameters=params) == (
        enums.ValidityIndicator.INVALID
    )


def test_encrypt_decrypt_round_trip(client):
    uid = client.create(
        enums.CryptographicAlgorithm.AES,
        256,
        cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
    )
    client.activate(uid)
    params = {
        "block_cipher_mode": enums.BlockCipherMode.CBC,
        "padding_method": enums.PaddingMethod.PKCS5,
        "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
    }
    ciphertext, iv = client.encrypt(b"a DEK of 64 bytes" * 4, uid=uid, cryptographic_parameters=params)
    assert ciphertext != b"a DEK of 64 bytes" * 4
    plaintext = client.decrypt(ciphertext, uid=uid, cryptographic_parameters=params, iv_counter_nonce=iv)
    assert plaintext == b"a DEK of 64 bytes" * 4


def test_mac(client):
    uid = client.create(
        enums.CryptographicAlgorithm.HMAC_SHA256,
        256,
        cryptographic_usage_mask=[enums.CryptographicUsageMask.MAC_GENERATE],
    )
    client.activate(uid)
    _, mac1 = client.mac(b"data", uid=uid, algorithm=enums.CryptographicAlgorithm.HMAC_SHA256)
    _, mac2 = client.mac(b"data", uid=uid, algorithm=enums.CryptographicAlgorithm.HMAC_SHA256)
    assert mac1 == mac2 and len(mac1) == 32
