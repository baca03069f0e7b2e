"""KMIP 1.4, 4.2 Create Key Pair / 2.0, 6.1.9: an RSA (2048, 3072, 4096
bits) or elliptic curve (P-256, P-384, P-521) key pair.

Attributes come from the Common, Private Key and Public Key
Template-Attribute (2.0: Common, Private Key and Public Key Attributes);
for an attribute given in both, the key-specific value wins (KMIP 1.4,
4.2). The algorithm is RSA, EC or ECDSA/ECDH; the size is the Cryptographic
Length or the Recommended Curve of the Cryptographic Domain Parameters.
The two keys are linked to each other (Public Key Link on the private key,
Private Key Link on the public key); without a usage mask the private key
may Sign and the public key Verify.
"""

from typing import Any

from kmip.core.enums import (
    CryptographicAlgorithm,
    CryptographicUsageMask,
    LinkType,
    ObjectType,
    Operation,
    RecommendedCurve,
    Tags,
)

from kmip_core import errors, ttlv
from kmip_core.server.context import RequestContext
from kmip_core.ttlv import TAG, Item
from kms_server.keystore import attributes as attrs
from kms_server.keystore import crypto
from kms_server.keystore.keystore import Keystore
from kms_server.keystore.objects import Material
from kms_server.keystore.uids import new_uid
from kms_server.operations import common, crypto_params, object_codec

OPERATION = Operation.CREATE_KEY_PAIR

T = Tags
_ALGORITHM = "Cryptographic Algorithm"
_LENGTH = "Cryptographic Length"
_DOMAIN = "Cryptographic Domain Parameters"
_USAGE = "Cryptographic Usage Mask"
_DEFAULT_USAGE = {
    ObjectType.PRIVATE_KEY: CryptographicUsageMask.SIGN.value,
    ObjectType.PUBLIC_KEY: CryptographicUsageMask.VERIFY.value,
}


def handle(ctx: RequestContext, keystore: Keystore, payload: Item) -> list[Item]:
    shared = common.client_attributes(
        payload, T.COMMON_TEMPLATE_ATTRIBUTE, T.COMMON_ATTRIBUTES
    )
    private = _attributes(
        keystore,
        ObjectType.PRIVATE_KEY,
        shared,
        common.client_attributes(
            payload, T.PRIVATE_KEY_TEMPLATE_ATTRIBUTE, T.PRIVATE_KEY_ATTRIBUTES
        ),
    )
    public = _attributes(
        keystore,
        ObjectType.PUBLIC_KEY,
        shared,
        common.client_attributes(
            payload, T.PUBLIC_KEY_TEMPLATE_ATTRIBUTE, T.PUBLIC_KEY_ATTRIBUTES
        ),
    )
    algorithm = _algorithm(private, public)
    length = _single(private, public, _LENGTH)
    curve = _curve(private, public)
    try:
        private_der, public_der, bits = crypto.generate_key_pair(
            algorithm, length, curve
        )
    except crypto.CryptoError as exc:
        raise errors.InvalidField(exc.message) from None

    private_uid, public_uid = new_uid(), new_uid()
    for object_type, attributes, link_type, other_uid in (
        (ObjectType.PRIVATE_KEY, private, LinkType.PUBLIC_KEY_LINK, public_uid),
        (ObjectType.PUBLIC_KEY, public, LinkType.PRIVATE_KEY_LINK, private_uid),
    ):
        attributes.setdefault(_ALGORITHM, [attrs.make(_ALGORITHM, algorithm.value)])
        attributes[_LENGTH] = [attrs.make(_LENGTH, bits)]
        attributes.setdefault(_USAGE, [attrs.make(_USAGE, _DEFAULT_USAGE[object_type])])
        attributes.setdefault("Link", []).append(
            attrs.link_value(link_type.value, other_uid)
        )

    private.update(
        object_codec.server_attributes(ObjectType.PRIVATE_KEY, Material(private_der), algorithm.value, generated=True)
    )
    public.update(
        object_codec.server_attributes(ObjectType.PUBLIC_KEY, Material(public_der), algorithm.value, generated=True)
    )
    attrs.set_initial_defaults(ObjectType.PRIVATE_KEY, private)
    attrs.set_initial_defaults(ObjectType.PUBLIC_KEY, public)
    with keystore.transaction() as txn:
        keystore.new_object(
            txn,
            ctx.principal,
            ObjectType.PRIVATE_KEY,
            private,
            Material(private_der),
            ctx.now,
            uid=private_uid,
        )
        keystore.new_object(
            txn,
            ctx.principal,
            ObjectType.PUBLIC_KEY,
            public,
            Material(public_der),
            ctx.now,
            uid=public_uid,
        )
    # KMIP 1.4, 4.2: the ID Placeholder is the private key's identifier.
    ctx.batch.id_placeholder = private_uid
    return [
        ttlv.text(TAG.PRIVATE_KEY_UNIQUE_IDENTIFIER, private_uid),
        ttlv.text(TAG.PUBLIC_KEY_UNIQUE_IDENTIFIER, public_uid),
    ]


def _attributes(
    keystore: Keystore, object_type: ObjectType, shared: list, specific: list
) -> dict:
    """Common attributes overlaid with the key-specific ones: a specific
    value replaces a common one; for a multi-valued attribute they add."""
    merged = keystore.validate_client_attributes(object_type, shared)
    for name, values in keystore.validate_client_attributes(
        object_type, specific
    ).items():
        spec = attrs.spec_for(name)
        if spec is not None and spec.multi and name in merged:
            merged[name] = merged[name] + [v for v in values if v not in merged[name]]
        else:
            merged[name] = values
    return merged


def _single(private: dict, public: dict, name: str) -> Any:
    """One value the two keys must agree on (algorithm, length, curve)."""
    values = {v[0] for v in (private.get(name), public.get(name)) if v}
    if len(values) > 1:
        raise errors.InvalidField(
            f"the private and public key templates give different values of {name}"
        )
    return next(iter(values)).value if values else None


def _algorithm(private: dict, public: dict) -> CryptographicAlgorithm:
    values = [
        v[0].value for v in (private.get(_ALGORITHM), public.get(_ALGORITHM)) if v
    ]
    if not values:
        raise errors.MissingData(
            "Cryptographic Algorithm is required to create a key pair"
        )
    try:
        algorithms = [CryptographicAlgorithm(v) for v in values]
    except ValueError:
        raise errors.InvalidField(
            "Cryptographic Algorithm value is not defined"
        ) from None
    if len({crypto_params.algorithm_family(a) for a in algorithms}) > 1:
        raise errors.InvalidField(
            "the private and public key templates give different algorithms"
        )
    return algorithms[0]


def _curve(private: dict, public: dict) -> RecommendedCurve | None:
    curves = set()
    for attributes in (private, public):
        domain = attributes.get(_DOMAIN)
        if not domain:
            continue
        curve = domain[0].get(TAG.RECOMMENDED_CURVE)
        if curve is not None:
            curves.add(curve)
    if len(curves) > 1:
        raise errors.InvalidField(
            "the private and public key templates give different curves"
        )
    if not curves:
        return None
    try:
        return RecommendedCurve(curves.pop())
    except ValueError:
        raise errors.InvalidField("Recommended Curve value is not defined") from None
