"""Tests for kms_server.config: precedence, validation messages, redaction."""

from __future__ import annotations

import builtins
import io
import os
import socket
import tomllib
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest

from kmip_core.config import ConfigError
from kms_server.config import format_config, load_config

MINIMAL = '[master_key]\nfile = "master.key"\n'


def write(tmp_path: Path, text: str, name: str = "kms.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_when_file_sets_only_master_key(tmp_path):
    """Every documented default applies; derived paths follow data_dir."""
    cfg = load_config(write(tmp_path, MINIMAL))
    s = cfg.server
    assert (s.host, s.port, s.max_message_size) == ("127.0.0.1", 5696, 1048576)
    assert (s.idle_timeout, s.handshake_timeout) == (300.0, 10.0)
    assert (s.max_connections, s.worker_threads) == (1024, 16)
    assert s.node_name == socket.gethostname()
    assert s.data_dir == tmp_path / "var"
    assert cfg.tls.cert is None and cfg.tls.key is None and cfg.tls.ca is None
    assert cfg.tls.trusted_clients_dir == tmp_path / "var" / "trusted-clients"
    assert (cfg.tls.identity, cfg.tls.min_version) == ("cn", "1.2")
    assert cfg.storage.db_url == f"sqlite:///{tmp_path}/var/kms.db"
    assert cfg.master_key.file == tmp_path / "master.key"
    assert cfg.master_key.passphrase_file is None
    assert cfg.access.administrators == ()
    assert cfg.access.require_credential is False
    assert cfg.access.credentials_file == tmp_path / "var" / "credentials.toml"
    assert cfg.logging.level == "INFO"
    assert cfg.source == tmp_path / "kms.toml"


def test_sections_are_frozen(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    with pytest.raises(FrozenInstanceError):
        cfg.server.port = 1  # type: ignore[misc]


def test_precedence_defaults_file_overrides(tmp_path, monkeypatch):
    """Flags beat the file, the file beats defaults; None flags are ignored."""
    path = write(
        tmp_path,
        MINIMAL
        + '[server]\nport = 6000\nhost = "0.0.0.0"\n[logging]\nlevel = "debug"\n',
    )
    cfg = load_config(path, {"server": {"port": 7000, "host": None}})
    assert cfg.server.port == 7000
    assert cfg.server.host == "0.0.0.0"
    assert cfg.logging.level == "DEBUG"


def test_relative_paths_file_vs_flags(tmp_path, monkeypatch):
    """File paths resolve against the file's directory, flag paths against cwd."""
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(
        conf_dir,
        MINIMAL + '[tls]\ncert = "certs/server.pem"\n[server]\ndata_dir = "data"\n',
    )
    cfg = load_config(path, {"tls": {"key": "k/server.key"}})
    assert cfg.tls.cert == conf_dir / "certs" / "server.pem"
    assert cfg.tls.key == elsewhere / "k" / "server.key"
    assert cfg.server.data_dir == conf_dir / "data"
    assert cfg.tls.trusted_clients_dir == conf_dir / "data" / "trusted-clients"


def test_data_dir_flag_moves_derived_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(write(tmp_path, MINIMAL), {"server": {"data_dir": "/srv/kms"}})
    assert cfg.storage.db_url == "sqlite:////srv/kms/kms.db"
    assert cfg.tls.trusted_clients_dir == Path("/srv/kms/trusted-clients")


def test_no_file_uses_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"master_key": {"passphrase_file": "pass.txt"}})
    assert cfg.server.data_dir == tmp_path / "var"
    assert cfg.master_key.passphrase_file == tmp_path / "pass.txt"
    assert cfg.source is None


def test_relative_sqlite_url_resolved_against_file(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL + '[storage]\ndb_url = "sqlite:///db/k.db"\n')
    )
    assert cfg.storage.db_url == f"sqlite:///{tmp_path}/db/k.db"


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '[server]\nport = "abc"\n',
            (
                "config: server.port must be an integer between 1 and 65535, "
                "or 0 for any free port (got 'abc')"
            ),
        ),
        (
            "[server]\nport = 70000\n",
            "server.port must be an integer between 1 and 65535",
        ),
        ("[server]\nport = -1\n", "65535, or 0 for any free port (got -1)"),
        ("[server]\nport = true\n", "server.port must be an integer"),
        (
            "[server]\nidle_timeout = -1\n",
            "server.idle_timeout must be a number of seconds",
        ),
        ("[server]\nworker_threads = 0\n", "server.worker_threads must be an integer"),
        ("[server]\nprot = 1\n", "unknown key server.prot in"),
        ("[server]\nprot = 1\n", "did you mean 'port'?"),
        ("[srever]\n", "unknown section [srever]"),
        ("server = 3\n", "[server] in"),
        (
            '[tls]\nidentity = "email"\n',
            'tls.identity must be one of "cn" or "subject"',
        ),
        ("[tls]\nmin_version = 1.2\n", 'tls.min_version must be one of "1.2" or "1.3"'),
        ('[tls]\nmin_version = "1.1"\n', "tls.min_version must be one of"),
        (
            '[access]\nadministrators = "alice"\n',
            "access.administrators must be a list",
        ),
        (
            "[access]\nrequire_credential = 1\n",
            "access.require_credential must be true or false",
        ),
        ('[logging]\nlevel = "LOUD"\n', "logging.level must be one of"),
        ('[storage]\ndb_url = "mysql://x/y"\n', "storage.db_url must be a sqlite"),
        (
            '[storage]\ndb_url = "postgresql://kms:hunter2@db/kms"\n',
            "storage.db_url must not contain a password; use a PostgreSQL passfile",
        ),
        ("[tls]\ncert = 5\n", "tls.cert must be a file path"),
    ],
)
def test_invalid_values_name_key_and_fix(tmp_path, text, expected):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text + MINIMAL))
    message = str(info.value)
    assert expected in message
    assert "\n" not in message
    assert "hunter2" not in message


def test_port_zero_means_any_free_port(tmp_path):
    assert (
        load_config(write(tmp_path, MINIMAL), {"server": {"port": 0}}).server.port == 0
    )


def test_master_key_exactly_one(tmp_path):
    with pytest.raises(ConfigError, match="needs file or passphrase_file"):
        load_config(write(tmp_path, "[server]\nport = 5696\n"))
    both = '[master_key]\nfile = "a"\npassphrase_file = "b"\n'
    with pytest.raises(ConfigError, match="both set; keep exactly one"):
        load_config(write(tmp_path, both))
    # Admin tools that never touch key material may do without one.
    cfg = load_config(
        write(tmp_path, "[server]\nport = 5696\n"), require_master_key=False
    )
    assert cfg.master_key.file is None


def test_identity_in_two_exclusive_roles_is_refused(tmp_path):
    text = (
        MINIMAL
        + '[access]\nadministrators = ["bob"]\nno_crypto_administrators = ["bob"]\n'
    )
    with pytest.raises(ConfigError, match="'bob' is in both"):
        load_config(write(tmp_path, text))


def test_override_errors_and_unknown_override(tmp_path):
    path = write(tmp_path, MINIMAL)
    with pytest.raises(ConfigError, match="server.port must be an integer"):
        load_config(path, {"server": {"port": "5696"}})
    with pytest.raises(
        ConfigError, match="unknown key server.bogus in command-line flags"
    ):
        load_config(path, {"server": {"bogus": 1}})


def test_file_problems_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; pass an existing file"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(write(tmp_path, "[server\n"))


def test_format_config_is_toml_and_marks_secret_files(tmp_path):
    """The printed settings parse back to exactly the effective values."""
    master = tmp_path / "master.key"
    master.write_text("SECRET-CONTENT-0123\n")
    cfg = load_config(
        write(
            tmp_path,
            MINIMAL + '[tls]\nkey = "s.key"\n[access]\nauditors = ["aud \\"1\\""]\n',
        )
    )
    text = format_config(cfg)
    assert "SECRET-CONTENT" not in text
    assert f'file = "{master}"  # (secret file, contents not shown)' in text
    assert "# cert is not set" in text
    parsed = tomllib.loads(text)
    expected = {
        section: {k: v for k, v in table.items() if v is not None}
        for section, table in cfg.redacted().items()
    }
    assert parsed == expected
    assert parsed["access"]["auditors"] == ['aud "1"']


def test_secret_file_contents_never_read(tmp_path, monkeypatch):
    """Neither loading, formatting nor checking opens the master key file."""
    master = tmp_path / "master.key"
    master.write_text("x" * 64)
    master.chmod(0o600)
    opened: list[str] = []

    def spy(real):
        def wrapper(file, *args, **kwargs):
            opened.append(os.path.abspath(os.fspath(file)))
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(io, "open", spy(io.open))
    monkeypatch.setattr(builtins, "open", spy(builtins.open))
    monkeypatch.setattr(os, "open", spy(os.open))
    config_path = write(tmp_path, MINIMAL)
    cfg = load_config(config_path)
    format_config(cfg)
    cfg.check_files()
    assert str(config_path) in opened  # the spy sees file opens
    assert str(master) not in opened


def test_check_files_reports_each_problem(tmp_path):
    (tmp_path / "server.pem").write_text("cert")
    key = tmp_path / "server.key"
    key.write_text("key")
    key.chmod(0o644)
    (tmp_path / "master.key").write_text("k")
    (tmp_path / "master.key").chmod(0o600)
    text = MINIMAL + '[tls]\ncert = "server.pem"\nkey = "server.key"\nca = "ca.pem"\n'
    problems = load_config(write(tmp_path, text)).check_files()
    assert len(problems) == 2, problems
    assert any("tls.key" in p and "chmod 600" in p for p in problems)
    assert any("tls.ca" in p and "does not exist" in p for p in problems)

    key.chmod(0o600)
    (tmp_path / "ca.pem").write_text("ca")
    assert load_config(write(tmp_path, text)).check_files() == []


def test_check_files_unset_tls_and_missing_master_key(tmp_path):
    problems = load_config(write(tmp_path, MINIMAL)).check_files()
    assert any(p.startswith("tls.cert is not set") for p in problems)
    assert any(
        p.startswith("master_key.file") and "does not exist" in p for p in problems
    )


def test_no_file_header_and_non_table_section_message(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {"master_key": {"file": "m.key"}})
    assert format_config(cfg).startswith(
        "# effective configuration (no file; defaults and flags)\n\n[server]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, "server = 3\n" + MINIMAL))
    assert str(info.value) == (
        f"config: [server] in {tmp_path / 'kms.toml'} must be a table of keys, "
        "such as [server] on its own line (got 3)"
    )


def test_merge_sources_with_another_schema(tmp_path, monkeypatch):
    """The shared merge: flags > file > default, DERIVED and None left for the
    caller, a Required key without a value named with its example."""
    from kmip_core.config import DERIVED, Required, merge_sources, nonempty_str, path_value

    monkeypatch.chdir(tmp_path)
    schema = {
        "a": {
            "name": (nonempty_str, Required('"x" (a name)')),
            "dir": (path_value, "d"),
            "later": (path_value, DERIVED),
            "unset": (path_value, None),
        }
    }
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    path = write(conf_dir, '[a]\nname = "from-file"\n', "other.toml")
    values, source = merge_sources(schema, path, {"a": {"dir": "flag", "name": None}})
    assert source == path
    assert values == {
        "a": {
            "name": "from-file",
            "dir": tmp_path / "flag",
            "later": DERIVED,
            "unset": None,
        }
    }
    values, source = merge_sources(schema, None, {"a": {"name": "n"}})
    assert source is None and values["a"]["dir"] == tmp_path / "d"
    with pytest.raises(ConfigError) as info:
        merge_sources(schema, None, None)
    assert str(info.value) == 'config: a.name is required; add name = "x" (a name) to [a]'


def test_processes_default_to_the_cores_on_sqlite_and_postgresql(tmp_path, monkeypatch):
    """A worker per core whatever the database (SQLite's writers of every
    process share one flock and their commits); an explicit value wins."""
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert load_config(write(tmp_path, MINIMAL)).server.processes == 6
    postgres = MINIMAL + '[storage]\ndb_url = "postgresql://kms@db.example/kms"\n'
    assert load_config(write(tmp_path, postgres)).server.processes == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert load_config(write(tmp_path, MINIMAL)).server.processes == 1
    assert load_config(write(tmp_path, "[server]\nprocesses = 2\n" + MINIMAL)).server.processes == 2
    with pytest.raises(ConfigError, match="server.processes must be an integer between 1 and 256"):
        load_config(write(tmp_path, "[server]\nprocesses = 0\n" + MINIMAL))
