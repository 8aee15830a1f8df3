"""M posterior weight draws of one head, which know how to apply themselves.

Generation loops receive draws and nothing else of the posterior: ``draws.apply(features)``
evaluates the head under every draw in one batched op, and ``draws.with_map`` says whether
draw 0 is the posterior mean (the model's own head), which decides whether a loop runs a MAP
trajectory beside the perturbed ones.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from genunc.errors import ShapeMismatchError
from genunc.posterior.heads import HeadOps, check_finite
from genunc.posterior.stacked import StackedDraws
from genunc.posterior.tail import Tail, TailDraws, TailInputs

#: the draws of a posterior over a tail (a block ending at the head) keep the same contract
__all__ = ["HeadDraws", "Tail", "TailDraws", "TailInputs"]


def as_float32(features: Tensor) -> Tensor:
    """Half-precision features (a backbone run under autocast) in float32: draws, their outputs
    and variances are never computed in reduced precision."""
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features


@dataclass(frozen=True)
class HeadDraws(StackedDraws):
    """M parameter sets for one head, each tensor with a leading draw axis ``(M, *shape)``.

    Attributes:
        params: parameter name -> ``(M, *param_shape)``.
        ops: how to evaluate the head under these parameters (from the posterior's head).
        with_map: draw 0 is the posterior mean.
    """

    params: Mapping[str, Tensor]
    ops: HeadOps
    with_map: bool = False

    @classmethod
    def from_flat(cls, flat: Tensor, ops: HeadOps, with_map: bool = False) -> "HeadDraws":
        """Split laplace-torch's ``(M, P)`` samples into named parameter tensors."""
        out: dict[str, Tensor] = {}
        offset = 0
        for name, shape in ops.param_shapes.items():
            size = int(torch.Size(shape).numel())
            out[name] = flat[:, offset : offset + size].reshape(flat.shape[0], *shape)
            offset += size
        if offset != flat.shape[1]:
            raise ShapeMismatchError(f"flat draws have {flat.shape[1]} columns, the head has {offset}")
        return cls(out, ops, with_map)

    def apply(self, features: Tensor, per_draw: bool = False) -> Tensor:
        """Head outputs under every draw, ``(M, B, ...)``, in one batched op.

        ``features`` ``(B, ...)`` are shared by all draws; with ``per_draw=True`` they carry a
        leading draw axis ``(M, B, ...)`` (one trajectory per draw).
        """
        check_finite(features, "head features")
        return self.ops.apply(as_float32(features), self.params, per_draw=per_draw)

    def cat(self, other: "HeadDraws") -> "HeadDraws":
        return replace(self, params={k: torch.cat([v, other.params[k]])
                                     for k, v in self.params.items()})
