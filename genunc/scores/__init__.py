"""Uncertainty scores: semantic (generative) uncertainty, noise-prediction variability, baselines.

Every score is an array with one value per sample; lower means more certain (keep).
"""

from genunc.scores.semantic import feature_variance, gaussian_entropy, pixel_variance, random_scores
from genunc.scores.variability import aggregate_variability

__all__ = [
    "aggregate_variability",
    "feature_variance",
    "gaussian_entropy",
    "pixel_variance",
    "random_scores",
]
