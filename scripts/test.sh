#!/usr/bin/env bash
# Set up and run the test suite; arguments go to pytest, e.g. scripts/test.sh -m "not vllm".
set -euo pipefail
"$(dirname "$0")/setup.sh"
cd "$(dirname "$0")/.."
# The status page test takes screenshots in Debian's headless Chromium; install it where we can.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing chromium for the status page test..."
  apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1; } ||
    echo "chromium could not be installed; the status page screenshot test will be skipped"
fi
exec .venv/bin/python -m pytest "$@"
