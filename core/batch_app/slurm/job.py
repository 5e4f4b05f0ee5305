"""The SLURM job this process runs in, as SLURM's environment tells it (empty outside a job)."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerJob:
    job_id: str = ""
    node: str = ""


def this_job() -> SchedulerJob:
    """The job and node of this process: SLURM sets both in a job's environment, and the processes
    a job's watchdog starts inherit them."""
    return SchedulerJob(os.environ.get("SLURM_JOB_ID", ""), os.environ.get("SLURMD_NODENAME", ""))
