"""Tests for kms_server.keystore.crypto.

Known answers come from the RFCs and NIST publications named at each
vector. The checks of RSA signature encodings redo the public-key operation
with plain integers and hashlib, so they do not trust the library under test.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kmip.core.enums import (
    BlockCipherMode,
    CryptographicAlgorithm,
    DigitalSignatureAlgorithm,
    HashingAlgorithm,
    KeyFormatType,
    PaddingMethod,
    RecommendedCurve,
)

from kms_server.keystore import crypto
from kms_server.keystore.crypto import CryptoError, MacInvalid, SignatureInvalid

AES = CryptographicAlgorithm.AES
h = bytes.fromhex


def _pem(der: bytes, label: str) -> bytes:
    body = base64.encodebytes(der).replace(b"\n", b"")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    return b"\n".join(
        [
            f"-----BEGIN {label}-----".encode(),
            *lines,
            f"-----END {label}-----".encode(),
            b"",
        ]
    )


def _pem_to_der(pem: bytes) -> bytes:
    lines = [ln for ln in pem.strip().splitlines() if not ln.startswith(b"-----")]
    return base64.b64decode(b"".join(lines))


@pytest.fixture(scope="module")
def rsa_key() -> tuple[bytes, bytes]:
    private, public, length = crypto.generate_key_pair(CryptographicAlgorithm.RSA, 2048)
    assert length == 2048
    return private, public


@pytest.fixture(scope="module")
def ec_key() -> tuple[bytes, bytes]:
    private, public, length = crypto.generate_key_pair(
        CryptographicAlgorithm.EC, curve=RecommendedCurve.P_256
    )
    assert length == 256
    return private, public


# -- errors -------------------------------------------------------------------


def test_crypto_error_carries_message_and_hierarchy():
    err = CryptoError("bad thing")
    assert err.message == "bad thing"
    assert str(err) == "bad thing"
    assert issubclass(SignatureInvalid, CryptoError)
    assert issubclass(MacInvalid, CryptoError)


def test_error_reason_does_not_echo_key_material():
    key = h("00112233445566778899aabbccddee")  # 15 bytes: wrong length
    with pytest.raises(CryptoError) as info:
        crypto.encrypt(key, AES, BlockCipherMode.GCM, b"data")
    assert key.hex() not in info.value.message
    assert "00112233" not in info.value.message


# -- randomness, digest, comparison --------------------------------------------


def test_random_bytes():
    assert len(crypto.random_bytes(0)) == 0
    assert len(crypto.random_bytes(32)) == 32
    assert crypto.random_bytes(32) != crypto.random_bytes(32)
    for bad in (-1, 1 << 30, "8", True):
        with pytest.raises(CryptoError):
            crypto.random_bytes(bad)


def test_digest_known_answers():
    assert crypto.digest(HashingAlgorithm.SHA_256, b"abc") == h(
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert crypto.digest(HashingAlgorithm.SHA_1, b"abc") == h(
        "a9993e364706816aba3e25717850c26c9cd0d89d"
    )
    assert (
        crypto.digest(HashingAlgorithm.SHA3_256, b"") == hashlib.sha3_256(b"").digest()
    )


@pytest.mark.parametrize("hashing", [HashingAlgorithm.MD5, HashingAlgorithm.MD2, None])
def test_digest_rejects_weak_or_unknown(hashing):
    with pytest.raises(CryptoError, match="not supported"):
        crypto.digest(hashing, b"abc")


def test_constant_time_eq():
    assert crypto.constant_time_eq(b"abc", b"abc")
    assert not crypto.constant_time_eq(b"abc", b"abd")
    assert not crypto.constant_time_eq(b"abc", b"ab")


# -- key generation -----------------------------------------------------------


@pytest.mark.parametrize("bits", [128, 192, 256])
def test_generate_aes_key(bits):
    key = crypto.generate_symmetric_key(AES, bits)
    assert len(key) == bits // 8


@pytest.mark.parametrize("bits", [0, 64, 100, 129, 512])
def test_generate_aes_key_rejects_bad_length(bits):
    with pytest.raises(CryptoError):
        crypto.generate_symmetric_key(AES, bits)


@pytest.mark.parametrize(
    "algorithm",
    [
        CryptographicAlgorithm.HMAC_SHA1,
        CryptographicAlgorithm.HMAC_SHA256,
        CryptographicAlgorithm.HMAC_SHA384,
        CryptographicAlgorithm.HMAC_SHA512,
    ],
)
def test_generate_hmac_key(algorithm):
    assert len(crypto.generate_symmetric_key(algorithm, 256)) == 32
    assert len(crypto.generate_symmetric_key(algorithm, 112)) == 14
    for bad in (104, 260, 8192):
        with pytest.raises(CryptoError):
            crypto.generate_symmetric_key(algorithm, bad)


@pytest.mark.parametrize("bits", [168, 192])
def test_generate_triple_des_key_has_odd_parity(bits):
    key = crypto.generate_symmetric_key(CryptographicAlgorithm.TRIPLE_DES, bits)
    assert len(key) == 24
    assert all(b.bit_count() % 2 == 1 for b in key)


@pytest.mark.parametrize(
    "algorithm",
    [
        CryptographicAlgorithm.RSA,
        CryptographicAlgorithm.DSA,
        CryptographicAlgorithm.ED25519,
        None,
    ],
)
def test_generate_symmetric_rejects_other_algorithms(algorithm):
    with pytest.raises(CryptoError, match="not supported"):
        crypto.generate_symmetric_key(algorithm, 128)


@pytest.mark.parametrize(
    ("algorithm", "bits", "key_bytes"),
    [
        (CryptographicAlgorithm.IDEA, 128, 16),
        (CryptographicAlgorithm.BLOWFISH, 448, 56),
        (CryptographicAlgorithm.CAMELLIA, 192, 24),
        (CryptographicAlgorithm.RC4, 40, 5),
        (CryptographicAlgorithm.SKIPJACK, 80, 10),
        (CryptographicAlgorithm.DES, 56, 8),
        (CryptographicAlgorithm.HMAC_MD5, 128, 16),
    ],
)
def test_generate_a_key_for_an_algorithm_no_operation_computes_with(algorithm, bits, key_bytes):
    """Issue 14: such a key is random bytes of a length the algorithm
    allows; a length it does not allow is refused."""
    keys = {crypto.generate_symmetric_key(algorithm, bits) for _ in range(2)}
    assert len(keys) == 2 and all(len(k) == key_bytes for k in keys)
    with pytest.raises(CryptoError, match="key length must be"):
        crypto.generate_symmetric_key(algorithm, bits + 1)


def test_generate_only_lengths_are_the_algorithms_own():
    lengths = crypto.GENERATE_ONLY_LENGTHS
    assert lengths[CryptographicAlgorithm.IDEA] == {128}
    assert lengths[CryptographicAlgorithm.SKIPJACK] == {80}
    assert min(lengths[CryptographicAlgorithm.BLOWFISH]) == 32 and max(lengths[CryptographicAlgorithm.BLOWFISH]) == 448
    with pytest.raises(CryptoError, match="multiple of 8 from 32 to 448"):
        crypto.generate_symmetric_key(CryptographicAlgorithm.BLOWFISH, 456)


@pytest.mark.parametrize("mode", [BlockCipherMode.CBC, BlockCipherMode.GCM, BlockCipherMode.NIST_KEY_WRAP])
def test_no_cipher_computes_with_a_generate_only_key(mode):
    key = crypto.generate_symmetric_key(CryptographicAlgorithm.IDEA, 128)
    with pytest.raises(crypto.NotSupported, match="computing with them is not supported"):
        crypto.encrypt(key, CryptographicAlgorithm.IDEA, mode, bytes(16))
    with pytest.raises(crypto.NotSupported):
        crypto.decrypt(key, CryptographicAlgorithm.IDEA, mode, bytes(16), iv=bytes(8))
    with pytest.raises(crypto.NotSupported):
        crypto.CipherStream(key, CryptographicAlgorithm.IDEA, BlockCipherMode.CBC, decrypting=False)
    with pytest.raises(crypto.NotSupported):
        crypto.mac(crypto.generate_symmetric_key(CryptographicAlgorithm.HMAC_MD5, 128), CryptographicAlgorithm.HMAC_MD5, b"x")


@pytest.mark.parametrize(
    ("algorithm", "length", "curve", "expected"),
    [
        (CryptographicAlgorithm.EC, 256, None, 256),
        (CryptographicAlgorithm.ECDSA, 384, None, 384),
        (CryptographicAlgorithm.EC, None, RecommendedCurve.P_521, 521),
        (CryptographicAlgorithm.ECDSA, 384, RecommendedCurve.P_384, 384),
    ],
)
def test_generate_ec_key_pair(algorithm, length, curve, expected):
    private, public, bits = crypto.generate_key_pair(algorithm, length, curve)
    assert bits == expected
    assert crypto.public_from_private(private) == public
    _, alg, import_bits = crypto.import_private_key(private, KeyFormatType.PKCS_8)
    assert (alg, import_bits) == (CryptographicAlgorithm.EC, expected)


@pytest.mark.parametrize(
    ("algorithm", "length", "curve"),
    [
        (CryptographicAlgorithm.RSA, 1024, None),
        (CryptographicAlgorithm.RSA, 2047, None),
        (CryptographicAlgorithm.RSA, None, None),
        (CryptographicAlgorithm.RSA, 2048, RecommendedCurve.P_256),
        (CryptographicAlgorithm.EC, 255, None),
        (CryptographicAlgorithm.EC, None, None),
        (CryptographicAlgorithm.EC, 384, RecommendedCurve.P_256),
        (CryptographicAlgorithm.EC, None, RecommendedCurve.P_192),
        (CryptographicAlgorithm.EC, None, RecommendedCurve.SECP256K1),
        (CryptographicAlgorithm.DSA, 2048, None),
        (CryptographicAlgorithm.AES, 256, None),
    ],
)
def test_generate_key_pair_rejects(algorithm, length, curve):
    with pytest.raises(CryptoError):
        crypto.generate_key_pair(algorithm, length, curve)


def test_rsa_key_pair_is_consistent(rsa_key):
    private, public = rsa_key
    assert crypto.public_from_private(private) == public
    values = crypto.transparent_private_key(private)
    assert values["public_exponent"] == 65537
    assert values["p"] * values["q"] == values["modulus"]
    assert values["modulus"].bit_length() == 2048


# -- known answers: key wrap --------------------------------------------------

RFC3394_KEK_128 = h("000102030405060708090A0B0C0D0E0F")
RFC3394_KEK_256 = h("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F")


@pytest.mark.parametrize(
    ("kek", "key_data", "wrapped"),
    [
        # RFC 3394, 4.1: wrap 128 bits of key data with a 128-bit KEK.
        (
            RFC3394_KEK_128,
            h("00112233445566778899AABBCCDDEEFF"),
            h("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5"),
        ),
        # RFC 3394, 4.6: wrap 256 bits of key data with a 256-bit KEK.
        (
            RFC3394_KEK_256,
            h("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F"),
            h(
                "28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326"
                "CBC7F0E71A99F43BFB988B9B7A02DD21"
            ),
        ),
    ],
)
def test_rfc3394_vectors(kek, key_data, wrapped):
    assert crypto.wrap_key(kek, key_data, BlockCipherMode.NIST_KEY_WRAP) == wrapped
    assert crypto.wrap_key(kek, key_data) == wrapped  # default for aligned input
    assert crypto.unwrap_key(kek, wrapped, BlockCipherMode.NIST_KEY_WRAP) == key_data
    assert crypto.unwrap_key(kek, wrapped) == key_data
    ciphertext, iv, tag = crypto.encrypt(
        kek, AES, BlockCipherMode.NIST_KEY_WRAP, key_data
    )
    assert (ciphertext, iv, tag) == (wrapped, None, None)
    assert crypto.decrypt(kek, AES, BlockCipherMode.NIST_KEY_WRAP, wrapped) == key_data


RFC5649_KEK = h("5840df6e29b02af1ab493b705bf16ea1ae8338f4dcc176a8")


@pytest.mark.parametrize(
    ("key_data", "wrapped"),
    [
        # RFC 5649, 6: 20 octets of key data.
        (
            h("c37b7e6492584340bed12207808941155068f738"),
            h("138bdeaa9b8fa7fc61f97742e72248ee5ae6ae5360d1ae6a5f54f373fa543b6a"),
        ),
        # RFC 5649, 6: 7 octets of key data.
        (h("466f7250617369"), h("afbeb0f07dfbf5419200f2ccb50bb24f")),
    ],
)
def test_rfc5649_vectors(key_data, wrapped):
    mode = BlockCipherMode.AES_KEY_WRAP_PADDING
    assert crypto.wrap_key(RFC5649_KEK, key_data, mode) == wrapped
    assert (
        crypto.wrap_key(RFC5649_KEK, key_data) == wrapped
    )  # default for unaligned input
    assert crypto.unwrap_key(RFC5649_KEK, wrapped, mode) == key_data
    assert crypto.unwrap_key(RFC5649_KEK, wrapped) == key_data
    assert crypto.encrypt(RFC5649_KEK, AES, mode, key_data)[0] == wrapped
    assert crypto.decrypt(RFC5649_KEK, AES, mode, wrapped) == key_data


@pytest.mark.parametrize("mode", [None, BlockCipherMode.NIST_KEY_WRAP])
def test_unwrap_detects_tampering(mode):
    wrapped = bytearray(h("1FA68B0A8112B447AEF34BD8FB5A7B829D3E862371D2CFE5"))
    wrapped[5] ^= 0x01
    with pytest.raises(CryptoError, match="unwrap failed"):
        crypto.unwrap_key(RFC3394_KEK_128, bytes(wrapped), mode)


def test_unwrap_with_wrong_key_fails():
    wrapped = crypto.wrap_key(RFC3394_KEK_128, bytes(32))
    with pytest.raises(CryptoError):
        crypto.unwrap_key(bytes(16), wrapped)


def test_wrap_mode_is_not_confused_between_rfc3394_and_rfc5649():
    wrapped = crypto.wrap_key(
        RFC3394_KEK_128, bytes(32), BlockCipherMode.AES_KEY_WRAP_PADDING
    )
    with pytest.raises(CryptoError):
        crypto.unwrap_key(RFC3394_KEK_128, wrapped, BlockCipherMode.NIST_KEY_WRAP)
    assert crypto.unwrap_key(RFC3394_KEK_128, wrapped) == bytes(32)


@pytest.mark.parametrize(
    ("kek", "key_data", "mode"),
    [
        (bytes(15), bytes(16), None),
        (bytes(16), bytes(20), BlockCipherMode.NIST_KEY_WRAP),
        (bytes(16), bytes(8), BlockCipherMode.NIST_KEY_WRAP),
        (bytes(16), b"", BlockCipherMode.AES_KEY_WRAP_PADDING),
        (bytes(16), bytes(16), BlockCipherMode.GCM),
    ],
)
def test_wrap_rejects_bad_input(kek, key_data, mode):
    with pytest.raises(CryptoError):
        crypto.wrap_key(kek, key_data, mode)


def test_key_wrap_mode_refuses_iv_and_padding():
    with pytest.raises(CryptoError):
        crypto.encrypt(
            bytes(16), AES, BlockCipherMode.NIST_KEY_WRAP, bytes(16), iv=bytes(8)
        )
    with pytest.raises(CryptoError):
        crypto.encrypt(
            bytes(16),
            AES,
            BlockCipherMode.NIST_KEY_WRAP,
            bytes(16),
            padding=PaddingMethod.PKCS5,
        )


# -- known answers: HMAC ------------------------------------------------------

# RFC 4231, 4.3 (test case 2).
RFC4231_KEY = b"Jefe"
RFC4231_DATA = b"what do ya want for nothing?"
RFC4231_TC2 = {
    CryptographicAlgorithm.HMAC_SHA256: (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    ),
    CryptographicAlgorithm.HMAC_SHA384: (
        "af45d2e376484031617f78d2b58a6b1b9c7ef464f5a01b47e42ec3736322445e"
        "8e2240ca5e69e2c78b3239ecfab21649"
    ),
    CryptographicAlgorithm.HMAC_SHA512: (
        "164b7a7bfcf819e2e395fbe73b56e0a387bd64222e831fd610270cd7ea250554"
        "9758bf75c05a994a6d034f65f8f0e6fdcaeab1a34d4a6b4b636e070a38bce737"
    ),
}


@pytest.mark.parametrize(("algorithm", "expected"), RFC4231_TC2.items())
def test_rfc4231_test_case_2(algorithm, expected):
    assert crypto.mac(RFC4231_KEY, algorithm, RFC4231_DATA) == h(expected)
    crypto.mac_verify(RFC4231_KEY, algorithm, RFC4231_DATA, h(expected))


def test_hmac_sha1_matches_hashlib():
    import hmac

    expected = hmac.new(b"k" * 20, b"msg", hashlib.sha1).digest()
    assert crypto.mac(b"k" * 20, CryptographicAlgorithm.HMAC_SHA1, b"msg") == expected


def test_mac_verify_rejects_mismatch():
    algorithm = CryptographicAlgorithm.HMAC_SHA256
    good = bytearray(h(RFC4231_TC2[algorithm]))
    with pytest.raises(MacInvalid):
        crypto.mac_verify(RFC4231_KEY, algorithm, RFC4231_DATA + b"!", bytes(good))
    good[-1] ^= 0x80
    with pytest.raises(MacInvalid):
        crypto.mac_verify(RFC4231_KEY, algorithm, RFC4231_DATA, bytes(good))
    with pytest.raises(MacInvalid):
        crypto.mac_verify(RFC4231_KEY, algorithm, RFC4231_DATA, bytes(good[:16]))


@pytest.mark.parametrize(
    ("key", "algorithm"),
    [
        (b"", CryptographicAlgorithm.HMAC_SHA256),
        (b"key", CryptographicAlgorithm.HMAC_MD5),
        (b"key", CryptographicAlgorithm.AES),
    ],
)
def test_mac_rejects_bad_parameters(key, algorithm):
    with pytest.raises(CryptoError) as info:
        crypto.mac(key, algorithm, b"data")
    assert not isinstance(info.value, MacInvalid)


# -- known answers: block cipher modes ----------------------------------------

# NIST SP 800-38A, appendix F, first block of each AES-128 example.
SP800_38A_KEY = h("2b7e151628aed2a6abf7158809cf4f3c")
SP800_38A_P1 = h("6bc1bee22e409f96e93d7e117393172a")


def test_sp800_38a_ecb():  # F.1.1
    ciphertext, iv, tag = crypto.encrypt(
        SP800_38A_KEY,
        AES,
        BlockCipherMode.ECB,
        SP800_38A_P1,
        padding=PaddingMethod.NONE,
    )
    assert (ciphertext, iv, tag) == (h("3ad77bb40d7a3660a89ecaf32466ef97"), None, None)


def test_sp800_38a_cbc():  # F.2.1
    iv = h("000102030405060708090a0b0c0d0e0f")
    ciphertext, iv_used, _ = crypto.encrypt(
        SP800_38A_KEY, AES, BlockCipherMode.CBC, SP800_38A_P1, iv=iv
    )
    assert ciphertext == h("7649abac8119b246cee98e9b12e9197d")
    assert iv_used == iv
    assert crypto.decrypt(SP800_38A_KEY, AES, BlockCipherMode.CBC, ciphertext, iv) == (
        SP800_38A_P1
    )


def test_sp800_38a_ctr():  # F.5.1
    counter = h("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff")
    ciphertext, _, _ = crypto.encrypt(
        SP800_38A_KEY, AES, BlockCipherMode.CTR, SP800_38A_P1, iv=counter
    )
    assert ciphertext == h("874d6191b620e3261bef6864990db6ce")


# The Galois/Counter Mode specification (McGrew and Viega), test cases 2-4.
GCM_K = h("feffe9928665731c6d6a8f9467308308")
GCM_IV = h("cafebabefacedbaddecaf888")
GCM_P = h(
    "d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
    "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b391aafd255"
)
GCM_C = h(
    "42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
    "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091473f5985"
)
GCM_AAD = h("feedfacedeadbeeffeedfacedeadbeefabaddad2")


@pytest.mark.parametrize(
    ("key", "iv", "plaintext", "aad", "ciphertext", "tag"),
    [
        (
            bytes(16),
            bytes(12),
            bytes(16),
            None,
            h("0388dace60b6a392f328c2b971b2fe78"),
            h("ab6e47d42cec13bdf53a67b21257bddf"),
        ),
        (GCM_K, GCM_IV, GCM_P, None, GCM_C, h("4d5c2af327cd64a62cf35abd2ba6fab4")),
        (
            GCM_K,
            GCM_IV,
            GCM_P[:60],
            GCM_AAD,
            GCM_C[:60],
            h("5bc94fbc3221a5db94fae95ae7121a47"),
        ),
    ],
)
def test_gcm_known_answers(key, iv, plaintext, aad, ciphertext, tag):
    result = crypto.encrypt(key, AES, BlockCipherMode.GCM, plaintext, iv=iv, aad=aad)
    assert result == (ciphertext, iv, tag)
    assert crypto.decrypt(
        key, AES, BlockCipherMode.GCM, ciphertext, iv, aad=aad, tag=tag
    ) == (plaintext)


# -- GCM behavior ---------------------------------------------------------------


def test_gcm_generates_12_byte_iv_and_16_byte_tag():
    key = crypto.generate_symmetric_key(AES, 256)
    ct1, iv1, tag1 = crypto.encrypt(key, AES, BlockCipherMode.GCM, b"secret")
    ct2, iv2, _ = crypto.encrypt(key, AES, BlockCipherMode.GCM, b"secret")
    assert len(iv1) == 12 and len(tag1) == 16
    assert iv1 != iv2 and ct1 != ct2
    assert (
        crypto.decrypt(key, AES, BlockCipherMode.GCM, ct1, iv1, tag=tag1) == b"secret"
    )


@pytest.mark.parametrize("tag_length", [12, 13, 14, 15, 16])
def test_gcm_truncated_tags(tag_length):
    ct, iv, tag = crypto.encrypt(
        GCM_K, AES, BlockCipherMode.GCM, GCM_P, tag_length=tag_length
    )
    assert len(tag) == tag_length
    assert crypto.decrypt(GCM_K, AES, BlockCipherMode.GCM, ct, iv, tag=tag) == GCM_P


@pytest.mark.parametrize("tag_length", [0, 4, 8, 11, 17])
def test_gcm_rejects_short_or_long_tags(tag_length):
    with pytest.raises(CryptoError):
        crypto.encrypt(GCM_K, AES, BlockCipherMode.GCM, GCM_P, tag_length=tag_length)
    with pytest.raises(CryptoError):
        crypto.decrypt(
            GCM_K, AES, BlockCipherMode.GCM, GCM_C, GCM_IV, tag=bytes(tag_length)
        )


@pytest.mark.parametrize("part", ["ciphertext", "tag", "iv", "aad", "key"])
def test_gcm_detects_tampering(part):
    key, iv, aad = bytearray(GCM_K), bytearray(GCM_IV), bytearray(GCM_AAD)
    ct, _, tag = crypto.encrypt(
        bytes(key), AES, BlockCipherMode.GCM, GCM_P, bytes(iv), aad=aad
    )
    ct, tag = bytearray(ct), bytearray(tag)
    {"ciphertext": ct, "tag": tag, "iv": iv, "aad": aad, "key": key}[part][3] ^= 0x04
    with pytest.raises(CryptoError, match="authentication failed"):
        crypto.decrypt(
            bytes(key),
            AES,
            BlockCipherMode.GCM,
            bytes(ct),
            bytes(iv),
            aad=bytes(aad),
            tag=tag,
        )


def test_gcm_requires_tag_and_iv_to_decrypt():
    with pytest.raises(CryptoError):
        crypto.decrypt(GCM_K, AES, BlockCipherMode.GCM, GCM_C, GCM_IV)
    with pytest.raises(CryptoError):
        crypto.decrypt(GCM_K, AES, BlockCipherMode.GCM, GCM_C, None, tag=bytes(16))


def test_gcm_refuses_padding_and_non_aes():
    with pytest.raises(CryptoError):
        crypto.encrypt(
            GCM_K, AES, BlockCipherMode.GCM, b"x", padding=PaddingMethod.PKCS5
        )
    with pytest.raises(CryptoError):
        crypto.encrypt(
            bytes(24), CryptographicAlgorithm.TRIPLE_DES, BlockCipherMode.GCM, b"x"
        )


# -- padding and modes ------------------------------------------------------------


@pytest.mark.parametrize("mode", [BlockCipherMode.CBC, BlockCipherMode.ECB])
@pytest.mark.parametrize("padding", [PaddingMethod.PKCS5, PaddingMethod.ANSI_X923])
def test_padded_modes_round_trip(mode, padding):
    key = crypto.generate_symmetric_key(AES, 128)
    for length in (0, 1, 15, 16, 17, 33):
        data = bytes(range(length))
        ct, iv, _ = crypto.encrypt(key, AES, mode, data, padding=padding)
        assert len(ct) == (length // 16 + 1) * 16
        assert crypto.decrypt(key, AES, mode, ct, iv, padding=padding) == data


@pytest.mark.parametrize("mode", [BlockCipherMode.CBC, BlockCipherMode.ECB])
@pytest.mark.parametrize("padding", [None, PaddingMethod.NONE])
def test_unpadded_modes_need_block_aligned_data(mode, padding):
    key = bytes(16)
    with pytest.raises(CryptoError, match="multiple of the block size"):
        crypto.encrypt(key, AES, mode, bytes(15), padding=padding)
    ct, iv, _ = crypto.encrypt(key, AES, mode, bytes(32), padding=padding)
    with pytest.raises(CryptoError, match="multiple of the block size"):
        crypto.decrypt(key, AES, mode, ct[:-1], iv, padding=padding)


def test_bad_padding_on_decrypt_raises():
    key = bytes(16)
    # Zero plaintext ends in 0x00, which no PKCS#7 padding can.
    ct, iv, _ = crypto.encrypt(key, AES, BlockCipherMode.CBC, bytes(16))
    with pytest.raises(CryptoError, match="invalid padding"):
        crypto.decrypt(
            key, AES, BlockCipherMode.CBC, ct, iv, padding=PaddingMethod.PKCS5
        )


@pytest.mark.parametrize(
    "padding", [PaddingMethod.ZEROS, PaddingMethod.OAEP, PaddingMethod.PSS]
)
def test_unsupported_symmetric_padding(padding):
    with pytest.raises(CryptoError, match="not supported"):
        crypto.encrypt(bytes(16), AES, BlockCipherMode.CBC, bytes(16), padding=padding)


@pytest.mark.parametrize("mode", [BlockCipherMode.CTR, BlockCipherMode.XTS])
def test_stream_modes_refuse_padding(mode):
    with pytest.raises(CryptoError):
        crypto.encrypt(bytes(16), AES, mode, b"abc", padding=PaddingMethod.PKCS5)


@pytest.mark.parametrize(
    "mode",
    [BlockCipherMode.CBC, BlockCipherMode.CTR],
)
def test_iv_modes_check_iv(mode):
    key = bytes(16)
    with pytest.raises(CryptoError):
        crypto.encrypt(key, AES, mode, bytes(16), iv=bytes(12))
    with pytest.raises(CryptoError, match="IV"):
        crypto.decrypt(key, AES, mode, bytes(16), None)
    ct, iv, _ = crypto.encrypt(key, AES, mode, b"0123456789abcdef")
    assert len(iv) == 16
    assert crypto.decrypt(key, AES, mode, ct, iv) == b"0123456789abcdef"


def test_ecb_refuses_iv():
    with pytest.raises(CryptoError, match="no IV"):
        crypto.encrypt(bytes(16), AES, BlockCipherMode.ECB, bytes(16), iv=bytes(16))


def test_non_gcm_modes_refuse_aad_and_tags():
    with pytest.raises(CryptoError):
        crypto.encrypt(bytes(16), AES, BlockCipherMode.CBC, bytes(16), aad=b"aad")
    with pytest.raises(CryptoError):
        crypto.encrypt(bytes(16), AES, BlockCipherMode.CTR, bytes(16), tag_length=16)
    with pytest.raises(CryptoError):
        crypto.decrypt(
            bytes(16), AES, BlockCipherMode.CBC, bytes(16), bytes(16), tag=bytes(16)
        )


@pytest.mark.parametrize(
    "mode",
    [
        BlockCipherMode.PCBC,
        BlockCipherMode.CCM,
        BlockCipherMode.CMAC,
        BlockCipherMode.CFB,
        BlockCipherMode.OFB,
        None,
    ],
)
def test_unsupported_modes(mode):
    with pytest.raises(CryptoError, match="not supported"):
        crypto.encrypt(bytes(16), AES, mode, bytes(16))


_NO_IV_MODES = (
    BlockCipherMode.ECB,
    BlockCipherMode.NIST_KEY_WRAP,
    BlockCipherMode.AES_KEY_WRAP_PADDING,
)


@pytest.mark.parametrize("length", [0, 8, 15, 17, 20, 31, 33, 64])
@pytest.mark.parametrize(
    "mode",
    [
        BlockCipherMode.GCM,
        BlockCipherMode.CBC,
        BlockCipherMode.ECB,
        BlockCipherMode.CTR,
        BlockCipherMode.NIST_KEY_WRAP,
        BlockCipherMode.AES_KEY_WRAP_PADDING,
    ],
)
def test_wrong_aes_key_lengths_rejected(mode, length):
    with pytest.raises(CryptoError, match="AES key"):
        crypto.encrypt(bytes(length), AES, mode, bytes(16))
    iv = (
        None
        if mode in _NO_IV_MODES
        else bytes(12 if mode == BlockCipherMode.GCM else 16)
    )
    tag = bytes(16) if mode == BlockCipherMode.GCM else None
    with pytest.raises(CryptoError, match="AES key"):
        crypto.decrypt(bytes(length), AES, mode, bytes(32), iv, tag=tag)


def test_unsupported_cipher_algorithm():
    with pytest.raises(CryptoError, match="not supported"):
        crypto.encrypt(
            bytes(16), CryptographicAlgorithm.RC4, BlockCipherMode.CBC, bytes(16)
        )


def test_xts_round_trip_and_key_rules():
    key = crypto.random_bytes(64)
    data = crypto.random_bytes(40)
    ct, tweak, _ = crypto.encrypt(key, AES, BlockCipherMode.XTS, data)
    assert len(tweak) == 16 and len(ct) == 40
    assert crypto.decrypt(key, AES, BlockCipherMode.XTS, ct, tweak) == data
    with pytest.raises(CryptoError):
        crypto.encrypt(bytes(16), AES, BlockCipherMode.XTS, data)
    with pytest.raises(CryptoError):  # both halves equal
        crypto.encrypt(bytes(32), AES, BlockCipherMode.XTS, data)
    with pytest.raises(CryptoError):  # shorter than one block
        crypto.encrypt(key, AES, BlockCipherMode.XTS, bytes(15))


def test_triple_des_cbc_round_trip():
    key = crypto.generate_symmetric_key(CryptographicAlgorithm.TRIPLE_DES, 168)
    tdes = CryptographicAlgorithm.TRIPLE_DES
    ct, iv, _ = crypto.encrypt(
        key, tdes, BlockCipherMode.CBC, b"legacy", padding=PaddingMethod.PKCS5
    )
    assert len(iv) == 8 and len(ct) == 8
    assert (
        crypto.decrypt(key, tdes, BlockCipherMode.CBC, ct, iv, PaddingMethod.PKCS5)
        == b"legacy"
    )
    with pytest.raises(CryptoError):
        crypto.encrypt(bytes(16), tdes, BlockCipherMode.CBC, bytes(8))


def test_non_bytes_input_rejected():
    with pytest.raises(CryptoError, match="must be bytes"):
        crypto.encrypt("key", AES, BlockCipherMode.GCM, b"data")
    with pytest.raises(CryptoError, match="must be bytes"):
        crypto.encrypt(bytes(16), AES, BlockCipherMode.GCM, "data")


# -- property: encrypt then decrypt is the identity -------------------------------

_SYMMETRIC_MODES = [
    (BlockCipherMode.GCM, None),
    (BlockCipherMode.CBC, PaddingMethod.PKCS5),
    (BlockCipherMode.CBC, PaddingMethod.ANSI_X923),
    (BlockCipherMode.ECB, PaddingMethod.PKCS5),
    (BlockCipherMode.CTR, None),
    (BlockCipherMode.XTS, None),
    (BlockCipherMode.NIST_KEY_WRAP, None),
    (BlockCipherMode.AES_KEY_WRAP_PADDING, None),
]


@st.composite
def _symmetric_case(draw):
    mode, padding = draw(st.sampled_from(_SYMMETRIC_MODES))
    if mode == BlockCipherMode.XTS:
        key = draw(
            st.sampled_from([32, 64]).flatmap(
                lambda n: st.binary(min_size=n, max_size=n)
            )
        )
        key = key[: len(key) // 2] + bytes(b ^ 0xFF for b in key[len(key) // 2 :])
        data = draw(st.binary(min_size=16, max_size=200))
    else:
        key = draw(
            st.sampled_from([16, 24, 32]).flatmap(
                lambda n: st.binary(min_size=n, max_size=n)
            )
        )
        if mode == BlockCipherMode.NIST_KEY_WRAP:
            data = draw(
                st.integers(2, 25).flatmap(
                    lambda n: st.binary(min_size=8 * n, max_size=8 * n)
                )
            )
        elif mode == BlockCipherMode.AES_KEY_WRAP_PADDING:
            data = draw(st.binary(min_size=1, max_size=200))
        else:
            data = draw(st.binary(max_size=200))
    aad = (
        draw(st.one_of(st.none(), st.binary(max_size=40)))
        if mode == BlockCipherMode.GCM
        else None
    )
    return key, mode, padding, data, aad


@settings(max_examples=150, deadline=None)
@given(_symmetric_case())
def test_encrypt_decrypt_round_trip(case):
    key, mode, padding, data, aad = case
    ciphertext, iv, tag = crypto.encrypt(key, AES, mode, data, padding=padding, aad=aad)
    assert crypto.decrypt(key, AES, mode, ciphertext, iv, padding, aad, tag) == data


# -- RSA encryption and key transport ---------------------------------------------


@pytest.mark.parametrize(
    ("padding", "hashing", "mgf_hash"),
    [
        (PaddingMethod.OAEP, None, None),
        (None, None, None),
        (PaddingMethod.OAEP, HashingAlgorithm.SHA_256, None),
        (PaddingMethod.OAEP, HashingAlgorithm.SHA_256, HashingAlgorithm.SHA_1),
        (PaddingMethod.PKCS1v15, None, None),
    ],
)
def test_rsa_encrypt_round_trip(rsa_key, padding, hashing, mgf_hash):
    private, public = rsa_key
    ct = crypto.rsa_encrypt(public, b"session key", padding, hashing, mgf_hash)
    assert len(ct) == 256
    assert crypto.rsa_decrypt(private, ct, padding, hashing, mgf_hash) == b"session key"


def test_rsa_oaep_parameters_must_match(rsa_key):
    private, public = rsa_key
    ct = crypto.rsa_encrypt(public, b"k", PaddingMethod.OAEP, HashingAlgorithm.SHA_256)
    with pytest.raises(CryptoError, match="decryption failed"):
        crypto.rsa_decrypt(private, ct, PaddingMethod.OAEP, HashingAlgorithm.SHA_1)


def test_rsa_oaep_label_must_match(rsa_key):
    """KMIP's P Source is the OAEP label: decryption needs the same one."""
    private, public = rsa_key
    ct = crypto.rsa_encrypt(public, b"k", PaddingMethod.OAEP, None, None, b"label")
    assert crypto.rsa_decrypt(private, ct, PaddingMethod.OAEP, None, None, b"label") == b"k"
    with pytest.raises(CryptoError, match="decryption failed"):
        crypto.rsa_decrypt(private, ct, PaddingMethod.OAEP, None, None, b"other")
    with pytest.raises(CryptoError, match="only defined for OAEP"):
        crypto.rsa_encrypt(public, b"k", PaddingMethod.PKCS1v15, None, None, b"label")


def test_rsa_encrypt_rejects(rsa_key, ec_key):
    _, public = rsa_key
    with pytest.raises(CryptoError, match="too long"):
        crypto.rsa_encrypt(public, bytes(300))
    with pytest.raises(CryptoError, match="not supported"):
        crypto.rsa_encrypt(public, b"k", PaddingMethod.PSS)
    with pytest.raises(CryptoError, match="not supported"):
        crypto.rsa_encrypt(public, b"k", PaddingMethod.OAEP, HashingAlgorithm.MD5)
    with pytest.raises(CryptoError, match="RSA key"):
        crypto.rsa_encrypt(ec_key[1], b"k")
    with pytest.raises(CryptoError, match="malformed"):
        crypto.rsa_encrypt(b"not a key", b"k")


def test_rsa_wrap_round_trip(rsa_key):
    private, public = rsa_key
    key = crypto.generate_symmetric_key(AES, 256)
    wrapped = crypto.rsa_wrap(public, key)
    assert crypto.rsa_unwrap(private, wrapped) == key
    # The default is OAEP with SHA-1, the KMIP default.
    assert (
        crypto.rsa_decrypt(private, wrapped, PaddingMethod.OAEP, HashingAlgorithm.SHA_1)
        == key
    )
    tampered = bytearray(wrapped)
    tampered[10] ^= 1
    with pytest.raises(CryptoError):
        crypto.rsa_unwrap(private, bytes(tampered))


# -- signatures ------------------------------------------------------------------

RSA_SCHEMES = [
    {
        "digital_signature_algorithm": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION
    },
    {"digital_signature_algorithm": DigitalSignatureAlgorithm.SHA1_WITH_RSA_ENCRYPTION},
    {
        "digital_signature_algorithm": DigitalSignatureAlgorithm.RSASSA_PSS,
        "hashing": HashingAlgorithm.SHA_384,
    },
    {"digital_signature_algorithm": DigitalSignatureAlgorithm.RSASSA_PSS},
    {
        "cryptographic_algorithm": CryptographicAlgorithm.RSA,
        "padding": PaddingMethod.PSS,
        "hashing": HashingAlgorithm.SHA_256,
    },
    {
        "cryptographic_algorithm": CryptographicAlgorithm.RSA,
        "padding": PaddingMethod.PKCS1v15,
        "hashing": HashingAlgorithm.SHA_512,
    },
    {"padding": PaddingMethod.PKCS1v15, "hashing": HashingAlgorithm.SHA_256},
]

EC_SCHEMES = [
    {"digital_signature_algorithm": DigitalSignatureAlgorithm.ECDSA_WITH_SHA256},
    {"digital_signature_algorithm": DigitalSignatureAlgorithm.ECDSA_WITH_SHA384},
    {
        "cryptographic_algorithm": CryptographicAlgorithm.ECDSA,
        "hashing": HashingAlgorithm.SHA_256,
    },
    {
        "cryptographic_algorithm": CryptographicAlgorithm.EC,
        "hashing": HashingAlgorithm.SHA_512,
    },
    {"hashing": HashingAlgorithm.SHA_256, "padding": PaddingMethod.NONE},
]


def _sign_verify_and_tamper(private, public, params):
    message = b"attest this vm"
    signature = crypto.sign(private, message, **params)
    crypto.verify_signature(public, message, signature, **params)
    with pytest.raises(SignatureInvalid):
        crypto.verify_signature(public, message + b".", signature, **params)
    bad = bytearray(signature)
    bad[len(bad) // 2] ^= 0x01
    with pytest.raises(SignatureInvalid):
        crypto.verify_signature(public, message, bytes(bad), **params)
    with pytest.raises(SignatureInvalid):
        crypto.verify_signature(public, message, b"", **params)
    return signature


@pytest.mark.parametrize("params", RSA_SCHEMES)
def test_rsa_sign_verify(rsa_key, params):
    signature = _sign_verify_and_tamper(*rsa_key, params)
    assert len(signature) == 256


@pytest.mark.parametrize("params", EC_SCHEMES)
def test_ecdsa_sign_verify(ec_key, params):
    signature = _sign_verify_and_tamper(*ec_key, params)
    assert signature[0] == 0x30  # DER SEQUENCE


def test_ecdsa_p384_sign_verify():
    private, public, _ = crypto.generate_key_pair(CryptographicAlgorithm.ECDSA, 384)
    _sign_verify_and_tamper(
        private,
        public,
        {"digital_signature_algorithm": DigitalSignatureAlgorithm.ECDSA_WITH_SHA384},
    )


def test_signature_with_other_key_is_invalid(rsa_key):
    other_private, _, _ = crypto.generate_key_pair(CryptographicAlgorithm.RSA, 2048)
    params = {
        "digital_signature_algorithm": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION
    }
    signature = crypto.sign(other_private, b"m", **params)
    with pytest.raises(SignatureInvalid):
        crypto.verify_signature(rsa_key[1], b"m", signature, **params)


def _rsa_public_op(public: bytes, signature: bytes) -> bytes:
    values = crypto.transparent_public_key(public)
    n, e = values["modulus"], values["public_exponent"]
    k = (n.bit_length() + 7) // 8
    return pow(int.from_bytes(signature, "big"), e, n).to_bytes(k, "big")


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out = b""
    counter = 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def test_pss_salt_is_digest_length_and_mgf1_uses_same_hash(rsa_key):
    private, public = rsa_key
    message = b"pss encoding check"
    signature = crypto.sign(
        private,
        message,
        digital_signature_algorithm=DigitalSignatureAlgorithm.RSASSA_PSS,
        hashing=HashingAlgorithm.SHA_384,
    )
    # RFC 8017, 9.1.2: EM = maskedDB || H || 0xbc, DB = PS || 0x01 || salt.
    # With a 2048-bit modulus emBits is 2047: emLen is 256 and the top bit
    # of EM is cleared.
    em = _rsa_public_op(public, signature)
    assert em[0] & 0x80 == 0 and em[-1] == 0xBC
    h_len = 48
    masked_db, digest_h = em[: -h_len - 1], em[-h_len - 1 : -1]
    db = bytes(
        a ^ b
        for a, b in zip(
            masked_db, _mgf1(digest_h, len(masked_db), "sha384"), strict=True
        )
    )
    db = bytes([db[0] & 0x7F]) + db[1:]
    separator = db.index(b"\x01")
    assert db[:separator] == bytes(separator)
    salt = db[separator + 1 :]
    assert len(salt) == h_len
    m_hash = hashlib.sha384(message).digest()
    assert hashlib.sha384(bytes(8) + m_hash + salt).digest() == digest_h


def test_pkcs1v15_signature_encoding(rsa_key):
    private, public = rsa_key
    message = b"pkcs1 encoding check"
    signature = crypto.sign(
        private,
        message,
        cryptographic_algorithm=CryptographicAlgorithm.RSA,
        padding=PaddingMethod.PKCS1v15,
        hashing=HashingAlgorithm.SHA_256,
    )
    # RFC 8017, 9.2: 0x00 0x01 FF..FF 0x00 DigestInfo(SHA-256, H).
    digest_info = (
        h("3031300d060960864801650304020105000420") + hashlib.sha256(message).digest()
    )
    em = _rsa_public_op(public, signature)
    assert (
        em
        == b"\x00\x01" + b"\xff" * (256 - 3 - len(digest_info)) + b"\x00" + digest_info
    )


@pytest.mark.parametrize(
    ("key_fixture", "params"),
    [
        (
            "rsa_key",
            {"digital_signature_algorithm": DigitalSignatureAlgorithm.RSASSA_PSS},
        ),
        (
            "rsa_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION
            },
        ),
        (
            "ec_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.ECDSA_WITH_SHA256
            },
        ),
    ],
)
def test_prehashed_signing(request, key_fixture, params):
    private, public = request.getfixturevalue(key_fixture)
    message = b"hash me elsewhere"
    message_digest = hashlib.sha256(message).digest()
    signature = crypto.sign(private, message_digest, prehashed=True, **params)
    crypto.verify_signature(public, message, signature, **params)
    signature = crypto.sign(private, message, **params)
    crypto.verify_signature(public, message_digest, signature, prehashed=True, **params)
    with pytest.raises(CryptoError, match="digest length"):
        crypto.sign(private, message_digest[:20], prehashed=True, **params)


@pytest.mark.parametrize(
    ("key_fixture", "params"),
    [
        # Parameters that contradict the Digital Signature Algorithm.
        (
            "rsa_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION,
                "hashing": HashingAlgorithm.SHA_1,
            },
        ),
        (
            "rsa_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION,
                "padding": PaddingMethod.PSS,
            },
        ),
        (
            "rsa_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION,
                "cryptographic_algorithm": CryptographicAlgorithm.ECDSA,
            },
        ),
        # Key and algorithm disagree.
        (
            "ec_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.SHA256_WITH_RSA_ENCRYPTION
            },
        ),
        (
            "rsa_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.ECDSA_WITH_SHA256
            },
        ),
        (
            "ec_key",
            {
                "cryptographic_algorithm": CryptographicAlgorithm.RSA,
                "padding": PaddingMethod.PSS,
                "hashing": HashingAlgorithm.SHA_256,
            },
        ),
        # Incomplete or unsupported parameters.
        ("rsa_key", {}),
        (
            "rsa_key",
            {
                "cryptographic_algorithm": CryptographicAlgorithm.RSA,
                "hashing": HashingAlgorithm.SHA_256,
            },
        ),
        (
            "rsa_key",
            {"padding": PaddingMethod.OAEP, "hashing": HashingAlgorithm.SHA_256},
        ),
        ("ec_key", {"hashing": HashingAlgorithm.SHA_256, "padding": PaddingMethod.PSS}),
        (
            "rsa_key",
            {
                "digital_signature_algorithm": DigitalSignatureAlgorithm.MD5_WITH_RSA_ENCRYPTION
            },
        ),
        (
            "rsa_key",
            {"digital_signature_algorithm": DigitalSignatureAlgorithm.DSA_WITH_SHA256},
        ),
        (
            "rsa_key",
            {"padding": PaddingMethod.PKCS1v15, "hashing": HashingAlgorithm.MD5},
        ),
    ],
)
def test_bad_signature_parameters_raise_crypto_error(request, key_fixture, params):
    private, public = request.getfixturevalue(key_fixture)
    with pytest.raises(CryptoError) as info:
        crypto.sign(private, b"m", **params)
    assert not isinstance(info.value, SignatureInvalid)
    with pytest.raises(CryptoError) as info:
        crypto.verify_signature(public, b"m", bytes(64), **params)
    assert not isinstance(info.value, SignatureInvalid)


def test_sign_with_malformed_key():
    with pytest.raises(CryptoError, match="malformed"):
        crypto.sign(b"\x30\x00", b"m", hashing=HashingAlgorithm.SHA_256)


# -- format conversion ---------------------------------------------------------------


def test_rsa_private_pkcs1_pkcs8_round_trip(rsa_key):
    private, _ = rsa_key
    assert crypto.export_private_key(private, KeyFormatType.PKCS_8) == private
    pkcs1 = crypto.export_private_key(private, KeyFormatType.PKCS_1)
    assert pkcs1 != private
    assert crypto.import_private_key(pkcs1, KeyFormatType.PKCS_1) == (
        private,
        CryptographicAlgorithm.RSA,
        2048,
    )
    assert crypto.import_private_key(private, KeyFormatType.PKCS_8)[0] == private


def test_private_key_pem_is_tolerated(rsa_key, ec_key):
    for der, label, fmt in (
        (rsa_key[0], "PRIVATE KEY", KeyFormatType.PKCS_8),
        (
            crypto.export_private_key(rsa_key[0], KeyFormatType.PKCS_1),
            "RSA PRIVATE KEY",
            KeyFormatType.PKCS_1,
        ),
        (
            crypto.export_private_key(ec_key[0], KeyFormatType.EC_PRIVATE_KEY),
            "EC PRIVATE KEY",
            KeyFormatType.EC_PRIVATE_KEY,
        ),
    ):
        pkcs8, _, _ = crypto.import_private_key(_pem(der, label), fmt)
        assert crypto.public_from_private(pkcs8) in (rsa_key[1], ec_key[1])


def test_ec_private_key_round_trip(ec_key):
    private, _ = ec_key
    sec1 = crypto.export_private_key(private, KeyFormatType.EC_PRIVATE_KEY)
    assert crypto.import_private_key(sec1, KeyFormatType.EC_PRIVATE_KEY) == (
        private,
        CryptographicAlgorithm.EC,
        256,
    )


def test_export_private_key_rejects(rsa_key, ec_key):
    with pytest.raises(CryptoError, match="only for RSA"):
        crypto.export_private_key(ec_key[0], KeyFormatType.PKCS_1)
    with pytest.raises(CryptoError, match="only for EC"):
        crypto.export_private_key(rsa_key[0], KeyFormatType.EC_PRIVATE_KEY)
    for fmt in (KeyFormatType.RAW, KeyFormatType.X_509, KeyFormatType.PKCS_12):
        with pytest.raises(CryptoError, match="not supported"):
            crypto.export_private_key(rsa_key[0], fmt)
    with pytest.raises(CryptoError, match="transparent_private_key"):
        crypto.export_private_key(rsa_key[0], KeyFormatType.TRANSPARENT_RSA_PRIVATE_KEY)


def test_import_private_key_rejects(rsa_key, ec_key):
    with pytest.raises(CryptoError, match="malformed"):
        crypto.import_private_key(b"\x30\x03\x02\x01\x00", KeyFormatType.PKCS_8)
    with pytest.raises(CryptoError, match="malformed"):
        crypto.import_private_key(
            b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
            KeyFormatType.PKCS_8,
        )
    with pytest.raises(CryptoError, match="only for RSA"):
        crypto.import_private_key(ec_key[0], KeyFormatType.PKCS_1)
    with pytest.raises(CryptoError, match="not supported"):
        crypto.import_private_key(rsa_key[0], KeyFormatType.RAW)
    with pytest.raises(CryptoError, match="malformed"):
        crypto.import_private_key(rsa_key[1], KeyFormatType.PKCS_8)  # a public key


def test_public_key_formats_round_trip(rsa_key, ec_key):
    _, public = rsa_key
    assert crypto.export_public_key(public, KeyFormatType.X_509) == public
    pkcs1 = crypto.export_public_key(public, KeyFormatType.PKCS_1)
    assert pkcs1 != public
    assert crypto.import_public_key(pkcs1, KeyFormatType.PKCS_1) == (
        public,
        CryptographicAlgorithm.RSA,
        2048,
    )
    assert (
        crypto.import_public_key(_pem(pkcs1, "RSA PUBLIC KEY"), KeyFormatType.PKCS_1)[0]
        == public
    )
    assert (
        crypto.import_public_key(_pem(public, "PUBLIC KEY"), KeyFormatType.X_509)[0]
        == public
    )
    assert crypto.import_public_key(ec_key[1], KeyFormatType.X_509) == (
        ec_key[1],
        CryptographicAlgorithm.EC,
        256,
    )


def test_public_key_format_rejects(ec_key):
    with pytest.raises(CryptoError, match="only for RSA"):
        crypto.export_public_key(ec_key[1], KeyFormatType.PKCS_1)
    with pytest.raises(CryptoError, match="only for RSA"):
        crypto.import_public_key(ec_key[1], KeyFormatType.PKCS_1)
    with pytest.raises(CryptoError, match="not supported"):
        crypto.export_public_key(ec_key[1], KeyFormatType.PKCS_8)
    with pytest.raises(CryptoError, match="transparent_public_key"):
        crypto.export_public_key(ec_key[1], KeyFormatType.TRANSPARENT_EC_PUBLIC_KEY)
    with pytest.raises(CryptoError, match="malformed"):
        crypto.import_public_key(b"garbage", KeyFormatType.X_509)


def test_transparent_rsa_private_key_reconstructs_same_key(rsa_key):
    private, _ = rsa_key
    values = crypto.transparent_private_key(private)
    assert set(values) == {
        "modulus",
        "private_exponent",
        "public_exponent",
        "p",
        "q",
        "prime_exponent_p",
        "prime_exponent_q",
        "crt_coefficient",
    }
    p, q, d = values["p"], values["q"], values["private_exponent"]
    assert values["prime_exponent_p"] == d % (p - 1)
    assert values["prime_exponent_q"] == d % (q - 1)
    assert values["crt_coefficient"] * q % p == 1
    assert crypto.import_transparent_private_key(values) == (
        private,
        CryptographicAlgorithm.RSA,
        2048,
    )
    # KMIP allows only modulus and the exponents; the primes are recovered.
    minimal = {k: values[k] for k in ("modulus", "public_exponent", "private_exponent")}
    assert crypto.import_transparent_private_key(minimal)[0] == private
    inconsistent = dict(values, p=values["p"] + 2)
    with pytest.raises(CryptoError):
        crypto.import_transparent_private_key(inconsistent)
    with pytest.raises(CryptoError):
        crypto.import_transparent_private_key({"modulus": values["modulus"]})


def test_transparent_rsa_public_key(rsa_key):
    private, public = rsa_key
    values = crypto.transparent_public_key(public)
    assert values == {
        "modulus": crypto.transparent_private_key(private)["modulus"],
        "public_exponent": 65537,
    }
    assert crypto.import_transparent_public_key(values) == (
        public,
        CryptographicAlgorithm.RSA,
        2048,
    )


# NIST P-256 domain parameters (FIPS 186-4, D.1.2.3).
P256_P = 2**256 - 2**224 + 2**192 + 2**96 - 1
P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B


def test_transparent_ec_keys_reconstruct_same_key(ec_key):
    private, public = ec_key
    private_values = crypto.transparent_private_key(private)
    assert set(private_values) == {"recommended_curve", "d"}
    assert private_values["recommended_curve"] == RecommendedCurve.P_256
    assert crypto.import_transparent_private_key(private_values) == (
        private,
        CryptographicAlgorithm.EC,
        256,
    )
    public_values = crypto.transparent_public_key(public)
    assert public_values["recommended_curve"] == RecommendedCurve.P_256
    q = public_values["q_string"]
    assert len(q) == 65 and q[0] == 0x04
    x, y = int.from_bytes(q[1:33], "big"), int.from_bytes(q[33:], "big")
    assert (y * y - (x**3 - 3 * x + P256_B)) % P256_P == 0
    assert crypto.import_transparent_public_key(public_values)[0] == public
    # y with its lowest bit flipped: never on the curve (only y and p - y are),
    # whatever the generated key's last byte is (b"\x00" was when it was 0x00).
    off_curve = q[:-1] + bytes([q[-1] ^ 1])
    assert (int.from_bytes(off_curve[33:], "big") + y) % P256_P != 0
    with pytest.raises(CryptoError):
        crypto.import_transparent_public_key(dict(public_values, q_string=off_curve))
    with pytest.raises(CryptoError, match="not supported"):
        crypto.import_transparent_private_key(
            dict(private_values, recommended_curve=RecommendedCurve.K_163)
        )


# -- certificates ------------------------------------------------------------------

# A self-signed P-256 certificate made for this test.
TEST_CERT_PEM = b"""-----BEGIN CERTIFICATE-----
MIIBPjCB5KADAgECAggSNFZ4kKvN7zAKBggqhkjOPQQDAjAlMREwDwYDVQQDDAhr
bXMgdGVzdDEQMA4GA1UECgwHRXhhbXBsZTAeFw0yNDAxMDEwMDAwMDBaFw00NDAx
MDEwMDAwMDBaMCUxETAPBgNVBAMMCGttcyB0ZXN0MRAwDgYDVQQKDAdFeGFtcGxl
MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEYSdi1obMWKzGBnK1i7zWVrEr1ygW
g2QcPnbJLYVTZ0WLPRzIhiVBMlssMD/Jka6MZ2TOJjG+b0a1op4/obJ10zAKBggq
hkjOPQQDAgNJADBGAiEAk8MHfZ7DqoVcbZ8wUhpZ1lZSKamjd/ZVLC3nTHevxeQC
IQC1PAdwHPIIsVJFqJb8ekSk3ur3qRSuxBBt1SSwHtHFdg==
-----END CERTIFICATE-----
"""


def test_parse_certificate():
    der = _pem_to_der(TEST_CERT_PEM)
    info = crypto.parse_certificate(der)
    utc = datetime.UTC
    assert info["subject"] == "O=Example,CN=kms test"
    assert info["issuer"] == "O=Example,CN=kms test"
    assert info["serial_number"] == 0x1234567890ABCDEF
    assert info["not_before"] == datetime.datetime(2024, 1, 1, tzinfo=utc)
    assert info["not_after"] == datetime.datetime(2044, 1, 1, tzinfo=utc)
    assert info["algorithm"] == CryptographicAlgorithm.EC
    assert info["length_bits"] == 256
    assert info["digest_sha256"] == hashlib.sha256(der).digest()
    assert info["public_key_spki_der"] in der
    spki = info["public_key_spki_der"]
    assert crypto.import_public_key(spki, KeyFormatType.X_509)[0] == spki
    assert crypto.parse_certificate(TEST_CERT_PEM) == info


@pytest.mark.parametrize("data", [b"", b"garbage", b"\x30\x03\x02\x01\x00", "text"])
def test_parse_certificate_rejects_garbage(data):
    with pytest.raises(CryptoError):
        crypto.parse_certificate(data)


def test_parse_certificate_rejects_truncated():
    der = _pem_to_der(TEST_CERT_PEM)
    with pytest.raises(CryptoError):
        crypto.parse_certificate(der[:-10])


# ChaCha20 and ChaCha20-Poly1305 (KMIP 2.0; vectors of RFC 8439 and of the
# OASIS profile test cases CS-BC-M-CHACHA20-*).
@pytest.mark.parametrize(
    ("nonce", "keystream"),
    [
        (bytes(8), "76b8e0ada0f13d90405d6ae55386bd28"),
        (bytes.fromhex("0000000000000001"), "de9cba7bf3d69ef5e786dc63973f653a"),
        (bytes(12), "76b8e0ada0f13d90405d6ae55386bd28"),
    ],
)
def test_chacha20_keystream(nonce, keystream):
    ct, iv, tag = crypto.encrypt(bytes(32), CryptographicAlgorithm.CHACHA20, None, bytes(16), iv=nonce)
    assert (ct.hex(), iv, tag) == (keystream, nonce, None)
    assert crypto.decrypt(bytes(32), CryptographicAlgorithm.CHACHA20, None, ct, iv=nonce) == bytes(16)


_RFC8439_KEY = bytes(range(0x80, 0xA0))
_RFC8439_NONCE = bytes.fromhex("070000004041424344454647")
_RFC8439_AAD = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
_RFC8439_TEXT = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it."


def test_chacha20_poly1305_rfc8439_vector_and_truncated_tags():
    algorithm = CryptographicAlgorithm.CHACHA20_POLY1305
    ct, _, tag = crypto.encrypt(
        _RFC8439_KEY, algorithm, BlockCipherMode.AEAD, _RFC8439_TEXT, iv=_RFC8439_NONCE, aad=_RFC8439_AAD
    )
    assert ct[:6].hex() == "d31a8d34648e" and tag.hex() == "1ae10b594f09e26a7e902ecbd0600691"
    for length in (16, 12):
        assert (
            crypto.decrypt(_RFC8439_KEY, algorithm, None, ct, iv=_RFC8439_NONCE, aad=_RFC8439_AAD, tag=tag[:length])
            == _RFC8439_TEXT
        )
    bad = bytes([tag[0] ^ 1]) + tag[1:12]
    with pytest.raises(CryptoError, match="authentication failed"):
        crypto.decrypt(_RFC8439_KEY, algorithm, None, ct, iv=_RFC8439_NONCE, aad=_RFC8439_AAD, tag=bad)
    with pytest.raises(CryptoError, match="12 to 16"):
        crypto.encrypt(_RFC8439_KEY, algorithm, None, b"x", iv=_RFC8439_NONCE, tag_length=8)


# -- multi-part encryption (CipherStream) --------------------------------------


@pytest.mark.parametrize(
    "mode, padding, size",
    [
        (BlockCipherMode.GCM, None, 45),
        (BlockCipherMode.CTR, None, 45),
        (BlockCipherMode.CBC, PaddingMethod.PKCS5, 45),
        (BlockCipherMode.CBC, None, 48),
        (BlockCipherMode.ECB, PaddingMethod.PKCS5, 45),
    ],
)
def test_cipher_stream_in_parts_equals_the_one_shot_result(mode, padding, size):
    key, data = os.urandom(32), os.urandom(size)
    aad = b"header" if mode == BlockCipherMode.GCM else None
    enc = crypto.CipherStream(key, CryptographicAlgorithm.AES, mode, decrypting=False, padding=padding, aad=aad)
    ciphertext = b"".join(enc.update(data[i : i + 7]) for i in range(0, size, 7))
    rest, tag = enc.finalize()
    ciphertext += rest
    whole, _, whole_tag = crypto.encrypt(
        key, CryptographicAlgorithm.AES, mode, data, iv=enc.iv, padding=padding, aad=aad
    )
    assert ciphertext == whole and tag == whole_tag
    dec = crypto.CipherStream(
        key, CryptographicAlgorithm.AES, mode, decrypting=True, iv=enc.iv, padding=padding, aad=aad
    )
    plaintext = b"".join(dec.update(ciphertext[i : i + 5]) for i in range(0, len(ciphertext), 5))
    assert plaintext + dec.finalize(tag)[0] == data


def test_cipher_stream_gcm_checks_the_tag_at_the_end():
    key = os.urandom(16)
    enc = crypto.CipherStream(key, CryptographicAlgorithm.AES, BlockCipherMode.GCM, decrypting=False)
    ciphertext = enc.update(b"secret") + enc.finalize()[0]
    dec = crypto.CipherStream(key, CryptographicAlgorithm.AES, BlockCipherMode.GCM, decrypting=True, iv=enc.iv)
    dec.update(ciphertext)
    with pytest.raises(crypto.CryptoError, match="authentication failed"):
        dec.finalize(bytes(16))
    dec = crypto.CipherStream(key, CryptographicAlgorithm.AES, BlockCipherMode.GCM, decrypting=True, iv=enc.iv)
    with pytest.raises(crypto.CryptoError, match="12 to 16"):
        dec.finalize(None)


def test_cipher_stream_refuses_what_it_cannot_do():
    key = os.urandom(32)
    for mode in (BlockCipherMode.XTS, BlockCipherMode.NIST_KEY_WRAP):
        with pytest.raises(crypto.CryptoError, match="not supported"):
            crypto.CipherStream(key, CryptographicAlgorithm.AES, mode, decrypting=False)
    with pytest.raises(crypto.CryptoError, match="not supported"):
        crypto.CipherStream(key, CryptographicAlgorithm.CHACHA20_POLY1305, None, decrypting=False)
    with pytest.raises(crypto.CryptoError, match="needs the IV"):
        crypto.CipherStream(key, CryptographicAlgorithm.AES, BlockCipherMode.CBC, decrypting=True)
    # CBC without padding: the parts must end on a whole block.
    enc = crypto.CipherStream(key, CryptographicAlgorithm.AES, BlockCipherMode.CBC, decrypting=False)
    enc.update(bytes(20))
    with pytest.raises(crypto.CryptoError, match="whole block"):
        enc.finalize()
