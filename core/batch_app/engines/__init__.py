"""Engine implementations, chosen by name: `vllm`, or `package.module:Class` for another one."""

from __future__ import annotations

import importlib

from .base import Engine, EngineSpec


def load_engine(spec: EngineSpec) -> Engine:
    if spec.kind == "vllm":
        from .vllm_engine import VllmEngine

        return VllmEngine(spec)
    module_name, _, class_name = spec.kind.partition(":")
    if not class_name:
        raise ValueError(f"Unknown engine '{spec.kind}': use 'vllm' or 'package.module:Class'.")
    return getattr(importlib.import_module(module_name), class_name)(spec)
