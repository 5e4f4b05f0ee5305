"""The user's commands, over the HTTP API with the official `openai` client: submit, status, list,
cancel, download."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.table import Column, Table
from rich.text import Text

from ..domain.batch_format import ENDPOINTS, FINAL_STATUSES, MAX_WAIT
from .errors import CommandError

if TYPE_CHECKING:
    from openai import OpenAI
    from openai.types import Batch

console = Console()


def endpoint_of(path: Path) -> str:
    """The endpoint named by the file's first request, so `--endpoint` can be left out."""
    with open(path, "rb") as file:
        for raw in file:
            if raw.strip():
                try:
                    url = json.loads(raw).get("url")
                except (ValueError, AttributeError):
                    break
                if url in ENDPOINTS:
                    return url
                break
    raise CommandError(f"cannot tell the endpoint from the first line of {path}; pass --endpoint")


def submit(client: OpenAI, path: Path, endpoint: str | None, window: str, metadata: dict[str, str]) -> Batch:
    if not path.is_file():
        raise CommandError(f"no such file: {path}")
    endpoint = endpoint or endpoint_of(path)
    with open(path, "rb") as file:
        uploaded = client.files.create(file=(path.name, file), purpose="batch")
    console.print(f"uploaded {path} as {uploaded.id} ({uploaded.bytes} bytes)")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window=window,
                                  metadata=metadata or None)
    console.print(f"created batch [bold]{batch.id}[/bold] ({batch.status})")
    return batch


class _CountsColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        fields = task.fields
        return Text(f"{fields['ok']} ok / {fields['failed']} failed / {fields['requests']} total")


class _RateColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"{task.fields['tokens_per_second']:,.0f} tok/s")


class _EtaColumn(ProgressColumn):
    """ETA from the requests finished since we started watching, which rich's own column cannot know."""

    def render(self, task: Task) -> Text:
        eta = task.fields["eta"]
        return Text("ETA --:--" if eta is None else f"ETA {int(eta) // 60:02d}:{int(eta) % 60:02d}")


def wait(client: OpenAI, batch_id: str, poll_seconds: float) -> Batch:
    """Follow a batch with a live progress bar until it ends."""
    batch = client.batches.retrieve(batch_id)
    started, first_done, first_tokens = time.monotonic(), _done(batch), _tokens(batch)
    columns = [TextColumn("{task.description}"), BarColumn(), _CountsColumn(), _RateColumn(), _EtaColumn(),
               TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(batch.status, total=None, **_fields(batch, 0.0, None))
        while True:
            elapsed = time.monotonic() - started
            done = _done(batch)
            rate = (done - first_done) / elapsed if elapsed > 0 else 0.0
            total = batch.request_counts.total if batch.request_counts else 0
            eta = (total - done) / rate if rate > 0 and total else None
            tokens_per_second = (_tokens(batch) - first_tokens) / elapsed if elapsed > 0 else 0.0
            progress.update(task, description=batch.status, total=total or None, completed=done,
                            **_fields(batch, tokens_per_second, eta))
            if batch.status in FINAL_STATUSES:
                return batch
            # Held by the server up to poll_seconds (at most MAX_WAIT), answered as soon as the batch ends.
            batch = client.batches.retrieve(batch_id, extra_query={"wait": min(poll_seconds, MAX_WAIT)})


def _done(batch: Batch) -> int:
    counts = batch.request_counts
    return counts.completed + counts.failed if counts else 0


def _tokens(batch: Batch) -> int:
    return batch.usage.output_tokens if batch.usage else 0


def _fields(batch: Batch, tokens_per_second: float, eta: float | None) -> dict:
    counts = batch.request_counts
    return {"ok": counts.completed if counts else 0, "failed": counts.failed if counts else 0,
            "requests": counts.total if counts else 0, "tokens_per_second": tokens_per_second, "eta": eta}


def download(client: OpenAI, batch: Batch, directory: Path) -> list[Path]:
    """Write the batch's output and error files into `directory`; returns the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for file_id, suffix in ((batch.output_file_id, "output"), (batch.error_file_id, "errors")):
        if file_id:
            path = directory / f"{batch.id}_{suffix}.jsonl"
            client.files.content(file_id).write_to_file(path)
            written.append(path)
            console.print(f"{suffix:>6}: {path}")
    if not written:
        console.print(f"batch {batch.id} has no output or error file ({batch.status})")
    return written


def show(batch: Batch) -> None:
    counts = batch.request_counts
    table = Table(show_header=False, box=None)
    table.add_row("batch", f"[bold]{batch.id}[/bold]")
    table.add_row("status", batch.status)
    table.add_row("endpoint", batch.endpoint)
    table.add_row("model", batch.model or "")
    if counts:
        table.add_row("requests", f"{counts.completed} completed, {counts.failed} failed, {counts.total} total")
    if batch.usage:
        table.add_row("tokens", f"{batch.usage.input_tokens} in, {batch.usage.output_tokens} out")
    for name in ("created_at", "in_progress_at", "finalizing_at", "completed_at", "failed_at", "expired_at",
                 "cancelling_at", "cancelled_at", "expires_at"):
        value = getattr(batch, name)
        if value:
            table.add_row(name, time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(value)))
    table.add_row("output file", batch.output_file_id or "")
    table.add_row("error file", batch.error_file_id or "")
    if batch.metadata:
        table.add_row("metadata", json.dumps(batch.metadata))
    console.print(table)
    for error in (batch.errors.data or []) if batch.errors else []:
        console.print(f"[red]error[/red] line {error.line}: {error.code}: {error.message}")


def retry(client: OpenAI, batch_id: str) -> Batch:
    """POST /v1/batches/{id}/retry (ours, not in the SDK's resources)."""
    from openai.types import Batch

    return client.post(f"/batches/{batch_id}/retry", cast_to=Batch)


def latest(client: OpenAI) -> Batch:
    page = client.batches.list(limit=1)
    if not page.data:
        raise CommandError("there are no batches yet")
    return page.data[0]


def list_table(client: OpenAI, limit: int) -> None:
    # Ids are copied from here: never wrapped.
    table = Table(Column("batch", no_wrap=True), "status", "endpoint", "model", "done / total", "created")
    for batch in client.batches.list(limit=limit).data:
        counts = batch.request_counts
        done = f"{counts.completed + counts.failed} / {counts.total}" if counts else ""
        table.add_row(batch.id, batch.status, batch.endpoint, batch.model or "", done,
                      time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(batch.created_at)))
    console.print(table)
