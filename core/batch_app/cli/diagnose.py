"""`batchctl diagnose`: one plain-text report of the whole stack, to paste into a ticket.

Every section reports its own failure as a line and the report goes on: a diagnosis is most
needed when parts of the system are down.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from datetime import datetime, timezone

import httpx
import psutil
from sqlalchemy import text

from .. import __version__
from ..config import Settings
from ..database import Database, alembic_config
from ..domain import overview, webhooks
from ..domain.overview import describe_age
from ..domain.statuses import LIVE_WORKER_STATUSES, SlotKind, WorkerStatus
from ..logs import log_path, tail_lines, worker_log_path
from ..slurm import commands as slurm_commands
from .errors import describe
from .operator_commands import connect

OUR_PROCESSES = ("core.batch_app", "postgres")


def report(settings: Settings, api_url: str) -> str:
    problems: list[str] = []
    lines = [f"vLLM Batch Server {__version__} diagnose, {datetime.now(timezone.utc).isoformat(timespec='seconds')}"
             f" on {settings.host_name}",
             f"API {api_url}, DATA_DIR {settings.data_dir.resolve()}, LOG_DIR {settings.log_dir.resolve()}"]
    # One read of workers, restarts and backends serves every section below; None when there is
    # no database.
    snapshot: tuple[list, list, list] | None = None

    def database_section() -> Iterator[str]:
        nonlocal snapshot
        db = connect(settings)
        yield from _database(db, problems)
        with db.connect() as conn:
            snapshot = (overview.workers(conn), overview.restart_history(conn, 20), overview.backends(conn),
                        webhooks.failing_deliveries(conn))

    sections: list[tuple[str, Callable[[], Iterator[str]]]] = [
        ("Ports", lambda: _ports(settings, problems)),
        ("API", lambda: _api(api_url, problems)),
        ("Database", database_section),
        ("Watchdog", lambda: _watchdog(problems)),
        ("Workers", lambda: _workers(snapshot, settings, problems)),
        ("Backends of pool workers", lambda: _backends(snapshot, problems)),
        ("Webhook deliveries failing", lambda: _webhooks(snapshot, problems)),
        ("Restarts (latest 20)", lambda: _restarts(snapshot)),
        ("Worker logs (last 10 lines each)", lambda: _worker_logs(snapshot, settings)),
        ("GPU", _gpus),
        ("SLURM jobs of this user", _slurm_jobs),
        ("Disk", lambda: _disk(settings, problems)),
    ]
    for title, section in sections:
        lines.append(f"\n== {title}")
        try:
            lines.extend(f"  {line}" for line in section())
        except Exception as exc:  # report and go on to the next section
            message = describe(exc, api_url)
            lines.append(f"  could not check: {message}")
            problems.append(f"{title.split(' (')[0].lower()}: {message}")
    lines.append("\n== Problems")
    lines.extend(f"  - {problem}" for problem in problems) if problems else lines.append("  none found")
    return "\n".join(lines)


def _owner(pid: int | None) -> str:
    if pid is None:
        return "owner unknown (run as root to see it)"
    try:
        process = psutil.Process(pid)
        # `python -m core.batch_app.worker --slot chat-0` reads better than the interpreter's path.
        return f"pid {pid} {process.name()} {' '.join(process.cmdline()[1:5])}".rstrip()
    except psutil.Error:
        return f"pid {pid} (gone)"


def _ports(settings: Settings, problems: list[str]) -> Iterator[str]:
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    api = [c for c in listening if c.laddr.port == settings.api_port]
    if api:
        yield f"API_PORT {settings.api_port}: listening on {api[0].laddr.ip}, {_owner(api[0].pid)}"
    else:
        yield f"API_PORT {settings.api_port}: nothing listens"
        problems.append(f"nothing listens on API_PORT {settings.api_port}")
    # vLLM workers hold several internal sockets each: one line per process, not per port.
    ports_of: dict[int | None, set[int]] = {}
    for conn in listening:
        if conn.laddr.port != settings.api_port:
            ports_of.setdefault(conn.pid, set()).add(conn.laddr.port)
    owners = sorted((_owner(pid), ports) for pid, ports in ports_of.items())
    for owner, ports in owners:
        if any(mark in owner for mark in OUR_PROCESSES):
            yield f"{owner}: listening on {', '.join(map(str, sorted(ports)))}"


def _api(api_url: str, problems: list[str]) -> Iterator[str]:
    url = api_url.rstrip("/").removesuffix("/v1") + "/health"
    try:
        response = httpx.get(url, timeout=5)
        yield f"{url}: {response.status_code} {response.text.strip()[:200]} ({response.elapsed.total_seconds() * 1000:.0f} ms)"
        if response.status_code != 200:
            problems.append(f"API health answered {response.status_code}")
    except httpx.HTTPError as exc:
        yield f"{url}: unreachable ({type(exc).__name__}: {exc})"
        problems.append(f"API unreachable at {url}")


def _database(db: Database, problems: list[str]) -> Iterator[str]:
    from alembic.script import ScriptDirectory

    with db.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
        current = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    head = ScriptDirectory.from_config(alembic_config(db.url.render_as_string(hide_password=False))).get_current_head()
    yield f"{db.url.render_as_string(hide_password=True)}: reachable, PostgreSQL {version}"
    yield f"migration: database at {current}, code at head {head}" + ("" if current == head else "  <-- behind")
    if current != head:
        problems.append(f"database migration {current} is not the code's head {head}")


def _watchdog(problems: list[str]) -> Iterator[str]:
    found = []
    for process in psutil.process_iter(["pid", "cmdline", "create_time"]):
        if "core.batch_app.watchdog" in " ".join(process.info["cmdline"] or []):
            found.append(process)
    for process in found:
        yield f"running: pid {process.info['pid']}, up {describe_age(datetime.now().timestamp() - process.info['create_time'])}"
    if not found:
        yield "no watchdog process on this host: nothing restarts failed workers"
        problems.append("no watchdog runs on this host")


def _process_state(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"
    except psutil.Error as exc:
        return f"unknown ({type(exc).__name__})"


def _workers(snapshot: tuple[list, list, list] | None, settings: Settings, problems: list[str]) -> Iterator[str]:
    if snapshot is None:
        yield "not checked: no database"
        return
    rows = snapshot[0]
    if not rows:
        yield "no worker has registered"
        problems.append("no worker has registered")
    here = settings.host_name
    for row in rows:
        state = _process_state(row.pid) if row.host == here else "on another host, not checked"
        yield (f"{row.slot} ({row.kind}): {row.status}, pid {row.pid} on {row.host}, process {state}, heartbeat "
               f"{describe_age(row.heartbeat_age)} ago, {row.in_flight} in flight, {row.requests_done} done, "
               f"{row.restarts_last_hour} restarts in the last hour, model {row.model}"
               + (f", last health check: {row.probe}" if row.probe else "")
               + (f", SLURM {place}" if (place := overview.scheduler_place(row)) else ""))
        last_restart = (f"; last restart {describe_age(row.last_restart_age)} ago: {row.last_restart_reason}"
                        if row.last_restart_reason else "")
        if row.status in LIVE_WORKER_STATUSES and state == "gone":
            problems.append(f"worker {row.slot} (pid {row.pid}): its process is gone but it is recorded as "
                            f"{row.status}: it was killed or crashed{last_restart}")
        elif state in (psutil.STATUS_ZOMBIE, psutil.STATUS_STOPPED):
            problems.append(f"worker {row.slot} (pid {row.pid}): process is {state}")
        elif row.status in LIVE_WORKER_STATUSES and row.heartbeat_age > settings.heartbeat_timeout:
            problems.append(f"{row.kind} {row.slot} (pid {row.pid}): heartbeat {describe_age(row.heartbeat_age)} old "
                            f"(timeout {settings.heartbeat_timeout:.0f} s): hung or stopped"
                            + (f"; last health check: {row.probe}" if row.probe else ""))
        elif row.status == WorkerStatus.DEAD:
            problems.append(f"worker {row.slot} (pid {row.pid}) is marked dead{last_restart}")
        elif row.restarts_last_hour >= settings.max_restarts_per_hour:
            problems.append(f"worker {row.slot} reached the restart cap{last_restart}; "
                            f"clear it with: batchctl worker reset {row.slot}")
        elif row.restarts_last_hour:
            problems.append(f"worker {row.slot} was restarted {row.restarts_last_hour} times in the last hour"
                            f"{last_restart}")


def _backends(snapshot: tuple[list, list, list] | None, problems: list[str]) -> Iterator[str]:
    if snapshot is None:
        yield "not checked: no database"
        return
    rows = snapshot[2]
    if not rows:
        yield "none (no pool worker runs)"
    for row in rows:
        failed = sum(row.errors.values())
        yield (f"{row.slot}: {row.url} ({row.model}) {row.state}, {row.in_flight} in flight, {row.completed} "
               f"answered, {failed} failed tries" + (f"; last error: {row.last_error}" if row.last_error else ""))
        if row.state != "healthy":
            problems.append(f"backend {row.url} of worker {row.slot} is {row.state}: {row.last_error or 'no detail'}")


def _webhooks(snapshot: tuple | None, problems: list[str]) -> Iterator[str]:
    if snapshot is None:
        yield "not checked: no database"
        return
    if not snapshot[3]:
        yield "none"
    for row in snapshot[3]:
        yield (f"{row.url} (project {row.project}): {row.retrying} retrying, {row.given_up} given up, up to "
               f"{row.attempts} tries; last error: {row.last_error}")
        problems.append(f"webhook deliveries to {row.url} are failing ({row.retrying} retrying, {row.given_up} given "
                        f"up): {row.last_error}; see batchctl webhooks")


def _restarts(snapshot: tuple[list, list, list] | None) -> Iterator[str]:
    if snapshot is None:
        yield "not checked: no database"
        return
    rows = snapshot[1]
    if not rows:
        yield "none"
    for row in rows:
        exit_code = "" if row.exit_code is None else f" (exit code {row.exit_code})"
        yield f"{row.restarted_at.isoformat(timespec='seconds')} {row.slot} on {row.host}: {row.reason}{exit_code}"


def _worker_logs(snapshot: tuple[list, list, list] | None, settings: Settings) -> Iterator[str]:
    slots = {row.slot for row in snapshot[0] if row.kind == SlotKind.WORKER} if snapshot else set()
    slots |= {path.stem.removeprefix("worker-") for path in settings.log_dir.glob("worker-*.log")}
    servers = sorted(settings.log_dir.glob("server-*.log"))
    for path in [log_path(settings, "watchdog")] + [worker_log_path(settings, slot) for slot in sorted(slots)] + servers:
        yield f"--- {path.resolve()}"
        tail = tail_lines(path, 10)
        yield from (tail.splitlines() if tail else ["(no log file, or empty)"])


def _gpus() -> Iterator[str]:
    if shutil.which("nvidia-smi") is None:
        yield "nvidia-smi not found: no NVIDIA driver on this host (workers run on the CPU build of vLLM)"
        return
    result = subprocess.run(["nvidia-smi", "--query-gpu=index,name,utilization.gpu,memory.used,memory.total,"
                             "temperature.gpu", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    output = (result.stdout or result.stderr).strip()
    yield from (output.splitlines() if output else [f"nvidia-smi exited with {result.returncode} and said nothing"])


def _slurm_jobs() -> Iterator[str]:
    if not slurm_commands.installed():
        yield "squeue not found: no SLURM here"
        return
    queued = slurm_commands.jobs()
    if not queued:
        yield "none"
    for job in queued:
        yield f"job {job.job_id} {job.name}: {job.state}, {job.elapsed} of {job.time_limit}, {job.where}"


def _disk(settings: Settings, problems: list[str]) -> Iterator[str]:
    path = settings.data_dir if settings.data_dir.exists() else settings.data_dir.resolve().parent
    usage = shutil.disk_usage(path)
    share = usage.free / usage.total
    yield f"DATA_DIR {settings.data_dir.resolve()}: {usage.free / 2**30:.1f} GiB free of {usage.total / 2**30:.1f} GiB ({share:.0%})"
    if share < 0.05:
        problems.append(f"less than 5% disk free under DATA_DIR ({usage.free / 2**30:.1f} GiB)")
