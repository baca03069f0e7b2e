"""Cryptographic primitives for the keystore, in KMIP vocabulary.

This package and the at-rest barrier are the only places that import
``cryptography``. Every function here takes and returns plain bytes (keys as
raw symmetric bytes, PKCS#8 DER private keys, SubjectPublicKeyInfo DER public
keys) and KMIP enumerations for parameters, so that the layers above never
handle library key objects.

Every failure raises :class:`CryptoError` with a short reason that never
contains key material or data, so it is safe to return to a client and to
log. Verification raises instead of returning False (the pyca rule):
:class:`SignatureInvalid` for a bad signature and :class:`MacInvalid` for a
bad MAC, so the MAC Verify and Signature Verify operations can tell "invalid"
apart from "could not check".

One module per concern: ``base`` (errors, hash and curve tables, key
loading), ``rng``, ``digests``, ``keys`` (generation, format conversion),
``x509``, ``derive`` (key derivation), ``ciphers`` (Encrypt/Decrypt, CipherStream), ``wrap`` (AES key
wrap), ``rsa``, ``macs``, ``signatures``. Callers use the names re-exported
here: ``from kms_server.keystore import crypto; crypto.encrypt(...)``.
"""

from kms_server.keystore.crypto import derive
from kms_server.keystore.crypto.base import (
    GENERATE_ONLY_LENGTHS,
    CryptoError,
    MacInvalid,
    NotSupported,
    SignatureInvalid,
)
from kms_server.keystore.crypto.ciphers import (
    CHACHA_ALGORITHMS,
    STREAM_MODES,
    CipherStream,
    decrypt,
    encrypt,
)
from kms_server.keystore.crypto.digests import constant_time_eq, digest
from kms_server.keystore.crypto.keys import (
    export_private_key,
    export_public_key,
    generate_key_pair,
    generate_symmetric_key,
    import_private_key,
    import_public_key,
    import_transparent_private_key,
    import_transparent_public_key,
    private_key_layout,
    public_from_private,
    public_key_layout,
    transparent_private_key,
    transparent_public_key,
)
from kms_server.keystore.crypto.macs import mac, mac_verify
from kms_server.keystore.crypto.rng import SEED_MAX_BYTES, mix_seed, random_bytes
from kms_server.keystore.crypto.rsa import rsa_decrypt, rsa_encrypt, rsa_unwrap, rsa_wrap
from kms_server.keystore.crypto.signatures import sign, verify_signature
from kms_server.keystore.crypto.wrap import unwrap_key, wrap_key
from kms_server.keystore.crypto.x509 import CERTIFICATE_NAME_FIELDS, parse_certificate

__all__ = [
    "CERTIFICATE_NAME_FIELDS",
    "CHACHA_ALGORITHMS",
    "SEED_MAX_BYTES",
    "STREAM_MODES",
    "CipherStream",
    "CryptoError",
    "GENERATE_ONLY_LENGTHS",
    "NotSupported",
    "MacInvalid",
    "SignatureInvalid",
    "constant_time_eq",
    "derive",
    "mix_seed",
    "decrypt",
    "digest",
    "encrypt",
    "export_private_key",
    "export_public_key",
    "generate_key_pair",
    "generate_symmetric_key",
    "import_private_key",
    "import_public_key",
    "import_transparent_private_key",
    "import_transparent_public_key",
    "mac",
    "mac_verify",
    "parse_certificate",
    "private_key_layout",
    "public_from_private",
    "public_key_layout",
    "random_bytes",
    "rsa_decrypt",
    "rsa_encrypt",
    "rsa_unwrap",
    "rsa_wrap",
    "sign",
    "transparent_private_key",
    "transparent_public_key",
    "unwrap_key",
    "verify_signature",
    "wrap_key",
]
