"""Validate a batch input file line by line and COPY every request into `batch_requests`.

A file is taken whole or not at all: on any error the caller rolls the transaction back and
fails the batch with the collected errors, each naming its line.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from .batch_format import ENDPOINTS, INPUT_FIELDS, MAX_REPORTED_ERRORS, LineError

_COPY_SQL = "COPY batch_requests (batch_id, line, custom_id, model, priority, body) FROM STDIN"


@dataclass
class IngestResult:
    total: int = 0
    model: str | None = None
    model_line: int | None = None
    errors: list[LineError] = field(default_factory=list)


@dataclass(frozen=True)
class IngestLimits:
    max_lines: int
    max_line_bytes: int


def ingest_lines(conn: Connection, lines: Iterable[tuple[int, bytes, bool]], *, batch_id: str,
                 endpoint: str, priority: int, limits: IngestLimits) -> IngestResult:
    """Parse (number, bytes, ended-by-newline) lines, COPYing good ones until the first error."""
    result = IngestResult()
    first_line_of: dict[str, int] = {}
    cursor = conn.connection.dbapi_connection.cursor()
    with cursor.copy(_COPY_SQL) as copy:
        for number, raw, ended in lines:
            if number > limits.max_lines:
                result.errors.append(LineError(
                    "too_many_tasks",
                    f"The file has more than {limits.max_lines} requests, the most one batch may hold.",
                    number))
                break
            request, error = _parse_line(number, raw, ended, endpoint, limits.max_line_bytes)
            if error is None:
                error = _check_unique_and_model(number, request, first_line_of, result)
            if error is not None:
                result.errors.append(error)
                if len(result.errors) >= MAX_REPORTED_ERRORS:
                    break
                continue
            result.total += 1
            if not result.errors:
                copy.write_row((batch_id, number, request["custom_id"], request["body"]["model"],
                                priority, json.dumps(request["body"], ensure_ascii=False)))
    if result.total == 0 and not result.errors:
        result.errors.append(LineError("empty_file", "The input file contains no requests."))
    return result


def _parse_line(number: int, raw: bytes, ended: bool, endpoint: str,
                max_line_bytes: int) -> tuple[dict | None, LineError | None]:
    if len(raw) > max_line_bytes:
        return None, LineError("line_too_long",
                               f"Line {number} is {len(raw)} bytes long; the limit is {max_line_bytes}.", number)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, LineError("invalid_json_line",
                               f"Line {number} is not valid UTF-8 (byte {exc.start}).", number)
    if "\\u0000" in text:
        return None, LineError("invalid_json_line",
                               f"Line {number} contains \\u0000 (a NUL character), which cannot be stored.", number)
    if not text.strip():
        return None, LineError("invalid_json_line",
                               f"Line {number} is blank; each line must hold one JSON request.", number)
    try:
        request = json.loads(text)
    except ValueError as exc:
        hint = " (the last line has no newline: was the file cut short?)" if not ended else ""
        return None, LineError("invalid_json_line", f"Line {number} is not valid JSON{hint}: {exc}.", number)
    if not isinstance(request, dict):
        return None, LineError("invalid_json_line", f"Line {number} is not a JSON object.", number)
    return request, _check_fields(number, request, endpoint)


def _check_fields(number: int, request: dict, endpoint: str) -> LineError | None:
    for name, kind in INPUT_FIELDS:
        if name not in request:
            return LineError("missing_required_parameter",
                             f"Line {number} is missing the required field '{name}'.", number, name)
        if not isinstance(request[name], kind):
            expected = "an object" if kind is dict else "a string"
            return LineError("invalid_type", f"Line {number}: '{name}' must be {expected}.", number, name)
    if not request["custom_id"]:
        return LineError("invalid_value", f"Line {number}: 'custom_id' must not be empty.", number, "custom_id")
    if request["method"].upper() != "POST":
        return LineError("invalid_method",
                         f"Line {number}: method '{request['method']}' is not supported; use POST.",
                         number, "method")
    if request["url"] != endpoint:
        code = "url_mismatch" if request["url"] in ENDPOINTS else "invalid_url"
        return LineError(code, f"Line {number}: url '{request['url']}' does not match the batch "
                               f"endpoint '{endpoint}'.", number, "url")
    model = request["body"].get("model")
    if not isinstance(model, str) or not model:
        return LineError("missing_required_parameter",
                         f"Line {number}: 'body.model' must name the model.", number, "body.model")
    return None


def _check_unique_and_model(number: int, request: dict, first_line_of: dict[str, int],
                            result: IngestResult) -> LineError | None:
    custom_id = request["custom_id"]
    if (first := first_line_of.setdefault(custom_id, number)) != number:
        return LineError("duplicate_custom_id",
                         f"Line {number}: custom_id '{custom_id}' was already used on line {first}.",
                         number, "custom_id")
    model = request["body"]["model"]
    if result.model is None:
        result.model, result.model_line = model, number
    elif model != result.model:
        return LineError("model_mismatch",
                         f"Line {number}: model '{model}' differs from '{result.model}' on line "
                         f"{result.model_line}; a batch uses one model.", number, "body.model")
    return None
