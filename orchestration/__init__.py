"""Config, CLI, run directory, MLflow, Ray and serving: everything that is not a pure component."""
