"""Shared fixtures: a development PKI made once per session, real
`kms-server` processes on free 127.0.0.1 ports, and throwaway databases on
this machine's PostgreSQL (127.0.0.1:5432)."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

CLIENTS = ("alice", "bob", "admin", "nocrypto", "auditor")

PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_USER = "postgres"
PG_ADMIN_DB = "postgres"


def _postgres_admin():
    """A connection to this machine's PostgreSQL as its superuser; the
    test is skipped only when the server is unreachable or psycopg is
    missing (reachable but refusing us is a failure)."""
    psycopg = pytest.importorskip("psycopg")
    try:
        socket.create_connection((PG_HOST, PG_PORT), timeout=2).close()
    except OSError as exc:
        pytest.skip(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT}: {exc}")
    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname=PG_ADMIN_DB, autocommit=True)


def new_postgres_database(prefix: str = "kms_test") -> tuple[str, str]:
    """A new, empty database: (name, SQLAlchemy URL). Drop it with
    drop_postgres_database."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with _postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return name, f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"


def drop_postgres_database(name: str) -> None:
    with _postgres_admin() as admin:
        # FORCE: a failed test may have left a connection open.
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def postgres_available() -> bool:
    """Whether psycopg is installed and PostgreSQL answers on PG_HOST:PG_PORT
    (for a module skipped as a whole; tests needing a database just call
    new_postgres_database or use the fixtures, which skip by themselves)."""
    try:
        import psycopg  # noqa: F401

        socket.create_connection((PG_HOST, PG_PORT), timeout=2).close()
        return True
    except (ImportError, OSError):
        return False


# --- Dependencies that must be there ------------------------------------------------
# KMS_TEST_REQUIRE (comma-separated; .ci/run sets everything CI installs) turns
# a skip for a missing dependency into a failure, so a CI machine that lost a
# package fails instead of passing on fewer tests. The words are matched in
# the skip reason.
REQUIREMENT_WORDS = {
    "postgresql": ("postgresql", "psycopg", "initdb"),
    "swtpm": ("swtpm",),
    "tpm2-tools": ("tpm2-tools", "tpm2_"),
    "patroni": ("patroni", "etcd"),
    "chromium": ("chromium",),
    "softhsm2": ("softhsm",),
}


def required_dependency(reason: str) -> str | None:
    """The KMS_TEST_REQUIRE entry a skip reason is about, if required."""
    wanted = {w.strip() for w in os.environ.get("KMS_TEST_REQUIRE", "").split(",") if w.strip()}
    text = reason.lower()
    for name in sorted(wanted):
        if any(word in text for word in REQUIREMENT_WORDS.get(name, (name,))):
            return name
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail") and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        name = required_dependency(reason)
        if name is not None:
            report.outcome = "failed"
            report.longrepr = f"skipped, but KMS_TEST_REQUIRE names {name}: {reason}"


@pytest.fixture
def postgres_db() -> Iterator[tuple[str, str]]:
    """(name, URL) of a new, empty PostgreSQL database, dropped afterwards."""
    name, url = new_postgres_database()
    try:
        yield name, url
    finally:
        drop_postgres_database(name)


@pytest.fixture
def postgres_url(postgres_db) -> str:
    return postgres_db[1]


class SentStatements(list):
    """The statements the SQL storage sends through psycopg itself
    (`pg_execute`), once `start()` is called: (sql, executemany) pairs;
    `ahead[i]`, the statements deferred (`pg_defer`) that went ahead of
    the i-th, in its round trip."""

    def __init__(self, monkeypatch):
        super().__init__()
        self._monkeypatch = monkeypatch
        self.ahead: list[tuple[str, ...]] = []

    def start(self) -> SentStatements:
        from kms_server.storage import sql

        real_execute, real_defer = sql.pg_execute, sql.pg_defer
        pending: dict[int, list[str]] = {}  # by psycopg connection

        def deferred(conn, statement):
            pending.setdefault(id(conn.connection.driver_connection), []).append(statement)
            return real_defer(conn, statement)

        def counted(conn, statement, params=None, many=None):
            self.append((statement, many is not None))
            self.ahead.append(tuple(pending.pop(id(conn.connection.driver_connection), ())))
            return real_execute(conn, statement, params, many)

        self._monkeypatch.setattr(sql, "pg_execute", counted)
        self._monkeypatch.setattr(sql, "pg_defer", deferred)
        return self

    def starting(self, prefix: str) -> list[str]:
        return [statement for statement, _ in self if statement.startswith(prefix)]

    def ahead_of(self, prefix: str) -> list[tuple[str, ...]]:
        """What went ahead of each statement that starts with `prefix`."""
        return [ahead for (statement, _), ahead in zip(self, self.ahead, strict=True) if statement.startswith(prefix)]


@pytest.fixture
def pg_statements(monkeypatch) -> SentStatements:
    """What the SQL storage sends on PostgreSQL, counted from `start()`."""
    return SentStatements(monkeypatch)


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory) -> Path:
    from kmip_core.pki import init_pki

    directory = tmp_path_factory.mktemp("pki")
    init_pki(directory, server_names=["localhost"], clients=list(CLIENTS))
    return directory


class ServerProcess:
    def __init__(self, proc: subprocess.Popen, host: str, port: int, log: list[str], workdir: Path):
        self.proc = proc
        self.host = host
        self.port = port
        self.log = log
        self.workdir = workdir
        # What the server printed on stdout after its "listening on" line
        # (e.g. "kms-server audit page on https://H:P/").
        self.stdout_lines: list[str] = []

    def announced(self, prefix: str, timeout: float = 15.0) -> str:
        """The first stdout line starting with `prefix`, waiting for it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.stdout_lines):
                if line.startswith(prefix):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"the server never printed {prefix!r}:\n{self.stderr_text()}")

    def stop(self, sig=signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.proc.returncode

    def stderr_text(self) -> str:
        return "\n".join(self.log)

    def logged(self, fragment: str, timeout: float = 15.0) -> bool:
        """Whether the server's log shows `fragment`, waiting up to `timeout`
        for the thread that reads its stderr to catch up (it lags behind the
        server's answers on a loaded machine)."""
        deadline = time.monotonic() + timeout
        while fragment not in self.stderr_text():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True


def _drain_into(stream, lines: list[str]) -> None:
    for line in stream:
        lines.append(line.rstrip())


def write_node_config(
    workdir: Path,
    pki: Path,
    extra_config: str = "",
    db_url: str | None = None,
    log_level: str = "INFO",
    node_name: str | None = None,
    master_key: Path | None = None,
    server_config: str = "",
    master_key_toml: str | None = None,
) -> Path:
    """A node's kms.toml in `workdir` (and its master key file, and the
    audit key beside it, unless they exist): what `start_server` runs.
    Nodes of one cluster share `master_key` (a key file); by default each
    workdir gets its own. `server_config` holds extra lines for the
    [server] table (one worker process unless it sets `processes`:
    tests/integration/test_process_model.py runs several);
    `master_key_toml`, when given, is the [master_key] table's body instead
    of the key file (a token key)."""
    workdir.mkdir(parents=True, exist_ok=True)
    key_file = master_key or workdir / "master.key"
    if not key_file.exists():
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, (secrets.token_hex(32) + "\n").encode())
        os.close(fd)
    audit_section = ""
    if "[audit]" not in extra_config:
        # Every node signs checkpoints with the cluster's audit key (the
        # master key's directory holds it).
        audit_key_file = key_file.with_name("audit.key")
        if not audit_key_file.exists():
            from kmip_core.audit import audit_key

            audit_key.generate(audit_key_file, key_file.with_name("audit.pub"))
        audit_section = f'\n[audit]\nsigning_key_file = "{audit_key_file}"\n'
    config = workdir / "kms.toml"
    config.write_text(
        textwrap.dedent(
            f"""
            [server]
            host = "127.0.0.1"
            port = 0
            node_name = "{node_name or workdir.name}"
            data_dir = "{workdir / 'data'}"
            idle_timeout = 30.0
            handshake_timeout = 5.0
            {"" if "processes" in server_config else "processes = 1"}
            {textwrap.indent(textwrap.dedent(server_config), " " * 12).strip()}

            [tls]
            cert = "{pki / 'server.pem'}"
            key = "{pki / 'server.key'}"
            ca = "{pki / 'ca.pem'}"

            [master_key]
            {textwrap.indent(master_key_toml or f'file = "{key_file}"', " " * 12).strip()}

            [logging]
            level = "{log_level}"
            """
        )
        + ("\n[storage]\ndb_url = \"" + db_url + "\"\n" if db_url else "")
        + textwrap.dedent(extra_config)
        + audit_section
    )
    return config


def start_server(
    workdir: Path,
    pki: Path,
    extra_config: str = "",
    db_url: str | None = None,
    env=None,
    log_level: str = "INFO",
    node_name: str | None = None,
    master_key: Path | None = None,
    server_config: str = "",
    master_key_toml: str | None = None,
) -> ServerProcess:
    """Start a node in `workdir` (its configuration: `write_node_config`)."""
    config = write_node_config(
        workdir,
        pki,
        extra_config=extra_config,
        db_url=db_url,
        log_level=log_level,
        node_name=node_name,
        master_key=master_key,
        server_config=server_config,
        master_key_toml=master_key_toml,
    )
    if db_url and db_url.startswith("postgresql"):
        # Cluster nodes only check the schema; upgrading is the operator's step.
        upgrade = subprocess.run(
            [sys.executable, "-m", "kms_server.admin.cli", "db", "upgrade", "--config", str(config)],
            capture_output=True, text=True, timeout=120,
        )
        if upgrade.returncode != 0:
            raise RuntimeError(f"kms-admin db upgrade failed: {upgrade.stderr}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kms_server.cli", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    log: list[str] = []
    threading.Thread(target=lambda: [log.append(line.rstrip()) for line in proc.stderr], daemon=True).start()
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if "listening on" in line:
            address = line.strip().rsplit(" ", 1)[1]
            host, port = address.rsplit(":", 1)
            server = ServerProcess(proc, host, int(port), log, workdir)
            # Keep draining stdout so the server never blocks on a full pipe.
            threading.Thread(target=_drain_into, args=(proc.stdout, server.stdout_lines), daemon=True).start()
            return server
    proc.kill()
    proc.wait(5)
    time.sleep(0.2)
    raise RuntimeError(f"kms-server did not start: {line!r}\n" + "\n".join(log))


@pytest.fixture
def kms(tmp_path, pki_dir):
    """A kms-server process on a free port with the embedded SQLite store;
    'admin' is an administrator, 'nocrypto' a no-cryptography administrator,
    'auditor' an auditor."""
    server = start_server(
        tmp_path / "node",
        pki_dir,
        extra_config="""
        [access]
        administrators = ["admin"]
        no_crypto_administrators = ["nocrypto"]
        auditors = ["auditor"]
        """,
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def kms_module(tmp_path_factory, pki_dir):
    """Like `kms`, shared by the tests of one module."""
    server = start_server(
        tmp_path_factory.mktemp("node"),
        pki_dir,
        extra_config="""
        [access]
        administrators = ["admin"]
        no_crypto_administrators = ["nocrypto"]
        auditors = ["auditor"]
        """,
    )
    yield server
    server.stop()


# --- vTPM tests ----------------------------------------------------------------------


@pytest.fixture
def workdir():
    """Private directories (state/ and run/, mode 0700) for a vTPM's clear
    state and sockets, one per call, wiped at the end whatever happens."""
    from broker.host.swtpm import private_workdir, wipe

    made: list[Path] = []

    def make() -> Path:
        path = private_workdir(prefix="vtpm-test-")
        made.append(path)
        (path / "state").mkdir(mode=0o700)
        (path / "run").mkdir(mode=0o700)
        return path

    yield make
    for path in made:
        wipe(path)


@pytest.fixture
def swtpms():
    """swtpm instances registered here are killed at the end, even if the
    test fails half way."""
    started: list = []
    yield started
    for instance in started:
        instance.kill()
