"""Workers as SLURM jobs, on a real one-node cluster (slurmctld, slurmd, munged; tests/slurm_cluster.py)
with the echo engine: the worker job template serves batches and shows its job, a cancelled or
timed-out job drains and exits 0 charging nothing, and the elastic submitter starts a job while work
waits and lets it end when idle."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest
import sqlalchemy as sa
from alembic import command

from core.batch_app.database import alembic_config

from .conftest import (
    API_KEY,
    REPO,
    batchctl,
    echo_slot,
    scratch_database,
    stack_env,
    start_api,
    wait_for,
    wait_for_batch,
)
from .jsonl import request_line, submit
from .slurm_cluster import SlurmCluster

WORKER_JOB = REPO / "deployment" / "slurm" / "worker.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm")
    cluster = SlurmCluster(root).start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def slurm_api(database, data_dir):
    """An API that queues batches for models no live worker serves yet (elastic workers start for them)."""
    server = start_api(database, data_dir, "api-slurm", REQUIRE_LIVE_WORKER="false")
    yield server
    server.stop()


@pytest.fixture
def client(slurm_api):
    return slurm_api.client()


class WarnedJob(NamedTuple):
    env: dict[str, str]
    model: str
    job_id: str
    worker: Any
    batch: Any


@pytest.fixture(scope="module", autouse=True)
def warned_job(cluster, database, data_dir, db, slurm_api):
    """A job with a 2-minute limit and 45 s of warning, serving a long batch, started before the
    module's first test: SLURM may send the warning up to a minute before it is due, so it comes 15
    to 75 s after the start, and the module's other tests run while it is awaited."""
    model = f"slurm-{uuid.uuid4().hex[:6]}"
    env = job_env(cluster, database, data_dir, model, ECHO_STEP_SECONDS="1",
                  WORKERS=json.dumps([{**echo_slot(model), "max_in_flight": 32}]))
    job_id = sbatch(cluster, env, "--time=2", "--signal=B:TERM@45")
    worker = wait_for(lambda: serving_worker(db, job_id), 40, message="the warned job's worker to serve")
    client = slurm_api.client()
    batch = submit(client, [request_line(f"r{i}", model) for i in range(400)])  # 4 answers a second: it outlasts the job
    yield WarnedJob(env, model, job_id, worker, batch)
    client.batches.cancel(batch.id)


def job_env(cluster: SlurmCluster, database: str, data_dir: Path, model: str, **overrides: str) -> dict[str, str]:
    """What a cluster user's shell holds when submitting: the stack's settings (WORKERS: one echo worker
    of `model`) and the cluster's SLURM_CONF."""
    settings = {"WORKERS": json.dumps([echo_slot(model)]), "HEARTBEAT_INTERVAL": "1",
                "WATCHDOG_CHECK_INTERVAL": "0.5", "SHUTDOWN_GRACE": "3", **overrides}
    env = stack_env(database, data_dir, f"slurm-{model}", **settings)
    return {**env, "SLURM_CONF": cluster.env["SLURM_CONF"]}


def sbatch(cluster: SlurmCluster, env: dict[str, str], *options: str) -> str:
    """Submit the worker job template from the project's directory, as the README says."""
    output = Path(env["LOG_DIR"]) / "slurm-%j.out"
    result = subprocess.run(["sbatch", "--parsable", f"--output={output}", *options, str(WORKER_JOB)], env=env,
                            cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def job_output(env: dict[str, str], job_id: str) -> str:
    return (Path(env["LOG_DIR"]) / f"slurm-{job_id}.out").read_text(errors="replace")


def job_log(env: dict[str, str], cluster: SlurmCluster, job_id: str, name: str) -> str:
    """A log of the job's own LOG_DIR (LOG_DIR/<node>-job<id>/)."""
    return (Path(env["LOG_DIR"]) / f"{cluster.node}-job{job_id}" / name).read_text(errors="replace")


def ended(cluster: SlurmCluster, job_id: str) -> dict[str, str] | None:
    fields = cluster.job(job_id)
    return fields if fields.get("JobState") in ("COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED") else None


def serving_worker(db, job_id: str):
    with db.connect() as conn:
        return conn.execute(sa.text(
            "SELECT id, host, scheduler_job, scheduler_node FROM workers WHERE scheduler_job = :job "
            "AND status IN ('idle', 'busy')"), {"job": job_id}).first()


def rows_of(db, batch_id: str) -> list:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT custom_id, status, attempt, crashes, worker_id FROM batch_requests "
                                    "WHERE batch_id = :b ORDER BY line"), {"b": batch_id}).all()


def charged(db, host: str) -> tuple[int, list]:
    """Restarts counted for a host's slots, and its workers' recorded deaths."""
    with db.connect() as conn:
        restarts = conn.execute(sa.text("SELECT count(*) FROM worker_restarts WHERE host = :h"), {"h": host}).scalar()
        deaths = conn.execute(sa.text("SELECT d.cause FROM worker_deaths d JOIN workers w ON w.id = d.worker_id "
                                      "WHERE w.host = :h"), {"h": host}).scalars().all()
    return restarts, deaths


def model_known(db, model: str) -> bool:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM workers WHERE slot = :slot AND status = 'stopped'"),
                            {"slot": f"elastic-{model}"}).scalar() > 0


def output_ids(client, batch) -> list[str]:
    return [json.loads(line)["custom_id"] for line in client.files.content(batch.output_file_id).text.splitlines()]


def test_a_worker_job_serves_a_batch_and_shows_its_job_and_node(cluster, database, data_dir, db, client, slurm_api):
    model = f"slurm-{uuid.uuid4().hex[:6]}"
    env = job_env(cluster, database, data_dir, model)
    job_id = sbatch(cluster, env, "--time=5")
    worker = wait_for(lambda: serving_worker(db, job_id), 60, message="the job's worker to serve")
    assert (worker.host, worker.scheduler_node) == (f"{cluster.node}-job{job_id}", cluster.node)

    batch = wait_for_batch(client, submit(client, [request_line(f"r{i}", model) for i in range(20)]).id, 60)
    assert batch.status == "completed" and sorted(output_ids(client, batch)) == sorted(f"r{i}" for i in range(20))

    place = f"job {job_id} on {cluster.node}"
    listing = batchctl(env, "workers")
    assert listing.returncode == 0 and place in listing.stdout
    diagnosis = batchctl(env, "diagnose").stdout
    assert f"SLURM {place}" in diagnosis
    assert f"job {job_id} batch-worker: RUNNING" in diagnosis  # squeue's view of the user's jobs
    page = httpx.get(f"{slurm_api.base_url}/", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10).text
    assert f"<td>{place}</td>" in page

    cluster.run("scancel", job_id)
    wait_for(lambda: ended(cluster, job_id), 60, message="the job to end")


def test_a_cancelled_job_drains_and_its_batch_completes_once_on_another_job_charging_nothing(
        cluster, database, data_dir, db, client):
    model = f"slurm-{uuid.uuid4().hex[:6]}"
    # Slow: 4 answers a second with 32 in flight, so the job holds requests past its 3 s grace.
    slow = job_env(cluster, database, data_dir, model, ECHO_STEP_SECONDS="1",
                   WORKERS=json.dumps([{**echo_slot(model), "max_in_flight": 32}]))
    first = sbatch(cluster, slow, "--time=5")
    worker = wait_for(lambda: serving_worker(db, first), 60, message="the first job's worker to serve")
    batch = submit(client, [request_line(f"r{i}", model) for i in range(60)])
    wait_for(lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4, 60, message="some answers")

    cluster.run("scancel", first)
    fields = wait_for(lambda: ended(cluster, first), 60, message="the cancelled job to end")
    assert fields["ExitCode"] == "0:0"
    assert "released" in job_log(slow, cluster, first, f"worker-{model}.log")  # it held more than its grace allowed
    assert "watchdog stopped" in job_log(slow, cluster, first, "watchdog.log")
    assert not [row for row in rows_of(db, batch.id) if row.status == "running"]

    second = sbatch(cluster, job_env(cluster, database, data_dir, model), "--time=5")
    done = wait_for_batch(client, batch.id, 90)
    assert done.status == "completed"
    assert sorted(output_ids(client, done)) == sorted(f"r{i}" for i in range(60))  # each line exactly once
    rows = rows_of(db, batch.id)
    assert {(row.status, row.attempt, row.crashes) for row in rows} == {("succeeded", 1, 0)}
    assert {row.worker_id for row in rows} - {worker.id} != set()  # the second job finished it
    assert charged(db, worker.host) == (0, [])
    cluster.run("scancel", second)
    wait_for(lambda: ended(cluster, second), 60, message="the second job to end")


def test_elastic_jobs_start_while_work_waits_serve_what_arrives_and_end_when_idle(
        cluster, database, data_dir, db, client, tmp_path):
    model = f"slurm-{uuid.uuid4().hex[:6]}"
    env = job_env(cluster, database, data_dir, model)
    log_path = tmp_path / "slurm-up.log"
    with open(log_path, "wb") as log_file:
        submitter = subprocess.Popen(
            [str(Path(sys.executable).parent / "batchctl"), "slurm", "up", "--max-jobs", "2", "--idle-exit", "10",
             "--poll-interval", "1", "--", f"--output={Path(env['LOG_DIR']) / 'slurm-%j.out'}", "--time=5"],
            env=env, cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        # The submitter makes the model known (its stand-in row) before a batch for it can be made; under
        # load its start alone may take seconds. Two rounds later, with nothing waiting, no job was submitted.
        wait_for(lambda: model_known(db, model), 60, message="the submitter to make the model known")
        time.sleep(2.5)
        assert cluster.run("squeue", "--me", "--noheader", "--name=batch-worker-elastic").stdout.strip() == ""
        first = wait_for_batch(client, submit(client, [request_line(f"a{i}", model) for i in range(10)]).id, 90)
        assert first.status == "completed"
        jobs = [line for line in log_path.read_text().splitlines() if "submitted SLURM job" in line]
        assert len(jobs) == 1 and f"queued requests for {model} wait" in jobs[0]
        job_id = jobs[0].split("submitted SLURM job ")[1].split(":")[0]

        second = wait_for_batch(client, submit(client, [request_line(f"b{i}", model) for i in range(10)]).id, 30)
        assert second.status == "completed"
        fields = wait_for(lambda: ended(cluster, job_id), 60, message="the idle job to end")
        assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0")
        assert "IDLE_EXIT" in job_log(env, cluster, job_id, "watchdog.log")
        assert len([line for line in log_path.read_text().splitlines() if "submitted SLURM job" in line]) == 1
    finally:
        submitter.send_signal(signal.SIGTERM)
        assert submitter.wait(30) == 0


def test_workers_of_the_previous_head_are_no_job_s(database):
    with scratch_database(database) as url:
        command.upgrade(alembic_config(url), "0016")
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO workers (id, slot, host, pid, model, status) "
                                 "VALUES (:id, 'chat-0', 'box', 1, 'm', 'idle')"), {"id": str(uuid.uuid4())})
        command.upgrade(alembic_config(url), "0017")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT scheduler_job, scheduler_node FROM workers")).all() == [("", "")]
        command.downgrade(alembic_config(url), "0016")
        engine.dispose()


def test_a_job_warned_before_its_time_limit_drains_and_exits_0_before_it_is_killed(cluster, db, warned_job):
    env, model, job_id, worker, batch = warned_job
    fields = wait_for(lambda: ended(cluster, job_id), 150, interval=1, message="the warned job to end")
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0")  # not TIMEOUT: it ended in time
    assert "received SIGTERM" in job_log(env, cluster, job_id, "watchdog.log")
    rows = rows_of(db, batch.id)
    assert {row.status for row in rows} == {"succeeded", "queued"}  # it served, then stopped in time
    assert {(row.attempt, row.crashes) for row in rows if row.status == "queued"} == {(0, 0)}  # handed back uncharged
    # 32 in flight at 4 a second outlast its 3 s grace: what it still held went back to the queue.
    assert "released" in job_log(env, cluster, job_id, f"worker-{model}.log")
    assert charged(db, worker.host) == (0, [])
