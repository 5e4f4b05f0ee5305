"""The worker loop: keep the engine's in-flight window full from the queue, hand results on.

One thread drives the engine (claim -> add -> step); the heartbeat, the result writer and
housekeeping run beside it, so neither a slow database write nor a long step ever silences
the other, and no file build runs on the engine's thread.

While the database is unreachable the engine goes on with what it holds, results wait in the
writer, and claims resume when it is back. A claim whose answer was lost with the connection
may have committed: after every outage the worker hands back whatever the database says it
runs that it does not hold (`_reconcile`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from ..config import Settings
from ..database import Database
from ..domain import queue
from ..domain.housekeeping import Housekeeper
from ..domain.queue import ClaimedRequest, Completion
from ..domain.statuses import WorkerStatus
from ..engines.base import RETRY_STATUS, Engine, EngineProgress, EngineRequest, EngineResult
from ..outage import is_unreachable, outage
from ..shutdown import stop_on_signals
from .heartbeat import Heartbeat
from .result_writer import ResultWriter
from .work_signal import WorkSignal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerOptions:
    idle_poll: float = 1.0  # seconds between claims while the queue is empty, unless woken (work_signal)
    ownership_check: float = 0.5  # seconds between looks for cancelled/expired in-flight work
    # Seconds between ownership queries when no notification said work was taken (see work_signal).
    ownership_recheck: float = 30.0
    # Results waiting to be stored (the database is unreachable) past which the worker stops claiming.
    max_unstored: int = 10_000
    throughput_log_interval: float = 10.0
    shutdown_grace: float = 30.0


class Runner:
    def __init__(self, db: Database, settings: Settings, worker_id: str, model: str,
                 options: RunnerOptions = RunnerOptions()):
        self.db = db
        self.settings = settings
        self.worker_id = worker_id
        self.model = model
        self.options = options
        self.engine: Engine | None = None
        self.status = WorkerStatus.LOADING
        self.in_flight: dict[str, ClaimedRequest] = {}
        self._last_ownership_query = 0.0
        self._reconciled_at = time.monotonic()
        self.stopping = threading.Event()
        self.heartbeat = Heartbeat(db, worker_id, settings.heartbeat_interval, self._sample, model)
        self.writer = ResultWriter(db, worker_id, max_response_bytes=settings.backend_max_reply_bytes)
        self.housekeeper = Housekeeper(db, settings)
        self.work_signal = WorkSignal(db, listen=not settings.database_transaction_pooling)

    def _sample(self) -> tuple[WorkerStatus, int, EngineProgress, list]:
        progress = self.engine.progress if self.engine is not None else EngineProgress()
        backends = getattr(self.engine, "backend_states", list)() if self.engine is not None else []
        return self.status, len(self.in_flight), progress, backends

    def install_signal_handlers(self) -> None:
        stop_on_signals(self.stopping, log, "no new claims; finishing in-flight requests")

    def start(self) -> None:
        self.heartbeat.start()

    def run(self, engine: Engine) -> None:
        """Serve until asked to stop, then drain within the grace period and release the rest."""
        self.engine = engine
        self.writer.start()
        self.housekeeper.start()
        self._set_status(self._idle_status())
        last_ownership = last_log = time.monotonic()
        logged_requests, logged_tokens = 0, 0
        idle_until = 0.0
        while not self.stopping.is_set():
            if not self.writer.is_alive():
                raise RuntimeError("the result writer stopped: nothing would store this worker's results")
            now = time.monotonic()
            if outage.ended_at > self._reconciled_at:
                self._reconcile()
            if now < idle_until and self.work_signal.pending():
                idle_until = now  # requests were queued meanwhile
            if now >= idle_until and self._may_claim():
                idle_until = self._claim(now)
            if self.in_flight:
                self._set_status(WorkerStatus.BUSY)
                self._collect(engine.step())
            else:
                self._set_status(self._idle_status())
                # Short slices keep SIGTERM and the periodic checks below prompt.
                if self.work_signal.wait(min(0.25, max(0.0, idle_until - time.monotonic()))):
                    idle_until = 0.0
            if now - last_ownership >= self.options.ownership_check:
                self._drop_taken_requests()
                last_ownership = now
            if now - last_log >= self.options.throughput_log_interval:
                done, tokens = engine.progress.requests_finished, engine.progress.tokens_generated
                if done != logged_requests:
                    log.info("throughput: %.1f requests/s, %.0f tokens/s, %d in flight",
                             (done - logged_requests) / (now - last_log),
                             (tokens - logged_tokens) / (now - last_log), len(self.in_flight))
                logged_requests, logged_tokens, last_log = done, tokens, now
        self._drain()

    def _idle_status(self) -> WorkerStatus:
        """Idle, or waiting for a backend: a pool whose servers are all down has no room at all."""
        return WorkerStatus.IDLE if self.engine.max_in_flight > 0 else WorkerStatus.NO_BACKEND

    def _may_claim(self) -> bool:
        """Claim when a quarter of the window is free (or the engine's own `refill_at`, or nothing
        runs), unless a suspect runs alone or too many results wait to be stored."""
        free = self.engine.max_in_flight - self.engine.in_flight()
        refill_at = getattr(self.engine, "refill_at", max(1, self.engine.max_in_flight // 4))
        return (not self._running_a_suspect() and self.writer.backlog < self.options.max_unstored
                and (free >= refill_at or not self.in_flight))

    def _claim(self, now: float) -> float:
        """Fill the engine's free slots; returns until when to wait before claiming again."""
        try:
            if self._refill(self.engine.max_in_flight - self.engine.in_flight()):
                return now
            return now + self.options.idle_poll
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            return now + outage.failed(exc, "claiming requests")

    def _running_a_suspect(self) -> bool:
        """A crash survivor on its last attempt runs alone (see queue.claim)."""
        return len(self.in_flight) == 1 and next(iter(self.in_flight.values())).is_last_attempt(
            self.settings.max_attempts)

    def _refill(self, free: int) -> bool:
        """Claim up to `free` requests into the engine; False when the queue had none."""
        with self.db.begin() as conn:
            claimed = queue.claim(conn, self.worker_id, self.model, free, engine_idle=not self.in_flight,
                                  max_attempts=self.settings.max_attempts)
        outage.reached()
        if not claimed:
            return False
        log.info("claimed %d requests (batches %s)", len(claimed), ", ".join(sorted({c.batch_id for c in claimed})))
        for request in claimed:
            key = str(request.id)
            self.in_flight[key] = request
            rejected = self.engine.add(EngineRequest(key=key, endpoint=request.endpoint, body=request.body,
                                                     custom_id=request.custom_id))
            if rejected is not None:
                self._collect([rejected])
        return True

    def _collect(self, results: list[EngineResult]) -> None:
        unserved: list[tuple[ClaimedRequest, EngineResult]] = []
        for result in results:
            request = self.in_flight.pop(result.key, None)
            if request is None:  # aborted meanwhile
                continue
            if result.status_code == RETRY_STATUS:
                unserved.append((request, result))
                continue
            if result.status_code != 200:
                error = result.body.get("error", {})
                log.warning("request %s (custom_id %s) failed with %d: %s: %s", request.id, request.custom_id,
                            result.status_code, error.get("type") or "error", error.get("message") or "(no message)")
            self.writer.put(Completion(id=request.id, attempt=request.attempt, status_code=result.status_code,
                                       response=result.body, prompt_tokens=result.prompt_tokens,
                                       completion_tokens=result.completion_tokens))
            if request.is_last_attempt(self.settings.max_attempts):
                # A suspect's result must be stored before the next suspect runs, or a crash in
                # that one would charge this one too.
                self.writer.flush()
        if unserved:
            self._hand_back(unserved)
        if results and not self.in_flight:
            # Nothing more is coming soon: store the end of a batch now, not after max_delay.
            self.writer.write_now()

    def _hand_back(self, unserved: list[tuple[ClaimedRequest, EngineResult]]) -> None:
        """Queue again, uncharged, what the engine's backend could not serve (see engines/base.py)."""
        request, result = unserved[0]
        error = result.body.get("error", {})
        log.warning("handing back %d requests the engine could not serve, e.g. %s (custom_id %s): %s: %s",
                    len(unserved), request.id, request.custom_id, error.get("type") or "error",
                    error.get("message") or "(no message)")
        try:
            with self.db.begin() as conn:
                queue.release(conn, self.worker_id, [request.id for request, _ in unserved])
        except Exception as exc:  # they stay running under this worker: _reconcile hands them back
            if not is_unreachable(exc):
                raise
            outage.failed(exc, "handing back requests")

    def _drop_taken_requests(self) -> None:
        """Abort in-flight requests that were cancelled, expired or handed to another worker.

        The database is asked only when notified of a cancelled or ended batch (or unable to
        listen), and as a safety net every `ownership_recheck`: each query holds up the engine.
        """
        if not self.in_flight:
            return
        now = time.monotonic()
        if not self.work_signal.work_taken() and now - self._last_ownership_query < self.options.ownership_recheck:
            return
        self._last_ownership_query = now
        try:
            with self.db.connect() as conn:
                taken = queue.no_longer_owned(conn, self.worker_id, [r.id for r in self.in_flight.values()])
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, "checking which requests are still this worker's")
            self._last_ownership_query = 0.0  # ask again as soon as it is back
            return
        if taken:
            keys = [str(request_id) for request_id in taken]
            self.engine.abort(keys)
            for key in keys:
                self.in_flight.pop(key, None)
            log.info("aborted %d in-flight requests that are no longer this worker's", len(keys))

    def _reconcile(self) -> None:
        """Hand back what the database says this worker runs but it does not hold (a claim that
        committed although its answer was lost, a hand-back that did not reach the database)."""
        try:
            with self.db.connect() as conn:
                recorded = set(queue.held_by(conn, self.worker_id))
            # Read after the database: a result stored meanwhile is no longer running there.
            strays = recorded - {request.id for request in self.in_flight.values()} - self.writer.unstored_ids()
            if strays:
                with self.db.begin() as conn:
                    released = queue.release(conn, self.worker_id, sorted(strays))
                log.warning("handed back %d requests recorded as this worker's that it does not hold", released)
        except Exception as exc:
            if not is_unreachable(exc):
                raise
            outage.failed(exc, "reconciling the requests this worker holds")
            return
        self._reconciled_at = time.monotonic()

    def _drain(self) -> None:
        self._set_status(WorkerStatus.DRAINING)
        deadline = time.monotonic() + self.options.shutdown_grace
        while self.in_flight and time.monotonic() < deadline:
            self._collect(self.engine.step())
        if self.in_flight:
            keys = list(self.in_flight)
            self.engine.abort(keys)
            try:
                with self.db.begin() as conn:
                    released = queue.release(conn, self.worker_id, [self.in_flight[k].id for k in keys])
                log.warning("grace period over: released %d unfinished requests back to the queue", released)
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                outage.failed(exc, "handing back requests at shutdown")  # rescued once declared dead
            self.in_flight.clear()
        self.housekeeper.stop()
        self.writer.close()
        self.work_signal.close()
        self._record_stopped("stopped cleanly")

    def stop_before_serving(self) -> None:
        """Asked to stop while the model loaded: nothing claimed, nothing to drain."""
        self._record_stopped("stopped before serving")

    def _record_stopped(self, how: str) -> None:
        """The last beat, which says the worker stopped."""
        self.status = WorkerStatus.STOPPED
        self.heartbeat.stop()
        self.heartbeat.beat()
        log.info(how)

    def _set_status(self, status: WorkerStatus) -> None:
        # Busy/idle flips wait for the next beat; leaving `loading` is reported at once.
        if status != self.status:
            announce = self.status == WorkerStatus.LOADING
            self.status = status
            if announce:
                self.heartbeat.beat_now()
