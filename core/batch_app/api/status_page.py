"""The status page at `/`: batches with progress bars, workers and their restarts, as plain HTML.

It refreshes itself with a meta tag, so it needs no JavaScript. It sits behind the API's keys
(browsers send them as the password of Basic auth) unless STATUS_PAGE_PUBLIC makes it a
read-only page for everyone, which then shows every project's batches.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from html import escape

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from ..database import Database
from ..domain import overview
from ..domain.batches import list_batches
from ..domain.overview import describe_age, describe_allowance
from ..domain.query import run
from .deps import authenticate
from .errors import APIError, error_response

router = APIRouter()

REFRESH_SECONDS = 5
_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #1d232b; }
h1 { font-size: 1.4em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 4px 10px; border-bottom: 1px solid #dde2e8; white-space: nowrap; }
.bar { width: 220px; height: 14px; background: #e7ebf0; display: inline-block; vertical-align: middle; }
.bar span { display: inline-block; height: 100%; }
.ok { background: #2f9e5b; } .failed { background: #d0453c; }
.dead, .stopped, .failed-status { color: #b3261e; font-weight: 600; }
.muted { color: #6b7580; }
"""


@router.get("/", include_in_schema=False, response_model=None)
async def status_page(request: Request) -> HTMLResponse | JSONResponse:
    project = None
    state = request.app.state
    if not state.settings.status_page_public:
        try:
            project = await authenticate(request, state.reads)
        except APIError as exc:
            response = error_response(exc.status_code, exc.message, exc.error_type, exc.param, exc.code)
            response.headers["WWW-Authenticate"] = 'Basic realm="vLLM Batch Server (password: your API key)"'
            return response
    return HTMLResponse(await run_in_threadpool(_page_of, state.db, project))


def _page_of(db: Database, project: str | None) -> str:
    with db.connect() as conn:
        batches = run(conn, list_batches(project, None, 20))["data"]
        workers = overview.workers(conn)
        restarts = overview.restart_history(conn, 10)
        backends = overview.backends(conn)
    return _page(batches, workers, restarts, backends)


def _page(batches: list[dict], workers: list, restarts: list, backends: list) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{REFRESH_SECONDS}">
<title>vLLM Batch Server</title><style>{_STYLE}</style></head>
<body><h1>vLLM Batch Server</h1>
<p class="muted">As of {now}; refreshes every {REFRESH_SECONDS} s.</p>
<h2>Batches</h2>{_batches_table(batches)}
<h2>Workers</h2>{_workers_table(workers)}
{_backends_table(backends)}
<h2>Recent restarts</h2>{_restarts_table(restarts)}
</body></html>"""


def _table(headers: list[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="muted">{empty}</p>'
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _progress(counts: dict) -> str:
    total, done, failed = counts["total"], counts["completed"], counts["failed"]
    share = (lambda n: 100 * n / total) if total else (lambda n: 0)
    return (f'<span class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="{total}" '
            f'aria-valuenow="{done + failed}"><span class="ok" style="width:{share(done):.1f}%"></span>'
            f'<span class="failed" style="width:{share(failed):.1f}%"></span></span> '
            f'<span class="progress-text">{done + failed} / {total} ({done} completed, {failed} failed)</span>')


def _batches_table(batches: list[dict]) -> str:
    now = time.time()
    rows = [f'<tr id="{escape(b["id"])}"><td>{escape(b["id"])}</td>'
            f'<td class="{escape(b["status"])}-status">{escape(b["status"])}</td>'
            f'<td>{escape(b["model"] or "")}</td><td>{escape(b["endpoint"])}</td>'
            f'<td>{_progress(b["request_counts"])}</td><td>{describe_age(now - b["created_at"])} ago</td></tr>'
            for b in batches]
    return _table(["batch", "status", "model", "endpoint", "progress", "created"], rows, "No batches yet.")


def _workers_table(workers: list) -> str:
    rows = [f'<tr><td>{escape(w.slot)}</td><td>{escape(w.kind)}</td><td class="{escape(w.status)}">{escape(w.status)}</td>'
            f'<td>{describe_age(w.heartbeat_age)} ago</td><td>{w.in_flight}</td><td>{w.requests_done}</td>'
            f'<td>{w.restarts_last_hour}</td><td>{escape(w.model)}</td><td>{escape(w.probe)}</td><td>{w.pid}</td>'
            f'<td>{escape(w.host)}</td><td>{escape(overview.scheduler_place(w))}</td></tr>'
            for w in workers]
    return _table(["slot", "kind", "status", "last heartbeat", "in flight", "requests done", "restarts (1 h)", "model",
                   "health check", "pid", "host", "SLURM job"], rows, "No worker has registered yet.")


def _backends_table(backends: list) -> str:
    """Shown only where pool workers run."""
    if not backends:
        return ""
    rows = [f'<tr><td>{escape(b.slot)}</td><td>{escape(b.url)}</td><td>{escape(b.model)}</td>'
            f'<td class="{"idle" if b.state == "healthy" else "dead"}">{escape(b.state)}</td><td>{b.in_flight}</td>'
            f'<td>{escape(describe_allowance(b))}</td><td>{b.completed}</td><td>{sum(b.errors.values())}</td><td>{escape(b.last_error)}</td></tr>'
            for b in backends]
    return "<h2>Backends</h2>" + _table(["worker", "backend", "model", "state", "in flight", "batch allowance", "answered",
                                         "failed tries", "last error"], rows, "")


def _restarts_table(restarts: list) -> str:
    rows = [f'<tr><td>{describe_age(r.age)} ago</td><td>{escape(r.slot)}</td><td>{escape(r.reason)}</td>'
            f'<td>{"" if r.exit_code is None else r.exit_code}</td><td>{escape(r.host)}</td></tr>' for r in restarts]
    return _table(["when", "worker", "reason", "exit code", "host"], rows, "No restarts.")
