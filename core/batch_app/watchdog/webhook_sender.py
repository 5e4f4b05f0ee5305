"""The webhook sender: a thread of every watchdog that delivers due webhook deliveries.

Every WEBHOOK_POLL_INTERVAL it claims due deliveries (SKIP LOCKED, so the senders of many hosts
share them) under a lease a little longer than a try may take: a sender killed mid-send leaves
the delivery to whichever sender looks after the lease. Each try signs the event's stored body
anew (the `webhook-timestamp` must be recent), with the same `webhook-id`; a 2xx answer
delivers it, anything else is logged with the error's type and message and tried again after a
backoff, WEBHOOK_BACKOFF_MIN doubling per try up to WEBHOOK_BACKOFF_MAX, until WEBHOOK_RETRY_FOR
has passed since the event. The address is checked again at every try (a name may resolve to a
private address by then).
"""

from __future__ import annotations

import logging

import httpx

from ..config import Settings
from ..database import Database
from ..domain import webhooks
from ..domain.errors import InvalidRequest
from ..periodic import Periodic

log = logging.getLogger(__name__)

BATCH_SIZE = 20  # deliveries claimed at a time


class WebhookSender(Periodic):
    def __init__(self, db: Database, settings: Settings):
        super().__init__("webhook-sender", settings.webhook_poll_interval, "sending webhooks")
        self.db, self.settings = db, settings
        self._client = httpx.Client(timeout=settings.webhook_timeout, follow_redirects=False)

    def run_round(self) -> None:
        while self._send_due(self._client) and not self.stopped:
            pass

    def stop(self, wait: float | None = None) -> None:
        super().stop(self.settings.webhook_timeout + 5 if wait is None else wait)
        self._client.close()

    def _send_due(self, client: httpx.Client) -> int:
        """Send one claimed group; returns how many there were (0: nothing due)."""
        lease = self.settings.webhook_timeout + 10
        with self.db.begin() as conn:
            due = webhooks.claim_deliveries(conn, BATCH_SIZE, lease)
        for delivery in due:
            status_code, error = self._try(client, delivery)
            with self.db.begin() as conn:
                if error is None:
                    webhooks.record_delivered(conn, delivery.id, status_code)
                else:
                    backoff = min(self.settings.webhook_backoff_min * 2 ** (delivery.attempts - 1),
                                  self.settings.webhook_backoff_max)
                    webhooks.record_failed(conn, delivery.id, status_code, error, backoff,
                                           self.settings.webhook_retry_for)
                    log.warning("webhook %s to %s, try %d, failed: %s; next try in %.0f s", delivery.event_id,
                                delivery.url, delivery.attempts, error, backoff)
        return len(due)

    def _try(self, client: httpx.Client, delivery) -> tuple[int | None, str | None]:
        """(the receiver's status code, None when delivered or else the error)."""
        try:
            webhooks.check_url(delivery.url, self.settings)  # its name may resolve elsewhere by now
        except InvalidRequest as refused:
            return None, f"Refused: {refused.message}"
        secrets_ = [delivery.secret] + ([delivery.old_secret] if delivery.old_secret else [])
        try:
            answer = client.post(delivery.url, content=delivery.payload,
                                 headers=webhooks.signed_headers(delivery.event_id, delivery.payload, secrets_))
        except httpx.HTTPError as exc:
            return None, f"{type(exc).__name__}: {exc or 'no detail'}"
        if 200 <= answer.status_code < 300:
            return answer.status_code, None
        return answer.status_code, f"HTTP {answer.status_code}: {answer.text[:200]}"
