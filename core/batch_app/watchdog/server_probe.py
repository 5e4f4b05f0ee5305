"""The heartbeat and health check of a server slot, run by the watchdog that runs the server.

A vLLM server knows nothing of our database, so a thread of the watchdog stands in for its
heartbeat: it registers the server's row at start (`loading`), and every HEARTBEAT_INTERVAL asks
GET /health (with the server's key, server_keys.py) and beats with the load the pool workers
report on the server (requests held, requests answered), `loading` until a check first passes. The supervisor judges the server from
it: no passed check within STARTUP_TIMEOUT (a model load is not a hang), checks failing for
HEARTBEAT_TIMEOUT once it had passed, or a held load with no answer for STALL_TIMEOUT (vLLM's
engine can hang behind an API that still answers /health). A slow answer within the check's
time-out is a pass: a busy server is not a dead one.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ..config import Settings, WorkerSlot
from ..database import Database
from ..domain import registry
from ..domain.statuses import SlotKind, WorkerStatus
from ..outage import is_unreachable, outage
from ..server_keys import server_key

log = logging.getLogger(__name__)

HEALTH_TIMEOUT = 10.0  # seconds one GET /health may take and still pass


class ServerProbe:
    def __init__(self, db: Database, settings: Settings, slot: WorkerSlot, worker_id: str, pid: int, host: str):
        self.db, self.settings, self.slot = db, settings, slot
        self.worker_id, self.pid, self.host = worker_id, pid, host
        self.url = slot.serve.url
        self._stopping = threading.Event()
        self._answered: int | None = None  # requests the server had answered at the last beat
        self.passed_at: float | None = None  # time.monotonic() of the last passed check
        self.failing_since: float | None = None  # of the first failed check since the last pass
        self.last_check = "not checked yet"
        self._thread = threading.Thread(target=self._run, name=f"probe-{slot.slot}", daemon=True)

    def start(self) -> ServerProbe:
        self._thread.start()
        return self

    def stop(self, wait: float = 0.0) -> None:
        """Ends the thread within a beat (a daemon: nobody need wait for it); `wait` seconds at most
        for it to end, so that no beat of it lands after what is written next."""
        self._stopping.set()
        if wait:
            self._thread.join(wait)

    def failing_for(self, now: float) -> float:
        """Seconds its checks have failed since the last pass (0 while they pass)."""
        return 0.0 if self.failing_since is None else now - self.failing_since

    def _run(self) -> None:
        try:
            outage.retry(self._register, f"registering server {self.slot.slot}", self._stopping)
        except Exception as exc:
            if not self._stopping.is_set():
                log.error("server %s: its row could not be registered: %s: %s", self.slot.slot,
                          type(exc).__name__, exc)
            return
        # The check runs beside the beat: a server that takes the whole time-out to answer (or
        # never does) must not slow the beats, whose load readings time the stall clock.
        key = server_key(self.settings.data_dir, self.slot.serve.port)
        with httpx.Client(timeout=HEALTH_TIMEOUT, headers={"Authorization": f"Bearer {key}"}) as client, \
                ThreadPoolExecutor(1) as checker:
            check, check_started = None, 0.0
            while not self._stopping.wait(self.settings.heartbeat_interval):
                if check is None:
                    check, check_started = checker.submit(self._check, client), time.monotonic()
                if check.done():
                    passed, self.last_check = check.result()
                    if passed:
                        self.passed_at, self.failing_since = time.monotonic(), None
                    elif self.failing_since is None:
                        self.failing_since = check_started
                    check = None
                try:
                    if not self._record(self.last_check):
                        return  # declared dead: the watchdog is killing it
                except Exception as exc:
                    if not is_unreachable(exc):
                        log.error("server %s: recording its health check failed: %s: %s", self.slot.slot,
                                  type(exc).__name__, exc)
                        continue
                    outage.failed(exc, f"recording the health of server {self.slot.slot}")
                else:
                    outage.reached()

    def _register(self) -> None:
        with self.db.begin() as conn:
            registry.register_worker(conn, worker_id=self.worker_id, slot=self.slot.slot, host=self.host,
                                     pid=self.pid, model=self.slot.serve.name, gpu_ids=self.slot.serve.gpus,
                                     kind=SlotKind.SERVER)

    def _check(self, client: httpx.Client) -> tuple[bool, str]:
        started = time.monotonic()
        try:
            response = client.get(f"{self.url}/health")
        except httpx.TimeoutException:
            return False, f"GET /health: no answer within {HEALTH_TIMEOUT:.0f} s"
        except httpx.HTTPError as exc:
            return False, f"GET /health: {type(exc).__name__}: {exc or 'no detail'}"
        took = (time.monotonic() - started) * 1000
        if response.status_code != 200:
            return False, f"GET /health: HTTP {response.status_code} after {took:.0f} ms"
        return True, f"healthy ({took:.0f} ms)"

    def _record(self, check: str) -> bool:
        """A beat with the server's load and how the check went; False once the row is declared dead."""
        with self.db.begin() as conn:
            registry.record_probe(conn, self.worker_id, check)
            in_flight, answered = registry.server_load(conn, self.url)
            progressed, self._answered = answered != self._answered, answered
            if self.passed_at is None:
                status = WorkerStatus.LOADING
            else:
                status = WorkerStatus.BUSY if in_flight else WorkerStatus.IDLE
            return registry.heartbeat(conn, worker_id=self.worker_id, status=status, in_flight=in_flight,
                                      requests_done=answered, tokens_done=0, progressed=progressed)
