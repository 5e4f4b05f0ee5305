"""Typed settings, read once from the environment or `.env` (every name is in `.env.example`)."""

from __future__ import annotations

import json
import re
import socket
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .models import served_name_of

POOL_ENGINE = "openai-http"


class Backend(BaseModel):
    """One OpenAI-compatible server of a pool: its base URL (with or without /v1) and key."""

    url: str
    api_key: str = ""
    managed: bool = False  # a server slot's server: its key is derived on this host (server_keys.py)

    @field_validator("url")
    @classmethod
    def _an_http_url(cls, url: str) -> str:
        url = url.strip()
        parts = urlsplit(url)
        try:
            parts.port  # noqa: B018 (raises on a port that is no number)
        except ValueError:
            raise ValueError(f"backend URL '{url}' has a bad port") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"backend URL '{url}' is not an http:// or https:// URL")
        return url.rstrip("/").removesuffix("/v1")


def parse_backends(value) -> list:
    """`http://a:8000,http://b:8000`, a list of URLs, or a list of {"url", "api_key"}."""
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    return [{"url": item} if isinstance(item, str) else item for item in value]


class ServerSpec(BaseModel):
    """A vLLM OpenAI server the watchdog runs (`python -m vllm.entrypoints.openai.api_server`):
    its model, the name it serves it under, its port on this host, its GPUs, and any further
    arguments for vLLM (passed as they are)."""

    model: str  # a path or a name vLLM can load; "demo": the built-in demo model
    served_name: str = ""  # default: the model
    port: int = Field(ge=1, le=65535)
    gpus: str = ""  # CUDA_VISIBLE_DEVICES of the server, e.g. "0,1"
    args: list[str] = Field(default_factory=list)  # e.g. ["--max-model-len", "8192", "--tensor-parallel-size", "2"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return served_name_of(self.model, self.served_name)


class WorkerSlot(BaseModel):
    """One supervised process: a worker, with a stable name, its model and engine, and the GPUs it
    owns; or, with the `openai-http` engine, the pool of servers it sends its requests to; or,
    with `serve`, a vLLM server that a pool worker of its model feeds."""

    slot: str
    model: str = ""  # "" or "demo": the demo chat model; "all-MiniLM-L6-v2": the packaged embedder
    served_name: str = ""
    engine: str = ""  # "" means the ENGINE setting
    gpus: str = ""  # CUDA_VISIBLE_DEVICES for this worker, e.g. "0,1"
    max_model_len: int | None = None
    max_in_flight: int | None = None  # requests kept in the engine; default twice its batch size
    engine_options: dict = Field(default_factory=dict)  # passed to vLLM, e.g. tensor_parallel_size
    # The pool of the `openai-http` engine (`model` is then the name the backends serve).
    backends: list[Backend] = Field(default_factory=list)
    api_key: str = ""  # for the backends without a key of their own
    strategy: Literal["least_busy", "round_robin", "random"] = "least_busy"
    max_in_flight_per_backend: int = Field(64, ge=1)
    request_timeout: float = Field(600.0, gt=0)  # seconds a backend may hold a request without answering
    health_interval: float = Field(10.0, gt=0)
    max_attempts: int = Field(4, ge=1)  # backends one request is tried on before it goes back to the queue
    # The backends also serve people: each one's batch allowance follows its own load
    # (engines/batch_allowance.py) between min_batch_in_flight and max_in_flight_per_backend.
    interactive_traffic: bool = False
    interactive_ttft_target: float = Field(0.25, gt=0)  # seconds to an interactive request's first token (p90)
    interactive_quiet_seconds: float = Field(5.0, ge=0)  # with none seen this long, the allowance doubles
    min_batch_in_flight: int = Field(1, ge=1)  # per backend, so that a batch always progresses
    metrics_interval: float = Field(0.25, gt=0)  # seconds between readings of a backend's /metrics
    latency_slack: float = Field(2.0, gt=1)  # without /metrics: answers this much slower a token than the fastest
    # Sent as each batch request's `priority` (vLLM: larger is served later; the server must run
    # with --scheduling-policy priority, or it refuses the request).
    batch_priority: int | None = None
    serve: ServerSpec | None = None

    @field_validator("backends", mode="before")
    @classmethod
    def _listed(cls, value):
        return parse_backends(value)

    @field_validator("backends")
    @classmethod
    def _each_once(cls, backends: list[Backend]) -> list[Backend]:
        urls = [backend.url for backend in backends]
        if twice := sorted({url for url in urls if urls.count(url) > 1}):
            raise ValueError(f"backend {', '.join(twice)} is listed more than once")
        return backends

    @property
    def is_server(self) -> bool:
        return self.serve is not None

    def pool_options(self) -> dict:
        """The pool's part of the entry, which the `openai-http` engine reads back as a slot."""
        return self.model_dump(include={"backends", "api_key", *POOL_OPTIONS})


# The pool's options of a slot, which POOL_OPTIONS sets for the pools made from BACKENDS or server slots.
POOL_OPTIONS = ("strategy", "max_in_flight_per_backend", "request_timeout", "health_interval", "max_attempts",
                "interactive_traffic", "interactive_ttft_target", "interactive_quiet_seconds", "min_batch_in_flight",
                "metrics_interval", "latency_slack", "batch_priority")


def pool_slot_name(model: str) -> str:
    """The slot of the pool worker for a model: `pool-<model>`, in characters any log name takes."""
    return "pool-" + re.sub(r"[^A-Za-z0-9_.-]+", "-", model)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    api_host: str = "127.0.0.1"
    api_port: int = 4080
    database_url: str = ""
    # Through PgBouncer (or another pooler) in transaction mode: no prepared statements and no
    # LISTEN (wake-ups fall back to their timers); migrations, which hold a session lock, then
    # go to MIGRATION_DATABASE_URL, PostgreSQL itself.
    database_transaction_pooling: bool = False
    migration_database_url: str = ""
    # The name this host's watchdog and workers register under; a watchdog starts, kills and
    # adopts only the workers of its own host name.
    host_name: str = Field(default_factory=socket.gethostname)
    data_dir: Path = Path("./data")
    log_dir: Path = Path("./logs")
    log_max_bytes: int = 50 * 1024 * 1024  # each process's log is rotated at this size
    log_backups: int = 5
    api_key: str = ""
    api_database_pool: int = 10  # the API's connections for threads (as many again under load) and for its event-loop reads
    status_page_public: bool = False  # true: the status page at / is readable without a key
    api_access_log: Literal["changes", "all", "none"] = "changes"  # which requests get a log line
    sentry_dsn: str = ""

    # Open mode: with OPEN_ACCESS true a caller without a live key (none, an unknown or a revoked
    # one) is the `default` project and a live key acts in its own; false, every request needs a
    # live key.
    open_access: bool = False

    # Per project (a tenant): what it may keep stored and queued at once; past one, a create is
    # refused with 429 naming the limit, and no other project notices.
    project_max_files: int = Field(100_000, ge=1)  # files stored (uploads and batch outputs)
    project_max_file_bytes: int = Field(100 * 1024**3, ge=1)  # bytes of those files (OpenAI's 100 GB)
    project_max_active_batches: int = Field(1_000, ge=1)  # batches not yet finished
    project_max_active_requests: int = Field(10_000_000, ge=1)  # requests of those batches
    # Media by URL in a line (image_url, ...) is refused unless the URL is data: or its host is one
    # of these, comma-separated: the server fetching it could otherwise reach internal addresses.
    media_url_allowed_hosts: str = ""
    # The largest answer to one request, from any engine (a pool's backend is read no further); a
    # larger one is that line's error (response_too_large).
    backend_max_reply_bytes: int = Field(64 * 1024 * 1024, ge=1024)

    # Models and engines.
    model: str = ""
    engine: str = "vllm"
    require_live_worker: bool = True

    # Limits on uploads and batches.
    max_file_bytes: int = 200 * 1024 * 1024
    max_file_lines: int = 50_000
    max_line_bytes: int = 4 * 1024 * 1024
    max_choices: int = 128  # `n` of one request (OpenAI's limit)
    max_inputs: int = 2048  # items of one list-valued `prompt` or `input` (OpenAI's limit for embeddings)
    min_completion_window: int = 60  # seconds
    max_completion_window: int = 30 * 24 * 3600
    # Files: how long one lives when it was created without `expires_after` (uploads) or
    # `output_expires_after` (a batch's output and error files); None keeps it until deleted.
    file_retention: int | None = None  # seconds
    min_file_expiry: int = 3600  # the bounds of an expiry policy, OpenAI's
    max_file_expiry: int = 30 * 24 * 3600

    # Webhooks: endpoints on loopback, link-local or private addresses (and plain http) are
    # refused unless allowed; each try waits WEBHOOK_TIMEOUT for an answer; a delivery is tried
    # again after WEBHOOK_BACKOFF_MIN doubling up to WEBHOOK_BACKOFF_MAX, for WEBHOOK_RETRY_FOR.
    webhook_allow_private: bool = False
    webhook_timeout: float = 10.0
    webhook_backoff_min: float = 5.0
    webhook_backoff_max: float = 3600.0
    webhook_retry_for: float = 72 * 3600.0
    webhook_poll_interval: float = 1.0  # how often each watchdog's sender looks for due deliveries
    # Receivers are untrusted: each watchdog sends WEBHOOK_CONCURRENCY tries at once, at most
    # WEBHOOK_CONCURRENCY_PER_ENDPOINT of them (over every watchdog) to one endpoint; after
    # WEBHOOK_BREAKER_FAILURES failed tries in a row an endpoint is paused (WEBHOOK_BACKOFF_MIN
    # doubling up to WEBHOOK_BACKOFF_MAX), then tried once before it gets its full share again.
    webhook_concurrency: int = Field(8, ge=1)
    webhook_concurrency_per_endpoint: int = Field(2, ge=1)
    webhook_breaker_failures: int = Field(5, ge=1)
    webhook_max_endpoints_per_project: int = Field(20, ge=1, le=100)  # an event goes to at most 100 endpoints
    # Seals signing secrets in the database: one or more comma-separated keys, the first seals
    # (domain/webhook_secrets.py); empty stores them as they are.
    webhook_secret_key: SecretStr = SecretStr("")

    # Liveness and supervision.
    heartbeat_interval: float = 5.0
    heartbeat_timeout: float = 60.0
    stall_timeout: float = 120.0
    startup_timeout: float = 600.0
    watchdog_check_interval: float = 1.0
    max_restarts_per_hour: int = 10
    restart_backoff_min: float = 1.0
    restart_backoff_max: float = 60.0
    restart_stable_period: float = 300.0
    shutdown_grace: float = 30.0
    kill_grace: float = 5.0  # between SIGTERM and SIGKILL when the watchdog kills a failed worker
    max_attempts: int = 3
    # A request in flight at this many host losses in a row (power, a cut link: never charged as
    # crashes) is logged with its id for an operator to look at; it runs on.
    warn_after_host_losses: int = Field(5, ge=1)
    # Seconds between housekeeping rounds (rescue, expiry, stranded batches) in every watchdog and worker.
    housekeeping_interval: float = 5.0

    # Retention (watchdog/retention.py): what finished history is kept, in seconds, and how the
    # deletes run (RETENTION_BATCH_ROWS rows a statement, every RETENTION_INTERVAL, one watchdog at a time).
    retention_interval: float = 10.0
    retention_batch_rows: int = Field(1000, ge=1)
    finished_requests_retention: float = Field(0.0, ge=0)  # a finished batch's request rows, after its end
    webhook_delivery_retention: float = Field(7 * 24 * 3600.0, ge=0)  # delivered or given-up deliveries, and events
    worker_history_retention: float = Field(7 * 24 * 3600.0, ge=0)  # stopped workers' rows, their backends, taken commands
    restart_history_retention: float = Field(7 * 24 * 3600.0, ge=3600)  # at least the restart cap's hour
    # Bytes of one page of GET /v1/batches/{id}/output (a page holds at least one line).
    output_page_bytes: int = Field(8 * 1024 * 1024, ge=1)
    # A watchdog with nothing to do (nothing queued for its workers' models, nothing in flight, no
    # worker loading) for IDLE_EXIT seconds stops its workers and exits 0; 0: it never does.
    idle_exit: float = Field(0.0, ge=0)
    # `batchctl slurm up`: submit SLURM_JOB_SCRIPT while queued requests wait for a model that no
    # live worker serves, at most SLURM_MAX_JOBS such jobs at once, checking every
    # SLURM_POLL_INTERVAL seconds; each job exits after SLURM_IDLE_EXIT seconds with nothing to do.
    slurm_job_script: Path = Path("deployment/slurm/worker.sbatch")
    slurm_max_jobs: int = Field(1, ge=1)
    slurm_poll_interval: float = Field(10.0, gt=0)
    slurm_idle_exit: float = Field(300.0, gt=0)
    # JSON list of WorkerSlot objects; empty: the demo chat model (or MODEL) and the embedder, or
    # with BACKENDS set, one pool worker per model the backends serve.
    workers: str = ""
    # Existing OpenAI-compatible servers, comma-separated base URLs, and the key they expect.
    backends: str = ""
    backend_api_key: str = ""
    # JSON object of pool options for the pools made from BACKENDS or server slots, e.g.
    # {"interactive_traffic": true, "batch_priority": 10}.
    pool_options: str = ""

    @field_validator("host_name", mode="before")
    @classmethod
    def _empty_is_the_hostname(cls, value):
        return value or socket.gethostname()

    @field_validator("file_retention", mode="before")
    @classmethod
    def _empty_keeps_forever(cls, value):
        return None if value in ("", None) else value

    def worker_slots(self) -> list[WorkerSlot]:
        """Every supervised slot: WORKERS as listed, and for the server slots (`serve`) of each
        model one pool worker `pool-<served name>` whose backends they are."""
        if not self.workers.strip():
            return [WorkerSlot(slot="chat-0", model=self.model), WorkerSlot(slot="embed-0", model="all-MiniLM-L6-v2")]
        slots = [WorkerSlot(**item) for item in json.loads(self.workers)]
        servers: dict[str, list[ServerSpec]] = {}
        for slot in slots:
            if slot.serve is not None:
                servers.setdefault(slot.serve.name, []).append(slot.serve)
        pools = [WorkerSlot(slot=pool_slot_name(name), model=name, engine=POOL_ENGINE,
                            backends=[{"url": spec.url, "managed": True} for spec in specs], **self.pool_option_values())
                 for name, specs in servers.items()]
        names = [slot.slot for slot in slots + pools]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"slot {', '.join(twice)} is named more than once (pool workers of server slots "
                             f"are named pool-<served name>)")
        return slots + pools

    def pool_option_values(self) -> dict:
        """POOL_OPTIONS as keyword arguments of a WorkerSlot; unknown names are an error."""
        options = json.loads(self.pool_options) if self.pool_options.strip() else {}
        if not isinstance(options, dict) or (unknown := sorted(set(options) - set(POOL_OPTIONS))):
            raise ValueError(f"POOL_OPTIONS must be a JSON object of {', '.join(POOL_OPTIONS)}"
                             + (f"; unknown: {', '.join(unknown)}" if isinstance(options, dict) else ""))
        return options

    def worker_slot(self, name: str) -> WorkerSlot:
        """The configured slot of that name; a worker reads its own configuration here."""
        slots = self.worker_slots()
        for slot in slots:
            if slot.slot == name:
                return slot
        raise ValueError(f"No worker slot named '{name}' in WORKERS (configured: "
                         f"{', '.join(slot.slot for slot in slots)}).")


@lru_cache
def get_settings() -> Settings:
    return Settings()
