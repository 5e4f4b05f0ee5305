"""A seeded, bounded multi-host fault run: does a batch survive hosts that lose power, links cut,
workers frozen or killed and PostgreSQL stopped, with nothing lost, nothing twice, no error line,
and no crash charged to a request for what the hosts did?

Hosts are network namespaces (tests/hosts.py) on 198.19.0.0/16, a range used only here: host
nem-a runs PostgreSQL (listening on its links) and the API; nem-b, nem-c and nem-d each run
`scripts/start-all.sh --role worker` (a watchdog and one worker on the echo engine of
tests/engines.py, which answers after ECHO_STEP_SECONDS, so the batch outlasts the faults). Once
the batch runs, a fault falls every 8 to 20 s for `--fault-seconds`, drawn from the seed:

    power-off   every process of a host SIGKILLed at once; the host starts again 10-30 s later
    link cut    the host's link down for 5-30 s
    freeze      the host's worker SIGSTOPped for 20 s (its watchdog judges it hung)
    kill        the host's worker SIGKILLed (from outside: its requests are charged nothing)
    db stop     PostgreSQL shut down (fast) for 5-10 s

Per seed it prints the faults, requests lost and duplicated (custom_ids missing from, or twice
in, the output and error files), error lines by code, requests run again (attempt above 1),
crashes charged and to which deaths (`worker_deaths`, with the deaths that charged nothing),
restarts charged, and the batch's completion time after the last fault ended; then a table of
every seed. Target: 0 lost, 0 duplicated, 0 error lines for every seed; crashes charged only to
hangs (the freezes), never to power-offs, cuts, kills or database stops.

    .venv/bin/python bench/nemesis.py [--seeds 1-10] [--requests 6000] [--fault-seconds 90]

Needs root (namespaces). Every loop is bounded in count and time (TIME_LIMIT per seed).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil
import sqlalchemy as sa

from core.batch_app.database import open_database
from core.batch_app.domain.batch_format import FINAL_STATUSES
from core.batch_app.domain.queue import CHARGED_DEATHS
from tests.conftest import wait_for
from tests.hosts import Cluster, Host, Network, postgres_url

PREFIX = "198.19"
HUB, HOSTS = "nem-a", ["nem-b", "nem-c", "nem-d"]
MODEL = "echo-model"
SLOT = {"slot": "echo-0", "model": "/models/echo", "served_name": MODEL, "engine": "tests.engines:EchoEngine",
        "max_in_flight": 16}
SETTINGS = {"HEARTBEAT_INTERVAL": "1", "HEARTBEAT_TIMEOUT": "5", "HOUSEKEEPING_INTERVAL": "1",
            "WATCHDOG_CHECK_INTERVAL": "0.5", "RESTART_BACKOFF_MIN": "0.5", "RESTART_BACKOFF_MAX": "2",
            "MAX_RESTARTS_PER_HOUR": "1000", "MAX_ATTEMPTS": "3", "ECHO_STEP_SECONDS": "0.2",
            "SHUTDOWN_GRACE": "10", "FINISHED_REQUESTS_RETENTION": "3600"}
API_PORT = 4080
KINDS = ("power-off", "link cut", "freeze", "kill", "db stop")
TIME_LIMIT = 900  # seconds a seed may take once its batch is created


@dataclass
class Fault:
    at: float  # seconds after the batch was created
    kind: str
    host: int  # index of the preferred host
    seconds: float  # how long it lasts (0: at once)


def plan(rng: random.Random, fault_seconds: float) -> list[Fault]:
    faults, at = [], rng.uniform(5, 10)
    while at < fault_seconds:
        kind = rng.choice(KINDS)
        seconds = {"power-off": rng.uniform(10, 30), "link cut": rng.uniform(5, 30), "freeze": 20.0, "kill": 0.0,
                   "db stop": rng.uniform(5, 10)}[kind]
        faults.append(Fault(at, kind, rng.randrange(len(HOSTS)), seconds))
        at += rng.uniform(8, 20)
    return faults


class Nemesis:
    """Runs a plan on a cluster: each fault starts when due and ends `seconds` later (a timeline
    of actions in one thread); a host powered off or cut off takes no other fault meanwhile."""

    def __init__(self, net: Network, cluster: Cluster, started: float):
        self.net, self.cluster, self.started = net, cluster, started
        self.down: set[str] = set()  # hosts powered off or cut off
        self.db_down = False
        self.done: Counter[str] = Counter()  # faults that took place, by kind
        self.last_end = started  # when the last fault ended

    def note(self, text: str) -> None:
        print(f"  {time.time() - self.started:6.1f} s: {text}", flush=True)

    def run(self, faults: list[Fault]) -> None:
        timeline: list[tuple[float, int, object]] = []
        for i, fault in enumerate(faults):
            heapq.heappush(timeline, (fault.at, i, fault))
        seq = len(faults)
        while timeline:
            at, _, action = heapq.heappop(timeline)
            time.sleep(max(0.0, self.started + at - time.time()))
            if callable(action):  # a fault's end, or False to be tried again a little later
                if action() is False:
                    seq += 1
                    heapq.heappush(timeline, (time.time() - self.started + 2, seq, action))
                else:
                    self.last_end = time.time()
                continue
            end = self.start(action)
            if end is not None:
                seq += 1
                heapq.heappush(timeline, (time.time() - self.started + action.seconds, seq, end))

    def start(self, fault: Fault):
        """Start a fault; returns what ends it, or None when it ends at once (or found no target)."""
        if fault.kind == "db stop":
            if self.db_down:
                self.note("db stop skipped: the database is down already")
                return None
            self.cluster.stop_postgres()
            self.db_down = True
            self.done[fault.kind] += 1
            self.note(f"database stopped for {fault.seconds:.0f} s")
            return self.start_database
        names = [HOSTS[(fault.host + i) % len(HOSTS)] for i in range(len(HOSTS))]
        host = next((self.net.hosts[name] for name in names if name not in self.down), None)
        if host is None:
            self.note(f"{fault.kind} skipped: every host is down")
            return None
        if fault.kind in ("power-off", "link cut"):
            self.done[fault.kind] += 1
        if fault.kind == "power-off":
            self.down.add(host.name)
            host.kill_everything()
            self.note(f"power-off {host.name} for {fault.seconds:.0f} s")
            return lambda: self.power_on(host)
        if fault.kind == "link cut":
            self.down.add(host.name)
            self.net.cut(host.name)
            self.note(f"link of {host.name} cut for {fault.seconds:.0f} s")
            return lambda: self.mend(host)
        worker = worker_process(host)
        if worker is None:
            self.note(f"{fault.kind} skipped: no worker runs on {host.name}")
            return None
        self.done[fault.kind] += 1
        if fault.kind == "kill":
            worker.kill()
            self.last_end = time.time()  # over at once
            self.note(f"worker of {host.name} (pid {worker.pid}) SIGKILLed")
            return None
        worker.suspend()
        self.note(f"worker of {host.name} (pid {worker.pid}) frozen for {fault.seconds:.0f} s")
        return lambda: self.thaw(worker)

    def start_database(self) -> None:
        self.cluster.run_postgres()
        self.db_down = False
        self.note("database started again")

    def power_on(self, host: Host) -> bool:
        """False while the database is stopped: start-all.sh migrates first."""
        if self.db_down:
            return False
        self.cluster.start_worker_host(host)
        self.down.discard(host.name)
        self.note(f"{host.name} powered on")
        return True

    def mend(self, host: Host) -> None:
        self.net.mend(host.name)
        self.down.discard(host.name)
        self.note(f"link of {host.name} mended")

    def thaw(self, worker: psutil.Process) -> None:
        try:
            worker.resume()  # psutil checks it is still the same process
            self.note(f"worker pid {worker.pid} resumed")
        except psutil.NoSuchProcess:
            self.note(f"worker pid {worker.pid} was killed by its watchdog meanwhile")


def worker_process(host: Host) -> psutil.Process | None:
    for pid in host.pids():
        try:
            process = psutil.Process(pid)
            if "core.batch_app.worker" in " ".join(process.cmdline()) and process.status() != psutil.STATUS_STOPPED:
                return process
        except psutil.Error:
            continue
    return None


def retrieve(client, batch_id: str):
    try:
        return client.batches.retrieve(batch_id)
    except Exception:  # the API answers 503 while the database is stopped, or not at all
        return None


def run_seed(seed: int, requests: int, fault_seconds: float, root: Path) -> dict:
    rng = random.Random(seed)
    faults = plan(rng, fault_seconds)
    print(f"seed {seed}: {requests} requests on {len(HOSTS)} worker hosts, {len(faults)} faults over "
          f"{fault_seconds:.0f} s", flush=True)
    with Network(HUB, HOSTS, prefix=PREFIX) as net:
        cluster = Cluster(net, root, [SLOT], SETTINGS)
        try:
            cluster.start_postgres()
            client = cluster.start_api(API_PORT, DATABASE_URL=postgres_url("127.0.0.1")).with_options(max_retries=8)
            db = open_database(postgres_url(net.hub.hub_address).replace("postgresql://", "postgresql+psycopg://"))
            for host in net.hosts.values():
                cluster.start_worker_host(host)
            for name in HOSTS:
                wait_for(lambda: worker_process(net.hosts[name]), 120, interval=0.5, message=f"{name}'s worker")
            path = root / "requests.jsonl"
            with open(path, "w") as file:
                for i in range(requests):
                    file.write(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                                           "body": {"model": MODEL, "max_tokens": 8,
                                                    "messages": [{"role": "user", "content": f"item {i}"}]}}) + "\n")
            with open(path, "rb") as source:
                file = client.files.create(file=("nemesis.jsonl", source), purpose="batch")
            batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            nemesis = Nemesis(net, cluster, time.time())
            nemesis.run(faults)
            done = wait_for(lambda: (b := retrieve(client, batch.id)) and b.status in FINAL_STATUSES and b,
                            TIME_LIMIT, interval=1, message="the batch to end")
            result = report(client, db, done, requests, nemesis)
            db.dispose()
            return result
        finally:
            cluster.stop()


def report(client, db, batch, total: int, nemesis: Nemesis) -> dict:
    lines = []
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            lines += [json.loads(line) for line in client.files.content(file_id).text.splitlines()]
    seen = Counter(line["custom_id"] for line in lines)
    errors = Counter((line["error"] or {}).get("code") or f"HTTP {line['response']['status_code']}"
                     for line in lines if line["error"] or line["response"]["status_code"] != 200)
    with db.connect() as conn:
        again, crashes = conn.execute(sa.text(
            "SELECT count(*) FILTER (WHERE attempt > 1), coalesce(sum(crashes), 0) FROM batch_requests "
            "WHERE batch_id = :b"), {"b": batch.id}).one()
        deaths = conn.execute(sa.text("SELECT cause, count(*), sum(requests) FROM worker_deaths d "
                                      "JOIN workers w ON w.id = d.worker_id WHERE w.kind = 'worker' "
                                      "GROUP BY cause ORDER BY cause")).all()
        restarts = conn.execute(sa.text("SELECT count(*) FROM worker_restarts WHERE reason <> 'reset'")).scalar()
    result = {
        "faults": nemesis.done,
        "lost": sum(1 for i in range(total) if f"r{i}" not in seen),
        "duplicated": sum(count - 1 for count in seen.values()),
        "errors": errors,
        "again": again,
        "crashes": crashes,
        "charged": {cause: (n, requests) for cause, n, requests in deaths if cause in CHARGED_DEATHS},
        "uncharged": {cause: (n, requests) for cause, n, requests in deaths if cause not in CHARGED_DEATHS},
        "restarts": restarts,
        "after_last_fault": batch.completed_at - nemesis.last_end if batch.completed_at else None,
        "status": batch.status,
    }

    def deaths_text(found: dict) -> str:
        return ", ".join(f"{cause} {n} ({requests} requests)" for cause, (n, requests) in found.items()) or "none"

    print(f"  batch {batch.status}: {batch.request_counts.completed} completed, {batch.request_counts.failed} failed")
    print(f"  faults               {sum(result['faults'].values())} "
          f"({', '.join(f'{kind}: {n}' for kind, n in result['faults'].items())})")
    print(f"  requests lost        {result['lost']}")
    print(f"  requests duplicated  {result['duplicated']}")
    print(f"  error lines          {sum(errors.values())}"
          + (f" ({', '.join(f'{code}: {n}' for code, n in errors.most_common())})" if errors else ""))
    print(f"  requests run again   {again}")
    print(f"  crashes charged      {crashes}, to deaths: {deaths_text(result['charged'])}")
    print(f"  deaths uncharged     {deaths_text(result['uncharged'])}")
    print(f"  restarts charged     {restarts}")
    after = result["after_last_fault"]
    print(f"  completed            {after:.0f} s after the last fault ended" if after is not None else
          "  completed            never", flush=True)
    return result


def seeds_of(text: str) -> list[int]:
    """`1-10` or `3,7,9`."""
    if "-" in text:
        first, last = text.split("-")
        return list(range(int(first), int(last) + 1))
    return [int(part) for part in text.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="1-10", help="e.g. 1-10 or 3,7")
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--fault-seconds", type=float, default=90.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("network namespaces need root", file=sys.stderr)
        return 2
    rows = []
    for seed in seeds_of(args.seeds):
        with tempfile.TemporaryDirectory(prefix=f"nemesis-{seed}-") as tmp:
            started = time.monotonic()
            result = run_seed(seed, args.requests, args.fault_seconds, Path(tmp))
            rows.append((seed, result, time.monotonic() - started))
    print("\n| seed | faults | lost | duplicated | error lines | run again | crashes charged (to) | "
          "deaths uncharged | restarts charged | done after last fault | seed wall time |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for seed, r, wall in rows:
        faults = ", ".join(f"{kind} {n}" for kind, n in r["faults"].items())
        charged = ", ".join(f"{cause} {requests}" for cause, (_, requests) in r["charged"].items()) or "-"
        uncharged = ", ".join(f"{cause} {n}" for cause, (n, _) in r["uncharged"].items()) or "-"
        after = f"{r['after_last_fault']:.0f} s" if r["after_last_fault"] is not None else "never"
        print(f"| {seed} | {sum(r['faults'].values())} ({faults}) | {r['lost']} | {r['duplicated']} | "
              f"{sum(r['errors'].values())} | {r['again']} | {r['crashes']} ({charged}) | {uncharged} | "
              f"{r['restarts']} | {after} | {wall:.0f} s |")
    bad = [seed for seed, r, _ in rows if r["lost"] or r["duplicated"] or r["errors"] or r["status"] != "completed"]
    print(f"\nseeds with a request lost, duplicated or failed: {bad or 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
