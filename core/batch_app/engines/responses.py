"""OpenAI's Responses API (`/v1/responses`) on the chat path of an engine: a Responses request
becomes a chat request, and the chat answer a `response` object.

What maps: `input` (a string, or message items whose content is a string or `input_text`
parts), `instructions` (a system message first), `max_output_tokens`, `temperature`, `top_p`,
`seed`, and `text.format` (`text`, `json_object`, `json_schema`). What a batch engine cannot
honour is refused naming the parameter: tools, background runs, stored conversations and
previous responses, reasoning settings, streaming.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

# Fields a Responses request may not carry here (a tool needs a caller to run it; background,
# stored state and conversations belong to a live session, not a batch line).
_REFUSED = ("tools", "tool_choice", "background", "previous_response_id", "conversation", "prompt", "stream",
            "include", "reasoning", "max_tool_calls")
# Passed to the chat path under the same name.
_SAMPLING = ("temperature", "top_p", "seed", "user", "metadata")


class ResponsesError(ValueError):
    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """The chat-completions body that answers this Responses body."""
    for name in _REFUSED:
        if body.get(name) not in (None, False, [], "none", "auto"):
            raise ResponsesError(f"'{name}' is not supported in batches here", name)
    messages = []
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ResponsesError("'instructions' must be a string", "instructions")
        messages.append({"role": "system", "content": instructions})
    messages += _input_messages(body.get("input"))
    chat = {"model": body.get("model"), "messages": messages}
    chat.update({name: body[name] for name in _SAMPLING if name in body})
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    text = body.get("text")
    if text is not None:
        chat["response_format"] = _response_format(text)
    return chat


def _input_messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise ResponsesError("'input' must be a string or a non-empty list of message items", "input")
    messages = []
    for index, item in enumerate(value):
        param = f"input[{index}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message" or not isinstance(
                item.get("role"), str):
            raise ResponsesError(f"{param} must be a message item with a 'role' (other items are not supported "
                                 f"here)", param)
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") in ("input_text", "output_text")
                        and isinstance(part.get("text"), str)):
                    raise ResponsesError(f"{param}.content: only input_text parts are supported", param)
                texts.append(part["text"])
            content = "\n".join(texts)
        elif not isinstance(content, str):
            raise ResponsesError(f"{param}.content must be a string or a list of input_text parts", param)
        # Chat templates know system, user and assistant; a developer message is the system's.
        messages.append({"role": "system" if item["role"] == "developer" else item["role"], "content": content})
    return messages


def _response_format(text: Any) -> dict[str, Any]:
    """`text.format` as the chat path's `response_format`."""
    fmt = text.get("format") if isinstance(text, dict) else None
    if fmt is None:
        return {"type": "text"}
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise ResponsesError("text.format.type must be 'text', 'json_object' or 'json_schema'", "text.format")
    if fmt["type"] != "json_schema":
        return {"type": fmt["type"]}
    if not isinstance(fmt.get("schema"), dict):
        raise ResponsesError("text.format.schema must be a JSON schema object", "text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.get("name", "output"), "schema": fmt["schema"]}}


def response_object(chat: dict[str, Any], request: dict[str, Any]) -> dict[str, Any]:
    """The `response` object of a chat answer to `request` (a Responses body)."""
    choice = chat["choices"][0]
    cut = choice.get("finish_reason") == "length"
    usage = chat.get("usage") or {}
    input_tokens, output_tokens = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    text = request.get("text") if isinstance(request.get("text"), dict) else {}
    return {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": chat.get("created", int(time.time())),
        "completed_at": int(time.time()), "status": "incomplete" if cut else "completed",
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None, "error": None,
        "model": chat["model"], "instructions": request.get("instructions"),
        "max_output_tokens": request.get("max_output_tokens"), "temperature": request.get("temperature"),
        "top_p": request.get("top_p"), "metadata": request.get("metadata"), "user": request.get("user"),
        "parallel_tool_calls": False, "tool_choice": "none", "tools": [],
        "text": {"format": text.get("format") or {"type": "text"}},
        "output": [{
            "type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
            "status": "incomplete" if cut else "completed",
            "content": [{"type": "output_text", "text": choice["message"]["content"] or "", "annotations": [],
                         "logprobs": []}],
        }],
        "usage": {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
                  "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                  "total_tokens": input_tokens + output_tokens},
    }
