"""OpenAI's official Node SDK runs a batch end to end against a real API server and a real worker
(the echo test engine) and sees numbers wherever OpenAI sends numbers: a JavaScript program gets
JSON values as they are sent, with no model to convert a count sent as a string."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from .conftest import API_KEY, REPO, cannot_run, echo_slot, live_worker, running_watchdog, wait_for

NODE_DIR = REPO / "tests" / "node"


def test_the_node_sdk_runs_a_batch_and_sees_numbers(database, data_dir, db, api):
    node = shutil.which("node")
    if node is None:
        cannot_run("node is not installed (Node 20 or later)")
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").exists():
        cannot_run("the openai npm package is not installed in tests/node (scripts/test.sh runs npm install)")
    slot = "node-sdk-0"
    with running_watchdog(database, data_dir, "watchdog-node", [echo_slot(slot)]):
        wait_for(lambda: live_worker(db, slot), 60, message="worker up")
        run = subprocess.run([node, "batch_end_to_end.mjs"], cwd=NODE_DIR, capture_output=True, text=True,
                             timeout=180, env={"PATH": os.environ["PATH"], "OPENAI_API_KEY": API_KEY,
                                               "OPENAI_BASE_URL": f"{api.base_url}/v1", "MODEL": slot, "LINES": "6"})
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
    assert summary["usage"]["input_tokens"] == 6 and summary["usage"]["total_tokens"] == 12
