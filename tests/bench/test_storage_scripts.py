"""The storage scripts of bench/, run for real on small stores. No timing.

- wal_pages.py: the pages each request writes to SQLite's log, by B-tree;
  what it reports for a Get is the audit record's pages as schema revision
  0006 leaves them.
- audit_migration.py: revision 0006 on a database at 0005 with records.
- lookup_migration.py: revision 0007 on a database at 0006 with keys."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from kms_server.storage import schema

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "wal_pages.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )


def test_pages_by_btree_of_each_request(tmp_path):
    out = tmp_path / "pages.json"
    result = _run("--keys", "20", "--requests", "3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    figures = json.loads(out.read_text())["figures"]
    # A Get of a key read before writes its audit record only: the table,
    # its time index and its uid index (the record has a uid); a page that
    # fills splits within them. No B-tree of seq, no x_name or x_identifier
    # entry (the record has neither): schema revision 0006.
    get = figures["get"]["btrees"]
    assert set(get) <= {"kms_audit", "ix_kms_audit_time", "ix_kms_audit_uid"}, get
    assert get.get("kms_audit", 0) >= 1 and 3 <= figures["get"]["last"] <= 6
    # A Create writes its object, its attribute rows and their indexes.
    create = figures["create"]["btrees"]
    for btree in ("kms_objects", "kms_attributes", "ix_kms_attributes_lookup", "kms_audit"):
        assert create.get(btree, 0) >= 1, create
    assert figures["create"]["pages"] > figures["get"]["pages"]
    # A Destroy changes its object's row and attributes.
    assert figures["destroy"]["btrees"].get("kms_objects") == 1
    assert "per request" in result.stdout and "get" in result.stdout


def test_a_count_of_zero_is_refused_in_one_line():
    result = _run("--requests", "0")
    assert result.returncode == 2
    assert "--keys and --requests must be at least 1" in result.stderr
    assert "Traceback" not in result.stderr


def test_audit_migration_times_0006_and_keeps_every_record():
    """bench/audit_migration.py: a database at 0005 with records, upgraded
    to head; the script checks the count itself and says so."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "audit_migration.py"), "--records", "500"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "500 audit records" in result.stdout
    assert f"revision 0005 -> {schema.head_revision()}" in result.stdout


def test_lookup_migration_times_0007_and_keeps_every_row():
    """bench/lookup_migration.py: a database at 0006 with keys, upgraded
    to head (0007 builds the partial lookup index); the script checks the
    row count itself and says so."""
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "lookup_migration.py"), "--keys", "300"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "300 keys, 5,400 attribute rows" in result.stdout
    assert "then a Locate by Name (the lookup index)" in result.stdout
    assert "then a Locate by Unique Identifier (the uid's row)" in result.stdout
    assert "then a Locate by Digest (every object read)" in result.stdout
    assert f"revision 0006 -> {schema.head_revision()}" in result.stdout


def test_lookup_migration_refuses_a_negative_count_in_one_line():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "lookup_migration.py"), "--keys", "-1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert result.returncode == 2
    assert "--keys cannot be negative" in result.stderr and "Traceback" not in result.stderr
