"""The database schema, as SQLAlchemy Core tables.

Alembic revisions in `migrations/` create it; `alembic check` compares them against this file.
Timestamps are `timestamptz` so heartbeat ages are computed by the database clock alone.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Table,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSON, JSONB, TIMESTAMP, UUID

from .statuses import (
    FINAL_BATCH_STATUSES,
    BatchStatus,
    DeathCause,
    DeliveryStatus,
    RequestStatus,
    SlotCommand,
    SlotKind,
    WorkerStatus,
    sql_list,
)

metadata = MetaData()


def _status_check(table: str, statuses: type, column: str = "status") -> CheckConstraint:
    """Only the statuses of statuses.py (migration 0003 adds these to existing databases)."""
    return CheckConstraint(f"{column} IN ({sql_list(statuses)})", name=f"{table}_{column}_known")



def _now_column(name: str) -> Column:
    return Column(name, TIMESTAMP(timezone=True), nullable=False, server_default=func.now())


def _optional_time(name: str) -> Column:
    return Column(name, TIMESTAMP(timezone=True))


api_keys = Table(
    "api_keys",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("key_hash", Text, nullable=False, unique=True),
    Column("project", Text, nullable=False),
    Column("name", Text, nullable=False, server_default=""),
    _now_column("created_at"),
    _optional_time("revoked_at"),  # a revoked key keeps its row, so it stays refused (keys.py)
)

files = Table(
    "files",
    metadata,
    Column("id", Text, primary_key=True),
    Column("project", Text, nullable=False),
    Column("purpose", Text, nullable=False),
    Column("filename", Text, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    _now_column("created_at"),
    _optional_time("expires_at"),  # None: kept until deleted
    Index("files_project_created", "project", "created_at"),
    Index("files_expiring", "expires_at", postgresql_where=text("expires_at IS NOT NULL")),
)

# File contents in ordered chunks, so every host reads the same bytes and no file is held whole.
file_chunks = Table(
    "file_chunks",
    metadata,
    Column("file_id", Text, ForeignKey("files.id", ondelete="CASCADE"), primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

batches = Table(
    "batches",
    metadata,
    Column("id", Text, primary_key=True),
    Column("project", Text, nullable=False),
    Column("endpoint", Text, nullable=False),
    Column("model", Text),
    Column("input_file_id", Text, nullable=False),
    Column("completion_window", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("total", Integer, nullable=False, server_default="0"),
    Column("errors", JSONB),
    Column("metadata", JSONB),
    Column("output_file_id", Text),
    Column("error_file_id", Text),
    # Seconds its output and error files live once built (output_expires_after or FILE_RETENTION).
    Column("output_expires_after", Integer),
    _now_column("created_at"),
    _optional_time("in_progress_at"),
    _optional_time("expires_at"),
    _optional_time("finalizing_at"),
    _optional_time("completed_at"),
    _optional_time("failed_at"),
    _optional_time("expired_at"),
    _optional_time("cancelling_at"),
    _optional_time("cancelled_at"),
    # When retention deleted its request rows (its results live in its files from its end on).
    _optional_time("requests_pruned_at"),
    Index("batches_project_id", "project", "id"),
    Index("batches_status", "status"),
    Index("batches_project_newest", "project", "created_at", "id"),  # lists: newest first
    Index("batches_newest", "created_at", "id"),
    # A project's unfinished batches, which its limits count (limits.py).
    Index("batches_project_unfinished", "project",
          postgresql_where=text(f"status NOT IN ({sql_list(FINAL_BATCH_STATUSES)})")),
    # Finished batches whose request rows are still there: what retention deletes next.
    Index("batches_unpruned", "id",
          postgresql_where=text(f"requests_pruned_at IS NULL AND status IN ({sql_list(FINAL_BATCH_STATUSES)})")),
    _status_check("batches", BatchStatus),
)

# The line numbers of a finished batch's failed, expired and cancelled requests, written with its
# files: a retry takes those lines from its input file once the request rows are gone.
unsuccessful_lines = Table(
    "unsuccessful_lines",
    metadata,
    Column("batch_id", Text, ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("lines", ARRAY(Integer), nullable=False),
)

# One row per input line: the unit of durable work.
batch_requests = Table(
    "batch_requests",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("batch_id", Text, ForeignKey("batches.id", ondelete="CASCADE"), nullable=False),
    Column("line", Integer, nullable=False),
    Column("custom_id", Text, nullable=False),
    Column("model", Text, nullable=False),
    Column("project", Text, nullable=False),  # the batch's: claims take from each project in turn
    Column("priority", Integer, nullable=False, server_default="0"),
    Column("body", JSON, nullable=False),  # as the line wrote it: jsonb would reorder its keys
    Column("status", Text, nullable=False, server_default=RequestStatus.QUEUED.value),
    Column("attempt", Integer, nullable=False, server_default="0"),  # runs, each under its own claim
    # Deaths of workers running it that may have been its fault: MAX_ATTEMPTS of them make it poison.
    Column("crashes", Integer, nullable=False, server_default="0"),
    # Runs in a row that ended with their host lost (power, a cut link): never charged, but one that
    # keeps losing its hosts is logged for an operator (WARN_AFTER_HOST_LOSSES).
    Column("host_losses", Integer, nullable=False, server_default="0"),
    Column("worker_id", UUID(as_uuid=False)),
    # A finished request keeps the HTTP status and body it answered with (the engine's own
    # rejections included); `error` holds failures that have no response (expired, poison...).
    # The body is JSON text, kept as text: jsonb refuses \u0000, which models can generate.
    Column("status_code", Integer),
    Column("response", Text),
    Column("error", JSONB),
    Column("prompt_tokens", Integer, nullable=False, server_default="0"),
    Column("completion_tokens", Integer, nullable=False, server_default="0"),
    _optional_time("claimed_at"),
    _optional_time("finished_at"),
    # The transaction that stored its result (pg_current_xact_id): the order a running batch's
    # finished part is downloaded in, which only grows at its end (queue.finished_so_far).
    Column("finished_xid", BigInteger),
    Index("batch_requests_batch_line", "batch_id", "line", unique=True),
    Index("batch_requests_batch_status", "batch_id", "status"),
    # The claim scans only queued rows: which projects wait for a model, and each one's in priority
    # then age order.
    Index(
        "batch_requests_claimable",
        "model",
        "project",
        text("priority DESC"),
        "id",
        postgresql_where=text(f"status = '{RequestStatus.QUEUED}'"),
    ),
    Index("batch_requests_worker_running", "worker_id", postgresql_where=text(f"status = '{RequestStatus.RUNNING}'")),
    # Every claim first asks whether crash survivors wait (queue.claim); without this index that
    # question reads every queued row of the model.
    Index("batch_requests_suspects", "model",
          postgresql_where=text(f"status = '{RequestStatus.QUEUED}' AND crashes > 0")),
    _status_check("batch_requests", RequestStatus),
)

# A batch's finished requests counted as they are stored, a row per worker that stored some, so
# reading a batch's request_counts and usage costs the same whatever its size, and no two
# workers write the same row (see queue._COUNT).
batch_progress = Table(
    "batch_progress",
    metadata,
    Column("batch_id", Text, ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
    Column("worker_id", UUID(as_uuid=False), primary_key=True),
    Column("completed", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("input_tokens", BigInteger, nullable=False, server_default="0"),
    Column("output_tokens", BigInteger, nullable=False, server_default="0"),
)

# One row per worker process start (a fresh UUID each time, never the hostname).
workers = Table(
    "workers",
    metadata,
    Column("id", UUID(as_uuid=False), primary_key=True),
    Column("slot", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("model", Text, nullable=False),
    Column("gpu_ids", Text, nullable=False, server_default=""),
    Column("status", Text, nullable=False),
    Column("requests_done", BigInteger, nullable=False, server_default="0"),
    Column("tokens_done", BigInteger, nullable=False, server_default="0"),
    Column("in_flight", Integer, nullable=False, server_default="0"),
    _now_column("started_at"),
    _now_column("last_seen"),
    _now_column("last_progress_at"),
    _optional_time("stopped_at"),
    # A server row is written by the watchdog that runs the server: its beat is a passed health check.
    Column("kind", Text, nullable=False, server_default=SlotKind.WORKER.value),
    Column("probe", Text, nullable=False, server_default=""),  # a server's last health check, in words
    # The scheduler's job (SLURM job id) and node the process runs in; empty outside a job.
    Column("scheduler_job", Text, nullable=False, server_default=""),
    Column("scheduler_node", Text, nullable=False, server_default=""),
    Index("workers_model_last_seen", "model", "last_seen"),
    _status_check("workers", WorkerStatus),
    _status_check("workers", SlotKind, "kind"),
)

# What operators asked of a host's watchdog (`batchctl server restart`), taken once.
slot_commands = Table(
    "slot_commands",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("host", Text, nullable=False),
    Column("slot", Text, nullable=False),
    Column("command", Text, nullable=False),
    _now_column("requested_at"),
    _optional_time("taken_at"),
    Index("slot_commands_waiting", "host", postgresql_where=text("taken_at IS NULL")),
    _status_check("slot_commands", SlotCommand, "command"),
)

# The servers of a pool worker (the `openai-http` engine), as its heartbeat last reported them.
backends = Table(
    "backends",
    metadata,
    Column("worker_id", UUID(as_uuid=False), ForeignKey("workers.id", ondelete="CASCADE"), primary_key=True),
    Column("url", Text, primary_key=True),  # as configured: metrics label backends by it
    Column("model", Text, nullable=False),
    Column("state", Text, nullable=False),  # healthy, connection_refused, timeout, http_<status>, ...
    Column("in_flight", Integer, nullable=False, server_default="0"),
    Column("completed", BigInteger, nullable=False, server_default="0"),
    Column("errors", JSONB, nullable=False, server_default="{}"),  # failed tries by error type
    Column("last_error", Text, nullable=False, server_default=""),
    _optional_time("checked_at"),
    # Batch requests it may hold while it serves interactive traffic too (NULL: the pool's fixed
    # max_in_flight_per_backend), and why (engines/batch_allowance.py).
    Column("allowance", Integer),
    Column("allowance_reason", Text, nullable=False, server_default=""),
)

# What the watchdog restarted, when and why: the hourly cap survives a watchdog restart.
worker_restarts = Table(
    "worker_restarts",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("slot", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("worker_id", UUID(as_uuid=False)),
    Column("reason", Text, nullable=False),
    Column("exit_code", Integer),
    _now_column("restarted_at"),
    Index("worker_restarts_slot_time", "host", "slot", "restarted_at"),
)

# Each host's watchdog beats here: a worker silent while its host beats is its watchdog's to judge,
# one silent together with its host was lost with it (registry.mark_silent_workers_dead).
hosts = Table(
    "hosts",
    metadata,
    Column("host", Text, primary_key=True),
    _now_column("last_seen"),
)

# Why each worker died, as whoever declared it dead saw it, and how many running requests it held:
# the rescue charges those a crash only for the causes a request may have caused (queue.CHARGED_DEATHS).
worker_deaths = Table(
    "worker_deaths",
    metadata,
    Column("worker_id", UUID(as_uuid=False), ForeignKey("workers.id", ondelete="CASCADE"), primary_key=True),
    Column("cause", Text, nullable=False),
    Column("detail", Text, nullable=False, server_default=""),
    Column("declared_by", Text, nullable=False, server_default=""),  # the host whose process declared it
    _now_column("declared_at"),
    Column("requests", Integer, nullable=False, server_default="0"),  # running requests it held, rescued
    _status_check("worker_deaths", DeathCause, "cause"),
)

# Webhook endpoints of a project (webhooks.py); the secrets are sealed (webhook_secrets.py).
webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", Text, primary_key=True),
    Column("project", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("url", Text, nullable=False),
    Column("event_types", ARRAY(Text), nullable=False),
    Column("secret", Text, nullable=False),
    Column("old_secret", Text),  # still signs until old_secret_until after a rotation that keeps it
    _optional_time("old_secret_until"),
    _now_column("created_at"),
    _now_column("updated_at"),
    # The breaker: failed tries in a row, and the pause they earned (webhooks.py's claim skips it).
    Column("failures", Integer, nullable=False, server_default="0"),
    _optional_time("paused_until"),
    Index("webhook_endpoints_project_created", "project", "created_at"),
)

# An event as it is sent (the same bytes on every try), written with the batch's ending.
webhook_events = Table(
    "webhook_events",
    metadata,
    Column("id", Text, primary_key=True),
    Column("project", Text, nullable=False),
    Column("type", Text, nullable=False),
    Column("payload", Text, nullable=False),
    _now_column("created_at"),
)

# One event to one endpoint: tried until delivered or WEBHOOK_RETRY_FOR has passed.
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", BigInteger, primary_key=True),
    Column("event_id", Text, ForeignKey("webhook_events.id", ondelete="CASCADE"), nullable=False),
    Column("endpoint_id", Text, ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False),
    Column("status", Text, nullable=False, server_default=DeliveryStatus.PENDING.value),
    Column("attempts", Integer, nullable=False, server_default="0"),
    _now_column("next_attempt_at"),  # a sender's lease while it sends, then the next try
    Column("last_status_code", Integer),
    Column("last_error", Text, nullable=False, server_default=""),
    _now_column("created_at"),
    _optional_time("delivered_at"),
    _optional_time("leased_until"),  # set while a sender tries it: the endpoint's tries in flight
    Index("webhook_deliveries_event", "event_id"),  # retention deletes events with no delivery left
    Index("webhook_deliveries_endpoint", "endpoint_id"),  # deleting an endpoint deletes its deliveries
    # The claim: endpoints with pending deliveries, and each one's due deliveries in turn.
    Index("webhook_deliveries_endpoint_due", "endpoint_id", "next_attempt_at",
          postgresql_where=text(f"status = '{DeliveryStatus.PENDING}'")),
    Index("webhook_deliveries_in_flight", "endpoint_id", postgresql_where=text("leased_until IS NOT NULL")),
    _status_check("webhook_deliveries", DeliveryStatus),
)
