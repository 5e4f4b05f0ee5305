"""A worker simulated by calling the queue protocol functions as a real worker does: for tests
that need requests in a precise state (claimed, part done) without an engine."""

from __future__ import annotations

import uuid

from core.batch_app.domain import queue, registry
from core.batch_app.domain.queue import Completion


def new_worker(db, model: str) -> str:
    worker_id = str(uuid.uuid4())
    with db.begin() as conn:
        registry.register_worker(conn, worker_id=worker_id, slot="q", host="test", pid=1, model=model, gpu_ids="")
    return worker_id


def claim(db, worker_id: str, model: str, limit: int, idle: bool = True, max_attempts: int = 3):
    with db.begin() as conn:
        return queue.claim(conn, worker_id, model, limit, engine_idle=idle, max_attempts=max_attempts)


def answer(request, text: str = "ok") -> Completion:
    return Completion(id=request.id, attempt=request.attempt, status_code=200,
                      response={"object": "chat.completion", "text": text}, prompt_tokens=3, completion_tokens=2)


def complete(db, worker_id: str, completions: list[Completion]) -> dict[int, str]:
    with db.begin() as conn:
        return queue.complete(conn, worker_id, completions)
