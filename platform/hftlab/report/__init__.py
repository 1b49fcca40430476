"""Reports from MLflow: tables per axis, nested attack sweeps, dose-response, paired arms."""
