"""Host attestation end to end (issue 18, docs/attestation.md): a real
kms-server and vtpm-broker, hosts whose TPMs are real swtpm instances driven
with tpm2-tools, the broker's HTTPS API and its KMIP gateway over mutual TLS.

A good host unwraps; a changed PCR, a replayed quote, a quote from another
TPM, a forged attestation key, an expired token, a token from before a
reboot, a revoked TPM and a changed policy are each refused, and each
refusal is in the broker's audit trail.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import broker_harness
import pytest
from attest_harness import attest, b64, challenge, pin_and_enroll, quote_body, unb64
from broker_harness import call, create_vm, enroll, register_new_host
from kmip.core.enums import ResultReason

from broker.host.host_tpm import HostTpm, HostTpmError, HostTpmProcess, measure_boot
from broker.keysafe import parse_key_safe
from kmip_core.client import KmipClient, KmipError

pytestmark = pytest.mark.skipif(
    shutil.which("swtpm") is None or shutil.which("tpm2_quote") is None,
    reason="host attestation tests need swtpm and tpm2-tools (tpm2_quote)",
)

PROVIDER = "kms-attest-test"
TOKEN_TTL = 10
# broker_harness writes this after [logging] in the broker's configuration.
ROLES = f"""
[attestation]
token_ttl = {TOKEN_TTL}
"""

kms = broker_harness.kms
broker = broker_harness.broker


@dataclass
class Host:
    name: str
    identity: tuple[str, str]
    tpm: HostTpm
    process: HostTpmProcess
    vm: dict

    def post(self, broker, path: str, body: dict):
        return call(broker, "POST", path, self.identity, json=body)

    def unwrap(self, broker, ticket: bytes | None) -> bytes:
        safe = parse_key_safe(self.vm["key_safe"])
        cert, key = self.identity
        with KmipClient([broker.gateway], cert, key, broker.trust_ca, request_timeout=30.0) as client:
            client.ticket = ticket
            return client.decrypt(safe.kms_key_id, safe.wrapped_dek, iv=safe.iv, tag=safe.tag, mode="GCM")


@pytest.fixture(scope="module")
def hosts(broker, tmp_path_factory) -> Iterator[dict[str, Host]]:
    """Instance vc-att with hosts esx-1, esx-2 and esx-3 (one VM placed on
    each), each with its own host TPM, booted the same way."""
    work = tmp_path_factory.mktemp("attest")
    instance = enroll(broker, "vc-att", work)
    made: dict[str, Host] = {}
    try:
        for name in ("esx-1", "esx-2", "esx-3"):
            identity = register_new_host(broker, instance, work, name)
            (work / f"{name}-tpm").mkdir(mode=0o700)
            (work / f"{name}-scratch").mkdir(mode=0o700)
            process = HostTpmProcess(work / f"{name}-tpm")
            process.start()
            tpm = HostTpm(process.tcti, work / f"{name}-scratch")
            tpm.ensure_keys()
            measure_boot(tpm)
            vm = create_vm(broker, instance, f"vm-on-{name}", host=name)
            made[name] = Host(name, identity, tpm, process, vm)
        yield made
    finally:
        for host in made.values():
            host.process.stop()


def trail(broker, action: str) -> list[dict]:
    """The broker's audit records of `action` (`admin audit --json`), after checking the chain is intact."""
    listing = json.loads(broker.admin("audit", "--json").stdout)
    assert listing["intact"], listing["problems"]
    return [r for r in listing["records"] if r.get("action") == action]


def refused_reason(exc: pytest.ExceptionInfo[KmipError]) -> ResultReason | None:
    return exc.value.reason


@pytest.fixture(scope="module")
def enrolled(broker, hosts, tmp_path_factory) -> dict[str, Host]:
    """Every host's TPM pinned and enrolled; the default policy captured
    from esx-1, a known-good host, after its first quote."""
    tmp = tmp_path_factory.mktemp("ek")
    for host in hosts.values():
        pin_and_enroll(broker, host, tmp)
    first = attest(broker, hosts["esx-1"])
    assert first.status_code == 200, first.text
    # No policy yet: the quote is verified and kept, no token is needed.
    assert first.json()["token"] is None
    broker.admin("attest-policy", "capture", "--default", "--from-host", "esx-1")
    return hosts


def test_a_good_host_attests_and_unwraps_only_with_its_token(broker, enrolled):
    host = enrolled["esx-1"]
    with pytest.raises(KmipError) as refused:
        host.unwrap(broker, None)
    assert refused_reason(refused) == ResultReason.ATTESTATION_REQUIRED
    answer = attest(broker, host)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["policy"] == "default" and body["expires_in"] == TOKEN_TTL
    dek = host.unwrap(broker, body["token"].encode())
    assert len(dek) == 64
    listing = {h["host"]: h for h in json.loads(broker.admin("list", "--hosts", "--json").stdout)}
    assert listing["esx-1"]["status"] == "attested"
    unwraps = trail(broker, "gateway.unwrap")
    assert any(r["allowed"] and "attested under policy default" in r["reason"] for r in unwraps)
    assert any(not r["allowed"] and "attestation required" in r["reason"] for r in unwraps)
    # The token never reaches the trail.
    assert all(body["token"] not in r["reason"] for r in trail(broker, "host.attest"))


def test_a_host_booted_into_something_else_is_refused_with_the_pcrs_that_differ(broker, enrolled):
    host = enrolled["esx-2"]
    good = attest(broker, host)
    assert good.status_code == 200, good.text  # booted as the golden host
    # A tampered boot: one more measurement into PCR 7.
    host.tpm.pcr_extend(7, "sha256", b"\x66" * 32)
    answer = attest(broker, host)
    assert answer.status_code == 403
    assert "PCR 7 differs from policy default" in answer.json()["error"]
    refused = [r for r in trail(broker, "host.attest") if r["target"] == "esx-2" and not r["allowed"]]
    assert refused and "PCR 7" in refused[-1]["reason"]
    status = {h["host"]: h for h in json.loads(broker.admin("attest", "status", "--json").stdout)}
    assert status["esx-2"]["status"] == "failed"
    # Its earlier token was issued for the same boot; the PCR change shows at
    # the next quote, and the failed quote leaves no new token.
    with pytest.raises(KmipError) as again:
        host.unwrap(broker, None)
    assert refused_reason(again) == ResultReason.ATTESTATION_REQUIRED


def test_a_replayed_quote_is_refused(broker, enrolled):
    host = enrolled["esx-1"]
    body = quote_body(host, challenge(broker, host))
    first = host.post(broker, "/v1/attestation/quote", body)
    assert first.status_code == 200, first.text
    replay = host.post(broker, "/v1/attestation/quote", body)
    assert replay.status_code == 403
    assert "nonce is unknown, used or expired" in replay.json()["error"]
    assert any("replayed" in r["reason"] for r in trail(broker, "host.attest") if not r["allowed"])


def test_a_quote_from_another_tpm_is_refused(broker, enrolled):
    host, other = enrolled["esx-1"], enrolled["esx-3"]
    body = quote_body(host, challenge(broker, host), tpm=other.tpm)
    answer = host.post(broker, "/v1/attestation/quote", body)
    assert answer.status_code == 403
    assert "does not verify with host esx-1's attestation key" in answer.json()["error"]
    assert any(
        r["target"] == "esx-1" and "does not verify" in r["reason"]
        for r in trail(broker, "host.attest")
        if not r["allowed"]
    )


def test_a_forged_attestation_key_never_enrolls(broker, enrolled):
    """esx-3 offers another TPM's AK under its own (pinned) EK: the
    credential is made for that AK's name, which esx-3's TPM does not hold,
    so it cannot recover the secret; a guessed secret is refused and
    audited, and esx-3's enrolled AK stays in force."""
    host, other = enrolled["esx-3"], enrolled["esx-1"]
    offer = host.post(
        broker,
        "/v1/attestation/enroll",
        {"ek_public_pem": host.tpm.ek_public_pem().decode(), "ak_public_b64": b64(other.tpm.ak_public())},
    )
    assert offer.status_code == 200, offer.text
    with pytest.raises(HostTpmError):
        host.tpm.activate_credential(unb64(offer.json()["id_object_b64"]), unb64(offer.json()["encrypted_secret_b64"]))
    guessed = host.post(broker, "/v1/attestation/activate", {"secret_b64": b64(b"\0" * 32)})
    assert guessed.status_code == 403
    assert any(
        r["target"] == "esx-3" and "does not match the credential" in r["reason"]
        for r in trail(broker, "host.tpm.activate")
        if not r["allowed"]
    )
    # Another host's EK is refused outright.
    wrong_ek = host.post(
        broker,
        "/v1/attestation/enroll",
        {"ek_public_pem": other.tpm.ek_public_pem().decode(), "ak_public_b64": b64(host.tpm.ak_public())},
    )
    assert wrong_ek.status_code == 403 and "not the one pinned" in wrong_ek.json()["error"]
    # A key that is not an attestation key (a decrypting EK) is refused.
    not_ak = host.post(
        broker,
        "/v1/attestation/enroll",
        {"ek_public_pem": host.tpm.ek_public_pem().decode(), "ak_public_b64": b64(b"\x00\x04junk")},
    )
    assert not_ak.status_code == 400
    # esx-3 still attests with its own AK.
    assert attest(broker, host).status_code == 200


def test_an_expired_token_is_refused_and_audited(broker, enrolled):
    host = enrolled["esx-3"]
    answer = attest(broker, host)
    assert answer.status_code == 200, answer.text
    token = answer.json()["token"].encode()
    assert len(host.unwrap(broker, token)) == 64
    time.sleep(TOKEN_TTL + 1.5)
    with pytest.raises(KmipError) as refused:
        host.unwrap(broker, token)
    assert refused_reason(refused) == ResultReason.ATTESTATION_FAILED
    assert "expired" in str(refused.value)
    assert any("attestation token expired" in r["reason"] for r in trail(broker, "gateway.unwrap") if not r["allowed"])


def test_a_token_from_before_a_reboot_is_refused_and_the_host_attests_again(broker, enrolled):
    host = enrolled["esx-1"]
    before = attest(broker, host).json()["token"].encode()
    host.process.reboot()
    measure_boot(host.tpm)
    after = attest(broker, host)
    assert after.status_code == 200, after.text
    with pytest.raises(KmipError) as refused:
        host.unwrap(broker, before)
    assert refused_reason(refused) == ResultReason.ATTESTATION_FAILED
    assert "rebooted" in str(refused.value)
    assert len(host.unwrap(broker, after.json()["token"].encode())) == 64


def test_a_token_of_another_host_is_refused(broker, enrolled):
    token = attest(broker, enrolled["esx-1"]).json()["token"].encode()
    with pytest.raises(KmipError) as refused:
        enrolled["esx-3"].unwrap(broker, token)
    assert refused_reason(refused) == ResultReason.ATTESTATION_FAILED


def test_a_changed_policy_voids_earlier_tokens(broker, enrolled):
    host = enrolled["esx-1"]
    token = attest(broker, host).json()["token"].encode()
    broker.admin("attest-policy", "capture", "--host", "esx-1", "--from-host", "esx-1", "--pcrs", "0-3")
    with pytest.raises(KmipError) as refused:
        host.unwrap(broker, token)
    assert refused_reason(refused) == ResultReason.ATTESTATION_FAILED
    assert "policy changed" in str(refused.value)
    fresh = attest(broker, host)
    assert fresh.status_code == 200 and fresh.json()["policy"] == "host:esx-1"
    assert len(host.unwrap(broker, fresh.json()["token"].encode())) == 64
    broker.admin("attest-policy", "remove", "--host", "esx-1")


def test_a_revoked_tpm_unwraps_nothing_and_quotes_nothing(broker, enrolled, tmp_path):
    host = enrolled["esx-3"]
    token = attest(broker, host).json()["token"].encode()
    broker.admin("attest", "revoke", "esx-3")
    with pytest.raises(KmipError) as refused:
        host.unwrap(broker, token)
    assert refused_reason(refused) == ResultReason.ATTESTATION_FAILED
    assert host.post(broker, "/v1/attestation/challenge", {}).status_code == 403
    status = {h["host"]: h for h in json.loads(broker.admin("attest", "status", "--json").stdout)}
    assert status["esx-3"]["status"] == "revoked"
    # Pinned again, it enrolls and attests again.
    pin_and_enroll(broker, host, tmp_path)
    assert attest(broker, host).status_code == 200


def test_admin_commands_refuse_bad_input_in_one_line(broker, enrolled, tmp_path):
    garbage = tmp_path / "ek.pem"
    garbage.write_text("not a key")
    for args, expected in (
        (("attest", "pin-ek", "esx-1", "--ek-pub", str(garbage)), "does not load"),
        (("attest", "pin-ek", "no-such-host", "--ek-pub", str(garbage)), "does not load"),
        (("attest-policy", "set", "--default", "--pcr", "7"), "N=HEX"),
        (("attest-policy", "set", "--default", "--pcr", "7=abcd"), "32 bytes"),
        (("attest-policy", "capture", "--default", "--from-host", "esx-9"), "no verified quote"),
        (("attest-policy", "remove", "--instance", "nobody"), "no attestation policy"),
    ):
        result = broker.admin(*args, check=False)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, result.stderr)
        assert "Traceback" not in result.stderr
