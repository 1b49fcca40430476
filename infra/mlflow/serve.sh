#!/usr/bin/env bash
# Start hftlab's MLflow tracking server: PostgreSQL backend store, artifacts proxied to an S3-compatible
# store (or a directory), basic authentication on. The Kubernetes Deployment (infra/mlflow/mlflow.yaml) runs
# it as the image's entry point; tests/test_postgres.py runs it against a real PostgreSQL.
#
# Required (from Kubernetes Secrets in a cluster, never from files in git):
#   MLFLOW_BACKEND_STORE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow
#   MLFLOW_AUTH_DATABASE_URI        postgresql://USER:PASSWORD@HOST:5432/mlflow_auth (users and permissions)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://BUCKET/PREFIX (with MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
#                                   AWS_SECRET_ACCESS_KEY for MinIO), or a directory
#   MLFLOW_AUTH_ADMIN_PASSWORD      the admin's password, used when the user store is created
#   MLFLOW_FLASK_SERVER_SECRET_KEY  CSRF key, the same for every replica
# Optional: MLFLOW_HOST (default 127.0.0.1: nothing outside this machine or pod can connect unless told
# otherwise), MLFLOW_PORT (5000), MLFLOW_WORKERS (2), MLFLOW_AUTH_ADMIN_USERNAME (admin),
# MLFLOW_AUTH_DEFAULT_PERMISSION (READ), MLFLOW_SERVER_ALLOWED_HOSTS (Host headers accepted; MLflow's default
# is localhost and private IPs, so in-cluster DNS names must be listed).
# MLFLOW_SERVER_ENABLE_JOB_EXECUTION defaults to false here: hftlab runs no GenAI jobs on the server, and
# the job runner costs a process and leaves a store in /dev/shm.
# Passwords go into URIs as they are: use URL-safe ones (e.g. `openssl rand -hex 24`).
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI=postgresql://user:password@host:5432/mlflow}"
: "${MLFLOW_AUTH_DATABASE_URI:?set MLFLOW_AUTH_DATABASE_URI=postgresql://user:password@host:5432/mlflow_auth}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION=s3://bucket/prefix}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY}"
case "$MLFLOW_BACKEND_STORE_URI" in
  postgresql://* | postgresql+*://*) ;;
  *) echo "MLFLOW_BACKEND_STORE_URI must be a postgresql:// URI" >&2; exit 2 ;;
esac

# The auth app reads its database from an ini file: write it at start, readable by this user only, so the
# database password lives in the environment (a Secret) and never in a ConfigMap or the image.
umask 077
auth_dir="$(mktemp -d)"
trap 'rm -rf "$auth_dir"' EXIT
cat > "$auth_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = ${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}
database_uri = ${MLFLOW_AUTH_DATABASE_URI}
admin_username = ${MLFLOW_AUTH_ADMIN_USERNAME:-admin}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
unset MLFLOW_AUTH_DATABASE_URI

# not exec: the trap removes the ini file when the server stops
mlflow server \
  --app-name basic-auth \
  --host "${MLFLOW_HOST:-127.0.0.1}" \
  --port "${MLFLOW_PORT:-5000}" \
  --workers "${MLFLOW_WORKERS:-2}" \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --serve-artifacts \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; rm -rf "$auth_dir"' TERM INT
wait "$server"
