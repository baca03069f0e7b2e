"""`vtpm-broker backup` and `restore` on the broker's own files and SQLite
database (no servers): the restore gives back every row and file, and a
damaged file or a target that is not empty is refused in one line with
nothing written. The served round trip (a restored broker on a new port,
a stale .nvram refused) is tests/integration/test_broker_backup.py's."""

from __future__ import annotations

import hashlib
import shutil
import textwrap
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from broker import backup as broker_backup
from broker import cli
from broker import db as broker_db
from broker.config import load_config
from broker.trust import Registry


def _config(directory: Path, provider: str = "kms-backup-test") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "broker.toml"
    path.write_text(
        textwrap.dedent(
            f"""
            [broker]
            provider_name = "{provider}"
            data_dir = "data"
            node_name = "broker-{directory.name}"

            [kms]
            nodes = ["127.0.0.1:5696"]
            """
        )
    )
    return path


def _run(capsys, config: Path, *args: str) -> tuple[int, str, str]:
    status = cli.main(["--config", str(config), *args])
    out, err = capsys.readouterr()
    return status, out, err


def _one_line_error(status: int, err: str) -> str:
    assert status == 2, err
    assert err.startswith("vtpm-broker: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _rows(config: Path) -> dict[str, list[tuple]]:
    cfg = load_config(str(config))
    db = broker_db.Database(cfg.storage.db_url)
    try:
        with db.read() as conn:
            return {
                name: [tuple(r) for r in conn.execute(select(table).order_by(*table.primary_key.columns))]
                for name, table in broker_db.metadata.tables.items()
            }
    finally:
        db.close()


def _populate(config: Path) -> None:
    """Some of every kind of state: a token, an instance with a host and VMs,
    a .nvram generation, an EK certificate, audit records and a checkpoint."""
    cfg = load_config(str(config))
    db = broker_db.Database(cfg.storage.db_url)
    try:
        registry = Registry(db, node="test")
        registry.issue_token("vc-a")
        now = time.time()
        with db.begin() as conn:
            conn.execute(
                broker_db.instances.insert().values(
                    name="vc-a", state="trusted", cert_fingerprint="ab" * 32, cert_pem="pem", pinned=False,
                    created_at=now, changed_at=now,
                )
            )  # fmt: skip
            conn.execute(
                broker_db.hosts.insert().values(
                    name="esx-1", instance="vc-a", cert_fingerprint="cd" * 32, cert_pem="pem", created_at=now
                )
            )
            for i in range(3):
                vm_uuid = f"00000000-0000-4000-8000-00000000000{i}"
                conn.execute(
                    broker_db.vms.insert().values(
                        vm_uuid=vm_uuid, name=f"vm-{i}", instance="vc-a", kms_key_id=f"key-{i}",
                        key_safe=f"safe-{i}", host="esx-1", created_at=now, changed_at=now,
                    )
                )  # fmt: skip
                conn.execute(
                    broker_db.ek_certificates.insert().values(
                        vm_uuid=vm_uuid, cert_type="ek", cert_der=b"\x30\x00" * 10, ca_fingerprint="ef" * 32,
                        issued_to="host:esx-1", issued_at=now,
                    )
                )  # fmt: skip
        registry.record_nvram_generation("00000000-0000-4000-8000-000000000001", 7, "host:esx-1")
    finally:
        db.close()
    status = cli.main(["--config", str(config), "admin", "audit", "checkpoint"])
    assert status == 0


@pytest.fixture
def made(tmp_path, capsys):
    """A broker after `vtpm-broker init` and some use, and its backup."""
    config = _config(tmp_path / "old")
    assert _run(capsys, config, "init")[0] == 0
    _populate(config)
    backup = tmp_path / "broker.vtbak"
    status, out, err = _run(capsys, config, "backup", "--out", str(backup))
    assert status == 0, err
    assert "keep that key apart from the backups" in out
    assert backup.stat().st_mode & 0o777 == 0o600
    return config, backup


def _fresh(tmp_path: Path, old: Path, name: str = "new") -> Path:
    """A new broker directory: its configuration and the old master key only."""
    config = _config(tmp_path / name)
    data = config.parent / "data"
    data.mkdir(mode=0o700)
    shutil.copy2(old.parent / "data" / "master.key", data / "master.key")
    return config


def _state(directory: Path) -> dict[str, str]:
    """Every file under a directory and its digest: 'nothing changed'."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def test_every_broker_table_is_in_the_backup():
    """A table added to broker.db fails here until BROKER_TABLES lists it."""
    assert set(broker_backup.BROKER_TABLES) == set(broker_db.metadata.tables)


def test_restore_gives_back_every_row_and_file(tmp_path, capsys, made):
    """Into a new directory with only the master key: every row of every
    table, every file init made (same bytes, same modes), the schema
    revision; the restore is audited and the chain stays intact; the
    audit sequence continues after the restored records."""
    old, backup = made
    new = _fresh(tmp_path, old)
    before = _rows(old)
    status, out, err = _run(capsys, new, "restore", "--from", str(backup))
    assert status == 0, err
    assert "restored" in out and "rows" in out
    after = _rows(new)
    for name, rows in before.items():
        if name == "broker_audit":
            # The backup itself was audited after its snapshot; the restore adds its own record.
            assert after[name][: len(rows) - 1] == rows[:-1]
            assert [r[3] for r in after[name][-1:]] == ["broker.restore"]
        else:
            assert after[name] == rows, name
    assert any(rows for rows in before.values())
    old_data, new_data = old.parent / "data", new.parent / "data"
    for name in ("broker-tls.pem", "broker-tls.key", "kms-client.key", "kms-client.csr", "audit.key", "audit.pub",
                 "trust-ca.pem"):  # fmt: skip
        assert (new_data / name).read_bytes() == (old_data / name).read_bytes(), name
        assert (new_data / name).stat().st_mode & 0o777 == (old_data / name).stat().st_mode & 0o777, name
    assert _run(capsys, new, "db", "status")[0] == 0
    status, out, err = _run(capsys, new, "admin", "audit", "verify")
    assert status == 0 and "intact" in out, out + err
    assert _run(capsys, new, "check-config")[0] in (0, 2)  # kms.cert is the operator's (not signed here)


@pytest.mark.parametrize("where", ["signature", "header", "key check", "first chunk", "last byte"])
def test_a_tampered_backup_is_refused_and_nothing_is_written(tmp_path, capsys, made, where):
    """One flipped byte anywhere: one line naming the damage, and the new
    directory still holds only the master key."""
    old, backup = made
    data = bytearray(backup.read_bytes())
    header_length = int.from_bytes(data[10:14], "big")
    offset = {
        "signature": 2,
        "header": 14 + header_length // 2,
        "key check": 14 + header_length + 32 + 3,
        "first chunk": 14 + header_length + 64 + 20,
        "last byte": len(data) - 1,
    }[where]
    data[offset] ^= 0x01
    bad = tmp_path / "tampered.vtbak"
    bad.write_bytes(bytes(data))
    new = _fresh(tmp_path, old)
    status, _out, err = _run(capsys, new, "restore", "--from", str(bad))
    err = _one_line_error(status, err)
    assert "corrupt or was altered" in err or "not a vtpm-broker backup" in err, err
    assert sorted(p.name for p in (new.parent / "data").iterdir()) == ["master.key"]


@pytest.mark.parametrize("keep", [5, 40, 200, -1])
def test_a_truncated_backup_is_refused_and_nothing_is_written(tmp_path, capsys, made, keep):
    """Cut anywhere (inside the header, inside a chunk, before the final
    chunk's last byte): one line, nothing written."""
    old, backup = made
    data = backup.read_bytes()
    bad = tmp_path / "cut.vtbak"
    bad.write_bytes(data[:keep])
    new = _fresh(tmp_path, old)
    err = _one_line_error(*_run(capsys, new, "restore", "--from", str(bad))[::2])
    assert "truncated" in err or "corrupt" in err or "not a vtpm-broker backup" in err, err
    assert sorted(p.name for p in (new.parent / "data").iterdir()) == ["master.key"]


def test_restore_into_a_serving_broker_is_refused_and_changes_nothing(tmp_path, capsys, made):
    """A restore over a broker that has state (its own database and files)
    is refused before anything is written; a database with rows is refused
    even when the data directory elsewhere is empty."""
    old, backup = made
    before = _state(old.parent / "data")
    rows = _rows(old)
    err = _one_line_error(*_run(capsys, old, "restore", "--from", str(backup))[::2])
    assert "is not empty" in err and "restore into a new directory" in err, err
    assert _state(old.parent / "data") == before
    assert _rows(old) == rows

    # The same database, a new data directory: the database is what refuses.
    other = _fresh(tmp_path, old, "other")
    other.write_text(other.read_text() + f'\n[storage]\ndb_url = "sqlite:///{old.parent / "data" / "broker.db"}"\n')
    err = _one_line_error(*_run(capsys, other, "restore", "--from", str(backup))[::2])
    assert "is not empty (broker_" in err and "restore into a new, empty database" in err, err
    assert sorted(p.name for p in (other.parent / "data").iterdir()) == ["master.key"]
    assert _rows(old) == rows


def test_restore_needs_the_master_key_that_made_the_backup(tmp_path, capsys, made):
    """No master key: say where to copy it. Another master key: refused as such."""
    old, backup = made
    new = _config(tmp_path / "nokey")
    err = _one_line_error(*_run(capsys, new, "restore", "--from", str(backup))[::2])
    assert "master key" in err and "copy the master key file of the broker that made the backup" in err
    other = _config(tmp_path / "otherkey")
    (other.parent / "data").mkdir()
    (other.parent / "data" / "master.key").write_text("11" * 32 + "\n")
    err = _one_line_error(*_run(capsys, other, "restore", "--from", str(backup))[::2])
    assert "made under another master key" in err
    assert sorted(p.name for p in (other.parent / "data").iterdir()) == ["master.key"]


def test_restore_refuses_another_key_provider_and_a_kms_backup(tmp_path, capsys, made):
    """Every key safe names the provider: a restore under another name is
    refused; a file that is not a broker backup is named as such."""
    old, backup = made
    other = _fresh(tmp_path, old)
    other.write_text(other.read_text().replace("kms-backup-test", "kms-other"))
    err = _one_line_error(*_run(capsys, other, "restore", "--from", str(backup))[::2])
    assert "key provider 'kms-backup-test'" in err
    not_backup = tmp_path / "x.bin"
    not_backup.write_bytes(b"\x89KMSBAK\n" + b"\0" * 100)
    err = _one_line_error(*_run(capsys, other, "restore", "--from", str(not_backup))[::2])
    assert "is not a vtpm-broker backup" in err


def test_backup_refuses_to_overwrite_and_needs_the_database(tmp_path, capsys, made):
    old, backup = made
    err = _one_line_error(*_run(capsys, old, "backup", "--out", str(backup))[::2])
    assert "exists" in err and "--force" in err
    assert _run(capsys, old, "backup", "--out", str(backup), "--force")[0] == 0
    empty = _config(tmp_path / "none")
    err = _one_line_error(*_run(capsys, empty, "backup", "--out", str(tmp_path / "b"))[::2])
    assert "does not exist" in err


def test_postgresql_backup_restores_into_postgresql_and_sqlite(tmp_path, capsys):
    """Brokers on PostgreSQL (the HA store): the backup is read in one
    REPEATABLE READ snapshot; it restores into a new PostgreSQL database
    (sequences continue above the backup's) and into SQLite alike."""
    from conftest import drop_postgres_database, new_postgres_database, postgres_available

    if not postgres_available():
        pytest.skip("no PostgreSQL on 127.0.0.1:5432 or psycopg missing")
    made = []
    try:
        name, source_url = new_postgres_database("broker_backup_src")
        made.append(name)
        old = _config(tmp_path / "old")
        old.write_text(old.read_text() + f'\n[storage]\ndb_url = "{source_url}"\n')
        assert _run(capsys, old, "db", "upgrade")[0] == 0
        assert _run(capsys, old, "init")[0] == 0
        _populate(old)
        backup = tmp_path / "pg.vtbak"
        status, _out, err = _run(capsys, old, "backup", "--out", str(backup))
        assert status == 0, err
        rows = _rows(old)

        name, target_url = new_postgres_database("broker_backup_dst")
        made.append(name)
        into_pg = _fresh(tmp_path, old, "pg")
        into_pg.write_text(into_pg.read_text() + f'\n[storage]\ndb_url = "{target_url}"\n')
        status, _out, err = _run(capsys, into_pg, "restore", "--from", str(backup))
        assert status == 0, err
        into_sqlite = _fresh(tmp_path, old, "lite")
        status, _out, err = _run(capsys, into_sqlite, "restore", "--from", str(backup))
        assert status == 0, err
        for config in (into_pg, into_sqlite):
            after = _rows(config)
            for table, expected in rows.items():
                if table != "broker_audit":
                    assert after[table] == expected, (config, table)
            assert after["broker_audit"][: len(rows["broker_audit"]) - 1] == rows["broker_audit"][:-1]
        # A second restore into the now non-empty PostgreSQL database is refused.
        again = _fresh(tmp_path, old, "pg-again")
        again.write_text(again.read_text() + f'\n[storage]\ndb_url = "{target_url}"\n')
        err = _one_line_error(*_run(capsys, again, "restore", "--from", str(backup))[::2])
        assert "is not empty (broker_" in err
        # The sequence continues: a new CA row gets an id above the restored ones.
        cfg = load_config(str(into_pg))
        db = broker_db.Database(cfg.storage.db_url)
        try:
            new_id = db.put_ca("ca:test", "pem", b"sealed")
            assert new_id > max(r[0] for r in rows["broker_cas"])
        finally:
            db.close()
    finally:
        for name in made:
            drop_postgres_database(name)


def test_a_shared_file_outside_the_data_directory_may_already_be_there(tmp_path, capsys, made):
    """Replicas share the audit key from a path outside their data
    directories: a restore accepts it there with the backup's exact bytes,
    and refuses (writing nothing) a different file at that path."""
    old, backup = made
    shared = tmp_path / "etc" / "audit.key"
    shared.parent.mkdir()
    other = _fresh(tmp_path, old, "other")
    other.write_text(other.read_text() + f'\n[audit]\nsigning_key_file = "{shared}"\n')
    shared.write_text("not the key\n")
    err = _one_line_error(*_run(capsys, other, "restore", "--from", str(backup))[::2])
    assert f"{shared} exists and is not the backup's audit.signing_key" in err
    assert sorted(p.name for p in (other.parent / "data").iterdir()) == ["master.key"]
    shutil.copy2(old.parent / "data" / "audit.key", shared)
    status, _out, err = _run(capsys, other, "restore", "--from", str(backup))
    assert status == 0, err
    assert shared.read_bytes() == (old.parent / "data" / "audit.key").read_bytes()
    assert _run(capsys, other, "admin", "audit", "verify")[0] == 0


def test_backup_refuses_a_master_key_that_does_not_open_the_database(tmp_path, capsys, made):
    """The configured key must be the brokers' own: a backup under another
    key could never be restored with the key that opens the CA keys."""
    old, _backup = made
    wrong = tmp_path / "wrong.key"
    wrong.write_text("22" * 32 + "\n")
    wrong.chmod(0o600)
    old.write_text(old.read_text() + f'\n[master_key]\nfile = "{wrong}"\n')
    err = _one_line_error(*_run(capsys, old, "backup", "--out", str(tmp_path / "other.vtbak"))[::2])
    assert "does not open this broker database" in err
    assert not (tmp_path / "other.vtbak").exists()


def test_restore_refuses_another_schema_revision(tmp_path, capsys, made, monkeypatch):
    """A backup restores only at its own revision: restore with the release
    that made it, then upgrade."""
    old, backup = made
    new = _fresh(tmp_path, old)
    monkeypatch.setattr(broker_backup.schema, "head_revision", lambda: "9999")
    err = _one_line_error(*_run(capsys, new, "restore", "--from", str(backup))[::2])
    assert "schema revision" in err and "restore it with the vtpm-broker release that made it" in err
    assert sorted(p.name for p in (new.parent / "data").iterdir()) == ["master.key"]
