"""The engine interface a worker drives: add requests, step, collect finished results.

A step-based interface (rather than one call per request) is what lets the worker keep the
engine's in-flight window full: new requests join while others are still generating.

Failures, and who pays for them:
- a request the engine refuses (bad parameters, too long a prompt) ends with its own error
  result (4xx status): a final answer, written to the batch's error file;
- a request the engine's backend could not serve this time (a remote server refused the
  connection, timed out or answered 5xx or 429) is never failed for the user: the engine
  retries it itself (on another server), or returns a result with status `RETRY_STATUS`,
  which the worker hands back to the queue without charging the request an attempt;
- `add` or `step` raises only when the engine itself is broken (its model or device is gone).
  That ends the worker; the watchdog restarts it, and every request it held counts one attempt,
  so one that keeps breaking engines ends as a poison request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class EngineRequest:
    key: str  # unique among the engine's in-flight requests
    endpoint: str  # "/v1/chat/completions", "/v1/completions" or "/v1/embeddings"
    body: dict[str, Any]
    custom_id: str = ""  # the user's, for log lines


# A result with this status was not served: the worker queues the request again, uncharged.
RETRY_STATUS = 503


@dataclass
class EngineResult:
    key: str
    status_code: int  # 200; a 4xx when the engine refused this one request; RETRY_STATUS: not served
    body: dict[str, Any]  # the OpenAI response body, or {"error": {...}} for a rejection
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class EngineProgress:
    """Counters the heartbeat reports, so a hung engine is told apart from a busy one."""

    requests_finished: int = 0
    tokens_generated: int = 0
    # Engine iterations that returned: it advances on every step however long the requests
    # are, and freezes when the engine hangs, which is what the stall check watches.
    steps: int = 0


class Engine(Protocol):
    model_name: str
    # How many requests the worker keeps in flight; at least the scheduler's batch size.
    max_in_flight: int
    progress: EngineProgress

    def add(self, request: EngineRequest) -> EngineResult | None:
        """Start a request; a request rejected up front returns its error result at once."""

    def step(self) -> list[EngineResult]:
        """Advance generation once and return the requests that finished."""

    def abort(self, keys: list[str]) -> None:
        """Drop in-flight requests (cancelled batches, shutdown); no result is returned for them."""

    def in_flight(self) -> int:
        """Sequences in flight, which the worker's window counts: a request that fans out (`n`
        choices, a list of prompts) counts once per sequence."""

    def close(self) -> None: ...

    # An engine that sends requests to servers (openai_http.py) also has `backend_states()`:
    # their health, which the heartbeat records. `max_in_flight` is then the room of its healthy
    # servers, and 0 while none is healthy. An engine may also say from how many free places on
    # the worker claims again (`refill_at`; a quarter of the window otherwise).


def error_result(key: str, message: str, *, code: str | None = None, param: str | None = None,
                 status_code: int = 400, error_type: str = "invalid_request_error") -> EngineResult:
    return EngineResult(
        key=key,
        status_code=status_code,
        body={"error": {"message": message, "type": error_type, "param": param, "code": code}},
    )


@dataclass
class EngineSpec:
    """What a worker needs to build its engine; GPU-only options are passed through untouched."""

    kind: str  # "vllm", "openai-http" (a pool of servers), or "package.module:Class"
    model_path: str
    served_name: str
    runner: str = "generate"  # "generate" or "pooling"
    max_model_len: int | None = None
    max_in_flight: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
