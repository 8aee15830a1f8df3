"""Adapters: what genunc needs to know about each kind of denoiser (see ``base.py``)."""

from genunc.adapters.base import DenoiserAdapter, Likelihood, TrainingPairs, resolve_module
from genunc.adapters.generic import MaskedTokenAdapter, NoisePredictionAdapter
from genunc.adapters.vector import VectorDenoiserAdapter

__all__ = [
    "DenoiserAdapter",
    "Likelihood",
    "MaskedTokenAdapter",
    "NoisePredictionAdapter",
    "TrainingPairs",
    "VectorDenoiserAdapter",
    "resolve_module",
]
