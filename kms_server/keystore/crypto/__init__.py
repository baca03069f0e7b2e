"""Cryptographic primitives for the keystore, in KMIP vocabulary."""

from kms_server.keystore.crypto.ciphers import *  # noqa: F403
from kms_server.keystore.crypto.ciphers import (  # noqa: F401
    CERTIFICATE_NAME_FIELDS,
    CHACHA_ALGORITHMS,
    SEED_MAX_BYTES,
    STREAM_MODES,
    __all__,
)
