# Shared by the scripts: repository root, .env, and where run-time files live.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ -f .env ]; then set -a; . ./.env; set +a; fi
export DATA_DIR=${DATA_DIR:-./data} LOG_DIR=${LOG_DIR:-./logs} API_HOST=${API_HOST:-127.0.0.1} API_PORT=${API_PORT:-4080}
RUN_DIR="$DATA_DIR/run"
mkdir -p "$DATA_DIR" "$LOG_DIR" "$RUN_DIR"

# Is the process in pid file $1 alive and still the one we started (not a recycled pid)?
pid_alive() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q "core.batch_app" "/proc/$pid/cmdline" 2>/dev/null
}
