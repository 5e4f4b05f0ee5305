"""The watchdog's supervision loop: start workers and vLLM servers, detect dead, zombie, hung and
stalled ones, kill them with their whole process group, hand their requests back, restart with
backoff.

Each failure signal runs on its own clock:
- process state (psutil) every check interval: gone, exited or zombie;
- heartbeat age > HEARTBEAT_TIMEOUT: hung (also catches a stopped process);
- progress age > STALL_TIMEOUT while requests are held: engine hung behind a live heartbeat;
- STARTUP_TIMEOUT while the worker registers and loads its model (a slow load is not a hang).

A server slot is judged by the same clocks, on the row its probe writes (server_probe.py): no
passed health check for HEARTBEAT_TIMEOUT, requests held with none answered for STALL_TIMEOUT, or
no passed check within STARTUP_TIMEOUT. Its pool worker retries what it held on the other servers.
Servers stop after the workers (which finish what the servers hold), and `batchctl server
restart` stops one gracefully and starts it again, uncharged.

The watchdog beats for its host (host_beat.py): a worker silent while its host beats is this
watchdog's to judge (hung: charged to the requests it held), while one silent together with its
host was lost with it (registry.mark_silent_workers_dead: charged nothing).

While the database is unreachable only the process state is judged: nobody can write a
heartbeat then, so heartbeats, progress and start-up are judged again only once the watchdog
has reached the database for a whole HEARTBEAT_TIMEOUT. A worker that died meanwhile is killed
at once and started again only when its death and restart are recorded, so an outage neither
charges a restart nor lets the cap be passed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from .. import alerts
from ..config import Settings, WorkerSlot
from ..database import Database
from ..domain import housekeeping, registry
from ..domain.housekeeping import Housekeeper
from ..domain.queue import CHARGED_DEATHS
from ..domain.statuses import DeathCause, SlotCommand, WorkerStatus
from ..logs import slot_log_path, tail_lines
from ..outage import is_unreachable, outage
from ..shutdown import stop_on_signals
from .host_beat import HostBeat
from .process_control import death_cause, describe_exit, is_worker_group, kill_group, oom_kills
from .retention import Retention
from .server_probe import HEALTH_TIMEOUT, ServerProbe
from .webhook_sender import WebhookSender

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Failure:
    """A death as the watchdog saw it: in words (for the log, the alert and the restart's row), as
    a cause (which decides whether the requests it held are charged a crash), and its exit code
    when it exited. Its bookkeeping may wait for the database (`SlotState.unsettled`)."""

    reason: str
    cause: DeathCause
    exit_code: int | None = None

    @property
    def uncounted(self) -> str | None:
        """Why its restart does not count against the hourly cap (it is no crash), or None when it does."""
        return {DeathCause.DRAINED: "stopped cleanly", DeathCause.FENCED: "was declared dead elsewhere and stopped",
                DeathCause.RESTARTED: self.reason}.get(self.cause)


@dataclass
class SlotState:
    config: WorkerSlot
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    worker_id: str = ""  # chosen at each start and passed to the worker
    consecutive_failures: int = 0
    next_start: float = 0.0
    at_cap: bool = False
    # A failure whose bookkeeping (declared dead, restart counted) waits for the database.
    unsettled: Failure | None = None
    oom_kills_at_start: int | None = None
    # The process group of the last worker, until nothing of it is left.
    old_group: int | None = None
    log_path: Path = field(default_factory=Path)
    probe: ServerProbe | None = None  # a server slot's stand-in heartbeat
    restart_asked_at: float | None = None  # an operator asked for a graceful restart (SIGTERM sent)

    @property
    def kind(self) -> str:
        return "server" if self.config.is_server else "worker"


class Supervisor:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings
        self.host = settings.host_name
        self.slots = [SlotState(config=slot, log_path=slot_log_path(settings, slot))
                      for slot in settings.worker_slots()]
        self.stopping = threading.Event()
        self.housekeeper = Housekeeper(db, settings)
        self.webhook_sender = WebhookSender(db, settings)
        self.host_beat = HostBeat(db, settings)
        self.retention = Retention(db, settings)

    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stopping, log, "stopping workers gracefully")

    def run(self) -> None:
        try:
            outage.retry(self.prepare, "reading the workers a previous watchdog left", self.stopping)
        except Exception:
            if not self.stopping.is_set():
                raise
            return  # asked to stop while waiting for the database: nothing was started
        self.host_beat.start()
        self.housekeeper.start()
        self.webhook_sender.start()
        self.retention.start()
        while not self.stopping.is_set():
            self.check_once(time.monotonic())
            self.stopping.wait(self.settings.watchdog_check_interval)
        self.retention.stop()
        self.webhook_sender.stop()
        self.housekeeper.stop()
        self.stop_all()
        self.host_beat.stop()

    # --- start-up ---

    def prepare(self) -> None:
        """Kill workers a previous watchdog on this host left behind (never two workers per slot),
        and leave stopped every slot already at its restart cap."""
        with self.db.connect() as conn:
            leftovers = registry.leftover_workers(conn, self.host, [slot.config.slot for slot in self.slots])
        for row in leftovers:
            if is_worker_group(row.pid):
                log.warning("killing worker %s (slot %s, pid %d) left by a previous watchdog", row.id, row.slot, row.pid)
                kill_group(row.pid, self.settings.kill_grace)
            self._declare_dead(str(row.id), Failure("left by a previous watchdog", DeathCause.ABANDONED))
        for slot in self.slots:
            slot.at_cap = self._at_cap(slot)
            if slot.at_cap:
                log.warning("worker %s reached %d restarts in the last hour and stays stopped; clear it with "
                            "`batchctl worker reset %s`", slot.config.slot, self.settings.max_restarts_per_hour,
                            slot.config.slot)

    # --- one round of checks ---

    def check_once(self, now: float) -> None:
        running = [slot for slot in self.slots if slot.process is not None]
        states = self._worker_states(running)
        if states is not None:
            self._take_commands(now)
        for slot in running:
            if failure := self._failure(slot, states, now):
                self._recover(slot, failure)
            elif now - slot.started_at > self.settings.restart_stable_period:
                slot.consecutive_failures = 0
        for slot in self.slots:
            if slot.unsettled is not None:
                self._settle(slot)
            if slot.process is None and slot.unsettled is None and not self.stopping.is_set():
                self._maybe_start(slot, now)

    def _worker_states(self, running: list[SlotState]) -> dict[str, object] | None:
        """The registry rows of the running workers, or None while the database is unreachable."""
        started = time.monotonic()
        try:
            with self.db.connect() as conn:
                states = registry.worker_states(conn, [slot.worker_id for slot in running])
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, "checking workers")
            return None
        outage.reached()
        # A call held that long (a cut link mended while its packets waited) is an outage: the
        # workers' beats were held too, and each gets HEARTBEAT_TIMEOUT to beat again (a worker
        # declared dead meanwhile then stops itself, uncharged) before it is judged.
        if (took := time.monotonic() - started) > self.settings.heartbeat_timeout / 2:
            outage.stalled(took, "checking workers")
        return states

    def _failure(self, slot: SlotState, states: dict | None, now: float) -> Failure | None:
        process = slot.process
        code = process.poll()  # reaps our own child, so it never lingers as a zombie
        if code is None and _process_status(process.pid) == psutil.STATUS_ZOMBIE:
            try:  # it died just after the poll: reaping it now gives its exit status
                code = process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                return Failure("zombie process", DeathCause.EXITED)
        if slot.restart_asked_at is not None:
            if code is not None:
                return Failure(f"restarted at an operator's request (process {describe_exit(code)})",
                               DeathCause.RESTARTED, code)
            if now - slot.restart_asked_at > self.settings.shutdown_grace + self.settings.kill_grace:
                return Failure(f"did not stop within {self.settings.shutdown_grace:.0f} s of an operator's restart",
                               DeathCause.RESTARTED)
        if code is not None:
            return Failure(f"process {describe_exit(code)}", death_cause(code, slot.oom_kills_at_start), code)
        age = now - slot.started_at
        server = slot.config.is_server
        if server:  # its health check is the watchdog's own, whatever the database does
            if slot.probe.passed_at is None:
                if age > self.settings.startup_timeout:
                    return Failure(f"did not pass a health check within the start-up timeout of "
                                   f"{self.settings.startup_timeout:.0f} s ({slot.probe.last_check})",
                                   DeathCause.FAILED_TO_START)
                return None  # loading its model
            if (failing := slot.probe.failing_for(now)) > self.settings.heartbeat_timeout:
                return Failure(f"health check failing for {failing:.0f} s ({slot.probe.last_check})", DeathCause.HUNG)
        if states is None or not outage.quiet_for(self.settings.heartbeat_timeout):
            return None  # what the database says of this worker means nothing yet
        state = states.get(slot.worker_id)
        if state is None or state.status == WorkerStatus.LOADING:
            if age > self.settings.startup_timeout:
                stage = "register" if state is None else "load its model"
                return Failure(f"did not {stage} within the start-up timeout of {self.settings.startup_timeout:.0f} s",
                               DeathCause.FAILED_TO_START)
            if state is None:
                return None
        # This host is alive (its watchdog reaches the database): a silent worker here is hung.
        if state.heartbeat_age > self.settings.heartbeat_timeout:
            return Failure(f"hung: no heartbeat for {state.heartbeat_age:.0f} s "
                           f"(process state: {_process_status(process.pid)})", DeathCause.HUNG)
        if (state.status == WorkerStatus.BUSY and state.in_flight > 0
                and state.progress_age > self.settings.stall_timeout):
            if server:
                return Failure(f"no request completed for {state.progress_age:.0f} s while holding {state.in_flight}",
                               DeathCause.STALLED)
            return Failure(f"engine stalled: no progress for {state.progress_age:.0f} s with "
                           f"{state.in_flight} requests in flight", DeathCause.STALLED)
        return None

    def _take_commands(self, now: float) -> None:
        """Operators' commands for this host (`batchctl server restart`): a graceful restart is a
        SIGTERM, on which vLLM stops taking requests and finishes those it holds; the pool
        worker sends new ones to the other servers meanwhile."""
        try:
            with self.db.begin() as conn:
                commands = registry.take_commands(conn, self.host, [slot.config.slot for slot in self.slots])
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, "reading operators' commands")
            return
        by_name = {slot.config.slot: slot for slot in self.slots}
        for row in commands:
            slot = by_name[row.slot]
            if row.command != SlotCommand.RESTART or not slot.config.is_server:
                log.warning("ignoring the command %r for %s: not a server slot", row.command, row.slot)
            elif slot.process is None or slot.restart_asked_at is not None:
                log.info("server %s: restart asked, but it is not running now (it starts when due)", row.slot)
            else:
                log.warning("server %s (pid %d): restart asked by an operator; stopping it gracefully",
                            row.slot, slot.process.pid)
                slot.process.send_signal(signal.SIGTERM)
                slot.restart_asked_at = now

    # --- recovery ---

    def _recover(self, slot: SlotState, failure: Failure) -> None:
        """Kill the worker's whole group at once; its bookkeeping follows in `_settle`."""
        name, pid = slot.config.slot, slot.process.pid
        if slot.probe is not None:
            slot.probe.stop()
        # A server holds no request of the queue: its pool worker retries what it sent there.
        spared = "" if slot.config.is_server or failure.cause in CHARGED_DEATHS else \
            f" ({failure.cause}: its requests run again without being charged a crash)"
        log.warning("%s %s (pid %d): %s%s; killing its process group", slot.kind, name, pid, failure.reason, spared)
        try:  # fenced first: from now on nothing it still does counts, and its requests go back
            self._declare_dead(slot.worker_id, failure)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, f"declaring worker {name} dead")
        survivors = kill_group(pid, self.settings.kill_grace)
        if survivors:  # a process stuck in the kernel (a driver call): the slot waits until it is gone
            log.error("processes %s of worker %s survived SIGKILL", survivors, name)
        _reap(slot.process)
        slot.process, slot.old_group, slot.probe, slot.restart_asked_at = None, pid, None, None
        slot.unsettled = failure
        self._settle(slot)

    def _settle(self, slot: SlotState) -> None:
        """Record a failure (worker dead, requests back, restart counted), then alert and schedule
        the restart; while the database is unreachable the slot waits, stopped."""
        failure = slot.unsettled
        name, charged = slot.config.slot, failure.uncounted is None
        try:
            self._declare_dead(slot.worker_id, failure)
            with self.db.begin() as conn:
                slot.at_cap = registry.restarts_in_last_hour(conn, self.host, name) >= \
                    self.settings.max_restarts_per_hour
                if charged and not slot.at_cap:
                    registry.record_restart(conn, host=self.host, slot=name, worker_id=slot.worker_id,
                                            reason=failure.reason, exit_code=failure.exit_code)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, f"recording the failure of worker {name}")
            return
        outage.reached()
        slot.unsettled = None
        if not charged:
            slot.at_cap = False  # a clean stop or a fence is no crash, whatever the count says
            slot.next_start = time.monotonic() + self.settings.restart_backoff_min
            log.info("%s %s %s; starting it again (not counted as a restart)", slot.kind, name, failure.uncounted)
            return
        slot.consecutive_failures += 1
        tags = {"worker_id": slot.worker_id, "slot": name, "host": self.host, "kind": slot.kind,
                "model": slot.config.serve.name if slot.config.is_server else
                slot.config.served_name or slot.config.model or "demo"}
        extra = {"reason": failure.reason, "exit_code": failure.exit_code, "last_log_lines": tail_lines(slot.log_path)}
        if slot.at_cap:
            alerts.alert("error", f"{slot.kind.capitalize()} {name} reached {self.settings.max_restarts_per_hour} restarts in an "
                                  f"hour and is left stopped (last failure: {failure.reason}). Clear it with "
                                  f"`batchctl worker reset {name}`.", tags=tags, extra=extra)
            return
        delay = min(self.settings.restart_backoff_min * 2 ** (slot.consecutive_failures - 1),
                    self.settings.restart_backoff_max)
        slot.next_start = time.monotonic() + delay
        alerts.alert("warning", f"{slot.kind.capitalize()} {name} crashed and is being restarted in {delay:.0f} s: "
                                f"{failure.reason}", tags=tags, extra=extra)

    def _declare_dead(self, worker_id: str, failure: Failure) -> None:
        """Mark the worker dead with its cause and hand its running requests back at once (no
        time-out wait); the first cause recorded for a worker stands."""
        with self.db.begin() as conn:
            registry.mark_worker_dead(conn, worker_id, failure.cause, failure.reason, self.host)
        housekeeping.rescue(self.db, self.settings)  # batches it completes are finalized by housekeeping

    def _at_cap(self, slot: SlotState) -> bool:
        with self.db.connect() as conn:
            return registry.restarts_in_last_hour(conn, self.host, slot.config.slot) >= \
                self.settings.max_restarts_per_hour

    # --- starting and stopping ---

    def _maybe_start(self, slot: SlotState, now: float) -> None:
        if slot.at_cap:
            try:  # an operator may have reset it meanwhile
                slot.at_cap = self._at_cap(slot)
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                outage.failed(exc, "reading restart counts")
            if slot.at_cap:
                return
            log.info("worker %s was reset; starting it again", slot.config.slot)
            slot.consecutive_failures = 0
        if now < slot.next_start:
            return
        if slot.old_group is not None:
            if survivors := kill_group(slot.old_group, self.settings.kill_grace):
                log.error("worker %s is not started again: processes %s of its previous group are still alive",
                          slot.config.slot, survivors)
                return
            slot.old_group = None
        self._start(slot)

    def _start(self, slot: SlotState) -> None:
        config = slot.config
        # The id is ours to choose, so the worker's row is known before it registers; the worker
        # (or server) reads the rest of its slot from the same settings.
        slot.worker_id = str(uuid.uuid4())
        if config.is_server:
            command = [sys.executable, "-m", "core.batch_app.vllm_server", "--slot", config.slot]
            environment = {**os.environ, "CUDA_VISIBLE_DEVICES": config.serve.gpus} if config.serve.gpus else None
        else:
            command = [sys.executable, "-m", "core.batch_app.worker", "--slot", config.slot,
                       "--worker-id", slot.worker_id]
            environment = None
        slot.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(slot.log_path, "ab") as log_file:
            # A session, and so a process group, of its own: a terminal's Ctrl-C reaches the
            # watchdog, which drains workers; and the group is what a kill takes down.
            slot.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True, env=environment)
        slot.started_at = time.monotonic()
        slot.oom_kills_at_start = oom_kills()
        if config.is_server:
            slot.probe = ServerProbe(self.db, self.settings, config, slot.worker_id, slot.process.pid,
                                     self.host).start()
        log.info("started %s %s (pid %d): %s", slot.kind, config.slot, slot.process.pid, " ".join(command[2:]))

    def stop_all(self) -> None:
        """Workers first, which finish what they sent to the servers, then the servers."""
        self._stop([slot for slot in self.slots if slot.process is not None and not slot.config.is_server])
        self._stop([slot for slot in self.slots if slot.process is not None and slot.config.is_server])

    def _stop(self, running: list[SlotState]) -> None:
        for slot in running:
            slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + 10
        for slot in running:
            try:
                slot.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %s did not drain in time; killing it", slot.kind, slot.config.slot)
            if survivors := kill_group(slot.process.pid, self.settings.kill_grace):  # EngineCore included
                log.error("processes %s of %s %s survived SIGKILL", survivors, slot.kind, slot.config.slot)
            _reap(slot.process)
            ended = "still alive" if slot.process.returncode is None else describe_exit(slot.process.returncode)
            log.info("%s %s stopped (%s)", slot.kind, slot.config.slot, ended)
            if slot.probe is not None:
                # A beat of the probe written after the stop would show the server idle again.
                slot.probe.stop(wait=HEALTH_TIMEOUT + self.settings.heartbeat_interval)
                self._record_stopped(slot)
            slot.process, slot.probe = None, None

    def _record_stopped(self, slot: SlotState) -> None:
        """A server's row says it stopped (a worker says so itself as it drains)."""
        try:
            with self.db.begin() as conn:
                registry.mark_stopped(conn, slot.worker_id)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, f"recording that server {slot.config.slot} stopped")


def _reap(process: subprocess.Popen) -> None:
    """Collect a killed worker's exit status, without waiting for good on one that survived."""
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def _process_status(pid: int) -> str:
    try:
        return psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "gone"
