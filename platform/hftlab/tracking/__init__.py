"""MLflow: a run's logger (with its outbox), the client functions, the local store."""
