"""Host attestation (docs/attestation.md): a host unwraps its VMs' keys only
while it proves, with its own TPM, that it booted what the policy accepts.

- The security administrator pins a host's TPM by its endorsement key
  (`pin_host_ek`). The host enrolls an attestation key (AK) under it: the
  broker makes a credential only that TPM can open for that AK
  (`begin_tpm_enrollment`, TPM2_MakeCredential in software), and the host's
  answer proves the AK lives in the pinned TPM (`finish_tpm_enrollment`).
- A policy names the accepted PCR values, per host, per host group (the
  hosts of one management instance) or for every host (`set_attest_policy`,
  `capture_attest_policy` from a known-good host's last quote).
- Before unwrapping, the host asks for a fresh nonce (`attestation_challenge`),
  quotes its PCRs with it, and sends the quote (`attest_host`). The broker
  checks the AK's signature, the nonce (single use), the PCR digest, the
  boot counters and the policy, and issues a short-lived token bound to the
  host, its AK, its boot and the policy; the gateway checks that token with
  every unwrap (`check_attestation`).

Every step and every refusal is in the audit trail; a failed quote's record
names the PCRs that differed. Nonces, enrollment secrets and tokens are
stored as SHA-256 digests only.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy import delete, select, update

from broker.attest import tpm2
from broker.db import attest_nonces, attest_policies, attest_tokens, host_tpms, hosts
from broker.registry.audit import AuditTrail
from broker.registry.model import InvalidRequest, NotFound, Refused, check_host_name, check_instance_name

__all__ = [
    "DEFAULT_PCRS",
    "AttestResult",
    "AttestationCheck",
    "AttestationSettings",
    "Challenge",
    "HostAttestation",
    "PolicyInfo",
    "Attestation",
    "check_scope",
    "parse_pcr_selection",
]

DEFAULT_PCRS = (0, 1, 2, 3, 4, 5, 6, 7)
MAX_TOKEN_TTL = 3600


@dataclass(frozen=True)
class AttestationSettings:
    """`[attestation]` of the broker's configuration."""

    # Every host must attest (a host no policy covers is refused); when
    # False, hosts that a policy covers must, the others need not.
    required: bool = False
    token_ttl: int = 300
    nonce_ttl: int = 60
    enrollment_ttl: int = 300
    # The selection quoted when no policy covers the host (the quote is then
    # recorded for `attest-policy capture`).
    pcr_bank: str = "sha256"
    pcrs: tuple[int, ...] = DEFAULT_PCRS


@dataclass(frozen=True)
class Challenge:
    nonce: bytes
    pcr_bank: str
    pcrs: tuple[int, ...]
    expires_in: int


@dataclass(frozen=True)
class AttestResult:
    """A verified quote: the token (None when no policy covers the host)."""

    token: str | None
    expires_at: float | None
    policy: str | None


@dataclass(frozen=True)
class AttestationCheck:
    """The gateway's question: may this host unwrap now, as far as
    attestation goes? `missing`: attestation is required and no token came
    (ATTESTATION_REQUIRED); otherwise a refusal is ATTESTATION_FAILED."""

    allowed: bool
    required: bool
    reason: str
    missing: bool = False


@dataclass(frozen=True)
class PolicyInfo:
    scope: str
    pcr_bank: str
    pcrs: dict[int, str]
    digest: str
    source: str
    created_by: str
    created_at: float

    def as_json(self) -> dict:
        """The policy as the API and `attest-policy list --json` show it."""
        return {**self.__dict__, "pcrs": {str(k): v for k, v in self.pcrs.items()}}


@dataclass(frozen=True)
class HostAttestation:
    """One host's attestation status (`vtpm-broker admin list`, metrics)."""

    host: str
    instance: str
    tpm_state: str  # "none", "pinned", "enrolled", "revoked"
    policy: str | None
    last_result: str | None
    last_reason: str | None
    last_quote_at: float | None
    reset_count: int | None
    token_expires_at: float | None

    def as_json(self) -> dict:
        """The host's status as the API and `admin list --hosts --json` show it."""
        return {**self.__dict__, "status": self.status}

    @property
    def status(self) -> str:
        """One word: attested (a valid token), failed, stale (attested once,
        no valid token now), enrolled, pinned, revoked or none."""
        if self.tpm_state != "enrolled":
            return self.tpm_state
        if self.last_result == "failed":
            return "failed"
        if self.token_expires_at is not None:
            return "attested"
        return "stale" if self.last_result == "attested" else "enrolled"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_scope(scope: object) -> str:
    """`default`, `host:<name>` or `instance:<name>`."""
    if scope == "default":
        return "default"
    if isinstance(scope, str) and ":" in scope:
        kind, name = scope.split(":", 1)
        if kind == "host":
            return f"host:{check_host_name(name)}"
        if kind == "instance":
            return f"instance:{check_instance_name(name)}"
    raise InvalidRequest("a policy's scope is 'default', 'host:<name>' or 'instance:<name>'")


def parse_pcr_selection(text: str) -> tuple[str, tuple[int, ...]]:
    """`sha256:0,1,2,3,4,5,6,7` (ranges allowed: `sha256:0-7`) -> (bank, indices)."""
    bank, _, spec = text.partition(":")
    bank = bank.strip().lower()
    if bank not in tpm2.PCR_BANKS or not spec.strip():
        raise InvalidRequest(f"a PCR selection is BANK:LIST such as sha256:0-7 (banks: {', '.join(tpm2.PCR_BANKS)})")
    indices: set[int] = set()
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise InvalidRequest(f"PCR selection {text!r}: {part.strip()!r} is not an index or a range") from None
        if not 0 <= first <= last <= 23:
            raise InvalidRequest(f"PCR selection {text!r}: PCR indices are 0 to 23")
        indices.update(range(first, last + 1))
    return bank, tuple(sorted(indices))


def _check_values(
    bank: str, values: Mapping[object, object], pcrs: Sequence[int] | None = None, field: str = "pcr_values"
) -> dict[int, bytes]:
    """{index: digest} from JSON's {"7": "hex"}; each the bank's digest size.
    `field` names the values in errors (a quote's pcr_values, a policy's pcrs)."""
    if not isinstance(values, Mapping) or not values:
        raise InvalidRequest(f'{field} must be an object such as {{"0": "<hex>", ...}}')
    out: dict[int, bytes] = {}
    for key, value in values.items():
        try:
            index = int(str(key))
            digest = bytes.fromhex(str(value))
        except ValueError:
            raise InvalidRequest(f"{field} maps PCR indices to hexadecimal digests") from None
        if not 0 <= index <= 23 or len(digest) != tpm2.digest_size(bank):
            raise InvalidRequest(f"PCR {key}: a {bank} PCR is {tpm2.digest_size(bank)} bytes, index 0 to 23")
        if index in out:
            # "7" and "07" are one PCR: the later one must not silently win.
            raise InvalidRequest(f"{field} gives PCR {index} twice")
        out[index] = digest
    if pcrs is not None and sorted(out) != list(pcrs):
        raise InvalidRequest(f"{field} must give exactly PCRs {', '.join(map(str, pcrs))}")
    return out


def _policy_digest(bank: str, pcrs: Mapping[int, bytes]) -> str:
    canonical = json.dumps({"bank": bank, "pcrs": {str(i): pcrs[i].hex() for i in sorted(pcrs)}}, sort_keys=True)
    return _sha256(canonical.encode())


class Attestation(AuditTrail):
    """Host TPMs, attestation policies, quotes and tokens."""

    attestation = AttestationSettings()

    # Administration -----------------------------------------------------------------

    def pin_host_ek(self, host: str, ek_public_pem: bytes, actor: str = "local-security-admin") -> str:
        """Pin a registered host's TPM by its EK public key (PEM); returns
        the EK's fingerprint. Re-pinning (a replaced TPM, a revoked one)
        starts over: the host enrolls an AK again."""
        with self._refusals_audited(actor, "host.tpm.pin", str(host)[:64]):
            check_host_name(host)
            try:
                ek = tpm2.ek_public_from_pem(ek_public_pem)
            except tpm2.Tpm2Error as exc:
                raise InvalidRequest(f"the EK public key does not load: {exc}") from None
            fp = tpm2.spki_fingerprint(ek)
            now = self.clock()
            with self._audit_lock, self.db.begin() as conn:
                if conn.execute(select(hosts.c.name).where(hosts.c.name == host)).first() is None:
                    raise NotFound(f"no host named {host}")
                conn.execute(delete(host_tpms).where(host_tpms.c.host == host))
                conn.execute(delete(attest_tokens).where(attest_tokens.c.host == host))
                conn.execute(
                    host_tpms.insert().values(
                        host=host,
                        state="pinned",
                        ek_fingerprint=fp,
                        ek_public_pem=ek_public_pem.decode("ascii", "replace"),
                        pinned_by=actor,
                        pinned_at=now,
                        changed_at=now,
                    )
                )
                self._append_audit(conn, actor, "host.tpm.pin", host, True, f"TPM pinned, EK sha256:{fp}")
        return fp

    def revoke_host_tpm(self, host: str, actor: str = "local-security-admin") -> None:
        """The host's TPM is no longer trusted: its tokens are void, its
        quotes refused, until its EK is pinned again."""
        with self._refusals_audited(actor, "host.tpm.revoke", str(host)[:64]):
            check_host_name(host)
            now = self.clock()
            with self._audit_lock, self.db.begin() as conn:
                found = conn.execute(
                    update(host_tpms).where(host_tpms.c.host == host).values(state="revoked", changed_at=now)
                ).rowcount
                if not found:
                    raise NotFound(f"host {host} has no pinned TPM")
                tokens = conn.execute(delete(attest_tokens).where(attest_tokens.c.host == host)).rowcount
                self._append_audit(
                    conn, actor, "host.tpm.revoke", host, True, f"TPM revoked, {tokens} attestation tokens void"
                )

    def set_attest_policy(
        self,
        scope: str,
        pcr_bank: str,
        pcrs: Mapping[object, object],
        *,
        source: str = "given",
        actor: str = "local-security-admin",
    ) -> PolicyInfo:
        """Set (replace) the accepted PCR values for `scope`. Tokens issued
        under the policy it replaces are void."""
        with self._refusals_audited(actor, "attest.policy.set", str(scope)[:80]):
            scope = check_scope(scope)
            if pcr_bank not in tpm2.PCR_BANKS:
                raise InvalidRequest(f"unknown PCR bank {pcr_bank!r}; use one of {', '.join(tpm2.PCR_BANKS)}")
            values = _check_values(pcr_bank, pcrs, field="pcrs")
            return self._store_policy(scope, pcr_bank, values, source, actor)

    def capture_attest_policy(
        self, scope: str, from_host: str, pcrs: Sequence[int] | None = None, actor: str = "local-security-admin"
    ) -> PolicyInfo:
        """The golden values: the PCRs of `from_host`'s last verified quote
        (run `vtpm-host attest now` on a known-good host first), or the
        subset `pcrs` of them."""
        with self._refusals_audited(actor, "attest.policy.set", str(scope)[:80]):
            scope = check_scope(scope)
            check_host_name(from_host)
            if pcrs is not None and not pcrs:
                # An empty selection would accept any boot.
                raise InvalidRequest("name at least one PCR to capture, or leave the selection out for all of them")
            with self.db.read() as conn:
                row = conn.execute(select(host_tpms).where(host_tpms.c.host == from_host)).first()
            if row is None or row.state != "enrolled" or not row.last_pcrs:
                raise Refused(
                    f"host {from_host} has no verified quote to capture; enroll its TPM and run 'vtpm-host attest now' on it"
                )
            quoted = {int(k): bytes.fromhex(v) for k, v in json.loads(row.last_pcrs).items()}
            chosen = sorted(quoted) if pcrs is None else sorted(set(pcrs))
            missing = [i for i in chosen if i not in quoted]
            if missing:
                raise InvalidRequest(
                    f"host {from_host}'s last quote covers PCRs {', '.join(map(str, sorted(quoted)))}, not "
                    f"{', '.join(map(str, missing))}; set [attestation] pcrs and let it attest again"
                )
            values = {i: quoted[i] for i in chosen}
            when = row.last_quote_at
            return self._store_policy(
                scope, row.last_pcr_bank, values, f"captured from host {from_host} (quote at {when:.0f})", actor
            )

    def _store_policy(self, scope: str, bank: str, values: dict[int, bytes], source: str, actor: str) -> PolicyInfo:
        now = self.clock()
        digest = _policy_digest(bank, values)
        shown = {i: values[i].hex() for i in sorted(values)}
        with self._audit_lock, self.db.begin() as conn:
            replaced = conn.execute(delete(attest_policies).where(attest_policies.c.scope == scope)).rowcount
            conn.execute(
                attest_policies.insert().values(
                    scope=scope,
                    pcr_bank=bank,
                    pcrs=json.dumps({str(i): h for i, h in shown.items()}, sort_keys=True),
                    digest=digest,
                    source=source,
                    created_by=actor,
                    created_at=now,
                )
            )
            what = "replaced" if replaced else "set"
            self._append_audit(
                conn,
                actor,
                "attest.policy.set",
                scope,
                True,
                f"policy {what}: {bank} PCRs {','.join(map(str, shown))}, digest {digest[:16]}, {source}",
            )
        return PolicyInfo(scope, bank, shown, digest, source, actor, now)

    def remove_attest_policy(self, scope: str, actor: str = "local-security-admin") -> None:
        with self._refusals_audited(actor, "attest.policy.remove", str(scope)[:80]):
            scope = check_scope(scope)
            with self._audit_lock, self.db.begin() as conn:
                if not conn.execute(delete(attest_policies).where(attest_policies.c.scope == scope)).rowcount:
                    raise NotFound(f"no attestation policy for {scope}")
                self._append_audit(conn, actor, "attest.policy.remove", scope, True, "policy removed")

    def attest_policies(self) -> list[PolicyInfo]:
        with self.db.read() as conn:
            rows = conn.execute(select(attest_policies).order_by(attest_policies.c.scope)).all()
        return [_policy_info(row) for row in rows]

    def attestation_status(self) -> list[HostAttestation]:
        """Every registered host's attestation status, by name."""
        now = self.clock()
        with self.db.read() as conn:
            host_rows = conn.execute(select(hosts.c.name, hosts.c.instance).order_by(hosts.c.name)).all()
            tpms = {row.host: row for row in conn.execute(select(host_tpms)).all()}
            scopes = {row.scope for row in conn.execute(select(attest_policies.c.scope)).all()}
            tokens: dict[str, float] = {}
            for row in conn.execute(
                select(attest_tokens.c.host, attest_tokens.c.expires_at).where(attest_tokens.c.expires_at > now)
            ).all():
                tokens[row.host] = max(tokens.get(row.host, 0.0), row.expires_at)
        out = []
        for row in host_rows:
            tpm = tpms.get(row.name)
            scope = _scope_of(scopes, row.name, row.instance)
            out.append(
                HostAttestation(
                    host=row.name,
                    instance=row.instance,
                    tpm_state=tpm.state if tpm is not None else "none",
                    policy=scope,
                    last_result=tpm.last_result if tpm is not None else None,
                    last_reason=tpm.last_reason if tpm is not None else None,
                    last_quote_at=tpm.last_quote_at if tpm is not None else None,
                    reset_count=tpm.reset_count if tpm is not None else None,
                    token_expires_at=tokens.get(row.name) if tpm is not None and tpm.state == "enrolled" else None,
                )
            )
        return out

    # The host's side of enrollment ---------------------------------------------------------

    def begin_tpm_enrollment(self, host: str, ek_public_pem: str, ak_public: bytes) -> tuple[bytes, bytes]:
        """A credential for the AK under the pinned EK: (TPM2B_ID_OBJECT,
        TPM2B_ENCRYPTED_SECRET). Only the TPM holding both keys opens it."""
        actor = f"host:{host}"
        with self._refusals_audited(actor, "host.tpm.enroll", host):
            try:
                ek = tpm2.ek_public_from_pem(ek_public_pem.encode())
                ak = tpm2.parse_public(ak_public)
            except tpm2.Tpm2Error as exc:
                raise InvalidRequest(f"the TPM public key does not parse: {exc}") from None
            problem = ak.attestation_key_problem()
            if problem is not None:
                raise InvalidRequest(f"the key offered is not an attestation key: {problem}")
            secret = secrets.token_bytes(32)
            try:
                id_object, encrypted_secret = tpm2.make_credential(ek, ak.name, secret)  # type: ignore[arg-type]
            except tpm2.Tpm2Error as exc:
                raise InvalidRequest(str(exc)) from None
            now = self.clock()
            with self._audit_lock, self.db.begin() as conn:
                row = conn.execute(select(host_tpms).where(host_tpms.c.host == host)).first()
                if row is None:
                    raise Refused(
                        f"host {host}'s TPM is not pinned; the security administrator runs "
                        f"'vtpm-broker admin attest pin-ek {host} --ek-pub FILE' first"
                    )
                if row.state == "revoked":
                    raise Refused(f"host {host}'s TPM is revoked; the security administrator pins it again")
                if not hmac.compare_digest(row.ek_fingerprint, tpm2.spki_fingerprint(ek)):
                    raise Refused(f"the EK offered is not the one pinned for host {host} (another TPM?)")
                conn.execute(
                    update(host_tpms)
                    .where(host_tpms.c.host == host)
                    .values(
                        pending_ak_public=ak_public,
                        pending_ak_name=ak.name.hex(),
                        pending_secret_sha256=_sha256(secret),
                        pending_expires_at=now + self.attestation.enrollment_ttl,
                        changed_at=now,
                    )
                )
                self._append_audit(
                    conn, actor, "host.tpm.enroll", host, True, f"credential made for AK {ak.name.hex()[:20]}"
                )
        return id_object, encrypted_secret

    def finish_tpm_enrollment(self, host: str, secret: bytes) -> str:
        """The secret the TPM recovered: the AK lives in the pinned TPM.
        Returns the AK name (hex). One answer per credential: a wrong one
        ends the enrollment (recorded), and the host starts again."""
        actor = f"host:{host}"
        with self._refusals_audited(actor, "host.tpm.activate", host):
            now = self.clock()
            with self._audit_lock, self.db.begin() as conn:
                row = conn.execute(select(host_tpms).where(host_tpms.c.host == host)).first()
                if row is None or row.state == "revoked" or row.pending_secret_sha256 is None:
                    raise Refused(f"host {host} has no TPM enrollment under way; run 'vtpm-host attest enroll'")
                if row.pending_expires_at < now:
                    raise Refused("the TPM enrollment expired; run 'vtpm-host attest enroll' again")
                matches = hmac.compare_digest(row.pending_secret_sha256, _sha256(secret))
                pending = {
                    "pending_ak_public": None,
                    "pending_ak_name": None,
                    "pending_secret_sha256": None,
                    "pending_expires_at": None,
                    "changed_at": now,
                }
                if not matches:
                    conn.execute(update(host_tpms).where(host_tpms.c.host == host).values(**pending))
                    self._append_audit(
                        conn,
                        actor,
                        "host.tpm.activate",
                        host,
                        False,
                        "refused: the secret does not match the credential (the AK is not in the pinned TPM)",
                    )
                else:
                    conn.execute(
                        update(host_tpms)
                        .where(host_tpms.c.host == host)
                        .values(
                            state="enrolled",
                            ak_public=row.pending_ak_public,
                            ak_name=row.pending_ak_name,
                            enrolled_at=now,
                            reset_count=None,
                            restart_count=None,
                            clock=None,
                            **pending,
                        )
                    )
                    conn.execute(delete(attest_tokens).where(attest_tokens.c.host == host))
                    self._append_audit(
                        conn, actor, "host.tpm.activate", host, True, f"TPM enrolled, AK {row.pending_ak_name[:20]}"
                    )
        if not matches:
            # Recorded above, in the transaction that ended the enrollment.
            raise Refused("the secret does not match the credential; the AK is not in the pinned TPM")
        return str(row.pending_ak_name)

    # Quotes and tokens -------------------------------------------------------------------------

    def attestation_challenge(self, host: str, instance: str) -> Challenge:
        """A fresh nonce and the PCR selection to quote."""
        with self._refusals_audited(f"host:{host}", "host.attest", host):
            now = self.clock()
            nonce = secrets.token_bytes(32)
            with self.db.begin() as conn:
                row = conn.execute(select(host_tpms.c.state).where(host_tpms.c.host == host)).first()
                if row is None or row.state != "enrolled":
                    state = row.state if row is not None else "not pinned"
                    raise Refused(f"host {host}'s TPM is {state}, not enrolled; run 'vtpm-host attest enroll'")
                policy = self._policy_for(conn, host, instance)
                conn.execute(delete(attest_nonces).where(attest_nonces.c.expires_at < now))
                conn.execute(
                    attest_nonces.insert().values(
                        nonce_sha256=_sha256(nonce), host=host, expires_at=now + self.attestation.nonce_ttl
                    )
                )
        if policy is not None:
            bank, pcrs = policy.pcr_bank, tuple(sorted(policy.pcrs))
        else:
            bank, pcrs = self.attestation.pcr_bank, self.attestation.pcrs
        return Challenge(nonce, bank, pcrs, self.attestation.nonce_ttl)

    def attest_host(
        self,
        host: str,
        instance: str,
        nonce: bytes,
        attest: bytes,
        signature: bytes,
        pcr_values: Mapping[object, object],
    ) -> AttestResult:
        """Verify a quote; on success, a token. A refusal (Refused) is
        recorded with its reason, and a quote whose signature verified
        leaves its PCRs as the host's last evidence."""
        now = self.clock()
        # The nonce first, in a transaction of its own: consumed whatever
        # follows, so a quote is never accepted twice.
        with self.db.begin() as conn:
            used = conn.execute(
                delete(attest_nonces).where(
                    attest_nonces.c.nonce_sha256 == _sha256(nonce),
                    attest_nonces.c.host == host,
                    attest_nonces.c.expires_at >= now,
                )
            ).rowcount
            tpm = conn.execute(select(host_tpms).where(host_tpms.c.host == host)).first()
            policy = self._policy_for(conn, host, instance)
        quote: tpm2.Quote | None = None
        values: dict[int, bytes] | None = None
        fresh = False
        failure = None
        if tpm is None or tpm.state != "enrolled":
            failure = f"host {host}'s TPM is not enrolled"
        elif not used:
            failure = "the nonce is unknown, used or expired (a replayed or late quote); ask for a new challenge"
        else:
            try:
                quote = tpm2.verify_quote(tpm2.parse_public(tpm.ak_public), attest, signature)
            except tpm2.Tpm2Error as exc:
                failure = f"the quote does not verify with host {host}'s attestation key: {exc}"
        if failure is None and quote is not None:
            failure, values, fresh = self._appraise(tpm, quote, nonce, pcr_values, policy)
        if failure is not None:
            self._record_quote(host, quote if fresh else None, values, "failed", failure, now)
            # Recorded by _record_quote: the API does not record it again.
            raise Refused(f"attestation failed: {failure}")
        assert tpm is not None and quote is not None and values is not None
        if policy is None:
            if self.attestation.required:
                # Every host must attest ([attestation] required): a verified
                # quote with nothing to compare it with is a failed attestation.
                failure = f"no attestation policy covers host {host} and [attestation] required is on"
                self._record_quote(host, quote, values, "failed", failure, now)
                raise Refused(f"attestation failed: {failure}")
            reason = "quote verified; no attestation policy covers this host"
            self._record_quote(host, quote, values, "no policy", reason, now)
            return AttestResult(None, None, None)
        token = "vat1." + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        expires = now + self.attestation.token_ttl
        self._record_quote(
            host,
            quote,
            values,
            "attested",
            f"PCRs match policy {policy.scope}",
            now,
            token=(token, expires, tpm.ak_name, policy),
        )
        return AttestResult(token, expires, policy.scope)

    def _appraise(
        self,
        tpm,
        quote: tpm2.Quote,
        nonce: bytes,
        pcr_values: Mapping[object, object],
        policy: PolicyInfo | None,
    ) -> tuple[str | None, dict[int, bytes] | None, bool]:
        """The checks after the signature: (reason refused or None, the PCR
        values, whether the quote is newer than the last verified one)."""
        if not hmac.compare_digest(quote.extra_data, nonce):
            return "the quote is not over this challenge's nonce", None, False
        bank = policy.pcr_bank if policy is not None else self.attestation.pcr_bank
        wanted = tuple(sorted(policy.pcrs)) if policy is not None else self.attestation.pcrs
        if quote.pcr_bank != bank or tuple(quote.pcrs) != wanted:
            return (
                (
                    f"the quote covers {quote.pcr_bank} PCRs {','.join(map(str, quote.pcrs))}, "
                    f"the challenge asked for {bank} PCRs {','.join(map(str, wanted))}"
                ),
                None,
                False,
            )
        try:
            values = _check_values(bank, pcr_values, wanted)
        except InvalidRequest as exc:
            return str(exc), None, False
        if not hmac.compare_digest(tpm2.pcr_digest(bank, [values[i] for i in wanted]), quote.pcr_digest):
            return "the PCR values sent are not the ones the TPM quoted", None, False
        if tpm.reset_count is not None:
            last = (tpm.reset_count, tpm.restart_count, tpm.clock)
            now_counters = (quote.reset_count, quote.restart_count, quote.clock)
            if now_counters <= last:
                return (
                    (
                        "the quote is older than the host's last verified one (TPM reset/restart/clock "
                        f"{quote.reset_count}/{quote.restart_count}/{quote.clock}, last "
                        f"{tpm.reset_count}/{tpm.restart_count}/{tpm.clock})"
                    ),
                    values,
                    False,
                )
        if policy is not None:
            differ = [i for i in wanted if not hmac.compare_digest(values[i], bytes.fromhex(policy.pcrs[i]))]
            if differ:
                detail = "; ".join(
                    f"PCR {i} is {values[i].hex()[:16]}..., policy {policy.pcrs[i][:16]}..." for i in differ
                )
                return (
                    (
                        f"{bank} PCR{'s' if len(differ) > 1 else ''} {','.join(map(str, differ))} "
                        f"differ{'' if len(differ) > 1 else 's'} from policy {policy.scope} ({detail})"
                    ),
                    values,
                    True,
                )
        return None, values, True

    def _record_quote(
        self,
        host: str,
        quote: tpm2.Quote | None,
        values: dict[int, bytes] | None,
        result: str,
        reason: str,
        now: float,
        token: tuple[str, float, str, PolicyInfo] | None = None,
    ) -> None:
        """The audit record and, for a verified quote newer than the last one
        (`quote` given), its PCRs and counters as the host's evidence, in
        one transaction."""
        actor = f"host:{host}"
        changes: dict[str, object] = {"last_result": result, "last_reason": reason[:500], "changed_at": now}
        if quote is not None and values is not None:
            changes.update(
                last_quote_at=now,
                last_pcr_bank=quote.pcr_bank,
                last_pcrs=json.dumps({str(i): values[i].hex() for i in sorted(values)}, sort_keys=True),
            )
            changes.update(reset_count=quote.reset_count, restart_count=quote.restart_count, clock=quote.clock)
        boot = f" (TPM reset {quote.reset_count}, restart {quote.restart_count})" if quote is not None else ""
        with self._audit_lock, self.db.begin() as conn:
            conn.execute(
                update(host_tpms).where(host_tpms.c.host == host, host_tpms.c.state == "enrolled").values(**changes)
            )
            if token is not None and quote is not None:
                value, expires, ak_name, policy = token
                conn.execute(delete(attest_tokens).where(attest_tokens.c.expires_at < now))
                conn.execute(
                    attest_tokens.insert().values(
                        token_sha256=_sha256(value.encode()),
                        host=host,
                        ak_name=ak_name,
                        reset_count=quote.reset_count,
                        restart_count=quote.restart_count,
                        policy_scope=policy.scope,
                        policy_digest=policy.digest,
                        issued_at=now,
                        expires_at=expires,
                    )
                )
                reason = f"{reason}; token valid until {expires:.0f}"
            allowed = result != "failed"
            self._append_audit(conn, actor, "host.attest", host, allowed, (reason + boot)[:1000])

    def check_attestation(self, host: str, instance: str, ticket: bytes | None) -> AttestationCheck:
        """May this host unwrap now, as far as attestation goes? Reads
        only. The gateway asks it with the placement, in one read
        (`UnwrapPolicy.authorize_gateway_unwrap`)."""
        with self.db.read() as conn:
            return self._check_attestation_in(conn, host, instance, ticket)

    def _check_attestation_in(self, conn, host: str, instance: str, ticket: bytes | None) -> AttestationCheck:
        now = self.clock()
        policy = self._policy_for(conn, host, instance)
        if policy is None and not self.attestation.required:
            return AttestationCheck(True, False, "no attestation policy covers this host")
        if ticket is None:
            return AttestationCheck(False, True, "attestation required: the request carries no token", True)
        token = conn.execute(select(attest_tokens).where(attest_tokens.c.token_sha256 == _sha256(ticket))).first()
        if token is None or token.host != host:
            return AttestationCheck(False, True, "attestation token unknown (not issued to this host)")
        if token.expires_at < now:
            return AttestationCheck(False, True, f"attestation token expired {now - token.expires_at:.0f} s ago")
        tpm = conn.execute(select(host_tpms).where(host_tpms.c.host == host)).first()
        if tpm is None or tpm.state != "enrolled" or tpm.ak_name != token.ak_name:
            return AttestationCheck(False, True, "the host's TPM was revoked or re-enrolled since the token was issued")
        if (tpm.reset_count, tpm.restart_count) != (token.reset_count, token.restart_count):
            return AttestationCheck(False, True, "the host rebooted since the token was issued")
        if policy is None or policy.scope != token.policy_scope or policy.digest != token.policy_digest:
            return AttestationCheck(False, True, "the attestation policy changed since the token was issued")
        return AttestationCheck(True, True, f"attested under policy {policy.scope}")

    def _policy_for(self, conn, host: str, instance: str) -> PolicyInfo | None:
        candidates = _scopes(host, instance)
        rows = {
            row.scope: row
            for row in conn.execute(select(attest_policies).where(attest_policies.c.scope.in_(candidates))).all()
        }
        scope = _scope_of(set(rows), host, instance)
        return _policy_info(rows[scope]) if scope is not None else None


def _scopes(host: str, instance: str) -> tuple[str, str, str]:
    """The scopes that may cover a host, most specific first."""
    return (f"host:{host}", f"instance:{instance}", "default")


def _scope_of(scopes: set[str], host: str, instance: str) -> str | None:
    """The scope of the policy that covers the host, of those that exist."""
    return next((scope for scope in _scopes(host, instance) if scope in scopes), None)


def _policy_info(row) -> PolicyInfo:
    return PolicyInfo(
        scope=row.scope,
        pcr_bank=row.pcr_bank,
        pcrs={int(k): v for k, v in json.loads(row.pcrs).items()},
        digest=row.digest,
        source=row.source,
        created_by=row.created_by,
        created_at=row.created_at,
    )
