"""The worker loop: keep the engine's in-flight window full from the queue, hand results on.

One thread drives the engine (claim -> add -> step); the heartbeat and the result writer run
beside it, so neither a slow database write nor a long step ever silences the other. While the
engine has work, its queue queries (claims, the ownership check) run on a thread of their own too:
the engine steps on while PostgreSQL answers, and takes the answer at its next turn.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from sqlalchemy.engine import Engine as DBEngine

from . import housekeeping, queue
from .config import Settings
from .engines.base import Engine, EngineProgress, EngineRequest, EngineResult
from .heartbeat import Heartbeat
from .processes import stop_on_signals
from .queue import ClaimedRequest, Completion
from .result_writer import ResultWriter
from .work_signal import WorkSignal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOptions:
    idle_poll: float = 1.0  # seconds between claims while the queue is empty, unless woken (work_signal)
    ownership_check: float = 0.5  # seconds between checks for cancelled/expired in-flight work
    housekeeping_interval: float = 5.0
    throughput_log_interval: float = 10.0
    shutdown_grace: float = 30.0


class Runner:
    def __init__(self, db: DBEngine, settings: Settings, worker_id: str, model: str,
                 options: RunnerOptions = RunnerOptions()):
        self.db = db
        self.settings = settings
        self.worker_id = worker_id
        self.model = model
        self.options = options
        self.engine: Engine | None = None
        self.status = "loading"
        self.in_flight: dict[str, ClaimedRequest] = {}
        self.stopping = threading.Event()
        self.heartbeat = Heartbeat(db, worker_id, settings.heartbeat_interval, self._sample)
        self.writer = ResultWriter(db, worker_id)
        self.work_signal = WorkSignal(db)
        # One thread, so a claim and an ownership check never overlap; at most one of each waits.
        self._queries = ThreadPoolExecutor(max_workers=1, thread_name_prefix="queue-queries")
        self._claiming: Future[list[ClaimedRequest]] | None = None
        self._checking: Future[list[int]] | None = None
        self._checked: list[ClaimedRequest] = []  # the in-flight requests that check is about

    def _sample(self) -> tuple[str, int, EngineProgress]:
        progress = self.engine.progress if self.engine is not None else EngineProgress()
        return self.status, len(self.in_flight), progress

    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stopping, log, "no new claims; finishing in-flight requests")

    def start(self) -> None:
        self.heartbeat.start()

    def run(self, engine: Engine) -> None:
        """Serve until asked to stop, then drain within the grace period and release the rest."""
        self.engine = engine
        self.writer.start()
        self._set_status("idle")
        last_ownership = last_housekeeping = last_log = time.monotonic()
        logged_requests, logged_tokens = 0, 0
        idle_until = 0.0
        while not self.stopping.is_set():
            now = time.monotonic()
            if self._claiming is not None and self._claiming.done():
                claimed, self._claiming = self._claiming.result(), None
                if not self._start(claimed):
                    idle_until = now + self.options.idle_poll
            if self._checking is not None and self._checking.done():
                taken, self._checking = self._checking.result(), None
                self._drop(taken)
            if now < idle_until and self.work_signal.pending():
                idle_until = now  # requests were queued meanwhile
            free = engine.max_in_flight - engine.in_flight()
            if (now >= idle_until and self._claiming is None and not self._running_a_suspect()
                    and (free >= max(1, engine.max_in_flight // 4) or not self.in_flight)):
                if self.in_flight:  # the engine has work to step through meanwhile
                    self._claiming = self._queries.submit(self._claim, free, False)
                elif not self._start(self._claim(free, True)):
                    idle_until = now + self.options.idle_poll
            if self.in_flight:
                self._set_status("busy")
                self._collect(engine.step())
            else:
                self._set_status("idle")
                # Short slices keep SIGTERM and the periodic checks below prompt.
                if self._claiming is not None:  # claimed while busy; the engine ran dry meanwhile
                    wait([self._claiming], timeout=0.25)
                elif self.work_signal.wait(min(0.25, max(0.0, idle_until - time.monotonic()))):
                    idle_until = 0.0
            if now - last_ownership >= self.options.ownership_check:
                self._check_ownership()
                last_ownership = now
            if now - last_housekeeping >= self.options.housekeeping_interval:
                self._housekeeping()
                last_housekeeping = now
            if now - last_log >= self.options.throughput_log_interval:
                done, tokens = engine.progress.requests_finished, engine.progress.tokens_generated
                if done != logged_requests:
                    log.info("throughput: %.1f requests/s, %.0f tokens/s, %d in flight",
                             (done - logged_requests) / (now - last_log),
                             (tokens - logged_tokens) / (now - last_log), len(self.in_flight))
                logged_requests, logged_tokens, last_log = done, tokens, now
        self._drain()

    def _running_a_suspect(self) -> bool:
        """A request retried after a crash runs alone (see queue.claim)."""
        return len(self.in_flight) == 1 and next(iter(self.in_flight.values())).attempt > 1

    def _claim(self, free: int, engine_idle: bool) -> list[ClaimedRequest]:
        with self.db.begin() as conn:
            return queue.claim(conn, self.worker_id, self.model, free, engine_idle=engine_idle)

    def _start(self, claimed: list[ClaimedRequest]) -> bool:
        """Put claimed requests into the engine; False when the queue had none."""
        if not claimed:
            return False
        log.info("claimed %d requests (batches %s)", len(claimed), ", ".join(sorted({c.batch_id for c in claimed})))
        for request in claimed:
            key = str(request.id)
            self.in_flight[key] = request
            rejected = self.engine.add(EngineRequest(key=key, endpoint=request.endpoint, body=request.body))
            if rejected is not None:
                self._collect([rejected])
        return True

    def _collect(self, results: list[EngineResult]) -> None:
        for result in results:
            request = self.in_flight.pop(result.key, None)
            if request is None:  # aborted meanwhile
                continue
            if result.status_code != 200:
                error = result.body.get("error", {})
                log.warning("request %s (custom_id %s) failed with %d: %s: %s", request.id, request.custom_id,
                            result.status_code, error.get("type") or "error", error.get("message") or "(no message)")
            self.writer.put(Completion(id=request.id, attempt=request.attempt, status_code=result.status_code,
                                       response=result.body, prompt_tokens=result.prompt_tokens,
                                       completion_tokens=result.completion_tokens))
            if request.attempt > 1:
                # A crash survivor's result must be stored before the next suspect runs, or a
                # crash in that one would charge this one too.
                self.writer.flush()
        if results and not self.in_flight:
            # Nothing more is coming soon: store the end of a batch now, not after max_delay.
            self.writer.write_now()

    def _check_ownership(self) -> None:
        """Ask, beside the engine, which in-flight requests were cancelled, expired or handed on."""
        if self._checking is None and self.in_flight:
            self._checked = list(self.in_flight.values())
            self._checking = self._queries.submit(self._no_longer_owned, [r.id for r in self._checked])

    def _no_longer_owned(self, request_ids: list[int]) -> list[int]:
        with self.db.connect() as conn:
            return queue.no_longer_owned(conn, self.worker_id, request_ids)

    def _drop(self, taken_ids: list[int]) -> None:
        """Abort the checked requests that were taken and are still in flight."""
        taken = set(taken_ids)
        # Those finished since the check are gone already; same object: not claimed anew since.
        keys = [str(r.id) for r in self._checked if r.id in taken and self.in_flight.get(str(r.id)) is r]
        if keys:
            self.engine.abort(keys)
            for key in keys:
                del self.in_flight[key]
            log.info("aborted %d in-flight requests that are no longer this worker's", len(keys))

    def _housekeeping(self) -> None:
        try:
            housekeeping.run_once(self.db, self.settings)
        except Exception as exc:  # repairs are retried next round; serving goes on
            log.error("housekeeping failed: %s: %s", type(exc).__name__, exc)

    def _drain(self) -> None:
        self._set_status("draining")
        deadline = time.monotonic() + self.options.shutdown_grace
        self._queries.shutdown(wait=True)
        if self._claiming is not None:  # claimed just before the stop: run or release with the rest
            claimed, self._claiming = self._claiming.result(), None
            self._start(claimed)
        while self.in_flight and time.monotonic() < deadline:
            self._collect(self.engine.step())
        if self.in_flight:
            keys = list(self.in_flight)
            self.engine.abort(keys)
            with self.db.begin() as conn:
                released = queue.release(conn, self.worker_id, [self.in_flight[k].id for k in keys])
            log.warning("grace period over: released %d unfinished requests back to the queue", released)
            self.in_flight.clear()
        self.writer.close()
        self.work_signal.close()
        self.status = "stopped"
        self.heartbeat.stop()
        self.heartbeat.beat()
        log.info("stopped cleanly")

    def _set_status(self, status: str) -> None:
        # Busy/idle flips wait for the next beat; leaving `loading` is reported at once.
        if status != self.status:
            announce = self.status == "loading"
            self.status = status
            if announce:
                self.heartbeat.beat_now()
