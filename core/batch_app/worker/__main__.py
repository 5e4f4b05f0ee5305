"""`python -m core.batch_app.worker --slot NAME`: one engine, one model, one process; see runner.py.

The slot's configuration comes from the settings (WORKERS) like every other setting; the
watchdog passes only the slot's name and the id the worker registers under.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import uuid

from ..alerts import init_sentry
from ..config import POOL_ENGINE, Settings, WorkerSlot, get_settings
from ..database import open_configured
from ..domain import registry
from ..engines import load_engine
from ..engines.base import EngineSpec
from ..logs import configure_logging, worker_log_stem
from ..models import resolve_model
from ..outage import outage
from ..shutdown import StoppedWhileLoading, stopped_at_once_by_signals
from .runner import Runner, RunnerOptions

log = logging.getLogger("core.batch_app.worker")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m core.batch_app.worker")
    parser.add_argument("--slot", default="chat-0", help="the WORKERS entry to serve (restarts keep it)")
    parser.add_argument("--worker-id", default=None,
                        help="the id to register under (the watchdog chooses it); default: a new one")
    return parser.parse_args(argv)


def engine_spec(slot: WorkerSlot, settings: Settings) -> EngineSpec:
    if (slot.engine or settings.engine) == POOL_ENGINE:  # the backends hold the model: `model` is their name for it
        return EngineSpec(kind=POOL_ENGINE, model_path=slot.model, served_name=slot.served_name or slot.model,
                          options=slot.pool_options())
    choice = resolve_model(slot.model, settings.data_dir, slot.served_name)
    return EngineSpec(kind=slot.engine or settings.engine, model_path=choice.path, served_name=choice.served_name,
                      runner=choice.runner, max_model_len=slot.max_model_len, max_in_flight=slot.max_in_flight,
                      options=slot.engine_options)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = get_settings()
    configure_logging(f"worker:{args.slot}", settings, worker_log_stem(args.slot))
    # vLLM's loggers then propagate to ours, keeping their levels and names in our format.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    init_sentry(settings.sentry_dsn, f"worker:{args.slot}", error_logs_as_events=False)
    slot = settings.worker_slot(args.slot)
    if slot.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.gpus
    spec = engine_spec(slot, settings)

    # The engine loop, the result writer, the heartbeat, housekeeping and the wake-up listener.
    db = open_configured(settings, pool_size=5, process=f"worker:{slot.slot}")
    worker_id = args.worker_id or str(uuid.uuid4())

    def register() -> None:
        with db.begin() as conn:
            registry.register_worker(conn, worker_id=worker_id, slot=slot.slot, host=settings.host_name,
                                     pid=os.getpid(), model=spec.served_name, gpu_ids=slot.gpus)

    runner = Runner(db, settings, worker_id, spec.served_name, RunnerOptions(shutdown_grace=settings.shutdown_grace))
    runner.install_signal_handlers()
    outage.retry(register, "registering this worker")
    log.info("worker %s (slot %s, pid %d) loading %s from %s with engine %s",
             worker_id, slot.slot, os.getpid(), spec.served_name, spec.model_path, spec.kind)
    runner.start()
    started = time.monotonic()
    try:
        with stopped_at_once_by_signals(runner.stopping, log, "loading the model"):
            engine = load_engine(spec, settings.data_dir / "cache")
    except StoppedWhileLoading:
        runner.stop_before_serving()
        return 0
    except Exception as exc:
        log.error("model load failed: %s: %s", type(exc).__name__, exc)
        runner.heartbeat.stop()
        return 1
    log.info("model %s loaded in %.1f s; serving with up to %d requests in flight",
             spec.served_name, time.monotonic() - started, engine.max_in_flight)
    try:
        runner.run(engine)
    except Exception as exc:  # the watchdog restarts this worker; what it held is rescued
        log.critical("worker loop failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        return 1
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
