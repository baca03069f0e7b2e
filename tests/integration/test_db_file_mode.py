"""A running kms-server's SQLite files are 0600 (issue 19: kms.db was
0644, readable by every local user), whatever the umask it starts with."""

from __future__ import annotations

import os
import stat

from conftest import start_server
from kmip.core import enums
from kmip_client import pykmip


def test_running_server_database_files_are_0600(tmp_path, pki_dir):
    old = os.umask(0o022)  # The server process inherits it.
    try:
        server = start_server(tmp_path / "node", pki_dir)
    finally:
        os.umask(old)
    try:
        client = pykmip(server, pki_dir)
        try:
            assert client.create(enums.CryptographicAlgorithm.AES, 128)
        finally:
            client.close()
        data = tmp_path / "node" / "data"
        files = sorted(p for p in data.iterdir() if p.name.startswith("kms.db"))
        assert "kms.db" in [p.name for p in files]
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
    finally:
        server.stop()


def test_broker_database_made_by_init_is_0600(tmp_path, pki_dir):
    """`vtpm-broker init` creates broker.db through the same engine module."""
    from broker_process import Broker, write_config

    workdir = tmp_path / "broker"
    workdir.mkdir()
    config = write_config(workdir, 1, pki_dir)
    old = os.umask(0o022)
    try:
        Broker(workdir, config, workdir / "data").cli("init")
    finally:
        os.umask(old)
    files = sorted(p for p in (workdir / "data").iterdir() if p.name.startswith("broker.db"))
    assert "broker.db" in [p.name for p in files]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: 0o600 for p in files}
