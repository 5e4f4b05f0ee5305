"""Webhook endpoints, the routes and objects of the SDK's `client.webhooks` (`/v1/webhook_endpoints`).

The signing secret is in the answers of create and rotate only; otherwise a hint of it.
"""

from __future__ import annotations

from typing import Annotated

import httpx
from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict

from ..domain import webhooks
from ..domain.ids import new_id
from .deps import DB, AppSettings, Project
from .errors import APIError, documented

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


@router.post("", responses=documented(400, 401, 503), operation_id="createWebhookEndpoint")
def create_endpoint(body: EndpointCreate, db: DB, settings: AppSettings, project: Project) -> dict:
    with db.begin() as conn:
        row = webhooks.create_endpoint(conn, settings, project, name=body.name, url=body.url,
                                       event_types=body.event_types)
    return webhooks.endpoint_object(row, with_secret=True)


@router.get("", responses=documented(400, 401, 503), operation_id="listWebhookEndpoints")
def list_endpoints(db: DB, project: Project, after: str | None = None,
                   limit: Annotated[int, Query(ge=1, le=100)] = 20) -> dict:
    with db.connect() as conn:
        return webhooks.list_endpoints(conn, project, after, limit)


@router.get("/{webhook_endpoint_id}", responses=documented(400, 401, 404, 503), operation_id="retrieveWebhookEndpoint")
def retrieve_endpoint(webhook_endpoint_id: str, db: DB, project: Project) -> dict:
    with db.connect() as conn:
        return webhooks.endpoint_object(webhooks.get_endpoint(conn, project, webhook_endpoint_id))


@router.post("/{webhook_endpoint_id}", responses=documented(400, 401, 404, 503), operation_id="updateWebhookEndpoint")
def update_endpoint(webhook_endpoint_id: str, body: EndpointUpdate, db: DB, settings: AppSettings,
                    project: Project) -> dict:
    with db.begin() as conn:
        return webhooks.endpoint_object(webhooks.update_endpoint(
            conn, settings, project, webhook_endpoint_id, name=body.name, url=body.url, event_types=body.event_types))


@router.delete("/{webhook_endpoint_id}", responses=documented(400, 401, 404, 503), operation_id="deleteWebhookEndpoint")
def delete_endpoint(webhook_endpoint_id: str, db: DB, project: Project) -> dict:
    with db.begin() as conn:
        webhooks.delete_endpoint(conn, project, webhook_endpoint_id)
    return {"id": webhook_endpoint_id, "object": "webhook_endpoint.deleted", "deleted": True}


@router.post("/{webhook_endpoint_id}/rotate_secret", responses=documented(400, 401, 404, 503),
             operation_id="rotateWebhookSecret")
def rotate_secret(webhook_endpoint_id: str, db: DB, project: Project, body: SecretRotation | None = None) -> dict:
    with db.begin() as conn:
        row = webhooks.rotate_secret(conn, project, webhook_endpoint_id,
                                     body.keep_old_secret_active_for_24_hours if body else False)
    return webhooks.endpoint_object(row, with_secret=True)


@router.post("/{webhook_endpoint_id}/test", responses=documented(400, 401, 404, 503), operation_id="testWebhookEndpoint")
def test_endpoint(webhook_endpoint_id: str, body: EndpointTest, db: DB, settings: AppSettings,
                  project: Project) -> dict:
    """Sends one signed test event of `event_type` now (about a made-up batch) and reports the
    receiver's status code; nothing is recorded or retried."""
    if body.event_type not in webhooks.EVENT_TYPES:
        raise APIError(400, f"event_type must be one of {', '.join(webhooks.EVENT_TYPES)}.", param="event_type",
                       code="invalid_value")
    with db.connect() as conn:
        row = webhooks.get_endpoint(conn, project, webhook_endpoint_id)
    webhooks.check_url(row.url, settings)  # the address may resolve elsewhere now
    event_id = new_id("evt_")
    payload = webhooks.event_payload(event_id, body.event_type, "batch_test")
    try:
        answer = httpx.post(row.url, content=payload, headers=webhooks.signed_headers(event_id, payload, [row.secret]),
                            timeout=settings.webhook_timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        raise APIError(400, f"The test event could not be delivered to {row.url}: {type(exc).__name__}: {exc}",
                       param="url", code="webhook_unreachable") from None
    return {"object": "webhook_endpoint.test", "event_type": body.event_type, "status_code": answer.status_code,
            "success": True, "webhook_endpoint_id": webhook_endpoint_id}
