"""Webhook receivers for tests, real HTTP servers on threads: a well-behaved one that keeps every
delivery, and hostile ones chosen by the path of the URL they are given."""

from __future__ import annotations

import gzip
import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# 200 MiB of zeros in 10 MiB gzip members, about 200 KiB as sent: whoever decompresses it holds it all.
BOMB = gzip.compress(b"\0" * (10 << 20), compresslevel=9) * 20
FORGED = "[/bold red] forged [green]delivered[/green] \x1b[2J[link=x]"
DRIBBLE_INTERVAL = 0.5  # seconds between the bytes of a dribbling answer: well within any per-read timeout


def send_json(handler: BaseHTTPRequestHandler, status: int, body: dict) -> None:
    """Answer a request of an http.server handler with `body` as JSON."""
    content = json.dumps(body).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(content)))
    handler.end_headers()
    handler.wfile.write(content)


class Receiver:
    """A local webhook receiver: answers `status` (200 by default) and keeps every delivery."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.deliveries: list[tuple[bytes, dict[str, str]]] = []
        self.status = 200
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.deliveries.append((body, {k.lower(): v for k, v in self.headers.items()}))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self._handler = Handler
        self._host = host
        self.server: ThreadingHTTPServer | None = ThreadingHTTPServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}/hooks"
        self._serve()

    def _serve(self) -> None:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def up(self) -> None:
        if self.server is None:
            self.server = ThreadingHTTPServer((self._host, self.port), self._handler)
            self._serve()

    def down(self) -> None:
        """Nothing listens on the port: connections are refused."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events(self, client, secret: str) -> list:
        """Every delivery, verified and parsed by the SDK (a bad signature raises)."""
        return [client.webhooks.unwrap(body, headers, secret=secret) for body, headers in self.deliveries]

    def for_batch(self, batch_id: str) -> list[tuple[bytes, dict]]:
        return [(body, headers) for body, headers in self.deliveries if json.loads(body)["data"]["id"] == batch_id]


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # dozens of connections at once, none refused
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A sender that gave up on a hostile answer closes its connection: that is the point, not
        an error to print."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


def kind_of(path: str) -> str:
    """The kind of hostile answer a path asks for: its first part, without the query."""
    return path.split("?")[0].strip("/")


class HostileReceivers:
    """One server whose answer depends on the path:
    - /bomb-ok, /bomb-error: 200 or 500 with `Content-Encoding: gzip` and BOMB as the body;
    - /dribble: the answer one byte every DRIBBLE_INTERVAL seconds, from its first byte on;
    - /silent: reads the request and never answers;
    - /forge: 500 with Rich markup and a terminal escape as the body;
    - /unavailable: 503.
    `requests` counts the requests by kind, `paths` by path with its query."""

    KINDS = ("bomb-ok", "bomb-error", "dribble", "silent")

    def __init__(self):
        self.paths: Counter[str] = Counter()
        self._counting = threading.Lock()  # the handlers' threads count at once
        self.closing = threading.Event()
        hostile = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                kind = kind_of(self.path)
                with hostile._counting:
                    hostile.paths[self.path] += 1
                try:
                    getattr(self, "answer_" + kind.replace("-", "_"))()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the sender gave up on us, as it should

            def answer_bomb_ok(self, status: int = 200):
                self.send_response(status)
                self.send_header("Content-Encoding", "gzip")
                self.send_header("Content-Length", str(len(BOMB)))
                self.end_headers()
                self.wfile.write(BOMB)

            def answer_bomb_error(self):
                self.answer_bomb_ok(500)

            def answer_dribble(self):
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
                    if hostile.closing.wait(DRIBBLE_INTERVAL):
                        return
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()

            def answer_silent(self):
                hostile.closing.wait(120)

            def answer_forge(self):
                body = FORGED.encode()
                self.send_response(500)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def answer_unavailable(self):
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def requests(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        with self._counting:
            for path, n in self.paths.items():
                counts[kind_of(path)] += n
        return counts

    def path(self, kind: str, tag: str = "") -> str:
        return f"/{kind}" + (f"?n={tag}" if tag else "")

    def url(self, kind: str, tag: str = "") -> str:
        return self.base_url + self.path(kind, tag)

    def close(self) -> None:
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()
