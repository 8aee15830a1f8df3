"""genunc: post-hoc Laplace uncertainty for pretrained diffusion models.

Attach a Laplace posterior to a denoiser's output head, sample M weight draws during generation,
score each sample's uncertainty, then filter and export the samples.
"""

from genunc._version import __version__
from genunc.adapters import DenoiserAdapter, MaskedTokenAdapter, NoisePredictionAdapter
from genunc.posterior import HeadDraws, HeadPosterior

__all__ = [
    "DenoiserAdapter",
    "HeadDraws",
    "HeadPosterior",
    "MaskedTokenAdapter",
    "NoisePredictionAdapter",
    "__version__",
]
