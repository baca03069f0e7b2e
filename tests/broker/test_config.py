"""Tests for broker.config: the parts it shares with kms_server.config
(merging, shape checks, display) and the broker's required provider name."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from broker.config import ConfigError, format_config, load_config

PROVIDER = '[broker]\nprovider_name = "kms-test"\n'


def broker_toml(directory: Path, text: str = "", *, provider: bool = True) -> Path:
    """A broker.toml in ``directory``: ``text``, after a provider name unless told not to."""
    path = directory / "broker.toml"
    path.write_text((PROVIDER if provider else "") + text)
    return path


def test_provider_name_is_required(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(broker_toml(tmp_path, '[api]\nport = 9443\n', provider=False))
    assert str(info.value) == (
        'config: broker.provider_name is required; '
        'add provider_name = "kms-prod" (your key provider name) to [broker]'
    )


def test_precedence_and_derived_paths(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    path = broker_toml(conf_dir, '[api]\nport = 9443\nhost = "0.0.0.0"\n')
    cfg = load_config(path, {"api": {"port": 9444, "host": None}, "broker": {"data_dir": "d"}})
    assert (cfg.api.host, cfg.api.port) == ("0.0.0.0", 9444)
    assert cfg.broker.data_dir == tmp_path / "d"
    assert cfg.master_key.file == tmp_path / "d" / "master.key"
    assert cfg.storage.db_url == f"sqlite:///{tmp_path / 'd' / 'broker.db'}"
    assert cfg.source == path
    assert load_config(path).broker.data_dir == conf_dir / "var" / "broker"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[brokr]\n", "config: unknown section [brokr] in {path}; did you mean 'broker'?"),
        ("[api]\nprot = 1\n", "config: unknown key api.prot in {path}; did you mean 'port'?"),
        (
            "api = 3\n",
            "config: [api] in {path} must be a table of keys, such as [api] on its own line (got 3)",
        ),
    ],
)
def test_shape_errors(tmp_path, text, expected):
    path = broker_toml(tmp_path, text + PROVIDER, provider=False)  # top-level keys first
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(expected.format(path=path))


def test_role_in_two_exclusive_lists_is_refused(tmp_path):
    text = '[roles]\nadministrators = ["bob"]\nno_crypto_administrators = ["bob"]\n'
    with pytest.raises(ConfigError, match="'bob' is in both roles.administrators"):
        load_config(broker_toml(tmp_path, text))


def test_format_config_round_trips_and_marks_secret_files(tmp_path, monkeypatch):
    cfg = load_config(broker_toml(tmp_path))
    text = format_config(cfg)
    assert text.startswith(f"# effective configuration from {tmp_path / 'broker.toml'}\n")
    assert f'key = "{tmp_path}/var/broker/broker-tls.key"  # (secret file, contents not shown)' in text
    assert "# ca is not set" in text
    expected = {
        section: {k: v for k, v in table.items() if v is not None}
        for section, table in cfg.redacted().items()
    }
    assert tomllib.loads(text) == expected

    monkeypatch.chdir(tmp_path)
    no_file = load_config(None, {"broker": {"provider_name": "kms-test"}})
    assert format_config(no_file).startswith("# effective configuration (no file; defaults and flags)\n")
