"""Unit tests of broker.attest.tpm2, the broker's side of host attestation: public areas,
quotes and signatures that a real TPM (swtpm 0.7.1 driven with tpm2-tools 5.4) produced,
kept here as hex, and structures built by hand from TPM 2.0 Part 2; every malformed
input must be a Tpm2Error, every forged or foreign quote a QuoteError."""

from __future__ import annotations

import hashlib
import hmac
import struct

import pytest
from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.attest import tpm2
from broker.attest.tpm2 import QuoteError, Tpm2Error

# Made by one swtpm host TPM: its EK (0x81010001), three attestation keys under it
# (tpm2_createak -G rsa -s rsassa, -G ecc -s ecdsa, -G rsa -s rsapss, all -g sha256)
# and a quote by each (tpm2_quote -m/-s, tss format), after PCRs 0-7 were each
# extended once with sha256 of BOOT[i]. The ".name" entries are tpm2_createak -n.
VECTORS = {
    "ek.pub": (
        "013a0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080"
        "004300100800000000000100c889ff4c792085f0aadeccc5c34d62939767acd50518bd00733ab15d9e5f0be20c01ffb9"
        "f40c7d71304d2774e29ec9b170d337edf86bc2a19d1bc291d6ed1760b535c20e23a82e218993eaabbd589157292f04bd"
        "2843ff6082cd3570d802f6dfdc6ad47b395963442f4a6970a2032365875ebe06ccb7f2bf1dc2a9cbb006757024ab740d"
        "2dd5febdfb87e066de04a9fa5184ae8680cdfcccbc447359aff65b39ef3bbc4d762addff92b2efe24daca81536932647"
        "28c187f7b654f82d4e6aa294629bd0fd5eff8b4fd995fbb88a246f78482968b86ed541e8e4c3305e40048fdcc2fd4a44"
        "37bbd200f5a6b9ad68d9c44b099506f5e2cd755f9e8395ae3743d5ef"
    ),
    "rsa_ak.pub": (
        "01180001000b00050072000000100014000b0800000000000100dbb5a76d72c3f089e7ec9686eac336b225df6987b94a"
        "04d639b78938053dd8b939fb18e8bf967253b2fd74d6bfe3306f87fe35fc49e5bff1b3359b5614c07a9631c577fbd120"
        "23f75339f512be649be7a2d5572ec02e01072aa6e9b4e17ef8220973a2412a76c4362a2e17472956751dd5fff7d04126"
        "83652263537412fbcb2c6b50dbde51599643d06d50647b65981d86b718c1db7c12c4ccfa635bcdbb717b15e354eda69f"
        "2b8ee3099b62bd675c442380e43b7740c76628ed2d5a9315b2cea9d5cdf245278aa54468af1909f41629de1ddb786640"
        "fa2088584235efc01cf1244832a688eb5497b100caf52d3996b21d43c057f824c5d6c325794f333f91d3"
    ),
    "rsa.attest": (
        "ff54434780180022000be578beadd20c6b01d584f92bb8c13aacf3e049380fa912d12b23f1362c7cac3b002000010203"
        "0405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f00000000000002f3000000020000000001201910"
        "230016363600000001000b03ff0000002025f2918927c4779066414536d216191d30ba287712b07648278148f79264c3"
        "ce"
    ),
    "rsa.sig": (
        "0014000b01003b95658b5d18807d420629cc25ae42470a9b7df79c37900dbfb8501ef2f8de5e5b75a84b2f4af44af91e"
        "6c2d031efcf73a7628e0d156648fca89aa2476649e7887b658837b046b7b690b524cf1ba7ad8c1f569c52e03ea341cf2"
        "6f6dcfac6757517609460eef4b7f769abd2892b3d7d7b00857e35d61049787e9df4cd071d5b14e1ce0cad67516648ea5"
        "ba561f679ccd03a13a5654131a1905824b9d04b38750105adae37018067ef8bf247bec3f5522e0b49b154901af1839b6"
        "c3bea1b51416b8eb6f7725bb580046b3f7406835429ee695dff26c32a5bfe924b7eee8d347dc1a035ae12f69b6e447f5"
        "312bb7c936b7fe47cdf53b3f50abcb6e33bd37b60b95"
    ),
    "ecc_ak.pub": (
        "00580023000b00050072000000100018000b0003001000203346755a90e86dfc2b4031ba814b7cef1fad6c91ae5be532"
        "8baf967707c2b9d20020e2142f7be26411d2c0c3032ad4f924593f48c3e74e5acd2fc6f5e6865d8b130f"
    ),
    "ecc_ak.name": ("000b68e6d146e5a5b739578121e2a32c997e308ce4edb83b8ab05ea0bdbdb6518d75"),
    "ecc.attest": (
        "ff54434780180022000ba1aba6561d9ed7f6228c46e92ccb4273b3885ab8090d0784fd56ed7f29ab63c4000501020304"
        "05000000000000032a000000020000000001201910230016363600000001000b0381000000204ad939cf552e8d6ffd47"
        "9a9f418b07b70edf91d493739ef07a3955ab84b872eb"
    ),
    "ecc.sig": (
        "0018000b0020dbf5108c7490e383fe8fce3f1ff400a1bcda6c61a5a18e34d87b2bdb77cd4c3a002096c413b96b7bf1b7"
        "9d034a3d01b76f1d7f57bbdbae56b8ae7e87de66e2cc2d8d"
    ),
    "pss_ak.pub": (
        "01180001000b00050072000000100016000b0800000000000100ad3b87be5c0e3c35e9b96bf1c51db2de28433766bede"
        "1199e99e70c4e2a1ccea133f54fa9cb9dcf83bfcb853e5ea1c7ef84cc774ffe0aa8cfea19b946bde7b2c3c70b5a5f2df"
        "29124f6a55dc16f57703d21ca7531411899943d38fdfa0899ab8a10a520d0249b88bd8807bc4300090e303883acf69a7"
        "ad2c234614fd854ec71b7c623835d2df8f71bd0987c0fb75aec66015e6e0b40be6618e97932c63be8e1dc73966752524"
        "5899d12c81977035129bd0bd1ba35038ba7978273d0e739db564dff5d23899bd28c704b996ee3ee6db0dfebd0041eab3"
        "1bd43a41eda8773bf7489ce79f327a94701c993dec4951056dd18f15a4030b8e74d0920d0eb18aaa9dc1"
    ),
    "pss_ak.name": ("000b441dd2c8bab743a52ae2b74338ec646bb2f8e69b012087f12df7527b78c55781"),
    "pss.attest": (
        "ff54434780180022000bdaaf107bee2dbe163ebc53ed0f705eec311755d28b136a1d2f50d0a34edfbd1e00020a0b0000"
        "000000000447000000020000000001201910230016363600000001000b0380000000204fe7cf9aaddb59f88264228639"
        "9733d98f424a48d73fd2eb3221a51f9550e699"
    ),
    "pss.sig": (
        "0016000b01006f847d0a25774181ea364c6443c96d6fa0e08318e6b9fb312490071bc2466069e17e1adfb700e324d36c"
        "3708a9a4d8a1a964328c431a5639968510e463cc1b0baeee5f6dbb45e072c587e26c17ed937df73f5465e86dcc9a32fd"
        "d4b2bb871b90e2a027d4c9262411671c0a36e4704fa153275c349f9d30804462cce8eff68244325b88c10abfcc2cf448"
        "1e9bba415fbb599b17210e2190fdef3038183aff418bfb6c752741feabd8e0e1c3065993959b8a4b13340360bb76ebcf"
        "04767b166705eca2639d5b9b8122c21da0ea2e41508232f4cdc34b1bf2a3c995b54d89fb79f6d4f18d0855f2234fe286"
        "4207cdf9abdb48ec40a6f8d1035203056a990111370c"
    ),
}
BOOT = (
    b"firmware",
    b"firmware-configuration",
    b"option-roms",
    b"option-rom-configuration",
    b"bootloader",
    b"bootloader-configuration",
    b"platform-state",
    b"secure-boot-policy",
)
RSA_NONCE = bytes(range(32))


def vector(name: str) -> bytes:
    return bytes.fromhex("".join(VECTORS[name]))


def booted_pcr(index: int) -> bytes:
    return hashlib.sha256(bytes(32) + hashlib.sha256(BOOT[index]).digest()).digest()


# TPMA_OBJECT of tpm2_createak's keys: fixedTPM|fixedParent|sensitiveDataOrigin|userWithAuth|restricted|sign.
AK_ATTRIBUTES = 0x00050072
SHA256, NULL = 0x000B, 0x0010
RSASSA, RSAPSS, ECDSA = 0x0014, 0x0016, 0x0018


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def tpmt_public(
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey,
    *,
    attributes: int = AK_ATTRIBUTES,
    scheme: int = RSASSA,
    scheme_hash: int = SHA256,
    name_alg: int = SHA256,
) -> bytes:
    """A TPMT_PUBLIC written out by hand from Part 2, 12.2.4."""
    scheme_field = struct.pack(">H", scheme) + (struct.pack(">H", scheme_hash) if scheme != NULL else b"")
    head = struct.pack(">HI", name_alg, attributes) + tpm2b(b"") + struct.pack(">H", NULL) + scheme_field
    if isinstance(key, rsa.RSAPublicKey):
        numbers = key.public_numbers()
        modulus = numbers.n.to_bytes(key.key_size // 8, "big")
        return struct.pack(">H", 0x0001) + head + struct.pack(">HI", key.key_size, 0) + tpm2b(modulus)
    point = key.public_numbers()
    return (
        struct.pack(">H", 0x0023)
        + head
        + struct.pack(">HH", 0x0003, NULL)
        + tpm2b(point.x.to_bytes(32, "big"))
        + tpm2b(point.y.to_bytes(32, "big"))
    )


def attest(
    *,
    magic: int = 0xFF544347,
    kind: int = 0x8018,
    extra: bytes = b"nonce",
    safe: int = 1,
    selections: tuple[tuple[int, bytes], ...] = ((SHA256, b"\x81\x00\x00"),),
    digest: bytes = bytes(32),
) -> bytes:
    """A TPMS_ATTEST of a quote written out by hand from Part 2, 10.12.12."""
    out = struct.pack(">IH", magic, kind) + tpm2b(b"\x00\x0b" + bytes(32)) + tpm2b(extra)
    out += struct.pack(">QIIB", 1234, 5, 0, safe) + struct.pack(">Q", 99)
    out += struct.pack(">I", len(selections))
    for alg, select in selections:
        out += struct.pack(">HB", alg, len(select)) + select
    return out + tpm2b(digest)


def rsassa_signature(private: rsa.RSAPrivateKey, message: bytes, hash_alg: int = SHA256) -> bytes:
    algorithm = {SHA256: hashes.SHA256(), 0x0004: hashes.SHA1()}[hash_alg]
    return struct.pack(">HH", RSASSA, hash_alg) + tpm2b(private.sign(message, padding.PKCS1v15(), algorithm))


RSA_KEY = rsa.generate_private_key(65537, 2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


# --- public areas ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("blob", "key_type", "scheme"),
    [
        ("rsa_ak.pub", "rsa", ("rsassa", "sha256")),
        ("ecc_ak.pub", "ecc", ("ecdsa", "sha256")),
        ("pss_ak.pub", "rsa", ("rsapss", "sha256")),
    ],
)
def test_real_attestation_keys_parse_and_are_usable(blob, key_type, scheme):
    ak = tpm2.parse_public(vector(blob))
    assert (ak.key_type, ak.name_alg, ak.scheme) == (key_type, "sha256", scheme)
    assert ak.object_attributes == AK_ATTRIBUTES
    assert ak.raw == vector(blob)[2:]
    assert ak.attestation_key_problem() is None


@pytest.mark.parametrize("key", ["ecc_ak", "pss_ak"])
def test_name_is_the_one_the_tpm_computed(key):
    assert tpm2.parse_public(vector(f"{key}.pub")).name == vector(f"{key}.name")


def test_real_ek_is_the_default_template_and_no_attestation_key():
    ek = tpm2.parse_public(vector("ek.pub"))
    assert ek.key_type == "rsa" and ek.public_key.key_size == 2048
    assert ek.auth_policy.hex() == "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    assert ek.symmetric == ("aes", 128, "cfb") and ek.scheme is None
    problem = ek.attestation_key_problem()
    assert problem is not None and "sign" in problem


def test_pem_and_fingerprint_are_those_of_the_same_key_given_as_pem():
    public = RSA_KEY.public_key()
    ak = tpm2.parse_public(tpm2b(tpmt_public(public)))
    pem = public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert ak.public_pem() == pem
    assert ak.fingerprint() == hashlib.sha256(der).hexdigest()
    assert ak.name == b"\x00\x0b" + hashlib.sha256(ak.raw).digest()


def test_hand_built_ecc_key_parses_to_the_same_point():
    ak = tpm2.parse_public(tpm2b(tpmt_public(EC_KEY.public_key(), scheme=ECDSA)))
    assert ak.key_type == "ecc"
    assert ak.public_key.public_numbers() == EC_KEY.public_key().public_numbers()


@pytest.mark.parametrize(
    ("attributes", "word"),
    [
        (AK_ATTRIBUTES & ~(1 << 16), "restricted"),
        (AK_ATTRIBUTES & ~(1 << 18), "sign"),
        (AK_ATTRIBUTES | (1 << 17), "decrypt"),
        (AK_ATTRIBUTES & ~(1 << 1), "fixedTPM"),
        (AK_ATTRIBUTES & ~(1 << 4), "fixedParent"),
        (AK_ATTRIBUTES & ~(1 << 5), "sensitiveDataOrigin"),
    ],
)
def test_attestation_key_problem_names_what_is_wrong(attributes, word):
    key = tpm2.parse_public(tpm2b(tpmt_public(RSA_KEY.public_key(), attributes=attributes)))
    problem = key.attestation_key_problem()
    assert problem is not None and word in problem and "\n" not in problem


def test_user_with_auth_does_not_matter_and_a_null_scheme_is_usable():
    key = tpm2.parse_public(tpm2b(tpmt_public(RSA_KEY.public_key(), attributes=AK_ATTRIBUTES & ~(1 << 6), scheme=NULL)))
    assert key.scheme is None
    assert key.attestation_key_problem() is None


def test_a_decryption_scheme_is_no_attestation_key():
    key = tpm2.parse_public(tpm2b(tpmt_public(RSA_KEY.public_key(), scheme=0x0017)))  # OAEP
    assert "its scheme is oaep" in (key.attestation_key_problem() or "")


def test_an_rsa_1024_attestation_key_is_too_weak():
    weak = rsa.generate_private_key(65537, 1024).public_key()
    key = tpm2.parse_public(tpm2b(tpmt_public(weak)))
    assert "RSA 1024" in (key.attestation_key_problem() or "")


# --- malformed input -------------------------------------------------------------------

PUBLICS = ["ek.pub", "rsa_ak.pub", "ecc_ak.pub", "pss_ak.pub"]
QUOTES = [
    ("rsa_ak.pub", "rsa.attest", "rsa.sig"),
    ("ecc_ak.pub", "ecc.attest", "ecc.sig"),
    ("pss_ak.pub", "pss.attest", "pss.sig"),
]


@pytest.mark.parametrize("name", PUBLICS)
def test_public_truncated_at_every_offset_is_a_tpm2_error(name):
    blob = vector(name)
    raw = blob[2:]
    for cut in range(len(blob)):
        with pytest.raises(Tpm2Error):
            tpm2.parse_public(blob[:cut])
    for cut in range(len(raw)):
        # The size field agrees with the shortened TPMT_PUBLIC: the inner structure is what is short.
        with pytest.raises(Tpm2Error):
            tpm2.parse_public(tpm2b(raw[:cut]))


@pytest.mark.parametrize("name", PUBLICS)
def test_public_with_trailing_bytes_is_a_tpm2_error(name):
    blob = vector(name)
    with pytest.raises(Tpm2Error, match="trailing"):
        tpm2.parse_public(blob + b"\x00")
    with pytest.raises(Tpm2Error, match="trailing"):
        tpm2.parse_public(tpm2b(blob[2:] + b"\x00"))


@pytest.mark.parametrize(
    ("offset", "value", "match"),
    [
        (2, b"\x00\x08", "unsupported key type"),  # keyedhash
        (4, b"\x00\x99", "hash algorithm"),  # nameAlg
        (44, b"\x00\x99", "symmetric algorithm"),
        (46, b"\x00\x99", "symmetric key of 153 bits"),
    ],
)
def test_unknown_algorithms_are_named(offset, value, match):
    blob = bytearray(vector("ek.pub"))
    blob[offset : offset + len(value)] = value
    with pytest.raises(Tpm2Error, match=match):
        tpm2.parse_public(bytes(blob))


def test_a_modulus_size_that_lies_about_key_bits_is_refused():
    raw = tpmt_public(RSA_KEY.public_key())
    lying = raw.replace(struct.pack(">HI", 2048, 0), struct.pack(">HI", 3072, 0))
    with pytest.raises(Tpm2Error, match="keyBits"):
        tpm2.parse_public(tpm2b(lying))


def test_an_ecc_point_off_the_curve_is_refused():
    raw = bytearray(tpmt_public(EC_KEY.public_key(), scheme=ECDSA))
    raw[-1] ^= 1
    with pytest.raises(Tpm2Error, match="not on secp256r1"):
        tpm2.parse_public(tpm2b(bytes(raw)))


@pytest.mark.parametrize(("ak", "message", "signature"), QUOTES)
def test_quote_and_signature_truncated_at_every_offset_are_tpm2_errors(ak, message, signature):
    key, attest_bytes, sig = tpm2.parse_public(vector(ak)), vector(message), vector(signature)
    for cut in range(len(attest_bytes)):
        with pytest.raises(Tpm2Error):
            tpm2.parse_quote(attest_bytes[:cut])
    for cut in range(len(sig)):
        with pytest.raises(Tpm2Error):
            tpm2.verify_quote(key, attest_bytes, sig[:cut])
    with pytest.raises(Tpm2Error, match="trailing"):
        tpm2.parse_quote(attest_bytes + b"\x00")
    with pytest.raises(Tpm2Error, match="trailing"):
        tpm2.verify_quote(key, attest_bytes, sig + b"\x00")


def test_hand_built_quote_parses_field_by_field():
    quote = tpm2.parse_quote(attest(extra=b"fresh", selections=((SHA256, b"\x81\x00\x01"),)))
    assert quote.extra_data == b"fresh"
    assert (quote.clock, quote.reset_count, quote.restart_count, quote.safe, quote.firmware_version) == (
        1234,
        5,
        0,
        True,
        99,
    )
    assert (quote.pcr_bank, quote.pcrs) == ("sha256", (0, 7, 16))


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": 0xFF544348}, "magic"),
        ({"kind": 0x8017}, "not a quote"),  # TPM_ST_ATTEST_CERTIFY
        ({"selections": ((SHA256, b"\x01\x00\x00"), (0x0004, b"\x01\x00\x00"))}, "exactly one bank"),
        ({"selections": ()}, "exactly one bank"),
        ({"selections": ((SHA256, b"\x00\x00\x00"),)}, "no PCR"),
        ({"selections": ((SHA256, b"\x01" * 9),)}, "selection"),
        ({"selections": ((0x0099, b"\x01\x00\x00"),)}, "hash algorithm"),
        ({"safe": 2}, "safe"),
        ({"digest": bytes(20)}, "not a sha256 digest"),
        ({"extra": bytes(67)}, "extraData"),
    ],
)
def test_malformed_quotes_are_refused_with_the_reason(fields, match):
    with pytest.raises(Tpm2Error, match=match):
        tpm2.parse_quote(attest(**fields))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_arbitrary_bytes_parse_or_raise_tpm2_error(data):
    for parse in (tpm2.parse_public, tpm2.parse_quote, tpm2.ek_public_from_pem):
        try:
            parse(data)
        except Tpm2Error:
            pass


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_any_changed_byte_of_a_real_quote_or_signature_is_refused(data):
    ak_name, message_name, sig_name = data.draw(st.sampled_from(QUOTES))
    key = tpm2.parse_public(vector(ak_name))
    message, signature = bytearray(vector(message_name)), bytearray(vector(sig_name))
    target = data.draw(st.sampled_from([message, signature]))
    index = data.draw(st.integers(0, len(target) - 1))
    target[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(Tpm2Error):
        tpm2.verify_quote(key, bytes(message), bytes(signature))


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_public_area_with_a_changed_byte_parses_or_raises_tpm2_error(data):
    blob = bytearray(vector(data.draw(st.sampled_from(PUBLICS))))
    index = data.draw(st.integers(0, len(blob) - 1))
    blob[index] ^= data.draw(st.integers(1, 255))
    try:
        tpm2.parse_public(bytes(blob))
    except Tpm2Error:
        pass


# --- quotes ----------------------------------------------------------------------------


def test_real_rsassa_quote_verifies_with_its_nonce_and_pcr_digest():
    quote = tpm2.verify_quote(tpm2.parse_public(vector("rsa_ak.pub")), vector("rsa.attest"), vector("rsa.sig"))
    assert quote.extra_data == RSA_NONCE
    assert (quote.pcr_bank, quote.pcrs) == ("sha256", tuple(range(8)))
    assert quote.pcr_digest == tpm2.pcr_digest("sha256", [booted_pcr(i) for i in range(8)])
    assert quote.safe


def test_real_ecdsa_and_rsapss_quotes_verify():
    ecc = tpm2.verify_quote(tpm2.parse_public(vector("ecc_ak.pub")), vector("ecc.attest"), vector("ecc.sig"))
    assert (ecc.extra_data, ecc.pcrs) == (bytes.fromhex("0102030405"), (0, 7))
    assert ecc.pcr_digest == tpm2.pcr_digest("sha256", [booted_pcr(0), booted_pcr(7)])
    pss = tpm2.verify_quote(tpm2.parse_public(vector("pss_ak.pub")), vector("pss.attest"), vector("pss.sig"))
    assert (pss.extra_data, pss.pcrs) == (b"\x0a\x0b", (7,))
    assert pss.pcr_digest == tpm2.pcr_digest("sha256", [booted_pcr(7)])


def test_a_quote_checked_with_another_key_does_not_verify():
    other = tpm2.parse_public(tpm2b(tpmt_public(RSA_KEY.public_key())))
    with pytest.raises(QuoteError, match="does not verify with the host's attestation key"):
        tpm2.verify_quote(other, vector("rsa.attest"), vector("rsa.sig"))


def test_a_signature_of_another_scheme_than_the_keys_is_refused():
    with pytest.raises(QuoteError, match="scheme"):
        tpm2.verify_quote(tpm2.parse_public(vector("rsa_ak.pub")), vector("pss.attest"), vector("pss.sig"))


def test_an_ecdsa_signature_for_an_rsa_key_is_refused():
    key = tpm2.parse_public(tpm2b(tpmt_public(RSA_KEY.public_key(), scheme=NULL)))
    with pytest.raises(QuoteError, match="ECDSA signature but the attestation key is RSA"):
        tpm2.verify_quote(key, vector("ecc.attest"), vector("ecc.sig"))


def test_a_quote_signed_by_a_key_that_is_no_attestation_key_is_refused():
    message = attest()
    key = tpm2.parse_public(tpm2b(tpmt_public(RSA_KEY.public_key(), attributes=AK_ATTRIBUTES & ~(1 << 16))))
    with pytest.raises(QuoteError, match="restricted"):
        tpm2.verify_quote(key, message, rsassa_signature(RSA_KEY, message))


def test_hand_signed_quote_verifies_and_sha1_or_null_signatures_do_not():
    key = tpm2.parse_public(tpm2b(tpmt_public(RSA_KEY.public_key(), scheme=NULL)))
    message = attest(extra=b"n")
    assert tpm2.verify_quote(key, message, rsassa_signature(RSA_KEY, message)).extra_data == b"n"
    with pytest.raises(QuoteError, match="sha1"):
        tpm2.verify_quote(key, message, rsassa_signature(RSA_KEY, message, 0x0004))
    with pytest.raises(QuoteError, match="not signed"):
        tpm2.verify_quote(key, message, struct.pack(">H", NULL))


def test_hand_signed_ecdsa_quote_verifies():
    key = tpm2.parse_public(tpm2b(tpmt_public(EC_KEY.public_key(), scheme=ECDSA)))
    message = attest()
    r, s = utils.decode_dss_signature(EC_KEY.sign(message, ec.ECDSA(hashes.SHA256())))
    signature = struct.pack(">HH", ECDSA, SHA256) + tpm2b(r.to_bytes(32, "big")) + tpm2b(s.to_bytes(32, "big"))
    assert tpm2.verify_quote(key, message, signature).pcrs == (0, 7)


# --- PCR digests -----------------------------------------------------------------------


def test_pcr_digest_is_the_hash_of_the_concatenated_values():
    values = [bytes([i]) * 32 for i in range(3)]
    assert tpm2.pcr_digest("sha256", values) == hashlib.sha256(b"".join(values)).digest()
    assert tpm2.pcr_digest("sha384", [bytes(48)]) == hashlib.sha384(bytes(48)).digest()
    # Eight reset PCRs: the digest swtpm quoted before any measurement.
    assert tpm2.pcr_digest("sha256", [bytes(32)] * 8).hex().startswith("5341e6b2")


@pytest.mark.parametrize(
    ("bank", "values", "match"),
    [
        ("sha256", [bytes(31)], "PCR value 0"),
        ("sha256", [bytes(32), bytes(48)], "PCR value 1"),
        ("md5", [], "unknown PCR bank"),
    ],
)
def test_pcr_digest_refuses_values_of_the_wrong_size(bank, values, match):
    with pytest.raises(Tpm2Error, match=match):
        tpm2.pcr_digest(bank, values)


# --- credentials -----------------------------------------------------------------------


def activate_in_software(ek: rsa.RSAPrivateKey, name: bytes, id_object: bytes, encrypted: bytes) -> bytes:
    """TPM2_ActivateCredential's unwrapping (Part 1, 24), written out independently of the module's KDFa."""

    def kdfa(key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
        out = b""
        for counter in range(1, bits // 256 + 2):
            out += hmac.new(
                key, struct.pack(">I", counter) + label + context + struct.pack(">I", bits), "sha256"
            ).digest()
        return out[: bits // 8]

    assert struct.unpack(">H", encrypted[:2])[0] == len(encrypted) - 2 == 256
    seed = ek.decrypt(
        encrypted[2:], padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=b"IDENTITY\0")
    )
    assert struct.unpack(">H", id_object[:2])[0] == len(id_object) - 2
    body = id_object[2:]
    assert body[:2] == b"\x00\x20"
    outer_hmac, enc_identity = body[2:34], body[34:]
    expected = hmac.new(kdfa(seed, b"INTEGRITY\0", b"", 256), enc_identity + name, "sha256").digest()
    if not hmac.compare_digest(outer_hmac, expected):
        raise ValueError("integrity")
    decryptor = Cipher(algorithms.AES(kdfa(seed, b"STORAGE\0", name, 128)), CFB(bytes(16))).decryptor()
    plain = decryptor.update(enc_identity) + decryptor.finalize()
    assert struct.unpack(">H", plain[:2])[0] == len(plain) - 2
    return plain[2:]


def test_make_credential_unwraps_with_the_ek_private_key_for_that_name_only():
    ek = rsa.generate_private_key(65537, 2048)
    name = tpm2.parse_public(vector("rsa_ak.pub")).name
    secret = bytes(range(32))
    id_object, encrypted = tpm2.make_credential(ek.public_key(), name, secret)
    assert activate_in_software(ek, name, id_object, encrypted) == secret
    other_name = tpm2.parse_public(vector("pss_ak.pub")).name
    with pytest.raises(ValueError, match="integrity"):
        activate_in_software(ek, other_name, id_object, encrypted)


def test_each_credential_has_a_fresh_seed():
    name = tpm2.parse_public(vector("rsa_ak.pub")).name
    first = tpm2.make_credential(RSA_KEY.public_key(), name, b"s")
    second = tpm2.make_credential(RSA_KEY.public_key(), name, b"s")
    assert first[0] != second[0] and first[1] != second[1]


@pytest.mark.parametrize(
    ("ek", "name", "secret", "match"),
    [
        (EC_KEY.public_key(), b"\x00\x0b" + bytes(32), b"s", "only RSA endorsement keys are supported"),
        (RSA_KEY.public_key(), b"\x00\x0b" + bytes(31), b"s", "truncated"),
        (RSA_KEY.public_key(), b"\x00\x0b" + bytes(33), b"s", "trailing"),
        (RSA_KEY.public_key(), b"\x00\x99" + bytes(32), b"s", "hash algorithm"),
        (RSA_KEY.public_key(), b"\x00\x0b" + bytes(32), b"", "1 to 32 bytes"),
        (RSA_KEY.public_key(), b"\x00\x0b" + bytes(32), bytes(33), "1 to 32 bytes"),
    ],
)
def test_make_credential_refuses_what_it_cannot_protect(ek, name, secret, match):
    with pytest.raises(Tpm2Error, match=match):
        tpm2.make_credential(ek, name, secret)


def test_ek_public_from_pem_reads_rsa_and_ecc_and_refuses_the_rest():
    for key in (RSA_KEY.public_key(), EC_KEY.public_key()):
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        assert tpm2.ek_public_from_pem(pem).public_numbers() == key.public_numbers()
    edwards = ed25519.Ed25519PrivateKey.generate().public_key()
    pem = edwards.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(Tpm2Error, match="neither an RSA nor an ECC key"):
        tpm2.ek_public_from_pem(pem)
    with pytest.raises(Tpm2Error, match="not a PEM public key"):
        tpm2.ek_public_from_pem(b"-----BEGIN PUBLIC KEY-----\ngarbage\n-----END PUBLIC KEY-----\n")
