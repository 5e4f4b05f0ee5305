"""Test-only engines, loaded by real worker processes through ENGINE=tests.engines:Class.

They stand in for vLLM where a test needs a behaviour vLLM cannot be made to show on demand:
an engine that hangs while the heartbeat thread keeps beating, or an input that kills the worker.
"""

from __future__ import annotations

import os
import time

from core.batch_app.engines.base import EngineProgress, EngineRequest, EngineResult, EngineSpec, error_result


class EchoEngine:
    """Answers each chat request with its last message after `ECHO_STEP_SECONDS`, a few per step."""

    def __init__(self, spec: EngineSpec):
        self.model_name = spec.served_name
        self.max_in_flight = spec.max_in_flight or 8
        self.progress = EngineProgress()
        self.step_seconds = float(os.environ.get("ECHO_STEP_SECONDS", "0.05"))
        self.per_step: int | None = 4  # requests answered a step (None: all it holds)
        self._pending: dict[str, EngineRequest] = {}
        # Like vLLM and its C++ kernels, write past `logging`: the worker's log must stamp these too.
        print(f"echo engine ready for {self.model_name}", flush=True)
        os.write(2, b"echo engine: a raw write on file descriptor 2\n")

    def add(self, request: EngineRequest) -> EngineResult | None:
        self._pending[request.key] = request
        return None

    def step(self) -> list[EngineResult]:
        if self.step_seconds:
            time.sleep(self.step_seconds)
        finished = [self._pending.pop(key) for key in list(self._pending)[:self.per_step]]
        self.progress.steps += 1
        self.progress.requests_finished += len(finished)
        self.progress.tokens_generated += len(finished)
        return [self._answer(request) for request in finished]

    def _answer(self, request: EngineRequest) -> EngineResult:
        text = str(request.body.get("messages", [{}])[-1].get("content", ""))
        body = {"object": "chat.completion", "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        return EngineResult(request.key, 200, body, 1, 1)

    def abort(self, keys: list[str]) -> None:
        for key in keys:
            self._pending.pop(key, None)

    def in_flight(self) -> int:
        return len(self._pending)

    def close(self) -> None:
        pass


class InstantEngine(EchoEngine):
    """Answers every request it holds at its next step, with no wait: what is left of a batch's
    time is the queue's own (bench/queue_ceiling.py)."""

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        self.max_in_flight = spec.max_in_flight or 1024
        self.step_seconds, self.per_step = 0.0, None


class SignalBreaksLoadEngine(EchoEngine):
    """Loads for up to a minute and turns whatever interrupts it into a failure of its own, as a
    library's half-initialised module may when the stop signal's exception lands in an import."""

    def __init__(self, spec: EngineSpec):
        print("slow load begins", flush=True)
        try:
            time.sleep(60)
        except BaseException as exc:
            raise RecursionError("maximum recursion depth exceeded") from exc
        super().__init__(spec)


class HangingEngine(EchoEngine):
    """Blocks forever in its first step that holds a request: the heartbeat thread keeps beating."""

    def step(self) -> list[EngineResult]:
        while self._pending:
            time.sleep(3600)
        return []


class PoisonEngine(EchoEngine):
    """Kills its own process when a request's message says 'poison', as a crashing kernel would."""

    def add(self, request: EngineRequest) -> EngineResult | None:
        if "poison" in str(request.body.get("messages")):
            os._exit(139)
        return super().add(request)


class FlakyEngine(EchoEngine):
    """Refuses a request whose message says 'flaky' the first time it sees its custom_id, as a
    transient failure would, and answers it the next time."""

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        self._refused: set[str] = set()

    def add(self, request: EngineRequest) -> EngineResult | None:
        if "flaky" in str(request.body.get("messages")) and request.custom_id not in self._refused:
            self._refused.add(request.custom_id)
            return error_result(request.key, "A transient failure.", status_code=500, error_type="server_error")
        return super().add(request)


class FullDiskEngine(EchoEngine):
    """Echoes, and makes the first FAIL_FINALIZING builds of a batch's files in this worker fail as
    a full disk would, to show the result writer survives a failure at finalizing."""

    def __init__(self, spec: EngineSpec):
        super().__init__(spec)
        from core.batch_app.domain import finalize

        build, failures = finalize._build_files, [int(os.environ.get("FAIL_FINALIZING", "1"))]

        def failing_build(conn, batch_id: str):
            if failures[0] > 0:
                failures[0] -= 1
                raise OSError(28, "No space left on device")
            return build(conn, batch_id)

        finalize._build_files = failing_build
