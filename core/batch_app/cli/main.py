"""`batchctl` commands. User commands talk to the API over HTTP; operator commands (workers,
diagnose, keys, worker reset, server restart) read the database of the stack configured by `.env`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from ..config import get_settings
from ..domain.statuses import BatchStatus
from ..slurm.elastic import ElasticOptions
from . import api_commands, operator_commands, slurm
from .diagnose import report
from .errors import CommandError, run_reporting_errors

if TYPE_CHECKING:
    from openai import OpenAI

app = typer.Typer(name="batchctl", help="Submit and follow batches, and look after the server that runs them.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
worker_app = typer.Typer(help="Supervised workers.", no_args_is_help=True)
server_app = typer.Typer(help="vLLM servers the watchdog runs (server slots of WORKERS).", no_args_is_help=True)
slurm_app = typer.Typer(help="Workers as SLURM jobs on a research cluster.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(worker_app, name="worker")
app.add_typer(server_app, name="server")
app.add_typer(slurm_app, name="slurm")


class _Options:
    api_url = ""
    api_key = ""


options = _Options()


def _default_api_url() -> str:
    settings = get_settings()
    host = "127.0.0.1" if settings.api_host in ("0.0.0.0", "::", "") else settings.api_host
    return f"http://{host}:{settings.api_port}/v1"


@app.callback()
def main(
    api_url: Annotated[Optional[str], typer.Option(envvar="BATCHCTL_API_URL",
                                                   help="API base URL (default: from API_HOST/API_PORT)")] = None,
    api_key: Annotated[Optional[str], typer.Option(envvar="BATCHCTL_API_KEY",
                                                   help="API key (default: API_KEY from .env)")] = None,
) -> None:
    options.api_url = api_url or _default_api_url()
    options.api_key = api_key or get_settings().api_key


def _client() -> OpenAI:
    from openai import OpenAI  # imported by the user's commands only: it costs an operator command seconds

    # The SDK insists on a key; an open server (OPEN_ACCESS) accepts any.
    return OpenAI(base_url=options.api_url, api_key=options.api_key or "none", max_retries=2, timeout=300)


def _parse_metadata(pairs: list[str]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"metadata must be KEY=VALUE, got {pair!r}")
        metadata[key] = value
    return metadata


@app.command()
def submit(
    file: Annotated[Path, typer.Argument(help="JSONL file of requests")],
    endpoint: Annotated[Optional[str], typer.Option(help="/v1/chat/completions, /v1/completions or /v1/embeddings "
                                                         "(default: the url of the file's first line)")] = None,
    completion_window: Annotated[str, typer.Option("--completion-window", "--window")] = "24h",
    metadata: Annotated[list[str] | None, typer.Option(help="KEY=VALUE, repeatable")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow progress, then download the results")] = False,
    output_dir: Annotated[Path, typer.Option(help="where --wait puts the output and error files")] = Path("."),
    poll: Annotated[float, typer.Option(help="seconds between progress updates")] = 2.0,
) -> None:
    """Upload FILE and create a batch from it."""
    client = _client()
    batch = api_commands.submit(client, file, endpoint, completion_window, _parse_metadata(metadata or []))
    if not wait:
        return
    batch = api_commands.wait(client, batch.id, poll)
    api_commands.show(batch)
    api_commands.download(client, batch, output_dir)
    if batch.status != BatchStatus.COMPLETED:
        raise CommandError(f"batch {batch.id} ended {batch.status}")


@app.command()
def status(batch_id: Annotated[Optional[str], typer.Argument(help="(default: the latest batch)")] = None) -> None:
    """Show a batch: status, counts, tokens, timestamps, files and errors."""
    client = _client()
    api_commands.show(client.batches.retrieve(batch_id) if batch_id else api_commands.latest(client))


@app.command("list")
def list_batches(limit: Annotated[int, typer.Option(min=1, max=100)] = 20) -> None:
    """List the latest batches."""
    api_commands.list_table(_client(), limit)


@app.command()
def cancel(batch_id: str) -> None:
    """Cancel a batch: unfinished requests stop; finished results are kept."""
    batch = _client().batches.cancel(batch_id)
    api_commands.console.print(f"batch {batch.id}: {batch.status}")


@app.command()
def retry(batch_id: str) -> None:
    """Run again only the failed, expired and cancelled lines of a finished batch, as a new batch."""
    batch = api_commands.retry(_client(), batch_id)
    api_commands.console.print(f"batch {batch.id} ({batch.request_counts.total if batch.request_counts else 0} "
                               f"lines of {batch_id}): {batch.status}")


@app.command()
def download(batch_id: str, output_dir: Annotated[Path, typer.Option()] = Path(".")) -> None:
    """Download a batch's output and error files."""
    client = _client()
    api_commands.download(client, client.batches.retrieve(batch_id), output_dir)


@app.command()
def workers() -> None:
    """Workers: status, heartbeat age, progress, restarts in the last hour, model, pid, host."""
    operator_commands.workers_table(operator_commands.connect(get_settings()))


@app.command()
def backends() -> None:
    """Backends of pool workers: state, requests in flight and answered, failed tries, last error."""
    operator_commands.backends_table(operator_commands.connect(get_settings()))


@app.command()
def diagnose() -> None:
    """One report of ports, API, database, workers, restarts, logs, GPUs and disk."""
    print(report(get_settings(), options.api_url))


@app.command()
def storage() -> None:
    """The database's size per table, what finished batches still hold, the oldest history and
    what retention deletes next."""
    settings = get_settings()
    operator_commands.storage_report(operator_commands.connect(settings), settings)


@keys_app.command("create")
def keys_create(project: Annotated[str, typer.Option()] = "default",
                name: Annotated[str, typer.Option()] = "") -> None:
    """Create an API key for PROJECT and print it (shown once; only its hash is stored)."""
    print(operator_commands.create_api_key(operator_commands.connect(get_settings()), project, name))


@keys_app.command("list")
def keys_list() -> None:
    """List API keys: id, project, name, created, and the start of the stored hash (never the key)."""
    operator_commands.keys_table(operator_commands.connect(get_settings()))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[int, typer.Argument(help="the id from batchctl keys list")]) -> None:
    """Revoke an API key at once."""
    operator_commands.revoke(operator_commands.connect(get_settings()), key_id)


@worker_app.command("reset")
def worker_reset(name: str, host: Annotated[Optional[str], typer.Option(help="(default: HOST_NAME, this host)")] = None) -> None:
    """Clear a worker stopped at the restart cap; the watchdog starts it again."""
    settings = get_settings()
    operator_commands.reset_worker(operator_commands.connect(settings), name, host or settings.host_name)


@app.command("webhooks")
def webhooks_list() -> None:
    """The latest webhook deliveries: event, endpoint, status, tries, the last answer and error."""
    operator_commands.webhooks_table(operator_commands.connect(get_settings()))


@server_app.command("restart")
def server_restart(name: str, host: Annotated[Optional[str], typer.Option(help="(default: HOST_NAME, this host)")] = None) -> None:
    """Restart a server slot gracefully: it stops taking requests, what it holds finishes or moves to
    the other servers of its pool, then it starts again (not counted against the restart cap)."""
    settings = get_settings()
    operator_commands.restart_server(operator_commands.connect(settings), name, host or settings.host_name)


@slurm_app.command("up")
def slurm_up(
    max_jobs: Annotated[Optional[int], typer.Option(min=1, help="worker jobs at once (default: SLURM_MAX_JOBS)")] = None,
    script: Annotated[Optional[Path], typer.Option(help="job script (default: SLURM_JOB_SCRIPT)")] = None,
    idle_exit: Annotated[Optional[float], typer.Option(min=1, help="seconds a job stays with nothing to do "
                                                                    "(default: SLURM_IDLE_EXIT)")] = None,
    poll_interval: Annotated[Optional[float], typer.Option(min=0.1, help="seconds between looks at the queue "
                                                                          "(default: SLURM_POLL_INTERVAL)")] = None,
    sbatch_options: Annotated[Optional[list[str]], typer.Argument(help="options for sbatch, after --, e.g. -- "
                                                                       "--partition=gpu --gres=gpu:1")] = None,
) -> None:
    """Submit worker jobs while queued requests wait for a model no live worker serves; the jobs
    end by themselves when idle. Runs until Ctrl-C."""
    settings = get_settings()
    slurm.up(settings, ElasticOptions(script=script or settings.slurm_job_script,
                                      max_jobs=max_jobs or settings.slurm_max_jobs,
                                      idle_exit=idle_exit or settings.slurm_idle_exit,
                                      poll_interval=poll_interval or settings.slurm_poll_interval,
                                      sbatch_options=tuple(sbatch_options or ())))


def run() -> None:
    """The console script: every failure is one line on stderr."""
    if not sys.stdout.isatty():
        os.environ.setdefault("COLUMNS", "120")  # tables stay readable when piped or captured
    run_reporting_errors(lambda: app(prog_name="batchctl"), lambda: options.api_url or _default_api_url())
