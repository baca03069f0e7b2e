"""The audit trail end to end, against real kms-server processes and the
real database: a vCenter session is found by VM name, `kms-admin audit
verify` passes on an intact trail and names the first bad record after each
kind of tampering, a failing audit write refuses the operation and changes
nothing, no key bytes reach a record, an export, a sink or the log, and the
SIEM sinks receive every record."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import vcenter_vectors
from conftest import drop_postgres_database, new_postgres_database, start_server
from kmip.core import enums
from kmip.pie import objects as pie_objects
from kmip.pie.client import ProxyKmipClient
from kmip.pie.exceptions import KmipOperationFailure
from kmip_client import RawClient, pykmip

from kmip_core import ttlv
from kmip_core.audit import audit_key, chain

T = enums.Tags

ACCESS = """
[access]
administrators = ["admin"]
auditors = ["auditor"]
"""


def admin(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "kms_server.admin.cli", *args], capture_output=True, text=True, timeout=120
    )


def show(config: Path, *filters: str) -> list[dict]:
    done = admin("audit", "show", "--config", str(config), "--json", *filters)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


# --- the "done when" scenario ---------------------------------------------------------


def _rewrite_uids(item, mapping):
    if item.tag == T.UNIQUE_IDENTIFIER.value and item.value in mapping:
        return ttlv.Item(item.tag, item.type, mapping[item.value])
    if item.type == ttlv.ItemType.STRUCTURE:
        return ttlv.Item(item.tag, item.type, tuple(_rewrite_uids(c, mapping) for c in item.value))
    return item


def replay(client: RawClient, exchanges) -> tuple[None, dict[str, str]]:
    """Send vCenter's requests, mapping its unique identifiers ("1", "2")
    to the ones this server returned."""
    mapping: dict[str, str] = {}
    for exchange in exchanges:
        response = client.request(ttlv.encode(_rewrite_uids(ttlv.decode(exchange.request), mapping)))
        assert response is not None
        if exchange.response is None:
            continue
        for theirs, ours in zip(
            ttlv.decode(exchange.response).find_all(T.BATCH_ITEM.value), response.find_all(T.BATCH_ITEM.value), strict=False
        ):
            if theirs.get(T.OPERATION.value) == enums.Operation.CREATE.value and theirs.get(T.RESULT_STATUS.value) == 0:
                theirs_uid = theirs.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
                mapping[theirs_uid] = ours.find(T.RESPONSE_PAYLOAD.value).get(T.UNIQUE_IDENTIFIER.value)
    return None, mapping


def test_vcenter_session_is_found_by_vm_name_and_an_edited_row_is_named(tmp_path, pki_dir):
    """A vCenter-like session, then `audit show --vm test01` lists each
    access to the VM's key (Create, the AddAttribute batch that tagged it,
    Get, Activate...), `audit verify` passes, and after one row is edited
    in the database it fails naming that row."""
    server = start_server(tmp_path / "node", pki_dir, extra_config=ACCESS)
    try:
        with RawClient(server.host, server.port, pki_dir, "alice") as client:
            _, mapping = replay(client, vcenter_vectors.load())
    finally:
        assert server.stop() == 0
    config = server.workdir / "kms.toml"
    vm_key = mapping["1"]  # vCenter tagged key "1" as VM test01
    records = show(config, "--vm", "test01")
    assert records, "no record found for VM test01"
    assert {r["uid"] for r in records} == {vm_key}
    operations = [r["operation"] for r in records]
    for op in ("CREATE", "ADD_ATTRIBUTE", "GET", "ACTIVATE"):
        assert op in operations, operations
    assert all(r["client"]["name"] == "alice" and r["protocol"] == "1.1" for r in records)
    tagged = [r for r in records if r["object"].get("x-Name") == "test01"]
    assert tagged and all(r["object"]["x-Identifier"] == "4226f566-3ed5-1c8f-cda3-b0b037b6dc97" for r in tagged)
    # The AddAttribute records keep the client-supplied names and values.
    added = {(a["name"], a.get("value")) for r in records if r["operation"] == "ADD_ATTRIBUTE" for a in r["attributes"]}
    assert ("x-Name", "test01") in added and ("x-Component", "Virtual Machine") in added
    # The host's key is not a record of the VM, and --host finds it.
    host_records = show(config, "--host", "172.16.220.132")
    assert host_records and {r["uid"] for r in host_records} == {mapping["2"]}

    ok = admin("audit", "verify", "--config", str(config))
    assert ok.returncode == 0, ok.stderr
    assert "audit trail intact" in ok.stdout

    target = next(r for r in records if r["operation"] == "GET")["seq"]
    db = sqlite3.connect(server.workdir / "data" / "kms.db")
    with db:
        db.execute("UPDATE kms_audit SET body = replace(body, '\"alice\"', '\"mallory\"') WHERE seq = ?", (target,))
    db.close()
    bad = admin("audit", "verify", "--config", str(config))
    assert bad.returncode == 1
    assert f"first problem at record {target}:" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr


# --- tampering -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, pki_dir):
    """A trail of a few dozen records made by a real node, with signed
    checkpoints (one mid-way by kms-admin, one by the node as it stops)."""
    workdir = tmp_path_factory.mktemp("tamper") / "node"
    server = start_server(workdir, pki_dir, extra_config=ACCESS)
    try:
        client = pykmip(server, pki_dir)
        try:
            for i in range(8):
                uid = client.create(enums.CryptographicAlgorithm.AES, 256, name=f"key-{i}")
                client.get(uid)
            done = admin("audit", "checkpoint", "--config", str(workdir / "kms.toml"))
            assert done.returncode == 0 and "signed checkpoint at record" in done.stdout, done.stderr
            for _ in range(8, 12):
                uid = client.create(enums.CryptographicAlgorithm.AES, 256)
                client.activate(uid)
        finally:
            client.close()
    finally:
        assert server.stop() == 0
    return workdir


def _copy(pristine: Path, tmp_path: Path) -> tuple[Path, Path, sqlite3.Connection]:
    db = tmp_path / "kms.db"
    shutil.copy(pristine / "data" / "kms.db", db)
    return pristine / "kms.toml", db, sqlite3.connect(db)


def _verify(config: Path, db: Path) -> subprocess.CompletedProcess:
    return admin("audit", "verify", "--config", str(config), "--db-url", f"sqlite:///{db}")


def _rows(conn):
    return conn.execute("SELECT seq, body, hash FROM kms_audit ORDER BY seq").fetchall()


def _swap(conn, a, b):
    cols = "time, node, operation, uid, client, result, x_component, x_name, x_identifier, body, hash"
    ra = conn.execute(f"SELECT {cols} FROM kms_audit WHERE seq=?", (a,)).fetchone()
    rb = conn.execute(f"SELECT {cols} FROM kms_audit WHERE seq=?", (b,)).fetchone()
    sets = ", ".join(f"{c.strip()} = ?" for c in cols.split(","))
    conn.execute(f"UPDATE kms_audit SET {sets} WHERE seq=?", (*rb, a))
    conn.execute(f"UPDATE kms_audit SET {sets} WHERE seq=?", (*ra, b))


def _insert_forged(conn, after: int):
    """Make room after record `after` and insert a well-formed record
    chained to it, as an intruder who knows the format would."""
    rows = conn.execute("SELECT seq FROM kms_audit WHERE seq > ? ORDER BY seq DESC", (after,)).fetchall()
    for (seq,) in rows:
        conn.execute("UPDATE kms_audit SET seq = seq + 1 WHERE seq = ?", (seq,))
    prev_hash = conn.execute("SELECT hash FROM kms_audit WHERE seq = ?", (after,)).fetchone()[0]
    template = json.loads(conn.execute("SELECT body FROM kms_audit WHERE seq = ?", (after,)).fetchone()[0])
    forged = dict(template, seq=after + 1, prev=prev_hash, operation="LOCATE", uid=None, object={}, objects=[])
    body = chain.canonical(forged)
    conn.execute(
        "INSERT INTO kms_audit (seq, time, node, operation, uid, client, result, x_component, x_name, x_identifier,"
        " body, hash) VALUES (?, ?, ?, 'LOCATE', NULL, ?, ?, NULL, NULL, NULL, ?, ?)",
        (after + 1, chain.parse_time(forged["time"]), forged["node"], forged["client"]["name"],
         forged["result"]["status"], body, chain.record_hash(body)),
    )


def _rewrite_from(conn, seq: int):
    """Alter record `seq` and recompute every hash after it: only the
    signed checkpoints can tell."""
    prev = conn.execute("SELECT hash FROM kms_audit WHERE seq = ?", (seq - 1,)).fetchone()[0]
    for s, body_text, _ in [r for r in _rows(conn) if r[0] >= seq]:
        body = json.loads(body_text)
        if s == seq:
            body["peer"] = "10.9.9.9:1"
        body["prev"] = prev
        text = chain.canonical(body)
        prev = chain.record_hash(text)
        conn.execute("UPDATE kms_audit SET body = ?, hash = ? WHERE seq = ?", (text, prev, s))


TAMPERING = {
    "field changed": (lambda c: c.execute("UPDATE kms_audit SET body = replace(body, 'alice', 'mallory') WHERE seq = 5"), 5, "altered"),
    "indexed column changed": (lambda c: c.execute("UPDATE kms_audit SET client = 'mallory' WHERE seq = 6"), 6, "column client"),
    "record deleted": (lambda c: c.execute("DELETE FROM kms_audit WHERE seq = 7"), 7, "removed"),
    "two records swapped": (lambda c: _swap(c, 8, 9), 8, "out of place"),
    "record inserted": (lambda c: _insert_forged(c, 10), 11, "inserted"),
    "chain rewritten after a change": (lambda c: _rewrite_from(c, 3), 1, "rewritten after checkpoint"),
}


@pytest.mark.parametrize("case", list(TAMPERING))
def test_verify_names_the_first_tampered_record(pristine, tmp_path, case):
    config, db, conn = _copy(pristine, tmp_path)
    assert _verify(config, db).returncode == 0
    tamper, first, words = TAMPERING[case]
    with conn:
        tamper(conn)
    conn.close()
    done = _verify(config, db)
    assert done.returncode == 1, done.stdout
    assert f"first problem at record {first}:" in done.stderr and words in done.stderr, done.stderr


def test_verify_detects_a_truncated_tail(pristine, tmp_path):
    """Removing the newest records is caught because the node signed a
    checkpoint of its last record when it stopped."""
    config, db, conn = _copy(pristine, tmp_path)
    last = conn.execute("SELECT max(seq) FROM kms_audit").fetchone()[0]
    assert conn.execute("SELECT max(seq) FROM kms_audit_checkpoints").fetchone()[0] == last
    with conn:
        conn.execute("DELETE FROM kms_audit WHERE seq > ?", (last - 3,))
    conn.close()
    done = _verify(config, db)
    assert done.returncode == 1
    assert f"first problem at record {last - 2}: trail truncated" in done.stderr, done.stderr


def test_verify_detects_a_forged_checkpoint(pristine, tmp_path):
    """A checkpoint signed with another Ed25519 key, or with a bad
    signature, is refused."""
    config, db, conn = _copy(pristine, tmp_path)
    seq, head, when, node, signature = conn.execute(
        "SELECT seq, head_hash, time, node, signature FROM kms_audit_checkpoints ORDER BY seq LIMIT 1"
    ).fetchone()
    forged = bytes.fromhex(signature)
    forged = (bytes([forged[0] ^ 1]) + forged[1:]).hex()
    with conn:
        conn.execute("UPDATE kms_audit_checkpoints SET signature = ? WHERE seq = ?", (forged, seq))
    conn.close()
    done = _verify(config, db)
    assert done.returncode == 1 and f"first problem at record {seq}: checkpoint {seq}: signature" in done.stderr

    other = audit_key.generate(tmp_path / "other.key", tmp_path / "other.pub")
    signer = audit_key.load_signer(tmp_path / "other.key")
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "UPDATE kms_audit_checkpoints SET signature = ?, key_id = ? WHERE seq = ?",
            (signer.sign(chain.checkpoint_message(seq, head, when, node)), other.key_id, seq),
        )
    conn.close()
    done = _verify(config, db)
    assert done.returncode == 1 and f"signed by key {other.key_id}, not the audit key" in done.stderr


def test_offline_verification_of_an_export_with_the_public_key_only(pristine, tmp_path):
    """`audit export` writes the trail; `audit verify --file` checks it with
    the public key alone, and catches an edit of the exported file."""
    config = pristine / "kms.toml"
    out = tmp_path / "trail.jsonl"
    done = admin("audit", "export", "--config", str(config), "--to", str(out))
    assert done.returncode == 0, done.stderr
    assert out.stat().st_mode & 0o777 == 0o600
    public = pristine / "audit.pub"
    ok = admin("audit", "verify", "--file", str(out), "--public-key", str(public))
    assert ok.returncode == 0, ok.stderr
    lines = out.read_text().splitlines()
    row = json.loads(lines[4])
    row["body"] = row["body"].replace('"alice"', '"mallory"')
    lines[4] = json.dumps(row)
    out.write_text("\n".join(lines) + "\n")
    bad = admin("audit", "verify", "--file", str(out), "--public-key", str(public))
    assert bad.returncode == 1 and f"first problem at record {row['seq']}:" in bad.stderr, bad.stderr
    missing = admin("audit", "verify", "--file", str(out))
    assert missing.returncode == 2 and "--public-key" in missing.stderr and "Traceback" not in missing.stderr


# --- fail closed ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_failing_audit_write_refuses_the_operation_and_changes_nothing(tmp_path, pki_dir, backend):
    """With a trigger that makes every audit insert fail, Create, Revoke,
    Destroy and Get are refused with General Failure, no object appears or
    changes, no key material is returned; once the trigger is gone the
    same requests work."""
    pg_name, db_url = new_postgres_database("kms_audit") if backend == "postgresql" else (None, None)
    server = start_server(tmp_path / "node", pki_dir, extra_config=ACCESS, db_url=db_url)
    try:
        client = pykmip(server, pki_dir)
        uid = client.create(enums.CryptographicAlgorithm.AES, 256)
        client.activate(uid)
        if backend == "sqlite":
            conn = sqlite3.connect(server.workdir / "data" / "kms.db", timeout=10)
            with conn:
                conn.execute(
                    "CREATE TRIGGER audit_fails BEFORE INSERT ON kms_audit BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"
                )
            count = lambda: conn.execute("SELECT count(*) FROM kms_objects").fetchone()[0]  # noqa: E731
            drop = "DROP TRIGGER audit_fails"
        else:
            import psycopg

            conn = psycopg.connect(host="127.0.0.1", user="postgres", dbname=pg_name, autocommit=True)
            conn.execute(
                "CREATE FUNCTION audit_fails() RETURNS trigger AS $$ BEGIN RAISE EXCEPTION 'audit disk full'; END $$"
                " LANGUAGE plpgsql"
            )
            conn.execute("CREATE TRIGGER audit_fails BEFORE INSERT ON kms_audit FOR EACH ROW EXECUTE FUNCTION audit_fails()")
            count = lambda: conn.execute("SELECT count(*) FROM kms_objects").fetchone()[0]  # noqa: E731
            drop = "DROP TRIGGER audit_fails ON kms_audit"
        before = count()
        for attempt in (
            lambda: client.create(enums.CryptographicAlgorithm.AES, 128),
            lambda: client.revoke(enums.RevocationReasonCode.KEY_COMPROMISE, uid),
            lambda: client.destroy(uid),
            lambda: client.get(uid),
        ):
            with pytest.raises(KmipOperationFailure) as refused:
                attempt()
            assert refused.value.reason == enums.ResultReason.GENERAL_FAILURE
        assert count() == before
        conn.execute(drop)
        if backend == "sqlite":
            conn.commit()
        state = client.get_attributes(uid, ["State"])[1][0].attribute_value.value
        assert state == enums.State.ACTIVE
        assert len(client.get(uid).value) == 32
        client.close()
        conn.close()
        assert server.logged("audit"), server.stderr_text()
    finally:
        server.stop()
        if pg_name:
            drop_postgres_database(pg_name)


# --- no key bytes anywhere, and the sinks -----------------------------------------------


class _UdpSyslog:
    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(10)
        self.port = self.sock.getsockname()[1]

    def receive(self, n):
        return [self.sock.recv(65536) for _ in range(n)]


def test_no_key_bytes_reach_records_exports_sinks_or_logs(tmp_path, pki_dir):
    """A registered key, generated keys fetched with Get, and an Encrypt of a
    known plaintext: none of those bytes (raw, hex or base64) appear in the
    audit table, an export, the JSON-lines sink, the syslog sink or the
    server's DEBUG log. The sinks receive every record."""
    syslog = _UdpSyslog()
    workdir = tmp_path / "node"
    workdir.mkdir()
    audit_key.generate(workdir / "audit.key", workdir / "audit.pub")
    jsonl = tmp_path / "audit.jsonl"
    server = start_server(
        workdir,
        pki_dir,
        log_level="DEBUG",
        extra_config=ACCESS
        + f"""
[audit]
signing_key_file = "{workdir / 'audit.key'}"
jsonl_file = "{jsonl}"
syslog = "udp://127.0.0.1:{syslog.port}"
""",
    )
    secrets_seen = []
    try:
        client = pykmip(server, pki_dir)
        known = bytes(range(0x40, 0x60))
        registered = client.register(
            pie_objects.SymmetricKey(enums.CryptographicAlgorithm.AES, 256, known, masks=[
                enums.CryptographicUsageMask.ENCRYPT, enums.CryptographicUsageMask.DECRYPT])
        )
        client.activate(registered)
        plaintext = b"very secret vm disk key material!"
        ciphertext, iv = client.encrypt(
            plaintext, uid=registered,
            cryptographic_parameters={"block_cipher_mode": enums.BlockCipherMode.CBC,
                                      "padding_method": enums.PaddingMethod.PKCS5,
                                      "cryptographic_algorithm": enums.CryptographicAlgorithm.AES},
        )
        secrets_seen += [known, plaintext, ciphertext]
        for _ in range(3):
            uid = client.create(enums.CryptographicAlgorithm.AES, 256)
            secrets_seen.append(client.get(uid).value)
        secrets_seen.append(client.get(registered).value)
        client.close()
    finally:
        assert server.stop() == 0
    config = workdir / "kms.toml"
    export = tmp_path / "export.jsonl"
    assert admin("audit", "export", "--config", str(config), "--to", str(export)).returncode == 0
    db = sqlite3.connect(workdir / "data" / "kms.db")
    bodies = [row[0] for row in db.execute("SELECT body || hash || coalesce(uid, '') FROM kms_audit")]
    total = db.execute("SELECT count(*) FROM kms_audit").fetchone()[0]
    db.close()
    assert total >= 10
    received = syslog.receive(total)
    texts = {
        "audit table": "\n".join(bodies).encode(),
        "export": export.read_bytes(),
        "jsonl sink": jsonl.read_bytes(),
        "syslog sink": b"\n".join(received),
        "server log": server.stderr_text().encode(),
    }
    for secret in secrets_seen:
        forms = [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]
        for where, data in texts.items():
            for form in forms:
                assert form not in data, f"key bytes found in the {where}"
    # Every committed record reached both sinks.
    assert len(jsonl.read_text().splitlines()) == total
    assert all(m.startswith(b"<") and b" kms-server - " in m and b"[kms@32473 seq=" in m for m in received)


def test_a_failing_sink_is_reported_and_never_blocks(tmp_path, pki_dir):
    """A syslog sink whose TCP collector is down: requests are answered as
    usual and the server log says the sink fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    workdir = tmp_path / "node"
    workdir.mkdir()
    server = start_server(
        workdir, pki_dir, extra_config=ACCESS + f'\n[audit]\nsyslog = "tcp://127.0.0.1:{dead_port}"\n'
    )
    try:
        client = pykmip(server, pki_dir)
        for _ in range(5):
            client.get(client.create(enums.CryptographicAlgorithm.AES, 128))
        client.close()
    finally:
        assert server.stop() == 0
    log = server.stderr_text()
    assert "audit sink syslog failed" in log
    assert "audit checkpoints are not signed" in log


# --- refusals are recorded with what is known --------------------------------------------


def _records_until(config: Path, predicate, timeout: float = 10.0) -> list[dict]:
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = show(config)
        if predicate(records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def test_refused_handshakes_credentials_and_messages_are_recorded(tmp_path, pki_dir):
    """A connection without a client certificate, one with a certificate of
    another CA, a port probe, a wrong KMIP password and an undecodable
    message each leave a record naming what was known (peer, certificate
    identity, username) and the reason; the password never appears. A
    good request carries the certificate subject, fingerprint and the
    KMIP username."""
    import ssl

    from kmip_core import pki as pki_mod

    workdir = tmp_path / "node"
    workdir.mkdir()
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret-enough-password\n")
    credentials = workdir / "credentials.toml"
    helper = workdir / "creds.toml"
    helper.write_text(f'[access]\ncredentials_file = "{credentials}"\n')
    done = admin(
        "credentials", "set", "vcenter-svc", "--password-file", str(password_file), "--client", "alice",
        "--config", str(helper),
    )
    assert done.returncode == 0, done.stderr
    server = start_server(
        workdir,
        pki_dir,
        extra_config=f"""
        [access]
        require_credential = true
        credentials_file = "{credentials}"
        """,
    )
    config = workdir / "kms.toml"
    try:
        def client(password):
            c = ProxyKmipClient(
                hostname=server.host, port=server.port,
                cert=str(pki_dir / "alice.pem"), key=str(pki_dir / "alice.key"), ca=str(pki_dir / "ca.pem"),
                username="vcenter-svc", password=password, kmip_version=enums.KMIPVersion.KMIP_1_2,
            )
            c.open()
            return c

        good = client("s3cret-enough-password")
        uid = good.create(enums.CryptographicAlgorithm.AES, 128)
        good.close()
        bad = client("wrong-password-123")
        with pytest.raises(KmipOperationFailure):
            bad.create(enums.CryptographicAlgorithm.AES, 128)
        bad.close()

        # No client certificate.
        context = ssl.create_default_context(cafile=str(pki_dir / "ca.pem"))
        context.check_hostname = False
        with socket.create_connection((server.host, server.port)) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"\x42" * 8)
                    tls.recv(1)
        # A certificate from a CA the server does not trust.
        pki_mod.init_pki(tmp_path / "other", server_names=["localhost"], clients=["eve"])
        context.load_cert_chain(str(tmp_path / "other" / "eve.pem"), str(tmp_path / "other" / "eve.key"))
        with socket.create_connection((server.host, server.port)) as raw:
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"\x42" * 8)
                    tls.recv(1)
        # A port probe.
        socket.create_connection((server.host, server.port)).close()
        # Garbage after a good handshake.
        with RawClient(server.host, server.port, pki_dir, "alice") as raw_client:
            raw_client.sock.sendall(bytes.fromhex("42007801") + b"\x00\x00\x00\x08" + b"\x00" * 8)
            raw_client.sock.recv(1)

        def complete(records):
            return sum(1 for r in records if r["event"] == "tls-refused") >= 3 and any(
                r["event"] == "undecodable-message" for r in records
            )

        records = _records_until(config, complete)
    finally:
        assert server.stop() == 0
    created = next(r for r in records if r["operation"] == "CREATE" and r["uid"] == uid)
    assert created["client"]["username"] == "vcenter-svc" and created["client"]["name"] == "alice"
    assert "CN=alice" in created["client"]["subject"] and len(created["client"]["fingerprint"]) >= 64
    refused = [r for r in records if r["event"] == "message-refused"]
    assert refused and refused[0]["result"]["reason"] == "AUTHENTICATION_NOT_SUCCESSFUL"
    assert refused[0]["client"]["username"] == "vcenter-svc"
    tls = [r for r in records if r["event"] == "tls-refused"]
    assert len(tls) >= 3 and all(r["peer"].startswith("127.0.0.1:") for r in tls)
    assert all(r["result"]["reason"] == "TLS_REFUSED" and r["detail"] for r in tls)
    assert any(r["event"] == "undecodable-message" and r["client"]["name"] == "alice" for r in records)
    everything = json.dumps(records)
    assert "wrong-password-123" not in everything and "s3cret" not in everything
    assert admin("audit", "verify", "--config", str(config)).returncode == 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["show", "--since", "yesterday"], "not a time"),
        (["show", "--operation", "Frobnicate"], "not a KMIP operation"),
        (["verify", "--public-key", "/nonexistent/audit.pub"], "cannot read the audit public key"),
        (["export", "--to", "/nonexistent/dir/out.jsonl"], "nonexistent"),
    ],
)
def test_command_line_mistakes_are_one_line(pristine, args, words):
    """Operator mistakes name the problem in one line, exit 2, no traceback."""
    done = admin("audit", *args, "--config", str(pristine / "kms.toml"))
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in done.stderr, done.stderr


def test_show_filters_on_a_real_trail(pristine):
    """--operation, --result, --client, --since/--until and --limit select
    what they say, from the table the node wrote."""
    config = pristine / "kms.toml"
    everything = show(config)
    gets = show(config, "--operation", "Get")
    assert gets and {r["operation"] for r in gets} == {"GET"}
    assert len(gets) == sum(1 for r in everything if r["operation"] == "GET")
    assert show(config, "--result", "failure") == [r for r in everything if r["result"]["status"] != "SUCCESS"]
    assert {r["client"]["name"] for r in show(config, "--client", "alice")} == {"alice"}
    assert show(config, "--limit", "3") == everything[-3:]
    assert show(config, "--since", "1h") == everything
    assert show(config, "--until", "2000-01-01") == []
