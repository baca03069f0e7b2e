"""The names of the fields that describe a TPM in an EK certificate request.

They are the same in swtpm_setup's arguments to `vtpm-ek-certtool`
(broker/ek_certtool.py) and in the broker's request body
(``POST /v1/vtpm/ek-certificates``, broker/vtpm_ca.py), so both import them
from here; neither imports the other for them.
"""

from __future__ import annotations

__all__ = ["TPM_FIELDS"]

TPM_FIELDS = (
    "tpm_manufacturer",
    "tpm_model",
    "tpm_version",
    "tpm_spec_family",
    "tpm_spec_level",
    "tpm_spec_revision",
)
