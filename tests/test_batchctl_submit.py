"""`batchctl submit --endpoint`, through the installed entry point, against a real API server and a
real watchdog whose worker runs the echo test engine: the batch is created for the endpoint given,
whatever the file's first line says (README: `batchctl submit requests.jsonl --endpoint
/v1/embeddings --metadata team=search`)."""

from __future__ import annotations

import json
import re

import pytest

from .conftest import API_KEY, batchctl, echo_slot, live_worker, start_watchdog, wait_for, wait_for_batch
from .jsonl import jsonl, request_line

MODEL = "submit-echo"


@pytest.fixture(scope="module")
def submit_env(database, data_dir, db, api):
    """The environment batchctl needs to reach a stack whose echo worker serves MODEL."""
    watchdog = start_watchdog(database, data_dir, "watchdog-batchctl-submit", [echo_slot(MODEL)],
                              HEARTBEAT_INTERVAL="0.5", SHUTDOWN_GRACE="5")
    try:
        wait_for(lambda: live_worker(db, MODEL), 60, message="echo worker up")
        yield dict(watchdog.env, BATCHCTL_API_URL=f"{api.base_url}/v1", BATCHCTL_API_KEY=API_KEY,
                   API_PORT=str(api.port))
    finally:
        assert watchdog.stop() == 0


def _created(result) -> str:
    """The id of the batch `batchctl submit` says it created."""
    assert result.returncode == 0, result.stderr
    return re.search(r"created batch (batch_\w+)", result.stdout).group(1)


def test_submit_with_an_endpoint_creates_a_batch_for_that_endpoint_which_runs(submit_env, client, tmp_path):
    source = tmp_path / "requests.jsonl"
    source.write_bytes(jsonl([request_line(f"e{i}", MODEL, url="/v1/embeddings") for i in range(10)]))
    batch_id = _created(batchctl(submit_env, "submit", str(source), "--endpoint", "/v1/embeddings",
                                 "--metadata", "team=search"))
    batch = client.batches.retrieve(batch_id)
    assert batch.endpoint == "/v1/embeddings" and batch.metadata == {"team": "search"}
    done = wait_for_batch(client, batch_id, 60)
    assert done.status == "completed" and done.request_counts.completed == 10, done
    lines = [json.loads(line) for line in client.files.content(done.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"e{i}" for i in range(10))


def test_submit_with_an_endpoint_uses_it_over_the_url_of_the_file_s_first_line(submit_env, client, tmp_path):
    source = tmp_path / "chat.jsonl"
    source.write_bytes(jsonl([request_line(f"c{i}", MODEL) for i in range(3)]))  # /v1/chat/completions lines
    batch_id = _created(batchctl(submit_env, "submit", str(source), "--endpoint", "/v1/completions"))
    batch = wait_for_batch(client, batch_id, 60)
    assert batch.endpoint == "/v1/completions"
    # The file is checked against the endpoint given: none of its lines matches it.
    assert batch.status == "failed"
    assert [(e.code, e.line) for e in batch.errors.data] == [("url_mismatch", 1), ("url_mismatch", 2), ("url_mismatch", 3)]
    assert "does not match the batch endpoint '/v1/completions'" in batch.errors.data[0].message
