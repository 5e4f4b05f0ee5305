"""Real vLLM OpenAI servers for the pool tests and bench: `python -m vllm.entrypoints.openai.api_server`
on the demo model (or the packaged embedder), each on a local port, in a session of its own so
that a kill takes its whole group."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from core.batch_app.engines.batch_allowance import read_metrics
from core.batch_app.engines.vllm_engine import vllm_environment
from core.batch_app.models import resolve_model
from core.batch_app.watchdog.process_control import kill_group


def requests_on(url: str, key: str = "") -> int:
    """Requests running or waiting on the vLLM server at `url`, read now from its own /metrics: the
    pool's view reaches the database only with its worker's next heartbeat, and on a fast machine
    a server may have answered everything by then."""
    try:
        text = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5).text
    except httpx.HTTPError:
        return 0
    reading = read_metrics(text)
    return int(reading.running + reading.waiting) if reading is not None else 0


class VllmServer:
    def __init__(self, data_dir: Path, name: str, port: int, model: str = "demo", served_name: str = "pool-demo"):
        self.name, self.port, self.served_name = name, port, served_name
        self.url = f"http://127.0.0.1:{port}"
        choice = resolve_model(model, data_dir)
        self.command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", choice.path,
                        "--served-model-name", served_name, "--dtype", "float32", "--enforce-eager",
                        "--host", "127.0.0.1", "--port", str(port),
                        "--enable-log-requests"]  # its log then says which requests were aborted
        # The embedder's own context (256) is its limit; the demo model gets the tests' usual 512.
        self.command += ["--runner", "pooling"] if choice.runner == "pooling" else ["--max-model-len", "512"]
        self.env = {**vllm_environment(data_dir / "cache"), **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1",
                    "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}  # what is set already (the run's cache) wins
        self.log_path = data_dir / "logs" / f"vllm-server-{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> VllmServer:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        return self

    def wait_ready(self, timeout: float = 300) -> VllmServer:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM server {self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server {self.name} not ready in {timeout:.0f} s; see {self.log_path}")

    def aborted(self) -> int:
        """Requests this server dropped because their client went away, from its log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return sum(line.split("Aborted request(s) ", 1)[1].count(",") + 1
                   for line in text.splitlines() if "Aborted request(s) " in line)

    def signal(self, signum: int) -> None:
        os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        """SIGKILL, as a crash would, and wait until it is gone."""
        self.signal(signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.signal(signal.SIGCONT)
            kill_group(self.process.pid, 10)
            self.process.wait(30)
