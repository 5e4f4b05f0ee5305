# Sourced by the job scripts beside it, in the project's directory: what every job sets alike.
# SLURM may send the time limit's warning up to a minute early: one that comes before the watchdog
# runs finds nothing held, so the job ends cleanly (the watchdog, once exec'd, has its own handler).
trap 'echo "SIGTERM before the watchdog started: nothing is held; exiting" >&2; exit 0' TERM
if ! .venv/bin/python -c 'import sys; from core.batch_app.config import Settings; sys.exit(not Settings().database_url)'; then
  echo "DATABASE_URL is empty: a job's workers need the PostgreSQL every host shares (set it in .env)" >&2
  exit 2
fi
# A host name per job: a watchdog adopts and kills only its own host name's workers, so two jobs on
# one node never touch each other's; its logs go to a folder of that name.
export HOST_NAME="${SLURMD_NODENAME:-$(hostname)}-job${SLURM_JOB_ID:?not inside a SLURM job}"
export LOG_DIR="${LOG_DIR:-logs}/$HOST_NAME"
# Workers finish what they hold for up to SHUTDOWN_GRACE seconds after SIGTERM, then hand back the
# rest: kept below SLURM's KillWait (30 s unless the cluster sets it), so `scancel` and preemption,
# which send SIGTERM to every process of the job and SIGKILL after KillWait, drain cleanly too.
export SHUTDOWN_GRACE="${SHUTDOWN_GRACE:-20}"
