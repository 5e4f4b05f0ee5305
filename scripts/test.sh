#!/usr/bin/env bash
# Set up and run the test suite; arguments go to pytest, e.g. scripts/test.sh -m "not vllm".
set -euo pipefail
"$(dirname "$0")/setup.sh"
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest "$@"
