"""The vLLM engine: OpenAI request bodies in, OpenAI response bodies out, one engine step at a time.

Request bodies are checked and shaped here rather than by vLLM's OpenAI server classes, whose
modules move between releases; only vLLM's long-lived offline API is used (LLM, its LLMEngine's
add_request/step/abort_request, SamplingParams and PoolingParams), plus its detokenizer's test
for which tokenizers it steps through natively (see _decoded_text).
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

if TYPE_CHECKING:  # vllm itself is imported only when an engine is built
    from vllm.logprobs import Logprob
    from vllm.outputs import CompletionOutput, PoolingRequestOutput, RequestOutput
    from vllm.pooling_params import PoolingParams
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

log = logging.getLogger(__name__)

# Completions default to 16 tokens as OpenAI's do; chat fills the remaining context.
_COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# Tokens between the partial outputs a running request reports (see _sampling_params).
_PROGRESS_INTERVAL = 16
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# JSON has no -inf; OpenAI reports impossible tokens with this floor instead.
_LOGPROB_FLOOR = -9999.0
# Prompt tokens decoded ahead of the output, so its first token decodes as it does in context
# (a SentencePiece "▁word" keeps its space only after other text).
_DECODE_CONTEXT = 6
# Fields that change the result in ways this engine does not implement: rejecting them is
# better than silently returning something the caller did not ask for.
_UNSUPPORTED_FIELDS = {
    CHAT_COMPLETIONS: ("tools", "functions", "audio", "prediction"),
    COMPLETIONS: ("echo", "suffix"),
    EMBEDDINGS: (),
    RESPONSES: (),  # responses.py refuses what it cannot map
}


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
        self.llm = LLM(
            model=spec.model_path,
            served_model_name=spec.served_name,
            runner=spec.runner,
            max_model_len=spec.max_model_len,
            **spec.options,
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

    # -- Engine interface -------------------------------------------------------------------

    def add(self, request: EngineRequest) -> EngineResult | None:
        if request.key in self._in_flight:
            raise ValueError(f"request key {request.key!r} is already in flight")
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            prompts, params, in_flight = self._prepare(request)
        except InvalidRequest as exc:
            return self._rejected(request.key, str(exc), exc.param)
        added: list[str] = []
        try:
            for part_id, prompt in zip(in_flight.part_ids, prompts):
                self._engine.add_request(part_id, prompt, params)
                added.append(part_id)
        except EngineDeadError:
            raise
        except Exception as exc:
            # Fail this request alone: a worker that died here would retry it and die again.
            if added:
                self._engine.abort_request(added)
            message = str(exc) or type(exc).__name__
            if isinstance(exc, (ValueError, TypeError, VLLMClientError)):
                return self._rejected(request.key, message, getattr(exc, "parameter", None))
            self.progress.requests_finished += 1
            return error_result(request.key, f"the engine could not start this request: {message}",
                                code="engine_error", status_code=500, error_type="server_error")
        self._in_flight[request.key] = in_flight
        self._sequences += in_flight.sequences
        for part_id in in_flight.part_ids:
            self._request_of_part[part_id] = in_flight
        return None

    def step(self) -> list[EngineResult]:
        # With the engine core in its own process, step() blocks until it has output.
        if not self._engine.has_unfinished_requests():
            return []
        finished: list[EngineResult] = []
        outputs = self._engine.step()
        self.progress.steps += 1
        for output in outputs:
            in_flight = self._request_of_part.get(output.request_id)
            if in_flight is None:  # aborted while its last output was on the way
                continue
            self._merge_output(in_flight, output)
            in_flight.parts_left -= output.finished
            if not in_flight.parts_left:
                self._forget(in_flight)
                finished.append(self._result(in_flight))
        self.progress.requests_finished += len(finished)
        return finished

    def abort(self, keys: list[str]) -> None:
        part_ids: list[str] = []
        for key in keys:
            in_flight = self._in_flight.get(key)
            if in_flight is not None:
                self._forget(in_flight)
                part_ids.extend(in_flight.part_ids)
        if part_ids:
            self._engine.abort_request(part_ids)

    def in_flight(self) -> int:
        return self._sequences

    def close(self) -> None:
        self.abort(list(self._in_flight))
        self._engine.engine_core.shutdown()

    # -- Requests -----------------------------------------------------------------------------

    def _prepare(
        self, request: EngineRequest
    ) -> tuple[list[dict[str, Any]], SamplingParams | PoolingParams, _InFlight]:
        body = request.body
        if not isinstance(body, dict):
            raise InvalidRequest("the request body must be a JSON object")
        served = (EMBEDDINGS,) if self.runner == "pooling" else (CHAT_COMPLETIONS, COMPLETIONS, RESPONSES)
        if request.endpoint not in served:
            raise InvalidRequest(f"model {self.model_name!r} does not serve {request.endpoint}; "
                                 f"it serves {', '.join(served)}")
        for name in _UNSUPPORTED_FIELDS[request.endpoint]:
            if body.get(name):
                raise InvalidRequest(f"'{name}' is not supported by this server", name)
        in_flight = _InFlight(key=request.key, endpoint=request.endpoint, part_ids=[],
                              created=int(time.time()))
        if request.endpoint == RESPONSES:
            try:
                chat = responses.chat_request(body)
            except responses.ResponsesError as exc:
                raise InvalidRequest(str(exc), exc.param) from None
            in_flight.responses_body = body
            prompts = [self._chat_prompt(chat)]
            params = self._chat_sampling_params(chat, in_flight)
        elif request.endpoint == CHAT_COMPLETIONS:
            prompts = [self._chat_prompt(body)]
            params = self._chat_sampling_params(body, in_flight)
        elif request.endpoint == COMPLETIONS:
            prompts = self._text_prompts(body, "prompt")
            params = self._sampling_params(body, max_tokens=_max_tokens(
                body, "max_tokens", default=_COMPLETIONS_DEFAULT_MAX_TOKENS),
                logprobs=_optional(body, "logprobs", int, "an integer"))
        else:
            prompts = self._text_prompts(body, "input")
            params = self._pooling_params(body, in_flight)
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
        conversation = [_text_message(message, index) for index, message in enumerate(messages)]
        template_kwargs = _optional(body, "chat_template_kwargs", dict, "an object") or {}
        try:
            text = self._tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=True, **template_kwargs
            )
        except Exception as exc:  # a Jinja template rejects a conversation by raising anything
            raise InvalidRequest(f"the chat template rejected the messages: {exc}",
                                 "messages") from exc
        # The template already wrote BOS and friends; the tokenizer must not add them twice.
        return {"prompt_token_ids": self._tokenizer.encode(text, add_special_tokens=False)}

    def _text_prompts(self, body: dict[str, Any], param: str) -> list[dict[str, Any]]:
        """OpenAI's `prompt` / `input`: a string or token ids, or a list of either."""
        value = body.get(param)
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

    def _chat_sampling_params(self, body: dict[str, Any], in_flight: _InFlight) -> SamplingParams:
        wants_logprobs = _optional(body, "logprobs", bool, "a boolean") or False
        top_logprobs = _optional(body, "top_logprobs", int, "an integer")
        if top_logprobs is not None and not wants_logprobs:
            raise InvalidRequest("'top_logprobs' requires 'logprobs' to be true", "top_logprobs")
        if wants_logprobs:
            in_flight.top_logprobs = top_logprobs or 0
        # max_tokens is the deprecated spelling of max_completion_tokens.
        max_tokens = _max_tokens(body, "max_completion_tokens", default=None)
        if max_tokens is None:
            max_tokens = _max_tokens(body, "max_tokens", default=None)
        return self._sampling_params(body, max_tokens=max_tokens, logprobs=in_flight.top_logprobs)

    def _sampling_params(self, body: dict[str, Any], *, max_tokens: int | None,
                         logprobs: int | None) -> SamplingParams:
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        kwargs: dict[str, Any] = {}
        for name, kind, description in (
            ("temperature", (int, float), "a number"),
            ("top_p", (int, float), "a number"),
            ("top_k", int, "an integer"),
            ("min_p", (int, float), "a number"),
            ("presence_penalty", (int, float), "a number"),
            ("frequency_penalty", (int, float), "a number"),
            ("repetition_penalty", (int, float), "a number"),
            ("seed", int, "an integer"),
            ("n", int, "an integer"),
        ):
            value = _optional(body, name, kind, description)
            if value is None:
                value = self._sampling_defaults.get(name)
            if value is not None:
                kwargs[name] = value
        if not _INT64_MIN <= kwargs.get("seed", 0) <= _INT64_MAX:
            # Caught here: vLLM only fails on it inside step(), taking the whole batch down.
            raise InvalidRequest("'seed' must fit in a signed 64-bit integer", "seed")
        if max_tokens is None:
            max_tokens = self._sampling_defaults.get("max_tokens")
        if max_tokens is not None and max_tokens > self._context:
            raise InvalidRequest(f"'max_tokens' is {max_tokens}; the model's context holds {self._context} tokens, "
                                 "prompt included", "max_tokens")
        stop = body.get("stop")
        if stop is not None and not isinstance(stop, str) and not (
            isinstance(stop, list) and all(isinstance(item, str) for item in stop)
        ):
            raise InvalidRequest("'stop' must be a string or a list of strings", "stop")
        try:
            return SamplingParams(
                **kwargs,
                stop=stop,
                max_tokens=max_tokens,
                logprobs=logprobs,
                logit_bias=_logit_bias(body),
                structured_outputs=_structured_outputs(body),
                # Deltas, one every _PROGRESS_INTERVAL tokens, are merged per choice in
                # _merge_output; n > 1 choices arrive separately either way.
                output_kind=RequestOutputKind.DELTA,
                stream_interval=_PROGRESS_INTERVAL,
                # vLLM detokenizes every token inside the engine's step, holding up the next
                # step; decoding once when a request finishes (_decoded_text) gives the same
                # text for less. vLLM must still detokenize as it goes to find stop strings and
                # to name logprobs' tokens.
                detokenize=self._fast_tokenizer is None or bool(stop) or logprobs is not None,
            )
        except (ValueError, TypeError, VLLMClientError) as exc:
            raise InvalidRequest(str(exc), getattr(exc, "parameter", None)) from exc

    def _pooling_params(self, body: dict[str, Any], in_flight: _InFlight) -> PoolingParams:
        from vllm.pooling_params import PoolingParams

        encoding_format = body.get("encoding_format") or "float"
        if encoding_format not in ("float", "base64"):
            raise InvalidRequest("'encoding_format' must be 'float' or 'base64'", "encoding_format")
        in_flight.encoding_format = encoding_format
        dimensions = _optional(body, "dimensions", int, "an integer")
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
        for token_id, candidates in zip(choice.token_ids, choice.logprobs or []):
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
        for token_id, candidates in zip(choice.token_ids, choice.logprobs):
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

    def _rejected(self, key: str, message: str, param: str | None) -> EngineResult:
        self.progress.requests_finished += 1
        return error_result(key, message, param=param)


def _optional(body: dict[str, Any], name: str, kind: type | tuple[type, ...],
              description: str) -> Any:
    value = body.get(name)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python, but `"n": true` is a mistake, not 1.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        raise InvalidRequest(f"'{name}' must be {description}, got {type(value).__name__}", name)
    return value


def _max_tokens(body: dict[str, Any], name: str, *, default: int | None) -> int | None:
    value = _optional(body, name, int, "an integer")
    return default if value is None else value


def _logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
    bias = _optional(body, "logit_bias", dict, "an object mapping token ids to numbers")
    if not bias:
        return None
    try:
        return {int(token): float(value) for token, value in bias.items()}
    except (TypeError, ValueError) as exc:
        raise InvalidRequest("'logit_bias' must map token ids to numbers", "logit_bias") from exc


def _structured_outputs(body: dict[str, Any]) -> StructuredOutputsParams | None:
    from vllm.sampling_params import StructuredOutputsParams

    response_format = _optional(body, "response_format", dict, "an object") or {"type": "text"}
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        json_schema = response_format.get("json_schema")
        schema = json_schema.get("schema") if isinstance(json_schema, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest("response_format.json_schema.schema must be a JSON schema object",
                                 "response_format")
        return StructuredOutputsParams(json=schema)
    raise InvalidRequest("response_format.type must be 'text', 'json_object' or 'json_schema'",
                         "response_format")


def _is_token_ids(value: list[Any]) -> bool:
    return bool(value) and all(type(item) is int for item in value)  # bool is no token id


def _text_message(message: Any, index: int) -> dict[str, Any]:
    """A message with its content as one string, the form every text chat template accepts."""
    param = f"messages[{index}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise InvalidRequest(f"{param} must be an object with a string 'role'", param)
    content = message.get("content")
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise InvalidRequest(f"{param}.content: only text parts are supported", param)
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is None:
        content = ""
    elif not isinstance(content, str):
        raise InvalidRequest(f"{param}.content must be a string or a list of text parts", param)
    return {**message, "content": content}


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
