"""The status page at `/`: its auth, and what a person sees in a real headless Chromium."""

from __future__ import annotations

import base64
import subprocess

import httpx
import pytest

from .conftest import API_KEY, require_tool, start_api
from .jsonl import request_line, submit
from .simulated_worker import answer, claim, complete, new_worker


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"user:{key}".encode()).decode()}


def test_the_page_asks_browsers_for_a_key_and_shows_only_their_project(api, client, project_client, live_model):
    mine = submit(client, [request_line("a", live_model)])
    theirs = submit(project_client, [request_line("b", live_model)])

    refused = httpx.get(f"{api.base_url}/", timeout=10)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic ")
    assert refused.json()["error"]["code"] == "missing_api_key"
    assert httpx.get(f"{api.base_url}/", headers=basic("sk-wrong"), timeout=10).status_code == 401

    page = httpx.get(f"{api.base_url}/", headers=basic(API_KEY), timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert mine.id in page.text and theirs.id not in page.text
    assert '<meta http-equiv="refresh"' in page.text and "<script" not in page.text
    bearer = httpx.get(f"{api.base_url}/", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=10)
    assert bearer.status_code == 200 and mine.id in bearer.text


@pytest.fixture
def public_api(database, data_dir):
    server = start_api(database, data_dir, "api-public-status", STATUS_PAGE_PUBLIC="true")
    yield server
    server.stop()


def test_a_running_batch_shows_its_progress_in_chromium(public_api, client, db, own_model, tmp_path):
    chromium = require_tool("chromium", "chromium-browser", package="chromium")
    batch = submit(client, [request_line(f"r{i}", own_model) for i in range(4)])
    worker = new_worker(db, own_model)
    requests = claim(db, worker, own_model, 4)
    complete(db, worker, [answer(requests[0])])  # one of four done, three running

    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,800"]
    screenshot = tmp_path / "status.png"
    subprocess.run([*flags, f"--screenshot={screenshot}", f"{public_api.base_url}/"], check=True, timeout=120,
                   capture_output=True)
    assert screenshot.read_bytes().startswith(b"\x89PNG") and screenshot.stat().st_size > 10_000
    dom = subprocess.run([*flags, "--dump-dom", f"{public_api.base_url}/"], check=True, timeout=120,
                         capture_output=True, text=True).stdout
    row = dom.split(f'<tr id="{batch.id}">')[1].split("</tr>")[0]
    assert "in_progress" in row
    assert 'aria-valuenow="1"' in row and 'aria-valuemax="4"' in row
    assert "1 / 4 (1 completed, 0 failed)" in row
    assert 'style="width:25.0%"' in row  # the green part of the bar
