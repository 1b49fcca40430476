"""Algorithm cores in pure PyTorch: one method per file, nothing of Ray, MLflow or DeepSpeed."""
