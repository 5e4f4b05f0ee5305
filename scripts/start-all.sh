#!/usr/bin/env bash
# Set up and start the stack in the background: database, API server, workers.
#   scripts/start-all.sh [--role all|api|worker]
# all (the default): the whole stack on this host. api: the API alone (and the embedded database
# when DATABASE_URL is empty). worker: the watchdog and its workers alone, on the shared
# PostgreSQL of DATABASE_URL: a second GPU box. Returns once /health answers (or, for a worker
# host, once the watchdog runs). Logs go to $LOG_DIR, PID files to $DATA_DIR/run.
# Nothing here restarts a process that crashes (the watchdog restarts workers, not itself nor the
# API): for that, run the stack under systemd (scripts/install-systemd.sh), which restarts both.
set -euo pipefail
role=all
while [ $# -gt 0 ]; do
  case $1 in
    --role) role=${2:-}; shift 2 || shift ;;
    --role=*) role=${1#--role=}; shift ;;
    *) echo "unknown option $1 (usage: start-all.sh [--role all|api|worker])" >&2; exit 2 ;;
  esac
done
case $role in all|api|worker) ;; *) echo "unknown role '$role': use all, api or worker" >&2; exit 2 ;; esac
"$(dirname "$0")/setup.sh"
. "$(dirname "$0")/common.sh"
if [ "$role" = worker ] && [ -z "${DATABASE_URL:-}" ]; then
  echo "--role worker needs DATABASE_URL: the PostgreSQL every host shares (a worker host runs no database)" >&2
  exit 2
fi

# Every request needs a key unless OPEN_ACCESS=true: a first start with API_KEY set nowhere (not
# in the environment, not in .env) writes a new one to .env and prints it.
if [ "$role" != worker ] && [ -z "${API_KEY+set}" ] && [ "${OPEN_ACCESS:-false}" != true ]; then
  API_KEY="sk-$(.venv/bin/python -c 'import secrets; print(secrets.token_hex(24))')"
  export API_KEY
  printf '\n# Written by scripts/start-all.sh on its first start: clients send it as their API key.\nAPI_KEY=%s\n' \
    "$API_KEY" >>.env
  echo "API key (written to .env, seeds the default project): $API_KEY"
fi

# Migrates, and starts the embedded database when DATABASE_URL is empty.
url=$(.venv/bin/python -m core.batch_app.database start) || { echo "the database could not be reached or migrated (see above)" >&2; exit 1; }
echo "Database: $(echo "$url" | sed 's/:[^:@]*@/:***@/')"
if [ "$role" != api ]; then
  echo "Demo model: $(.venv/bin/python -m core.batch_app.demo_model "$DATA_DIR/models/demo-tiny-llama")"
fi

start() {  # name, then the python -m arguments
  local name=$1; shift
  if pid_alive "$RUN_DIR/$name.pid"; then echo "$name already running (pid $(cat "$RUN_DIR/$name.pid"))"; return; fi
  nohup .venv/bin/python -m "$@" >>"$LOG_DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$RUN_DIR/$name.pid"
  echo "$name started (pid $!, log $LOG_DIR/$name.log)"
}

# Whether a process started just now still runs: kill -0 alone, as for an instant after the fork
# its command line is still the shell's or nohup's, not ours (pid_alive would call it gone).
started_alive() { kill -0 "$(cat "$RUN_DIR/$1.pid")" 2>/dev/null; }

[ "$role" = worker ] || start api_server core.batch_app.api_server
[ "$role" = api ] || start watchdog core.batch_app.watchdog
if [ "$role" = worker ]; then
  sleep 2
  started_alive watchdog || { echo "watchdog exited; last lines of its log:"; tail -20 "$LOG_DIR/watchdog.log"; exit 1; }
  echo "watchdog running as host ${HOST_NAME:-$(hostname)}: its workers load in the background (batchctl workers)"
  exit 0
fi

url="http://$API_HOST:$API_PORT/health"
for _ in $(seq 1 120); do
  if curl -fsS "$url" >/dev/null 2>&1; then
    if [ "$role" = api ]; then echo "API ready at http://$API_HOST:$API_PORT (no workers on this host: --role api)"
    else echo "API ready at http://$API_HOST:$API_PORT (workers load in the background: see $LOG_DIR)"; fi
    exit 0
  fi
  started_alive api_server || { echo "API server exited; last lines of its log:"; tail -20 "$LOG_DIR/api_server.log"; exit 1; }
  sleep 0.5
done
echo "API did not answer $url within 60 s; see $LOG_DIR/api_server.log"; exit 1
