"""The webhook sender: a thread of every watchdog that delivers due webhook deliveries.

Every WEBHOOK_POLL_INTERVAL it claims due deliveries (SKIP LOCKED, so the senders of many hosts
share them, and fairly between endpoints and projects: webhooks._CLAIM) and tries them on an
event loop of its own, WEBHOOK_CONCURRENCY at a time, each try under one deadline
(webhook_transport.post); as a try ends, another due delivery takes its place. A delivery is
claimed under a lease longer than a try: a sender killed mid-send leaves it to whichever sender
looks after the lease, and a sender that outlived its lease records nothing.

Each try signs the event's stored body anew (the `webhook-timestamp` must be recent), with the
same `webhook-id`; a 2xx answer delivers it, anything else (whatever went wrong, even in this
code) is recorded as the try's failure with the error's type and message and tried again after a
backoff, WEBHOOK_BACKOFF_MIN doubling per try up to WEBHOOK_BACKOFF_MAX, until WEBHOOK_RETRY_FOR
has passed since the event. The address is checked again at every try.

The database is used from one thread of its own (one connection at a time, whatever the number
of tries in flight): the watchdog's pool is sized for supervision first.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

from .. import webhook_transport
from ..config import Settings
from ..database import Database
from ..domain import webhooks
from ..domain.webhook_secrets import seal_stored, secret_box
from ..periodic import Periodic

log = logging.getLogger(__name__)


class WebhookSender(Periodic):
    def __init__(self, db: Database, settings: Settings):
        super().__init__("webhook-sender", settings.webhook_poll_interval, "sending webhooks")
        self.db, self.settings = db, settings
        self.box = secret_box(settings)
        self._database = ThreadPoolExecutor(max_workers=1, thread_name_prefix="webhook-sender-db")
        self._sealed = False
        # A try never outlives its lease: its deadline, and time to record it.
        self.lease = settings.webhook_timeout + 10

    def run_round(self) -> None:
        if not self._sealed:
            with self.db.begin() as conn:
                if sealed := seal_stored(conn, self.box):
                    log.info("sealed %d webhook endpoints' signing secrets with WEBHOOK_SECRET_KEY", sealed)
            self._sealed = True
        asyncio.run(self._send_due())

    def stop(self, wait: float | None = None) -> None:
        super().stop(self.settings.webhook_timeout + 5 if wait is None else wait)
        self._database.shutdown(wait=False)

    async def _send_due(self) -> None:
        """Until nothing is due or in flight: keeps up to WEBHOOK_CONCURRENCY tries going."""
        sending: set[asyncio.Task] = set()
        while True:
            room = 0 if self.stopped else self.settings.webhook_concurrency - len(sending)
            for delivery in await self._in_database(self._claim, room) if room else []:
                sending.add(asyncio.create_task(self._deliver(delivery)))
            if not sending:
                return
            # Until a try ends (a sender is free) or a poll interval passes (others may be due).
            done, sending = await asyncio.wait(sending, timeout=self.settings.webhook_poll_interval,
                                               return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # only recording can fail here (the database); the round ends with it

    def _claim(self, room: int) -> list:
        with self.db.begin() as conn:
            return webhooks.claim_deliveries(conn, self.settings, room, self.lease)

    async def _deliver(self, delivery) -> None:
        status_code, error = await self._try(delivery)
        await self._in_database(self._record, delivery, status_code, error)

    async def _try(self, delivery) -> tuple[int | None, str | None]:
        """(the receiver's status code, None when delivered or else what went wrong)."""
        try:
            secrets_ = [self.box.open(delivery.secret)]
            if delivery.old_secret:
                secrets_.append(self.box.open(delivery.old_secret))
            headers = webhooks.signed_headers(delivery.event_id, delivery.payload, secrets_)
            reply = await webhook_transport.post(delivery.url, delivery.payload.encode(), headers,
                                                 timeout=self.settings.webhook_timeout,
                                                 allow_private=self.settings.webhook_allow_private,
                                                 owner=delivery.project)
        except Exception as exc:  # noqa: BLE001 (whatever it is, it is this try's failure)
            return None, webhook_transport.describe_failure(exc, self.settings.webhook_timeout)
        return reply.status_code, None if reply.delivered else reply.describe()

    def _record(self, delivery, status_code: int | None, error: str | None) -> None:
        with self.db.begin() as conn:
            if error is None:
                held = webhooks.record_delivered(conn, delivery, status_code)
            else:
                backoff = min(self.settings.webhook_backoff_min * 2 ** min(delivery.attempts - 1, 30),
                              self.settings.webhook_backoff_max)
                held, paused_until = webhooks.record_failed(conn, self.settings, delivery, status_code, error, backoff)
        if not held:
            log.info("webhook %s to endpoint %s, try %d: its lease had passed and another try holds it; "
                     "this one's outcome is not recorded", delivery.event_id, delivery.endpoint_id, delivery.attempts)
        elif error is not None:
            log.warning("webhook %s to endpoint %s (%s), try %d, failed: %s; next try in %.0f s%s", delivery.event_id,
                        delivery.endpoint_id, delivery.project, delivery.attempts, error, backoff,
                        f"; the endpoint is paused until {paused_until:%H:%M:%S}" if paused_until else "")

    async def _in_database(self, call, *args):
        return await asyncio.get_running_loop().run_in_executor(self._database, call, *args)
