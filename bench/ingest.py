"""Upload and create a batch from a 50,000-line (~100 MB) file; print wall time and the API
process's peak RSS growth, next to a baseline: parsing the same file in one Python process.

    .venv/bin/python bench/ingest.py [--lines 50000] [--line-bytes 2000]

Starts its own embedded PostgreSQL and API server under a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from core.batch_app.config import Settings  # noqa: E402
from core.batch_app.database import database_url, migrate, open_database, stop_embedded  # noqa: E402
from core.batch_app.domain import registry  # noqa: E402
from tests.conftest import start_api  # noqa: E402

MODEL = "bench-model"


def write_input(path: Path, lines: int, line_bytes: int) -> int:
    filler = "x" * max(0, line_bytes - 160)
    with open(path, "w") as out:
        for i in range(lines):
            out.write(json.dumps({"custom_id": f"request-{i}", "method": "POST", "url": "/v1/chat/completions",
                                  "body": {"model": MODEL, "max_tokens": 32,
                                           "messages": [{"role": "user", "content": f"{i} {filler}"}]}}) + "\n")
    return path.stat().st_size


class PeakRss(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.baseline = self.peak = self.process.memory_info().rss
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)


def baseline_parse_seconds(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb") as source:
        for line in source:
            json.loads(line)
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--line-bytes", type=int, default=2_000)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        root = Path(tmp)
        input_path = root / "input.jsonl"
        size = write_input(input_path, args.lines, args.line_bytes)
        settings = Settings(data_dir=root / "data", database_url="")
        url = database_url(settings)
        migrate(url)
        db = open_database(url, pool_size=1)
        with db.begin() as conn:  # a live worker for the model, as a running worker would register
            registry.register_worker(conn, worker_id=str(uuid.uuid4()), slot="bench", host="bench", pid=1,
                                  model=MODEL, gpu_ids="")
        server = start_api(url, root, "api", API_KEY="", OPEN_ACCESS="true")
        try:
            client = server.client()
            monitor = PeakRss(server.process.pid)
            monitor.start()
            started = time.perf_counter()
            with open(input_path, "rb") as source:
                file = client.files.create(file=("input.jsonl", source), purpose="batch")
            uploaded = time.perf_counter()
            batch = client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions",
                                          completion_window="24h")
            finished = time.perf_counter()
            monitor.done.set()
            monitor.join()
            assert batch.status == "validating" and batch.request_counts.total == args.lines, batch
            with db.connect() as conn:
                stored = conn.execute(sa.text("SELECT count(*) FROM batch_requests WHERE batch_id = :b"),
                                      {"b": batch.id}).scalar()
            assert stored == args.lines
        finally:
            server.stop()
            db.dispose()
            stop_embedded(settings)
        parse = baseline_parse_seconds(input_path)

    growth_mb = (monitor.peak - monitor.baseline) / 2**20
    print(f"input: {args.lines} lines, {size / 2**20:.1f} MiB")
    print(f"upload (POST /v1/files):              {uploaded - started:6.2f} s")
    print(f"create (validate + ingest, COPY):     {finished - uploaded:6.2f} s")
    print(f"end to end:                           {finished - started:6.2f} s   (target < 15 s)")
    print(f"API peak RSS growth:                  {growth_mb:6.1f} MiB (target < 150 MiB)")
    print(f"baseline, json.loads of every line:   {parse:6.2f} s   (ours / baseline = {(finished - started) / parse:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
