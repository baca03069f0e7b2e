"""kmip_core.names: the one name rule, and that every place that checks a
name uses it with its own exception and message."""

from __future__ import annotations

import pytest

from kmip_core.names import MAX_NAME_LENGTH, check_name, is_name, name_rule


class Refused(Exception):
    pass


@pytest.mark.parametrize("name", ["a", "0", "vcenter-01", "host_7.lab", "A" * 64, "x." + "-" * 62])
def test_names_that_follow_the_rule(name):
    assert is_name(name)
    assert check_name(name, Refused) == name


@pytest.mark.parametrize(
    "name",
    [
        "",  # empty
        "A" * 65,  # one too long
        ".hidden",  # starts with '.'
        "-rf",  # starts with '-' (an option)
        "_x",  # starts with '_'
        "a/b",
        "../etc",
        "a b",
        "tab\there",
        "new\nline",
        "ends-in-newline\n",  # '$' would have let this through; '\\Z' does not
        "caf\u00e9",  # ASCII only
        "\uff41",  # a fullwidth letter: a letter to str.isalnum, not to the rule
        None,
        64,
        b"bytes",
    ],
)
def test_names_that_break_the_rule_are_refused_with_the_callers_error(name):
    assert not is_name(name)
    with pytest.raises(Refused, match=r"^1-64 letters, digits, '\.', '_' or '-'$"):
        check_name(name, Refused)


def test_the_limit_is_the_callers_and_the_message_states_it():
    assert is_name("a" * 16, max_length=16) and not is_name("a" * 17, max_length=16)
    assert name_rule(16) == "1-16 letters, digits, '.', '_' or '-'"
    assert name_rule() == name_rule(MAX_NAME_LENGTH) == "1-64 letters, digits, '.', '_' or '-'"
    with pytest.raises(Refused, match="^host name 'a{17}' must be 1-16 letters"):
        check_name("a" * 17, lambda rule: Refused(f"host name {'a' * 17!r} must be {rule}"), max_length=16)
    with pytest.raises(ValueError):
        is_name("a", max_length=0)


def test_reserved_names_are_refused_whatever_their_case():
    for name in ("ca", "CA", "Server"):
        with pytest.raises(Refused):
            check_name(name, Refused, reserved=frozenset({"ca", "server"}))
    assert check_name("ca2", Refused, reserved=frozenset({"ca", "server"})) == "ca2"


# --- The places that check a name, each with its own error and message ----------------


def test_each_site_keeps_its_error_and_message():
    from broker.config import _provider
    from broker.host.config import _check_name as host_agent_name
    from broker.host.errors import HostError
    from broker.mgmt.state import MgmtError
    from broker.mgmt.state import check_name as mgmt_name
    from broker.trust import InvalidRequest, check_host_name, check_instance_name
    from kmip_core.config import ConfigError
    from kmip_core.pki import PkiError, _check_client_name

    rule = "1-64 letters, digits, '.', '_' or '-'"
    bad = "-bad"
    cases = [
        (check_instance_name, InvalidRequest, f"instance name must be {rule}, starting with a letter or digit"),
        (check_host_name, InvalidRequest, f"host name must be {rule}, starting with a letter or digit"),
        (host_agent_name, HostError, f"host name {bad!r} is not valid; use {rule}"),
        (
            lambda name: mgmt_name("instance", name),
            MgmtError,
            f"instance name {bad!r} must be {rule}, starting with a letter or digit",
        ),
        (
            lambda name: _provider("broker.provider_name", name, None),
            ConfigError,
            f'config: broker.provider_name must be a key provider name of {rule}, such as "kms-prod" (got {bad!r})',
        ),
        (
            _check_client_name,
            PkiError,
            f"client name {bad!r} cannot be used as a file name here; use {rule} (not 'ca' or 'server')",
        ),
    ]
    for check, error, message in cases:
        with pytest.raises(error) as refused:
            check(bad)
        assert str(refused.value) == message
        # The same rule everywhere: 64 characters pass, 65 do not.
        check("a" * 64)
        with pytest.raises(error):
            check("a" * 65)
    with pytest.raises(PkiError):
        _check_client_name("Server")
