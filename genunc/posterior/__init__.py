"""Laplace posteriors over a denoiser's output head, and fast application of M weight draws."""

import warnings

with warnings.catch_warnings():  # laplace-torch's optional asdl backend calls torch.jit.script
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    import laplace  # noqa: F401

from genunc.posterior.base import Posterior
from genunc.posterior.capture import HeadData, capture_head, collect_head_data
from genunc.posterior.draws import HeadDraws
from genunc.posterior.fingerprint import check_fingerprint, head_fingerprint
from genunc.posterior.heads import (
    Conv2dOps,
    GenericOps,
    HeadOps,
    LinearOps,
    head_ops_for,
    register_head_ops,
)
from genunc.posterior.io import POSTERIOR_DIR
from genunc.posterior.laplace_head import STRUCTURES, HeadPosterior
from genunc.posterior.laplace_tail import (
    PREDICTIVES,
    TAIL_STRUCTURES,
    TailData,
    TailPosterior,
    collect_tail_data,
    default_tail,
)
from genunc.posterior.lowrank import LowRankDiagLaplace
from genunc.posterior.tail import Tail, TailDraws, TailInputs

__all__ = [
    "POSTERIOR_DIR",
    "PREDICTIVES",
    "Posterior",
    "STRUCTURES",
    "TAIL_STRUCTURES",
    "Conv2dOps",
    "GenericOps",
    "HeadData",
    "HeadDraws",
    "HeadOps",
    "HeadPosterior",
    "LinearOps",
    "LowRankDiagLaplace",
    "capture_head",
    "check_fingerprint",
    "collect_head_data",
    "head_fingerprint",
    "head_ops_for",
    "register_head_ops",
    "Tail",
    "TailData",
    "TailDraws",
    "TailInputs",
    "TailPosterior",
    "collect_tail_data",
    "default_tail",
]
