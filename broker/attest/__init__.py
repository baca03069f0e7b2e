"""Host attestation (issue 18): the broker's side of a host TPM's proofs.

`broker.attest.tpm2` parses and verifies what a host's TPM 2.0 produces
(public areas, quotes, signatures) and makes credentials for
TPM2_ActivateCredential, in pure Python; the host's side, which drives its
TPM with tpm2-tools, is `broker.host.host_tpm`.
"""
