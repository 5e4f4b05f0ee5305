#!/usr/bin/env bash
# Render the units in deployment/systemd for this checkout and install them.
#   scripts/install-systemd.sh [--user NAME] [--dest DIR] [--no-enable]
# --dest renders into DIR without touching systemd (used by the tests with systemd-analyze verify).
set -euo pipefail
cd "$(dirname "$0")/.."
user=$(id -un) dest=/etc/systemd/system enable=1
while [ $# -gt 0 ]; do
  case $1 in
    --user) user=$2; shift 2 ;;
    --dest) dest=$2; enable=0; shift 2 ;;
    --no-enable) enable=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
repo=$(pwd) venv=$(pwd)/.venv
[ -x "$venv/bin/python" ] || scripts/setup.sh
mkdir -p "$dest"
for unit in deployment/systemd/*.service; do
  sed -e "s|@REPO@|$repo|g" -e "s|@VENV@|$venv|g" -e "s|@USER@|$user|g" "$unit" >"$dest/$(basename "$unit")"
  echo "installed $dest/$(basename "$unit")"
done
if [ "$enable" = 1 ]; then
  systemctl daemon-reload
  systemctl enable --now vllm-batch-api.service vllm-batch-watchdog.service
fi
