"""The watchdog's supervision loop: start workers, detect dead, zombie, hung and stalled ones,
kill them with their whole process group, hand their requests back, restart with backoff.

Each failure signal runs on its own clock:
- process state (psutil) every check interval: gone, exited or zombie;
- heartbeat age > HEARTBEAT_TIMEOUT: hung (also catches a stopped process);
- progress age > STALL_TIMEOUT while requests are held: engine hung behind a live heartbeat;
- STARTUP_TIMEOUT while the worker registers and loads its model (a slow load is not a hang).

While the database is unreachable only the process state is judged: nobody can write a
heartbeat then, so heartbeats, progress and start-up are judged again only once the watchdog
has reached the database for a whole HEARTBEAT_TIMEOUT. A worker that died meanwhile is killed
at once and started again only when its death and restart are recorded, so an outage neither
charges a restart nor lets the cap be passed.
"""

from __future__ import annotations

import logging
import signal
import socket
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
from ..domain.statuses import WorkerStatus
from ..logs import tail_lines, worker_log_path
from ..outage import is_unreachable, outage
from ..shutdown import FENCED_EXIT_CODE, stop_on_signals
from .process_control import death_blames_requests, describe_exit, is_worker_group, kill_group, oom_kills

log = logging.getLogger(__name__)

# Exits that are no crash: a drain on request (0) and a worker fenced by its heartbeat.
_UNCHARGED_EXITS = {0: "stopped cleanly", FENCED_EXIT_CODE: "was declared dead elsewhere and stopped"}


@dataclass
class SlotState:
    config: WorkerSlot
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    worker_id: str = ""  # chosen at each start and passed to the worker
    consecutive_failures: int = 0
    next_start: float = 0.0
    at_cap: bool = False
    # A failure whose bookkeeping (declared dead, restart counted) waits for the database:
    # (reason, exit code, whether it blames the requests the worker held).
    unsettled: tuple[str, int | None, bool] | None = None
    oom_kills_at_start: int | None = None
    # The process group of the last worker, until nothing of it is left.
    old_group: int | None = None
    log_path: Path = field(default_factory=Path)


class Supervisor:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings
        self.host = socket.gethostname()
        self.slots = [SlotState(config=slot, log_path=worker_log_path(settings, slot.slot))
                      for slot in settings.worker_slots()]
        self.stopping = threading.Event()
        self.housekeeper = Housekeeper(db, settings)

    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stopping, log, "stopping workers gracefully")

    def run(self) -> None:
        try:
            outage.retry(self.prepare, "reading the workers a previous watchdog left", self.stopping)
        except Exception:
            if not self.stopping.is_set():
                raise
            return  # asked to stop while waiting for the database: nothing was started
        self.housekeeper.start()
        while not self.stopping.is_set():
            self.check_once(time.monotonic())
            self.stopping.wait(self.settings.watchdog_check_interval)
        self.housekeeper.stop()
        self.stop_all()

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
            self._declare_dead(str(row.id), blames_requests=False)  # a watchdog's end is not theirs
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
        for slot in running:
            reason, exit_code = self._failure(slot, states, now)
            if reason:
                self._recover(slot, reason, exit_code)
            elif now - slot.started_at > self.settings.restart_stable_period:
                slot.consecutive_failures = 0
        for slot in self.slots:
            if slot.unsettled is not None:
                self._settle(slot)
            if slot.process is None and slot.unsettled is None and not self.stopping.is_set():
                self._maybe_start(slot, now)

    def _worker_states(self, running: list[SlotState]) -> dict[str, object] | None:
        """The registry rows of the running workers, or None while the database is unreachable."""
        try:
            with self.db.connect() as conn:
                states = registry.worker_states(conn, [slot.worker_id for slot in running])
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, "checking workers")
            return None
        outage.reached()
        return states

    def _failure(self, slot: SlotState, states: dict | None, now: float) -> tuple[str | None, int | None]:
        process = slot.process
        code = process.poll()  # reaps our own child, so it never lingers as a zombie
        if code is None and _process_status(process.pid) == psutil.STATUS_ZOMBIE:
            try:  # it died just after the poll: reaping it now gives its exit status
                code = process.wait(timeout=1)
            except subprocess.TimeoutExpired:
                return "zombie process", None
        if code is not None:
            return f"process {describe_exit(code)}", code
        if states is None or not outage.quiet_for(self.settings.heartbeat_timeout):
            return None, None  # what the database says of this worker means nothing yet
        state = states.get(slot.worker_id)
        age = now - slot.started_at
        if state is None or state.status == WorkerStatus.LOADING:
            if age > self.settings.startup_timeout:
                stage = "register" if state is None else "load its model"
                return f"did not {stage} within the start-up timeout of {self.settings.startup_timeout:.0f} s", None
            if state is None:
                return None, None
        if state.heartbeat_age > self.settings.heartbeat_timeout:
            return (f"hung: no heartbeat for {state.heartbeat_age:.0f} s "
                    f"(process state: {_process_status(process.pid)})"), None
        if (state.status == WorkerStatus.BUSY and state.in_flight > 0
                and state.progress_age > self.settings.stall_timeout):
            return (f"engine stalled: no progress for {state.progress_age:.0f} s with "
                    f"{state.in_flight} requests in flight"), None
        return None, None

    # --- recovery ---

    def _recover(self, slot: SlotState, reason: str, exit_code: int | None) -> None:
        """Kill the worker's whole group at once; its bookkeeping follows in `_settle`."""
        name, pid = slot.config.slot, slot.process.pid
        blames = death_blames_requests(exit_code, slot.oom_kills_at_start)
        log.warning("worker %s (pid %d): %s%s; killing its process group", name, pid, reason,
                    "" if blames else " from outside, with no OOM kill since it started: its requests run again "
                                      "without being charged a crash")
        try:  # fenced first: from now on nothing it still does counts, and its requests go back
            self._declare_dead(slot.worker_id, blames)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, f"declaring worker {name} dead")
        survivors = kill_group(pid, self.settings.kill_grace)
        if survivors:  # a process stuck in the kernel (a driver call): the slot waits until it is gone
            log.error("processes %s of worker %s survived SIGKILL", survivors, name)
        _reap(slot.process)
        slot.process, slot.old_group = None, pid
        slot.unsettled = (reason, exit_code, blames)
        self._settle(slot)

    def _settle(self, slot: SlotState) -> None:
        """Record a failure (worker dead, requests back, restart counted), then alert and schedule
        the restart; while the database is unreachable the slot waits, stopped."""
        reason, exit_code, blames = slot.unsettled
        name = slot.config.slot
        charged = exit_code not in _UNCHARGED_EXITS
        try:
            self._declare_dead(slot.worker_id, blames)
            with self.db.begin() as conn:
                slot.at_cap = registry.restarts_in_last_hour(conn, self.host, name) >= \
                    self.settings.max_restarts_per_hour
                if charged and not slot.at_cap:
                    registry.record_restart(conn, host=self.host, slot=name, worker_id=slot.worker_id,
                                            reason=reason, exit_code=exit_code)
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
            log.info("worker %s %s; starting it again", name, _UNCHARGED_EXITS[exit_code])
            return
        slot.consecutive_failures += 1
        tags = {"worker_id": slot.worker_id, "slot": name, "host": self.host,
                "model": slot.config.served_name or slot.config.model or "demo"}
        extra = {"reason": reason, "exit_code": exit_code, "last_log_lines": tail_lines(slot.log_path)}
        if slot.at_cap:
            alerts.alert("error", f"Worker {name} reached {self.settings.max_restarts_per_hour} restarts in an "
                                  f"hour and is left stopped (last failure: {reason}). Clear it with "
                                  f"`batchctl worker reset {name}`.", tags=tags, extra=extra)
            return
        delay = min(self.settings.restart_backoff_min * 2 ** (slot.consecutive_failures - 1),
                    self.settings.restart_backoff_max)
        slot.next_start = time.monotonic() + delay
        alerts.alert("warning", f"Worker {name} crashed and is being restarted in {delay:.0f} s: {reason}",
                     tags=tags, extra=extra)

    def _declare_dead(self, worker_id: str, blames_requests: bool) -> None:
        """Mark the worker dead and hand its running requests back at once (no time-out wait)."""
        with self.db.begin() as conn:
            registry.mark_worker_dead(conn, worker_id, blames_requests)
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
        # reads the rest of its slot from the same settings.
        slot.worker_id = str(uuid.uuid4())
        command = [sys.executable, "-m", "core.batch_app.worker", "--slot", config.slot,
                   "--worker-id", slot.worker_id]
        slot.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(slot.log_path, "ab") as log_file:
            # A session, and so a process group, of its own: a terminal's Ctrl-C reaches the
            # watchdog, which drains workers; and the group is what a kill takes down.
            slot.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        slot.started_at = time.monotonic()
        slot.oom_kills_at_start = oom_kills()
        log.info("started worker %s (pid %d): %s", config.slot, slot.process.pid, " ".join(command[2:]))

    def stop_all(self) -> None:
        running = [slot for slot in self.slots if slot.process is not None]
        for slot in running:
            slot.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + 10
        for slot in running:
            try:
                slot.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("worker %s did not drain in time; killing it", slot.config.slot)
            if survivors := kill_group(slot.process.pid, self.settings.kill_grace):  # EngineCore included
                log.error("processes %s of worker %s survived SIGKILL", survivors, slot.config.slot)
            _reap(slot.process)
            ended = "still alive" if slot.process.returncode is None else describe_exit(slot.process.returncode)
            log.info("worker %s stopped (%s)", slot.config.slot, ended)
            slot.process = None


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
