"""genunc: post-hoc Laplace uncertainty for pretrained diffusion models.

Attach a Laplace posterior to a denoiser's output head, sample M weight draws during generation,
score each sample's uncertainty, then filter and export the samples.  Names are imported on
first use, so ``import genunc`` (and ``genunc --help``) does not load torch.
"""

from importlib import import_module
from typing import Any

from genunc._version import __version__

_WHERE = {
    "DenoiserAdapter": "genunc.adapters",
    "MaskedTokenAdapter": "genunc.adapters",
    "NoisePredictionAdapter": "genunc.adapters",
    "VectorDenoiserAdapter": "genunc.adapters",
    "HeadDraws": "genunc.posterior",
    "HeadPosterior": "genunc.posterior",
}

__all__ = [*sorted(_WHERE), "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'genunc' has no attribute {name!r}")
    return getattr(import_module(_WHERE[name]), name)
