"""The API's own OpenAPI document is true: schemathesis generates requests for every route from it
(its coverage, fuzzing and stateful phases, with a fixed seed) against the real server, and no
answer may be a server error, a status the document does not list, or a body outside its schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx

from .conftest import API_KEY


def test_every_route_answers_generated_requests_as_its_openapi_document_says(api, live_model):
    schema = httpx.get(f"{api.base_url}/openapi.json", timeout=10).json()
    assert all("422" not in operation["responses"] for path in schema["paths"].values() for operation in path.values())
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{api.base_url}/openapi.json",
               "--phases", "coverage,fuzzing,stateful",
               "--checks", "not_a_server_error,status_code_conformance,response_schema_conformance",
               "--seed", "20261201", "--max-examples", "25", "--workers", "1",
               "--header", f"Authorization: Bearer {API_KEY}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    print("\n" + result.stdout[result.stdout.find("Test Phases:"):].strip())
