"""Uncertainty scores: semantic (generative) uncertainty, noise-prediction variability, baselines.

Every score is an array with one value per sample; lower means more certain (keep).  Per-step
and per-position values reduce to one per sample with :func:`aggregate` / :func:`aggregate_steps`.
"""

from genunc.scores.aggregate import (
    VARIABILITY_TARGETS,
    Aggregate,
    VariabilityTarget,
    aggregate,
    aggregate_steps,
    variability_score,
)
from genunc.scores.semantic import (
    feature_scale,
    feature_variance,
    gaussian_entropy,
    pixel_variance,
    random_scores,
)

__all__ = [
    "Aggregate",
    "VARIABILITY_TARGETS",
    "VariabilityTarget",
    "aggregate",
    "aggregate_steps",
    "feature_scale",
    "feature_variance",
    "gaussian_entropy",
    "pixel_variance",
    "random_scores",
    "variability_score",
]
