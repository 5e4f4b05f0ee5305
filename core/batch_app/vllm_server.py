"""`python -m core.batch_app.vllm_server --slot NAME`: the vLLM OpenAI server of a server slot.

The watchdog starts it in a process group of its own, with the slot's GPUs in
CUDA_VISIBLE_DEVICES. It logs to LOG_DIR/server-<slot>.log in the format of every other process
(vLLM's own lines and whatever its engine processes print included), then runs vLLM's
`python -m vllm.entrypoints.openai.api_server` in this process with the slot's model, served
name, loopback port and arguments, and the key only its probe and pool know (server_keys.py; a
key is never logged). On SIGTERM vLLM stops taking requests and finishes those it holds for up to
SHUTDOWN_GRACE seconds (`--shutdown-timeout`, unless the slot's arguments set it).
"""

from __future__ import annotations

import argparse
import logging
import os
import runpy
import sys

from .config import ServerSpec, get_settings
from .engines.vllm_engine import vllm_environment
from .logs import configure_logging, server_log_stem
from .models import check_local_model, resolve_model
from .server_keys import server_key

log = logging.getLogger("core.batch_app.vllm_server")


def vllm_arguments(spec: ServerSpec, model_path: str, runner: str, shutdown_grace: float) -> list[str]:
    """The command-line arguments vLLM's server gets for this slot."""
    arguments = ["--model", model_path, "--served-model-name", spec.name, "--host", "127.0.0.1",
                 "--port", str(spec.port)]
    if runner == "pooling":
        arguments += ["--runner", "pooling"]
    if not any(arg.split("=")[0] == "--shutdown-timeout" for arg in spec.args):
        arguments += ["--shutdown-timeout", str(int(shutdown_grace))]
    return arguments + spec.args


def redacted(arguments: list[str]) -> list[str]:
    """The arguments with any key among them hidden, for a log line."""
    shown = []
    for before, argument in zip(["", *arguments], arguments, strict=False):
        if before == "--api-key":
            argument = "***"
        elif argument.startswith("--api-key="):
            argument = "--api-key=***"
        shown.append(argument)
    return shown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slot", required=True)
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    settings = get_settings()
    configure_logging(f"server:{args.slot}", settings, server_log_stem(args.slot))
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")  # vLLM's loggers propagate to ours
    spec = settings.worker_slot(args.slot).serve
    if spec is None:
        log.error("slot %s is not a server slot (it has no `serve` in WORKERS)", args.slot)
        return 2
    for name, value in vllm_environment(settings.data_dir / "cache").items():
        os.environ.setdefault(name, value)
    choice = resolve_model(spec.model, settings.data_dir, spec.served_name)
    try:
        check_local_model(choice.path)
    except FileNotFoundError as exc:
        log.error("server %s cannot start: %s", args.slot, exc)
        return 1
    sys.argv = ["vllm.entrypoints.openai.api_server",
                *vllm_arguments(spec, choice.path, choice.runner, settings.shutdown_grace)]
    # Its key in its environment, where only its own user can read it (a command line is public).
    os.environ["VLLM_API_KEY"] = server_key(settings.data_dir, spec.port)
    log.info("server %s (pid %d): vLLM %s", args.slot, os.getpid(), " ".join(redacted(sys.argv[1:])))
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
