"""The vLLM engine: OpenAI request bodies in, OpenAI response bodies out, one engine step at a time.

Two paths share one engine. The fast path answers the common lines itself: chat with plain text
messages, completions and embeddings with the fields listed in _FAST_FIELDS, and /v1/responses
mapped onto chat (responses.py). It decodes each answer once when it finishes instead of token
by token (see _decoded_text), which is what keeps the worker at raw vLLM's pace. Every other line
(tools, tool messages, reasoning parsers, echo, suffix, media, any field the fast path does not
know, and every chat or responses line of a slot with its own chat template or reasoning parser)
is answered by vLLM's own serving classes (vllm_serving.py), exactly as `vllm serve` with the
slot's options answers it.
"""

from __future__ import annotations

import base64
import logging
import shutil
import struct
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..domain.batch_format import CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, RESPONSES
from . import responses
from .base import EngineProgress, EngineRequest, EngineResult, EngineSpec, error_result
from .vllm_serving import SERVE_OPTIONS, ServeOptions, ServingPath

if TYPE_CHECKING:  # vllm itself is imported only when an engine is built
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
    from vllm.pooling_params import PoolingParams
    from vllm.sampling_params import SamplingParams

log = logging.getLogger(__name__)

# Tokens between the partial outputs a running request reports (see _prepare).
_PROGRESS_INTERVAL = 16
# JSON has no -inf; OpenAI reports impossible tokens with this floor instead.
_LOGPROB_FLOOR = -9999.0
# Prompt tokens decoded ahead of the output, so its first token decodes as it does in context
# (a SentencePiece "▁word" keeps its space only after other text).
_DECODE_CONTEXT = 6
# The fields the fast path answers, in an answer of the shape `vllm serve` gives; a line with any
# other field (tools, echo, suffix...) goes to vLLM's serving classes.
_SAMPLING_FIELDS = {"model", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                    "repetition_penalty", "seed", "n", "max_tokens", "min_tokens", "stop", "logit_bias",
                    "response_format", "user", "stream"}
_FAST_FIELDS = {
    CHAT_COMPLETIONS: _SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs",
                                          "chat_template_kwargs"},
    COMPLETIONS: _SAMPLING_FIELDS | {"prompt", "logprobs"},
}
# Roles a chat template renders from text alone (tool messages and tool calls need vLLM's renderer).
_PLAIN_ROLES = {"system", "user", "assistant", "developer"}


def has_cuda_gpu() -> bool:
    """A cheap check that does not import torch (which would slow every caller by seconds)."""
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def vllm_environment(cache_dir: Path) -> dict[str, str]:
    """Environment to set before importing vllm; creates the cache directories it names.

    Set these with os.environ.setdefault so an operator's own values still win.
    """
    cache_dir = Path(cache_dir)
    temp_dir = cache_dir / "tmp"
    temp_dir.mkdir(parents=True, exist_ok=True)
    env = {
        "HF_HUB_OFFLINE": "1",  # models are local paths; never wait on the hub
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "TMPDIR": str(temp_dir),  # torch and vLLM write compile artefacts and sockets here
    }
    if not has_cuda_gpu():
        # An in-process engine core loads in seconds instead of tens of seconds on CPU.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        # GiB of KV cache; vLLM's CPU default assumes a large dedicated host.
        env["VLLM_CPU_KVCACHE_SPACE"] = "1"
        # OpenMP's threads sleep between the engine's steps rather than spin: spinning took a fifth
        # more to twice the CPU for the same batch alone, four times the time beside a busy process,
        # and the cores from every other process on the host (bench/omp_wait_policy.py).
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def default_options(gpu: bool) -> dict[str, Any]:
    """LLM(...) options a caller puts into EngineSpec.options unless configured otherwise."""
    if gpu:
        return {}
    # CPU kernels are fastest in fp32, and graph capture only costs start-up time there.
    return {"dtype": "float32", "enforce_eager": True}


class InvalidRequest(Exception):
    """A request body this engine cannot run; reported to the caller as a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class _InFlight:
    """One API request, which may fan out into several engine requests (one per prompt)."""

    key: str
    endpoint: str
    part_ids: list[str]
    created: int
    parts_left: int = 0  # engine requests not finished yet
    sequences: int = 0  # sequences it runs: its prompts times its choices (`n`)
    top_logprobs: int | None = None  # chat: how many alternatives to report per token
    decode_once: bool = False  # text is decoded when the request finishes (see _decoded_text)
    encoding_format: str = "float"  # embeddings
    responses_body: dict | None = None  # a /v1/responses request, answered as a `response` object
    # part id -> its output so far, deltas merged
    outputs: dict[str, RequestOutput | PoolingRequestOutput] = field(default_factory=dict)


class VllmEngine:
    """Implements engines.base.Engine on a vllm.LLM built once from an EngineSpec."""

    def __init__(self, spec: EngineSpec) -> None:
        from vllm import LLM  # takes seconds; deferred so importing this module stays cheap

        if spec.runner not in ("generate", "pooling"):
            raise ValueError(f"runner must be 'generate' or 'pooling', got {spec.runner!r}")
        self.model_name = spec.served_name
        self.runner = spec.runner
        # A slot's options name `vllm serve`'s request handling (tool and reasoning parsers, chat
        # template) beside LLM(...)'s own.
        serve_options = ServeOptions(**{name: spec.options[name] for name in SERVE_OPTIONS if name in spec.options})
        self.llm = LLM(
            model=spec.model_path,
            served_model_name=spec.served_name,
            runner=spec.runner,
            max_model_len=spec.max_model_len,
            **{name: value for name, value in spec.options.items() if name not in SERVE_OPTIONS},
        )
        self._engine = self.llm.llm_engine
        self._tokenizer = self.llm.get_tokenizer()
        # The Rust tokenizer that vLLM's own fast detokenizer steps through, when it has one.
        self._fast_tokenizer = _fast_tokenizer(self._tokenizer)
        model_config = self._engine.model_config
        # The model's generation_config.json supplies defaults, as `vllm serve` applies them.
        self._sampling_defaults: dict[str, Any] = (
            model_config.get_diff_sampling_param() if spec.runner == "generate" else {}
        )
        # Twice the scheduler's batch: the worker refills in chunks, and the scheduler must
        # still find a full batch waiting between refills.
        scheduler_batch = self._engine.vllm_config.scheduler_config.max_num_seqs
        self.max_in_flight = spec.max_in_flight or 2 * scheduler_batch
        self._context = model_config.max_model_len
        self.progress = EngineProgress()
        self._sequences = 0  # of the requests in flight, which is what the window counts
        self._in_flight: dict[str, _InFlight] = {}
        self._request_of_part: dict[str, _InFlight] = {}
        # The lines the fast path does not answer (see the module's note).
        self._serving = (ServingPath(self._engine, spec.served_name, spec.model_path, serve_options, self.progress)
                         if spec.runner == "generate" else None)

    # -- Engine interface -------------------------------------------------------------------

    def add(self, request: EngineRequest) -> EngineResult | None:
        if request.key in self._in_flight or (self._serving and self._serving.holds(request.key)):
            raise ValueError(f"request key {request.key!r} is already in flight")
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if self._serving is not None and not self._fast(request):
            self._serving.start(request.key, request.endpoint, request.body)
            return None
        try:
            prompts, params, in_flight = self._prepare(request)
        except InvalidRequest as exc:
            return self._rejected(request.key, str(exc), exc.param)
        except Exception as exc:  # refused by vLLM's request models or parameters
            return self._refused(request, exc)
        added: list[str] = []
        try:
            for part_id, prompt in zip(in_flight.part_ids, prompts, strict=True):
                self._engine.add_request(part_id, prompt, params)
                added.append(part_id)
        except EngineDeadError:
            raise
        except Exception as exc:
            # Fail this request alone: a worker that died here would retry it and die again.
            if added:
                self._engine.abort_request(added)
            if isinstance(exc, (ValueError, TypeError, VLLMClientError)):
                return self._refused(request, exc)
            message = str(exc) or type(exc).__name__
            self.progress.requests_finished += 1
            return error_result(request.key, f"the engine could not start this request: {message}",
                                code="engine_error", status_code=500, error_type="server_error")
        self._in_flight[request.key] = in_flight
        self._sequences += in_flight.sequences
        for part_id in in_flight.part_ids:
            self._request_of_part[part_id] = in_flight
        return None

    def step(self) -> list[EngineResult]:
        serving = self._serving if self._serving is not None and self._serving.busy() else None
        if serving is not None:
            serving.add_calls()
        # With the engine core in its own process, step() blocks until it has output.
        if not self._engine.has_unfinished_requests():
            if serving is None:
                return []
            serving.wait()  # only its coroutines are at work: rendering, or shaping an answer
            return serving.answers()
        finished: list[EngineResult] = []
        outputs = self._engine.step()
        self.progress.steps += 1
        for output in outputs:
            if serving is not None and serving.settle(output):
                continue
            in_flight = self._request_of_part.get(output.request_id)
            if in_flight is None:  # aborted while its last output was on the way
                continue
            self._merge_output(in_flight, output)
            in_flight.parts_left -= output.finished
            if not in_flight.parts_left:
                self._forget(in_flight)
                finished.append(self._result(in_flight))
        self.progress.requests_finished += len(finished)
        return finished + serving.answers() if serving is not None else finished

    def abort(self, keys: list[str]) -> None:
        part_ids: list[str] = []
        for key in keys:
            in_flight = self._in_flight.get(key)
            if in_flight is not None:
                self._forget(in_flight)
                part_ids.extend(in_flight.part_ids)
        if self._serving is not None:
            part_ids += self._serving.abort(keys)
        if part_ids:
            self._engine.abort_request(part_ids)

    def in_flight(self) -> int:
        return self._sequences + (self._serving.sequences if self._serving is not None else 0)

    def close(self) -> None:
        self.abort(list(self._in_flight))
        if self._serving is not None:
            self._serving.close()
        self._engine.engine_core.shutdown()

    # -- Requests -----------------------------------------------------------------------------

    def _fast(self, request: EngineRequest) -> bool:
        """Whether the fast path answers this line (see the module's note)."""
        body, endpoint = request.body, request.endpoint
        if endpoint == RESPONSES:  # rendered on the chat path, with the slot's template and parsers if it has any
            return self._serving.options.fast_chat or not isinstance(body, dict)
        if endpoint not in _FAST_FIELDS or not isinstance(body, dict):
            return True  # embeddings; a body that is no object is refused there
        if not body.keys() <= _FAST_FIELDS[endpoint]:
            return False
        if endpoint == COMPLETIONS:
            return True
        messages = body.get("messages")
        return self._serving.options.fast_chat and isinstance(messages, list) and bool(messages) and all(
            isinstance(message, dict) and message.keys() <= {"role", "content"}
            and message.get("role") in _PLAIN_ROLES and _plain_content(message.get("content"))
            for message in messages)

    def _prepare(
        self, request: EngineRequest
    ) -> tuple[list[dict[str, Any]], SamplingParams | PoolingParams, _InFlight]:
        """The line as prompts and parameters; its fields are read by vLLM's own request models,
        so they mean what they mean to `vllm serve`."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        body = request.body
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        served = (EMBEDDINGS,) if self.runner == "pooling" else (CHAT_COMPLETIONS, COMPLETIONS, RESPONSES)
        if request.endpoint not in served:
            raise InvalidRequest(f"model {self.model_name!r} does not serve {request.endpoint}; "
                                 f"it serves {', '.join(served)}")
        in_flight = _InFlight(key=request.key, endpoint=request.endpoint, part_ids=[],
                              created=int(time.time()))
        if request.endpoint == EMBEDDINGS:
            prompts = self._text_prompts(body.get("input"), "input")
            params = self._pooling_params(body, in_flight)
        elif request.endpoint == COMPLETIONS:
            completion = CompletionRequest.model_validate(body)
            prompts = self._text_prompts(completion.prompt, "prompt")
            params = self._sampling_params(completion, completion.max_tokens, prompts, completion.logprobs)
        else:
            if request.endpoint == RESPONSES:
                try:
                    body = responses.chat_request(body)
                except responses.ResponsesError as exc:
                    raise InvalidRequest(str(exc), exc.param) from None
                in_flight.responses_body = request.body
            chat = ChatCompletionRequest.model_validate(body)
            prompts = [self._chat_prompt(body)]
            if chat.logprobs:
                in_flight.top_logprobs = chat.top_logprobs or 0
            max_tokens = chat.max_completion_tokens if chat.max_completion_tokens is not None else chat.max_tokens
            params = self._sampling_params(chat, max_tokens, prompts, in_flight.top_logprobs)
        in_flight.decode_once = request.endpoint != EMBEDDINGS and not params.detokenize
        # "#" then a number, parsed from the right, keeps part ids unique across keys.
        in_flight.part_ids = [f"{request.key}#{index}" for index in range(len(prompts))]
        in_flight.parts_left = len(prompts)
        in_flight.sequences = len(prompts) * getattr(params, "n", 1)
        return prompts, params, in_flight

    def _chat_prompt(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty list of messages", "messages")
        text = self._tokenizer.apply_chat_template(
            [_text_message(message) for message in messages], tokenize=False, add_generation_prompt=True,
            **(body.get("chat_template_kwargs") or {}))
        # The template already wrote BOS and friends; the tokenizer must not add them twice.
        return {"prompt_token_ids": self._tokenizer.encode(text, add_special_tokens=False)}

    def _text_prompts(self, value: Any, param: str) -> list[dict[str, Any]]:
        """OpenAI's `prompt` / `input`: a string or token ids, or a list of either."""
        items = value if isinstance(value, list) and value and not _is_token_ids(value) else [value]
        prompts = []
        for item in items:
            if isinstance(item, str):
                prompts.append({"prompt_token_ids": self._tokenizer.encode(item)})
            elif isinstance(item, list) and _is_token_ids(item):
                prompts.append({"prompt_token_ids": list(item)})
            else:
                raise InvalidRequest(f"'{param}' must be a string, a list of strings, a list of "
                                     "token ids, or a list of such lists", param)
        return prompts

    def _sampling_params(self, request: Any, max_tokens: int | None, prompts: list[dict[str, Any]],
                         logprobs: int | None) -> SamplingParams:
        """vLLM's own parameters for the request, as its server makes them, reported as deltas."""
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
        from vllm.sampling_params import RequestOutputKind

        longest = max(len(prompt["prompt_token_ids"]) for prompt in prompts)
        params = request.to_sampling_params(
            get_max_tokens(self._context, max_tokens, longest, self._sampling_defaults), self._sampling_defaults)
        # Deltas, one every _PROGRESS_INTERVAL tokens, are merged per choice in _merge_output;
        # n > 1 choices arrive separately either way.
        params.output_kind = RequestOutputKind.DELTA
        params.stream_interval = _PROGRESS_INTERVAL
        # vLLM detokenizes every token inside the engine's step, holding up the next step;
        # decoding once when a request finishes (_decoded_text) gives the same text for less.
        # vLLM must still detokenize as it goes to find stop strings and to name logprobs' tokens.
        params.detokenize = self._fast_tokenizer is None or bool(params.stop) or logprobs is not None
        return params

    def _pooling_params(self, body: dict[str, Any], in_flight: _InFlight) -> PoolingParams:
        from vllm.pooling_params import PoolingParams

        encoding_format = body.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        in_flight.encoding_format = encoding_format
        dimensions = body.get("dimensions")
        if dimensions is not None and (type(dimensions) is not int):
            raise InvalidRequest(f"'dimensions' must be an integer, got {type(dimensions).__name__}", "dimensions")
        return PoolingParams(task="embed", dimensions=dimensions)

    # -- Results ------------------------------------------------------------------------------

    def _merge_output(self, in_flight: _InFlight,
                      output: RequestOutput | PoolingRequestOutput) -> None:
        if self.runner == "generate":
            self.progress.tokens_generated += _completion_tokens([output])
        previous = in_flight.outputs.get(output.request_id)
        if previous is None:
            in_flight.outputs[output.request_id] = output
        else:
            previous.add(output, aggregate=True)

    def _forget(self, in_flight: _InFlight) -> None:
        del self._in_flight[in_flight.key]
        self._sequences -= in_flight.sequences
        for part_id in in_flight.part_ids:
            self._request_of_part.pop(part_id, None)

    def _result(self, in_flight: _InFlight) -> EngineResult:
        outputs = [in_flight.outputs[part_id] for part_id in in_flight.part_ids]
        failure = _engine_failure(outputs)
        if failure:
            return error_result(in_flight.key, failure, code="engine_error",
                                status_code=500, error_type="server_error")
        prompt_tokens = sum(len(output.prompt_token_ids) for output in outputs)
        if in_flight.endpoint == EMBEDDINGS:
            body = self._embeddings_body(outputs, in_flight.encoding_format, prompt_tokens)
            return EngineResult(in_flight.key, 200, body, prompt_tokens=prompt_tokens)
        completion_tokens = _completion_tokens(outputs)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if in_flight.endpoint in (CHAT_COMPLETIONS, RESPONSES):
            body = self._chat_body(outputs[0], in_flight)
        else:
            body = self._completion_body(outputs, in_flight)
        body["usage"] = usage
        if in_flight.endpoint == RESPONSES:
            body = responses.response_object(body, in_flight.responses_body)
        return EngineResult(in_flight.key, 200, body, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens)

    def _chat_body(self, output: RequestOutput, in_flight: _InFlight) -> dict[str, Any]:
        choices = [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": self._text(output, choice, in_flight),
                            "refusal": None},
                "logprobs": None if in_flight.top_logprobs is None else {
                    "content": self._chat_logprobs(choice, in_flight.top_logprobs),
                    "refusal": None,
                },
                "finish_reason": _finish_reason(choice),
            }
            for choice in sorted(output.outputs, key=lambda choice: choice.index)
        ]
        return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                "created": in_flight.created, "model": self.model_name, "choices": choices,
                "system_fingerprint": None}

    def _completion_body(self, outputs: list[RequestOutput],
                         in_flight: _InFlight) -> dict[str, Any]:
        choices = []
        for prompt_index, output in enumerate(outputs):
            for choice in sorted(output.outputs, key=lambda choice: choice.index):
                choices.append({
                    # OpenAI numbers choices across prompts: prompt i's choices come i*n onwards.
                    "index": prompt_index * len(output.outputs) + choice.index,
                    "text": self._text(output, choice, in_flight),
                    "logprobs": (None if choice.logprobs is None
                                 else self._completion_logprobs(choice)),
                    "finish_reason": _finish_reason(choice),
                })
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                "created": in_flight.created, "model": self.model_name, "choices": choices,
                "system_fingerprint": None}

    def _embeddings_body(self, outputs: list[PoolingRequestOutput], encoding_format: str,
                         prompt_tokens: int) -> dict[str, Any]:
        data = []
        for index, output in enumerate(outputs):
            vector = output.outputs.data.float().tolist()
            if encoding_format == "base64":  # little-endian float32, as OpenAI encodes it
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
            data.append({"object": "embedding", "index": index, "embedding": vector})
        return {"object": "list", "data": data, "model": self.model_name,
                "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}

    def _text(self, output: RequestOutput, choice: CompletionOutput, in_flight: _InFlight) -> str:
        if not in_flight.decode_once:
            return choice.text
        return _decoded_text(self._fast_tokenizer, output.prompt_token_ids, choice)

    def _chat_logprobs(self, choice: CompletionOutput, top_logprobs: int) -> list[dict[str, Any]]:
        content = []
        for token_id, candidates in zip(choice.token_ids, choice.logprobs or [], strict=False):
            token, logprob = self._token_logprob(token_id, candidates)
            # vLLM lists the sampled token first, then the top ones; rank orders them all.
            top_ids = sorted((token_id for token_id, entry in candidates.items()
                              if entry.rank <= top_logprobs), key=lambda alt: candidates[alt].rank)
            alternatives = [self._token_logprob(alt_id, candidates) for alt_id in top_ids]
            content.append({
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
                    for text, value in alternatives
                ],
            })
        return content

    def _completion_logprobs(self, choice: CompletionOutput) -> dict[str, Any]:
        tokens, token_logprobs, top_logprobs, text_offset = [], [], [], []
        offset = 0
        for token_id, candidates in zip(choice.token_ids, choice.logprobs, strict=False):
            token, logprob = self._token_logprob(token_id, candidates)
            tokens.append(token)
            token_logprobs.append(logprob)
            # OpenAI's completions list the sampled token beside the top alternatives.
            top_logprobs.append(dict(self._token_logprob(alt, candidates) for alt in candidates))
            text_offset.append(offset)
            offset += len(token)
        return {"tokens": tokens, "token_logprobs": token_logprobs,
                "top_logprobs": top_logprobs, "text_offset": text_offset}

    def _token_logprob(self, token_id: int, candidates: dict[int, Logprob]) -> tuple[str, float]:
        entry = candidates[token_id]
        token = entry.decoded_token
        if token is None:
            token = self._tokenizer.decode([token_id])
        return token, max(entry.logprob, _LOGPROB_FLOOR)

    def _refused(self, request: EngineRequest, exc: Exception) -> EngineResult | None:
        """A line vLLM refused: its serving classes answer it as `vllm serve` would, in its words."""
        if self._serving is not None and request.endpoint in _FAST_FIELDS:
            self._serving.start(request.key, request.endpoint, request.body)
            return None
        return self._rejected(request.key, str(exc) or type(exc).__name__, getattr(exc, "parameter", None))

    def _rejected(self, key: str, message: str, param: str | None) -> EngineResult:
        self.progress.requests_finished += 1
        return error_result(key, message, param=param)


def _is_token_ids(value: list[Any]) -> bool:
    return bool(value) and all(type(item) is int for item in value)  # bool is no token id


def _plain_content(content: Any) -> bool:
    """A string, or text parts only: what the fast path renders (as one string, see _text_message)."""
    return isinstance(content, str) or (isinstance(content, list) and all(
        isinstance(part, dict) and part.keys() == {"type", "text"} and part["type"] == "text"
        and isinstance(part["text"], str) for part in content))


def _text_message(message: dict[str, Any]) -> dict[str, Any]:
    """A plain message with its content as one string, as vLLM renders text parts for templates
    that take a string."""
    content = message["content"]
    return {**message, "content": content if isinstance(content, str) else "\n".join(p["text"] for p in content)}


def _fast_tokenizer(tokenizer: Any) -> Any | None:
    """The tokenizers.Tokenizer behind `tokenizer` if vLLM detokenizes with it, else None."""
    try:
        from vllm.v1.engine.detokenizer import uses_fast_detokenizer
    except ImportError:  # moved by a vLLM release: let vLLM detokenize every request itself
        log.warning("this vLLM has no vllm.v1.engine.detokenizer.uses_fast_detokenizer; "
                    "text is detokenized by vLLM token by token")
        return None
    return tokenizer._tokenizer if uses_fast_detokenizer(tokenizer) else None


def _decoded_text(tokenizer: Any, prompt_token_ids: list[int], choice: CompletionOutput) -> str:
    """A finished choice's text, the same as vLLM's incremental detokenizer would have made it."""
    from tokenizers.decoders import DecodeStream

    token_ids = list(choice.token_ids)
    if token_ids and choice.finish_reason == "stop" and not isinstance(choice.stop_reason, str):
        token_ids.pop()  # the EOS or stop token, which vLLM leaves out of the text
    context = list(prompt_token_ids[-_DECODE_CONTEXT:])
    head = tokenizer.decode(context, skip_special_tokens=True)
    text = tokenizer.decode(context + token_ids, skip_special_tokens=True)
    if text.startswith(head) and not text.endswith("\ufffd"):
        return text[len(head):]
    # A character cut by the length limit, or a decoder whose output depends on more context:
    # replay vLLM's own way, one token at a time after the whole prompt.
    stream = DecodeStream(ids=list(prompt_token_ids), skip_special_tokens=True)
    try:
        return "".join(stream.step(tokenizer, token_id) or "" for token_id in token_ids)
    except Exception:  # bytes no prefix can decode; vLLM restarts its stream, losing the context
        return tokenizer.decode(token_ids, skip_special_tokens=True)


def _completion_tokens(outputs: list[RequestOutput]) -> int:
    return sum(len(choice.token_ids) for output in outputs for choice in output.outputs)


def _finish_reason(choice: CompletionOutput) -> str:
    # vLLM's "repetition" stop is still a stop as far as OpenAI's enum goes.
    return "length" if choice.finish_reason == "length" else "stop"


def _engine_failure(outputs: list[RequestOutput | PoolingRequestOutput]) -> str | None:
    """Why vLLM gave up on a request it had accepted, if it did."""
    from vllm.outputs import RequestOutput

    for output in outputs:
        if isinstance(output, RequestOutput):
            for choice in output.outputs:
                if choice.finish_reason in ("abort", "error"):
                    return ("the engine stopped this request early "
                            f"(finish_reason={choice.finish_reason})")
        elif output.error is not None:
            return f"the engine failed this request: {output.error.message}"
    return None
