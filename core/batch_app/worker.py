"""`python -m core.batch_app.worker`: one engine, one model, one process; see runner.py."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import uuid

from . import queue
from .alerts import init_sentry
from .config import get_settings
from .database import create_db_engine, database_url
from .engines import load_engine
from .engines.base import EngineSpec
from .logs import configure_logging, worker_log_stem
from .models import resolve_model
from .runner import Runner, RunnerOptions

log = logging.getLogger("core.batch_app.worker")


def parse_args(argv: list[str]) -> argparse.Namespace:
    settings = get_settings()
    parser = argparse.ArgumentParser(prog="python -m core.batch_app.worker")
    parser.add_argument("--slot", default="worker-0", help="stable name of this worker's place (restarts keep it)")
    parser.add_argument("--model", default=settings.model, help="'' or 'demo', 'all-MiniLM-L6-v2', or a model path")
    parser.add_argument("--served-name", default="", help="name clients use in body.model")
    parser.add_argument("--runner", choices=["generate", "pooling"], default=None)
    parser.add_argument("--engine", default=settings.engine, help="'vllm' or 'package.module:Class'")
    parser.add_argument("--gpus", default="", help="GPU ids for CUDA_VISIBLE_DEVICES, e.g. '0,1'")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-in-flight", type=int, default=None)
    parser.add_argument("--engine-options", default="{}",
                        help="JSON of extra vLLM engine arguments, e.g. tensor_parallel_size, gpu_memory_utilization")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    settings = get_settings()
    configure_logging(f"worker:{args.slot}", settings, worker_log_stem(args.slot))
    # vLLM's loggers then propagate to ours, keeping their levels and names in our format.
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    init_sentry(settings.sentry_dsn, f"worker:{args.slot}", error_logs_as_events=False)
    if args.gpus:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpus
    choice = resolve_model(args.model, settings.data_dir, args.served_name)
    spec = EngineSpec(kind=args.engine, model_path=choice.path, served_name=choice.served_name,
                      runner=args.runner or choice.runner, max_model_len=args.max_model_len,
                      max_in_flight=args.max_in_flight, options=json.loads(args.engine_options))

    db = create_db_engine(database_url(settings), pool_size=4)  # engine loop, writer, heartbeat, wake-ups
    worker_id = str(uuid.uuid4())
    with db.begin() as conn:
        queue.register_worker(conn, worker_id=worker_id, slot=args.slot, host=socket.gethostname(),
                              pid=os.getpid(), model=spec.served_name, gpu_ids=args.gpus)
    log.info("worker %s (slot %s, pid %d) loading %s from %s with engine %s",
             worker_id, args.slot, os.getpid(), spec.served_name, spec.model_path, spec.kind)
    runner = Runner(db, settings, worker_id, spec.served_name, RunnerOptions(shutdown_grace=settings.shutdown_grace))
    runner.install_signal_handlers()
    runner.start()
    started = time.monotonic()
    try:
        engine = load_engine(spec, settings.data_dir / "cache")
    except Exception as exc:
        log.error("model load failed: %s: %s", type(exc).__name__, exc)
        runner.heartbeat.stop()
        return 1
    log.info("model %s loaded in %.1f s; serving with up to %d requests in flight",
             spec.served_name, time.monotonic() - started, engine.max_in_flight)
    runner.run(engine)
    engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
