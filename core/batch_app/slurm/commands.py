"""SLURM's own commands, run as the user would type them: `sbatch` to submit a job script,
`squeue` to list the user's jobs. Each fails with SlurmError carrying what SLURM said."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# squeue's fields, in the order `jobs` reads them: id, name, state, time used, time limit, node
# (or the reason a pending job waits).
_FORMAT = "%i|%j|%T|%M|%l|%R"
_TIMEOUT = 60  # seconds: slurmctld answers in well under one unless it is down


class SlurmError(RuntimeError):
    pass


@dataclass(frozen=True)
class QueuedJob:
    job_id: str
    name: str
    state: str  # PENDING, RUNNING, COMPLETING, ...
    elapsed: str
    time_limit: str
    where: str  # the node it runs on, or why it waits

    @property
    def pending(self) -> bool:
        return self.state == "PENDING"


def installed() -> bool:
    return shutil.which("sbatch") is not None and shutil.which("squeue") is not None


def _run(command: list[str], env: dict[str, str] | None = None) -> str:
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT, env=env, check=False)
    except FileNotFoundError:
        raise SlurmError(f"{command[0]} is not installed here (SLURM's client commands)") from None
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{command[0]} did not answer within {_TIMEOUT} s (is slurmctld up?)") from None
    if result.returncode != 0:
        said = (result.stderr or result.stdout).strip() or "nothing"
        raise SlurmError(f"{' '.join(command[:2])} failed with exit code {result.returncode}: {said}")
    return result.stdout


def submit(script: Path, options: list[str], env: dict[str, str] | None = None) -> str:
    """Submit a job script with sbatch options; returns the job id."""
    out = _run(["sbatch", "--parsable", *options, str(script)], env)
    return out.strip().split(";")[0]  # "<id>" or "<id>;<cluster>"


def jobs(name: str | None = None) -> list[QueuedJob]:
    """The user's jobs in SLURM's queue (pending and running), optionally of one job name."""
    command = ["squeue", "--me", "--noheader", f"--format={_FORMAT}"] + ([f"--name={name}"] if name else [])
    return [QueuedJob(*line.split("|", 5)) for line in _run(command).splitlines() if line.strip()]
