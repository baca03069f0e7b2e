"""KMS_TEST_REQUIRE: a skip for a dependency CI installs becomes a failure."""

from __future__ import annotations

from conftest import required_dependency


def test_a_required_dependency_is_named_from_the_skip_reason(monkeypatch):
    monkeypatch.setenv("KMS_TEST_REQUIRE", "postgresql, swtpm")
    assert required_dependency("no PostgreSQL on 127.0.0.1:5432 or psycopg missing") == "postgresql"
    assert required_dependency("needs Debian's swtpm, swtpm-tools and tpm2-tools") == "swtpm"
    assert required_dependency("patroni is not installed") is None
    assert required_dependency("the in-memory fake has no database errors") is None


def test_nothing_is_required_without_the_setting(monkeypatch):
    monkeypatch.delenv("KMS_TEST_REQUIRE", raising=False)
    assert required_dependency("no PostgreSQL on 127.0.0.1:5432") is None
