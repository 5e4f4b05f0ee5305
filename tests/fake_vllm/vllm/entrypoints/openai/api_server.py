"""The stand-in for vLLM's OpenAI server, run as `python -m vllm.entrypoints.openai.api_server`
(by `core.batch_app.vllm_server`, as the real one is). It records its arguments and the parts of
its environment the product sets, then behaves as the argument `--fake-health` says:

- `never`: never listens, as a model load that does not end (every health check is refused);
- `ok` (the default): listens on `--port` and answers `GET /health` and `GET /v1/models` with 200
  when the request carries its key (VLLM_API_KEY), 401 otherwise; a test that wants it to stop
  answering stops it with SIGSTOP, and the kernel still accepts connections nobody answers.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from tests.receivers import send_json


def _option(name: str, default: str | None = None) -> str | None:
    arguments = sys.argv[1:]
    for index, argument in enumerate(arguments):
        if argument == name and index + 1 < len(arguments):
            return arguments[index + 1]
        if argument.startswith(name + "="):
            return argument.split("=", 1)[1]
    return default


def _record(port: int) -> None:
    folder = Path(os.environ["FAKE_VLLM_RECORDS"])
    folder.mkdir(parents=True, exist_ok=True)
    record = {"argv": sys.argv[1:], "pid": os.getpid(), "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
              "has_api_key": bool(os.environ.get("VLLM_API_KEY"))}
    (folder / f"server-{port}-{os.getpid()}.json").write_text(json.dumps(record))


def main() -> None:
    port = int(_option("--port"))
    _record(port)
    if _option("--fake-health", "ok") == "never":
        threading.Event().wait()  # a load that never ends
    key, served = os.environ.get("VLLM_API_KEY", ""), _option("--served-model-name")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != f"Bearer {key}":
                status, body = 401, {"error": "no key"}
            elif self.path == "/health":
                status, body = 200, {}
            elif self.path == "/v1/models":
                status, body = 200, {"object": "list", "data": [{"id": served, "object": "model"}]}
            else:
                status, body = 404, {"error": "not found"}
            send_json(self, status, body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"fake vLLM server listening on 127.0.0.1:{port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
