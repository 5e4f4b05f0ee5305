"""Validate a batch input file line by line and COPY every request into `batch_requests`.

A file is taken whole or not at all: on any error the caller rolls the transaction back and
fails the batch with the collected errors, each naming its line.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from sqlalchemy.engine import Connection

from .batch_format import CHAT_TEMPLATE_KWARGS, ENDPOINTS, INPUT_FIELDS, MAX_NESTING, MAX_REPORTED_ERRORS, LineError
from .line_policy import refusal
from .storage import Line

_COPY_SQL = "COPY batch_requests (batch_id, project, line, custom_id, model, priority, body) FROM STDIN"
# Rows a COPY takes at a time: the file's next chunk is read, on the same connection, between two.
_COPY_GROUP = 5_000
# `\u0000` as an escape (an odd number of backslashes before it), not an escaped backslash and text.
_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
# A JSON escape of half a surrogate pair: json.loads takes a lone one, which no UTF-8 can store.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


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
    max_choices: int  # `n`
    max_inputs: int  # items of a list-valued `prompt` or `input`
    media_hosts: frozenset[str] = frozenset()  # hosts media URLs may name (line_policy.py)


def ingest_lines(conn: Connection, lines: Iterable[Line], *, batch_id: str, project: str, endpoint: str,
                 priority: int, limits: IngestLimits) -> IngestResult:
    """Parse lines, COPYing good ones until the first error."""
    result = IngestResult()
    first_line_of: dict[str, int] = {}
    rows: list[tuple] = []
    for line in lines:
        number = line.number
        if number > limits.max_lines:
            result.errors.append(LineError(
                "too_many_tasks",
                f"The file has more than {limits.max_lines} requests, the most one batch may hold.",
                number))
            break
        request, error = _parse_line(line, endpoint, limits)
        if error is None:
            error = _check_unique_and_model(number, request, first_line_of, result)
        if error is not None:
            result.errors.append(error)
            if len(result.errors) >= MAX_REPORTED_ERRORS:
                break
            continue
        result.total += 1
        if not result.errors:
            rows.append((batch_id, project, number, request["custom_id"], request["body"]["model"], priority,
                         json.dumps(request["body"], ensure_ascii=False)))
            if len(rows) >= _COPY_GROUP:
                _copy(conn, rows)
    if rows and not result.errors:
        _copy(conn, rows)
    if result.total == 0 and not result.errors:
        result.errors.append(LineError("empty_file", "The input file contains no requests."))
    return result


def _copy(conn: Connection, rows: list[tuple]) -> None:
    with conn.connection.dbapi_connection.cursor().copy(_COPY_SQL) as copy:
        for row in rows:
            copy.write_row(row)
    rows.clear()


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _finite(text: str) -> float:
    """A JSON number as a float; one too large for a float (`1e400`) would become infinity, which
    JSON (and so the stored body) cannot hold."""
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value


# Made once: json.loads with hooks would build a decoder for every line. NaN and Infinity are not
# JSON, nor is a number past a float.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite)


def _too_deep(number: int) -> LineError:
    return LineError("invalid_json_line", f"Line {number} nests objects or arrays more than {MAX_NESTING} levels "
                                          "deep.", number)


def _nesting(value) -> int:
    """How deeply `value` nests, counted up to one past MAX_NESTING (deeper is refused anyway)."""
    deepest, stack = 0, [(value, 1)]
    while stack and deepest <= MAX_NESTING:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _parse_line(line: Line, endpoint: str, limits: IngestLimits) -> tuple[dict | None, LineError | None]:
    number, raw, ended = line.number, line.data, line.ended
    if line.length > limits.max_line_bytes:
        return None, LineError("line_too_long", f"Line {number} is {line.length} bytes long; the limit is "
                                                f"{limits.max_line_bytes}.", number)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, LineError("invalid_json_line",
                               f"Line {number} is not valid UTF-8 (byte {exc.start}).", number)
    if "\\u0000" in text and _NUL_ESCAPE.search(text):
        return None, LineError("invalid_json_line",
                               f"Line {number} contains \\u0000 (a NUL character), which cannot be stored.", number)
    if not text.strip():
        return None, LineError("invalid_json_line",
                               f"Line {number} is blank; each line must hold one JSON request.", number)
    try:
        request = _DECODER.decode(text)
    except RecursionError:
        return None, _too_deep(number)
    except ValueError as exc:
        hint = " (the last line has no newline: was the file cut short?)" if not ended else ""
        return None, LineError("invalid_json_line", f"Line {number} is not valid JSON{hint}: {exc}.", number)
    if not isinstance(request, dict):
        return None, LineError("invalid_json_line", f"Line {number} is not a JSON object.", number)
    # Only a line with more brackets than the limit can nest past it: most are never walked.
    if raw.count(b"[") + raw.count(b"{") > MAX_NESTING and _nesting(request) > MAX_NESTING:
        return None, _too_deep(number)
    if _SURROGATE_ESCAPE.search(raw) and not _encodable(request):
        return None, LineError("invalid_json_line", f"Line {number} contains half of a UTF-16 surrogate pair "
                                                    "(such as \\ud800 alone), which is no character.", number)
    return request, (_check_fields(number, request, endpoint) or _check_body(number, request["body"], limits)
                     or refusal(number, endpoint, request["body"], limits.media_hosts, raw))


def _encodable(request: dict) -> bool:
    try:
        json.dumps(request, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


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


def _check_body(number: int, body: dict, limits: IngestLimits) -> LineError | None:
    """Parameters refused before anything runs: a template of the caller's own (a program the
    worker would run), and fan-out past the limits (one line becoming thousands of requests)."""
    if "chat_template" in body:
        return LineError("invalid_value", f"Line {number}: 'body.chat_template' is not accepted; the model's own "
                                          "chat template is used.", number, "body.chat_template")
    template_kwargs = body.get("chat_template_kwargs")
    if template_kwargs is not None:
        if not isinstance(template_kwargs, dict):
            return LineError("invalid_type", f"Line {number}: 'body.chat_template_kwargs' must be an object.",
                             number, "body.chat_template_kwargs")
        for name, value in template_kwargs.items():
            if name not in CHAT_TEMPLATE_KWARGS or not isinstance(value, (str, bool, int, float)):
                return LineError("invalid_value", f"Line {number}: 'body.chat_template_kwargs.{name[:80]}' is not "
                                                  f"accepted; allowed are {', '.join(CHAT_TEMPLATE_KWARGS)}, each a "
                                                  "string, number or boolean.", number,
                                 f"body.chat_template_kwargs.{name[:80]}")
    choices = body.get("n")
    if choices is not None and (type(choices) is not int or not 1 <= choices <= limits.max_choices):
        return LineError("invalid_value", f"Line {number}: 'body.n' must be an integer from 1 to "
                                          f"{limits.max_choices}.", number, "body.n")
    for name in ("prompt", "input"):
        items = body.get(name)
        if isinstance(items, list) and len(items) > limits.max_inputs and not all(type(i) is int for i in items):
            return LineError("invalid_value", f"Line {number}: 'body.{name}' holds {len(items)} items; at most "
                                              f"{limits.max_inputs} per request.", number, f"body.{name}")
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
