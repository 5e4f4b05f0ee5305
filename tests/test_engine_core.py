"""vLLM in multiprocess mode, as on a GPU: its EngineCore child holds the device's memory from the
moment it starts loading the model, and outlives a SIGKILLed parent unless the watchdog kills
the worker's whole group."""

from __future__ import annotations

import contextlib
import os
import signal

import psutil
import pytest

from .conftest import gone, restarts, running_watchdog, wait_for

pytestmark = pytest.mark.vllm


def test_a_killed_worker_leaves_no_engine_core_behind(database, data_dir, db):
    """The worker is killed while its engine loads."""
    slot = "multiprocess-0"
    with running_watchdog(database, data_dir, "watchdog-multiprocess", [{"slot": slot, "model": "demo"}],
                          VLLM_ENABLE_V1_MULTIPROCESSING="1", RESTART_BACKOFF_MIN="0.5", KILL_GRACE="2") as watchdog:
        def engine_started():
            for worker in psutil.Process(watchdog.process.pid).children():
                with contextlib.suppress(psutil.NoSuchProcess):
                    children = worker.children(recursive=True)
                    if any("EngineCore" in " ".join(child.cmdline()) for child in children):
                        return worker, children
            return None

        victim, children = wait_for(engine_started, 300, interval=0.2, message="vLLM started its engine process")
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: restarts(db, slot), 30, interval=0.2, message="the kill detected")
        # Left alone, an EngineCore whose parent died exits by itself, but only once its load ends
        # (some 15 s here, minutes for a large model): the replacement must not start before the
        # watchdog has killed it.
        wait_for(lambda: (watchdog.log_dir / "watchdog.log").read_text().count(f"started worker {slot}") == 2, 30,
                 interval=0.1, message="a replacement started")
        assert all(gone(child.pid) for child in children), "the replacement started beside the old EngineCore"
