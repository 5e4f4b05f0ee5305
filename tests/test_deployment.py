"""The operator's view: the scripts a new user runs, and the systemd units."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import httpx
import psutil

from .conftest import REPO, free_port, require_tool, wait_for


def test_rendered_systemd_units_verify(tmp_path):
    systemd_analyze = require_tool("systemd-analyze", package="systemd")
    subprocess.run([str(REPO / "scripts/install-systemd.sh"), "--dest", str(tmp_path), "--user", "root"],
                   check=True, capture_output=True)
    units = sorted(tmp_path.glob("*.service"))
    assert [unit.name for unit in units] == ["vllm-batch-api.service", "vllm-batch-watchdog.service"]
    for unit in units:
        text = unit.read_text()
        assert "@" not in text.replace("network-online.target", "")
        assert "Restart=always" in text and "StartLimitIntervalSec=900" in text and "StartLimitBurst=30" in text
    # The watchdog alone gets SIGTERM and drains its workers; leftovers are killed after the timeout.
    assert "KillMode=mixed" in units[1].read_text() and "KillMode=control-group" in units[0].read_text()
    result = subprocess.run([systemd_analyze, "verify", *map(str, units)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_role_installs_its_own_unit_alone(tmp_path):
    for role, expected in (("worker", ["vllm-batch-watchdog.service"]), ("api", ["vllm-batch-api.service"])):
        subprocess.run([str(REPO / "scripts/install-systemd.sh"), "--role", role, "--dest", str(tmp_path / role)],
                       check=True, capture_output=True)
        assert sorted(unit.name for unit in (tmp_path / role).glob("*.service")) == expected
    refused = subprocess.run([str(REPO / "scripts/install-systemd.sh"), "--role", "gpu", "--dest", str(tmp_path)],
                             capture_output=True, text=True)
    assert refused.returncode == 2 and "unknown role 'gpu'" in refused.stderr


def test_a_worker_host_needs_the_shared_database(tmp_path):
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "LOG_DIR": str(tmp_path / "logs"), "DATABASE_URL": ""}
    refused = subprocess.run([str(REPO / "scripts/start-all.sh"), "--role", "worker"], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--role worker needs DATABASE_URL" in refused.stderr
    assert not (tmp_path / "data" / "postgres").exists()  # no database was started for it
    wrong = subprocess.run([str(REPO / "scripts/start-all.sh"), "--role", "gpu"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 2 and "unknown role 'gpu'" in wrong.stderr


def stack_processes(data_dir: Path) -> list[psutil.Process]:
    """Every process of the stack under data_dir: ours by environment, PostgreSQL by its data path."""
    found = []
    for process in psutil.process_iter(["cmdline", "environ"]):
        try:
            if (process.info["environ"] or {}).get("DATA_DIR") == str(data_dir) or \
                    str(data_dir) in " ".join(process.info["cmdline"] or []):
                found.append(process)
        except psutil.Error:
            continue
    return [p for p in found if p.pid != os.getpid()]


def test_start_all_then_stop_all_leaves_nothing_behind_twice(tmp_path):
    data_dir, port = tmp_path / "data", free_port()
    env = {**os.environ, "DATA_DIR": str(data_dir), "LOG_DIR": str(tmp_path / "logs"), "API_PORT": str(port),
           "API_KEY": "", "DATABASE_URL": "", "HEARTBEAT_INTERVAL": "1",
           "WORKERS": json.dumps([{"slot": "echo-0", "model": "/models/echo", "served_name": "echo",
                                   "engine": "tests.engines:EchoEngine"}])}
    stop_all = [str(REPO / "scripts/stop-all.sh")]
    for starts in (1, 2):
        try:
            started_all = subprocess.run([str(REPO / "scripts/start-all.sh")], env=env, cwd=tmp_path,
                                         capture_output=True, text=True, timeout=900)
            assert started_all.returncode == 0, started_all.stdout[-3000:] + started_all.stderr[-3000:]
            assert httpx.get(f"http://127.0.0.1:{port}/health").json()["database"] == "connected"
            worker_log = tmp_path / "logs/worker-echo-0.log"  # made by the worker, which the watchdog starts
            wait_for(lambda: worker_log.exists() and worker_log.read_text().count(" loaded in ") == starts, 60,
                     message=f"worker up, start {starts}")
            started = stack_processes(data_dir)
            roles = [" ".join(p.info["cmdline"] or []) for p in started]
            for module in ("core.batch_app.api_server", "core.batch_app.watchdog", "core.batch_app.worker", "postgres"):
                assert any(module in role for role in roles), (module, roles)  # each found, so each is checked below
        except BaseException:  # nothing of a failed round left running beside the tests after it
            subprocess.run(stop_all, env=env, cwd=tmp_path, capture_output=True, timeout=300)
            raise
        subprocess.run(stop_all, env=env, cwd=tmp_path, check=True, capture_output=True, timeout=300)
        psutil.wait_procs(started, timeout=10)
        assert [p.pid for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] == []
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0
