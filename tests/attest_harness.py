"""A host's side of host attestation over the broker's API, for the
integration tests that drive real swtpm host TPMs (docs/attestation.md):
enrollment after the security administrator pins the EK, and a challenge,
quote and verdict. A `host` is anything with `name`, `tpm` (a
`broker.host.host_tpm.HostTpm`) and `post(broker, path, body)` (the API
with the host's certificate)."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

__all__ = ["attest", "b64", "challenge", "pin_and_enroll", "quote_body", "unb64"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


def pin_and_enroll(broker: Any, host: Any, tmp: Path) -> None:
    """`vtpm-broker admin attest pin-ek`, then the host's enroll and activate over the API."""
    assert host.tpm is not None
    ek = tmp / f"{host.name}-ek.pem"
    ek.write_bytes(host.tpm.ek_public_pem())
    broker.admin("attest", "pin-ek", host.name, "--ek-pub", str(ek))
    offer = host.post(
        broker,
        "/v1/attestation/enroll",
        {"ek_public_pem": host.tpm.ek_public_pem().decode(), "ak_public_b64": b64(host.tpm.ak_public())},
    )
    assert offer.status_code == 200, offer.text
    secret = host.tpm.activate_credential(
        unb64(offer.json()["id_object_b64"]), unb64(offer.json()["encrypted_secret_b64"])
    )
    done = host.post(broker, "/v1/attestation/activate", {"secret_b64": b64(secret)})
    assert done.status_code == 200, done.text
    assert done.json()["state"] == "enrolled"


def challenge(broker: Any, host: Any) -> dict:
    answer = host.post(broker, "/v1/attestation/challenge", {})
    assert answer.status_code == 200, answer.text
    return answer.json()


def quote_body(host: Any, chal: dict, tpm: Any = None) -> dict:
    """The body of POST /v1/attestation/quote: the host's TPM (or `tpm`) quoting the challenge."""
    nonce = unb64(chal["nonce_b64"])
    attest_bytes, signature, values = (tpm or host.tpm).quote(nonce, chal["pcr_bank"], chal["pcrs"])
    return {
        "nonce_b64": chal["nonce_b64"],
        "quote_b64": b64(attest_bytes),
        "signature_b64": b64(signature),
        "pcr_values": {str(i): v.hex() for i, v in values.items()},
    }


def attest(broker: Any, host: Any) -> Any:
    """Challenge, quote, verdict: the answer (200 with a token, or 403)."""
    return host.post(broker, "/v1/attestation/quote", quote_body(host, challenge(broker, host)))
