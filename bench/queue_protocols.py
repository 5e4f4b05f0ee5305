"""The worker's two hot queue statements, each against a baseline, on one embedded PostgreSQL:

  claim:   128 requests at a time with 50,000 queued (queue.claim, which first asks whether crash
           survivors wait), against the same schema without the batch_requests_suspects index;
  store:   2,000 chat results in groups of 120 (queue.complete, one JSON document a group),
           against the same update fed by per-column arrays, the responses as a text[];
  history: then beside three finished batches as large, one request at a time (the claim
           statement alone, run as the worker runs it: prepared after five runs), against the
           same statement taking its picked rows joined as a table.

    .venv/bin/python bench/queue_protocols.py [--queued 50000] [--results 2000] [--repeats 3]

Every measurement runs inside a transaction that is rolled back, so ours and the baseline see
the same rows; the baseline's index is dropped inside its transaction. Ours and the baseline
alternate, and the median of the repeats is printed. CPU is the bench process's own (the
worker's side of the call: building and sending parameters) and PostgreSQL's, wall is per call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.cpu import cpu_seconds, postgres_processes  # noqa: E402
from bench.scratch import scratch_database  # noqa: E402
from core.batch_app.domain import queue, registry  # noqa: E402
from core.batch_app.domain.queue import Completion  # noqa: E402

MODEL = "bench-model"
CLAIM_SIZE = 128
GROUP_SIZE = 120

# The store statement as it was fed before, one array per column; the rest of it is ours, so
# the two differ only in how a group reaches PostgreSQL.
_JSON_ROWS = """FROM json_to_recordset(CAST(:results AS json))
     AS u(id bigint, attempt int, status_code int, response text, prompt_tokens int, completion_tokens int)"""
_ARRAY_ROWS = """FROM unnest(CAST(:ids AS bigint[]), CAST(:attempts AS int[]), CAST(:status_codes AS int[]),
            CAST(:responses AS text[]), CAST(:prompt_tokens AS int[]), CAST(:completion_tokens AS int[]))
     AS u(id, attempt, status_code, response, prompt_tokens, completion_tokens)"""
assert _JSON_ROWS in queue._COMPLETE.text, "queue.complete's statement changed: update this baseline"
ARRAY_COMPLETE = sa.text(queue._COMPLETE.text.replace(_JSON_ROWS, _ARRAY_ROWS))

# The claim as it took its picked rows before, joined as a table: prepared, its kept plan hashed
# them against a scan of the whole table.
_PICKED_AS_ARRAY = "FROM batches b\nWHERE r.id = ANY(ARRAY(SELECT id FROM picked))"
_PICKED_JOINED = "FROM picked, batches b\nWHERE r.id = picked.id"
assert _PICKED_AS_ARRAY in queue._CLAIM_ORDINARY.text, "queue's claim changed: update this baseline"
JOINED_CLAIM = sa.text(queue._CLAIM_ORDINARY.text.replace(_PICKED_AS_ARRAY, _PICKED_JOINED))


def array_complete(conn, worker_id: str, completions: list[Completion]) -> dict[int, str]:
    rows = conn.execute(ARRAY_COMPLETE, {
        "worker_id": worker_id, "ids": [c.id for c in completions], "attempts": [c.attempt for c in completions],
        "status_codes": [c.status_code for c in completions],
        "responses": [json.dumps(c.response) for c in completions],
        "prompt_tokens": [c.prompt_tokens for c in completions],
        "completion_tokens": [c.completion_tokens for c in completions]}).all()
    return {row.id: row.batch_id for row in rows}


def chat_response(index: int) -> dict:
    """A body shaped like the worker's, with about as much text as the demo model writes."""
    words = " ".join(f"word{(index * 31 + k) % 997}" for k in range(85))
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": 1_800_000_000,
            "model": MODEL, "choices": [{"index": 0, "message": {"role": "assistant", "content": words,
                                                                 "refusal": None, "tool_calls": []},
                                         "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 30, "completion_tokens": 85, "total_tokens": 115}}


def postgres_cpu() -> float:
    return cpu_seconds(postgres_processes())


def measured(db, work, before=None) -> dict:
    """Run each call in `work` on one connection, in a transaction that is rolled back; time each."""
    with db.connect() as conn:
        transaction = conn.begin()
        if before is not None:
            conn.execute(sa.text(before))
        cpu, pg_cpu, walls = time.process_time(), postgres_cpu(), []
        for call in work:
            started = time.perf_counter()
            call(conn)
            walls.append(time.perf_counter() - started)
        result = {"cpu": time.process_time() - cpu, "pg_cpu": postgres_cpu() - pg_cpu,
                  "wall": statistics.median(walls), "calls": len(walls)}
        transaction.rollback()
    return result


def fill_queue(db, queued: int, model: str = MODEL) -> str:
    """A batch of `queued` chat requests for `model`, queued as ingest leaves them; its id."""
    batch_id = f"batch_{uuid.uuid4().hex}"
    with db.begin() as conn:
        conn.execute(sa.text(
            "INSERT INTO batches (id, project, endpoint, model, input_file_id, completion_window, status, total,"
            " created_at, expires_at) VALUES (:id, 'default', '/v1/chat/completions', :model, 'file-bench', '24h',"
            " 'in_progress', :total, now(), now() + interval '1 day')"), {"id": batch_id, "model": model,
                                                                          "total": queued})
        conn.execute(sa.text(
            "INSERT INTO batch_requests (batch_id, project, line, custom_id, model, body)"
            " SELECT :id, 'default', n, 'request-' || n, :model,"
            "  jsonb_build_object('model', CAST(:model AS text), 'max_tokens', 128, 'messages',"
            "   jsonb_build_array(jsonb_build_object('role', 'user', 'content', 'Request ' || n)))"
            " FROM generate_series(1, :total) AS n"), {"id": batch_id, "model": model, "total": queued})
        conn.execute(sa.text("ANALYZE batch_requests"))
    return batch_id


def finish_history(db, batches: int, size: int) -> None:
    """`batches` batches of `size` requests each, every request succeeded: kept history."""
    for _ in range(batches):
        batch_id = fill_queue(db, size)
        with db.begin() as conn:
            conn.execute(sa.text("UPDATE batch_requests SET status = 'succeeded', finished_at = now()"
                                 " WHERE batch_id = :id"), {"id": batch_id})
            conn.execute(sa.text("UPDATE batches SET status = 'completed', completed_at = now() WHERE id = :id"),
                         {"id": batch_id})
    with db.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(sa.text("VACUUM ANALYZE batch_requests"))


def compare(name: str, runs: dict, repeats: int) -> None:
    """Ours and the baseline in alternating order, `repeats` times; the medians printed."""
    results = {contender: [] for contender in runs}
    for repeat in range(repeats):
        for contender in (list(runs) if repeat % 2 == 0 else list(runs)[::-1]):
            results[contender].append(runs[contender]())
    for contender, samples in results.items():
        wall, cpu, pg_cpu = (statistics.median(sample[key] for sample in samples) for key in ("wall", "cpu", "pg_cpu"))
        print(f"  {name:7s} {contender:8s} per call {1000 * wall:7.2f} ms wall; over {samples[0]['calls']}"
              f" calls, CPU: bench {cpu:5.3f} s, PostgreSQL {pg_cpu:5.3f} s")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queued", type=int, default=50_000)
    parser.add_argument("--results", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with scratch_database("queue-bench-") as (_, _, db):
        fill_queue(db, args.queued)
        worker_id = str(uuid.uuid4())
        with db.begin() as conn:
            registry.register_worker(conn, worker_id=worker_id, slot="bench", host="bench", pid=1, model=MODEL,
                                  gpu_ids="")
            claimed = queue.claim(conn, worker_id, MODEL, args.results, engine_idle=True, max_attempts=3)
        completions = [Completion(id=r.id, attempt=r.attempt, status_code=200, response=chat_response(i),
                                  prompt_tokens=30, completion_tokens=85) for i, r in enumerate(claimed)]
        groups = [completions[i:i + GROUP_SIZE] for i in range(0, len(completions), GROUP_SIZE)]
        claims = [lambda conn: queue.claim(conn, worker_id, MODEL, CLAIM_SIZE, engine_idle=False,
                                           max_attempts=3)] * 20
        contenders = {
            "claim": {"ours": lambda: measured(db, claims),
                      "baseline": lambda: measured(db, claims, before="DROP INDEX batch_requests_suspects")},
            "store": {"ours": lambda: measured(db, [lambda c, g=g: queue.complete(c, worker_id, g)
                                                    for g in groups]),
                      "baseline": lambda: measured(db, [lambda c, g=g: array_complete(c, worker_id, g)
                                                        for g in groups])},
        }
        print(f"{args.queued} queued requests; claims of {CLAIM_SIZE}; {len(completions)} results stored in "
              f"groups of {GROUP_SIZE}; median of {args.repeats} repeats")
        for name, runs in contenders.items():
            compare(name, runs, args.repeats)
        finish_history(db, 3, args.queued)
        params = {"worker_id": worker_id, "model": MODEL, "last_attempt": 3, "limit": 1}
        one_at_a_time = {"ours": [lambda c: c.execute(queue._CLAIM_ORDINARY, params).all()] * 20,
                         "baseline": [lambda c: c.execute(JOINED_CLAIM, params).all()] * 20}
        print(f"the same queue beside {3 * args.queued} succeeded requests of 3 batches; claims of 1, the statement"
              " alone, its baseline taking the picked rows joined as a table")
        compare("history", {contender: lambda work=work: measured(db, work)
                            for contender, work in one_at_a_time.items()}, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
