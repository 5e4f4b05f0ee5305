"""The worker loop on a real PostgreSQL, with an engine that holds requests until they are aborted:
what leaves it early can only have been aborted by the loop."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from core.batch_app.config import Settings
from core.batch_app.engines.base import RETRY_STATUS, EngineResult, EngineSpec, error_result
from core.batch_app.worker.runner import Runner, RunnerOptions

from .conftest import wait_for, wait_for_batch
from .engines import EchoEngine
from .jsonl import request_line, submit
from .simulated_worker import new_worker


class HoldingEngine(EchoEngine):
    """Never finishes a request; `abort` of a key it does not hold fails the test's loop."""

    def __init__(self) -> None:
        super().__init__(EngineSpec(kind="holding", model_path="", served_name="holding", max_in_flight=8))

    def step(self) -> list[EngineResult]:
        time.sleep(0.01)
        self.progress.steps += 1
        return []

    def abort(self, keys: list[str]) -> None:
        for key in keys:
            del self._pending[key]


def custom_ids(engine: HoldingEngine) -> set[str]:
    return {request.body["messages"][0]["content"].split()[-1].rstrip(".")
            for request in list(engine._pending.values())}


def statuses(db, batch_id: str) -> set[str]:
    with db.connect() as conn:
        return set(conn.execute(sa.text("SELECT DISTINCT status FROM batch_requests WHERE batch_id = :b"),
                                {"b": batch_id}).scalars())


def test_a_busy_worker_claims_more_aborts_a_cancelled_batch_and_releases_on_stop(client, db, database, data_dir,
                                                                                own_model):
    first = submit(client, [request_line(f"a{i}", own_model) for i in range(3)])
    runner = Runner(db, Settings(data_dir=data_dir, database_url=database, housekeeping_interval=3600),
                    new_worker(db, own_model), own_model,
                    RunnerOptions(idle_poll=0.2, ownership_check=0.1, ownership_recheck=3600, shutdown_grace=0.3))
    engine = HoldingEngine()
    runner.start()
    loop = threading.Thread(target=runner.run, args=(engine,))
    loop.start()
    try:
        wait_for(lambda: custom_ids(engine) == {"a0", "a1", "a2"}, 30, message="first batch claimed")
        # The engine is busy now: it takes more while it steps.
        second = submit(client, [request_line(f"b{i}", own_model) for i in range(2)])
        wait_for(lambda: custom_ids(engine) == {"a0", "a1", "a2", "b0", "b1"}, 30, message="second batch claimed")
        client.batches.cancel(first.id)  # noticed through its notification: no periodic recheck here
        wait_for(lambda: custom_ids(engine) == {"b0", "b1"}, 30, message="cancelled requests aborted")
        assert set(runner.in_flight) == set(engine._pending)
    finally:
        runner.stopping.set()
        loop.join(30)
    assert not loop.is_alive()
    assert statuses(db, second.id) == {"queued"}  # released at the end of the grace period
    client.batches.cancel(second.id)


class UnservedOnceEngine(EchoEngine):
    """Answers each request with RETRY_STATUS the first time it sees it, as an engine whose backend
    refused the connection would, and properly the second time."""

    def __init__(self) -> None:
        super().__init__(EngineSpec(kind="unserved-once", model_path="", served_name="unserved", max_in_flight=8))
        self.seen: list[str] = []

    def step(self) -> list[EngineResult]:
        results = []
        for result in super().step():
            content = self._answered_content(result)
            if content not in self.seen:
                self.seen.append(content)
                result = error_result(result.key, f"ConnectError: no backend for {content}",
                                      status_code=RETRY_STATUS, error_type="server_error")
            results.append(result)
        return results

    @staticmethod
    def _answered_content(result: EngineResult) -> str:
        return result.body["choices"][0]["message"]["content"]


def test_a_request_the_engine_could_not_serve_is_queued_again_uncharged(client, db, database, data_dir,
                                                                         own_model):
    batch = submit(client, [request_line(f"u{i}", own_model) for i in range(5)])
    runner = Runner(db, Settings(data_dir=data_dir, database_url=database, housekeeping_interval=3600),
                    new_worker(db, own_model), own_model, RunnerOptions(idle_poll=0.2, shutdown_grace=0.3))
    engine = UnservedOnceEngine()
    runner.start()
    loop = threading.Thread(target=runner.run, args=(engine,))
    loop.start()
    try:
        ended = wait_for_batch(client, batch.id, timeout=60)
    finally:
        runner.stopping.set()
        loop.join(30)
    assert ended.status == "completed" and ended.request_counts.completed == 5
    assert len(engine.seen) == 5  # each was refused once, then served
    with db.connect() as conn:
        attempts = conn.execute(sa.text("SELECT custom_id, attempt FROM batch_requests WHERE batch_id = :b"),
                                {"b": batch.id}).all()
    assert sorted(attempts) == [(f"u{i}", 1) for i in range(5)]  # the hand-back cost no attempt


def test_a_worker_whose_result_writer_stopped_exits_instead_of_generating_for_nobody(db, database, data_dir,
                                                                                     own_model):
    runner = Runner(db, Settings(data_dir=data_dir, database_url=database, housekeeping_interval=3600),
                    new_worker(db, own_model), own_model, RunnerOptions(idle_poll=0.2))
    runner.writer.run = lambda: None  # the thread ends at once, as if it had died
    try:
        with pytest.raises(RuntimeError, match="result writer stopped"):
            runner.run(EchoEngine(EngineSpec(kind="echo", model_path="", served_name=own_model)))
    finally:
        runner.work_signal.close()
