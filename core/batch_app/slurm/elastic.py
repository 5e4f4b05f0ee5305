"""Elastic workers on SLURM (`batchctl slurm up`): while queued requests wait for a model that no
live worker serves, submit the worker job script, at most `max_jobs` such jobs at once and one
starting at a time; each submitted job runs its watchdog with IDLE_EXIT, so it ends by itself
once it has had nothing to do for a while and GPUs are held only while there is work.

The models are those the job's workers serve: the WORKERS of this same configuration, which the
job reads too (sbatch passes this environment on). The API fails a batch for a model no worker has
ever registered, so the submitter keeps a stopped worker row per model (slot `elastic-<model>`, refreshed
each round so retention keeps it): the model is known, and with REQUIRE_LIVE_WORKER=false a batch
for it queues until a job's worker serves it."""

from __future__ import annotations

import logging
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

from ..config import POOL_ENGINE, Settings
from ..database import Database
from ..domain import demand, registry
from ..domain.statuses import WorkerStatus
from ..models import served_name_of
from ..outage import is_unreachable, outage
from . import commands

log = logging.getLogger(__name__)

# The name of the jobs this submitter starts: squeue --name counts them.
JOB_NAME = "batch-worker-elastic"


@dataclass(frozen=True)
class ElasticOptions:
    script: Path
    max_jobs: int
    idle_exit: float
    poll_interval: float
    sbatch_options: tuple[str, ...] = ()


def served_models(settings: Settings) -> list[str]:
    """The models a worker job of this configuration serves (server slots are served through their pool workers)."""
    names = {slot.model if (slot.engine or settings.engine) == POOL_ENGINE else served_name_of(slot.model, slot.served_name)
             for slot in settings.worker_slots() if not slot.is_server}
    return sorted(names)


class ElasticSubmitter:
    def __init__(self, db: Database, settings: Settings, options: ElasticOptions):
        self.db, self.settings, self.options = db, settings, options
        self.models = served_models(settings)
        self.stand_ins = {model: str(uuid.uuid4()) for model in self.models}

    def run(self, stopping: threading.Event) -> None:
        log.info("submitting %s while requests for %s wait with no live worker (at most %d jobs, each exiting after "
                 "%.0f s with nothing to do)", self.options.script, ", ".join(self.models), self.options.max_jobs,
                 self.options.idle_exit)
        while not stopping.is_set():
            try:
                self.run_once()
                outage.reached()
            except commands.SlurmError as exc:
                log.error("SLURM: %s", exc)
            except Exception as exc:
                if not is_unreachable(exc):
                    raise
                outage.failed(exc, "reading what waits for workers")
            stopping.wait(self.options.poll_interval)

    def run_once(self) -> str | None:
        """Submit one job if work waits and none is on its way; returns its id, or None."""
        self._keep_models_known()
        with self.db.connect() as conn:
            waiting = demand.waiting_models(conn, self.models, self.settings.heartbeat_timeout)
        if not waiting:
            return None
        ours = commands.jobs(JOB_NAME)
        with self.db.connect() as conn:
            serving = demand.jobs_with_workers(conn, [job.job_id for job in ours])
            # Asked again after: a job's worker that registered since the first look (loading,
            # which counts as serving) is then seen by both, not taken for a job with nothing.
            waiting = demand.waiting_models(conn, self.models, self.settings.heartbeat_timeout)
        if not waiting:
            return None
        if any(job.job_id not in serving for job in ours):
            return None  # pending, or its workers have not registered yet: they may be the ones that serve
        if len(ours) >= self.options.max_jobs:
            log.warning("requests for %s wait with no live worker, but %d jobs run already (the most allowed)",
                        ", ".join(waiting), len(ours))
            return None
        env = dict(os.environ, IDLE_EXIT=str(self.options.idle_exit))
        job_id = commands.submit(self.options.script, [f"--job-name={JOB_NAME}", *self.options.sbatch_options], env)
        log.info("submitted SLURM job %s: queued requests for %s wait and no live worker serves %s (%d of at most %d "
                 "jobs)", job_id, ", ".join(waiting), "it" if len(waiting) == 1 else "them", len(ours) + 1,
                 self.options.max_jobs)
        return job_id

    def _keep_models_known(self) -> None:
        """Each model's stopped stand-in row, registered once and beaten as stopped every round."""
        with self.db.begin() as conn:
            for model, worker_id in self.stand_ins.items():
                if not registry.heartbeat(conn, worker_id=worker_id, status=WorkerStatus.STOPPED, in_flight=0,
                                          requests_done=0, tokens_done=0, progressed=False):
                    registry.register_worker(conn, worker_id=worker_id, slot=f"elastic-{model}", host=self.settings.host_name,
                                             pid=os.getpid(), model=model, gpu_ids="")
                    registry.heartbeat(conn, worker_id=worker_id, status=WorkerStatus.STOPPED, in_flight=0,
                                       requests_done=0, tokens_done=0, progressed=False)
