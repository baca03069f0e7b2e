"""The broker's side of a host TPM's proofs: TPM 2.0 structures parsed and checked in Python.

Nothing here trusts the host. Every parser reads untrusted bytes and raises
`Tpm2Error` (a ValueError) with one line on anything it does not accept:
truncation, trailing bytes, a wrong magic, an unknown algorithm, a size
that lies. `QuoteError` is for what is well formed but not acceptable.

What follows which part of the TCG's "Trusted Platform Module Library"
(TPM 2.0, revision 1.59):

- `parse_public`: Part 2, 12.2.5 TPM2B_PUBLIC and 12.2.4 TPMT_PUBLIC
  (type, nameAlg, 8.3 TPMA_OBJECT, authPolicy, 12.2.3.7 TPMU_PUBLIC_PARMS,
  12.2.3.2 TPMU_PUBLIC_ID); the Name is Part 1, 16 "Names" (nameAlg ||
  H_nameAlg(TPMT_PUBLIC)). `TpmPublic.attestation_key_problem` follows
  Part 1, 25.2 (a restricted signing key: only what the TPM produced
  itself carries TPM_GENERATED_VALUE, so a quote signed by it is real).
- `make_credential`: TPM2_MakeCredential in software, Part 3, 12.6, with
  the protection of Part 1, 24 "Credential Protection": a seed
  RSA-OAEP-encrypted to the EK with label "IDENTITY" (Part 1, annex B.10.3),
  KDFa (Part 1, 11.4.10.2) "STORAGE" and "INTEGRITY", AES-CFB with a zero
  IV (Part 1, 24.4) and the outer HMAC over encIdentity || Name (24.5).
- `parse_quote`: Part 2, 10.12.12 TPMS_ATTEST with 10.12.1 TPM_GENERATED,
  10.11.1 TPMS_CLOCK_INFO, 10.12.4 TPMS_QUOTE_INFO and 10.9.7
  TPML_PCR_SELECTION.
- `verify_quote`: Part 2, 11.3.4 TPMT_SIGNATURE (RSASSA, RSAPSS, ECDSA),
  checked over the TPMS_ATTEST bytes as TPM2_Quote (Part 3, 18.4) signed
  them.
- `pcr_digest`: Part 3, 18.4.1: the digest of the selected PCRs'
  values concatenated in ascending order.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

try:  # cryptography 47 moved CFB among the "decrepit" modes; TPM 2.0 credentials still use it.
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # pragma: no cover - older cryptography
    from cryptography.hazmat.primitives.ciphers.modes import CFB

__all__ = [
    "PCR_BANKS",
    "QuoteError",
    "Quote",
    "Tpm2Error",
    "TpmPublic",
    "digest_size",
    "ek_public_from_pem",
    "kdfa",
    "make_credential",
    "parse_public",
    "parse_quote",
    "pcr_digest",
    "spki_fingerprint",
    "verify_quote",
]

# Part 2, 6.3 TPM_ALG_ID.
_HASHES: dict[int, str] = {0x0004: "sha1", 0x000B: "sha256", 0x000C: "sha384", 0x000D: "sha512"}
_HASH_IDS = {name: alg for alg, name in _HASHES.items()}
_DIGEST_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}
# The PCR banks a quote and a policy may name.
PCR_BANKS = tuple(_DIGEST_SIZES)
_ALG_RSA, _ALG_ECC, _ALG_NULL = 0x0001, 0x0023, 0x0010
_ALG_AES = 0x0006
_SYM_ALGS = {_ALG_AES: "aes", 0x0013: "sm4", 0x0026: "camellia"}
_SYM_MODES = {0x0040: "ctr", 0x0041: "ofb", 0x0042: "cbc", 0x0043: "cfb", 0x0044: "ecb"}
# Asymmetric schemes and the bytes of their details (Part 2, 11.2.3.5 TPMU_ASYM_SCHEME):
# a hashAlg for most, a hashAlg and a count for ECDAA, nothing for RSAES.
_SCHEMES: dict[int, tuple[str, int]] = {
    0x0014: ("rsassa", 2),
    0x0016: ("rsapss", 2),
    0x0015: ("rsaes", 0),
    0x0017: ("oaep", 2),
    0x0018: ("ecdsa", 2),
    0x0019: ("ecdh", 2),
    0x001A: ("ecdaa", 4),
    0x001B: ("sm2", 2),
    0x001C: ("ecschnorr", 2),
    0x0060: ("ecmqv", 2),
}
_SIGNING_SCHEMES = {"rsassa", "rsapss", "ecdsa"}
# Part 2, 11.2.5.2 TPMT_KDF_SCHEME: MGF1, KDF1_SP800_56A, KDF2, KDF1_SP800_108, each with a hashAlg.
_KDFS = {0x0007: "mgf1", 0x0020: "kdf1_sp800_56a", 0x0021: "kdf2", 0x0022: "kdf1_sp800_108"}
# Part 2, 6.4 TPM_ECC_CURVE.
_CURVES: dict[int, ec.EllipticCurve] = {0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(), 0x0005: ec.SECP521R1()}
_MAX_RSA_BYTES = 512  # MAX_RSA_KEY_BYTES for 4096-bit keys
_MAX_ECC_BYTES = 66  # MAX_ECC_KEY_BYTES for P-521

# Part 2, 8.3 TPMA_OBJECT.
FIXED_TPM = 1 << 1
ST_CLEAR = 1 << 2
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
ADMIN_WITH_POLICY = 1 << 7
NO_DA = 1 << 10
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18
_ATTRIBUTE_NAMES = {
    FIXED_TPM: "fixedTPM",
    FIXED_PARENT: "fixedParent",
    SENSITIVE_DATA_ORIGIN: "sensitiveDataOrigin",
    RESTRICTED: "restricted",
    SIGN: "sign",
    DECRYPT: "decrypt",
}

_TPM_GENERATED_VALUE = 0xFF544347  # Part 2, 6.2: "\xffTCG"
_TPM_ST_ATTEST_QUOTE = 0x8018  # Part 2, 6.9
_MAX_PCR_SELECT = 4  # sizeofSelect: 3 bytes for 24 PCRs; 4 allows a TPM with 32
_MAX_NAME = 2 + 64
_MAX_DATA = 2 + 64  # TPM2B_DATA: sizeof(TPMT_HA)
_CREDENTIAL_LABEL = b"IDENTITY\0"


class Tpm2Error(ValueError):
    """A TPM 2.0 structure that does not parse: one line saying what is wrong with it."""


class QuoteError(Tpm2Error):
    """A well-formed quote, signature or key that is not acceptable (bad signature, wrong type)."""


class _Reader:
    """Reads big-endian TPM fields from untrusted bytes; every failure is a Tpm2Error naming `what`."""

    def __init__(self, data: bytes, what: str) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise Tpm2Error(f"{what}: expected bytes, not {type(data).__name__}")
        self.data = bytes(data)
        self.what = what
        self.pos = 0

    def take(self, size: int, field: str) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise Tpm2Error(
                f"{self.what} is truncated: {field} needs {size} bytes at offset {self.pos}, "
                f"{len(self.data) - self.pos} left"
            )
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int.from_bytes(self.take(2, field), "big")

    def u32(self, field: str) -> int:
        return int.from_bytes(self.take(4, field), "big")

    def u64(self, field: str) -> int:
        return int.from_bytes(self.take(8, field), "big")

    def tpm2b(self, field: str, maximum: int) -> bytes:
        size = self.u16(f"the size of {field}")
        if size > maximum:
            raise Tpm2Error(f"{self.what}: {field} claims {size} bytes, more than the {maximum} it may hold")
        return self.take(size, field)

    def hash_alg(self, field: str) -> str:
        alg = self.u16(field)
        if alg not in _HASHES:
            raise Tpm2Error(f"{self.what}: unknown or unsupported hash algorithm {alg:#06x} in {field}")
        return _HASHES[alg]

    def end(self) -> None:
        if self.pos != len(self.data):
            raise Tpm2Error(f"{self.what} has {len(self.data) - self.pos} trailing bytes after offset {self.pos}")


_HASH_ALGORITHMS: dict[str, hashes.HashAlgorithm] = {
    "sha1": hashes.SHA1(),
    "sha256": hashes.SHA256(),
    "sha384": hashes.SHA384(),
    "sha512": hashes.SHA512(),
}


# --- public areas ------------------------------------------------------------------------


@dataclass(frozen=True)
class TpmPublic:
    """A key's TPMT_PUBLIC, parsed: what the broker needs to check and use it."""

    raw: bytes
    key_type: str
    name_alg: str
    object_attributes: int
    public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey = field(repr=False)
    name: bytes
    scheme: tuple[str, str] | None  # (scheme, hash), e.g. ("rsassa", "sha256"); None for TPM_ALG_NULL
    auth_policy: bytes = b""
    symmetric: tuple[str, int, str] | None = None  # (algorithm, key bits, mode) of a storage key

    def attestation_key_problem(self) -> str | None:
        """None when this is a usable attestation key: fixedTPM, fixedParent, sensitiveDataOrigin,
        restricted, sign set; decrypt clear; userWithAuth may be anything. Else one line saying why not."""
        missing = [
            name for bit, name in _ATTRIBUTE_NAMES.items() if bit != DECRYPT and not self.object_attributes & bit
        ]
        if missing:
            return f"not an attestation key: {', '.join(missing)} not set"
        if self.object_attributes & DECRYPT:
            return "not an attestation key: decrypt is set (an attestation key only signs)"
        if self.scheme is not None and self.scheme[0] not in _SIGNING_SCHEMES:
            return f"not an attestation key the broker verifies: its scheme is {self.scheme[0]}, not RSASSA, RSAPSS or ECDSA"
        if isinstance(self.public_key, rsa.RSAPublicKey) and self.public_key.key_size < 2048:
            return f"too weak an attestation key: RSA {self.public_key.key_size} (2048 bits at least)"
        return None

    def public_pem(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def fingerprint(self) -> str:
        """Hex SHA-256 of the SubjectPublicKeyInfo DER, as for keys given in PEM."""
        return spki_fingerprint(self.public_key)


def spki_fingerprint(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """Hex SHA-256 of a public key's SubjectPublicKeyInfo DER: how the broker
    pins a host TPM's EK, and how the host shows it."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def parse_public(data: bytes) -> TpmPublic:
    """A TPM2B_PUBLIC (2-byte size, then TPMT_PUBLIC) as tpm2_createak -u and tpm2_readpublic -o write it."""
    outer = _Reader(data, "the TPM public area")
    raw = outer.tpm2b("TPMT_PUBLIC", 0xFFFF)
    outer.end()
    r = _Reader(raw, "the TPM public area")
    key_alg = r.u16("type")
    name_alg = r.hash_alg("nameAlg")
    attributes = r.u32("objectAttributes")
    auth_policy = r.tpm2b("authPolicy", 64)
    if auth_policy and len(auth_policy) != _DIGEST_SIZES[name_alg]:
        raise Tpm2Error(f"the TPM public area: authPolicy is {len(auth_policy)} bytes, not a {name_alg} digest")
    symmetric = _sym_def(r)
    scheme = _scheme(r)
    key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey
    if key_alg == _ALG_RSA:
        key_type = "rsa"
        key_bits = r.u16("keyBits")
        exponent = r.u32("exponent") or 65537
        modulus = r.tpm2b("the RSA modulus", _MAX_RSA_BYTES)
        if key_bits not in (1024, 2048, 3072, 4096) or len(modulus) * 8 != key_bits:
            raise Tpm2Error(f"the TPM public area: an RSA modulus of {len(modulus)} bytes for keyBits {key_bits}")
        try:
            key = rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
        except ValueError:
            raise Tpm2Error("the TPM public area holds an invalid RSA public key") from None
    elif key_alg == _ALG_ECC:
        key_type = "ecc"
        curve_id = r.u16("curveID")
        kdf = r.u16("kdf")
        if kdf != _ALG_NULL:
            if kdf not in _KDFS:
                raise Tpm2Error(f"the TPM public area: unknown KDF {kdf:#06x}")
            r.hash_alg("the KDF's hashAlg")
        x = r.tpm2b("the ECC point's x", _MAX_ECC_BYTES)
        y = r.tpm2b("the ECC point's y", _MAX_ECC_BYTES)
        if curve_id not in _CURVES:
            raise Tpm2Error(f"the TPM public area: unknown or unsupported ECC curve {curve_id:#06x}")
        curve = _CURVES[curve_id]
        try:
            key = ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve).public_key()
        except (ValueError, UnsupportedAlgorithm):
            raise Tpm2Error(f"the TPM public area holds a point that is not on {curve.name}") from None
    else:
        raise Tpm2Error(f"the TPM public area: unsupported key type {key_alg:#06x} (only RSA and ECC keys)")
    r.end()
    if scheme is not None and scheme[0] in ("rsassa", "rsapss", "rsaes", "oaep") and key_type != "rsa":
        raise Tpm2Error(f"the TPM public area: an {key_type} key with the RSA scheme {scheme[0]}")
    if scheme is not None and scheme[0] not in ("rsassa", "rsapss", "rsaes", "oaep") and key_type != "ecc":
        raise Tpm2Error(f"the TPM public area: an {key_type} key with the ECC scheme {scheme[0]}")
    name = struct.pack(">H", _HASH_IDS[name_alg]) + hashlib.new(name_alg, raw).digest()
    return TpmPublic(
        raw=raw,
        key_type=key_type,
        name_alg=name_alg,
        object_attributes=attributes,
        public_key=key,
        name=name,
        scheme=scheme,
        auth_policy=auth_policy,
        symmetric=symmetric,
    )


def _sym_def(r: _Reader) -> tuple[str, int, str] | None:
    alg = r.u16("the symmetric algorithm")
    if alg == _ALG_NULL:
        return None
    if alg not in _SYM_ALGS:
        raise Tpm2Error(f"{r.what}: unknown symmetric algorithm {alg:#06x}")
    bits = r.u16("the symmetric key bits")
    if bits not in (128, 192, 256):
        raise Tpm2Error(f"{r.what}: a symmetric key of {bits} bits")
    mode = r.u16("the symmetric mode")
    if mode not in _SYM_MODES:
        raise Tpm2Error(f"{r.what}: unknown symmetric mode {mode:#06x}")
    return _SYM_ALGS[alg], bits, _SYM_MODES[mode]


def _scheme(r: _Reader) -> tuple[str, str] | None:
    alg = r.u16("the scheme")
    if alg == _ALG_NULL:
        return None
    if alg not in _SCHEMES:
        raise Tpm2Error(f"{r.what}: unknown scheme {alg:#06x}")
    name, detail = _SCHEMES[alg]
    if detail == 0:
        return name, ""
    hash_alg = r.hash_alg(f"the {name} scheme's hashAlg")
    if detail == 4:
        r.u16("the ECDAA count")
    return name, hash_alg


def ek_public_from_pem(pem: bytes) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
    """An EK's public key from PEM (SubjectPublicKeyInfo); Tpm2Error for anything else."""
    try:
        key = serialization.load_pem_public_key(bytes(pem))
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise Tpm2Error("the endorsement key is not a PEM public key") from None
    if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
        raise Tpm2Error("the endorsement key is neither an RSA nor an ECC key")
    return key


# --- credentials -------------------------------------------------------------------------


def kdfa(hash_name: str, key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa (Part 1, 11.4.10.2): SP 800-108 counter mode with HMAC; `label` includes its terminating zero."""
    out = b""
    counter = 0
    while len(out) * 8 < bits:
        counter += 1
        message = struct.pack(">I", counter) + label + context_u + context_v + struct.pack(">I", bits)
        out += hmac.new(key, message, hash_name).digest()
    return out[: (bits + 7) // 8]


def make_credential(ek_public: rsa.RSAPublicKey, ak_name: bytes, secret: bytes) -> tuple[bytes, bytes]:
    """TPM2_MakeCredential in software for an RSA 2048 EK of the TCG default template (nameAlg SHA-256,
    AES-128-CFB): (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), which only the TPM holding that EK can open,
    and then only for the key named `ak_name`."""
    if not isinstance(ek_public, rsa.RSAPublicKey):
        raise Tpm2Error("only RSA endorsement keys are supported")
    if ek_public.key_size != 2048:
        raise Tpm2Error(f"only RSA 2048 endorsement keys are supported, not RSA {ek_public.key_size}")
    _check_name(ak_name)
    if not 1 <= len(secret) <= 32:
        raise Tpm2Error(f"the credential secret must be 1 to 32 bytes (a SHA-256 digest at most), not {len(secret)}")
    seed = os.urandom(32)
    encrypted_seed = ek_public.encrypt(
        seed, padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=_CREDENTIAL_LABEL)
    )
    sym_key = kdfa("sha256", seed, b"STORAGE\0", ak_name, b"", 128)
    encryptor = Cipher(algorithms.AES(sym_key), CFB(bytes(16))).encryptor()
    enc_identity = encryptor.update(struct.pack(">H", len(secret)) + secret) + encryptor.finalize()
    hmac_key = kdfa("sha256", seed, b"INTEGRITY\0", b"", b"", 256)
    outer_hmac = hmac.new(hmac_key, enc_identity + ak_name, "sha256").digest()
    id_object = struct.pack(">H", len(outer_hmac)) + outer_hmac + enc_identity
    return struct.pack(">H", len(id_object)) + id_object, struct.pack(">H", len(encrypted_seed)) + encrypted_seed


def _check_name(name: bytes) -> str:
    r = _Reader(name, "the key's Name")
    alg = r.hash_alg("its nameAlg")
    r.take(_DIGEST_SIZES[alg], "its digest")
    r.end()
    return alg


# --- quotes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quote:
    """A TPMS_ATTEST of type TPM_ST_ATTEST_QUOTE, parsed."""

    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_bank: str
    pcrs: tuple[int, ...]
    pcr_digest: bytes


def parse_quote(attest: bytes) -> Quote:
    """A TPMS_ATTEST as tpm2_quote -m writes it; Tpm2Error unless it is a well-formed quote over one bank."""
    r = _Reader(attest, "the quote")
    magic = r.u32("magic")
    if magic != _TPM_GENERATED_VALUE:
        raise Tpm2Error(f"the quote's magic is {magic:#010x}, not TPM_GENERATED_VALUE: the TPM did not make it")
    kind = r.u16("type")
    if kind != _TPM_ST_ATTEST_QUOTE:
        raise Tpm2Error(f"the attestation is of type {kind:#06x}, not a quote (TPM_ST_ATTEST_QUOTE)")
    qualified_signer = r.tpm2b("qualifiedSigner", _MAX_NAME)
    extra_data = r.tpm2b("extraData", _MAX_DATA)
    clock = r.u64("clock")
    reset_count = r.u32("resetCount")
    restart_count = r.u32("restartCount")
    safe = r.u8("safe")
    if safe > 1:
        raise Tpm2Error(f"the quote's safe flag is {safe}, not 0 or 1")
    firmware_version = r.u64("firmwareVersion")
    count = r.u32("the count of PCR selections")
    if count != 1:
        raise Tpm2Error(f"the quote selects PCRs of {count} banks; exactly one bank is accepted")
    bank = r.hash_alg("the PCR bank")
    size = r.u8("sizeofSelect")
    if not 1 <= size <= _MAX_PCR_SELECT:
        raise Tpm2Error(f"the quote's PCR selection is {size} bytes, not 1 to {_MAX_PCR_SELECT}")
    select = r.take(size, "pcrSelect")
    pcrs = tuple(i for i in range(size * 8) if select[i // 8] & (1 << (i % 8)))
    if not pcrs:
        raise Tpm2Error("the quote selects no PCR")
    digest = r.tpm2b("pcrDigest", 64)
    r.end()
    if len(digest) != _DIGEST_SIZES[bank]:
        raise Tpm2Error(f"the quote's PCR digest is {len(digest)} bytes, not a {bank} digest")
    return Quote(
        qualified_signer=qualified_signer,
        extra_data=extra_data,
        clock=clock,
        reset_count=reset_count,
        restart_count=restart_count,
        safe=bool(safe),
        firmware_version=firmware_version,
        pcr_bank=bank,
        pcrs=pcrs,
        pcr_digest=digest,
    )


_SIG_ALGS = {0x0014: "rsassa", 0x0016: "rsapss", 0x0018: "ecdsa"}
_ACCEPTED_SIGNATURE_HASHES = ("sha256", "sha384", "sha512")


def _parse_signature(signature: bytes) -> tuple[str, str, bytes]:
    """(scheme, hash, signature bytes in the form `cryptography` verifies) from a TPMT_SIGNATURE."""
    r = _Reader(signature, "the quote's signature")
    alg = r.u16("sigAlg")
    if alg == _ALG_NULL:
        raise QuoteError("the quote is not signed (signature algorithm TPM_ALG_NULL)")
    if alg not in _SIG_ALGS:
        raise Tpm2Error(f"the quote's signature uses unknown or unsupported algorithm {alg:#06x}")
    scheme = _SIG_ALGS[alg]
    hash_name = r.hash_alg("the signature's hash")
    if scheme == "ecdsa":
        sig_r = int.from_bytes(r.tpm2b("signatureR", _MAX_ECC_BYTES), "big")
        sig_s = int.from_bytes(r.tpm2b("signatureS", _MAX_ECC_BYTES), "big")
        value = utils.encode_dss_signature(sig_r, sig_s)
    else:
        value = r.tpm2b("the RSA signature", _MAX_RSA_BYTES)
    r.end()
    return scheme, hash_name, value


def verify_quote(ak: TpmPublic, attest: bytes, signature: bytes) -> Quote:
    """The quote, once its TPMT_SIGNATURE verifies over `attest` with the attestation key `ak`.

    QuoteError when the key is no attestation key, the signature's scheme does
    not fit the key, or the signature does not verify; Tpm2Error when either
    input does not parse. The caller still checks the nonce, the PCR digest and
    the counters against what it expects.
    """
    problem = ak.attestation_key_problem()
    if problem:
        raise QuoteError(f"the host's {problem}")
    quote = parse_quote(attest)
    scheme, hash_name, value = _parse_signature(signature)
    if hash_name not in _ACCEPTED_SIGNATURE_HASHES:
        raise QuoteError(
            f"the quote is signed with {hash_name}; only {', '.join(_ACCEPTED_SIGNATURE_HASHES)} are accepted"
        )
    if ak.scheme is not None and ak.scheme != (scheme, hash_name):
        raise QuoteError(
            f"the quote is signed with {scheme}/{hash_name} but the attestation key's scheme is "
            f"{ak.scheme[0]}/{ak.scheme[1]}"
        )
    algorithm = _HASH_ALGORITHMS[hash_name]
    key = ak.public_key
    try:
        if scheme == "ecdsa":
            if not isinstance(key, ec.EllipticCurvePublicKey):
                raise QuoteError("the quote has an ECDSA signature but the attestation key is RSA")
            key.verify(value, bytes(attest), ec.ECDSA(algorithm))
        else:
            if not isinstance(key, rsa.RSAPublicKey):
                raise QuoteError(f"the quote has an {scheme} signature but the attestation key is ECC")
            pad: padding.AsymmetricPadding = (
                padding.PKCS1v15()
                if scheme == "rsassa"
                else padding.PSS(mgf=padding.MGF1(algorithm), salt_length=padding.PSS.AUTO)
            )
            key.verify(value, bytes(attest), pad, algorithm)
    except InvalidSignature:
        raise QuoteError("the quote's signature does not verify with the host's attestation key") from None
    return quote


def pcr_digest(bank: str, values: Sequence[bytes]) -> bytes:
    """H_bank(values[0] || values[1] || ...): what a quote's pcrDigest is for these PCR values,
    given in ascending PCR order."""
    if bank not in _DIGEST_SIZES:
        raise Tpm2Error(f"unknown PCR bank {bank!r}: one of {', '.join(_DIGEST_SIZES)}")
    size = _DIGEST_SIZES[bank]
    h = hashlib.new(bank)
    for i, value in enumerate(values):
        if not isinstance(value, (bytes, bytearray)) or len(value) != size:
            raise Tpm2Error(f"PCR value {i} is not a {bank} digest ({size} bytes)")
        h.update(value)
    return h.digest()


def digest_size(bank: str) -> int:
    """The size of a PCR value in `bank` ("sha256": 32); Tpm2Error for an unknown bank."""
    if bank not in _DIGEST_SIZES:
        raise Tpm2Error(f"unknown PCR bank {bank!r}: one of {', '.join(_DIGEST_SIZES)}")
    return _DIGEST_SIZES[bank]
