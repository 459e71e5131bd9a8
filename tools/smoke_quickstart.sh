#!/usr/bin/env bash
# Smoke-test the README's quick start on the embedded default: start the
# worker with no database configured, wait until it reports it is ready, stop
# it with SIGTERM, and require exit code 0 and the embedded server stopped
# (unless other processes still use it).
set -euo pipefail
cd "$(dirname "$0")/.."
unset DATABASE_URL PGDATABASE KONGTASK_TEST_DATABASE_URL || true

log=$(mktemp)
kongtask --tasks tools/demo/tasks.py --crontab tools/demo/crontab >"$log" 2>&1 &
pid=$!
ready=""
for _ in $(seq 1 120); do
  if grep -q "Worker connected and looking for jobs" "$log"; then ready=yes; break; fi
  if ! kill -0 "$pid" 2>/dev/null; then break; fi
  sleep 0.5
done
if [ -z "$ready" ]; then
  cat "$log"
  echo "smoke: the worker never reported it was ready" >&2
  kill -KILL "$pid" 2>/dev/null || true
  exit 1
fi
data_dir=$(sed -n "s/.*running with [a-z]* data folder \(.*\); log in .*/\1/p" "$log" | head -n1)
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
cat "$log"
if [ "$status" -ne 0 ]; then
  echo "smoke: exit code $status after SIGTERM (expected 0)" >&2
  exit 1
fi
if [ -z "$data_dir" ]; then
  echo "smoke: the log did not say where the embedded data folder is" >&2
  exit 1
fi
if [ -e "$data_dir/postmaster.pid" ]; then
  # Fine only while other processes still hold the server (their pids are in
  # its handle list): the last one to leave stops it.
  others=""
  for other in $(tr -c '0-9' ' ' <"$data_dir/.handle_pids.json" 2>/dev/null); do
    if [ "$other" != "$pid" ] && kill -0 "$other" 2>/dev/null; then others="$others $other"; fi
  done
  if [ -z "$others" ]; then
    echo "smoke: the embedded server is still running ($data_dir/postmaster.pid exists)" >&2
    exit 1
  fi
  echo "smoke: OK (ready, drained on SIGTERM, exit 0, embedded server at $data_dir left to" \
    "the processes still using it:$others)"
  exit 0
fi
echo "smoke: OK (ready, drained on SIGTERM, exit 0, embedded server at $data_dir stopped)"
