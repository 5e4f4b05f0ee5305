"""The stand-in `vllm` package (see tests/fake_vllm/__init__.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path


class LLM:
    """Records what it was built with, then fails: a test needs the options, not a model."""

    def __init__(self, **options):
        record = {"options": options, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                  "pid": os.getpid()}
        folder = Path(os.environ["FAKE_VLLM_RECORDS"])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"llm-{os.getpid()}.json").write_text(json.dumps(record, default=str))
        raise RuntimeError("fake vLLM: options recorded, no model loaded")
