#!/usr/bin/env bash
# The real services on loopback, as a platform team runs them:
#   - an S3 endpoint that checks SigV4 signatures (`rclone serve s3`; buckets edgeship-mlflow, edgeship-ota,
#     edgeship-dvc), and a read-only HTTP server in front of the OTA bucket (what a CDN is for devices);
#   - MLflow on PostgreSQL, artifacts proxied to S3, webhooks on;
#   - a Prefect server on PostgreSQL;
#   - the OTA writer lock in PostgreSQL (EDGESHIP_OTA_LOCK): `rclone serve s3` ignores the conditional requests
#     (If-None-Match, If-Match) that a lock in the bucket itself needs, so publishers take a lease row there instead.
#
#   infra/local-stack.sh start     # then: source .edgeship/stack.env
#   infra/local-stack.sh status
#   infra/local-stack.sh stop
#
# PostgreSQL is expected at $EDGESHIP_PG (default postgresql://postgres@127.0.0.1:5432, trust auth).
# Everything is configurable, so a test or a second stack can run beside the default one:
#   EDGESHIP_S3_PORT (9000) EDGESHIP_OTA_HTTP_PORT (9001) EDGESHIP_MLFLOW_PORT (5000) EDGESHIP_PREFECT_PORT (4200)
#   EDGESHIP_STACK_DB (edgeship: databases <name>_mlflow, <name>_prefect and <name>_ota)
#   EDGESHIP_STACK_DIR (.edgeship/stack: logs, pids, S3 data; stack.env is written next to it)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=$PWD/.venv/bin
STATE=${EDGESHIP_STACK_DIR:-.edgeship/stack}
mkdir -p "$STATE"
STATE=$(cd "$STATE" && pwd)
ENV_FILE=$(dirname "$STATE")/stack.env
S3_PORT=${EDGESHIP_S3_PORT:-9000}; OTA_HTTP_PORT=${EDGESHIP_OTA_HTTP_PORT:-9001}
MLFLOW_PORT=${EDGESHIP_MLFLOW_PORT:-5000}; PREFECT_PORT=${EDGESHIP_PREFECT_PORT:-4200}
PG=${EDGESHIP_PG:-postgresql://postgres@127.0.0.1:5432}
DB=${EDGESHIP_STACK_DB:-edgeship}
SERVICES=(s3 ota-http mlflow prefect)

running() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

start_bg() {  # name, command...: in its own session, so `stop` ends the service and every child it forked
  local name=$1; shift
  if running "$name"; then echo "$name: running"; return; fi
  setsid "$@" >"$STATE/$name.log" 2>&1 < /dev/null &
  echo $! >"$STATE/$name.pid"
  echo "$name: started (log $STATE/$name.log)"
}

wait_http() {  # url, name: until it answers at all (the S3 endpoint answers 4xx to an unsigned request)
  for _ in $(seq 120); do
    curl -sS -o /dev/null "$1" 2>/dev/null && { echo "$2: ready at $1"; return; }
    running "$2" || { echo "$2 exited; see $STATE/$2.log:" >&2; tail -5 "$STATE/$2.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "$2 did not become ready in 60 s; see $STATE/$2.log" >&2; exit 1
}

create_db() {
  psql "$PG/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname='$1'" | grep -q 1 || psql "$PG/postgres" -qc "CREATE DATABASE \"$1\""
}

case "${1:-}" in
start)
  [ -f "$STATE/webhook.key" ] || $BIN/python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())" >"$STATE/webhook.key"
  [ -f "$STATE/s3.secret" ] || $BIN/python -c "import secrets; print(secrets.token_hex(20))" >"$STATE/s3.secret"
  cat >"$ENV_FILE" <<ENV
export AWS_ACCESS_KEY_ID=edgeship-local AWS_SECRET_ACCESS_KEY=$(cat "$STATE/s3.secret") AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT EDGESHIP_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export EDGESHIP_OTA_URL=http://127.0.0.1:$OTA_HTTP_PORT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT EDGESHIP_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
export EDGESHIP_OTA_LOCK=$PG/${DB}_ota
ENV
  # shellcheck disable=SC1090
  source "$ENV_FILE"
  mkdir -p "$STATE/s3/edgeship-mlflow" "$STATE/s3/edgeship-ota" "$STATE/s3/edgeship-dvc"  # a bucket is a directory
  start_bg s3 "$BIN/rclone" serve s3 --addr "127.0.0.1:$S3_PORT" --auth-key "$AWS_ACCESS_KEY_ID,$AWS_SECRET_ACCESS_KEY" \
    "$STATE/s3"
  start_bg ota-http "$BIN/rclone" serve http --read-only --dir-cache-time 1s --addr "127.0.0.1:$OTA_HTTP_PORT" "$STATE/s3/edgeship-ota"
  create_db "${DB}_mlflow"
  create_db "${DB}_prefect"
  create_db "${DB}_ota"
  # Webhooks: plain http to loopback allowed (a local stack), a fixed key so a restart can read them back, and
  # the server's list of webhooks re-read every second (MLflow's default caches it 60 s: a webhook created
  # after an alias event would miss the next minute of promotions).
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https \
  MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY="$(cat "$STATE/webhook.key")" \
  MLFLOW_WEBHOOK_CACHE_TTL=1 \
    start_bg mlflow "$BIN/mlflow" server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "${PG/postgresql:/postgresql+psycopg:}/${DB}_mlflow" --artifacts-destination s3://edgeship-mlflow
  PREFECT_SERVER_DATABASE_CONNECTION_URL="${PG/postgresql:/postgresql+asyncpg:}/${DB}_prefect" \
  PREFECT_SERVER_ANALYTICS_ENABLED=false \
    start_bg prefect "$BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_http "http://127.0.0.1:$S3_PORT/" s3
  wait_http "http://127.0.0.1:$OTA_HTTP_PORT/" ota-http
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" mlflow
  wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" prefect
  echo "now: source $ENV_FILE"
  ;;
status)
  for name in "${SERVICES[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; fi
  done
  ;;
stop)
  for name in prefect mlflow ota-http s3; do
    [ -f "$STATE/$name.pid" ] || continue
    pid=$(cat "$STATE/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 40); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$STATE/$name.pid"; echo "$name: stopped"
  done
  ;;
*) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
