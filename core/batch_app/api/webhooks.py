"""Webhook endpoints, the routes and objects of the SDK's `client.webhooks` (`/v1/webhook_endpoints`).

The signing secret is in the answers of create and rotate only; otherwise a hint of it. `url`
and `name` are checked whole before anything is stored (webhook_transport.parse_url,
webhooks.check_name), and a project has at most WEBHOOK_MAX_ENDPOINTS_PER_PROJECT endpoints.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from .. import webhook_transport
from ..domain import webhooks
from ..domain.errors import InvalidRequest
from ..domain.ids import new_id
from ..domain.webhook_secrets import UnreadableSecret, secret_box
from .deps import DB, AppSettings, DBReads, Project
from .errors import APIError, documented

log = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/webhook_endpoints", tags=["webhooks"])


class EndpointCreate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str
    url: str
    event_types: list[str]


class EndpointUpdate(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str | None = None
    url: str | None = None
    event_types: list[str] | None = None


class SecretRotation(BaseModel):
    model_config = ConfigDict(extra="ignore")

    keep_old_secret_active_for_24_hours: bool = False


class EndpointTest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    event_type: str


def _checked_fields(name: str | None, event_types: list[str] | None) -> tuple[str | None, list[str] | None]:
    return (None if name is None else webhooks.check_name(name),
            None if event_types is None else webhooks.check_event_types(event_types))


async def _checked_url(url: str, settings, project: str) -> str:
    """Its syntax, then (when that is good) its host's addresses, before any database connection
    is taken: a slow resolver must not hold one, nor a thread of the pool."""
    return await webhook_transport.check_url(url, settings.webhook_allow_private, settings.webhook_timeout, project)


@router.post("", responses=documented(400, 401, 429, 503), operation_id="createWebhookEndpoint")
async def create_endpoint(body: EndpointCreate, db: DB, settings: AppSettings, project: Project) -> dict:
    name, event_types = _checked_fields(body.name, body.event_types)
    url = await _checked_url(body.url, settings, project)

    def create() -> dict:
        with db.begin() as conn:
            row = webhooks.create_endpoint(conn, settings, project, name=name, url=url, event_types=event_types)
        return webhooks.endpoint_object(row, secret_box(settings), with_secret=True)

    return await run_in_threadpool(create)


@router.get("", responses=documented(400, 401, 503), operation_id="listWebhookEndpoints")
def list_endpoints(db: DB, settings: AppSettings, project: Project, after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    with db.connect() as conn:
        return webhooks.list_endpoints(conn, secret_box(settings), project, after, limit)


@router.get("/{webhook_endpoint_id}", responses=documented(400, 401, 404, 503), operation_id="retrieveWebhookEndpoint")
def retrieve_endpoint(webhook_endpoint_id: str, db: DB, settings: AppSettings, project: Project) -> dict:
    with db.connect() as conn:
        return webhooks.endpoint_object(webhooks.get_endpoint(conn, project, webhook_endpoint_id), secret_box(settings))


@router.post("/{webhook_endpoint_id}", responses=documented(400, 401, 404, 503), operation_id="updateWebhookEndpoint")
async def update_endpoint(webhook_endpoint_id: str, body: EndpointUpdate, db: DB, settings: AppSettings,
                          project: Project) -> dict:
    name, event_types = _checked_fields(body.name, body.event_types)
    url = None
    if body.url is not None:
        url = await _checked_url(body.url, settings, project)

    def update() -> dict:
        with db.begin() as conn:
            row = webhooks.update_endpoint(conn, project, webhook_endpoint_id, name=name, url=url,
                                           event_types=event_types)
        return webhooks.endpoint_object(row, secret_box(settings))

    return await run_in_threadpool(update)


@router.delete("/{webhook_endpoint_id}", responses=documented(400, 401, 404, 503), operation_id="deleteWebhookEndpoint")
def delete_endpoint(webhook_endpoint_id: str, db: DB, project: Project) -> dict:
    with db.begin() as conn:
        webhooks.delete_endpoint(conn, project, webhook_endpoint_id)
    return {"id": webhook_endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


@router.post("/{webhook_endpoint_id}/rotate_secret", responses=documented(400, 401, 404, 503),
             operation_id="rotateWebhookSecret")
def rotate_secret(webhook_endpoint_id: str, db: DB, settings: AppSettings, project: Project,
                  body: SecretRotation | None = None) -> dict:
    with db.begin() as conn:
        row = webhooks.rotate_secret(conn, settings, project, webhook_endpoint_id,
                                     body.keep_old_secret_active_for_24_hours if body else False)
    return webhooks.endpoint_object(row, secret_box(settings), with_secret=True)


@router.post("/{webhook_endpoint_id}/test", responses=documented(400, 401, 404, 503), operation_id="testWebhookEndpoint")
async def test_endpoint(webhook_endpoint_id: str, body: EndpointTest, reads: DBReads, settings: AppSettings,
                        project: Project) -> dict:
    """Sends one signed test event of `event_type` now (about a made-up batch); nothing is
    recorded or retried. A 2xx is the result; anything else is a 400 that says what went wrong,
    without the details of a failed connection (the API must not map networks for a caller).

    It runs on the event loop under WEBHOOK_TIMEOUT (webhook_transport.post), so slow receivers
    hold no thread of the API."""
    if body.event_type not in webhooks.EVENT_TYPES:
        raise APIError(400, f"event_type must be one of {', '.join(webhooks.EVENT_TYPES)}.", param="event_type",
                       code="invalid_value")
    row = await reads.run(webhooks.endpoint_query(project, webhook_endpoint_id))
    event_id = new_id("evt_")
    payload = webhooks.event_payload(event_id, body.event_type, "batch_test")
    try:
        secret = secret_box(settings).open(row.secret)
    except UnreadableSecret as exc:  # the operator's key, not the caller's doing
        log.error("webhook endpoint %s cannot sign a test event: %s", webhook_endpoint_id, exc)
        raise APIError(503, "The endpoint's signing secret cannot be read by this server; rotate its secret, or ask "
                       "the operator to restore WEBHOOK_SECRET_KEY.", code="webhook_secret_unreadable") from None
    headers = webhooks.signed_headers(event_id, payload, [secret])
    try:
        reply = await webhook_transport.post(row.url, payload.encode(), headers, timeout=settings.webhook_timeout,
                                             allow_private=settings.webhook_allow_private, owner=project)
    except (webhook_transport.Refused, InvalidRequest) as refused:
        raise APIError(400, f"The test event was not sent: {refused}.", param="url", code="invalid_url") from None
    except Exception:  # noqa: BLE001 (every failure of a try reads the same to the caller)
        raise APIError(400, f"The test event could not be delivered: no HTTP answer within "
                       f"{settings.webhook_timeout:g} s.", param="url", code="webhook_unreachable") from None
    if not reply.delivered:
        raise APIError(400, f"The receiver answered the test event with HTTP {reply.status_code}, not a 2xx.",
                       param="url", code="webhook_test_failed")
    return {"object": "webhook_endpoint.test", "event_type": body.event_type, "status_code": reply.status_code,
            "success": True, "webhook_endpoint_id": webhook_endpoint_id}
