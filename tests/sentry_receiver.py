"""A local HTTP endpoint that receives the real Sentry SDK's envelopes, for alerting tests."""

from __future__ import annotations

import gzip
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SentryReceiver:
    def __init__(self):
        self.events: list[dict] = []
        self.log_items = 0  # Sentry Logs: our processes send none, their log lines stay in their files
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                receiver._parse(body)
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.dsn = f"http://publickey@127.0.0.1:{self.server.server_address[1]}/1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _parse(self, envelope: bytes) -> None:
        lines = envelope.split(b"\n")
        for header, payload in zip(lines[1::2], lines[2::2], strict=False):
            kind = json.loads(header).get("type")
            if kind == "event":
                self.events.append(json.loads(payload))
            elif kind == "log":
                self.log_items += 1

    def messages(self, level: str) -> list[dict]:
        return [event for event in self.events if event.get("level") == level]

    def close(self) -> None:
        self.server.shutdown()
