"""Shared fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL), real API processes over HTTP."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import sqlalchemy as sa
from openai import OpenAI

from core.batch_app.config import Settings
from core.batch_app.database import database_url, migrate, open_database, stop_embedded
from core.batch_app.domain import registry
from core.batch_app.domain.keys import create_key

REPO = Path(__file__).resolve().parents[1]
API_KEY = "sk-test-default-project"
TEST_MODEL = "api-test-model"


def cannot_run(reason: str) -> None:
    """A test that cannot run here: a skip on a developer's machine, a failure in CI (CI=true),
    which must have everything the suite needs."""
    if os.environ.get("CI") == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_tool(*names: str, package: str) -> str:
    """The path of the first of `names` on PATH (scripts/test.sh installs `package` as root)."""
    for name in names:
        if path := shutil.which(name):
            return path
    cannot_run(f"{names[0]} is not installed (Debian's {package} package; scripts/test.sh installs it as root)")


# Ports handed to servers that bind them later (a vLLM server binds 20 to 30 s after): taken below
# the kernel's ephemeral range, which it never gives to another socket meanwhile, in turn through a
# counter shared by every test process on the machine (parallel workers, other sessions), so no two
# are given the same port while the range lasts (about 12,000 ports before it wraps).
PORTS = range(20000, 32000)
PORT_COUNTER = Path(tempfile.gettempdir()) / "vbs-test-ports"


def free_port() -> int:
    with open(PORT_COUNTER, "a+") as counter:
        fcntl.flock(counter, fcntl.LOCK_EX)
        counter.seek(0)
        last = int(counter.read() or PORTS.start - 1)
        for step in range(1, len(PORTS) + 1):
            port = PORTS.start + (last + step - PORTS.start) % len(PORTS)
            with socket.socket() as sock:
                try:  # free now, and for no one else to take but those who ask here
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
            counter.seek(0)
            counter.truncate()
            counter.write(str(port))
            return port
    raise RuntimeError(f"no free port in {PORTS}")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    # Kept short: the embedded server's Unix socket path must stay under ~100 bytes.
    path = Path(os.environ.get("TEST_DATA_DIR") or tmp_path_factory.mktemp("data"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="session")
def database(data_dir) -> str:
    """The URL of a fresh database for this test session, migrated to head."""
    embedded = Settings(data_dir=data_dir, database_url="")
    server_url = os.environ.get("TEST_DATABASE_URL") or database_url(embedded)
    name = f"test_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    migrate(url)
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
    if not os.environ.get("TEST_DATABASE_URL"):
        stop_embedded(embedded)


@pytest.fixture(scope="session")
def db(database):
    engine = open_database(database, pool_size=5)
    yield engine
    engine.dispose()


def stack_env(database: str, data_dir: Path, name: str, **overrides: str) -> dict[str, str]:
    """The environment of one process of a test stack; its logs go to DATA_DIR/logs/<name>/."""
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "MODEL")}
    env.update(DATABASE_URL=database, DATA_DIR=str(data_dir), LOG_DIR=str(data_dir / "logs" / name),
               PYTHONPATH=str(REPO), API_KEY=API_KEY,
               MIN_COMPLETION_WINDOW="1",  # tests expire batches in seconds, not the default minute
               # Tests read finished batches' request rows (attempts, crashes); retention's own
               # tests set it to 0, the default.
               FINISHED_REQUESTS_RETENTION="3600")
    env.update(overrides)
    Path(env["LOG_DIR"]).mkdir(parents=True, exist_ok=True)
    return env


@contextlib.contextmanager
def scratch_database(database: str):
    """The URL of an empty database of its own, dropped afterwards."""
    admin = sa.create_engine(database, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)
    name = f"scratch_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(database).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


class ApiProcess:
    def __init__(self, env: dict[str, str]):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = env = dict(env, API_PORT=str(self.port))
        self.log_path = log_path = Path(env["LOG_DIR"]) / "api_server.log"
        self.log = open(log_path, "ab")  # what the server prints before its logging starts
        self.process = subprocess.Popen([sys.executable, "-m", "core.batch_app.api_server"], env=env,
                                        cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"API server exited with {self.process.returncode}; see {log_path}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"API server did not answer /health; see {log_path}")

    def client(self, api_key: str = API_KEY) -> OpenAI:
        return OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, timeout=120)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def start_api(database: str, data_dir: Path, name: str, **overrides: str) -> ApiProcess:
    return ApiProcess(stack_env(database, data_dir, name, **overrides))


@pytest.fixture(scope="session")
def api(database, data_dir):
    server = start_api(database, data_dir, "api")
    yield server
    server.stop()


@pytest.fixture
def client(api) -> OpenAI:
    return api.client()


def database_of_the_module(name: str, **api_overrides: str):
    """Fixtures `database`, `db` and `api` for a module whose watchdogs act on every row of their
    database (retention deletes every finished batch's rows, however many other tests left), or
    whose rows other tests' watchdogs must not act on (deliveries to loopback receivers): a
    migrated database of the module's own and an API on it (`api_overrides` its settings). Use as
    `database, db, api = database_of_the_module("name")`."""

    @pytest.fixture(scope="module")
    def database(database):
        with scratch_database(database) as url:
            migrate(url)
            yield url

    @pytest.fixture(scope="module")
    def db(database):
        engine = open_database(database, pool_size=5)
        yield engine
        engine.dispose()

    @pytest.fixture(scope="module")
    def api(database, data_dir):
        server = start_api(database, data_dir, f"api-{name}", **api_overrides)
        yield server
        server.stop()

    return database, db, api


@pytest.fixture
def project_client(api, db) -> OpenAI:
    """A client whose key belongs to a project of its own (nothing else is listed there)."""
    with db.begin() as conn:
        key = create_key(conn, f"project-{uuid.uuid4().hex[:8]}")
    return api.client(key)


def register_live_worker(db, model: str) -> str:
    """A worker row with a fresh heartbeat, as a running worker would register."""
    with db.begin() as conn:
        conn.execute(sa.text("DELETE FROM workers WHERE model = :m"), {"m": model})
        registry.register_worker(conn, worker_id=str(uuid.uuid4()), slot="api-test", host="test", pid=os.getpid(),
                              model=model, gpu_ids="")
    return model


@pytest.fixture
def live_model(db) -> str:
    """TEST_MODEL, served by a live worker (for API tests: no one claims its requests)."""
    return register_live_worker(db, TEST_MODEL)


@pytest.fixture
def own_model(db) -> str:
    """A model of this test's own, served by a live worker: its queue holds only this test's requests."""
    return register_live_worker(db, f"model-{uuid.uuid4().hex[:8]}")


class Watchdog:
    """A real watchdog process (which starts real worker processes) on the test database."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.log_dir = Path(env["LOG_DIR"])
        self.log = open(self.log_dir / "watchdog.log", "ab")  # what it prints before its logging starts
        self.process = subprocess.Popen([sys.executable, "-m", "core.batch_app.watchdog"], env=env, cwd=REPO,
                                        stdout=self.log, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 90) -> int:
        self.process.terminate()
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
            self.log.close()


def start_watchdog(database: str, data_dir: Path, name: str, workers: list[dict], **overrides: str) -> Watchdog:
    import json

    env = stack_env(database, data_dir, name, WORKERS=json.dumps(workers), WATCHDOG_CHECK_INTERVAL="0.5",
                    **overrides)
    return Watchdog(env)


@contextlib.contextmanager
def running_watchdog(database: str, data_dir: Path, name: str, workers: list[dict], **overrides: str):
    """A watchdog for the length of a block, which must then stop cleanly (exit code 0)."""
    watchdog = start_watchdog(database, data_dir, name, workers, **overrides)
    try:
        yield watchdog
    finally:
        assert watchdog.stop() == 0


def batchctl(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the installed `batchctl` console script, as a user would, with a stack's environment, on a
    terminal wide enough that its tables never wrap a header or a cell."""
    command = [str(Path(sys.executable).parent / "batchctl"), *args]
    return subprocess.run(command, env={**env, "COLUMNS": "400"}, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def echo_slot(name: str, engine: str = "EchoEngine") -> dict:
    """A worker slot running one of the test engines of tests/engines.py, serving a model named `name`."""
    return {"slot": name, "model": f"/models/{name}", "served_name": name, "engine": f"tests.engines:{engine}"}


def gone(pid: int) -> bool:
    """The process has exited (a zombie has exited too: only its exit status is left)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}")


def wait_for_batch(client: OpenAI, batch_id: str, timeout: float = 300):
    terminal = ("completed", "failed", "expired", "cancelled")
    return wait_for(lambda: (b := client.batches.retrieve(batch_id)).status in terminal and b, timeout,
                    interval=0.5, message=f"batch {batch_id} to end")


def rerun(db, batch_id: str) -> dict[str, int]:
    """The custom_ids of a batch that ran again after a worker holding them died (attempt above 1)
    and then succeeded, with the crashes charged to each. Empty when the killed worker held
    nothing of the batch."""
    with db.connect() as conn:
        return dict(conn.execute(sa.text(
            "SELECT custom_id, crashes FROM batch_requests WHERE batch_id = :b AND attempt > 1 "
            "AND status = 'succeeded'"), {"b": batch_id}).all())


def restarts(db, slot: str) -> list:
    """The restarts charged to a slot, oldest first: (reason, exit_code) rows, an operator's resets left out."""
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT reason, exit_code FROM worker_restarts WHERE slot = :s AND reason <> 'reset' "
                                    "ORDER BY id"), {"s": slot}).all()


def live_worker(db, slot: str, statuses=("idle", "busy")):
    """The current process row of a slot once it serves (id, pid, status), else None."""
    with db.connect() as conn:
        return conn.execute(sa.text(
            "SELECT id, pid, status FROM workers WHERE slot = :slot AND status = ANY(:statuses) "
            "ORDER BY started_at DESC LIMIT 1"), {"slot": slot, "statuses": list(statuses)}).first()


SHARED_SEQUENCES = 8
# The first demo server's tool-call options, as `vllm serve` arguments and as the engine_options
# of a worker slot that answers as it does (tests/test_parity.py).
TOOL_ARGUMENTS = ["--tool-call-parser", "hermes", "--enable-auto-tool-choice"]
TOOL_OPTIONS = {"tool_call_parser": "hermes", "enable_auto_tool_choice": True}


class DemoServers:
    """Two real vLLM OpenAI servers on the demo model, serving it as `pool-demo`, for the modules
    that send requests to servers (each server costs half a minute of both cores to load). The
    first parses tool calls (TOOL_ARGUMENTS). The second is set up as a server that also serves
    people: interactive requests before batch ones (`--scheduling-policy priority`), at most
    SHARED_SEQUENCES requests running at once. A test that kills or stops one leaves it running
    again."""

    def __init__(self, data_dir: Path) -> None:
        from .vllm_servers import VllmServer

        self.pair = [VllmServer(data_dir, f"demo-{i}", free_port()) for i in range(2)]
        self.pair[0].command += TOOL_ARGUMENTS
        self.pair[0].env["VLLM_SERVER_DEV_MODE"] = "1"  # POST /reset_prefix_cache empties its prefix cache
        self.pair[1].command += ["--scheduling-policy", "priority", "--max-num-seqs", str(SHARED_SEQUENCES)]
        self.running = False

    def start(self) -> list:
        if not self.running:
            self.running = True
            for server in self.pair:
                server.start()
            for server in self.pair:
                server.wait_ready()
        return self.pair

    def stop(self) -> None:
        self.running = False
        for server in self.pair:
            server.stop()


DEMO_SERVERS = pytest.StashKey[DemoServers]()
DEMO_SERVER_MODULES = pytest.StashKey[set]()


@pytest.fixture(scope="session")
def demo_server_pair(request, data_dir):
    pair = request.config.stash[DEMO_SERVERS] = DemoServers(data_dir)
    try:
        yield pair
    finally:
        pair.stop()


@pytest.fixture(scope="module")
def demo_servers(demo_server_pair):
    """The session's demo servers, started if they are not running."""
    return demo_server_pair.start()


def pytest_runtest_teardown(item, nextitem):
    """The demo servers stop when the next module does not use them (their modules run one after the
    other, tests/module_lanes.py): idle, each one's engine core still keeps about 6 % of a core busy."""
    if nextitem is None or nextitem.module is item.module:
        return
    users = item.config.stash.get(DEMO_SERVER_MODULES, None)
    if users is None:
        users = item.config.stash[DEMO_SERVER_MODULES] = {
            test.module for test in item.session.items if "demo_servers" in test.fixturenames}
    if item.module in users and nextitem.module not in users and (pair := item.config.stash.get(DEMO_SERVERS, None)):
        pair.stop()


@pytest.fixture(scope="session", autouse=True)
def vllm_cache(tmp_path_factory):
    """One vLLM cache for every process of the run (each test process's and what they start, as
    the processes of one deployment share DATA_DIR/cache): vLLM inspects a model's class in a
    subprocess of its own, an import of vLLM (some 20 s of CPU), unless its cache has it."""
    root = tmp_path_factory.getbasetemp().parent / "vllm-cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("VLLM_CACHE_ROOT", str(root))
        yield root


@pytest.fixture(scope="session")
def vllm_env(data_dir):
    """vLLM's environment, in place before vllm is first imported in this process."""
    from core.batch_app.engines.vllm_engine import vllm_environment

    with pytest.MonkeyPatch.context() as patch:
        for name, value in vllm_environment(data_dir / "cache").items():
            if name not in os.environ:  # as the product: what is set already (the run's cache) wins
                patch.setenv(name, value)
        yield


@pytest.fixture(scope="session")
def demo_engine(vllm_env, data_dir):
    """The demo model in an in-process vLLM engine, loaded once per test session."""
    from core.batch_app.demo_model import DEMO_MODEL_NAME, build_demo_model
    from core.batch_app.engines.base import EngineSpec
    from core.batch_app.engines.vllm_engine import VllmEngine, default_options, has_cuda_gpu

    model = build_demo_model(data_dir / "models" / DEMO_MODEL_NAME)
    engine = VllmEngine(EngineSpec(kind="vllm", model_path=str(model), served_name=DEMO_MODEL_NAME,
                                   runner="generate", max_model_len=512, options=default_options(has_cuda_gpu())))
    yield engine
    engine.close()


LOG_LINE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}\+00:00 (api_server|watchdog|worker:[\w.-]+)\[\d+\] "
                      r"(DEBUG|INFO|WARNING|ERROR|CRITICAL) \S+: ")


def log_lines(path: Path) -> list[str]:
    """The lines of a log file, each checked to start with an ISO-8601 timestamp and its process."""
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = [line for line in lines if not LOG_LINE.match(line)]
    assert not bad, f"{path}: {len(bad)} lines without timestamp and process, e.g. {bad[:3]}"
    return lines


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config, log):
    """The vLLM modules in one process, the rest in the others (tests/module_lanes.py)."""
    if config.getvalue("dist") == "loadfile":
        from .module_lanes import VllmLaneScheduling

        return VllmLaneScheduling(config, log)
    return None


def pytest_collection_modifyitems(config, items):
    """The modules longest first (a process takes the next module of its lane as it finishes one),
    or with TEST_MODULE_ORDER=reverse in reverse file order (each module's tests in their own
    order), to show that no module depends on what ran before it."""
    from .module_lanes import longest_first

    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    reverse = os.environ.get("TEST_MODULE_ORDER") == "reverse"
    order = list(reversed(modules)) if reverse else longest_first(list(modules))
    items[:] = [item for module in order for item in modules[module]]
