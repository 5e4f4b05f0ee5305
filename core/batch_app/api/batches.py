"""Batches API: create, retrieve, list, cancel."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..domain import batches, finalize, results
from ..domain.batch_format import FINAL_STATUSES, MAX_WAIT
from ..domain.query import run
from ..domain.statuses import BatchStatus
from .batch_endings import RECHECK
from .deps import DB, AppSettings, DBReads, Project
from .errors import APIError, documented

router = APIRouter(prefix="/v1/batches", tags=["batches"])

MAX_LINES_SO_FAR = 10_000  # lines of one call of GET /v1/batches/{id}/output


class BatchCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input_file_id: str
    endpoint: str
    completion_window: str
    metadata: dict[str, str] | None = None
    output_expires_after: dict | None = None  # {"anchor": "created_at", "seconds": N}
    # Not in OpenAI's API: orders work between batches (higher first); send it as an extra body field.
    priority: Annotated[int, Field(ge=-(2**31), le=2**31 - 1)] = 0

    @field_validator("input_file_id", "endpoint", "completion_window", "metadata")
    @classmethod
    def _no_nul(cls, value):
        """PostgreSQL text cannot hold NUL: refused as a 400 naming the field, not a 500."""
        texts = [value] if isinstance(value, str) else [*value.keys(), *value.values()] if value else []
        if any("\x00" in text for text in texts):
            raise ValueError("must not contain a NUL byte")
        return value


# Where a new batch's id is used next, for OpenAPI clients (and schemathesis' stateful phase).
_BATCH_LINKS = {200: {"description": "The new batch", "links": {
    operation: {"operationId": operation, "parameters": {"batch_id": "$response.body#/id"}}
    for operation in ("retrieveBatch", "cancelBatch")}}}


@router.post("", responses={**_BATCH_LINKS, **documented(400, 401, 404, 429, 503)}, operation_id="createBatch")
def create_batch(body: BatchCreate, db: DB, settings: AppSettings, project: Project) -> dict:
    batch_id = batches.create_batch(
        db, settings, project=project, input_file_id=body.input_file_id, endpoint=body.endpoint,
        completion_window=body.completion_window, metadata=body.metadata, priority=body.priority,
        output_expires_after=body.output_expires_after)
    with db.connect() as conn:
        return run(conn, batches.get_batch(project, batch_id))


@router.get("", responses=documented(400, 401, 503), operation_id="listBatches")
async def list_batches(reads: DBReads, project: Project, after: str | None = None,
                       limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    return await reads.run(batches.list_batches(project, after, limit))


@router.get("/{batch_id}", responses=documented(400, 401, 404, 503), operation_id="retrieveBatch")
async def retrieve_batch(batch_id: str, reads: DBReads, project: Project, request: Request,
                         wait: Annotated[float, Query(ge=0, le=MAX_WAIT)] = 0) -> dict:
    """`wait` (not in OpenAI's API; the SDK sends it with `extra_query`) holds the answer up to
    that many seconds until the batch reaches a final status, so a client sees the end at once
    instead of at its next poll."""
    if not wait:
        return await reads.run(batches.get_batch(project, batch_id))
    deadline = time.monotonic() + wait
    with request.app.state.batch_endings.watch(batch_id) as changed:
        while True:
            changed.clear()
            batch = await reads.run(batches.get_batch(project, batch_id))
            left = deadline - time.monotonic()
            if batch["status"] in FINAL_STATUSES or left <= 0:
                return batch
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), min(left, RECHECK))


@router.get("/{batch_id}/output", response_class=Response, operation_id="downloadBatchOutputSoFar", responses={
    200: {"description": "The succeeded lines so far, JSONL, in the order they finished",
          "content": {"application/jsonl": {"schema": {"type": "string"}}}},
    **documented(400, 401, 404, 410, 503)})
def output_so_far(batch_id: str, db: DB, settings: AppSettings, project: Project,
                  after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
                  limit: Annotated[int, Query(ge=1, le=MAX_LINES_SO_FAR)] = MAX_LINES_SO_FAR) -> Response:
    """Not in OpenAI's API: the output lines a batch has so far, running or not, in the order they
    finished, after the first `after` of them (what an earlier call returned), at most `limit` and
    about OUTPUT_PAGE_BYTES. `X-Next-After` is the `after` of the next call; the lines end up those
    of the output file, which an ended batch's pages are read from (410 once it is deleted)."""
    body, count = results.output_page(db, project, batch_id, after, limit, settings.output_page_bytes)
    return Response(body, media_type="application/jsonl", headers={"X-Next-After": str(after + count)})


@router.post("/{batch_id}/retry", responses=documented(400, 401, 404, 409, 429, 503), operation_id="retryBatch")
def retry_batch(batch_id: str, db: DB, settings: AppSettings, project: Project) -> dict:
    """Not in OpenAI's API: a new batch of this finished batch's failed, expired and cancelled
    lines only, taken from its input file (409 once that is deleted), its metadata naming the
    parent (`retry_of`)."""
    new_id = results.retry_batch(db, settings, project=project, batch_id=batch_id)
    with db.connect() as conn:
        return run(conn, batches.get_batch(project, new_id))


@router.post("/{batch_id}/cancel", responses=documented(400, 401, 404, 409, 503), operation_id="cancelBatch")
def cancel_batch(batch_id: str, db: DB, project: Project) -> dict:
    with db.connect() as conn:
        status = run(conn, batches.get_batch(project, batch_id))["status"]
    if status not in (BatchStatus.CANCELLING, BatchStatus.CANCELLED) and not finalize.cancel(db, batch_id):
        raise APIError(409, f"Batch '{batch_id}' is {status} and can no longer be cancelled.",
                       param="batch_id", code="batch_not_cancellable")
    with db.connect() as conn:
        return run(conn, batches.get_batch(project, batch_id))
