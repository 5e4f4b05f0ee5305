"""SLURM, the scheduler of research clusters, runs our processes as jobs: the job a process runs
in (job.py), the job scripts' worker slots on the job's GPUs (allocation.py), SLURM's own commands
(commands.py), and worker jobs submitted while work waits (elastic.py)."""
