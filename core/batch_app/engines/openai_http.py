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
  after a backoff, up to `max_attempts` tries; then it goes back to the queue uncharged
  (RETRY_STATUS, see base.py), unless every try was answered with a 5xx: that is its answer
  (502). A 4xx other than 429 is the request's answer, body and all.
- Hung: a backend that fails two health checks in a row while holding requests (`hung` when
  they timed out) has what it holds taken from it, and tried elsewhere at once. A request held `request_timeout` without an
  answer is a timeout of that backend. A request whose every try was lost by a server that
  went away under it (`max_attempts` of them) may be what kills them: it ends `poison_request`.
- Size: an answer longer than BACKEND_MAX_REPLY_BYTES is read no further and is that request's
  error (`response_too_large`), never held whole.
- Shared servers (`interactive_traffic`): each backend's room is its batch allowance, set from
  its /metrics (or without them, from the pool's own answers' latency) by batch_allowance.py;
  what it holds past a cut is taken back and tried again, uncharged. `batch_priority` is sent
  as each request's `priority`.
- Progress (the watchdog's stall check) moves with every answer and every health check of a
  backend holding requests, passed or failed: servers that are down or stopped are judged by
  those checks (and, when managed, by their own slots), and what they hold is taken back, so
  the pool worker and its requests are not charged for them. It stops only when the pool's own
  loop does.

All of it runs on an asyncio loop on a thread of its own, with an aiohttp session per backend
(httpx cost ten times the CPU per request at hundreds in flight: docs/benchmarks.md); the
worker's thread only hands requests over and collects results.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import json
import logging
import queue
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
import httpx

from ..config import Backend as BackendConfig
from ..config import WorkerSlot, get_settings
from ..domain.batch_format import RESPONSES
from ..server_keys import server_key
from .base import RETRY_STATUS, EngineProgress, EngineRequest, EngineResult, EngineSpec, error_result
from .batch_allowance import BatchAllowance, read_metrics

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
    allowance: int | None = None  # batch requests it may hold, on servers shared with interactive traffic
    allowance_reason: str = ""


@dataclass
class _Backend:
    config: BackendConfig
    status: BackendState
    attempts: dict[asyncio.Task, None] = field(default_factory=dict)  # requests it holds now, oldest first
    taken: set[asyncio.Task] = field(default_factory=set)  # of those, cancelled to be tried elsewhere
    yielded: set[asyncio.Task] = field(default_factory=set)  # of those, taken back past its allowance
    allowance: BatchAllowance | None = None
    held_peak: int = 0  # the most it held since the last reading of its load
    posts_ended: int = 0  # requests sent to it that have ended (answered, failed or taken back)
    failed_checks: int = 0  # health checks failed in a row
    session: aiohttp.ClientSession | None = None  # its own connection pool, unbounded: `_pick` bounds it
    headers: dict[str, str] = field(default_factory=dict)  # its key

    @property
    def url(self) -> str:
        return self.config.url


@dataclass(frozen=True)
class _Answer:
    status: int
    content: bytes

    def excerpt(self) -> str:
        """The start of the body, for a log line or the database (which refuses NUL)."""
        return _printable(self.content[:BODY_EXCERPT].decode("utf-8", "replace"))


class _TooLarge(Exception):
    """A backend's answer ran past BACKEND_MAX_REPLY_BYTES (it was read no further)."""


class _Yielded(Exception):
    """A request taken back from a backend whose batch allowance fell: tried again, uncharged."""


class _Failure(Exception):
    """One try on one backend failed: `state` is what it says of the backend; `server_error` that
    the backend answered it with a 5xx (rather than not answering, or a 429: busy); `lost` that
    the backend held it and went away (its connection broke, or it was taken from a hung one)."""

    def __init__(self, state: str, error_type: str, message: str, server_error: bool = False, lost: bool = False):
        super().__init__(f"{error_type}: {message}")
        self.state, self.error_type, self.server_error, self.lost = state, error_type, server_error, lost


def pool_slot(spec: EngineSpec) -> WorkerSlot:
    return WorkerSlot(slot="pool", **spec.options)


class OpenAIHttpEngine:
    def __init__(self, spec: EngineSpec):
        self.slot = pool_slot(spec)
        if not self.slot.backends:
            raise ValueError("the openai-http engine needs at least one backend (`backends` in WORKERS, or BACKENDS)")
        self.model_name = spec.served_name
        self._backend_model = spec.model_path  # the name the backends serve it under
        settings = get_settings()
        self._max_reply = settings.backend_max_reply_bytes
        self.progress = EngineProgress()
        self._backends = [_Backend(config, BackendState(config.url), headers=self._headers(config, settings.data_dir))
                          for config in self.slot.backends]
        if self.slot.interactive_traffic:
            for backend in self._backends:
                backend.allowance = BatchAllowance(
                    ceiling=self.slot.max_in_flight_per_backend, floor=self.slot.min_batch_in_flight,
                    ttft_target=self.slot.interactive_ttft_target, quiet_seconds=self.slot.interactive_quiet_seconds,
                    latency_slack=self.slot.latency_slack)
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

    @property
    def refill_at(self) -> int:
        """A server's throughput follows the requests it holds at every moment, and it has no
        queue of its own here: claim again after a few finish, not after a quarter of the window."""
        return max(1, self._capacity // 16)

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
        for backend in self._backends:
            if backend.allowance is not None:  # as the heartbeat reports it
                backend.status.allowance, backend.status.allowance_reason = backend.allowance.value, \
                    backend.allowance.reason
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
        for backend in self._backends:
            backend.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self._room = asyncio.Condition()
        await asyncio.gather(*(self._check(backend) for backend in self._backends))
        self._tasks = [asyncio.create_task(self._check_periodically())]
        self._tasks += [asyncio.create_task(self._steer_periodically(backend))
                        for backend in self._backends if backend.allowance is not None]

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for backend in self._backends:
            await backend.session.close()

    async def _check_periodically(self) -> None:
        while True:
            await asyncio.sleep(self.slot.health_interval)
            await asyncio.gather(*(self._check(backend) for backend in self._backends))

    async def _serve(self, request: EngineRequest) -> None:
        try:
            await self._serve_on_backends(request)
        except asyncio.CancelledError:
            raise  # aborted by the worker: no result
        except Exception as exc:  # a bug must not lose the request: the queue has it again
            log.error("the pool failed request %s (custom_id %s): %s: %s", request.key, request.custom_id,
                      type(exc).__name__, exc, exc_info=exc)
            self._results.put(error_result(request.key, f"The pool failed it: {type(exc).__name__}: {exc}",
                                           status_code=502, error_type="server_error", code="pool_error"))

    async def _serve_on_backends(self, request: EngineRequest) -> None:
        tries, server_errors, lost = 0, 0, 0
        failed_on: set[str] = set()  # URLs of the backends this request failed on
        while True:
            # A retry waits a little for a backend to be re-admitted: with a single backend, one
            # failure must not send the request straight back to the queue.
            backend = await self._pick(patience=3 * RECHECK_AFTER_FAILURE if tries else 0.0, avoid=failed_on)
            if backend is None:
                self._results.put(error_result(request.key, "No backend of the pool is healthy.",
                                               status_code=RETRY_STATUS, error_type="server_error",
                                               code="no_healthy_backend"))
                return
            tries += 1
            try:
                self._results.put(await self._send(backend, request))
                return
            except _Yielded:
                tries -= 1  # not a failure of anyone's: it waits for room again
                continue
            except _Failure as failure:
                self._failed(backend, failure, request, tries)
                failed_on.add(backend.url)
                last = failure
                server_errors += failure.server_error
                lost += failure.lost
            if lost >= self.slot.max_attempts:
                # Every server it was in flight on went away under it: it may be what kills them.
                self._results.put(error_result(
                    request.key, f"This request was in flight on {lost} servers that failed while holding it "
                                 f"(the last {backend.url}: {last}); it is not retried again.",
                    status_code=500, error_type="server_error", code="poison_request"))
                return
            if tries >= self.slot.max_attempts:
                # Backends that answered every try with a 5xx refuse this request: that is its
                # answer. Any try that found a backend down or busy: back to the queue.
                gave_up = server_errors == tries
                self._results.put(error_result(
                    request.key, f"{tries} tries failed, the last on {backend.url} with {last}",
                    status_code=502 if gave_up else RETRY_STATUS, error_type="server_error",
                    code="backend_error" if gave_up else "backends_failed"))
                return
            await asyncio.sleep(min(0.5 * 2 ** (tries - 1), 8.0))

    async def _pick(self, patience: float, avoid: set[str] = frozenset()) -> _Backend | None:
        """A healthy backend with room, by the strategy, and while any healthy one is not in `avoid`
        (URLs of those that failed this request) one of those; waits while they are full, and up
        to `patience` seconds while none is healthy (a backend that just failed is checked again
        within RECHECK_AFTER_FAILURE); then None. Without `avoid`, a server that fails fast (a vLLM
        draining on SIGTERM answers 500 to new requests and 200 to /health) would draw the
        retries, having room when the others are full."""
        deadline = time.monotonic() + patience
        async with self._room:
            while True:
                healthy = [b for b in self._backends if b.status.state == HEALTHY]
                untried = [b for b in healthy if b.url not in avoid]
                free = [b for b in untried or healthy if b.status.in_flight < self._room_of(b)]
                if free:
                    backend = self._choose(free)
                    backend.status.in_flight += 1
                    backend.held_peak = max(backend.held_peak, backend.status.in_flight)
                    return backend
                if healthy:
                    await self._room.wait()
                    continue
                if (left := deadline - time.monotonic()) <= 0:
                    return None
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._room.wait(), left)

    def _choose(self, free: list[_Backend]) -> _Backend:
        if self.slot.strategy == "random":
            return random.choice(free)
        if self.slot.strategy == "round_robin":
            return free[next(self._turns) % len(free)]
        return min(free, key=lambda b: (b.status.in_flight, next(self._turns) % len(self._backends)))

    def _room_of(self, backend: _Backend) -> int:
        return backend.allowance.value if backend.allowance is not None else self.slot.max_in_flight_per_backend

    async def _send(self, backend: _Backend, request: EngineRequest) -> EngineResult:
        body = {**request.body, "model": self._backend_model}
        if self.slot.batch_priority is not None:
            body["priority"] = self.slot.batch_priority  # behind interactive requests (priority 0)
        if request.endpoint == RESPONSES:
            body.setdefault("store", False)  # vLLM stores a response unless told not to; no batch reads it back
        attempt = asyncio.ensure_future(self._fetch(backend, "POST", request.endpoint, self.slot.request_timeout,
                                                    json=body))
        backend.attempts[attempt] = None
        sent_at = time.monotonic()
        try:
            response = await attempt
        except _TooLarge:
            return error_result(request.key, f"The answer to this request is larger than {self._max_reply} bytes "
                                             "(BACKEND_MAX_REPLY_BYTES); ask for less (max_tokens, n, logprobs).",
                                status_code=502, error_type="server_error", code="response_too_large")
        except asyncio.CancelledError:
            if attempt in backend.yielded:
                raise _Yielded() from None
            if attempt not in backend.taken:
                raise  # aborted by the worker (cancelled batch, shutdown): the connection closes
            raise _Failure(backend.status.state, "Hung", "taken from the backend, which failed its health check "
                                                         "while holding this request", lost=True) from None
        finally:
            backend.attempts.pop(attempt, None)
            backend.taken.discard(attempt)
            backend.yielded.discard(attempt)
            backend.status.in_flight -= 1
            backend.posts_ended += 1
            async with self._room:
                self._room.notify_all()
        self.progress.steps += 1  # an answer, even an error: this backend is not stuck
        if response.status >= 500 or response.status == 429:
            raise _Failure(f"http_{response.status}", f"HTTP {response.status}", response.excerpt() or "(empty body)",
                           server_error=response.status >= 500)
        backend.status.completed += 1
        result = self._result(request.key, response)
        if backend.allowance is not None and response.status == 200:
            backend.allowance.answered(time.monotonic() - sent_at, result.completion_tokens)
        return result

    async def _fetch(self, backend: _Backend, method: str, path: str, timeout: float, **options) -> _Answer:
        """One HTTP exchange with a backend; a failure to get an answer is a `_Failure` saying why."""
        try:
            async with backend.session.request(
                    method, backend.url + path, headers=backend.headers,
                    timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT), **options) as response:
                return _Answer(response.status, await self._read(response))
        except TimeoutError as exc:  # aiohttp's own timeouts are TimeoutErrors too
            raise _Failure("timeout", type(exc).__name__, f"no answer to {method} {path} within {timeout:.0f} s") \
                from None
        except aiohttp.ClientConnectorError as exc:
            raise _Failure("connection_refused", type(exc).__name__, _message(exc)) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise _Failure("connection_error", type(exc).__name__, _message(exc), lost=True) from None

    async def _read(self, response: aiohttp.ClientResponse) -> bytes:
        """The body, read no further than BACKEND_MAX_REPLY_BYTES."""
        if (response.content_length or 0) > self._max_reply:
            raise _TooLarge()
        body = bytearray()
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > self._max_reply:
                raise _TooLarge()
        return bytes(body)

    def _result(self, key: str, response: _Answer) -> EngineResult:
        try:
            body = json.loads(response.content)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return error_result(key, f"The backend answered {response.status} with a body that is not a JSON "
                                     f"object: {response.excerpt()}", status_code=502,
                                error_type="server_error", code="bad_backend_response")
        if response.status != 200:
            if not isinstance(body.get("error"), dict):  # the OpenAI shape, whatever the backend sent
                body = {"error": {"message": json.dumps(body)[:1000], "type": "invalid_request_error",
                                  "param": None, "code": None}}
            return EngineResult(key, response.status, body)  # the backend's own error
        if "model" in body:
            body["model"] = self.model_name
        usage = body.get("usage") if isinstance(body.get("usage"), dict) else {}
        # Chat, completions and embeddings count prompt/completion tokens; a Responses answer input/output.
        return EngineResult(key, 200, body, prompt_tokens=_count(usage.get("prompt_tokens", usage.get("input_tokens"))),
                            completion_tokens=_count(usage.get("completion_tokens", usage.get("output_tokens"))))

    async def _steer_periodically(self, backend: _Backend) -> None:
        while True:
            await asyncio.sleep(self.slot.metrics_interval)
            try:
                await self._steer(backend)
            except Exception as exc:  # nothing may end the steering: the allowance would freeze
                log.error("reading the load of backend %s failed: %s: %s", backend.url, type(exc).__name__, exc,
                          exc_info=exc)

    async def _steer(self, backend: _Backend) -> None:
        """Set the backend's batch allowance from its /metrics (or, without them, from the pool's
        own answers), and take back at once what it holds past a cut."""
        reading = None
        with contextlib.suppress(_Failure, _TooLarge):
            answer = await self._fetch(backend, "GET", "/metrics", HEALTH_TIMEOUT)
            reading = read_metrics(answer.content.decode("utf-8", "replace")) if answer.status == 200 else None
        allowance, before = backend.allowance, backend.allowance.value
        # A server's counts are those of its last step, before it finished what that step ended
        # (whose answers may have reached the pool already): what the pool held at most since
        # the last reading is what the server may still count as its.
        held, backend.held_peak = max(backend.held_peak, backend.status.in_flight), backend.status.in_flight
        if reading is not None:
            allowance.after_reading(reading, ours_in_flight=held, ours_ended=backend.posts_ended, now=time.monotonic())
        else:
            allowance.after_latencies(time.monotonic())
        if allowance.value == before:
            return
        if allowance.value < before:
            log.info("backend %s: batch allowance %d -> %d (%s)", backend.url, before, allowance.value, allowance.reason)
            # The oldest are kept: they have done the most work.
            oldest_first = [task for task in backend.attempts if task not in backend.taken and task not in backend.yielded]
            for attempt in oldest_first[allowance.value:]:
                backend.yielded.add(attempt)
                attempt.cancel()
        self._capacity = self._healthy_room()
        await self._wake_pickers()

    def _healthy_room(self) -> int:
        return sum(self._room_of(b) for b in self._backends if b.status.state == HEALTHY)

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
            for path in ("/health", "/v1/models"):
                answer = await self._fetch(backend, "GET", path, HEALTH_TIMEOUT)
                if answer.status != 200:
                    raise _Failure(f"http_{answer.status}", f"HTTP {answer.status}",
                                   f"GET {path}: {answer.excerpt() or '(empty body)'}")
            served = _model_ids(answer.content)
            if self._backend_model not in served:
                raise _Failure("model_missing", "ModelMissing", f"it serves {', '.join(served) or 'no model'}, "
                                                                 f"not {self._backend_model}")
        except _Failure as failure:
            self._check_failed(backend, failure.state, str(failure))
        except _TooLarge:
            self._check_failed(backend, "reply_too_large", f"an answer to a health check past {self._max_reply} bytes")
        except Exception as exc:  # nothing may end health checking: it is what re-admits backends
            log.error("health check of backend %s failed: %s: %s", backend.url, type(exc).__name__, exc, exc_info=exc)
        else:
            backend.failed_checks = 0
            self._set_state(backend, HEALTHY, "")
        finally:
            backend.status.checked_at = time.time()
            if backend.attempts:
                self.progress.steps += 1  # the pool judged a backend holding requests: it is not stuck

    def _check_failed(self, backend: _Backend, state: str, detail: str) -> None:
        """Out of rotation; what it holds is tried elsewhere once two checks in a row failed (one
        slow answer from a loaded server costs nothing), and then a timeout means `hung`."""
        backend.failed_checks += 1
        if backend.attempts and backend.failed_checks >= 2:
            if state == "timeout":
                state = "hung"
            backend.taken |= set(backend.attempts)
            for attempt in list(backend.attempts):  # tried elsewhere at once (see _send)
                attempt.cancel()
        self._set_state(backend, state, detail)

    def _set_state(self, backend: _Backend, state: str, detail: str) -> None:
        status = backend.status
        if state != status.state:
            if state == HEALTHY:
                log.info("backend %s is healthy%s", backend.url, "" if status.state == "unknown" else " again: re-admitted")
            else:
                log.warning("backend %s is %s: %s", backend.url, state, detail)
            status.state = state
            self._capacity = self._healthy_room()
            asyncio.ensure_future(self._wake_pickers())
        if detail:
            status.last_error = detail

    async def _wake_pickers(self) -> None:
        async with self._room:
            self._room.notify_all()

    def _headers(self, config: BackendConfig, data_dir) -> dict[str, str]:
        """The backend's key: a managed server's own (server_keys.py), else the configured one."""
        key = server_key(data_dir, urlsplit(config.url).port) if config.managed else config.api_key or self.slot.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


def _message(exc: BaseException) -> str:
    """Never empty: connection errors often carry no text, and `repr` of their cause says what happened."""
    text = str(exc).strip()
    if text:
        return text
    cause = exc.__cause__ or exc.__context__
    return (str(cause).strip() or repr(cause)) if cause is not None else "(no message from the connection)"


def _model_ids(content: bytes) -> list[str]:
    """The ids of an OpenAI model list."""
    try:
        return [str(item.get("id")) for item in json.loads(content).get("data") or [] if isinstance(item, dict)]
    except (ValueError, AttributeError, TypeError):
        return []


def _count(value) -> int:
    """A token count from a backend's `usage`, 0 when it is missing or not a number."""
    return int(value) if isinstance(value, (int, float)) and value >= 0 else 0


def _printable(text: str) -> str:
    """Backend text for a log line or the database (which refuses NUL)."""
    return text.replace("\x00", "")


def served_models(backends: list[BackendConfig], api_key: str = "") -> tuple[dict[str, list[BackendConfig]], list]:
    """({model id: the backends serving it}, the backends that did not answer) from each
    backend's GET /v1/models."""
    models: dict[str, list[BackendConfig]] = {}
    silent: list[BackendConfig] = []
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
                silent.append(backend)
                continue
            for model in _model_ids(response.content):
                models.setdefault(model, []).append(backend)
    return models, silent

