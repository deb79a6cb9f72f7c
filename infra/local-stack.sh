#!/usr/bin/env bash
# The real services on loopback: an S3 endpoint (moto's server), MLflow (PostgreSQL backend store,
# artifacts proxied to S3, webhooks on), and a Prefect server (PostgreSQL).
#
#   infra/local-stack.sh start     # then: source .edgeship/stack.env
#   infra/local-stack.sh stop
#
# PostgreSQL is expected at 127.0.0.1:5432 (trust auth, user postgres). Ports: S3 9000, MLflow 5000, Prefect 4200.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=.edgeship/stack
BIN=.venv/bin
mkdir -p "$STATE"
S3_PORT=${S3_PORT:-9000}; MLFLOW_PORT=${MLFLOW_PORT:-5000}; PREFECT_PORT=${PREFECT_PORT:-4200}
PG=${PG:-postgresql://postgres@127.0.0.1:5432}

start_bg() {  # name, command...
  local name=$1; shift
  if [ -f "$STATE/$name.pid" ] && kill -0 "$(cat "$STATE/$name.pid")" 2>/dev/null; then echo "$name: running"; return; fi
  nohup "$@" >"$STATE/$name.log" 2>&1 &
  echo $! >"$STATE/$name.pid"
  echo "$name: started (log $STATE/$name.log)"
}

wait_http() {  # url, name
  for _ in $(seq 60); do curl -fsS "$1" >/dev/null 2>&1 && { echo "$2: ready at $1"; return; }; sleep 1; done
  echo "$2 did not become ready; see $STATE/$2.log" >&2; exit 1
}

create_db() {
  psql "$PG/postgres" -tAc "SELECT 1 FROM pg_database WHERE datname='$1'" | grep -q 1 || psql "$PG/postgres" -qc "CREATE DATABASE $1"
}

case "${1:-}" in
start)
  [ -f "$STATE/webhook.key" ] || $BIN/python -c "from cryptography.fernet import Fernet; print(Fernet.generate_key().decode())" >"$STATE/webhook.key"
  cat >.edgeship/stack.env <<ENV
export AWS_ACCESS_KEY_ID=edgeship AWS_SECRET_ACCESS_KEY=edgeship-secret AWS_DEFAULT_REGION=us-east-1
export MLFLOW_S3_ENDPOINT_URL=http://127.0.0.1:$S3_PORT
export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT EDGESHIP_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT
export PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api
ENV
  # shellcheck disable=SC1091
  source .edgeship/stack.env
  start_bg s3 $BIN/moto_server -H 127.0.0.1 -p "$S3_PORT"
  wait_http "http://127.0.0.1:$S3_PORT/moto-api/" s3
  $BIN/python - <<PY
import boto3
s3 = boto3.client("s3", endpoint_url="http://127.0.0.1:$S3_PORT")
for bucket in ("edgeship-mlflow", "edgeship-ota", "edgeship-dvc"):
    s3.create_bucket(Bucket=bucket)
PY
  create_db edgeship_mlflow
  create_db edgeship_prefect
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https \
  MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY="$(cat "$STATE/webhook.key")" \
    start_bg mlflow $BIN/mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
      --backend-store-uri "$PG/edgeship_mlflow" --artifacts-destination s3://edgeship-mlflow
  PREFECT_SERVER_DATABASE_CONNECTION_URL="postgresql+asyncpg://postgres@127.0.0.1:5432/edgeship_prefect" \
    start_bg prefect $BIN/prefect server start --host 127.0.0.1 --port "$PREFECT_PORT"
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" mlflow
  wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" prefect
  echo "now: source .edgeship/stack.env"
  ;;
stop)
  for name in prefect mlflow s3; do
    if [ -f "$STATE/$name.pid" ]; then kill "$(cat "$STATE/$name.pid")" 2>/dev/null || true; rm -f "$STATE/$name.pid"; echo "$name: stopped"; fi
  done
  ;;
*) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
