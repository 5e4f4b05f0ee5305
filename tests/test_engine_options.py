"""What a slot of WORKERS says reaches vLLM as it is, checked without a GPU or a model: a real
watchdog starts a worker slot and a server slot whose `vllm` is the stand-in of tests/fake_vllm,
which records what it is given. A worker slot's `gpus` is CUDA_VISIBLE_DEVICES when vLLM is
built and its `engine_options` are LLM(...)'s keyword arguments (the `vllm serve` request options
among them kept apart); a server slot's `gpus` is its server's CUDA_VISIBLE_DEVICES and its
`args` follow the documented `vllm serve` command line, which the server's log shows."""

from __future__ import annotations

import pytest

from core.batch_app.engines.vllm_engine import default_options, has_cuda_gpu

from .conftest import REPO, free_port, start_watchdog, wait_for
from .fake_vllm import fake_model, fake_stack, records, server_slot

WORKER, SERVER, SERVED = "options-0", "options-srv-0", "options-llama"
ENGINE_OPTIONS = {"tensor_parallel_size": 2, "gpu_memory_utilization": 0.9, "dtype": "bfloat16",
                  "tool_call_parser": "hermes", "enable_auto_tool_choice": True}
SERVER_ARGS = ("--max-model-len", "8192", "--tensor-parallel-size", "2")


@pytest.fixture(scope="module")
def stack(database, data_dir, tmp_path_factory):
    """A watchdog with one worker slot and one server slot, each on GPUs of its own; the worker's
    load fails once its options are recorded, and one restart an hour leaves it stopped."""
    folder = tmp_path_factory.mktemp("options")
    model, port = fake_model(folder / "model"), free_port()
    slots = [{"slot": WORKER, "model": model, "served_name": "options-worker-model", "gpus": "1,3",
              "max_model_len": 2048, "engine_options": ENGINE_OPTIONS},
             server_slot(SERVER, port, model, SERVED, gpus="2", args=SERVER_ARGS)]
    watchdog = start_watchdog(database, data_dir, "watchdog-options", slots, HEARTBEAT_INTERVAL="1",
                              SHUTDOWN_GRACE="7", MAX_RESTARTS_PER_HOUR="1", RESTART_BACKOFF_MIN="0.5",
                              **fake_stack(folder / "records", REPO))
    try:
        yield watchdog, folder / "records", model, port
    finally:
        assert watchdog.stop() == 0


def test_a_worker_slots_gpus_and_engine_options_reach_vllm_as_they_are(stack):
    watchdog, recorded, model, _ = stack
    [built, *_] = wait_for(lambda: records(recorded, "llm"), 60, message="the worker building vLLM's LLM")
    assert built["CUDA_VISIBLE_DEVICES"] == "1,3"
    # The slot's options over the CPU defaults (an operator's `dtype` wins); the request options
    # of `vllm serve` (tool_call_parser, enable_auto_tool_choice) are the serving path's, not LLM's.
    assert built["options"] == {"model": model, "served_model_name": "options-worker-model", "runner": "generate",
                                "max_model_len": 2048, **default_options(has_cuda_gpu()),
                                "tensor_parallel_size": 2, "gpu_memory_utilization": 0.9, "dtype": "bfloat16"}
    log = watchdog.log_dir / f"worker-{WORKER}.log"
    wait_for(lambda: "model load failed: RuntimeError: fake vLLM: options recorded" in log.read_text(errors="replace"),
             30, message="the worker's log saying why its load failed")


def test_a_server_slots_gpus_and_args_reach_the_vllm_server(stack):
    watchdog, recorded, model, port = stack
    [server, *_] = wait_for(lambda: records(recorded, f"server-{port}"), 60, message="the server started")
    expected = ["--model", model, "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port),
                "--shutdown-timeout", "7", *SERVER_ARGS, "--fake-health", "ok"]
    assert server["argv"] == expected
    assert server["CUDA_VISIBLE_DEVICES"] == "2"
    assert server["has_api_key"] and not any("api-key" in argument for argument in server["argv"])
    # The operator's view of the same command line, in the server's own log.
    log = (watchdog.log_dir / f"server-{SERVER}.log").read_text(errors="replace")
    assert f"server {SERVER} (pid {server['pid']}): vLLM {' '.join(expected)}" in log
