#!/usr/bin/env bash
# A local MLflow tracking server (SQLite, proxied artifacts) on 127.0.0.1 for jobs on a local Ray cluster:
#
#   infra/local/mlflow-server.sh                     # MLFLOW_PORT=5001, MLFLOW_HOME=/somewhere to change
#   export MLFLOW_TRACKING_URI=http://127.0.0.1:5000   # and in the runtime env's env_vars
#
# It binds 127.0.0.1 unless MLFLOW_HOST says otherwise; a shared server belongs behind authentication
# (infra/mlflow/serve.sh, the one the Kubernetes deployment runs).
set -euo pipefail
home="${MLFLOW_HOME:-$PWD}"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"  # no GenAI job runner
exec mlflow server --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}" --workers 1 \
  --backend-store-uri "sqlite:///${home}/mlflow.db" --artifacts-destination "${home}/mlartifacts"
