"""The batch answers every line of tests/parity_corpus.jsonl as vLLM's own OpenAI server does.

Each line is sent to a real vLLM OpenAI server on the demo model (the session's first demo
server), running with the options the worker slot has (a tool-call parser, automatic tool
choice), and run as one batch through the API by a real worker of the in-process engine. The
answers are compared field by field: status class, text, tool calls (names, and arguments as
parsed JSON), finish reasons, logprobs to 1e-3 and token counts. Lines are greedy or seeded, so
both sides are deterministic. The corpus grows by adding lines to its file.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from .conftest import TOOL_OPTIONS, live_worker, running_watchdog, wait_for, wait_for_batch
from .jsonl import submit
from .openai_schema import assert_valid

pytestmark = pytest.mark.vllm

CORPUS = Path(__file__).parent / "parity_corpus.jsonl"
MODEL = "parity-demo"
SCHEMAS = {"/v1/chat/completions": "CreateChatCompletionResponse", "/v1/completions": "CreateCompletionResponse"}


def corpus() -> list[dict]:
    lines = [json.loads(line) for line in CORPUS.read_text().splitlines() if line.strip()]
    for line in lines:
        line["body"]["model"] = MODEL
    return lines


@pytest.fixture(scope="module")
def reference(demo_servers, batch_answers):
    """vLLM's answer to every corpus line: custom_id -> (status, body), from the session's demo
    server that runs with the slot's tool-call options. Asked once the batch has run, so that
    neither side shares the cores with the other's requests."""
    server = demo_servers[0]
    with httpx.Client(base_url=server.url, timeout=120) as client:
        # As a fresh server: what earlier modules asked of it would otherwise be reused from its
        # prefix cache, computed beside other requests (on CPU that changes float sums).
        assert client.post("/reset_prefix_cache").json() == {"success": True}
        return {line["custom_id"]: _answer(client.post(line["url"], json={**line["body"], "model": server.served_name}))
                for line in corpus()}


def _answer(response: httpx.Response) -> tuple[int, dict]:
    return response.status_code, response.json()


@pytest.fixture(scope="module")
def batch_answers(database, data_dir, db, api):
    """The batch's answer to every corpus line: custom_id -> (status, body)."""
    # One line at a time, as the reference server is asked: on CPU, which requests share a step
    # changes float sums enough to flip a greedy token of the random-weight demo model on long
    # (tool) prompts, in vLLM's server as much as here. That the engine keeps many lines in
    # flight, on both paths, is shown by tests/test_vllm_engine.py and bench/throughput.py.
    slot = {"slot": "parity-0", "model": "demo", "served_name": MODEL, "engine_options": TOOL_OPTIONS,
            "max_in_flight": 1}
    with running_watchdog(database, data_dir, "watchdog-parity", [slot], SHUTDOWN_GRACE="20"):
        wait_for(lambda: live_worker(db, "parity-0"), 600, interval=1, message="parity worker loaded")
        client = api.client()
        lines = corpus()
        answers = {}
        for endpoint in sorted({line["url"] for line in lines}):
            batch = wait_for_batch(client, submit(client, [line for line in lines if line["url"] == endpoint],
                                                  endpoint=endpoint).id)
            for file_id in (batch.output_file_id, batch.error_file_id):
                for text in (client.files.content(file_id).text.splitlines() if file_id else []):
                    line = json.loads(text)
                    answers[line["custom_id"]] = (line["response"]["status_code"], line["response"]["body"])
    return answers


@pytest.mark.parametrize("line", corpus(), ids=lambda line: line["custom_id"])
def test_the_batch_answers_as_vllms_server_does(reference, batch_answers, line):
    (ours_status, ours), (theirs_status, theirs) = batch_answers[line["custom_id"]], reference[line["custom_id"]]
    assert ours_status // 100 == theirs_status // 100, (ours, theirs)
    if ours_status != 200:
        assert ours["error"]["message"] and theirs["error"]["message"]
        return
    assert_valid(SCHEMAS[line["url"]], _first_echoed_token_unscored(line["body"], ours))
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [ours["usage"][name] for name in counts] == [theirs["usage"][name] for name in counts]
    assert len(ours["choices"]) == len(theirs["choices"])
    for mine, reference_choice in zip(_by_index(ours), _by_index(theirs), strict=True):
        assert _choice(mine) == _choice(reference_choice)
        _assert_logprobs_close(mine.get("logprobs"), reference_choice.get("logprobs"))


def _first_echoed_token_unscored(request: dict, body: dict) -> dict:
    """The answer as the schema is checked: with `echo` and `logprobs` the first prompt token has
    no logprob (nothing precedes it), which vLLM and OpenAI both answer as null where the schema
    says number; that one null is checked here and left out of the schema check."""
    if not (request.get("echo") and request.get("logprobs") is not None):
        return body
    body = json.loads(json.dumps(body))
    for choice in body["choices"]:
        logprobs = choice["logprobs"]
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            del logprobs[name][0]
    return body


def _by_index(body: dict) -> list[dict]:
    return sorted(body["choices"], key=lambda choice: choice["index"])


def _choice(choice: dict) -> dict:
    """What must be equal in a choice: its text, its tool calls as parsed, its finish reason."""
    if "message" not in choice:
        return {"text": choice["text"], "finish_reason": choice["finish_reason"]}
    message = choice["message"]
    calls = [(call["type"], call["function"]["name"], json.loads(call["function"]["arguments"]))
             for call in message.get("tool_calls") or []]
    return {"content": message.get("content"), "tool_calls": calls, "finish_reason": choice["finish_reason"],
            "reasoning": message.get("reasoning")}


def _assert_logprobs_close(mine: dict | None, theirs: dict | None) -> None:
    assert (mine is None) == (theirs is None)
    if mine is None:
        return
    if "content" in mine:  # chat
        assert [entry["token"] for entry in mine["content"]] == [entry["token"] for entry in theirs["content"]]
        for a, b in zip(mine["content"], theirs["content"], strict=True):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
            assert [alt["token"] for alt in a["top_logprobs"]] == [alt["token"] for alt in b["top_logprobs"]]
            assert [alt["logprob"] for alt in a["top_logprobs"]] == pytest.approx(
                [alt["logprob"] for alt in b["top_logprobs"]], abs=1e-3)
        return
    assert mine["tokens"] == theirs["tokens"] and mine["text_offset"] == theirs["text_offset"]
    assert [value is None for value in mine["token_logprobs"]] == [value is None for value in theirs["token_logprobs"]]
    assert [v for v in mine["token_logprobs"] if v is not None] == pytest.approx(
        [v for v in theirs["token_logprobs"] if v is not None], abs=1e-3)
    for a, b in zip(mine["top_logprobs"], theirs["top_logprobs"], strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.keys() == b.keys() and list(a.values()) == pytest.approx(list(b.values()), abs=1e-3)
