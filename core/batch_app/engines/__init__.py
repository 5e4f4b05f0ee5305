"""Engine implementations, chosen by name: `vllm`, `openai-http` (a pool of OpenAI-compatible
servers), or `package.module:Class` for another one."""

from __future__ import annotations

import dataclasses
import importlib
import os
from pathlib import Path

from ..config import POOL_ENGINE
from ..models import check_local_model
from .base import Engine, EngineSpec


def load_engine(spec: EngineSpec, cache_dir: Path) -> Engine:
    if spec.kind == "vllm":
        check_local_model(spec.model_path)
        from .vllm_engine import VllmEngine, default_options, has_cuda_gpu, vllm_environment

        for name, value in vllm_environment(cache_dir).items():
            os.environ.setdefault(name, value)  # an operator's own settings win
        options = {**default_options(has_cuda_gpu()), **spec.options}
        return VllmEngine(dataclasses.replace(spec, options=options))
    if spec.kind == POOL_ENGINE:
        from .openai_http import OpenAIHttpEngine

        return OpenAIHttpEngine(spec)
    module_name, _, class_name = spec.kind.partition(":")
    if not class_name:
        raise ValueError(f"Unknown engine '{spec.kind}': use 'vllm', '{POOL_ENGINE}' or 'package.module:Class'.")
    return getattr(importlib.import_module(module_name), class_name)(spec)
