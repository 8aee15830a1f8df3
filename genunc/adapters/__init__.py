"""Adapters: what genunc needs to know about each kind of denoiser (see ``base.py``)."""

from genunc.adapters.base import DenoiserAdapter, Likelihood, TrainingPairs, resolve_module
from genunc.adapters.generic import MaskedTokenAdapter, NoisePredictionAdapter

__all__ = [
    "DenoiserAdapter",
    "Likelihood",
    "MaskedTokenAdapter",
    "NoisePredictionAdapter",
    "TrainingPairs",
    "resolve_module",
]
