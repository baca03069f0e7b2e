"""The KMIP core both services stand on.

The TTLV model and codec, Result Reasons and the error table, the KMIP client,
the server framework, and the service plumbing (TLS, sealing, PKI, database
engine, group commit, atomic files, configuration schema, the hash-chained
trail, principals and roles). `kms_server` and `broker` import from here and
never from each other; nothing here imports either (docs/architecture.md).
"""

__version__ = "0.1.0"
