"""Config-driven jobs behind the CLI, one module per modality (same function names in each)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def posterior_dir(config: dict[str, Any]) -> Path:
    """Where a config's posterior lives: ``posterior.dir``, else beside a model folder
    (``<model>/genunc_posterior``, which ``from_pretrained`` loads), else
    ``outputs/<zoo name>/posterior`` for shipped models (the package folder stays read-only)."""
    if config["posterior"]["dir"]:
        return Path(config["posterior"]["dir"])
    model = str(config["model"])
    if model.startswith("zoo:"):
        return Path("outputs") / model[4:] / "posterior"
    return Path(model) / "genunc_posterior"
