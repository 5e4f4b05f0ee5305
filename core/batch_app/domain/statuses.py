"""Every status a batch, a request and a worker can be in, in one place.

The database holds the same sets as CHECK constraints (migration 0003), so a status typed wrong
anywhere fails loudly instead of creating a row nothing will ever pick up. The members are str:
they go into SQL parameters and JSON as they are.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class RequestStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class WorkerStatus(StrEnum):
    LOADING = "loading"
    IDLE = "idle"
    BUSY = "busy"
    NO_BACKEND = "no_backend"  # a pool worker none of whose servers is healthy: it claims nothing
    DRAINING = "draining"
    STOPPED = "stopped"
    DEAD = "dead"


class SlotKind(StrEnum):
    WORKER = "worker"  # takes requests from the queue
    SERVER = "server"  # a vLLM server the watchdog runs and probes; a pool worker feeds it


class DeathCause(StrEnum):
    """Why a worker died, as whoever declared it dead saw it (registry.mark_worker_dead). Which of
    these charge the requests it held a crash is the rescue's rule (queue.CHARGED_DEATHS)."""

    EXITED = "exited"  # exited with an error (an exception), or died in a way its watchdog could not tell
    CRASH_SIGNAL = "crash_signal"  # killed by SIGSEGV, SIGABRT, SIGBUS...
    OOM_KILLED = "oom_killed"  # SIGKILLed while the kernel's OOM killer struck (or where that cannot be known)
    HUNG = "hung"  # no heartbeat for HEARTBEAT_TIMEOUT, seen by its own host's watchdog
    STALLED = "stalled"  # no progress for STALL_TIMEOUT while holding requests
    FAILED_TO_START = "failed_to_start"  # did not register or load within STARTUP_TIMEOUT
    KILLED = "killed"  # a signal from outside: an operator's or a scheduler's kill
    DRAINED = "drained"  # exited cleanly
    FENCED = "fenced"  # learnt from its heartbeat that it was declared dead elsewhere, and stopped
    HOST_SILENT = "host_silent"  # silent together with its host's watchdog: a power loss, a cut link
    UNWATCHED = "unwatched"  # silent while its host's watchdog beat, and not judged by it
    ABANDONED = "abandoned"  # left running by a previous watchdog of its host
    RESTARTED = "restarted"  # stopped for an operator's restart (a server)


class DeliveryStatus(StrEnum):
    PENDING = "pending"  # to be sent (again) at its next_attempt_at
    DELIVERED = "delivered"  # the receiver answered 2xx
    FAILED = "failed"  # not delivered within WEBHOOK_RETRY_FOR


class SlotCommand(StrEnum):
    RESTART = "restart"  # `batchctl server restart`: stop gracefully, start again, uncharged


# A batch in one of these has its files and changes no more (OpenAI's terminal statuses).
FINAL_BATCH_STATUSES = (BatchStatus.COMPLETED, BatchStatus.FAILED, BatchStatus.EXPIRED, BatchStatus.CANCELLED)
# A batch in one of these still takes claims: its requests may run.
ACTIVE_BATCH_STATUSES = (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS)
UNFINISHED_REQUEST_STATUSES = (RequestStatus.QUEUED, RequestStatus.RUNNING)
# A worker in one of these holds nothing: whatever it ran was handed back or rescued.
ENDED_WORKER_STATUSES = (WorkerStatus.STOPPED, WorkerStatus.DEAD)
LIVE_WORKER_STATUSES = (WorkerStatus.LOADING, WorkerStatus.IDLE, WorkerStatus.BUSY, WorkerStatus.NO_BACKEND,
                        WorkerStatus.DRAINING)
# A worker in one of these serves its model (the API accepts batches for it).
SERVING_WORKER_STATUSES = (WorkerStatus.LOADING, WorkerStatus.IDLE, WorkerStatus.BUSY, WorkerStatus.DRAINING)


def sql_list(statuses: Iterable[StrEnum]) -> str:
    """`'queued', 'running'`: a set of statuses spelled once here, for an `IN (...)` in SQL text."""
    return ", ".join(f"'{status}'" for status in statuses)
