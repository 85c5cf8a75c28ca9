"""Paper reproductions run by ``tritium run TASK`` (see `tritium.experiments.runner`)."""
