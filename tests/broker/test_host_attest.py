"""Host attestation, the host's side (broker/host/attest.py, the attestation calls and the
attesting unwrap of broker/host/broker_client.py, the [attestation] config and `vtpm-host attest`):
unit tests with a fake broker (its HTTP answers and its KMIP gateway) and a fake host TPM. The real
TPM is tests/integration/test_host_tpm.py's; the real broker, tests/integration/test_host_attest_cli.py.
"""

from __future__ import annotations

import base64
import json
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from kmip.core.enums import ResultReason

from broker.host import attest as host_attest
from broker.host import cli as host_cli
from broker.host.attest import Attestation, TokenCache, attestation_status, ek_fingerprint, enroll, read_enrollment
from broker.host.broker_client import BrokerClient
from broker.host.config import HostConfig, init_state_dir, load_config
from broker.host.errors import BrokerRefused, HostError
from broker.keysafe import KeySafe
from kmip_core.client import KmipError

GOLDEN = {index: bytes([index]) * 32 for index in range(8)}
DEK = b"\x11" * 64
TTL = 60


# --- Fakes --------------------------------------------------------------------------------------


class FakeTpm:
    """A host TPM: its EK, its AK, PCRs a test may change (a tampered boot)."""

    def __init__(self) -> None:
        key = ec.generate_private_key(ec.SECP256R1())  # stands for the RSA EK: only its PEM is used here
        self.ek_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.ak_public = b"\x00\x20AK-public-area"
        self.pcrs = dict(GOLDEN)
        self.quotes = 0
        self.keys_made = 0

    def ensure_keys(self) -> tuple[bytes, bytes]:
        self.keys_made += 1
        return self.ek_pem, self.ak_public

    def ek_public_pem(self) -> bytes:
        return self.ek_pem

    def activate_credential(self, id_object: bytes, encrypted_secret: bytes) -> bytes:
        if id_object != b"ID:" + self.ak_public or not encrypted_secret.startswith(b"ENC:"):
            raise HostError("the host TPM (fake) could not activate the broker's credential")
        return encrypted_secret[4:]

    def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> tuple[bytes, bytes, dict[int, bytes]]:
        self.quotes += 1
        return b"QUOTE:" + nonce, b"SIG", {index: self.pcrs[index] for index in pcrs}


class FakeBroker:
    """The broker's attestation routes (as HTTP status and JSON) and its gateway's token check."""

    def __init__(self) -> None:
        self.pinned = True
        self.enrolled = False
        self.policy: str | None = "default"
        self.secret = b"\x42" * 32
        self.nonces: list[bytes] = []
        self.tokens: set[str] = set()
        self.issued = 0
        self.requests: list[tuple[str, dict]] = []
        self.decrypts: list[bytes | None] = []
        self.gateway_refuses: ResultReason | None = None

    def http(self, method: str, path: str, body: dict | None) -> tuple[int, dict]:
        assert method == "POST"
        body = body or {}
        self.requests.append((path, body))
        if path == "/v1/attestation/enroll":
            if not self.pinned:
                return 403, {"error": "host h1 has no pinned TPM; the security administrator pins its EK"}
            assert body["ek_public_pem"].startswith("-----BEGIN PUBLIC KEY-----")
            ak = base64.b64decode(body["ak_public_b64"])
            return 200, {
                "id_object_b64": base64.b64encode(b"ID:" + ak).decode(),
                "encrypted_secret_b64": base64.b64encode(b"ENC:" + self.secret).decode(),
            }
        if path == "/v1/attestation/activate":
            if base64.b64decode(body["secret_b64"]) != self.secret:
                return 403, {"error": "the secret does not match the credential"}
            self.enrolled = True
            return 200, {"state": "enrolled", "ak_name_hex": "000b" + "ab" * 32}
        if path == "/v1/attestation/challenge":
            nonce = os.urandom(32)
            self.nonces.append(nonce)
            return 200, {
                "nonce_b64": base64.b64encode(nonce).decode(),
                "pcr_bank": "sha256",
                "pcrs": list(range(8)),
                "expires_in": 60,
            }
        if path == "/v1/attestation/quote":
            nonce = base64.b64decode(body["nonce_b64"])
            if nonce not in self.nonces or base64.b64decode(body["quote_b64"]) != b"QUOTE:" + nonce:
                return 403, {"error": "attestation failed: the nonce is unknown or spent"}
            self.nonces.remove(nonce)
            values = {int(k): bytes.fromhex(v) for k, v in body["pcr_values"].items()}
            differ = [i for i in sorted(GOLDEN) if values.get(i) != GOLDEN[i]]
            if self.policy is not None and differ:
                return 403, {"error": f"attestation failed: PCR {differ[0]} differs from policy {self.policy}"}
            if self.policy is None:
                return 200, {"token": None, "expires_at": None, "expires_in": None, "policy": None}
            self.issued += 1
            token = f"token-{self.issued}"
            self.tokens.add(token)
            return 200, {"token": token, "expires_at": 1e9, "expires_in": TTL, "policy": self.policy}
        return 404, {"error": f"no such endpoint {path}"}

    def decrypt(self, ticket: bytes | None) -> bytes:
        self.decrypts.append(ticket)
        if self.gateway_refuses is not None:
            raise KmipError(self.gateway_refuses, "host h1's TPM is revoked")
        if self.policy is None:
            return DEK
        if ticket is None:
            raise KmipError(ResultReason.ATTESTATION_REQUIRED, "host h1 must attest (no ticket)")
        if ticket.decode() not in self.tokens:
            raise KmipError(ResultReason.ATTESTATION_FAILED, "the attestation token is unknown or expired")
        return DEK


class FakeGateway:
    """The KMIP client as BrokerClient.unwrap uses it: a `ticket` attribute and decrypt()."""

    def __init__(self, broker: FakeBroker) -> None:
        self.broker = broker
        self.ticket: bytes | None = None

    def decrypt(self, uid: str, data: bytes, **kwargs: object) -> bytes:
        return self.broker.decrypt(self.ticket)

    def close(self) -> None:
        pass


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class WiredClient(BrokerClient):
    """The real BrokerClient with the fake broker behind its HTTP and KMIP layers."""

    def __init__(self, config: HostConfig, broker: FakeBroker, tpm: FakeTpm | None, clock: Clock) -> None:
        super().__init__(config, tpm=tpm, clock=clock)
        self.fake = broker
        self.gateway = FakeGateway(broker)

    def _request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        status, answer = self.fake.http(method, path, body)
        return status, json.dumps(answer).encode()

    def _gateway_client(self, client_class: object) -> FakeGateway:
        return self.gateway


@pytest.fixture
def host(tmp_path: Path) -> HostConfig:
    state = tmp_path / "host"
    state.mkdir(mode=0o700)
    (state / "host.pem").write_text("certificate placeholder: the fakes never open it\n")
    return HostConfig(state_dir=state, name="h1", gateway=("127.0.0.1:5697",), api="https://127.0.0.1:8443")


@pytest.fixture
def broker() -> FakeBroker:
    return FakeBroker()


@pytest.fixture
def tpm() -> FakeTpm:
    return FakeTpm()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def key_safe() -> KeySafe:
    return KeySafe(provider="broker", kms_key_id="kek-1", wrapped_dek=b"w" * 64, iv=b"i" * 12, tag=b"t" * 16)


def one_line(text: str) -> bool:
    return "\n" not in text and "Traceback" not in text


# --- Enrollment ---------------------------------------------------------------------------------


def test_enroll_sends_ek_and_ak_activates_and_records(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    name = enroll(client, tpm, host.attestation_dir)
    assert name == "000b" + "ab" * 32
    assert broker.enrolled
    paths = [path for path, _ in broker.requests]
    assert paths == ["/v1/attestation/enroll", "/v1/attestation/activate"]
    sent = broker.requests[0][1]
    assert sent["ek_public_pem"].encode() == tpm.ek_pem
    assert base64.b64decode(sent["ak_public_b64"]) == tpm.ak_public
    assert base64.b64decode(broker.requests[1][1]["secret_b64"]) == broker.secret
    record = read_enrollment(host.attestation_dir)
    assert record is not None and record.ak_name_hex == name
    assert record.ek_fingerprint == ek_fingerprint(tpm.ek_pem)
    assert stat.S_IMODE((host.attestation_dir / "enrolled.json").stat().st_mode) == 0o600
    assert stat.S_IMODE(host.attestation_dir.stat().st_mode) == 0o700


def test_enroll_drops_a_cached_token(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    client.attest()
    assert (host.attestation_dir / "token.json").exists()
    enroll(client, tpm, host.attestation_dir)
    assert not (host.attestation_dir / "token.json").exists()


def test_enroll_refused_when_the_ek_is_not_pinned_is_one_line(host, broker, tpm, clock):
    broker.pinned = False
    client = WiredClient(host, broker, tpm, clock)
    with pytest.raises(BrokerRefused) as refused:
        enroll(client, tpm, host.attestation_dir)
    text = str(refused.value)
    assert text.startswith("the broker refused to enroll this host's TPM (HTTP 403): host h1 has no pinned TPM")
    assert one_line(text)
    assert read_enrollment(host.attestation_dir) is None


def test_a_credential_for_another_ak_does_not_activate(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    original = broker.http

    def other_ak(method: str, path: str, body: dict | None) -> tuple[int, dict]:
        status, answer = original(method, path, body)
        if path == "/v1/attestation/enroll":
            answer["id_object_b64"] = base64.b64encode(b"ID:another AK").decode()
        return status, answer

    broker.http = other_ak  # type: ignore[method-assign]
    with pytest.raises(HostError, match="could not activate"):
        enroll(client, tpm, host.attestation_dir)
    assert not broker.enrolled


# --- Attestation and the token cache ------------------------------------------------------------


def test_attest_quotes_the_challenge_and_keeps_the_token_in_a_0600_file(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    result = client.attest()
    assert result.token == "token-1"
    assert result.policy == "default"
    # The expiry is on the host's clock, from expires_in, not the broker's expires_at.
    assert result.expires_at == clock.now + TTL
    quote = broker.requests[-1][1]
    assert base64.b64decode(quote["quote_b64"]) == b"QUOTE:" + base64.b64decode(quote["nonce_b64"])
    assert quote["pcr_values"] == {str(i): GOLDEN[i].hex() for i in range(8)}
    path = host.attestation_dir / "token.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(host.attestation_dir.stat().st_mode) == 0o700
    assert json.loads(path.read_text())["token"] == "token-1"


def test_a_second_process_reuses_the_valid_token_from_the_file(host, broker, tpm, clock):
    WiredClient(host, broker, tpm, clock).unwrap(key_safe(), "vm-1", "vm")
    assert tpm.quotes == 1
    later = WiredClient(host, broker, tpm, clock)  # the next `vtpm-host power-on`
    clock.now += TTL / 2
    assert later.unwrap(key_safe(), "vm-2", "vm") == DEK
    assert tpm.quotes == 1
    assert broker.decrypts == [b"token-1", b"token-1"]


def test_an_expired_token_in_the_file_is_dropped_and_a_new_attestation_made(host, broker, tpm, clock):
    WiredClient(host, broker, tpm, clock).attest()
    clock.now += TTL + 1
    cache = TokenCache(host.attestation_dir, binding="h1@https://127.0.0.1:8443", clock=clock)
    assert cache.get() is None
    assert not (host.attestation_dir / "token.json").exists()
    later = WiredClient(host, broker, tpm, clock)
    assert later.unwrap(key_safe(), "vm-1", "vm") == DEK
    assert tpm.quotes == 2
    assert broker.decrypts == [b"token-2"]


def test_a_token_about_to_expire_is_not_presented(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    client.attest()
    clock.now += TTL - host_attest.EXPIRY_MARGIN
    assert client.unwrap(key_safe(), "vm-1", "vm") == DEK
    assert broker.decrypts == [b"token-2"]


def test_a_token_file_for_another_broker_or_host_is_ignored(host, broker, tpm, clock):
    WiredClient(host, broker, tpm, clock).attest()
    other = TokenCache(host.attestation_dir, binding="h1@https://other-broker:8443", clock=clock)
    assert other.get() is None
    same = TokenCache(host.attestation_dir, binding="h1@https://127.0.0.1:8443", clock=clock)
    found = same.get()
    assert found is not None and found.token == "token-1"


@pytest.mark.parametrize(
    "content", ["not json", "[]", '{"version": 1, "binding": "h1@https://127.0.0.1:8443", "token": 5}']
)
def test_a_torn_or_foreign_token_file_is_no_token(host, clock, content):
    host.attestation_dir.mkdir(mode=0o700)
    (host.attestation_dir / "token.json").write_text(content)
    assert TokenCache(host.attestation_dir, binding="h1@https://127.0.0.1:8443", clock=clock).get() is None


def test_the_token_never_reaches_a_repr():
    assert "secret-token" not in repr(Attestation("secret-token", 1.0, "p"))


def test_a_refused_quote_is_one_line_and_nothing_is_unwrapped(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    client.attest()
    broker.tokens.clear()
    tpm.pcrs[7] = b"\xee" * 32  # a tampered boot
    with pytest.raises(BrokerRefused) as refused:
        client.unwrap(key_safe(), "vm-1", "vm")
    text = str(refused.value)
    assert text == "the broker refused this host's attestation: attestation failed: PCR 7 differs from policy default"
    assert broker.decrypts == [b"token-1"]  # the stale token, refused; nothing after the refused quote
    assert not (host.attestation_dir / "token.json").exists()


def test_a_refused_attestation_drops_the_cached_token(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    client.attest()
    tpm.pcrs[3] = b"\xee" * 32
    with pytest.raises(BrokerRefused, match="PCR 3 differs"):
        client.attest()
    assert client.tokens.get() is None
    assert not (host.attestation_dir / "token.json").exists()


def test_no_policy_no_token_and_no_ticket(host, broker, tpm, clock):
    broker.policy = None
    client = WiredClient(host, broker, tpm, clock)
    assert client.unwrap(key_safe(), "vm-1", "vm") == DEK
    assert client.unwrap(key_safe(), "vm-2", "vm") == DEK
    assert broker.decrypts == [None, None]
    assert tpm.quotes == 1  # remembered for this process
    assert not (host.attestation_dir / "token.json").exists()


# --- The unwrap's one retry ---------------------------------------------------------------------


def test_unwrap_attests_again_once_when_the_gateway_requires_it(host, broker, tpm, clock):
    """A policy set after this host found none: the gateway asks for attestation; one more quote, then the DEK."""
    broker.policy = None
    client = WiredClient(host, broker, tpm, clock)
    client.attest()
    broker.policy = "default"
    assert client.unwrap(key_safe(), "vm-1", "vm") == DEK
    assert broker.decrypts == [None, b"token-1"]
    assert tpm.quotes == 2


def test_unwrap_attests_again_once_when_the_token_is_refused(host, broker, tpm, clock):
    """The host rebooted (or the policy changed): the broker no longer accepts the cached token."""
    client = WiredClient(host, broker, tpm, clock)
    client.attest()
    broker.tokens.clear()
    assert client.unwrap(key_safe(), "vm-1", "vm") == DEK
    assert broker.decrypts == [b"token-1", b"token-2"]
    assert json.loads((host.attestation_dir / "token.json").read_text())["token"] == "token-2"


def test_unwrap_gives_up_after_a_second_refusal_with_one_line(host, broker, tpm, clock):
    broker.gateway_refuses = ResultReason.ATTESTATION_FAILED
    client = WiredClient(host, broker, tpm, clock)
    with pytest.raises(BrokerRefused) as refused:
        client.unwrap(key_safe(), "vm-1", "vm")
    text = str(refused.value)
    assert text == "the broker refused this host's attestation: host h1's TPM is revoked"
    assert len(broker.decrypts) == 2
    assert tpm.quotes == 2
    assert not (host.attestation_dir / "token.json").exists()


def test_a_host_without_a_tpm_is_told_how_to_attest(host, broker, clock):
    client = WiredClient(host, broker, None, clock)
    assert not client.attests
    with pytest.raises(BrokerRefused) as refused:
        client.unwrap(key_safe(), "vm-1", "vm")
    text = str(refused.value)
    assert "requires host h1 to attest with its TPM" in text and "--tpm TCTI" in text
    assert one_line(text)
    assert broker.decrypts == [None]
    assert broker.requests == []


def test_other_refusals_are_not_retried(host, broker, tpm, clock):
    broker.gateway_refuses = ResultReason.CRYPTOGRAPHIC_FAILURE
    client = WiredClient(host, broker, tpm, clock)
    with pytest.raises(HostError, match="does not unwrap"):
        client.unwrap(key_safe(), "vm-1", "vm")
    assert len(broker.decrypts) == 1


# --- Malformed answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, answer, says",
    [
        ("/v1/attestation/challenge", {"nonce_b64": "AAAA", "pcr_bank": "sha256", "pcrs": "0-7"}, "PCR bank"),
        ("/v1/attestation/challenge", {"nonce_b64": "!!", "pcr_bank": "sha256", "pcrs": [0]}, "nonce_b64"),
        ("/v1/attestation/challenge", {"nonce_b64": "AAAA", "pcr_bank": "sha256", "pcrs": [0]}, "3 bytes"),
        ("/v1/attestation/quote", {"token": 5, "policy": None}, "no token"),
        ("/v1/attestation/quote", {"token": "t", "policy": "p"}, "no expiry"),
    ],
)
def test_malformed_answers_are_one_line_errors(host, broker, tpm, clock, path, answer, says):
    original = broker.http

    def malformed(method: str, asked: str, body: dict | None) -> tuple[int, dict]:
        status, good = original(method, asked, body)
        return (200, answer) if asked == path else (status, good)

    broker.http = malformed  # type: ignore[method-assign]
    with pytest.raises(HostError) as failed:
        WiredClient(host, broker, tpm, clock).attest()
    assert says in str(failed.value) and one_line(str(failed.value))


def test_a_broker_without_attestation_is_named(host, broker, tpm, clock):
    broker.http = lambda method, path, body: (404, {"error": f"no such endpoint {path}"})  # type: ignore[method-assign]
    with pytest.raises(BrokerRefused, match="has no host attestation"):
        WiredClient(host, broker, tpm, clock).attest()


def test_a_quote_missing_a_pcr_is_refused_before_sending(host, broker, clock):
    class ShortTpm(FakeTpm):
        def quote(self, nonce: bytes, bank: str, pcrs: Sequence[int]) -> tuple[bytes, bytes, dict[int, bytes]]:
            attest, signature, values = super().quote(nonce, bank, pcrs)
            values.pop(7)
            return attest, signature, values

    with pytest.raises(HostError, match="lacks sha256 PCR 7"):
        WiredClient(host, broker, ShortTpm(), clock).attest()
    assert [path for path, _ in broker.requests] == ["/v1/attestation/challenge"]


# --- Status -------------------------------------------------------------------------------------


def test_status_reports_enrollment_and_token(host, broker, tpm, clock):
    client = WiredClient(host, broker, tpm, clock)
    cache = TokenCache(host.attestation_dir, binding="h1@https://127.0.0.1:8443", clock=clock)
    before = attestation_status("swtpm:path=x", host.attestation_dir, tpm, cache, clock.now)
    assert (before.enrolled, before.token_expires_at) == (False, None)
    assert before.ek_fingerprint == ek_fingerprint(tpm.ek_pem)
    enroll(client, tpm, host.attestation_dir)
    client.attest()
    after = attestation_status("swtpm:path=x", host.attestation_dir, tpm, cache, clock.now)
    assert after.enrolled and after.ak_name_hex == "000b" + "ab" * 32
    assert after.token_valid and after.token_expires_at == clock.now + TTL and after.policy == "default"
    other = FakeTpm()  # the TPM was replaced: the recorded enrollment is not its
    replaced = attestation_status("swtpm:path=x", host.attestation_dir, other, cache, clock.now + TTL)
    assert not replaced.enrolled and not replaced.token_valid


def test_status_reports_a_tpm_that_does_not_answer(host, clock):
    class DeadTpm(FakeTpm):
        def ek_public_pem(self) -> bytes:
            raise HostError("the host TPM (swtpm:path=x) could not read its EK: tpm2_readpublic failed")

    cache = TokenCache(host.attestation_dir, clock=clock)
    status = attestation_status("swtpm:path=x", host.attestation_dir, DeadTpm(), cache, clock.now)
    assert status.tpm_error is not None and "tpm2_readpublic" in status.tpm_error
    assert status.ek_fingerprint is None and not status.enrolled


# --- Config and CLI -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trust_ca_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from broker.trust_ca import create_trust_ca

    path = tmp_path_factory.mktemp("ca") / "trust-ca.pem"
    path.write_text(create_trust_ca("attest-test").cert_pem)
    return path


def _init(state: Path, ca: Path, tpm: str | None = None) -> None:
    init_state_dir(state, "h1", ["127.0.0.1:5697"], "https://127.0.0.1:8443", ca, tpm=tpm)


def test_init_tpm_writes_the_attestation_table_and_init_again_keeps_it(tmp_path, trust_ca_file):
    state = tmp_path / "st"
    _init(state, trust_ca_file)
    assert load_config(state).attestation_tcti is None
    _init(state, trust_ca_file, tpm="device:/dev/tpmrm0")
    assert load_config(state).attestation_tcti == "device:/dev/tpmrm0"
    _init(state, trust_ca_file)
    assert load_config(state).attestation_tcti == "device:/dev/tpmrm0"
    _init(state, trust_ca_file, tpm="swtpm:path=/run/h1/swtpm.sock")
    assert load_config(state).attestation_tcti == "swtpm:path=/run/h1/swtpm.sock"


@pytest.mark.parametrize("tcti", ["bogus", "device:/dev/tpm rm0", "", "swtpm:path=a\nb"])
def test_init_refuses_a_bad_tcti(tmp_path, trust_ca_file, tcti):
    with pytest.raises(HostError, match="is not a TCTI"):
        _init(tmp_path / "st", trust_ca_file, tpm=tcti)


@pytest.mark.parametrize(
    "table, says",
    [
        ('[attestation]\ntcti = "device:/dev/tpmrm0"\nextra = 1\n', "unknown key 'extra' in [attestation]"),
        ("[attestation]\n", "[attestation] needs tcti"),
        ('[attestation]\ntcti = "nope"\n', "is not a TCTI"),
        ('attestation = "device:/dev/tpmrm0"\n', "attestation must be a table"),
    ],
)
def test_bad_attestation_tables_are_one_line_errors(tmp_path, trust_ca_file, table, says):
    state = tmp_path / "st"
    _init(state, trust_ca_file)
    config = state / "config.toml"
    text = config.read_text()
    if table.startswith("attestation ="):
        text = table + text
    else:
        text += table
    config.write_text(text)
    with pytest.raises(HostError) as failed:
        load_config(state)
    assert says in str(failed.value) and one_line(str(failed.value))


def test_check_config_prints_the_tcti_or_off(tmp_path, trust_ca_file, capsys):
    state = tmp_path / "st"
    _init(state, trust_ca_file)
    assert host_cli.main(["--state-dir", str(state), "check-config"]) == 0
    assert "attestation = off" in capsys.readouterr().out
    _init(state, trust_ca_file, tpm="device:/dev/tpmrm0")
    assert host_cli.main(["--state-dir", str(state), "check-config"]) == 0
    assert "attestation.tcti = device:/dev/tpmrm0" in capsys.readouterr().out


@pytest.mark.parametrize("command", [["ek-pub"], ["enroll"], ["now"], ["status", "--json"]])
def test_attest_commands_without_a_tpm_say_how_to_add_one(tmp_path, trust_ca_file, capsys, command):
    state = tmp_path / "st"
    _init(state, trust_ca_file)
    assert host_cli.main(["--state-dir", str(state), "attest", *command]) == 2
    err = capsys.readouterr().err.strip()
    assert one_line(err) and err.startswith("vtpm-host: error: host h1 has no host TPM configured")
    assert "--tpm TCTI" in err


def test_attest_now_json_never_prints_the_token(tmp_path, trust_ca_file, capsys, monkeypatch, broker, tpm):
    state = tmp_path / "st"
    _init(state, trust_ca_file, tpm="swtpm:path=/nonexistent/swtpm.sock")
    (state / "host.pem").write_text("placeholder\n")
    clock = Clock()

    def wired(config: HostConfig) -> WiredClient:
        return WiredClient(config, broker, tpm, clock)

    monkeypatch.setattr("broker.host.broker_client.BrokerClient", wired)
    assert host_cli.main(["--state-dir", str(state), "attest", "now", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"attested": True, "expires_at": clock.now + TTL, "policy": "default"}
    assert "token-1" not in out


def test_power_ons_that_start_together_attest_once_and_never_drive_the_tpm_at_once(host, broker, tpm, clock):
    """Eight `vtpm-host power-on`s of one host, started together with no
    token cached: one attests (under the host's lock), the others wait and
    use its token; the TPM never quotes twice at once."""
    import threading

    inside = []
    overlapped = []
    quote = tpm.quote

    def slow_quote(nonce: bytes, bank: str, pcrs: Sequence[int]) -> tuple[bytes, bytes, dict[int, bytes]]:
        if inside:
            overlapped.append(True)
        inside.append(True)
        try:
            time.sleep(0.05)
            return quote(nonce, bank, pcrs)
        finally:
            inside.pop()

    tpm.quote = slow_quote  # type: ignore[method-assign]
    start = threading.Barrier(8)
    results: list[bytes] = []

    def power_on(n: int) -> None:
        client = WiredClient(host, broker, tpm, clock)  # each its own process's client
        start.wait()
        results.append(client.unwrap(key_safe(), f"vm-{n}", "vm"))

    threads = [threading.Thread(target=power_on, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == [DEK] * 8
    assert tpm.quotes == 1 and not overlapped
