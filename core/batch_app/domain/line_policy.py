"""What a batch line may ask, whichever engine serves it (the in-process one, a pool of servers,
the managed servers): one policy, checked at ingest, so a refused line never runs anywhere.

Refused, naming the parameter:
- state a batch cannot honour: a streamed answer, and on `/v1/responses` a background run, a
  stored response, a conversation or a previous response (a batch line is answered once, into a
  file, and nothing of it is kept for a later call);
- media given by URL (`image_url`, `video_url`, `audio_url`, `input_audio`, `file_url`, the
  Responses API's `input_image` and `input_file`) unless it is a `data:` URL or its host is one
  the operator allows (MEDIA_URL_ALLOWED_HOSTS): vLLM fetches such URLs itself, from inside the
  operator's network, so any other URL lets a line reach internal addresses.

What a model can do (tools, logprobs, echo) is not refused here: that is each engine's answer.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from .batch_format import RESPONSES, LineError

# Responses fields that ask for state kept beyond the one answer, and the values that ask for none.
_RESPONSES_STATE = {"background": (None, False), "previous_response_id": (None,), "conversation": (None,),
                    "store": (None, False)}
# Keys whose value is media given by URL: the URL itself, or an object with a `url`.
_MEDIA_KEYS = ("image_url", "video_url", "audio_url", "input_audio", "file_url")
# The parts of a body that carry messages and their media.
_MESSAGE_FIELDS = ("messages", "input")


def allowed_hosts(setting: str) -> frozenset[str]:
    """MEDIA_URL_ALLOWED_HOSTS: comma-separated host names, compared without case."""
    return frozenset(host.strip().lower().rstrip(".") for host in setting.split(",") if host.strip())


def refusal(number: int, endpoint: str, body: dict, media_hosts: frozenset[str], raw: bytes) -> LineError | None:
    """The reason line `number` (`raw` as sent, `body` parsed) may not run, or None."""
    if body.get("stream") not in (None, False):
        return LineError("invalid_value", f"Line {number}: 'body.stream' is not accepted; a batch line is "
                                          "answered whole, into the output file.", number, "body.stream")
    if endpoint == RESPONSES:
        for name, harmless in _RESPONSES_STATE.items():
            if body.get(name, None) not in harmless:
                return LineError("invalid_value", f"Line {number}: 'body.{name}' is not accepted; a batch line "
                                                  "is answered once and nothing of it is kept for a later "
                                                  "request.", number, f"body.{name}")
    if b"_url" not in raw and b"input_audio" not in raw and b"\\u" not in raw:
        return None  # most lines: no key of theirs can name media (a \u escape could spell one)
    for field in _MESSAGE_FIELDS:
        if isinstance(body.get(field), (list, dict)):
            if (found := _media_url(body[field], f"body.{field}", media_hosts)) is not None:
                param, url = found
                return LineError("invalid_value", f"Line {number}: '{param}' fetches '{url[:100]}'; media "
                                                  "must be given as a data: URL (or from a host the operator "
                                                  "allows).", number, param)
    return None


def _media_url(value, path: str, media_hosts: frozenset[str]) -> tuple[str, str] | None:
    """(the parameter, the URL) of the first media URL in `value` that may not be fetched."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, list):
            stack.extend((child, f"{where}[{index}]") for index, child in reversed(list(enumerate(item))))
            continue
        if not isinstance(item, dict):
            continue
        for key, child in item.items():
            if key in _MEDIA_KEYS and not _fetchable(url := _url_of(child), media_hosts):
                return f"{where}.{key}", url
        stack.extend((child, f"{where}.{key}") for key, child in reversed(item.items())
                     if isinstance(child, (list, dict)))
    return None


def _url_of(media) -> str | None:
    """A media value's URL: the value itself, or its `url`."""
    url = media.get("url") if isinstance(media, dict) else media
    return url if isinstance(url, str) else None


def _fetchable(url: str | None, media_hosts: frozenset[str]) -> bool:
    """A `data:` URL carries its media (and media without a URL, such as base64 audio, is no
    fetch); any other URL is fetched, and only from an allowed host."""
    if url is None or url[:5].lower() == "data:":
        return True
    try:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").rstrip(".")
    except ValueError:
        return False
    return parts.scheme.lower() in ("http", "https") and bool(host) and host in media_hosts
