#!/usr/bin/env bash
# Stop exactly what scripts/prefect-up.sh started: the worker, then the server (by their pid files),
# and the prefect.toml it wrote. The database and logs stay in .prefect-local/.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=$PWD/.prefect-local

# stop NAME: SIGTERM to its process group; a Prefect worker needs a second SIGTERM to exit
# (the first only asks it to finish), then SIGKILL after a grace period.
stop() {
  local name=$1 pidfile=$STATE/$1.pid pid
  [ -f "$pidfile" ] || { echo "$name: not started here"; return; }
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null || ! grep -qa prefect "/proc/$pid/cmdline" 2>/dev/null; then
    echo "$name: pid $pid is not running (or is no longer ours)"; rm -f "$pidfile"; return
  fi
  for signal in TERM TERM KILL; do
    kill -s "$signal" -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do
      kill -0 "$pid" 2>/dev/null || break 2
      sleep 0.5
    done
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "$name: pid $pid did not stop" >&2; return 1
  fi
  rm -f "$pidfile"
  echo "$name: stopped (pid $pid)"
}

stop worker
stop server
if [ -f "$STATE/wrote-prefect-toml" ]; then
  rm -f prefect.toml "$STATE/wrote-prefect-toml"
fi
