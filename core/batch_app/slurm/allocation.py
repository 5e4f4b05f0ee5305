"""`python -m core.batch_app.slurm.allocation workers|servers`: the WORKERS of a SLURM job, as the
JSON the job script exports, placed on the GPUs SLURM gave the job (listed in CUDA_VISIBLE_DEVICES).

- workers: the configured slots (WORKERS, or the default ones) with `gpus` counted within the
  job's allocation: "0" is the job's first GPU, whatever its number on the node.
- servers: a server slot per GPU of the job (one on a node without GPUs) running vLLM's server
  for MODEL (default: the demo model) with SERVER_ARGS (extra vLLM arguments, split like a shell
  does), on ports of its own for this job; the watchdog adds the pool worker that feeds them.
"""

from __future__ import annotations

import json
import os
import shlex
import sys

from ..config import Settings, WorkerSlot
from .job import this_job


class AllocationError(ValueError):
    pass


def job_gpus() -> list[str]:
    """The devices SLURM gave this job, as CUDA_VISIBLE_DEVICES lists them (none on a CPU node)."""
    return [gpu for gpu in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if gpu.strip()]


def within(positions: str, gpus: list[str], slot: str) -> str:
    """A slot's GPU positions ("0,1") as the job's devices."""
    if not positions:
        return ""
    try:
        return ",".join(gpus[int(position)] for position in positions.split(","))
    except (ValueError, IndexError):
        raise AllocationError(f"slot {slot} asks for GPUs {positions}, but this job has {len(gpus)} "
                              f"({','.join(gpus) or 'none'}): request more with sbatch --gres=gpu:N") from None


def worker_slots(settings: Settings, gpus: list[str]) -> list[dict]:
    settings.worker_slots()  # checks them
    # As configured: the pool workers of server slots are added again by the watchdog.
    configured = ([WorkerSlot(**item) for item in json.loads(settings.workers)] if settings.workers.strip()
                  else settings.worker_slots())
    slots = []
    for slot in configured:
        placed = slot.model_copy(update={"gpus": within(slot.gpus, gpus, slot.slot)})
        if slot.serve is not None:
            placed.serve = slot.serve.model_copy(update={"gpus": within(slot.serve.gpus, gpus, slot.slot)})
        slots.append(placed.model_dump(exclude_defaults=True))
    return slots


def server_slots(model: str, args: list[str], gpus: list[str], job_id: str) -> list[dict]:
    # Ports of this job's own, so two jobs on one node do not collide: 20000-29999 by job id.
    base = 20000 + (int(job_id or 0) % 1000) * 10
    return [WorkerSlot(slot=f"server-{index}", serve={"model": model, "port": base + index, "gpus": gpu,
                                                      "args": args}).model_dump(exclude_defaults=True)
            for index, gpu in enumerate(gpus or [""])]


def main(argv: list[str]) -> int:
    if argv not in (["workers"], ["servers"]):
        print("usage: python -m core.batch_app.slurm.allocation workers|servers", file=sys.stderr)
        return 2
    try:
        if argv == ["workers"]:
            slots = worker_slots(Settings(), job_gpus())
        else:
            slots = server_slots(os.environ.get("MODEL") or "demo", shlex.split(os.environ.get("SERVER_ARGS", "")),
                                 job_gpus(), this_job().job_id)
    except (AllocationError, ValueError) as exc:
        print(f"cannot place this job's workers: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(slots))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
