#!/usr/bin/env bash
# Set up and start the whole stack in the background: database, API server, workers.
# Returns once /health answers. Logs go to $LOG_DIR, PID files to $DATA_DIR/run.
# Nothing here restarts a process that crashes (the watchdog restarts workers, not itself nor the
# API): for that, run the stack under systemd (scripts/install-systemd.sh), which restarts both.
set -euo pipefail
"$(dirname "$0")/setup.sh"
. "$(dirname "$0")/common.sh"

echo "Database: $(.venv/bin/python -m core.batch_app.database start 2>/dev/null | sed 's/:[^:@]*@/:***@/')"
echo "Demo model: $(.venv/bin/python -m core.batch_app.demo_model "$DATA_DIR/models/demo-tiny-llama")"

start() {  # name, then the python -m arguments
  local name=$1; shift
  if pid_alive "$RUN_DIR/$name.pid"; then echo "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"; return; fi
  nohup .venv/bin/python -m "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  echo "$name started (pid $!, log $LOG_DIR/$name.log)"
}

start api_server core.batch_app.api_server
start watchdog core.batch_app.watchdog

url="http://$API_HOST:$API_PORT/health"
for _ in $(seq 1 120); do
  if curl -fsS "$url" >/dev/null 2>&1; then
    echo "API ready at http://$API_HOST:$API_PORT (workers load in the background: see $LOG_DIR)"
    exit 0
  fi
  pid_alive "$RUN_DIR/api_server.pid" || { echo "API server exited; last lines of its log:"; tail -20 "$LOG_DIR/api_server.log"; exit 1; }
  sleep 0.5
done
echo "API did not answer $url within 60 s; see $LOG_DIR/api_server.log"; exit 1
