"""The batch allowance's rules on readings made by hand (the same rules on real vLLM servers are
in test_shared_servers.py): what cuts it, what grows it, and its floor and ceiling."""

from __future__ import annotations

import json

import pytest

from core.batch_app.config import Settings
from core.batch_app.engines.batch_allowance import BatchAllowance, ServerReading, read_metrics, ttft_quantile

BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, float("inf"))


def reading(running=0, waiting=0, kv=0.1, ttfts=()) -> ServerReading:
    return ServerReading(running=running, waiting=waiting, kv_usage=kv,
                         ttft_buckets={bound: sum(1 for t in ttfts if t <= bound) for bound in BOUNDS})


def allowance(**options) -> BatchAllowance:
    return BatchAllowance(**{"ceiling": 32, "floor": 2, "ttft_target": 0.1, "quiet_seconds": 5.0,
                             "latency_slack": 2.0, **options})


def test_a_vllm_exposition_is_read_summed_over_engines():
    text = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:num_requests_waiting_by_reason{engine="0",model_name="m",reason="capacity"} 7.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 10.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 5.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.1",model_name="m"} 4.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="m"} 6.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="m"} 6.0
# TYPE http_requests_total counter
http_requests_total{handler="/v1/chat/completions",method="POST",status="2xx"} 40.0
http_requests_total{handler="/v1/completions",method="POST",status="4xx"} 2.0
http_requests_total{handler="/v1/models",method="GET",status="2xx"} 9.0
http_requests_created{handler="/v1/models",method="GET",status="2xx"} 1.7e9
"""
    found = read_metrics(text)
    assert (found.running, found.waiting, found.kv_usage) == (5, 1, 0.25)
    assert found.ttft_buckets == {0.1: 4, float("inf"): 6}
    assert found.posts_answered == 42  # every client's POSTs, whatever their answer; health checks' GETs not
    assert read_metrics("# a server without vLLM's metrics\nprocess_cpu_seconds_total 1.0\n") is None


def test_the_ttft_quantile_is_of_the_requests_between_two_readings():
    before = reading(ttfts=[0.3] * 100)  # slow ones long ago do not count
    assert ttft_quantile(before, reading(ttfts=[0.3] * 100 + [0.02] * 9 + [0.4])) == 0.05
    assert ttft_quantile(before, reading(ttfts=[0.3] * 100 + [0.02] * 8 + [0.4] * 2)) == 0.5
    assert ttft_quantile(before, before) is None


def test_with_no_interactive_traffic_it_doubles_to_its_ceiling():
    control = allowance()
    values = [control.after_reading(reading(running=n), ours_in_flight=n, ours_ended=0, now=t)
              for t, n in enumerate([0, 2, 4, 8, 16, 32, 32])]
    assert values == [4, 8, 16, 32, 32, 32, 32]
    assert control.reason.startswith("no_interactive:")


def test_interactive_requests_beside_a_queue_halve_it_at_once_then_it_grows_back_by_one():
    control = allowance()
    for t in range(4):
        control.after_reading(reading(running=control.value), ours_in_flight=control.value, ours_ended=0, now=t)
    assert control.value == 32
    # Two interactive requests arrive; one waits.
    assert control.after_reading(reading(running=32, waiting=2), ours_in_flight=32, ours_ended=0, now=4) == 16
    assert control.reason.startswith("interactive_queued:")
    # They run within target, nothing waits: one more a reading.
    assert control.after_reading(reading(running=18, ttfts=[0.02]), ours_in_flight=16, ours_ended=0, now=5) == 17
    assert control.reason.startswith("interactive_within_target:")
    # Gone, but seen 0.5 s ago: still by one; doubled once none was seen for 5 s.
    assert control.after_reading(reading(running=17), ours_in_flight=17, ours_ended=0, now=5.5) == 18
    assert control.after_reading(reading(running=18), ours_in_flight=18, ours_ended=0, now=11) == 32


def test_interactive_ttft_past_the_target_halves_it_down_to_its_floor():
    control = allowance(ceiling=8)
    for t in range(2):
        control.after_reading(reading(), ours_in_flight=0, ours_ended=0, now=t)
    assert control.value == 8
    values = [control.after_reading(reading(running=9, ttfts=[0.3] * (i + 1)), ours_in_flight=8, ours_ended=0,
                                    now=2 + i) for i in range(4)]
    assert values == [4, 2, 2, 2] and control.reason.startswith("ttft_over_target:")


def test_kv_cache_pressure_halves_it_with_no_interactive_traffic():
    control = allowance()
    control.after_reading(reading(), ours_in_flight=0, ours_ended=0, now=0)
    assert control.after_reading(reading(running=4, kv=0.95), ours_in_flight=4, ours_ended=0, now=1) == 2
    assert control.reason == "cache_pressure: KV cache 95% used"


def test_the_pools_own_requests_are_not_taken_for_interactive_ones():
    control = allowance()
    # The server holds fewer of the pool's requests than the pool does (some on their way there,
    # some answered on their way back): no interactive traffic.
    for t, (running, waiting) in enumerate([(2, 0), (4, 2), (8, 0)]):
        control.after_reading(reading(running=running, waiting=waiting), ours_in_flight=8, ours_ended=0, now=t)
    assert control.reason.startswith("no_interactive:") and control.value == 16
    control.after_reading(reading(running=8, waiting=1), ours_in_flight=8, ours_ended=0, now=4)
    assert control.reason.startswith("interactive_queued:") and control.value == 8


def test_interactive_requests_that_came_and_went_between_readings_are_seen_by_the_servers_answer_count():
    control = allowance()
    at_ceiling = dict(running=20, waiting=0, kv_usage=0.1, ttft_buckets={})  # fewer than the pool holds: 12 on their way

    def after(posts_answered: int, ours_ended: int, now: float) -> int:
        return control.after_reading(ServerReading(**at_ceiling, posts_answered=posts_answered),
                                     ours_in_flight=32, ours_ended=ours_ended, now=now)

    # The server counts the pool's answers once sent, the pool once it has read them, so the
    # difference dips (the pool ahead) and spikes (the pool behind) for a reading: no interactive
    # traffic, the spike included.
    for t, (server, ours) in enumerate([(100, 100), (150, 150), (196, 200), (250, 250), (280, 283), (330, 330),
                                        (388, 380), (430, 430)]):
        after(server, ours, now=t)
    assert control.reason.startswith("no_interactive:") and control.value == 32
    # One request of another client answered, however short it was: a new high, once it holds
    # for a second reading.
    after(481, 480, now=8)
    assert control.reason.startswith("no_interactive:")
    after(531, 530, now=9)
    assert control.reason.startswith("interactive_within_target:") and control.value == 32
    # Back at that level after a dip is no new one; with none for 5 s it doubles again.
    after(580, 582, now=10)
    after(631, 630, now=11)
    assert after(681, 680, now=14.5) == 32 and control.reason.startswith("no_interactive:")


def test_a_reading_that_shows_interactive_requests_running_still_counts_for_those_answered():
    control = allowance()
    for t in range(4):
        control.after_reading(ServerReading(running=0, waiting=0, kv_usage=0.1, ttft_buckets={}, posts_answered=0),
                              ours_in_flight=0, ours_ended=0, now=t)
    # Seen running at 10 (and five answered); the five answered held at 10.5: seen again then.
    control.after_reading(ServerReading(running=1, waiting=0, kv_usage=0.1, ttft_buckets={}, posts_answered=5),
                          ours_in_flight=0, ours_ended=0, now=10)
    control.after_reading(ServerReading(running=0, waiting=0, kv_usage=0.1, ttft_buckets={}, posts_answered=5),
                          ours_in_flight=0, ours_ended=0, now=10.5)
    # A dip at 15.2: the last seen is 4.7 s ago, within the 5 quiet seconds.
    control.after_reading(ServerReading(running=0, waiting=0, kv_usage=0.1, ttft_buckets={}, posts_answered=5),
                          ours_in_flight=0, ours_ended=6, now=15.2)
    assert control.reason.startswith("interactive_within_target:")


def test_without_metrics_answers_slower_than_the_fastest_halve_it():
    control = allowance(floor=1)
    for _ in range(5):
        control.answered(0.32, 32)  # 10 ms a token
    assert control.after_latencies(now=0) == 2 and control.reason.startswith("latency_within_target:")
    for _ in range(5):
        control.answered(0.8, 32)  # 25 ms a token
    assert control.after_latencies(now=1) == 1 and control.reason.startswith("latency_over_target:")
    assert control.after_latencies(now=2) == 1  # no answer: held


def test_pool_options_reach_the_pools_made_from_server_slots_and_an_unknown_one_is_refused():
    servers = json.dumps([{"slot": f"llama-srv-{i}", "serve": {"model": "demo", "served_name": "llama", "port": 8100 + i}}
                          for i in range(2)])
    options = json.dumps({"interactive_traffic": True, "batch_priority": 10, "min_batch_in_flight": 2})
    [*_, pool] = Settings(workers=servers, pool_options=options).worker_slots()
    assert (pool.slot, pool.interactive_traffic, pool.batch_priority, pool.min_batch_in_flight) == ("pool-llama", True,
                                                                                                  10, 2)
    assert pool.pool_options()["interactive_traffic"] is True  # what the pool worker reads back
    with pytest.raises(ValueError, match="unknown: interactive"):
        Settings(workers=servers, pool_options='{"interactive": true}').worker_slots()
