"""The `openai-http` engine: one worker drives a pool of OpenAI-compatible servers (vLLM, SGLang
or any server answering /v1/chat/completions, /v1/completions and /v1/embeddings), forwarding
each request as it is and returning the backend's own answer.

- Sharing: `least_busy` (fewest requests in flight; the default), `round_robin` or `random`,
  among healthy backends with room under `max_in_flight_per_backend`. The worker's window is
  the room of the healthy backends, so it claims nothing while none is healthy.
- Health: every `health_interval`, each backend's GET /health and GET /v1/models. A backend is
  `healthy`, `connection_refused`, `connection_error`, `timeout`, `http_<status>`,
  `model_missing` or `hung`, and is re-admitted as soon as a check passes again.
- Failover: a connection error, a timeout, a 5xx or a 429 takes the backend out of rotation at
  once (a check follows within a second) and the request is tried on another healthy backend
  after a backoff, up to `max_attempts` backends; then it goes back to the queue uncharged
  (RETRY_STATUS, see base.py). A 4xx other than 429 is the request's answer, body and all.
- Hung: a backend that fails its health check while holding requests is `hung`; what it holds
  is taken from it and tried elsewhere at once. A request held `request_timeout` without an
  answer is a timeout of that backend.
- Progress (the watchdog's stall check) moves with every answer and every passed health check
  of a backend holding requests, so it stops only when the whole pool is stuck.

All of it runs on an asyncio loop on a thread of its own; the worker's thread only hands
requests over and collects results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx

from ..config import Backend as BackendConfig
from ..config import WorkerSlot
from .base import RETRY_STATUS, EngineProgress, EngineRequest, EngineResult, EngineSpec, error_result

log = logging.getLogger(__name__)

HEALTHY = "healthy"
HEALTH_TIMEOUT = 5.0  # seconds for each health request
RECHECK_AFTER_FAILURE = 1.0  # a failed request brings the next health check this close
CONNECT_TIMEOUT = 10.0
BODY_EXCERPT = 300  # bytes of an error body that go into a log line


@dataclass
class BackendState:
    """What the heartbeat reports of one backend (a row of the `backends` table)."""

    url: str
    state: str = "unknown"
    in_flight: int = 0
    completed: int = 0
    errors: Counter = field(default_factory=Counter)  # by error type
    last_error: str = ""
    checked_at: float | None = None  # time.time() of the last health check


@dataclass
class _Backend:
    config: BackendConfig
    status: BackendState
    attempts: set[asyncio.Task] = field(default_factory=set)  # requests it holds now

    @property
    def url(self) -> str:
        return self.config.url


class _Failure(Exception):
    """One try on one backend failed: `state` is what it says of the backend."""

    def __init__(self, state: str, error_type: str, message: str):
        super().__init__(f"{error_type}: {message}")
        self.state, self.error_type, self.message = state, error_type, message


def pool_slot(spec: EngineSpec) -> WorkerSlot:
    return WorkerSlot(slot="pool", **spec.options)


class OpenAIHttpEngine:
    def __init__(self, spec: EngineSpec):
        self.slot = pool_slot(spec)
        if not self.slot.backends:
            raise ValueError("the openai-http engine needs at least one backend (`backends` in WORKERS, or BACKENDS)")
        self.model_name = spec.served_name
        self._backend_model = spec.model_path  # the name the backends serve it under
        self.progress = EngineProgress()
        self._backends = [_Backend(config, BackendState(config.url)) for config in self.slot.backends]
        self._turns = itertools.count()
        self._results: queue.SimpleQueue[EngineResult] = queue.SimpleQueue()
        self._running: dict[str, concurrent.futures.Future] = {}
        self._capacity = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="backend-pool", daemon=True)
        self._thread.start()
        self._call(self._start()).result()
        healthy = [b.url for b in self._backends if b.status.state == HEALTHY]
        log.info("pool of %d backends for model %s (served as %s), %s; healthy: %s", len(self._backends),
                 self._backend_model, self.model_name, self.slot.strategy, ", ".join(healthy) or "none yet")

    # --- the worker's side (its own thread) ---

    @property
    def max_in_flight(self) -> int:
        return self._capacity

    def add(self, request: EngineRequest) -> EngineResult | None:
        self._running[request.key] = self._call(self._serve(request))
        return None

    def step(self) -> list[EngineResult]:
        results = []
        try:
            results.append(self._results.get(timeout=0.05))
            while True:
                results.append(self._results.get_nowait())
        except queue.Empty:
            pass
        finished = [result for result in results if self._running.pop(result.key, None) is not None]
        for result in finished:
            self.progress.requests_finished += 1
            self.progress.tokens_generated += result.completion_tokens
        return finished

    def abort(self, keys: list[str]) -> None:
        """Cancel the HTTP requests: the backend sees the connection close and stops generating."""
        for key in keys:
            if (running := self._running.pop(key, None)) is not None:
                running.cancel()

    def in_flight(self) -> int:
        return len(self._running)

    def backend_states(self) -> list[BackendState]:
        return [backend.status for backend in self._backends]

    def close(self) -> None:
        self.abort(list(self._running))
        self._call(self._stop()).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _call(self, coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    # --- the pool's loop ---

    async def _start(self) -> None:
        self._client = httpx.AsyncClient(limits=httpx.Limits(max_connections=None, max_keepalive_connections=None))
        self._room = asyncio.Condition()
        await asyncio.gather(*(self._check(backend) for backend in self._backends))
        self._health_task = asyncio.create_task(self._check_periodically())

    async def _stop(self) -> None:
        self._health_task.cancel()
        await self._client.aclose()

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.slot.health_interval)
            await asyncio.gather(*(self._check(backend) for backend in self._backends))

    async def _serve(self, request: EngineRequest) -> None:
        tries = 0
        while True:
            backend = await self._pick()
            if backend is None:
                self._results.put(error_result(request.key, "No backend of the pool is healthy.",
                                               status_code=RETRY_STATUS, error_type="server_error",
                                               code="no_healthy_backend"))
                return
            tries += 1
            try:
                self._results.put(await self._send(backend, request))
                return
            except _Failure as failure:
                self._failed(backend, failure, request, tries)
                last = failure
            if tries >= self.slot.max_attempts:
                self._results.put(error_result(request.key, f"{tries} tries failed, the last on {backend.url} with "
                                               f"{last}", status_code=RETRY_STATUS,
                                               error_type="server_error", code="backends_failed"))
                return
            await asyncio.sleep(min(0.5 * 2 ** (tries - 1), 8.0))

    async def _pick(self) -> _Backend | None:
        """A healthy backend with room, by the strategy; waits while all are full; None when none is healthy."""
        async with self._room:
            while True:
                healthy = [b for b in self._backends if b.status.state == HEALTHY]
                if not healthy:
                    return None
                free = [b for b in healthy if b.status.in_flight < self.slot.max_in_flight_per_backend]
                if free:
                    backend = self._choose(free)
                    backend.status.in_flight += 1
                    return backend
                await self._room.wait()

    def _choose(self, free: list[_Backend]) -> _Backend:
        if self.slot.strategy == "random":
            return random.choice(free)
        if self.slot.strategy == "round_robin":
            return free[next(self._turns) % len(free)]
        return min(free, key=lambda b: (b.status.in_flight, next(self._turns) % len(self._backends)))

    async def _send(self, backend: _Backend, request: EngineRequest) -> EngineResult:
        body = {**request.body, "model": self._backend_model}
        attempt = asyncio.ensure_future(self._client.post(
            backend.url + request.endpoint, json=body, headers=self._headers(backend),
            timeout=httpx.Timeout(self.slot.request_timeout, connect=CONNECT_TIMEOUT)))
        backend.attempts.add(attempt)
        try:
            response = await attempt
        except asyncio.CancelledError:
            if asyncio.current_task().cancelling():
                raise  # aborted by the worker (cancelled batch, shutdown)
            raise _Failure("hung", "Hung", "the backend stopped answering its health check while holding "
                                            "this request") from None
        except httpx.TimeoutException as exc:
            raise _Failure("timeout", type(exc).__name__, f"no answer after {self.slot.request_timeout:.0f} s") from None
        except httpx.ConnectError as exc:
            raise _Failure("connection_refused", type(exc).__name__, _message(exc)) from None
        except httpx.HTTPError as exc:
            raise _Failure("connection_error", type(exc).__name__, _message(exc)) from None
        finally:
            backend.attempts.discard(attempt)
            backend.status.in_flight -= 1
            async with self._room:
                self._room.notify_all()
        if response.status_code >= 500 or response.status_code == 429:
            raise _Failure(f"http_{response.status_code}", f"HTTP {response.status_code}",
                           response.text[:BODY_EXCERPT] or "(empty body)")
        backend.status.completed += 1
        self.progress.steps += 1
        return self._result(request.key, response)

    def _result(self, key: str, response: httpx.Response) -> EngineResult:
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error_result(key, f"The backend answered {response.status_code} with a body that is not a JSON "
                                     f"object: {response.text[:BODY_EXCERPT]}", status_code=502,
                                error_type="server_error", code="bad_backend_response")
        if response.status_code != 200:
            return EngineResult(key, response.status_code, body)  # the backend's own error, as it sent it
        if "model" in body:
            body["model"] = self.model_name
        usage = body.get("usage") or {}
        return EngineResult(key, 200, body, prompt_tokens=int(usage.get("prompt_tokens") or 0),
                            completion_tokens=int(usage.get("completion_tokens") or 0))

    def _failed(self, backend: _Backend, failure: _Failure, request: EngineRequest, tries: int) -> None:
        status = backend.status
        status.errors[failure.error_type] += 1
        status.last_error = str(failure)
        log.warning("backend %s failed request %s (custom_id %s), try %d of %d: %s", backend.url, request.key,
                    request.custom_id, tries, self.slot.max_attempts, failure)
        if status.state == HEALTHY:
            self._set_state(backend, failure.state, str(failure))
            self._loop.call_later(RECHECK_AFTER_FAILURE, lambda: asyncio.ensure_future(self._check(backend)))

    async def _check(self, backend: _Backend) -> None:
        try:
            health = await self._client.get(backend.url + "/health", timeout=HEALTH_TIMEOUT)
            if health.status_code != 200:
                raise _Failure(f"http_{health.status_code}", f"HTTP {health.status_code}",
                               f"GET /health: {health.text[:BODY_EXCERPT] or '(empty body)'}")
            models = await self._client.get(backend.url + "/v1/models", headers=self._headers(backend),
                                            timeout=HEALTH_TIMEOUT)
            if models.status_code != 200:
                raise _Failure(f"http_{models.status_code}", f"HTTP {models.status_code}",
                               f"GET /v1/models: {models.text[:BODY_EXCERPT] or '(empty body)'}")
            served = _model_ids(models)
            if self._backend_model not in served:
                raise _Failure("model_missing", "ModelMissing", f"it serves {', '.join(served) or 'no model'}, "
                                                                 f"not {self._backend_model}")
        except _Failure as failure:
            self._set_state(backend, failure.state, str(failure))
        except httpx.TimeoutException as exc:
            state = "hung" if backend.attempts else "timeout"
            self._set_state(backend, state, f"{type(exc).__name__}: no answer to GET /health within "
                                            f"{HEALTH_TIMEOUT:.0f} s")
        except httpx.ConnectError as exc:
            self._set_state(backend, "connection_refused", f"{type(exc).__name__}: {_message(exc)}")
        except httpx.HTTPError as exc:
            self._set_state(backend, "connection_error", f"{type(exc).__name__}: {_message(exc)}")
        else:
            if backend.attempts:
                self.progress.steps += 1  # it holds requests and answers: the pool is not stuck
            self._set_state(backend, HEALTHY, "")
        finally:
            backend.status.checked_at = time.time()

    def _set_state(self, backend: _Backend, state: str, detail: str) -> None:
        status = backend.status
        if state != status.state:
            if state == HEALTHY:
                log.info("backend %s is healthy%s", backend.url, "" if status.state == "unknown" else " again: re-admitted")
            else:
                log.warning("backend %s is %s: %s", backend.url, state, detail)
            status.state = state
            self._capacity = sum(self.slot.max_in_flight_per_backend for b in self._backends
                                 if b.status.state == HEALTHY)
            asyncio.ensure_future(self._wake_pickers())
        if detail:
            status.last_error = detail
        if state == "hung":
            for attempt in list(backend.attempts):  # tried elsewhere at once (see _send)
                attempt.cancel()

    async def _wake_pickers(self) -> None:
        async with self._room:
            self._room.notify_all()

    def _headers(self, backend: _Backend) -> dict[str, str]:
        key = backend.config.api_key or self.slot.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


def _message(exc: BaseException) -> str:
    """Never empty: httpx errors often carry no text, and `repr` of their cause says what happened."""
    text = str(exc).strip()
    if text:
        return text
    cause = exc.__cause__ or exc.__context__
    return (str(cause).strip() or repr(cause)) if cause is not None else "(no message from the connection)"


def _model_ids(response: httpx.Response) -> list[str]:
    try:
        return [str(item.get("id")) for item in response.json().get("data", []) if isinstance(item, dict)]
    except (ValueError, AttributeError):
        return []


def served_models(backends: list[BackendConfig], api_key: str = "") -> dict[str, list[BackendConfig]]:
    """{model id: the backends serving it} from each backend's GET /v1/models; backends that do
    not answer are left out (the caller retries while none does)."""
    models: dict[str, list[BackendConfig]] = {}
    with httpx.Client(timeout=HEALTH_TIMEOUT) as client:
        for backend in backends:
            key = backend.api_key or api_key
            try:
                response = client.get(backend.url + "/v1/models",
                                      headers={"Authorization": f"Bearer {key}"} if key else {})
                response.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("backend %s does not list its models: %s: %s", backend.url, type(exc).__name__,
                            _message(exc))
                continue
            for model in _model_ids(response):
                models.setdefault(model, []).append(backend)
    return models

