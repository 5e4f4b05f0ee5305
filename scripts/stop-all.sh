#!/usr/bin/env bash
# Stop exactly what start-all.sh started, gracefully (SIGTERM, then SIGKILL of the process tree
# after a grace period), then the embedded database if this stack uses it.
set -uo pipefail
. "$(dirname "$0")/common.sh"
GRACE=${STOP_GRACE:-60}

tree_of() {  # a pid and all its descendants
  local pid=$1 child
  echo "$pid"
  for child in $(pgrep -P "$pid"); do tree_of "$child"; done
}

stop() {
  local name=$1 file="$RUN_DIR/$1.pid" pid pids
  if ! pid_alive "$file"; then rm -f "$file"; return; fi
  pid=$(cat "$file")
  pids=$(tree_of "$pid" | sort -u)
  kill -TERM "$pid" 2>/dev/null
  for _ in $(seq 1 $((GRACE * 2))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then echo "$name did not stop in ${GRACE} s; killing it"; fi
  kill -KILL $pids 2>/dev/null
  rm -f "$file"
  echo "$name stopped"
}

stop watchdog
stop api_server
if [ -z "${DATABASE_URL:-}" ] && [ -x .venv/bin/python ]; then
  echo "Database: $(.venv/bin/python -m core.batch_app.database stop 2>/dev/null)"
fi
