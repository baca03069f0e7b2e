"""A throw-away Patroni + etcd cluster for tests, built from the
configuration in docs/deployment.md.

The guide's `/etc/patroni/config.yml` block is read from the document
itself, so the test runs what an operator would copy: the same DCS timing
(ttl, loop_wait, retry_timeout), strict synchronous mode, lag limit,
PostgreSQL parameters, initdb options, authentication and pg_hba lines.
Only what a single test machine needs is changed: every address is
127.0.0.1 on a free port, paths are in a temporary directory, the etcd
"cluster" is one member (the guide's three members give etcd its own
quorum, which one machine cannot show anyway), and initdb is told not to
trust local connections (see `write_config`), so that the guide's
scram-sha-256 lines and passwords are what lets Patroni, the replicas, psql
and the KMS node in.

etcd runs as the current user (root is fine); Patroni and the PostgreSQL it
starts run as `postgres` when the tests run as root. Everything started here
is killed by `close()`, and the temporary directory removed."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pg_cluster

GUIDE = Path(__file__).resolve().parent.parent / "docs" / "deployment.md"
PATRONI = shutil.which("patroni")
ETCD = shutil.which("etcd")


def available() -> str | None:
    """None if a cluster can be made here, else the reason it cannot."""
    reason = pg_cluster.available()
    if reason:
        return reason
    if PATRONI is None:
        return "patroni is not installed (Debian: apt-get install patroni)"
    if ETCD is None:
        return "etcd is not installed (Debian: apt-get install etcd-server)"
    if _patroni_python() is None:
        return "cannot find the Python interpreter patroni runs with"
    return None


def _patroni_python() -> str | None:
    """The interpreter of the patroni script: it has PyYAML (a dependency of
    the Debian package), which reads the guide's YAML for us."""
    try:
        first = Path(PATRONI).read_text(errors="replace").splitlines()[0]
    except (OSError, IndexError, TypeError):
        return None
    if not first.startswith("#!"):
        return None
    interpreter = first[2:].strip().split()
    return interpreter[0] if interpreter and os.access(interpreter[0], os.X_OK) else None


def _guide_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", GUIDE.read_text(), re.S)


def guide_patroni_config() -> dict:
    """The guide's Patroni configuration (the YAML block), as a dict."""
    blocks = [b for b in _guide_blocks("yaml") if "etcd3:" in b or "bootstrap:" in b]
    if len(blocks) != 1:
        raise RuntimeError(f"expected one Patroni YAML block in {GUIDE}, found {len(blocks)}")
    result = subprocess.run(
        [_patroni_python(), "-c", "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"],
        input=blocks[0], capture_output=True, text=True, timeout=30,
    )
    if result.returncode != 0:
        raise RuntimeError(f"the guide's Patroni YAML does not parse: {result.stderr}")
    return json.loads(result.stdout)


def guide_etcd_environment() -> dict[str, str]:
    """The guide's /etc/default/etcd settings (ETCD_* variables)."""
    env: dict[str, str] = {}
    for block in _guide_blocks("sh"):
        for name, value in re.findall(r'^(ETCD_[A-Z_]+)="([^"]*)"', block, re.M):
            env[name] = value
    if not env:
        raise RuntimeError(f"no ETCD_* settings found in {GUIDE}")
    return env


def _to_loopback(text: str) -> str:
    """Every IPv4 address or network of the guide becomes 127.0.0.1."""
    return re.sub(r"\b\d{1,3}(?:\.\d{1,3}){3}(?:/\d{1,2})?", lambda m: "127.0.0.1/32" if "/" in m.group() else "127.0.0.1", text)


def _alive(pid: int) -> bool:
    """True if the process exists and is not a zombie (a killed postmaster is
    not our child, so nobody here reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    except (OSError, IndexError):
        return False


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def _with_descendants(pids: list[int]) -> list[int]:
    children = _children_map()
    result, todo = [], list(pids)
    while todo:
        pid = todo.pop()
        if pid in result:
            continue
        result.append(pid)
        todo.extend(children.get(pid, []))
    return result


def _kill(pids: list[int], timeout: float = 10.0) -> None:
    """SIGKILL the processes and their descendants; wait until they are gone."""
    targets = _with_descendants(pids)
    for pid in targets:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in targets) and time.monotonic() < deadline:
        time.sleep(0.01)


def _processes_using(root: Path) -> list[int]:
    """Processes whose command line names a path under `root` (a unique temp
    directory): a safety net for anything a killed parent left behind."""
    found = []
    needle = str(root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def _get_json(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


class PatroniNode:
    def __init__(self, cluster: PatroniCluster, name: str):
        self.cluster = cluster
        self.name = name
        self.dir = cluster.root / name
        self.data = self.dir / "data"
        self.pg_port = pg_cluster.free_port()
        self.rest_port = pg_cluster.free_port()
        self.config_file = self.dir / "patroni.yml"
        self.log = self.dir / "patroni.log"
        self.proc: subprocess.Popen | None = None
        self.killed_at: float | None = None

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.rest_port}"

    def write_config(self, guide: dict, etcd_hosts: str) -> None:
        config = json.loads(_to_loopback(json.dumps(guide)))
        config["name"] = self.name
        config["restapi"] = {"listen": f"127.0.0.1:{self.rest_port}", "connect_address": f"127.0.0.1:{self.rest_port}"}
        config["etcd3"] = {"hosts": etcd_hosts}
        pg = config["postgresql"]
        pg["listen"] = pg["connect_address"] = f"127.0.0.1:{self.pg_port}"
        pg["data_dir"] = str(self.data)
        pg["bin_dir"] = str(pg_cluster.BIN)
        pg["pgpass"] = str(self.dir / "pgpass")
        # The socket in the temp dir, not /var/run/postgresql, and small
        # buffers: three instances share one test machine.
        pg.setdefault("parameters", {}).update(
            {"unix_socket_directories": str(self.cluster.root), "shared_buffers": "32MB"}
        )
        # initdb's default pg_hba.conf, which Patroni appends the guide's
        # lines to, trusts every local and 127.0.0.1 connection: the guide's
        # scram-sha-256 lines would never be reached on one machine. Close
        # it (unless the guide sets these itself) so the passwords and
        # pgpass files below are really used.
        initdb = config["bootstrap"].setdefault("initdb", [])
        named = {next(iter(o)) for o in initdb if isinstance(o, dict)} | {o for o in initdb if isinstance(o, str)}
        if not named & {"auth", "auth-host"}:
            initdb.append({"auth-host": "scram-sha-256"})
        if not named & {"auth", "auth-local"}:
            initdb.append({"auth-local": "peer"})
        config["log"] = {"level": "INFO"}
        # JSON is YAML; patroni reads it as its config.yml.
        self.config_file.write_text(json.dumps(config, indent=2))

    def start(self) -> None:
        self.dir.mkdir(mode=0o700, exist_ok=True)
        kwargs = {}
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
            os.chown(self.config_file, pw.pw_uid, pw.pw_gid)
            kwargs = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
        env = {"PATH": f"{pg_cluster.BIN}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": str(self.dir)}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [PATRONI, str(self.config_file)], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir, env=env, start_new_session=True, **kwargs,
            )

    def postmaster_pid(self) -> int | None:
        try:
            pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) else None

    def kill_host(self) -> None:
        """SIGKILL Patroni, then the postmaster and every backend: the host
        is gone, and its leader key stays in etcd until its ttl runs out."""
        pids = []
        if self.proc is not None and self.proc.poll() is None:
            pids.append(self.proc.pid)
        postmaster = self.postmaster_pid()
        targets = _with_descendants(pids + ([postmaster] if postmaster else []))
        self.killed_at = time.monotonic()
        _kill(targets)
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if postmaster and _alive(postmaster):
            raise RuntimeError(f"{self.name}: postmaster {postmaster} survived SIGKILL")

    def psql(self, sql: str, db: str = "kms", timeout: float = 30) -> str:
        env = {**os.environ, "PGPASSWORD": self.cluster.superuser_password, "PGCONNECT_TIMEOUT": "3"}
        result = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.pg_port), "-U", self.cluster.superuser, "-d", db,
             "-v", "ON_ERROR_STOP=1", "-Atc", sql],
            capture_output=True, text=True, timeout=timeout, env=env,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql on {self.name}: {result.stderr}")
        return result.stdout.strip()

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class PatroniCluster:
    """One etcd member and three Patroni nodes on 127.0.0.1."""

    def __init__(self, nodes: int = 3):
        reason = available()
        if reason:
            raise RuntimeError(reason)
        self.guide = guide_patroni_config()
        auth = self.guide["postgresql"]["authentication"]["superuser"]
        self.superuser = auth.get("username", "postgres")
        self.superuser_password = auth.get("password", "")
        self.root = Path(tempfile.mkdtemp(prefix="kms-patroni-"))
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.etcd_client_port = pg_cluster.free_port()
        self.etcd_peer_port = pg_cluster.free_port()
        self.etcd_proc: subprocess.Popen | None = None
        self.nodes = {f"pg-{i}": PatroniNode(self, f"pg-{i}") for i in range(1, nodes + 1)}
        self.killed: set[str] = set()

    # -- etcd ---------------------------------------------------------------

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.etcd_client_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        env = guide_etcd_environment()
        name = env.get("ETCD_NAME", "etcd-1")
        env.update({
            "ETCD_NAME": name,
            "ETCD_DATA_DIR": str(self.root / "etcd"),
            "ETCD_LISTEN_PEER_URLS": peer,
            "ETCD_LISTEN_CLIENT_URLS": client,
            "ETCD_INITIAL_ADVERTISE_PEER_URLS": peer,
            "ETCD_ADVERTISE_CLIENT_URLS": client,
            "ETCD_INITIAL_CLUSTER": f"{name}={peer}",
        })
        with open(self.root / "etcd.log", "ab") as log:
            self.etcd_proc = subprocess.Popen(
                [ETCD], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={"PATH": "/usr/bin:/bin", **env}, start_new_session=True,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.etcd_proc.poll() is not None:
                break
            try:
                if _get_json(f"{client}/health").get("health") == "true":
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.1)
        raise RuntimeError("etcd did not become healthy:\n" + self._tail(self.root / "etcd.log"))

    # -- Patroni ------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PatroniCluster:
        """Start etcd and the three nodes; return once there is a running
        leader, and the other two stream from it, the one Patroni names
        "Sync Standby" synchronously."""
        try:
            self._start_etcd()
            for node in self.nodes.values():
                node.dir.mkdir(mode=0o700, exist_ok=True)
                node.write_config(self.guide, f"127.0.0.1:{self.etcd_client_port}")
                node.start()
            deadline = time.monotonic() + timeout
            members: list[dict] = []
            while time.monotonic() < deadline:
                for node in self.nodes.values():
                    if node.proc.poll() is not None:
                        raise RuntimeError(f"patroni {node.name} exited:\n{node.log_tail()}")
                members = self.members()
                roles = sorted((m.get("role"), m.get("state")) for m in members)
                if roles == [("leader", "running"), ("replica", "running"), ("sync_standby", "running")]:
                    leader = self.leader()
                    try:
                        streaming = leader.psql(
                            "SELECT string_agg(application_name || '=' || sync_state, ',' ORDER BY application_name)"
                            " FROM pg_stat_replication WHERE state = 'streaming'", db="postgres", timeout=5)
                    except (RuntimeError, subprocess.TimeoutExpired):
                        streaming = ""
                    sync = self.sync_standby()
                    if sync is not None and f"{sync.name}=sync" in streaming and streaming.count("=") == 2:
                        return self
                time.sleep(0.25)
            raise RuntimeError(
                f"no leader + sync standby + replica within {timeout} s: {members}\n"
                + "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in self.nodes.values())
            )
        except BaseException:
            self.close()
            raise

    def alive_nodes(self) -> list[PatroniNode]:
        return [n for n in self.nodes.values() if n.name not in self.killed]

    def members(self) -> list[dict]:
        """GET /cluster from the first node that answers (the view in etcd)."""
        for node in self.alive_nodes():
            try:
                return _get_json(f"{node.api}/cluster").get("members", [])
            except (OSError, ValueError):
                continue
        return []

    def leader(self) -> PatroniNode | None:
        for member in self.members():
            if member.get("role") == "leader" and member.get("name") not in self.killed:
                return self.nodes[member["name"]]
        return None

    def sync_standby(self) -> PatroniNode | None:
        for member in self.members():
            if member.get("role") == "sync_standby" and member.get("name") not in self.killed:
                return self.nodes[member["name"]]
        return None

    def kill_leader(self) -> PatroniNode:
        """SIGKILL the leader's Patroni and PostgreSQL, as if its host died
        (the returned node's `killed_at` is the monotonic time of the kill)."""
        node = self.leader()
        if node is None:
            raise RuntimeError(f"no leader to kill: {self.members()}")
        self.killed.add(node.name)
        node.kill_host()
        return node

    def wait_new_leader(self, timeout: float = 45.0) -> PatroniNode:
        """Wait until a surviving node is a writable primary: its REST API
        answers 200 on /primary (Patroni holds the leader key and PostgreSQL
        has been promoted)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.alive_nodes():
                try:
                    with urllib.request.urlopen(f"{node.api}/primary", timeout=1) as response:
                        if response.status == 200:
                            return node
                except (OSError, ValueError):
                    pass
            time.sleep(0.05)
        raise RuntimeError(
            f"no new leader within {timeout} s: {self.members()}\n"
            + "\n".join(f"--- {n.name}\n{n.log_tail()}" for n in self.alive_nodes())
        )

    def wait_sync_standby(self, timeout: float = 30.0) -> PatroniNode:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            node = self.sync_standby()
            if node is not None:
                return node
            time.sleep(0.1)
        raise RuntimeError(f"no sync standby within {timeout} s: {self.members()}")

    def multi_host_url(self, user: str = "kms", db: str = "kms") -> str:
        """The guide's KMS storage URL: every node, the writable one wins."""
        hosts = "&".join(f"host=127.0.0.1:{n.pg_port}" for n in self.nodes.values())
        return f"postgresql+psycopg://{user}@/{db}?{hosts}&target_session_attrs=read-write&connect_timeout=3"

    def passfile_lines(self, user: str, password: str, db: str = "kms") -> str:
        return "".join(f"127.0.0.1:{n.pg_port}:{db}:{user}:{password}\n" for n in self.nodes.values())

    # -- cleanup ------------------------------------------------------------

    def close(self) -> None:
        pids = []
        for node in self.nodes.values():
            if node.proc is not None and node.proc.poll() is None:
                pids.append(node.proc.pid)
            postmaster = node.postmaster_pid()
            if postmaster:
                pids.append(postmaster)
        if self.etcd_proc is not None and self.etcd_proc.poll() is None:
            pids.append(self.etcd_proc.pid)
        _kill(pids)
        # Anything a killed parent left behind (pg_basebackup, initdb, a
        # postmaster that had not written its pid file yet).
        for _ in range(5):
            leftovers = _processes_using(self.root)
            if not leftovers:
                break
            _kill(leftovers)
        for proc in [n.proc for n in self.nodes.values()] + [self.etcd_proc]:
            if proc is not None:
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        shutil.rmtree(self.root, ignore_errors=True)

    @staticmethod
    def _tail(path: Path, lines: int = 25) -> str:
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""
