"""Webhook endpoints, the events of batches that ended, and their deliveries, as OpenAI defines
them: endpoints managed with the SDK's `client.webhooks` calls, per project; an event
(`batch.completed`, `batch.failed`, `batch.expired`, `batch.cancelled`) recorded in the
transaction that ends the batch (queue.end_batch), with a delivery per subscribed endpoint; each
delivery signed with the Standard Webhooks headers that `client.webhooks.unwrap` verifies.

Deliveries are sent by the watchdogs' senders (watchdog/webhook_sender.py): claimed with SKIP
LOCKED under a lease, fairly between projects and endpoints, so a sender that dies mid-send
leaves its delivery to the next one, and tried again with the same `webhook-id` and body until
the receiver answers 2xx or WEBHOOK_RETRY_FOR has passed. Each endpoint has a breaker in its row
(`failures`, `paused_until`): receivers are untrusted, and one that keeps failing is paused
rather than tried at every turn. Signing secrets are stored sealed (webhook_secrets.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from typing import Any

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..config import Settings
from .errors import InvalidRequest, LimitReached, NotFound
from .ids import new_id
from .query import Query
from .statuses import BatchStatus, DeliveryStatus
from .webhook_secrets import SecretBox, UnreadableSecret, secret_box

# The events this server sends, by the batch status that causes each.
BATCH_EVENTS = {BatchStatus.COMPLETED: "batch.completed", BatchStatus.FAILED: "batch.failed",
                BatchStatus.EXPIRED: "batch.expired", BatchStatus.CANCELLED: "batch.cancelled"}
EVENT_TYPES = tuple(BATCH_EVENTS.values())
ROTATION_OVERLAP = 24 * 3600  # seconds the old secret keeps signing when asked to stay active


# --- Endpoints ---

MAX_NAME_LENGTH = 256
MAX_DELIVERIES_PER_EVENT = 100  # the most endpoints WEBHOOK_MAX_ENDPOINTS_PER_PROJECT allows


def _new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _hint(box: SecretBox, stored: str) -> str:
    try:
        return f"whsec_...{box.open(stored)[-4:]}"
    except UnreadableSecret:
        return "whsec_...????"  # its key is gone: the endpoint is still listed


def endpoint_object(row, box: SecretBox, with_secret: bool = False) -> dict[str, Any]:
    body = {"id": row.id, "object": "webhook_endpoint", "name": row.name, "url": row.url,
            "event_types": list(row.event_types), "created_at": int(row.created_at.timestamp()),
            "updated_at": int(row.updated_at.timestamp()), "signing_secret_hint": _hint(box, row.secret)}
    if with_secret:
        body["signing_secret"] = box.open(row.secret)
    return body


def check_name(name: str) -> str:
    if len(name) > MAX_NAME_LENGTH or not all(char.isprintable() for char in name):
        raise InvalidRequest(f"name must be at most {MAX_NAME_LENGTH} printable characters (no control characters).",
                             param="name", code="invalid_value")
    return name


def check_event_types(event_types: list[str]) -> list[str]:
    if not event_types or any(kind not in EVENT_TYPES for kind in event_types):
        raise InvalidRequest(f"event_types must be a non-empty list of {', '.join(EVENT_TYPES)} (the events this "
                             f"server sends).", param="event_types", code="invalid_value")
    return sorted(set(event_types), key=EVENT_TYPES.index)


_ENDPOINT = text("SELECT * FROM webhook_endpoints WHERE id = :id AND project = :project")


def get_endpoint(conn: Connection, project: str, endpoint_id: str):
    row = conn.execute(_ENDPOINT, {"id": endpoint_id, "project": project}).first()
    if row is None:
        raise NotFound("webhook endpoint", endpoint_id, "webhook_endpoint_id")
    return row


def endpoint_query(project: str, endpoint_id: str) -> Query:
    """get_endpoint as one statement for the API's event loop."""
    def found(rows: list):
        if not rows:
            raise NotFound("webhook endpoint", endpoint_id, "webhook_endpoint_id")
        return rows[0]

    return Query("SELECT * FROM webhook_endpoints WHERE id = %(id)s AND project = %(project)s",
                 {"id": endpoint_id, "project": project}, found)


# Creates of one project wait for each other here (as limits.py's do), so two at once cannot both
# take the last place; no other project waits.
_LOCK_OWN = text("SELECT pg_advisory_xact_lock(hashtextextended('webhook_endpoints:' || :project, 0))")
_OWN_ENDPOINTS = text("SELECT count(*) FROM webhook_endpoints WHERE project = :project")


def create_endpoint(conn: Connection, settings: Settings, project: str, *, name: str, url: str,
                    event_types: list[str]):
    """`url` is checked by the caller (webhook_transport.check_url), outside the transaction: its
    lookup may be slow."""
    conn.execute(_LOCK_OWN, {"project": project})
    limit = settings.webhook_max_endpoints_per_project
    if conn.execute(_OWN_ENDPOINTS, {"project": project}).scalar() >= limit:
        raise LimitReached(f"This project has {limit} webhook endpoints, the most it may "
                           f"(WEBHOOK_MAX_ENDPOINTS_PER_PROJECT = {limit}); delete one to create another.",
                           code="webhook_max_endpoints_per_project")
    return conn.execute(text("""
        INSERT INTO webhook_endpoints (id, project, name, url, event_types, secret)
        VALUES (:id, :project, :name, :url, :event_types, :secret) RETURNING *"""),
        {"id": new_id("we_"), "project": project, "name": name, "event_types": event_types, "url": url,
         "secret": secret_box(settings).seal(_new_secret())}).one()


def update_endpoint(conn: Connection, project: str, endpoint_id: str, *, name: str | None, url: str | None,
                    event_types: list[str] | None):
    """Each given field already checked (a new `url` by webhook_transport.check_url)."""
    row = get_endpoint(conn, project, endpoint_id)
    changes = {"name": name if name is not None else row.name, "url": url if url is not None else row.url,
               "event_types": event_types if event_types is not None else list(row.event_types)}
    if (changes["name"], changes["url"], changes["event_types"]) == (row.name, row.url, list(row.event_types)):
        return row  # an unchanged update does not advance updated_at
    # A new URL is a new receiver: it starts with a closed breaker.
    return conn.execute(text("""
        UPDATE webhook_endpoints SET name = :name, url = :url, event_types = :event_types, updated_at = now(),
               failures = CASE WHEN url = :url THEN failures ELSE 0 END,
               paused_until = CASE WHEN url = :url THEN paused_until END
        WHERE id = :id RETURNING *"""), {"id": endpoint_id, **changes}).one()


def rotate_secret(conn: Connection, settings: Settings, project: str, endpoint_id: str, keep_old_for_a_day: bool):
    get_endpoint(conn, project, endpoint_id)
    return conn.execute(text("""
        UPDATE webhook_endpoints
        SET old_secret = CASE WHEN :keep THEN secret END,
            old_secret_until = CASE WHEN :keep THEN now() + make_interval(secs => :overlap) END,
            secret = :secret, updated_at = now()
        WHERE id = :id RETURNING *"""),
        {"id": endpoint_id, "keep": keep_old_for_a_day, "overlap": ROTATION_OVERLAP,
         "secret": secret_box(settings).seal(_new_secret())}).one()


def list_endpoints(conn: Connection, box: SecretBox, project: str, after: str | None, limit: int) -> dict[str, Any]:
    rows = conn.execute(text("""
        SELECT * FROM webhook_endpoints
        WHERE project = :project AND (CAST(:after AS text) IS NULL OR (created_at, id) < (
              SELECT created_at, id FROM webhook_endpoints WHERE id = :after AND project = :project))
        ORDER BY created_at DESC, id DESC LIMIT :limit"""),
        {"project": project, "after": after, "limit": limit + 1}).all()
    page = [endpoint_object(row, box) for row in rows[:limit]]
    return {"object": "list", "data": page, "has_more": len(rows) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def delete_endpoint(conn: Connection, project: str, endpoint_id: str) -> None:
    """Its deliveries go with it (found by webhook_deliveries_endpoint)."""
    get_endpoint(conn, project, endpoint_id)
    conn.execute(text("DELETE FROM webhook_endpoints WHERE id = :id"), {"id": endpoint_id})


# --- Events: recorded with the batch's ending, one delivery per subscribed endpoint ---

_RECORD_EVENT = text(f"""
WITH subscribed AS (SELECT id FROM webhook_endpoints
                    WHERE project = :project AND event_types @> ARRAY[CAST(:type AS text)]
                    ORDER BY created_at, id LIMIT {MAX_DELIVERIES_PER_EVENT}),
event AS (INSERT INTO webhook_events (id, project, type, payload)
          SELECT :id, :project, :type, :payload WHERE EXISTS (SELECT 1 FROM subscribed)
          RETURNING id)
INSERT INTO webhook_deliveries (event_id, endpoint_id)
SELECT event.id, subscribed.id FROM event, subscribed ORDER BY subscribed.id
""")


def event_payload(event_id: str, event_type: str, object_id: str) -> str:
    """The event as it is sent, the same bytes on every try."""
    return json.dumps({"id": event_id, "object": "event", "type": event_type, "created_at": int(time.time()),
                       "data": {"id": object_id}})


def record_batch_event(conn: Connection, project: str, batch_id: str, status: BatchStatus) -> None:
    """In the transaction that ends the batch: its event, for every endpoint of its project
    subscribed to it (nothing when there is none)."""
    event_type = BATCH_EVENTS.get(status)
    if event_type is None:
        return
    event_id = new_id("evt_")
    conn.execute(_RECORD_EVENT, {"id": event_id, "project": project, "type": event_type,
                                 "payload": event_payload(event_id, event_type, batch_id)})


# --- Deliveries: claimed by a sender under a lease, then recorded by the lease's holder ---

_PENDING = DeliveryStatus.PENDING

# A claim shares the senders between endpoints and projects, as the queue's claim shares workers
# between projects (queue._PICK_FAIRLY). `pending` finds the endpoints with pending deliveries
# with one index probe each (a loose scan). An endpoint offers its due deliveries up to its room:
# WEBHOOK_CONCURRENCY_PER_ENDPOINT less those in flight (leased), or one while it is on probation
# after its breaker opened, none while it is paused. The claim then takes round-robin: first
# between projects, the projects with the fewest tries in flight first, then between one
# project's endpoints. So a project's hostile receivers hold at most their own share of senders,
# and a delivery of another project is next whenever a sender is free.
# A lease (`leased_until`, and `next_attempt_at` so a dead sender's delivery is due again) lasts
# longer than a try; `attempts` is the lease's token, checked when the try is recorded.
_CLAIM = text(f"""
WITH RECURSIVE pending(endpoint_id) AS (
    (SELECT endpoint_id FROM webhook_deliveries WHERE status = '{_PENDING}' ORDER BY endpoint_id LIMIT 1)
    UNION ALL
    SELECT (SELECT d.endpoint_id FROM webhook_deliveries d
            WHERE d.status = '{_PENDING}' AND d.endpoint_id > p.endpoint_id ORDER BY d.endpoint_id LIMIT 1)
    FROM pending p WHERE p.endpoint_id IS NOT NULL),
endpoints AS (
    SELECT ep.id, ep.project, ep.failures >= :breaker_failures AS on_probation,
           ep.paused_until > now() AS paused,
           (SELECT count(*) FROM webhook_deliveries l WHERE l.endpoint_id = ep.id AND l.leased_until > now())
               AS in_flight
    FROM pending p JOIN webhook_endpoints ep ON ep.id = p.endpoint_id),
room AS (
    SELECT id, project, CASE WHEN on_probation THEN 1 ELSE :per_endpoint END - in_flight AS room,
           sum(in_flight) OVER (PARTITION BY project) AS project_in_flight
    FROM endpoints WHERE paused IS NOT TRUE),
offered AS (
    SELECT mine.id, room.project, room.project_in_flight
           + row_number() OVER (PARTITION BY room.project ORDER BY mine.turn, room.id) AS turn
    FROM room CROSS JOIN LATERAL (
        SELECT due.id, row_number() OVER (ORDER BY due.next_attempt_at, due.id) AS turn FROM (
            SELECT d.id, d.next_attempt_at FROM webhook_deliveries d
            WHERE d.endpoint_id = room.id AND d.status = '{_PENDING}' AND d.next_attempt_at <= now()
            ORDER BY d.next_attempt_at, d.id LIMIT room.room FOR UPDATE SKIP LOCKED) due) mine
    WHERE room.room > 0),
picked AS (SELECT id FROM offered ORDER BY turn, project LIMIT :limit),
leased AS (
    UPDATE webhook_deliveries d SET attempts = d.attempts + 1, leased_until = now() + make_interval(secs => :lease),
           next_attempt_at = now() + make_interval(secs => :lease)
    FROM picked WHERE d.id = picked.id RETURNING d.*)
SELECT leased.id, leased.attempts, leased.created_at, leased.endpoint_id, ev.id AS event_id, ev.payload, ep.url,
       ep.project, ep.secret, CASE WHEN ep.old_secret_until > now() THEN ep.old_secret END AS old_secret
FROM leased JOIN webhook_events ev ON ev.id = leased.event_id JOIN webhook_endpoints ep ON ep.id = leased.endpoint_id
ORDER BY leased.id
""")

# The lease's holder only: a try recorded after another sender has claimed the delivery again
# (and perhaps delivered it) changes nothing. Its endpoint's breaker closes.
_DELIVERED = text(f"""
WITH delivered AS (
    UPDATE webhook_deliveries SET status = '{DeliveryStatus.DELIVERED}', delivered_at = now(), leased_until = NULL,
           last_status_code = :status_code, last_error = ''
    WHERE id = :id AND attempts = :attempts AND status = '{_PENDING}'
    RETURNING endpoint_id)
UPDATE webhook_endpoints ep SET failures = 0, paused_until = NULL
FROM delivered WHERE ep.id = delivered.endpoint_id
RETURNING ep.id
""")

# A failed try: again after the backoff, or given up once the event is older than the retry
# period. Its endpoint counts one more failure in a row; from WEBHOOK_BREAKER_FAILURES on it is
# paused, for longer the more tries have failed.
_FAILED = text(f"""
WITH failed AS (
    UPDATE webhook_deliveries
    SET last_status_code = :status_code, last_error = :error, leased_until = NULL,
        status = CASE WHEN created_at < now() - make_interval(secs => :retry_for)
                      THEN '{DeliveryStatus.FAILED}' ELSE '{_PENDING}' END,
        next_attempt_at = now() + make_interval(secs => :backoff)
    WHERE id = :id AND attempts = :attempts AND status = '{_PENDING}'
    RETURNING endpoint_id)
UPDATE webhook_endpoints ep SET failures = ep.failures + 1,
       paused_until = CASE WHEN ep.failures + 1 >= :breaker_failures
                           THEN now() + make_interval(secs => least(
                               :pause_min * power(2, least(ep.failures + 1 - :breaker_failures, 30)), :pause_max))
                      END
FROM failed WHERE ep.id = failed.endpoint_id
RETURNING ep.paused_until
""")


def claim_deliveries(conn: Connection, settings: Settings, limit: int, lease: float) -> list:
    return conn.execute(_CLAIM, {"limit": limit, "lease": lease, "per_endpoint": settings.webhook_concurrency_per_endpoint,
                                 "breaker_failures": settings.webhook_breaker_failures}).all()


def record_delivered(conn: Connection, delivery, status_code: int) -> bool:
    """False when the caller no longer holds the delivery's lease (nothing changed)."""
    return conn.execute(_DELIVERED, {"id": delivery.id, "attempts": delivery.attempts,
                                     "status_code": status_code}).first() is not None


def record_failed(conn: Connection, settings: Settings, delivery, status_code: int | None, error: str,
                  backoff: float) -> tuple[bool, Any]:
    """(whether the caller still held the lease, when its endpoint's pause ends or None)."""
    paused = conn.execute(_FAILED, {
        "id": delivery.id, "attempts": delivery.attempts, "status_code": status_code,
        "error": error[:1000], "backoff": backoff, "retry_for": settings.webhook_retry_for,
        "breaker_failures": settings.webhook_breaker_failures, "pause_min": settings.webhook_backoff_min,
        "pause_max": settings.webhook_backoff_max}).first()
    return paused is not None, paused.paused_until if paused is not None else None


def signed_headers(event_id: str, payload: str, secrets_: list[str]) -> dict[str, str]:
    """Standard Webhooks headers: the event id, the time now, and a signature per secret."""
    timestamp = str(int(time.time()))
    signatures = []
    for secret in secrets_:
        key = base64.b64decode(secret.removeprefix("whsec_"))
        digest = hmac.new(key, f"{event_id}.{timestamp}.{payload}".encode(), hashlib.sha256).digest()
        signatures.append("v1," + base64.b64encode(digest).decode())
    return {"webhook-id": event_id, "webhook-timestamp": timestamp, "webhook-signature": " ".join(signatures),
            "content-type": "application/json", "user-agent": "vllm-batch-server-webhooks"}


# --- What operators see ---

_DELIVERIES = text("""
SELECT d.id, d.status, d.attempts, d.last_status_code, d.last_error, d.created_at, d.delivered_at,
       extract(epoch FROM d.next_attempt_at - now()) AS next_in, ev.type, ev.id AS event_id, ep.url, ev.project
FROM webhook_deliveries d JOIN webhook_events ev ON ev.id = d.event_id
JOIN webhook_endpoints ep ON ep.id = d.endpoint_id
ORDER BY d.id DESC LIMIT :limit
""")


def recent_deliveries(conn: Connection, limit: int = 50) -> list:
    return conn.execute(_DELIVERIES, {"limit": limit}).all()


# Per endpoint, the deliveries whose last try failed (still pending) or that were given up.
_FAILING = text(f"""
SELECT ep.url, ep.project, count(*) FILTER (WHERE d.status = '{DeliveryStatus.PENDING}') AS retrying,
       count(*) FILTER (WHERE d.status = '{DeliveryStatus.FAILED}') AS given_up, max(d.attempts) AS attempts,
       (array_agg(d.last_error ORDER BY d.id DESC))[1] AS last_error
FROM webhook_deliveries d JOIN webhook_endpoints ep ON ep.id = d.endpoint_id
WHERE d.last_error <> '' AND d.status <> '{DeliveryStatus.DELIVERED}'
GROUP BY ep.url, ep.project ORDER BY ep.url
""")


def failing_deliveries(conn: Connection) -> list:
    return conn.execute(_FAILING).all()
