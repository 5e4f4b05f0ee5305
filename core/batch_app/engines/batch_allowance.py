"""How many batch requests a server that also serves people may hold: its batch allowance.

A pool whose servers carry interactive traffic (`interactive_traffic`) reads each server's own
account of its load, vLLM's /metrics, every `metrics_interval`, and sets how many batch
requests that server may hold:

- Interactive traffic is what the server runs beyond the pool's own requests, seen two ways:
  - requests running or waiting beyond those the pool holds there. Under a full batch this sees
    only many at once: the pool's requests on their way to the engine or back blur the count by
    as many as the interactive ones a server holds at a time;
  - POST requests its HTTP layer has answered (`http_requests_total`, every client's) beyond
    those of the pool that have ended: a new high of that difference, held over two readings, is
    an interactive request that came and went, however short. The server counts an answer once
    it is sent and the pool once it has read it and its sender has woken, so the pool's count
    runs ahead (a dip) or behind (a spike) for a moment, within one reading.
- While interactive requests are on the server, the allowance is halved at once when any request
  waits in the server's queue or the interactive time to first token (TTFT, p90 of the
  server's histogram since the last reading) is past `interactive_ttft_target`, and grows by one
  a reading while both hold. What the pool holds past a cut is taken back at once and tried
  again (see openai_http.py), so a burst does not wait for batch requests to finish.
- KV cache use past KV_CACHE_LIMIT halves it too: a server out of cache preempts requests.
- Once no interactive request has been seen for `interactive_quiet_seconds`, it doubles a
  reading up to `max_in_flight_per_backend`; it never falls below `min_batch_in_flight`, so a
  batch always progresses.
- A server without /metrics (another server, a proxy) is steered by the pool's own answers: the
  time an answer took per token it generated, against the fastest seen lately; past
  `latency_slack` times that, halved, else grown by one.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

KV_CACHE_LIMIT = 0.9
OTHERS_WINDOW = 8  # readings a new high of others' answered requests is judged against
FASTEST_WINDOW = 60.0  # seconds of answers the latency-only control takes its fastest from
TTFT_QUANTILE = 0.9
_RUNNING, _WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
_KV_USAGE, _TTFT_BUCKET = "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds_bucket"
_HTTP_ANSWERED = "http_requests_total"  # the HTTP layer's count of answered requests, by handler, method, status
_READ = (_RUNNING + " ", _RUNNING + "{", _WAITING + " ", _WAITING + "{", _KV_USAGE, _TTFT_BUCKET, _HTTP_ANSWERED + "{")


@dataclass(frozen=True)
class ServerReading:
    """One reading of a vLLM server's /metrics, summed over its engines."""

    running: float
    waiting: float
    kv_usage: float | None
    ttft_buckets: dict[float, float]  # upper bound -> observations at most that (cumulative counter)
    posts_answered: float | None = None  # POST requests its HTTP layer has answered, every client's (counter)


def read_metrics(text: str) -> ServerReading | None:
    """The reading in a Prometheus exposition, or None when it is not a vLLM server's. Only the
    lines of the few families used are parsed: a server's whole exposition costs far more."""
    lines = "\n".join(line for line in text.splitlines() if line.startswith(_READ))
    sums: dict[str, float] = {}
    buckets: dict[float, float] = {}
    kv = []
    posts = None
    for family in text_string_to_metric_families(lines):
        for sample in family.samples:
            if sample.name == _HTTP_ANSWERED:
                posts = (posts or 0.0) + (sample.value if sample.labels.get("method") == "POST" else 0.0)
            elif sample.name == _TTFT_BUCKET:
                bound = float(sample.labels["le"])
                buckets[bound] = buckets.get(bound, 0.0) + sample.value
            elif sample.name == _KV_USAGE:
                kv.append(sample.value)
            else:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    if _RUNNING not in sums:
        return None
    return ServerReading(running=sums[_RUNNING], waiting=sums.get(_WAITING, 0.0), kv_usage=max(kv) if kv else None,
                         ttft_buckets=buckets, posts_answered=posts)


def ttft_quantile(before: ServerReading, after: ServerReading, quantile: float = TTFT_QUANTILE) -> float | None:
    """The upper bound of the bucket holding that quantile of the TTFTs observed between two
    readings; None when none was."""
    counts = sorted((bound, after.ttft_buckets[bound] - before.ttft_buckets.get(bound, 0.0))
                    for bound in after.ttft_buckets)
    total = counts[-1][1] if counts else 0.0
    if total <= 0:
        return None
    return next(bound for bound, count in counts if count >= quantile * total)


class BatchAllowance:
    """The allowance of one server, with the reason for its last change, in words an operator
    reads in `batchctl backends`: `kind: detail`, the kind one of a few (a /metrics label)."""

    def __init__(self, *, ceiling: int, floor: int, ttft_target: float, quiet_seconds: float,
                 latency_slack: float) -> None:
        self.ceiling, self.floor = ceiling, min(floor, ceiling)
        self.ttft_target, self.quiet_seconds, self.latency_slack = ttft_target, quiet_seconds, latency_slack
        self._value = float(self.floor)
        self.reason = "starting: no reading yet"
        self._previous: ServerReading | None = None
        self._interactive_at = -math.inf
        self._others_last: float | None = None  # others' answered requests at the last reading
        self._others_levels: deque[float] = deque(maxlen=OTHERS_WINDOW)  # the lower of each two readings in a row
        self._answers: deque[tuple[float, float]] = deque()  # (time, seconds per generated token)
        self._recent: list[float] = []  # seconds per token of the answers since the last update

    @property
    def value(self) -> int:
        return int(self._value)

    def after_reading(self, reading: ServerReading, *, ours_in_flight: int, ours_ended: int, now: float) -> int:
        """The allowance once the server reported `reading`, while the pool held `ours_in_flight`
        requests there (the server holds at most those of the pool's: what is beyond is others')
        and `ours_ended` of the POST requests it sent there had ended."""
        previous, self._previous = self._previous, reading
        others_answered = self._others_came_and_went(reading, ours_ended)  # every reading joins its history
        if reading.running + reading.waiting > ours_in_flight or others_answered:
            self._interactive_at = now
        ttft = ttft_quantile(previous, reading) if previous is not None else None
        interactive = now - self._interactive_at < self.quiet_seconds
        if reading.kv_usage is not None and reading.kv_usage > KV_CACHE_LIMIT:
            return self._cut("cache_pressure", f"KV cache {reading.kv_usage:.0%} used")
        if interactive and reading.waiting > 0:
            return self._cut("interactive_queued", f"{reading.waiting:.0f} requests waiting beside interactive ones")
        if interactive and ttft is not None and ttft > self.ttft_target:
            return self._cut("ttft_over_target", f"TTFT p90 up to {ttft * 1000:.0f} ms, target "
                                                 f"{self.ttft_target * 1000:.0f} ms")
        if interactive:
            return self._grow("interactive_within_target", self._value + 1,
                              f"interactive traffic {max(now - self._interactive_at, 0):.1f} s ago")
        return self._grow("no_interactive", self._value * 2,
                          f"no interactive request for {self.quiet_seconds:.0f} s")

    def _others_came_and_went(self, reading: ServerReading, ours_ended: int) -> bool:
        """Whether requests of other clients were answered since the last readings: a new high of
        the server's answered POST requests beyond the pool's, held over two readings (a spike of
        one reading is the pool's count behind for a moment)."""
        if reading.posts_answered is None:
            return False
        others, last = reading.posts_answered - ours_ended, self._others_last
        self._others_last = others
        if last is None:
            return False
        level = min(others, last)
        new_high = bool(self._others_levels) and level > max(self._others_levels)
        self._others_levels.append(level)
        return new_high

    def answered(self, seconds: float, tokens: int) -> None:
        """One of the pool's requests answered by this server: what the latency-only control reads."""
        self._recent.append(seconds / max(tokens, 1))

    def after_latencies(self, now: float) -> int:
        """The allowance from the pool's own answers since the last update (no /metrics)."""
        recent, self._recent = self._recent, []
        for sample in recent:
            self._answers.append((now, sample))
        while self._answers and self._answers[0][0] < now - FASTEST_WINDOW:
            self._answers.popleft()
        if not recent:
            return self._grow("latency_within_target", self._value, "no answer since the last reading (no /metrics)")
        fastest = min(sample for _, sample in self._answers)
        typical = sorted(recent)[len(recent) // 2]
        if typical > self.latency_slack * fastest:
            return self._cut("latency_over_target", f"answers {typical / fastest:.1f}x slower a token than the "
                                                    f"fastest of the last {FASTEST_WINDOW:.0f} s (no /metrics)")
        return self._grow("latency_within_target", self._value + 1,
                          f"answers {typical / fastest:.1f}x the fastest a token (no /metrics)")

    def _cut(self, kind: str, detail: str) -> int:
        self._value = max(float(self.floor), self._value / 2)
        self.reason = f"{kind}: {detail}"
        return self.value

    def _grow(self, kind: str, value: float, detail: str) -> int:
        self._value = min(float(self.ceiling), max(float(self.floor), value))
        self.reason = f"{kind}: {detail}"
        return self.value
