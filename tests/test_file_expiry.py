"""File expiry as OpenAI defines it, through the official SDK: `expires_after` on uploads,
`output_expires_after` on batches, FILE_RETENTION for the rest, OpenAI's bounds and errors, and
housekeeping deleting what expired while the batch keeps its record."""

from __future__ import annotations

import openai
import pytest
import sqlalchemy as sa

from .conftest import echo_slot, live_worker, running_watchdog, start_api, wait_for, wait_for_batch
from .jsonl import jsonl, request_line


@pytest.fixture(scope="module")
def quick_api(database, data_dir):
    """An API whose expiry bounds are seconds, not hours, and whose files live 60 s by default."""
    server = start_api(database, data_dir, "api-expiry", MIN_FILE_EXPIRY="1", FILE_RETENTION="60")
    yield server
    server.stop()


def listed(client) -> set[str]:
    return {file.id for file in client.files.list()}


def gone(client, file_id: str) -> bool:
    try:
        client.files.retrieve(file_id)
    except openai.NotFoundError:
        return file_id not in listed(client)
    return False


def stored(db, file_id: str) -> bool:
    with db.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM files WHERE id = :id"), {"id": file_id}).scalar() == 1


def test_files_and_batch_outputs_expire_and_are_deleted(database, data_dir, db, quick_api):
    client = quick_api.client()
    slot = "expiry-0"
    with running_watchdog(database, data_dir, "watchdog-expiry", [echo_slot(slot)], HOUSEKEEPING_INTERVAL="0.5"):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        kept = client.files.create(file=("kept.jsonl", jsonl([request_line("a", slot)])), purpose="batch")
        assert kept.expires_at == kept.created_at + 60  # FILE_RETENTION
        brief = client.files.create(file=("brief.jsonl", jsonl([request_line(f"r{i}", slot) for i in range(5)])),
                                    purpose="batch", expires_after={"anchor": "created_at", "seconds": 3})
        assert brief.expires_at == brief.created_at + 3
        batch = client.batches.create(input_file_id=brief.id, endpoint="/v1/chat/completions",
                                      completion_window="24h",
                                      output_expires_after={"anchor": "created_at", "seconds": 4})
        done = wait_for_batch(client, batch.id, 60)
        assert done.status == "completed"
        output = client.files.retrieve(done.output_file_id)
        assert output.expires_at == output.created_at + 4

        wait_for(lambda: gone(client, brief.id), 30, message="the input file gone")
        with pytest.raises(openai.NotFoundError):
            client.files.content(brief.id)
        wait_for(lambda: not stored(db, brief.id), 30, message="housekeeping deleting the input file")
        wait_for(lambda: gone(client, output.id) and not stored(db, output.id), 30, message="the output file gone")
        # The batch keeps its own record; its files are gone as OpenAI's are.
        again = client.batches.retrieve(batch.id)
        assert (again.status, again.input_file_id, again.request_counts.completed) == ("completed", brief.id, 5)
        assert kept.id in listed(client) and stored(db, kept.id)
        # An expired file cannot start a batch.
        with pytest.raises(openai.NotFoundError):
            client.batches.create(input_file_id=brief.id, endpoint="/v1/chat/completions", completion_window="24h")


BOUNDS = "expires_after.seconds must be an integer from 3600 to 2592000."


@pytest.mark.parametrize("policy, param, message", [
    ({"anchor": "last_accessed_at", "seconds": 3600}, "expires_after.anchor", "expires_after.anchor must be 'created_at'."),
    ({"anchor": "created_at", "seconds": 10}, "expires_after.seconds", BOUNDS),
    ({"anchor": "created_at", "seconds": 31 * 24 * 3600}, "expires_after.seconds", BOUNDS),
])
def test_an_expiry_outside_openais_bounds_is_refused(client, policy, param, message):
    with pytest.raises(openai.BadRequestError) as refused:
        client.files.create(file=("x.jsonl", jsonl([request_line("a", "m")])), purpose="batch", expires_after=policy)
    assert refused.value.body["param"] == param and refused.value.body["code"] == "invalid_value"
    assert refused.value.body["message"] == message


def test_an_output_expiry_outside_the_bounds_is_refused(client):
    file = client.files.create(file=("x.jsonl", jsonl([request_line("a", "m")])), purpose="batch")
    assert file.expires_at is None  # the shared stack keeps files until deleted
    with pytest.raises(openai.BadRequestError) as refused:
        client.batches.create(input_file_id=file.id, endpoint="/v1/chat/completions", completion_window="24h",
                              output_expires_after={"anchor": "created_at", "seconds": 60})
    assert refused.value.body["param"] == "output_expires_after.seconds"
