"""A stand-in for the `vllm` package, for tests that must reach what the product hands vLLM (or how
it supervises vLLM's server) without loading a model: put this folder first on a process's
PYTHONPATH (`fake_vllm_path()`) and that process imports `vllm` from here.

- `vllm.LLM(**options)` writes its keyword arguments and the process's CUDA_VISIBLE_DEVICES to
  `FAKE_VLLM_RECORDS/llm-<pid>.json`, then fails as a model load that cannot go on would.
- `python -m vllm.entrypoints.openai.api_server` writes its arguments and environment to
  `FAKE_VLLM_RECORDS/server-<port>-<pid>.json` and then behaves as `--fake-health` says (see there).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def fake_vllm_path(repo: Path) -> str:
    """A PYTHONPATH on which `vllm` is this stand-in and `core`/`tests` are the repository's."""
    return f"{FOLDER}{os.pathsep}{repo}"


def fake_stack(records: Path, repo: Path) -> dict[str, str]:
    """The settings of a watchdog whose processes import this stand-in as `vllm`, recording to
    `records`."""
    return {"PYTHONPATH": fake_vllm_path(repo), "FAKE_VLLM_RECORDS": str(records)}


def fake_model(folder: Path) -> str:
    """A local model folder: it exists (the product checks that at once), and nothing reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    return str(folder)


def server_slot(name: str, port: int, model: str, served_name: str, health: str = "ok", gpus: str = "",
                args: tuple[str, ...] = ()) -> dict:
    """A server slot of WORKERS whose server is the stand-in, healthy or `never` (see api_server)."""
    return {"slot": name, "serve": {"model": model, "served_name": served_name, "port": port, "gpus": gpus,
                                    "args": [*args, "--fake-health", health]}}


def records(folder: Path, prefix: str) -> list[dict]:
    """What the stand-ins wrote to `folder`, oldest first."""
    paths = sorted(folder.glob(f"{prefix}-*.json"), key=lambda path: path.stat().st_mtime_ns)
    return [json.loads(path.read_text()) for path in paths]
