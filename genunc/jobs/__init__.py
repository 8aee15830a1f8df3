"""Config-driven jobs behind the CLI, one module per modality."""
