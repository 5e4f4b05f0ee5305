#!/usr/bin/env bash
# Render the units in deployment/systemd for this checkout and install them.
#   scripts/install-systemd.sh [--role all|api|worker] [--user NAME] [--dest DIR] [--no-enable]
# --role worker installs the watchdog alone (a GPU box on a shared DATABASE_URL), api the API alone.
# --dest renders into DIR without touching systemd (used by the tests with systemd-analyze verify).
set -euo pipefail
cd "$(dirname "$0")/.."
user=$(id -un) dest=/etc/systemd/system enable=1 role=all
while [ $# -gt 0 ]; do
  case $1 in
    --role) role=$2; shift 2 ;;
    --user) user=$2; shift 2 ;;
    --dest) dest=$2; enable=0; shift 2 ;;
    --no-enable) enable=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
case $role in
  all) units="vllm-batch-api.service vllm-batch-watchdog.service" ;;
  api) units="vllm-batch-api.service" ;;
  worker) units="vllm-batch-watchdog.service" ;;
  *) echo "unknown role '$role': use all, api or worker" >&2; exit 2 ;;
esac
repo=$(pwd) venv=$(pwd)/.venv
[ -x "$venv/bin/python" ] || scripts/setup.sh
mkdir -p "$dest"
for unit in $units; do
  sed -e "s|@REPO@|$repo|g" -e "s|@VENV@|$venv|g" -e "s|@USER@|$user|g" "deployment/systemd/$unit" >"$dest/$unit"
  echo "installed $dest/$unit"
done
if [ "$enable" = 1 ]; then
  systemctl daemon-reload
  # shellcheck disable=SC2086
  systemctl enable --now $units
fi
