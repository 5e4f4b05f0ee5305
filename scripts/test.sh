#!/usr/bin/env bash
# Set up and run the test suite; arguments go to pytest, e.g. scripts/test.sh -m "not vllm".
set -euo pipefail
"$(dirname "$0")/setup.sh"
cd "$(dirname "$0")/.."
# Tests drive real tools from Debian's packages: a screenshot in headless Chromium, systemd-analyze
# on the units, PgBouncer between hosts and PostgreSQL, a one-node SLURM cluster (munge, slurmctld,
# slurmd, slurm-client). Install the missing ones where we can (as root); in CI a missing tool fails
# its test.
export PATH="$PATH:/usr/sbin:/sbin"
missing=""
for pair in chromium:chromium systemd-analyze:systemd pgbouncer:pgbouncer munged:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing="$missing ${pair#*:}"
done
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian packages the tests use:$missing"
  # shellcheck disable=SC2086
  apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1 ||
    { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq --no-install-recommends $missing >/dev/null 2>&1; } ||
    echo "could not install:$missing (their tests skip, or fail when CI=true)"
fi
# OpenAI's official Node SDK runs a batch in the suite (tests/node); in CI a missing node fails it.
if [ ! -f tests/node/node_modules/openai/package.json ]; then
  if command -v npm >/dev/null 2>&1; then
    (cd tests/node && npm ci --no-audit --no-fund --loglevel=error) || echo "could not install tests/node's npm packages"
  else
    echo "npm is not installed: the Node SDK test skips, or fails when CI=true"
  fi
fi
# The linter first (pyflakes, import order, bugbear; configured in pyproject.toml): a finding fails the run.
.venv/bin/ruff check --quiet .
# A process per CPU and one more, a module's tests in each (pytest-xdist; most modules mostly wait
# on processes and timers; see docs/benchmarks.md, "Test suite"); `scripts/test.sh -n 0` runs
# one test at a time.
exec .venv/bin/python -m pytest -n "$(( $(nproc) + 1 ))" --dist loadfile "$@"
