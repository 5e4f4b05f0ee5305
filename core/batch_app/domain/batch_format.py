"""The batch file format and the limits a client sees, with no dependency beyond the standard
library, so the CLI (an HTTP client) and every server process share one definition.

Input line:  {"custom_id": str, "method": "POST", "url": <endpoint>, "body": {... "model": str ...}}
Output line: {"id": "batch_req_...", "custom_id": str,
              "response": {"status_code": int, "request_id": "req_...", "body": {...}} | null,
              "error": {"code": str, "message": str} | null}
A failed batch lists its problems as `errors.data` entries: {"code", "message", "line", "param"}.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from .statuses import FINAL_BATCH_STATUSES

CHAT_COMPLETIONS = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
RESPONSES = "/v1/responses"
ENDPOINTS = (CHAT_COMPLETIONS, COMPLETIONS, EMBEDDINGS, RESPONSES)

# The statuses a client waits for: once there, a batch has its files and changes no more.
FINAL_STATUSES = FINAL_BATCH_STATUSES

# Fields every input line has, with their JSON types.
INPUT_FIELDS = (("custom_id", str), ("method", str), ("url", str), ("body", dict))
# The only `chat_template_kwargs` a line may pass to the model's chat template (switches that
# templates of reasoning models read); anything else, a template of its own included, is refused.
CHAT_TEMPLATE_KWARGS = ("enable_thinking", "thinking", "reasoning_effort")
# How deeply a line's JSON may nest (objects and arrays): far more than any request needs, and far
# from the recursion limits of the parsers and serializers each line passes through.
MAX_NESTING = 64
# A failed batch reports at most this many line errors.
MAX_REPORTED_ERRORS = 100
# OpenAI's limits on batch metadata.
MAX_METADATA_KEYS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
# Longest a retrieve may be held until the batch ends (`wait`), in seconds: within common proxy
# and client timeouts.
MAX_WAIT = 60.0


@dataclass
class LineError:
    """One entry of a failed batch's `errors`: what is wrong, and on which line."""

    code: str
    message: str
    line: int | None = None
    param: str | None = None

    def as_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "line": self.line, "param": self.param}


def _line_id(prefix: str, *parts: object) -> str:
    """Ids derived from the batch and line, so a rebuilt output file names every line the same."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:24]
    return f"{prefix}{digest}"


def output_line(batch_id: str, line: int, custom_id: str, attempt: int, status_code: int | None,
                response_json: str | None, error_json: str | None) -> bytes:
    """One output (or error) file line. The stored response and error are JSON text, spliced in
    as they are rather than parsed and dumped again."""
    response = "null"
    if response_json is not None:
        request_id = _line_id("req_", batch_id, line, attempt)
        response = f'{{"status_code": {status_code}, "request_id": "{request_id}", "body": {response_json}}}'
    return (f'{{"id": "{_line_id("batch_req_", batch_id, line)}", "custom_id": {json.dumps(custom_id)}, '
            f'"response": {response}, "error": {error_json or "null"}}}\n').encode()
