"""The operator's commands, read from and written to the database: workers, backends, keys,
worker reset."""

from __future__ import annotations

from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from ..config import Settings
from ..database import Database, embedded_pgdata, embedded_running, open_configured
from ..domain import overview, retention, webhooks
from ..domain.keys import create_key, list_keys, revoke_key
from ..domain.overview import describe_age, describe_allowance
from ..domain.registry import is_server_slot, request_command, reset_restarts, slot_has_run
from ..domain.statuses import SlotCommand, SlotKind, WorkerStatus
from .errors import CommandError

console = Console()
STATUS_STYLE = {WorkerStatus.BUSY: "green", WorkerStatus.IDLE: "green", WorkerStatus.LOADING: "yellow",
                WorkerStatus.NO_BACKEND: "bold red",
                WorkerStatus.DRAINING: "yellow", WorkerStatus.STOPPED: "dim", WorkerStatus.DEAD: "bold red"}


def connect(settings: Settings) -> Database:
    """The stack's database; an embedded one must already run (this never starts a server)."""
    if not settings.database_url and not embedded_running(settings):
        raise CommandError(f"the database is not running: DATABASE_URL is empty and no embedded PostgreSQL "
                           f"runs under {embedded_pgdata(settings)} (start the stack with scripts/start-all.sh)")
    return open_configured(settings, pool_size=1, process="batchctl")


def workers_table(db: Database) -> None:
    with db.connect() as conn:
        rows = overview.workers(conn)
    if not rows:
        console.print("no worker has registered yet (is the watchdog running? scripts/start-all.sh)")
        return
    table = Table(Column("slot", no_wrap=True), "kind", "status", "heartbeat", "progress", "restarts (1 h)", "model",
                  Column("pid", no_wrap=True), "host", "SLURM job")
    for row in rows:
        style = STATUS_STYLE.get(row.status, "")
        # A server's heartbeat is its last passed health check; the probe says how the last one went.
        progress = (f"{row.requests_done} answered, {row.in_flight} in flight; {row.probe or 'not probed yet'}"
                    if row.kind == SlotKind.SERVER else
                    f"{row.requests_done} done, {row.tokens_done} tokens, {row.in_flight} in flight")
        table.add_row(row.slot, row.kind, f"[{style}]{row.status}[/{style}]" if style else row.status,
                      f"{describe_age(row.heartbeat_age)} ago", progress,
                      str(row.restarts_last_hour), row.model, str(row.pid), row.host, overview.scheduler_place(row))
    console.print(table)


def backends_table(db: Database) -> None:
    with db.connect() as conn:
        rows = overview.backends(conn)
    if not rows:
        console.print("no pool worker reports backends (set BACKENDS, or a WORKERS entry with engine openai-http)")
        return
    # An error's text can be a page long: bounded, it does not squeeze the other columns' headers.
    table = Table(Column("worker", no_wrap=True), Column("backend", no_wrap=True), "model", "state", "in flight",
                  "batch allowance", "answered", Column("failed tries", max_width=40),
                  Column("last error", max_width=80), "checked")
    for row in rows:
        style = "green" if row.state == "healthy" else "bold red"
        failed = ", ".join(f"{kind} {n}" for kind, n in sorted(row.errors.items())) or "0"
        checked = f"{describe_age(row.checked_age)} ago" if row.checked_age is not None else "not yet"
        table.add_row(row.slot, row.url, row.model, f"[{style}]{row.state}[/{style}]", str(row.in_flight),
                      describe_allowance(row), str(row.completed), failed, row.last_error or "", checked)
    console.print(table)


def webhooks_table(db: Database) -> None:
    with db.connect() as conn:
        rows = webhooks.recent_deliveries(conn)
    if not rows:
        console.print("no webhook deliveries yet (endpoints are made with the SDK: client.webhooks.create)")
        return
    table = Table(Column("event", no_wrap=True), "type", Column("endpoint", no_wrap=True), "project", "status",
                  "tries", "last answer", "last error", "next try")
    for row in rows:
        style = {"delivered": "green", "failed": "bold red"}.get(row.status, "yellow")
        next_try = f"in {describe_age(row.next_in)}" if row.status == "pending" else ""
        table.add_row(_as_written(row.event_id), _as_written(row.type), _as_written(row.url),
                      _as_written(row.project), Text(row.status, style=style), str(row.attempts),
                      "" if row.last_status_code is None else str(row.last_status_code),
                      _as_written(row.last_error), next_try)
    console.print(table)


def _as_written(value: str) -> Text:
    """Text from outside (a tenant's URL, a receiver's answer) shown as it is: never read as Rich
    markup, and control characters (terminal escapes) shown escaped."""
    return Text("".join(char if char.isprintable() else repr(char)[1:-1] for char in value))


def create_api_key(db: Database, project: str, name: str) -> str:
    with db.begin() as conn:
        return create_key(conn, project, name)


def keys_table(db: Database) -> None:
    with db.connect() as conn:
        rows = list_keys(conn)
    if not rows:
        console.print("no live API keys: the API refuses every request unless OPEN_ACCESS=true "
                      "(set API_KEY or batchctl keys create)")
        return
    table = Table(Column("id", no_wrap=True), "project", "name", "created", Column("hash starts", no_wrap=True))
    for row in rows:
        table.add_row(str(row.id), row.project, row.name, row.created_at.strftime("%Y-%m-%d %H:%M:%S %Z"),
                      row.hash_prefix)
    console.print(table)


def revoke(db: Database, key_id: int) -> None:
    with db.begin() as conn:
        if not revoke_key(conn, key_id):
            raise CommandError(f"no API key with id {key_id} (see batchctl keys list)")
    console.print(f"key {key_id} revoked: requests presenting it are refused from now on, for good")


def restart_server(db: Database, slot: str, host: str) -> None:
    with db.begin() as conn:
        if not is_server_slot(conn, host, slot):
            raise CommandError(f"no server slot named {slot!r} has run on host {host!r} (see batchctl workers)")
        request_command(conn, host, slot, SlotCommand.RESTART)
    console.print(f"server {slot} on {host}: restart asked; its watchdog stops it gracefully within a few seconds "
                  f"(what it holds finishes or moves to the other servers) and starts it again")


def reset_worker(db: Database, slot: str, host: str) -> None:
    with db.begin() as conn:
        if not slot_has_run(conn, host, slot):
            raise CommandError(f"no worker named {slot!r} has run on host {host!r} (see batchctl workers)")
        reset_restarts(conn, host, slot)
    console.print(f"worker {slot} on {host} reset: the watchdog starts it again within a few seconds")


def storage_report(db: Database, settings: Settings) -> None:
    """The database's size per table, what finished batches still hold in the queue's table, the
    oldest history, and what the next retention round deletes."""
    with db.connect() as conn:
        tables, held, oldest, due = (overview.table_bytes(conn), overview.finished_held(conn),
                                     overview.oldest(conn), retention.due(conn, settings))
    table = Table("table", Column("size", justify="right"), Column("rows (estimate)", justify="right"))
    for row in tables:
        table.add_row(row.table, _size(row.bytes), f"{row.rows:,}")
    table.add_row("[bold]all[/bold]", f"[bold]{_size(sum(row.bytes for row in tables))}[/bold]", "")
    console.print(table)
    console.print(f"finished batches whose request rows are not deleted yet: {held.batches:,} "
                  f"({held.rows:,} rows, {_size(held.bytes)})")
    console.print("oldest: " + ", ".join(f"{kind.replace('_', ' ')} {f'{at:%Y-%m-%d %H:%M %Z}' if at else 'none'}"
                                         for kind, at in oldest.items()))
    console.print("next retention round deletes: " + ", ".join(f"{n:,} {kind}" for kind, n in due.items()))
    console.print(f"retention: finished requests after {describe_age(settings.finished_requests_retention)}, "
                  f"webhook deliveries and events after {describe_age(settings.webhook_delivery_retention)}, "
                  f"stopped workers after {describe_age(settings.worker_history_retention)}, "
                  f"restart history after {describe_age(settings.restart_history_retention)}")


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:,.1f} {unit}"
        count /= 1024
    return ""
