"""The registry's attestation rules against a real host TPM (swtpm driven
with tpm2-tools), without a broker process: what `[attestation] required`
does to a host no policy covers, and that the broker's appraisal and the
TPM agree on a quote (docs/attestation.md)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from broker.db import Database
from broker.host.host_tpm import HostTpm, HostTpmProcess, measure_boot
from broker.trust import Refused, Registry
from broker.trust_ca import create_trust_ca

pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("tpm2_quote") is None,
    reason="host attestation tests need swtpm and tpm2-tools (tpm2_quote)",
)


def _csr() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")])
    )
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Registry, HostTpm]]:
    db = Database(f"sqlite:///{tmp_path / 'broker.db'}")
    db.create_all()
    registry = Registry(db, create_trust_ca("kms-test"))
    token = registry.issue_token("vc-a")
    registry.enroll("vc-a", token, _csr())
    registry.approve("vc-a")
    registry.register_host("vc-a", "esx-1", _csr())
    (tmp_path / "tpm").mkdir(mode=0o700)
    (tmp_path / "scratch").mkdir(mode=0o700)
    process = HostTpmProcess(tmp_path / "tpm")
    process.start()
    try:
        tpm = HostTpm(process.tcti, tmp_path / "scratch")
        ek_pem, ak_public = tpm.ensure_keys()
        measure_boot(tpm)
        registry.pin_host_ek("esx-1", ek_pem)
        id_object, secret = registry.begin_tpm_enrollment("esx-1", ek_pem.decode(), ak_public)
        registry.finish_tpm_enrollment("esx-1", tpm.activate_credential(id_object, secret))
        yield registry, tpm
    finally:
        process.stop()
        db.close()


def quote(registry: Registry, tpm: HostTpm):
    challenge = registry.attestation_challenge("esx-1", "vc-a")
    attest, signature, values = tpm.quote(challenge.nonce, challenge.pcr_bank, challenge.pcrs)
    return registry.attest_host(
        "esx-1", "vc-a", challenge.nonce, attest, signature, {str(i): v.hex() for i, v in values.items()}
    )


def test_without_required_a_host_no_policy_covers_needs_no_token(world):
    registry, tpm = world
    assert quote(registry, tpm).token is None
    check = registry.check_attestation("esx-1", "vc-a", None)
    assert check.allowed and not check.required
    [status] = registry.attestation_status()
    assert status.last_result == "no policy" and status.status == "enrolled"


def test_with_required_a_host_no_policy_covers_fails_and_is_refused_at_the_gateway(world):
    registry, tpm = world
    registry.attestation = replace(registry.attestation, required=True)
    with pytest.raises(Refused, match="no attestation policy covers host esx-1"):
        quote(registry, tpm)
    [status] = registry.attestation_status()
    assert status.status == "failed"
    [record] = [r for r in registry.audit_records() if r.action == "host.attest"]
    assert not record.allowed and "required is on" in record.reason
    check = registry.check_attestation("esx-1", "vc-a", None)
    assert not check.allowed and check.missing
    # A policy captured from that verified quote lets it attest.
    registry.capture_attest_policy("default", "esx-1")
    result = quote(registry, tpm)
    assert result.token and result.policy == "default"
    assert registry.check_attestation("esx-1", "vc-a", result.token.encode()).allowed
