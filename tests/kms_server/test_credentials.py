"""kms_server.credentials: a password is accepted only from the certificate
identities it is bound to, and a verified credential is remembered briefly
under an HMAC, so Argon2id runs once rather than on every request."""

from __future__ import annotations

import tomllib

import pytest

from kms_server import credentials
from kms_server.credentials import Authenticator

PASSWORD = "s3cret-enough-password"


@pytest.fixture(scope="module")
def hashed() -> str:
    return credentials.hash_password(PASSWORD)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_user_without_binding_is_accepted_only_from_its_own_identity(hashed):
    auth = Authenticator({"alice": hashed})
    assert auth("alice", PASSWORD, "alice")
    assert not auth("alice", PASSWORD, "bob")


def test_a_bound_user_is_accepted_only_from_the_bound_identities(hashed):
    auth = Authenticator({"vcenter-svc": hashed}, {"vcenter-svc": ["alice", "vc2"]})
    assert auth("vcenter-svc", PASSWORD, "alice")
    assert auth("vcenter-svc", PASSWORD, "vc2")
    assert not auth("vcenter-svc", PASSWORD, "bob")
    assert not auth("vcenter-svc", PASSWORD, "vcenter-svc")


def test_a_verified_credential_is_not_verified_again_until_it_expires(hashed):
    clock = Clock()
    auth = Authenticator({"u": hashed}, {"u": ["alice"]}, cache_seconds=60, clock=clock)
    assert auth("u", PASSWORD, "alice")
    assert auth.verifications == 1
    for _ in range(5):
        assert auth("u", PASSWORD, "alice")
    assert auth.verifications == 1
    clock.now += 61
    assert auth("u", PASSWORD, "alice")
    assert auth.verifications == 2


def test_a_wrong_password_or_identity_is_never_answered_from_the_cache(hashed):
    auth = Authenticator({"u": hashed}, {"u": ["alice"]})
    assert auth("u", PASSWORD, "alice")
    assert not auth("u", PASSWORD + "x", "alice")
    assert not auth("u", PASSWORD, "bob")
    assert not auth("v", PASSWORD, "alice")


def test_the_cache_is_bounded_and_holds_no_password(hashed):
    auth = Authenticator({f"u{i}": hashed for i in range(5)}, {f"u{i}": ["alice"] for i in range(5)}, cache_entries=3)
    for i in range(5):
        assert auth(f"u{i}", PASSWORD, "alice")
    assert len(auth._verified) == 3
    for key in auth._verified:
        assert len(key) == 32 and PASSWORD.encode() not in key


def test_bindings_survive_save_and_load(tmp_path, hashed):
    path = tmp_path / "credentials.toml"
    credentials.save(path, {"vcenter-svc": hashed, "plain": hashed}, {"vcenter-svc": ['CN "odd", O=x', "alice"]})
    loaded = credentials.load_file(path)
    assert loaded.users == {"vcenter-svc": hashed, "plain": hashed}
    assert loaded.clients == {"vcenter-svc": ['CN "odd", O=x', "alice"]}
    assert PASSWORD not in path.read_text()
    tomllib.loads(path.read_text())


def test_a_malformed_clients_table_is_one_line_error(tmp_path):
    path = tmp_path / "credentials.toml"
    path.write_text('[users]\nu = "h"\n[clients]\nu = "alice"\n')
    with pytest.raises(credentials.CredentialsError, match=r"\[clients\] must map usernames to lists"):
        credentials.load_file(path)


def test_save_replaces_the_file_atomically_and_owner_only(tmp_path, hashed, monkeypatch):
    """save goes through files.write_atomic: the new file is 0600 from its
    first byte, no temporary file is left beside it, and a write that fails
    leaves the previous file whole."""
    path = tmp_path / "credentials.toml"
    credentials.save(path, {"first": hashed})
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.toml"]
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kmip_core.files.os.fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        credentials.save(path, {"second": hashed})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials.toml"]
