#!/usr/bin/env bash
# Local Prefect for this checkout, in one command: a server (SQLite), the work pools, the `gpu`
# concurrency limit, every deployment of prefect.yaml, and a worker on the `local` pool.
# Everything it starts or writes lives under .prefect-local/ (git-ignored): pid files, logs, the
# database, Prefect's result records. Stop it with scripts/prefect-down.sh.
# Then: .venv/bin/prefect deployment run quantize/smollm2-135m-demo --watch
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.prefect-local
PORT=${QUANTKIT_PREFECT_PORT:-4200}
BIN=$ROOT/.venv/bin
mkdir -p "$STATE"

[ -x "$BIN/prefect" ] || { echo "prefect is not installed: .venv/bin/pip install -e '.[prefect]'" >&2; exit 1; }

# Every prefect command below, the server, the worker and its flow runs share these.
export PREFECT_HOME=$STATE/home
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export QUANTKIT_PROJECT=$ROOT                      # the deployments' pull step moves here
export QUANTKIT_STORE=${QUANTKIT_STORE:-$HOME/.cache/quantkit/store}
# A CLI command with no API URL starts its own temporary server on the same SQLite file, and two at
# once fail with "database is locked". prefect.toml (read from the current folder) points them here.
if [ ! -f prefect.toml ]; then
  printf '# Written by scripts/prefect-up.sh (removed by prefect-down.sh); git-ignored.\n[api]\nurl = "%s"\n' \
    "$PREFECT_API_URL" > prefect.toml
  touch "$STATE/wrote-prefect-toml"
elif ! grep -q "$PREFECT_API_URL" prefect.toml; then
  echo "prefect.toml exists and does not point at $PREFECT_API_URL; fix or remove it" >&2
  exit 1
fi

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

# start NAME COMMAND...: in its own session (so prefect-down.sh stops its whole process group).
start() {
  local name=$1; shift
  if alive "$STATE/$name.pid"; then
    echo "$name already running (pid $(cat "$STATE/$name.pid"))"
    return
  fi
  setsid "$@" > "$STATE/$name.log" 2>&1 < /dev/null &
  echo $! > "$STATE/$name.pid"
  echo "$name started (pid $!, log .prefect-local/$name.log)"
}

# --watch streams log lines only when the server publishes them.
PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED=true PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED=true \
  start server "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT"

printf 'waiting for the server at %s ' "$PREFECT_API_URL"
for _ in $(seq 1 120); do
  if "$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
       "$PREFECT_API_URL/health" 2>/dev/null; then
    echo ok; break
  fi
  alive "$STATE/server.pid" || { echo; echo "server exited; see .prefect-local/server.log" >&2; exit 1; }
  printf .; sleep 1
done
"$BIN/python" -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=5)" "$PREFECT_API_URL/health"

for pool in local gpu; do
  "$BIN/prefect" work-pool inspect "$pool" > /dev/null 2>&1 || "$BIN/prefect" work-pool create "$pool" --type process
done
"$BIN/prefect" global-concurrency-limit inspect gpu > /dev/null 2>&1 \
  || "$BIN/prefect" global-concurrency-limit create gpu --limit "${QUANTKIT_GPU_SLOTS:-1}"

# A flow run whose process dies (SIGKILL, a lost machine) is marked Crashed after 3 missed heartbeats,
# so `prefect flow-run retry` can take it up again.
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
"$BIN/python" flows/zombies.py
"$BIN/quantkit" deployments --check   # prefect.yaml must match recipes/ (quantkit deployments rewrites it)
"$BIN/prefect" --no-prompt deploy --all

start worker "$BIN/prefect" worker start --pool local --name "local-$(hostname)"
echo "ready: $BIN/prefect deployment run quantize/smollm2-135m-demo --watch   (UI: http://127.0.0.1:$PORT)"
