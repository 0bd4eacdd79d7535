"""Stage 5: MLflow registration, aliases and the promotion gate; the pyfunc wrapper."""
