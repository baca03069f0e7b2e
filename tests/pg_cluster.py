"""Throw-away PostgreSQL instances for tests: a primary and a synchronous
standby made with initdb, pg_basebackup and pg_ctl on free 127.0.0.1
ports, in a temporary directory, stopped and removed by the test.

PostgreSQL refuses to run as root, so when the tests run as root (CI does)
the server programs run as the `postgres` user."""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path


def _bin_dir() -> Path | None:
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


BIN = _bin_dir()


def available() -> str | None:
    """None if instances can be made here, else the reason they cannot."""
    if BIN is None:
        return "PostgreSQL server programs (initdb, pg_ctl) are not installed"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
    return None


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_ports(count: int) -> list[int]:
    """`count` different 127.0.0.1 ports nobody listens on, for servers that
    must be told their port before they start (PostgreSQL, Patroni, etcd, a
    copied configuration).

    Taken at random below the kernel's ephemeral range when there is room:
    a port from bind(0) is in that range, and so is the local port of every
    outgoing connection that the other test processes on this machine open
    (xdist workers, other checkouts), any of which could hold the port by
    the time the server binds it. Below the range only another explicit
    choice like this one can, and at random that is unlikely."""
    low, _ = _ephemeral_range()
    ports: list[int] = []
    if low > 12000:
        candidates = random.sample(range(10000, low), min(low - 10000, 50 * count))
        for port in candidates:
            if len(ports) == count:
                break
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
            ports.append(port)
    sockets = []
    try:
        while len(ports) < count:
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
    finally:
        for s in sockets:
            s.close()
    return ports


def free_port() -> int:
    """One port as free_ports gives them."""
    return free_ports(1)[0]


def _run(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    if os.geteuid() == 0:
        args = ["runuser", "-u", "postgres", "--", *args]
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kwargs)


class PgInstance:
    def __init__(self, root: Path, name: str, port: int | None = None):
        self.data = root / name
        self.port = port or free_port()
        self.name = name
        self.log = root / f"{name}.log"

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/kms"

    def pg_ctl(self, *args: str) -> subprocess.CompletedProcess:
        return _run([str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), *args])

    def start(self) -> None:
        result = self.pg_ctl("-w", "-t", "60", "start")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl start {self.name} failed: {result.stderr}\n{self._log_tail()}")

    def stop(self) -> None:
        if self.pid() is not None:
            self.pg_ctl("-w", "-t", "30", "-m", "immediate", "stop")

    def kill9(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)

    def promote(self) -> None:
        result = self.pg_ctl("-w", "-t", "60", "promote")
        if result.returncode != 0:
            raise RuntimeError(f"pg_ctl promote {self.name} failed: {result.stderr}")

    def pid(self) -> int | None:
        pidfile = self.data / "postmaster.pid"
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            os.kill(pid, 0)
            return pid
        except (OSError, ValueError, IndexError):
            return None

    def psql(self, sql: str, db: str = "kms") -> str:
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db, "-Atc", sql],
            capture_output=True, text=True, timeout=60,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql on {self.name}: {result.stderr}")
        return result.stdout.strip()

    def _log_tail(self) -> str:
        try:
            return "\n".join(self.log.read_text().splitlines()[-20:])
        except OSError:
            return ""


class PgCluster:
    """A primary and (optionally) a synchronous streaming standby."""

    def __init__(self, standby: bool = True):
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.root = Path(tempfile.mkdtemp(prefix="kms-pg-"))
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.primary = PgInstance(self.root, "primary")
        self.standby = PgInstance(self.root, "standby") if standby else None

    def start(self) -> PgCluster:
        p = self.primary
        result = _run([str(BIN / "initdb"), "-D", str(p.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"])
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed: {result.stderr}")
        settings = [
            "listen_addresses = '127.0.0.1'",
            f"port = {p.port}",
            f"unix_socket_directories = '{self.root}'",
            "wal_level = replica",
            "max_wal_senders = 5",
            "fsync = on",
            "synchronous_commit = on",
            "shared_buffers = 32MB",
        ]
        with open(p.data / "postgresql.conf", "a") as conf:
            conf.write("\n" + "\n".join(settings) + "\n")
        with open(p.data / "pg_hba.conf", "a") as hba:
            hba.write("host replication postgres 127.0.0.1/32 trust\n")
        p.start()
        p.psql("CREATE DATABASE kms", db="postgres")
        if self.standby is not None:
            s = self.standby
            result = _run(
                [str(BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(p.port), "-U", "postgres",
                 "-D", str(s.data), "-R", "-X", "stream", "--checkpoint=fast"]
            )
            if result.returncode != 0:
                raise RuntimeError(f"pg_basebackup failed: {result.stderr}")
            with open(s.data / "postgresql.conf", "a") as conf:
                conf.write(f"\nport = {s.port}\n")
            # application_name makes this the synchronous standby.
            auto = s.data / "postgresql.auto.conf"
            text = auto.read_text().replace("primary_conninfo = '", "primary_conninfo = 'application_name=standby ")
            auto.write_text(text)
            s.start()
            # Synchronous only now: with no standby connected, commits on
            # the primary would wait for one forever.
            p.psql("ALTER SYSTEM SET synchronous_standby_names = 'standby'", db="postgres")
            p.psql("SELECT pg_reload_conf()", db="postgres")
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                if p.psql("SELECT sync_state FROM pg_stat_replication", db="postgres") == "sync":
                    break
                time.sleep(0.2)
            else:
                raise RuntimeError("the standby did not become synchronous")
        return self

    def multi_host_url(self) -> str:
        hosts = [self.primary] + ([self.standby] if self.standby else [])
        query = "&".join(f"host=127.0.0.1:{i.port}" for i in hosts)
        return f"postgresql+psycopg://postgres@/kms?{query}&target_session_attrs=read-write&connect_timeout=3"

    def close(self) -> None:
        for instance in (self.standby, self.primary):
            if instance is not None:
                instance.stop()
                pid = instance.pid()
                if pid:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
