#!/usr/bin/env bash
# Multi-user servers on this machine, on 127.0.0.1: an MLflow tracking server (PostgreSQL backend store,
# served artifacts) and a Prefect server (PostgreSQL). Usage:
#   bash infra/servers.sh start    # creates the databases if missing, starts both, waits until healthy
#   bash infra/servers.sh status
#   bash infra/servers.sh stop
#   eval "$(bash infra/servers.sh env)"   # MLFLOW_TRACKING_URI / PREFECT_API_URL for int8flow
#   bash infra/servers.sh drop     # stop, then drop both databases and the state folder (tests use it)
# Settings (env): PGHOST=127.0.0.1 PGPORT=5432 PGUSER=postgres INT8FLOW_INFRA_DIR=.int8flow-infra
#                 MLFLOW_PORT=5000 PREFECT_PORT=4200 MLFLOW_DB=int8flow_mlflow PREFECT_DB=int8flow_prefect
#                 INT8FLOW_START_SECONDS=300 (how long `start` waits for each server to answer)
# Each server runs in its own session (setsid): `stop` ends the whole process group (uvicorn workers,
# MLflow's job runner) and says "stopped" only once none of its processes is left.
set -euo pipefail
cd "$(dirname "$0")/.."
PGHOST="${PGHOST:-127.0.0.1}" PGPORT="${PGPORT:-5432}" PGUSER="${PGUSER:-postgres}"
STATE="${INT8FLOW_INFRA_DIR:-$PWD/.int8flow-infra}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}" PREFECT_PORT="${PREFECT_PORT:-4200}"
BIN="${INT8FLOW_BIN:-$PWD/.venv/bin}"
MLFLOW_DB="${MLFLOW_DB:-int8flow_mlflow}" PREFECT_DB="${PREFECT_DB:-int8flow_prefect}"
START_SECONDS="${INT8FLOW_START_SECONDS:-300}"

env_lines() {
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT"
  echo "export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api"
}

create_db() {
  psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -tAc "select 1 from pg_database where datname='$1'" | grep -q 1 ||
    psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -qc "create database $1"
}

wait_for() {  # url, name, seconds
  local deadline=$((SECONDS + $3))
  while [ "$SECONDS" -lt "$deadline" ]; do
    curl -fsS --max-time 10 "$1" >/dev/null 2>&1 && { echo "$2 up: $1"; return 0; }
    if ! group_alive "$2"; then echo "$2 exited while starting; see $STATE/$2.log" >&2; return 1; fi
    sleep 1
  done
  echo "$2 did not come up in $3 s; see $STATE/$2.log" >&2
  return 1
}

group_alive() {  # name: is any process of the server's group still running?
  [ -f "$STATE/$1.pid" ] && pgrep -g "$(cat "$STATE/$1.pid")" >/dev/null 2>&1
}

start() {
  mkdir -p "$STATE/artifacts"
  create_db "$MLFLOW_DB"
  create_db "$PREFECT_DB"
  if ! group_alive mlflow; then
    # One worker: uvicorn's multi-worker supervisor kills any worker that misses a 5 s health ping,
    # which on a busy 2-core machine made MLflow crash-loop; server-side GenAI jobs are not used.
    MLFLOW_DISABLE_TELEMETRY=true MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$BIN/mlflow" server \
      --host 127.0.0.1 --port "$MLFLOW_PORT" \
      --backend-store-uri "postgresql+psycopg2://$PGUSER@$PGHOST:$PGPORT/$MLFLOW_DB" \
      --artifacts-destination "$STATE/artifacts" --serve-artifacts --workers 1 \
      >"$STATE/mlflow.log" 2>&1 &
    echo $! >"$STATE/mlflow.pid"
  fi
  if ! group_alive prefect; then
    # The UI asks /ui-settings for its API address, which defaults to port 4200 whatever --port says.
    PREFECT_HOME="$STATE/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
      PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PGUSER@$PGHOST:$PGPORT/$PREFECT_DB" \
      PREFECT_SERVER_UI_API_URL="http://127.0.0.1:$PREFECT_PORT/api" PREFECT_SERVER_API_PORT="$PREFECT_PORT" \
      setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" \
      >"$STATE/prefect.log" 2>&1 &
    echo $! >"$STATE/prefect.pid"
  fi
  wait_for "http://127.0.0.1:$MLFLOW_PORT/health" mlflow "$START_SECONDS"
  wait_for "http://127.0.0.1:$PREFECT_PORT/api/health" prefect "$START_SECONDS"
}

stop() {
  local status=0
  for name in prefect mlflow; do
    [ -f "$STATE/$name.pid" ] || continue
    pid="$(cat "$STATE/$name.pid")"
    kill -TERM -- -"$pid" 2>/dev/null || true  # setsid: the whole process group
    for _ in $(seq 1 60); do group_alive "$name" || break; sleep 0.5; done
    if group_alive "$name"; then
      kill -KILL -- -"$pid" 2>/dev/null || true
      for _ in $(seq 1 20); do group_alive "$name" || break; sleep 0.5; done
    fi
    if group_alive "$name"; then
      echo "$name NOT stopped: still running: $(pgrep -g "$pid" | tr '\n' ' ')" >&2
      status=1
    else
      rm -f "$STATE/$name.pid"
      echo "$name stopped (process group $pid ended)"
    fi
  done
  return "$status"
}

drop() {
  stop
  for db in "$MLFLOW_DB" "$PREFECT_DB"; do
    psql -h "$PGHOST" -p "$PGPORT" -U "$PGUSER" -qc "drop database if exists $db with (force)" && echo "dropped $db"
  done
  rm -rf "$STATE"
}

status() {
  for name in mlflow prefect; do
    if group_alive "$name"; then echo "$name running (process group $(cat "$STATE/$name.pid"))"; else echo "$name stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) env_lines ;;
  drop) drop ;;
  *) echo "usage: $0 start|stop|status|env|drop" >&2; exit 2 ;;
esac
