#!/usr/bin/env bash
# Stop exactly what scripts/prefect-up.sh started: the worker and the flow runs it is running (each in a
# session of its own, so they would outlive it), then the server (by their pid files), and the
# prefect.toml it wrote. The database and logs stay in .prefect-local/; a flow run stopped here shows as
# Crashed or stays Running in the UI (cancel it, or retry it after prefect-up.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=$PWD/.prefect-local

# halt NAME PID: SIGTERM to the process group PID leads; a Prefect worker needs a second SIGTERM to
# exit (the first only asks it to finish), then SIGKILL after a grace period of 10 s each.
halt() {
  local name=$1 pid=$2 signal sent=""
  for signal in TERM TERM KILL; do
    kill -s "$signal" -- "-$pid" 2>/dev/null || true
    sent="$sent SIG$signal"
    for _ in $(seq 1 20); do
      kill -0 "$pid" 2>/dev/null || { echo "$name: stopped (pid $pid; sent$sent)"; return 0; }
      sleep 0.5
    done
  done
  echo "$name: pid $pid did not stop" >&2
  return 1
}

# stop NAME: the process prefect-up.sh started, if its pid file still names a Prefect process.
stop() {
  local name=$1 pidfile=$STATE/$1.pid pid
  [ -f "$pidfile" ] || { echo "$name: not started here"; return 0; }
  pid=$(cat "$pidfile")
  if ! kill -0 "$pid" 2>/dev/null || ! grep -qa prefect "/proc/$pid/cmdline" 2>/dev/null; then
    echo "$name: pid $pid is not running (or is no longer ours)"; rm -f "$pidfile"; return 0
  fi
  local children
  children=$(ps -o pid= --ppid "$pid" || true)  # the worker's flow-run processes, before it goes
  halt "$name" "$pid"
  rm -f "$pidfile"
  local child
  for child in $children; do
    if kill -0 "$child" 2>/dev/null && grep -qa prefect.engine "/proc/$child/cmdline" 2>/dev/null; then
      halt "flow run" "$child"
    fi
  done
}

stop worker
stop server
if [ -f "$STATE/wrote-prefect-toml" ]; then
  rm -f prefect.toml "$STATE/wrote-prefect-toml"
fi
