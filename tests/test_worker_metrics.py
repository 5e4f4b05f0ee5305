"""`/metrics` shows real workers: the requests a worker holds (`batch_worker_in_flight`) and the
watchdog's restarts of a slot (`batch_worker_restarts_total{slot}`), from a real API server over
a real watchdog and its worker process (the echo test engine, a few requests a step), parsed with
prometheus_client's own parser."""

from __future__ import annotations

import os
import signal

import httpx
from prometheus_client.parser import text_string_to_metric_families

from .conftest import echo_slot, live_worker, running_watchdog, wait_for
from .jsonl import request_line, submit

SLOT = "metrics-echo"
WINDOW = 8  # the worker's in-flight window
IN_FLIGHT = ("batch_worker_in_flight", (("kind", "worker"), ("model", SLOT), ("slot", SLOT)))
RESTARTS = ("batch_worker_restarts_total", (("slot", SLOT),))


def scrape(api) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of every sample."""
    response = httpx.get(f"{api.base_url}/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def test_metrics_show_what_a_worker_holds_and_count_the_restart_of_a_killed_one(database, data_dir, db, api, client):
    with running_watchdog(database, data_dir, "watchdog-worker-metrics", [dict(echo_slot(SLOT), max_in_flight=WINDOW)],
                          HEARTBEAT_INTERVAL="0.5", ECHO_STEP_SECONDS="0.5", RESTART_BACKOFF_MIN="0.2",
                          KILL_GRACE="1", SHUTDOWN_GRACE="5"):
        first = wait_for(lambda: live_worker(db, SLOT), 60, message="worker up")
        idle = wait_for(lambda: (m := scrape(api)).get(IN_FLIGHT) == 0 and m, 30, message="the idle worker's row")
        assert RESTARTS not in idle  # never restarted yet

        batch = submit(client, [request_line(f"r{i}", SLOT) for i in range(400)])  # 50 s of work at 8 a second
        holding = wait_for(lambda: scrape(api).get(IN_FLIGHT), 30, message="the worker to report requests held")
        assert 0 < holding <= WINDOW

        os.kill(first.pid, signal.SIGKILL)
        second = wait_for(lambda: (w := live_worker(db, SLOT)) and w.pid != first.pid and w, 60,
                          message="the replacement worker")
        after = wait_for(lambda: (m := scrape(api)).get(RESTARTS) == 1 and m, 30, message="the restart counted")
        series = [labels for name, labels in after
                  if name == "batch_worker_restarts_total" and dict(labels).get("slot") == SLOT]
        assert series == [(("slot", SLOT),)]  # one series for the slot, labelled by the slot alone
        # The replacement takes the requests handed back and reports them in its own row.
        assert 0 < wait_for(lambda: scrape(api).get(IN_FLIGHT), 30, message="the replacement holding") <= WINDOW
        assert live_worker(db, SLOT).pid == second.pid

        client.batches.cancel(batch.id)
        wait_for(lambda: scrape(api).get(IN_FLIGHT) == 0, 30, message="nothing in flight once the batch is cancelled")
        assert scrape(api)[RESTARTS] == 1  # a cancel is no restart
