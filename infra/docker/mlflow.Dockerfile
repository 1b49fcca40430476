# The MLflow tracking server image (infra/mlflow/mlflow.yaml): mlflow at the project's pin, the PostgreSQL
# driver (psycopg 3, SQLAlchemy 2.1's default for postgresql://) and boto3 for the S3-compatible artifact store, and infra/mlflow/serve.sh as the entry point.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t ghcr.io/OWNER/hftlab-mlflow:3.17.2 .
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 MLFLOW_DISABLE_TELEMETRY=true
COPY requirements/constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt "mlflow[auth]" "psycopg[binary]" boto3==1.44.5 && pip check
COPY --chmod=755 infra/mlflow/serve.sh /usr/local/bin/hftlab-mlflow-serve

RUN useradd --uid 1000 --create-home mlflow
USER 1000
WORKDIR /home/mlflow
EXPOSE 5000
ENTRYPOINT ["hftlab-mlflow-serve"]
