"""Noise-prediction variability: how much the posterior head draws disagree along a trajectory.

At each chosen step the M head draws are applied to the MAP trajectory's features; the variance
of the predicted noise across draws, averaged over the sample's elements, is one number per sample
per step.  Steps are then aggregated (mean by default).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from torch import Tensor

from genunc.errors import GenuncError

Aggregate = Literal["mean", "max", "last", "sum"]


def aggregate_variability(per_step: Tensor | np.ndarray, how: Aggregate = "mean") -> np.ndarray:
    """``(S steps, B) -> (B,)``."""
    values = np.asarray(per_step.cpu().double() if isinstance(per_step, Tensor) else per_step,
                        dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise GenuncError(f"per-step variability must be (S >= 1, B), got {values.shape}")
    if how == "mean":
        return values.mean(0)
    if how == "max":
        return values.max(0)
    if how == "last":
        return values[-1]
    if how == "sum":
        return values.sum(0)
    raise GenuncError(f"unknown aggregation {how!r}; choose mean, max, last or sum")
