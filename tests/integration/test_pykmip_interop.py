"""Issue 14: the everyday requests of PyKMIP's client (ProxyKmipClient)
against a real kms-server process over mutual TLS, at KMIP 1.2, 1.4 and
2.0, answered the way PyKMIP's own server answers them."""

from __future__ import annotations

import pytest
from kmip.core import enums
from kmip.pie import exceptions as pie_exceptions
from kmip.pie import objects
from kmip_client import pykmip

from kms_server.keystore import crypto

VERSIONS = [enums.KMIPVersion.KMIP_1_2, enums.KMIPVersion.KMIP_1_4, enums.KMIPVersion.KMIP_2_0]
KFT = enums.KeyFormatType


@pytest.fixture(params=VERSIONS, ids=lambda v: v.name)
def client(kms_module, pki_dir, request):
    c = pykmip(kms_module, pki_dir, "alice", request.param)
    c.version = request.param
    yield c
    c.close()


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    private, public, _ = crypto.generate_key_pair(enums.CryptographicAlgorithm.RSA, 2048)
    return private, public


@pytest.mark.parametrize("layout", [KFT.PKCS_8, KFT.PKCS_1])
def test_rsa_private_key_registered_in_raw_comes_back_as_registered(client, rsa_key, layout):
    """A private key registered in Raw (DER, as PyKMIP sends it) is accepted
    and a Get that names no format returns it in Raw, the same bytes."""
    der = crypto.export_private_key(rsa_key[0], layout)
    uid = client.register(objects.PrivateKey(enums.CryptographicAlgorithm.RSA, 2048, der, KFT.RAW))
    key = client.get(uid)
    assert isinstance(key, objects.PrivateKey)
    assert key.key_format_type == KFT.RAW
    assert key.value == der
    assert key.cryptographic_algorithm == enums.CryptographicAlgorithm.RSA
    assert key.cryptographic_length == 2048


@pytest.mark.parametrize("layout", [KFT.X_509, KFT.PKCS_1])
def test_rsa_public_key_registered_in_raw_comes_back_as_registered(client, rsa_key, layout):
    der = crypto.export_public_key(rsa_key[1], layout)
    uid = client.register(objects.PublicKey(enums.CryptographicAlgorithm.RSA, 2048, der, KFT.RAW))
    key = client.get(uid)
    assert isinstance(key, objects.PublicKey)
    assert (key.key_format_type, key.value) == (KFT.RAW, der)


@pytest.mark.parametrize(
    "registered,cls,index",
    [(KFT.PKCS_1, objects.PrivateKey, 0), (KFT.PKCS_8, objects.PrivateKey, 0), (KFT.PKCS_1, objects.PublicKey, 1), (KFT.X_509, objects.PublicKey, 1)],
)
def test_a_key_comes_back_in_the_format_it_was_registered_in(client, rsa_key, registered, cls, index):
    """With no Key Format Type in the Get, the registered format (issue 14,
    second bullet): PyKMIP's server returns what it stored."""
    export = crypto.export_private_key if cls is objects.PrivateKey else crypto.export_public_key
    der = export(rsa_key[index], registered)
    uid = client.register(cls(enums.CryptographicAlgorithm.RSA, 2048, der, registered))
    key = client.get(uid)
    assert (key.key_format_type, key.value) == (registered, der)


def test_a_raw_private_key_that_is_no_key_is_refused(client):
    with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
        client.register(objects.PrivateKey(enums.CryptographicAlgorithm.RSA, 2048, b"\x30\x03\x02\x01\x00", KFT.RAW))
    assert failure.value.reason == enums.ResultReason.INVALID_FIELD


@pytest.mark.parametrize(
    "algorithm,length",
    [
        (enums.CryptographicAlgorithm.IDEA, 128),
        (enums.CryptographicAlgorithm.TRIPLE_DES, 192),
        (enums.CryptographicAlgorithm.BLOWFISH, 128),
        (enums.CryptographicAlgorithm.CAMELLIA, 128),
        (enums.CryptographicAlgorithm.RC4, 128),
        (enums.CryptographicAlgorithm.SKIPJACK, 80),
    ],
)
def test_create_of_a_key_for_an_algorithm_we_do_not_compute_with(client, algorithm, length):
    """Create works for the algorithms PyKMIP's server creates keys for (and
    a few more); Get returns key bytes of that length."""
    uid = client.create(algorithm, length)
    key = client.get(uid)
    assert isinstance(key, objects.SymmetricKey)
    assert (key.cryptographic_algorithm, key.cryptographic_length) == (algorithm, length)
    assert len(key.value) == length // 8


def test_encrypt_with_an_idea_key_is_feature_not_supported(client):
    """Only the computation is refused, with Feature Not Supported."""
    uid = client.create(
        enums.CryptographicAlgorithm.IDEA,
        128,
        cryptographic_usage_mask=[enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
    )
    client.activate(uid)
    with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
        client.encrypt(
            b"sixteen bytes!!!",
            uid,
            cryptographic_parameters={
                "block_cipher_mode": enums.BlockCipherMode.CBC,
                "padding_method": enums.PaddingMethod.PKCS5,
                "cryptographic_algorithm": enums.CryptographicAlgorithm.IDEA,
            },
        )
    assert failure.value.reason == enums.ResultReason.FEATURE_NOT_SUPPORTED


@pytest.mark.parametrize(
    "algorithm,key_bytes",
    [(enums.CryptographicAlgorithm.AES, 20), (enums.CryptographicAlgorithm.IDEA, 24), (enums.CryptographicAlgorithm.BLOWFISH, 7)],
)
def test_register_checks_only_that_the_material_matches_its_length(client, algorithm, key_bytes):
    """Key material of a length unusual for its algorithm is registered as
    given (PyKMIP's client itself will not send a stated length the
    material contradicts; the unit tests check that refusal)."""
    value = bytes(range(key_bytes))
    uid = client.register(objects.SymmetricKey(algorithm, key_bytes * 8, value))
    key = client.get(uid)
    assert (key.value, key.cryptographic_length) == (value, key_bytes * 8)


def test_operations_on_a_destroyed_key(client):
    """Get and Activate of a destroyed key: Item Not Found at 1.x (what
    PyKMIP's server answers: it forgets the object), Object Destroyed at
    2.0. GetAttributes still reads its State; Locate leaves it out."""
    uid = client.create(enums.CryptographicAlgorithm.AES, 256, name=f"destroyed-{client.version.name}")
    client.destroy(uid)
    expected = (
        enums.ResultReason.OBJECT_DESTROYED
        if client.version == enums.KMIPVersion.KMIP_2_0
        else enums.ResultReason.ITEM_NOT_FOUND
    )
    for attempt in (lambda: client.get(uid), lambda: client.activate(uid), lambda: client.destroy(uid)):
        with pytest.raises(pie_exceptions.KmipOperationFailure) as failure:
            attempt()
        assert failure.value.reason == expected
    _, attributes = client.get_attributes(uid, ["State"])
    assert attributes[0].attribute_value.value == enums.State.DESTROYED
    assert uid not in client.locate()


def test_split_key_register_get_attributes_locate_destroy(client):
    """Split Key objects: Register, Get (every split parameter back),
    GetAttributes, Locate by Object Type, Destroy."""
    part = bytes(range(16))
    uid = client.register(
        objects.SplitKey(
            cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
            cryptographic_length=128,
            key_value=part,
            split_key_parts=4,
            key_part_identifier=1,
            split_key_threshold=2,
            split_key_method=enums.SplitKeyMethod.POLYNOMIAL_SHARING_PRIME_FIELD,
            prime_field_size=104729,
        )
    )
    key = client.get(uid)
    assert isinstance(key, objects.SplitKey)
    assert key.value == part
    assert (key.split_key_parts, key.key_part_identifier, key.split_key_threshold) == (4, 1, 2)
    assert key.split_key_method == enums.SplitKeyMethod.POLYNOMIAL_SHARING_PRIME_FIELD
    assert key.prime_field_size == 104729
    _, attributes = client.get_attributes(uid, ["Object Type", "Cryptographic Length"])
    by_name = {a.attribute_name.value: a.attribute_value.value for a in attributes}
    assert by_name == {"Object Type": enums.ObjectType.SPLIT_KEY, "Cryptographic Length": 128}
    object_type = client.attribute_factory.create_attribute(enums.AttributeType.OBJECT_TYPE, enums.ObjectType.SPLIT_KEY)
    assert uid in client.locate(attributes=[object_type])
    client.destroy(uid)
    with pytest.raises(pie_exceptions.KmipOperationFailure):
        client.get(uid)


def test_derive_key(client):
    """DeriveKey through PyKMIP's client: HMAC and PBKDF2 give what their
    definitions give, and the derived key has the template's algorithm and
    length."""
    import hashlib
    import hmac

    mask = [enums.CryptographicUsageMask.DERIVE_KEY]
    key = bytes(range(32))
    base = client.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 256, key, mask))
    client.activate(base)
    derived = client.derive_key(
        enums.ObjectType.SYMMETRIC_KEY,
        [base],
        enums.DerivationMethod.HMAC,
        {
            "cryptographic_parameters": {"hashing_algorithm": enums.HashingAlgorithm.SHA_256},
            "derivation_data": b"for the backup volume",
        },
        cryptographic_length=128,
        cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
    )
    key_object = client.get(derived)
    assert key_object.value == hmac.new(key, b"for the backup volume", hashlib.sha256).digest()[:16]
    assert (key_object.cryptographic_algorithm, key_object.cryptographic_length) == (enums.CryptographicAlgorithm.AES, 128)
    password = client.register(objects.SecretData(b"a long passphrase", enums.SecretDataType.PASSWORD, mask))
    client.activate(password)
    derived = client.derive_key(
        enums.ObjectType.SYMMETRIC_KEY,
        [password],
        enums.DerivationMethod.PBKDF2,
        {
            "cryptographic_parameters": {"hashing_algorithm": enums.HashingAlgorithm.SHA_256},
            "salt": b"0123456789abcdef",
            "iteration_count": 2000,
        },
        cryptographic_length=256,
        cryptographic_algorithm=enums.CryptographicAlgorithm.AES,
    )
    assert client.get(derived).value == hashlib.pbkdf2_hmac("sha256", b"a long passphrase", b"0123456789abcdef", 2000, 32)


def _template(client, *attributes):
    from kmip.core import objects as cobjects

    factory = client.attribute_factory
    return cobjects.TemplateAttribute(
        attributes=[
            factory.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.AES),
            factory.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_LENGTH, 128),
            factory.create_attribute(
                enums.AttributeType.CRYPTOGRAPHIC_USAGE_MASK,
                [enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT],
            ),
            *(factory.create_attribute(name, value) for name, value in attributes),
        ]
    )


def _create_with(client, *attributes) -> str:
    """Create through PyKMIP's KMIPProxy (the services API), which takes any
    template attribute, two Names for instance."""
    result = client.proxy.create(enums.ObjectType.SYMMETRIC_KEY, _template(client, *attributes))
    assert result.result_status.value == enums.ResultStatus.SUCCESS, result.result_message
    return result.uuid


@pytest.mark.parametrize("version", VERSIONS[:2], ids=lambda v: v.name)
def test_modify_and_delete_attribute_1_x_answer_the_attribute_index(kms_module, pki_dir, version):
    """ModifyAttribute and DeleteAttribute at 1.x (issue 14): the answered
    Attribute carries its Attribute Index, 0 included, for a multi-instance
    attribute such as Name."""
    c = pykmip(kms_module, pki_dir, "alice", version)
    try:
        NAME = enums.AttributeType.NAME
        uid = _create_with(c, (NAME, f"first-{version.name}"), (NAME, f"second-{version.name}"))
        factory = c.attribute_factory
        _, modified = c.modify_attribute(unique_identifier=uid, attribute=factory.create_attribute(NAME, f"one-{version.name}"))
        assert modified.attribute_index is not None and modified.attribute_index.value == 0
        assert modified.attribute_value.name_value.value == f"one-{version.name}"
        _, modified = c.modify_attribute(
            unique_identifier=uid, attribute=factory.create_attribute(NAME, f"two-{version.name}", 1)
        )
        assert modified.attribute_index.value == 1
        _, deleted = c.delete_attribute(unique_identifier=uid, attribute_name="Name", attribute_index=1)
        assert (deleted.attribute_index.value, deleted.attribute_value.name_value.value) == (1, f"two-{version.name}")
        _, deleted = c.delete_attribute(unique_identifier=uid, attribute_name="Name", attribute_index=0)
        assert (deleted.attribute_index.value, deleted.attribute_value.name_value.value) == (0, f"one-{version.name}")
        _, attributes = c.get_attributes(uid, ["Name"])
        assert attributes == []
    finally:
        c.close()


def test_modify_and_delete_attribute_2_0_answer_the_identifier(kms_module, pki_dir):
    """At 2.0 the answers carry the Unique Identifier only (2.0, 6.1.7 and
    6.1.30); PyKMIP's client reads them so."""
    from kmip.core import objects as cobjects

    c = pykmip(kms_module, pki_dir, "alice", enums.KMIPVersion.KMIP_2_0)
    try:
        uid = c.create(enums.CryptographicAlgorithm.AES, 128, name="v2-old")
        old = c.attribute_value_factory.create_attribute_value(enums.AttributeType.NAME, "v2-old")
        new = c.attribute_value_factory.create_attribute_value(enums.AttributeType.NAME, "v2-new")
        answer = c.modify_attribute(
            unique_identifier=uid,
            current_attribute=cobjects.CurrentAttribute(attribute=old),
            new_attribute=cobjects.NewAttribute(attribute=new),
        )
        assert answer == (uid, None)
        _, attributes = c.get_attributes(uid, ["Name"])
        assert [a.attribute_value.name_value.value for a in attributes] == ["v2-new"]
        reference = cobjects.AttributeReference(
            vendor_identification="", attribute_name="Name"
        )
        assert c.delete_attribute(unique_identifier=uid, attribute_reference=reference) == (uid, None)
        assert c.get_attributes(uid, ["Name"])[1] == []
    finally:
        c.close()


def test_locate_with_two_dates_selects_the_inclusive_range(client):
    """Locate with two values of one date attribute (KMIP 1.x, 4.9: the
    first the start, the second the end, both included) through
    ProxyKmipClient.locate and KMIPProxy.locate."""
    import time

    ACTIVATION = enums.AttributeType.ACTIVATION_DATE
    factory = client.attribute_factory
    # Far-future dates of its own per version, so the other tests' objects
    # stay out of the range.
    base = 4_000_000_000 + 10_000 * list(VERSIONS).index(client.version)
    uids = [_create_with(client, (ACTIVATION, base + 100 * i)) for i in range(4)]

    def located(low: int, high: int) -> list[str]:
        dates = [factory.create_attribute(ACTIVATION, low), factory.create_attribute(ACTIVATION, high)]
        found = client.locate(attributes=dates)
        via_proxy = client.proxy.locate(attributes=dates)
        assert via_proxy.result_status.value == enums.ResultStatus.SUCCESS
        assert via_proxy.uuids == found
        return found

    assert located(base + 100, base + 200) == uids[1:3]  # Both ends included.
    assert located(base, base + 300) == uids
    assert located(base + 101, base + 199) == []
    assert located(base + 200, base + 100) == uids[1:3]  # Given in either order.
    # Initial Date: today's objects are in a range around now, not in one
    # an hour old.
    INITIAL = enums.AttributeType.INITIAL_DATE
    now = int(time.time())
    around = client.locate(attributes=[factory.create_attribute(INITIAL, now - 600), factory.create_attribute(INITIAL, now + 600)])
    assert set(uids) <= set(around)
    before = client.locate(attributes=[factory.create_attribute(INITIAL, now - 3600), factory.create_attribute(INITIAL, now - 3000)])
    assert not set(uids) & set(before)
    # A range with another filter: both apply.
    state = factory.create_attribute(enums.AttributeType.STATE, enums.State.PRE_ACTIVE)
    dates = [factory.create_attribute(ACTIVATION, base), factory.create_attribute(ACTIVATION, base + 100)]
    assert client.locate(attributes=[state, *dates]) == uids[:2]


def test_locate_by_state_object_type_and_name_returns_every_match(client):
    """Locate by Name, by Object Type and by State gives every object that
    matches, in creation order, through both PyKMIP client APIs."""
    factory = client.attribute_factory
    name = f"shared-name-{client.version.name}"
    same_name = [client.create(enums.CryptographicAlgorithm.AES, 128, name=name) for _ in range(3)]
    NAME = enums.AttributeType.NAME
    assert client.locate(attributes=[factory.create_attribute(NAME, name)]) == same_name
    assert client.proxy.locate(attributes=[factory.create_attribute(NAME, name)]).uuids == same_name
    secrets = [
        client.register(objects.SecretData(b"pass-%d" % i, enums.SecretDataType.PASSWORD)) for i in range(3)
    ]
    by_type = client.locate(attributes=[factory.create_attribute(enums.AttributeType.OBJECT_TYPE, enums.ObjectType.SECRET_DATA)])
    assert [u for u in by_type if u in secrets] == secrets
    assert not set(by_type) & set(same_name)
    client.activate(same_name[0])
    client.activate(same_name[2])
    STATE = enums.AttributeType.STATE
    active = client.locate(attributes=[factory.create_attribute(STATE, enums.State.ACTIVE)])
    pre_active = client.locate(attributes=[factory.create_attribute(STATE, enums.State.PRE_ACTIVE)])
    assert [u for u in active if u in same_name] == [same_name[0], same_name[2]]
    assert [u for u in pre_active if u in same_name + secrets] == [same_name[1], *secrets]
    both = client.locate(attributes=[factory.create_attribute(NAME, name), factory.create_attribute(STATE, enums.State.ACTIVE)])
    assert both == [same_name[0], same_name[2]]
    # Every match, however many: more objects than any page size.
    many = [client.create(enums.CryptographicAlgorithm.AES, 128, name=f"many-{client.version.name}") for _ in range(40)]
    assert client.locate(attributes=[factory.create_attribute(NAME, f"many-{client.version.name}")]) == many


def _get_raw(client, uid: str, wrapping: dict):
    """A Get built by PyKMIP's client (its Key Wrapping Specification, its
    request message, over its KMIPProxy connection) whose answer is read as
    TTLV: PyKMIP's response reader takes a Key Value as a Structure only,
    and a wrapped Key Value is a Byte String (KMIP 1.4, 2.1.4; 2.0, 2.1.4)."""
    from kmip.core.messages import messages, payloads
    from kmip.core.messages.contents import Operation

    from kmip_core import ttlv

    request = payloads.GetRequestPayload(
        unique_identifier=uid, key_wrapping_specification=client._build_key_wrapping_specification(wrapping)
    )
    item = messages.RequestBatchItem(operation=Operation(enums.Operation.GET), request_payload=request)
    client.proxy._send_message(client.proxy._build_request_message(None, [item]))
    return ttlv.decode(bytes(client.proxy._receive_message().buffer))


@pytest.mark.parametrize("encoding", [None, enums.EncodingOption.NO_ENCODING], ids=["ttlv-encoding", "no-encoding"])
def test_get_with_a_key_wrapping_specification(client, encoding):
    """Get with PyKMIP's Key Wrapping Specification (AES key wrap under a
    registered wrapping key): the Key Value is the specification's Byte
    String, with Key Wrapping Data naming the wrapping key, and it unwraps
    to the key (No Encoding) or to its TTLV Key Value (the default)."""
    from cryptography.hazmat.primitives.keywrap import aes_key_unwrap
    from kmip.core.enums import Tags

    from kmip_core import ttlv

    kek_bytes, key_bytes = bytes(range(100, 116)), bytes(range(32))
    mask = enums.CryptographicUsageMask
    kek = client.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 128, kek_bytes, [mask.WRAP_KEY, mask.UNWRAP_KEY]))
    client.activate(kek)
    uid = client.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 256, key_bytes, [mask.ENCRYPT]))
    wrapping = {
        "wrapping_method": enums.WrappingMethod.ENCRYPT,
        "encryption_key_information": {
            "unique_identifier": kek,
            "cryptographic_parameters": {"block_cipher_mode": enums.BlockCipherMode.NIST_KEY_WRAP},
        },
    }
    if encoding is not None:
        wrapping["encoding_option"] = encoding
    response = _get_raw(client, uid, wrapping)
    item = response.find(Tags.BATCH_ITEM.value)
    assert item.get(Tags.RESULT_STATUS.value) == enums.ResultStatus.SUCCESS.value, item.get(Tags.RESULT_MESSAGE.value)
    block = item.find(Tags.RESPONSE_PAYLOAD.value).find(Tags.SYMMETRIC_KEY.value).find(Tags.KEY_BLOCK.value)
    key_value = block.find(Tags.KEY_VALUE.value)
    assert key_value.type == ttlv.ItemType.BYTE_STRING
    wrapping_data = block.find(Tags.KEY_WRAPPING_DATA.value)
    assert wrapping_data.get(Tags.WRAPPING_METHOD.value) == enums.WrappingMethod.ENCRYPT.value
    assert wrapping_data.find(Tags.ENCRYPTION_KEY_INFORMATION.value).get(Tags.UNIQUE_IDENTIFIER.value) == kek
    plain = aes_key_unwrap(kek_bytes, key_value.value)
    if encoding == enums.EncodingOption.NO_ENCODING:
        assert plain == key_bytes
    else:
        assert ttlv.decode(plain).find(Tags.KEY_MATERIAL.value).value == key_bytes
    # The key itself is unchanged: a Get without wrapping returns it.
    assert client.get(uid).value == key_bytes


def _self_signed_certificate() -> bytes:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "interop")])
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(7)
        .not_valid_before(datetime.datetime(2024, 1, 1))
        .not_valid_after(datetime.datetime(2034, 1, 1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def test_register_and_get_of_each_object_type(client, rsa_key):
    """Register of every object type PyKMIP's client builds, then Get: the
    same object comes back (type, value, and each type's own fields)."""
    certificate = _self_signed_certificate()
    registered = [
        objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 128, bytes(16)),
        objects.PrivateKey(enums.CryptographicAlgorithm.RSA, 2048, crypto.export_private_key(rsa_key[0], KFT.PKCS_8), KFT.PKCS_8),
        objects.PublicKey(enums.CryptographicAlgorithm.RSA, 2048, crypto.export_public_key(rsa_key[1], KFT.X_509), KFT.X_509),
        objects.X509Certificate(certificate),
        objects.SecretData(b"a passphrase", enums.SecretDataType.PASSWORD),
        objects.OpaqueObject(b"opaque bytes", enums.OpaqueDataType.NONE),
    ]
    for managed in registered:
        uid = client.register(managed)
        back = client.get(uid)
        assert type(back) is type(managed)
        assert back.value == managed.value
        if isinstance(managed, (objects.SymmetricKey, objects.PrivateKey, objects.PublicKey)):
            assert (back.cryptographic_algorithm, back.cryptographic_length) == (
                managed.cryptographic_algorithm,
                managed.cryptographic_length,
            )
        if isinstance(managed, objects.SecretData):
            assert back.data_type == enums.SecretDataType.PASSWORD
        if isinstance(managed, objects.OpaqueObject):
            assert back.opaque_type == enums.OpaqueDataType.NONE
        _, attributes = client.get_attributes(uid, ["Object Type", "State"])
        by_name = {a.attribute_name.value: a.attribute_value.value for a in attributes}
        assert by_name == {"Object Type": managed.object_type, "State": enums.State.PRE_ACTIVE}


def test_everyday_key_pair_and_symmetric_key_calls(client):
    """The calls a PyKMIP user makes every day, in order: create and
    create_key_pair with names and masks, get_attribute_list,
    get_attributes, activate, encrypt/decrypt, sign/verify, mac, locate
    with filters and paging, revoke, destroy."""
    mask = enums.CryptographicUsageMask
    tag = client.version.name
    aes = client.create(enums.CryptographicAlgorithm.AES, 256, name=f"everyday-aes-{tag}", cryptographic_usage_mask=[mask.ENCRYPT, mask.DECRYPT])
    public, private = client.create_key_pair(
        enums.CryptographicAlgorithm.RSA,
        2048,
        public_name=f"everyday-pub-{tag}",
        private_name=f"everyday-priv-{tag}",
        public_usage_mask=[mask.VERIFY, mask.ENCRYPT],
        private_usage_mask=[mask.SIGN, mask.DECRYPT],
    )
    hmac_key = client.create(enums.CryptographicAlgorithm.HMAC_SHA256, 256, cryptographic_usage_mask=[mask.MAC_GENERATE])
    names = client.get_attribute_list(private)
    assert {"Name", "State", "Cryptographic Algorithm", "Link"} <= set(names)
    # PyKMIP's client reads no Link, Revocation Reason or Random Number
    # Generator value (its attribute value factory has none): not asked for.
    _, attributes = client.get_attributes(private, ["Name", "Cryptographic Length"])
    by_name: dict = {}
    for a in attributes:
        by_name.setdefault(a.attribute_name.value, []).append(a.attribute_value)
    assert by_name["Name"][0].name_value.value == f"everyday-priv-{tag}"
    assert by_name["Cryptographic Length"][0].value == 2048
    for uid in (aes, public, private, hmac_key):
        client.activate(uid)

    cbc = {
        "block_cipher_mode": enums.BlockCipherMode.CBC,
        "padding_method": enums.PaddingMethod.PKCS5,
        "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
    }
    ciphertext, iv = client.encrypt(b"everyday plaintext", aes, cryptographic_parameters=cbc)
    assert iv is not None and len(iv) == 16
    assert client.decrypt(ciphertext, aes, cryptographic_parameters=cbc, iv_counter_nonce=iv) == b"everyday plaintext"
    oaep = {
        "padding_method": enums.PaddingMethod.OAEP,
        "cryptographic_algorithm": enums.CryptographicAlgorithm.RSA,
        "hashing_algorithm": enums.HashingAlgorithm.SHA_256,
    }
    ciphertext, _ = client.encrypt(b"to the private key", public, cryptographic_parameters=oaep)
    assert client.decrypt(ciphertext, private, cryptographic_parameters=oaep) == b"to the private key"
    for parameters in (
        {"padding_method": enums.PaddingMethod.PSS, "cryptographic_algorithm": enums.CryptographicAlgorithm.RSA, "hashing_algorithm": enums.HashingAlgorithm.SHA_256},
        {"digital_signature_algorithm": enums.DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION},
    ):
        signature = client.sign(b"signed data", private, cryptographic_parameters=parameters)
        assert client.signature_verify(b"signed data", signature, public, cryptographic_parameters=parameters) == enums.ValidityIndicator.VALID
        assert client.signature_verify(b"other data", signature, public, cryptographic_parameters=parameters) == enums.ValidityIndicator.INVALID
    import hashlib
    import hmac

    uid, mac = client.mac(b"mac data", hmac_key, enums.CryptographicAlgorithm.HMAC_SHA256)
    assert uid == hmac_key
    assert mac == hmac.new(client.get(hmac_key).value, b"mac data", hashlib.sha256).digest()

    factory = client.attribute_factory
    rsa_filter = [
        factory.create_attribute(enums.AttributeType.CRYPTOGRAPHIC_ALGORITHM, enums.CryptographicAlgorithm.RSA),
        factory.create_attribute(enums.AttributeType.NAME, f"everyday-priv-{tag}"),
    ]
    assert client.locate(attributes=rsa_filter) == [private]
    everything = client.locate()
    assert client.locate(maximum_items=2) == everything[:2]
    assert client.locate(offset_items=1, maximum_items=2) == everything[1:3]

    client.revoke(enums.RevocationReasonCode.CESSATION_OF_OPERATION, aes, "retired")
    _, attributes = client.get_attributes(aes, ["State"])
    assert attributes[0].attribute_value.value == enums.State.DEACTIVATED
    with pytest.raises(pie_exceptions.KmipOperationFailure):
        client.encrypt(b"after revoke", aes, cryptographic_parameters=cbc)
    client.destroy(aes)
    assert aes not in client.locate()


def test_register_a_wrapped_key(client, kms_module, pki_dir):
    """A key registered wrapped through PyKMIP's client (its form: the
    wrapped bytes as Key Material, Key Wrapping Data naming a managed AES
    key): Get returns it unwrapped and it encrypts like any key; Get with
    Key Wrap Type As Registered (which PyKMIP's client cannot ask for: sent
    here as raw TTLV over TLS) returns the Key Block as registered."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    from cryptography.hazmat.primitives.keywrap import aes_key_wrap
    from kmip.core.enums import Tags
    from kmip_client import RawClient

    from kmip_core import ttlv

    mask = enums.CryptographicUsageMask
    kek_bytes, key = bytes(range(50, 66)), bytes(range(200, 232))
    kek = client.register(objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 128, kek_bytes, [mask.WRAP_KEY, mask.UNWRAP_KEY]))
    client.activate(kek)
    wrapped = aes_key_wrap(kek_bytes, key)
    wrapping_data = {
        "wrapping_method": enums.WrappingMethod.ENCRYPT,
        "encryption_key_information": {
            "unique_identifier": kek,
            "cryptographic_parameters": {"block_cipher_mode": enums.BlockCipherMode.NIST_KEY_WRAP},
        },
        "encoding_option": enums.EncodingOption.NO_ENCODING,
    }
    uid = client.register(
        objects.SymmetricKey(
            enums.CryptographicAlgorithm.AES, 256, wrapped, [mask.ENCRYPT, mask.DECRYPT], key_wrapping_data=wrapping_data
        )
    )
    back = client.get(uid)
    assert (back.value, back.cryptographic_length) == (key, 256)
    client.activate(uid)
    ecb = {
        "block_cipher_mode": enums.BlockCipherMode.ECB,
        "padding_method": enums.PaddingMethod.NONE,
        "cryptographic_algorithm": enums.CryptographicAlgorithm.AES,
    }
    ciphertext, _ = client.encrypt(bytes(16), uid, cryptographic_parameters=ecb)
    encryptor = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    assert ciphertext == encryptor.update(bytes(16)) + encryptor.finalize()

    version = (1, 2) if client.version == enums.KMIPVersion.KMIP_1_2 else (1, 4) if client.version == enums.KMIPVersion.KMIP_1_4 else (2, 0)
    request = ttlv.structure(
        Tags.REQUEST_MESSAGE.value,
        [
            ttlv.structure(
                Tags.REQUEST_HEADER.value,
                [
                    ttlv.structure(
                        Tags.PROTOCOL_VERSION.value,
                        [ttlv.integer(Tags.PROTOCOL_VERSION_MAJOR.value, version[0]), ttlv.integer(Tags.PROTOCOL_VERSION_MINOR.value, version[1])],
                    ),
                    ttlv.integer(Tags.BATCH_COUNT.value, 1),
                ],
            ),
            ttlv.structure(
                Tags.BATCH_ITEM.value,
                [
                    ttlv.enumeration(Tags.OPERATION.value, enums.Operation.GET.value),
                    ttlv.structure(
                        Tags.REQUEST_PAYLOAD.value,
                        [
                            ttlv.text(Tags.UNIQUE_IDENTIFIER.value, uid),
                            ttlv.enumeration(Tags.KEY_WRAP_TYPE.value, enums.KeyWrapType.AS_REGISTERED.value),
                        ],
                    ),
                ],
            ),
        ],
    )
    with RawClient(kms_module.host, kms_module.port, pki_dir, "alice") as raw:
        response = raw.request(ttlv.encode(request))
    item = response.find(Tags.BATCH_ITEM.value)
    assert item.get(Tags.RESULT_STATUS.value) == enums.ResultStatus.SUCCESS.value, item.get(Tags.RESULT_MESSAGE.value)
    block = item.find(Tags.RESPONSE_PAYLOAD.value).find(Tags.SYMMETRIC_KEY.value).find(Tags.KEY_BLOCK.value)
    assert block.find(Tags.KEY_VALUE.value).get(Tags.KEY_MATERIAL.value) == wrapped
    info = block.find(Tags.KEY_WRAPPING_DATA.value).find(Tags.ENCRYPTION_KEY_INFORMATION.value)
    assert info.get(Tags.UNIQUE_IDENTIFIER.value) == kek
