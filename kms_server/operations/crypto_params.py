"""Which Cryptographic Parameters (KMIP 1.4, 3.6) a KMS operation uses: the
request's or the key's own, and the key's algorithm checked against them.
Reading the structure is kmip_core.server.crypto_params's."""

from __future__ import annotations

from kmip.core.enums import (
    CryptographicAlgorithm,
)

from kmip_core import errors
from kmip_core.server.crypto_params import CryptoParameters, algorithm_family, crypto_parameters
from kmip_core.ttlv import TAG, Item
from kms_server.keystore.objects import ManagedObject

__all__ = ["CryptoParameters", "algorithm_family", "crypto_parameters", "key_algorithm", "request_parameters"]


def request_parameters(payload: Item, obj: ManagedObject) -> CryptoParameters:
    """The Cryptographic Parameters of a request, else the first value of
    the key's Cryptographic Parameters attribute, else none (KMIP 1.4, 4.29:
    the parameters associated with the object are used when the request
    gives none)."""
    given = crypto_parameters(payload.find(TAG.CRYPTOGRAPHIC_PARAMETERS))
    if given is not None:
        return given
    return (
        crypto_parameters(obj.first("Cryptographic Parameters")) or CryptoParameters()
    )


def key_algorithm(
    obj: ManagedObject, params: CryptoParameters | None = None
) -> CryptographicAlgorithm | None:
    """The key's Cryptographic Algorithm; parameters that name another
    algorithm family are refused rather than silently ignored."""
    value = obj.value("Cryptographic Algorithm")
    algorithm = None if value is None else CryptographicAlgorithm(value)
    wanted = params.cryptographic_algorithm if params is not None else None
    if (
        wanted is not None
        and algorithm is not None
        and algorithm_family(wanted) != algorithm_family(algorithm)
    ):
        raise errors.InvalidField(
            f"Cryptographic Algorithm {wanted.name} does not match the key's algorithm {algorithm.name}"
        )
    return algorithm

