"""A fault-injecting HTTP proxy in front of a real server:
`python tests/fault_server.py PORT TARGET [FAULTS]`, or `fault_server(TARGET, *FAULTS)` in a test.

FAULTS is the cycle POSTs go through, comma-separated: `forward`, `500`, `429` or `close` (the
connection closed with no answer). By default, of every five POSTs one is answered 500, one 429
and one closed; the others, and every GET (health checks, the model list), are forwarded to
TARGET, except GET /metrics, answered 404: the proxy stands for a server that keeps its load to
itself. It listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx

FAULTS = ["forward", "500", "429", "close", "forward"]


class FaultyProxy(BaseHTTPRequestHandler):
    target = ""
    faults = FAULTS
    turns = itertools.count()
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        if self.path.startswith("/metrics"):
            self._answer(httpx.Response(404, json={"detail": "Not Found"}))
            return
        self._answer(httpx.get(self.target + self.path, headers=self._forwarded_headers(), timeout=30))

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        fault = self.faults[next(self.turns) % len(self.faults)]
        if fault == "close":
            self.close_connection = True
            self.connection.close()
            return
        if fault in ("500", "429"):
            message = b'{"error": {"message": "injected fault", "type": "server_error"}}'
            self.send_response(int(fault))
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(message)))
            self.end_headers()
            self.wfile.write(message)
            return
        self._answer(httpx.post(self.target + self.path, content=body, headers=self._forwarded_headers(),
                                timeout=600))

    def _forwarded_headers(self) -> dict[str, str]:
        return {name: value for name, value in self.headers.items()
                if name.lower() in ("content-type", "authorization")}

    def _answer(self, response: httpx.Response) -> None:
        self.send_response(response.status_code)
        self.send_header("Content-Type", response.headers.get("content-type", "application/json"))
        self.send_header("Content-Length", str(len(response.content)))
        self.end_headers()
        self.wfile.write(response.content)

    def log_message(self, format: str, *args) -> None:  # quiet
        pass


@contextlib.contextmanager
def fault_server(target: str, *faults: str):
    """This proxy in front of `target`, in a process of its own; yields its URL."""
    from .conftest import free_port, wait_for

    port = free_port()
    proxy = subprocess.Popen([sys.executable, __file__, str(port), target, *faults])
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/health"), 30, message="fault server up")
        yield f"http://127.0.0.1:{port}"
    finally:
        proxy.terminate()
        proxy.wait(10)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def main() -> None:
    port, FaultyProxy.target = int(sys.argv[1]), sys.argv[2].rstrip("/")
    if len(sys.argv) > 3:
        FaultyProxy.faults = sys.argv[3].split(",")
    ThreadingHTTPServer(("127.0.0.1", port), FaultyProxy).serve_forever()


if __name__ == "__main__":
    main()
