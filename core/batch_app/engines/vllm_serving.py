"""vLLM's own OpenAI serving classes (the code `vllm serve` and `vllm run-batch` run) on the
in-process engine, for the request lines the engine's fast path does not answer itself: tools and
tool choice, tool and assistant-with-tool-calls messages, reasoning parsers, `echo` and `suffix`,
non-text content, and anything else `vllm serve` accepts.

The serving coroutines run on an asyncio loop on a thread of their own. They check the request,
render the prompt and build the answer exactly as the server does; the one thing they cannot do
here is drive the engine, which belongs to the worker's thread. So their engine client queues
each engine request, the worker's step loop adds it to the engine (`add_calls`) and hands its
final output back (`settle`), and the answer comes out of `answers`.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..domain.batch_format import CHAT_COMPLETIONS, RESPONSES
from . import responses
from .base import EngineProgress, EngineResult

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput
    from vllm.v1.engine.llm_engine import LLMEngine

log = logging.getLogger(__name__)

# The request a serving coroutine works for: its engine calls are tagged with it, so that
# aborting the request also aborts them.
_KEY: contextvars.ContextVar[str] = contextvars.ContextVar("batch_request_key")


# The options a slot's `engine_options` may hold beside LLM(...)'s, with `vllm serve`'s names.
SERVE_OPTIONS = ("tool_call_parser", "enable_auto_tool_choice", "reasoning_parser", "chat_template",
                 "chat_template_content_format")


@dataclass(frozen=True)
class ServeOptions:
    """A worker slot's `vllm serve` options for answering requests (not for loading the model)."""

    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    reasoning_parser: str | None = None
    chat_template: str | None = None  # a template, or a file holding one, as for `vllm serve`
    chat_template_content_format: str = "auto"

    @property
    def fast_chat(self) -> bool:
        """Whether chat requests without tools may take the engine's fast path: it renders with
        the model's own template, content as one string, and has no reasoning to separate."""
        return (self.reasoning_parser is None and self.chat_template is None
                and self.chat_template_content_format in ("auto", "string"))


@dataclass
class EngineCall:
    """One engine request a serving coroutine is waiting on."""

    key: str
    request_id: str
    prompt: Any
    params: Any
    priority: int
    reasoning: dict[str, Any]
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class Answer:
    key: str
    status_code: int
    body: dict[str, Any]


class _StepLoopClient:
    """The engine client vLLM's serving classes call: the engine's configuration and renderer,
    and `generate`, which waits for the worker's step loop instead of driving an engine."""

    errored = False
    is_running = True
    is_stopped = False
    dead_error = RuntimeError("the engine is not running")

    def __init__(self, engine: LLMEngine, loop: asyncio.AbstractEventLoop, calls: queue.SimpleQueue,
                 wake: threading.Event) -> None:
        self.vllm_config = engine.vllm_config
        self.model_config = engine.model_config
        self.renderer = engine.renderer
        self.input_processor = engine.input_processor
        self._loop, self._calls, self._wake = loop, calls, wake

    def check_admission(self, n: int = 1) -> None:
        """The worker's window admits requests, before they reach the engine."""

    async def get_supported_tasks(self) -> tuple[str, ...]:
        return ("generate",)

    async def generate(self, prompt, sampling_params, request_id, *, priority: int = 0,
                       reasoning_ended: bool | None = None, reasoning_parser_kwargs: dict | None = None,
                       **_: Any):
        future = self._loop.create_future()
        reasoning = {name: value for name, value in (("reasoning_ended", reasoning_ended),
                                                     ("reasoning_parser_kwargs", reasoning_parser_kwargs))
                     if value is not None}
        self._calls.put(EngineCall(_KEY.get(), request_id, prompt, sampling_params, priority, reasoning, future))
        self._wake.set()
        yield await future

    async def abort(self, request_id) -> None:
        """Aborts reach the engine from the worker's thread (VllmEngine.abort)."""

    async def notify_kv_transfer_request_rejected(self, *args: Any, **kwargs: Any) -> None:
        return None

    async def add_lora(self, lora_request) -> bool:
        raise ValueError("LoRA adapters are not served by batch workers")

    async def is_tracing_enabled(self) -> bool:
        return False


class ServingPath:
    """vLLM's chat and completions serving objects on `engine`, built once per worker. Every
    method but the coroutines runs on the worker's thread, the engine's."""

    def __init__(self, engine: LLMEngine, served_name: str, model_path: str, options: ServeOptions,
                 progress: EngineProgress) -> None:
        self.options = options
        self._engine, self._progress = engine, progress
        self._calls: queue.SimpleQueue[EngineCall] = queue.SimpleQueue()
        self._answers: queue.SimpleQueue[Answer] = queue.SimpleQueue()
        self._wake = threading.Event()  # set when a call or an answer waits for the worker
        self._running: dict[str, tuple[asyncio.Future, int]] = {}  # key -> its coroutine, its sequences
        self._added: dict[str, EngineCall] = {}  # engine request id -> the call it answers
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-serving", daemon=True)
        self._thread.start()
        client = _StepLoopClient(engine, self._loop, self._calls, self._wake)
        self._chat, self._completion = self._call(self._build(client, served_name, model_path)).result()

    async def _build(self, client: _StepLoopClient, served_name: str, model_path: str):
        from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
        from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels
        from vllm.renderers.chat_utils import load_chat_template
        from vllm.renderers.online_renderer import OnlineRenderer

        options = self.options
        template, content_format = load_chat_template(options.chat_template), options.chat_template_content_format
        models = OpenAIServingModels(client, [BaseModelPath(name=served_name, model_path=model_path)])
        tools = dict(enable_auto_tools=options.enable_auto_tool_choice, tool_parser=options.tool_call_parser)
        renderer = OnlineRenderer(client.model_config, client.renderer, request_logger=None, chat_template=template,
                                  chat_template_content_format=content_format,
                                  reasoning_parser=options.reasoning_parser, **tools)
        chat = OpenAIServingChat(client, models, "assistant", online_renderer=renderer, request_logger=None,
                                 chat_template=template, chat_template_content_format=content_format,
                                 reasoning_parser=options.reasoning_parser or "", **tools)
        return chat, OpenAIServingCompletion(client, models, online_renderer=renderer, request_logger=None)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def start(self, key: str, endpoint: str, body: Any) -> None:
        """Answer a chat, completions or responses `body` as `vllm serve` would (a responses body on
        its chat path); the answer comes out of `answers`."""
        running = self._call(self._answer(key, endpoint, body))
        running.add_done_callback(lambda _: self._wake.set())
        self._running[key] = (running, _sequences(body))

    def holds(self, key: str) -> bool:
        return key in self._running

    def busy(self) -> bool:
        return bool(self._running)

    @property
    def sequences(self) -> int:
        return sum(sequences for _, sequences in self._running.values())

    def add_calls(self) -> None:
        """Add to the engine the requests the coroutines wait on."""
        self._wake.clear()
        while not self._calls.empty():
            call = self._calls.get_nowait()
            if call.key not in self._running:  # aborted meanwhile
                continue
            try:
                prompt, kwargs = _engine_input(self._engine, call)
                self._engine.add_request(call.request_id, prompt, call.params, priority=call.priority, **kwargs)
            except Exception as exc:  # the serving code answers it as `vllm serve` does
                self._settle(call, error=exc)
            else:
                self._added[call.request_id] = call

    def settle(self, output: RequestOutput) -> bool:
        """Hand a finished engine output to the coroutine waiting on it; False if none is."""
        call = self._added.get(output.request_id)
        if call is None:
            return False
        if output.finished:  # the serving code asks for final outputs only
            del self._added[output.request_id]
            self._progress.tokens_generated += sum(len(choice.token_ids) for choice in output.outputs)
            self._settle(call, output)
        return True

    def wait(self, seconds: float = 0.05) -> None:
        """Wait for a coroutine's next engine request or answer."""
        self._wake.wait(seconds)
        self.add_calls()

    def answers(self) -> list[EngineResult]:
        results = []
        while not self._answers.empty():
            answer = self._answers.get_nowait()
            if self._running.pop(answer.key, None) is None:
                continue  # aborted meanwhile
            usage = answer.body.get("usage") or {}
            results.append(EngineResult(answer.key, answer.status_code, answer.body,
                                        prompt_tokens=usage.get("prompt_tokens") or 0,
                                        completion_tokens=usage.get("completion_tokens") or 0))
        self._progress.requests_finished += len(results)
        return results

    def abort(self, keys: list[str]) -> list[str]:
        """Drop these requests; returns the ids of their engine requests, for the engine to abort."""
        aborted = {key for key in keys if key in self._running}
        for key in aborted:
            self._running.pop(key)[0].cancel()
        request_ids = [request_id for request_id, call in self._added.items() if call.key in aborted]
        for request_id in request_ids:
            del self._added[request_id]
        return request_ids

    def close(self) -> None:
        self._engine.abort_request(self.abort(list(self._running)))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def _settle(self, call: EngineCall, output: RequestOutput | None = None, error: Exception | None = None) -> None:
        def settle() -> None:
            if call.future.done():
                return
            if error is not None:
                call.future.set_exception(error)
            else:
                call.future.set_result(output)

        self._loop.call_soon_threadsafe(settle)

    # -- the serving loop ------------------------------------------------------------------------

    async def _answer(self, key: str, endpoint: str, body: Any) -> None:
        try:
            status, answer = await self._serve(key, endpoint, body)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug here must still end the request, never leave it waiting
            log.exception("vLLM's serving code failed on request %s", key)
            status, answer = 500, {"error": {"message": f"the server failed to answer: {exc}", "param": None,
                                             "code": "engine_error", "type": "server_error"}}
        self._answers.put(Answer(key, status, answer))
        self._wake.set()

    async def _serve(self, key: str, endpoint: str, body: Any) -> tuple[int, dict[str, Any]]:
        from pydantic import BaseModel, ValidationError
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve import create_error_response
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        _KEY.set(key)
        if endpoint == RESPONSES:  # on the chat path, as the fast path answers it, with the slot's options
            try:
                chat = responses.chat_request(body)
            except responses.ResponsesError as exc:
                return 400, {"error": {"message": str(exc), "param": exc.param, "code": None,
                                       "type": "invalid_request_error"}}
            status, answer = await self._serve(key, CHAT_COMPLETIONS, chat)
            return status, responses.response_object(answer, body) if status == 200 else answer
        model, serve = ((ChatCompletionRequest, self._chat.create_chat_completion) if endpoint == CHAT_COMPLETIONS
                        else (CompletionRequest, self._completion.create_completion))
        # As `vllm serve`'s handlers answer: a body its request model refuses, then any error.
        try:
            answer = await serve(model.model_validate(body))
        except ValidationError as exc:
            answer = _validation_error(exc) if exc.title == model.__name__ else create_error_response(exc)
        except Exception as exc:
            answer = create_error_response(exc)
        if isinstance(answer, ErrorResponse):
            status = int(answer.error.code)
            return status, {"error": {"message": answer.error.message, "param": answer.error.param, "code": None,
                                      "type": "invalid_request_error" if status < 500 else "server_error"}}
        if isinstance(answer, BaseModel):
            return 200, _openai_shape(answer.model_dump(mode="json"))
        # A stream: the line policy refuses `stream` before a line gets here.
        return 400, {"error": {"message": "streamed answers are not available in a batch", "param": "stream",
                               "code": None, "type": "invalid_request_error"}}


def _sequences(body: Any) -> int:
    """The sequences a chat or completions line runs, which the worker's window counts: its
    prompts times its choices."""
    if not isinstance(body, dict):
        return 1
    prompt = body.get("prompt")
    prompts = len(prompt) if isinstance(prompt, list) and prompt and not all(type(t) is int for t in prompt) else 1
    n = body.get("n")
    return prompts * (n if type(n) is int and n > 0 else 1)


def _engine_input(engine: LLMEngine, call: EngineCall) -> tuple[Any, dict[str, Any]]:
    """What add_request takes for a call: its rendered prompt, or, when the call carries reasoning
    settings (which only an engine request holds), the engine request made from it."""
    if not call.reasoning:
        return call.prompt, {}
    from vllm.renderers.inputs.preprocess import extract_prompt_components

    request = engine.input_processor.process_inputs(call.request_id, call.prompt, call.params,
                                                    supported_tasks=engine.get_supported_tasks(),
                                                    priority=call.priority)
    for name, value in call.reasoning.items():
        setattr(request, name, value)
    prompt_text, _, _ = extract_prompt_components(engine.model_config, call.prompt)
    return request, {"prompt_text": prompt_text}


def _openai_shape(body: dict[str, Any]) -> dict[str, Any]:
    """vLLM's answer with the one field OpenAI's schema requires that vLLM leaves out: a chat
    choice's logprobs have a `refusal` list (null: these models do not refuse separately)."""
    for choice in body.get("choices") or ():
        if isinstance(choice.get("logprobs"), dict) and "message" in choice:
            choice["logprobs"].setdefault("refusal", None)
    return body


def _validation_error(exc) -> Any:
    """The answer `vllm serve` gives a body its request model refuses (its validation handler's
    message and parameter; the body's fields are under `body`, as FastAPI locates them)."""
    from vllm.entrypoints.serve import create_error_response
    from vllm.entrypoints.serve.exception_handling.handlers.validation import _format_error, clean_loc_for_param
    from vllm.exceptions import VLLMValidationError

    errors = [{**error, "loc": ("body", *error["loc"])} for error in exc.errors()]
    param = next((error["ctx"]["error"].parameter for error in errors
                  if isinstance(error.get("ctx", {}).get("error"), VLLMValidationError)), None)
    if param is None and errors:
        param = clean_loc_for_param(errors[0]["loc"])
    label = "error" if len(errors) == 1 else "errors"
    message = f"{len(errors)} validation {label}:\n" + "".join(f"  {_format_error(e)}\n" for e in errors[:10])
    return create_error_response(message.rstrip(), param=param)
