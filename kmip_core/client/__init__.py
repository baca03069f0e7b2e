"""KMIP client library with failover across the nodes of one key provider
(used by the broker and kms-admin). The failover rules are documented in
`kmip_core.client.client`.

    from kmip_core.client import KmipClient
    with KmipClient(["kms1:5696", "kms2:5696"], cert="c.pem", key="c.key", ca="ca.pem") as kms:
        uid = kms.create_symmetric_key(name="vm-42-kek", attributes={"x-vm": "42"})
        wrapped = kms.encrypt(uid, dek)
"""

from kmip_core.client.client import SAFE_TO_RETRY, EncryptResult, KmipClient, correlation, current_correlation
from kmip_core.client.errors import KmipError, NoNodeAvailable, OutcomeUnknown

__all__ = [
    "SAFE_TO_RETRY",
    "EncryptResult",
    "KmipClient",
    "KmipError",
    "NoNodeAvailable",
    "OutcomeUnknown",
    "correlation",
    "current_correlation",
]
