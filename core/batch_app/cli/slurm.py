"""`batchctl slurm up`: elastic worker jobs on a SLURM cluster (see slurm/elastic.py), in the
foreground until Ctrl-C or SIGTERM; every submission is a log line on stderr with its reason."""

from __future__ import annotations

import logging
import threading

from ..config import Settings
from ..logs import configure_logging
from ..shutdown import stop_on_signals
from ..slurm import commands
from ..slurm.elastic import ElasticOptions, ElasticSubmitter, served_models
from .errors import CommandError
from .operator_commands import connect

log = logging.getLogger("core.batch_app.slurm")


def up(settings: Settings, options: ElasticOptions) -> None:
    if not commands.installed():
        raise CommandError("sbatch and squeue are not on PATH: run this on a host of the SLURM cluster (a login node)")
    if not options.script.is_file():
        raise CommandError(f"no job script at {options.script} (the worker template is deployment/slurm/worker.sbatch)")
    if not served_models(settings):
        raise CommandError("WORKERS configures no worker slot: a job would serve no model")
    configure_logging("batchctl-slurm")
    stopping = threading.Event()
    stop_on_signals(stopping, log, "submitting no more jobs (those running end when idle)")
    ElasticSubmitter(connect(settings), settings, options).run(stopping)
