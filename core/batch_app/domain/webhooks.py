"""Webhook endpoints, the events of batches that ended, and their deliveries, as OpenAI defines
them: endpoints managed with the SDK's `client.webhooks` calls, per project; an event
(`batch.completed`, `batch.failed`, `batch.expired`, `batch.cancelled`) recorded in the
transaction that ends the batch (queue.end_batch), with a delivery per subscribed endpoint; each
delivery signed with the Standard Webhooks headers that `client.webhooks.unwrap` verifies.

Deliveries are sent by the watchdogs' senders (watchdog/webhook_sender.py): claimed with SKIP
LOCKED under a lease, so a sender that dies mid-send leaves its delivery to the next one, and
tried again with the same `webhook-id` and body until the receiver answers 2xx or WEBHOOK_RETRY_FOR
has passed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlalchemy.engine import Connection

from ..config import Settings
from .errors import InvalidRequest, NotFound
from .ids import new_id
from .statuses import BatchStatus, DeliveryStatus

# The events this server sends, by the batch status that causes each.
BATCH_EVENTS = {BatchStatus.COMPLETED: "batch.completed", BatchStatus.FAILED: "batch.failed",
                BatchStatus.EXPIRED: "batch.expired", BatchStatus.CANCELLED: "batch.cancelled"}
EVENT_TYPES = tuple(BATCH_EVENTS.values())
ROTATION_OVERLAP = 24 * 3600  # seconds the old secret keeps signing when asked to stay active


# --- Endpoints ---

def _new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def _hint(secret: str) -> str:
    return f"whsec_...{secret[-4:]}"


def endpoint_object(row, with_secret: bool = False) -> dict[str, Any]:
    body = {"id": row.id, "object": "webhook_endpoint", "name": row.name, "url": row.url,
            "event_types": list(row.event_types), "created_at": int(row.created_at.timestamp()),
            "updated_at": int(row.updated_at.timestamp()), "signing_secret_hint": _hint(row.secret)}
    if with_secret:
        body["signing_secret"] = row.secret
    return body


def check_url(url: str, settings: Settings) -> str:
    """An http(s) URL whose host resolves to public addresses only (unless WEBHOOK_ALLOW_PRIVATE),
    so the server cannot be made to probe its own network."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise InvalidRequest(f"The URL '{url[:200]}' has a bad port.", param="url", code="invalid_url") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise InvalidRequest(f"The URL '{url[:200]}' is not an https:// URL.", param="url", code="invalid_url")
    if parts.scheme == "http" and not settings.webhook_allow_private:
        raise InvalidRequest("Webhook URLs must use https.", param="url", code="invalid_url")
    if not settings.webhook_allow_private and (private := private_address(parts.hostname, port)):
        raise InvalidRequest(f"The URL's host resolves to {private}, a loopback, link-local or private address; "
                             f"set WEBHOOK_ALLOW_PRIVATE=true to allow it.", param="url", code="invalid_url")
    return url


def private_address(host: str, port: int) -> str | None:
    """The first address `host` resolves to that is not public, or None (unresolvable counts as
    not public: it cannot be checked)."""
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)}
    except (socket.gaierror, UnicodeError):
        return f"nothing ({host} does not resolve)"
    for address in sorted(addresses):
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            return address
    return None


def _check_event_types(event_types: list[str]) -> list[str]:
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


def create_endpoint(conn: Connection, settings: Settings, project: str, *, name: str, url: str,
                    event_types: list[str]):
    return conn.execute(text("""
        INSERT INTO webhook_endpoints (id, project, name, url, event_types, secret)
        VALUES (:id, :project, :name, :url, :event_types, :secret) RETURNING *"""),
        # The event types first: they are checked without a DNS lookup.
        {"id": new_id("we_"), "project": project, "name": name, "event_types": _check_event_types(event_types),
         "url": check_url(url, settings), "secret": _new_secret()}).one()


def update_endpoint(conn: Connection, settings: Settings, project: str, endpoint_id: str, *,
                    name: str | None, url: str | None, event_types: list[str] | None):
    row = get_endpoint(conn, project, endpoint_id)
    changes = {"name": name if name is not None else row.name,
               "url": check_url(url, settings) if url is not None else row.url,
               "event_types": _check_event_types(event_types) if event_types is not None else list(row.event_types)}
    if (changes["name"], changes["url"], changes["event_types"]) == (row.name, row.url, list(row.event_types)):
        return row  # an unchanged update does not advance updated_at
    return conn.execute(text("""
        UPDATE webhook_endpoints SET name = :name, url = :url, event_types = :event_types, updated_at = now()
        WHERE id = :id RETURNING *"""), {"id": endpoint_id, **changes}).one()


def rotate_secret(conn: Connection, project: str, endpoint_id: str, keep_old_for_a_day: bool):
    get_endpoint(conn, project, endpoint_id)
    return conn.execute(text("""
        UPDATE webhook_endpoints
        SET old_secret = CASE WHEN :keep THEN secret END,
            old_secret_until = CASE WHEN :keep THEN now() + make_interval(secs => :overlap) END,
            secret = :secret, updated_at = now()
        WHERE id = :id RETURNING *"""),
        {"id": endpoint_id, "keep": keep_old_for_a_day, "overlap": ROTATION_OVERLAP, "secret": _new_secret()}).one()


def list_endpoints(conn: Connection, project: str, after: str | None, limit: int) -> dict[str, Any]:
    rows = conn.execute(text("""
        SELECT * FROM webhook_endpoints
        WHERE project = :project AND (CAST(:after AS text) IS NULL OR (created_at, id) < (
              SELECT created_at, id FROM webhook_endpoints WHERE id = :after AND project = :project))
        ORDER BY created_at DESC, id DESC LIMIT :limit"""),
        {"project": project, "after": after, "limit": limit + 1}).all()
    page = [endpoint_object(row) for row in rows[:limit]]
    return {"object": "list", "data": page, "has_more": len(rows) > limit,
            "first_id": page[0]["id"] if page else None, "last_id": page[-1]["id"] if page else None}


def delete_endpoint(conn: Connection, project: str, endpoint_id: str) -> None:
    get_endpoint(conn, project, endpoint_id)
    conn.execute(text("DELETE FROM webhook_endpoints WHERE id = :id"), {"id": endpoint_id})


# --- Events: recorded with the batch's ending, one delivery per subscribed endpoint ---

_RECORD_EVENT = text("""
WITH subscribed AS (SELECT id FROM webhook_endpoints
                    WHERE project = :project AND event_types @> ARRAY[CAST(:type AS text)]),
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


# --- Deliveries: claimed by a sender under a lease, then recorded ---

_CLAIM = text(f"""
WITH due AS (SELECT id FROM webhook_deliveries
             WHERE status = '{DeliveryStatus.PENDING}' AND next_attempt_at <= now()
             ORDER BY next_attempt_at, id LIMIT :limit FOR UPDATE SKIP LOCKED),
leased AS (UPDATE webhook_deliveries d SET attempts = d.attempts + 1,
                  next_attempt_at = now() + make_interval(secs => :lease)
           FROM due WHERE d.id = due.id RETURNING d.*)
SELECT leased.id, leased.attempts, leased.created_at, ev.id AS event_id, ev.payload, ep.url, ep.secret,
       CASE WHEN ep.old_secret_until > now() THEN ep.old_secret END AS old_secret
FROM leased JOIN webhook_events ev ON ev.id = leased.event_id JOIN webhook_endpoints ep ON ep.id = leased.endpoint_id
ORDER BY leased.id
""")

_DELIVERED = text(f"""
UPDATE webhook_deliveries SET status = '{DeliveryStatus.DELIVERED}', delivered_at = now(),
       last_status_code = :status_code, last_error = ''
WHERE id = :id
""")

# A failed try: again after the backoff, or given up once the event is older than the retry period.
_FAILED = text(f"""
UPDATE webhook_deliveries
SET last_status_code = :status_code, last_error = :error,
    status = CASE WHEN created_at < now() - make_interval(secs => :retry_for)
                  THEN '{DeliveryStatus.FAILED}' ELSE '{DeliveryStatus.PENDING}' END,
    next_attempt_at = now() + make_interval(secs => :backoff)
WHERE id = :id
""")


def claim_deliveries(conn: Connection, limit: int, lease: float) -> list:
    return conn.execute(_CLAIM, {"limit": limit, "lease": lease}).all()


def record_delivered(conn: Connection, delivery_id: int, status_code: int) -> None:
    conn.execute(_DELIVERED, {"id": delivery_id, "status_code": status_code})


def record_failed(conn: Connection, delivery_id: int, status_code: int | None, error: str, backoff: float,
                  retry_for: float) -> None:
    conn.execute(_FAILED, {"id": delivery_id, "status_code": status_code, "error": error[:1000],
                           "backoff": backoff, "retry_for": retry_for})


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
