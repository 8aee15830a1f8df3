"""Adapter for diffusion models over vectors given a context vector (a diffusion policy's actor).

``model(x_t, t, cond) -> eps`` with ``x (B, D)`` the noisy vector (an action), ``t`` one integer
timestep per row and ``cond (B, C)`` the context (an RL state, or state and action); the model's
last layer is an ``nn.Linear`` head.  Gaussian noise prediction is
:class:`~genunc.adapters.generic.NoisePredictionAdapter`'s, so this adapter only says how the
context is passed, what a batch of clean data looks like and how per-dimension variances reduce
to a score (their sum: the trace of the covariance).  The noise schedule is a diffusers
scheduler's ``alphas_cumprod``; few-step chains (``DDPMScheduler(num_train_timesteps=5, ...)``)
draw training timesteps from its 5 train timesteps.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from genunc.adapters.base import TrainingPairs
from genunc.adapters.generic import NoisePredictionAdapter
from genunc.errors import GenuncError, ShapeMismatchError


def _call_with_cond(model: nn.Module, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
    return model(x, t, cond)


class VectorDenoiserAdapter(NoisePredictionAdapter):
    """A vector denoiser ``model(x_t, t, cond) -> eps`` whose last layer is a Linear head.

    Args:
        model: the denoiser; ``model(x (B, D), t (B,), cond (B, C))`` returns ``(B, D)``.
        head_name: its last ``nn.Linear`` (D outputs).
        alphas_cumprod: the noise schedule; or give ``scheduler`` (a diffusers scheduler: its
            ``alphas_cumprod``).  Neither: DDPM's linear 1,000-step schedule.
        cond_dim: the context's width C (default: ``model.cond_dim`` where the model has one),
            checked on every batch; None: not checked.

    Batches of clean data are ``(x0, cond)`` tuples or dicts ``{"x": x0, "cond": cond}`` with
    ``x0 (B, D)`` and ``cond (B, C)``.
    """

    def __init__(self, model: nn.Module, head_name: str = "head",
                 alphas_cumprod: Tensor | None = None, *, scheduler: Any = None,
                 cond_dim: int | None = None) -> None:
        if scheduler is not None and alphas_cumprod is not None:
            raise GenuncError("give the noise schedule once: alphas_cumprod or scheduler")
        if scheduler is not None:
            alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod)
        super().__init__(model, head_name, alphas_cumprod, call=_call_with_cond)
        head = self.head
        if not isinstance(head, nn.Linear):
            raise GenuncError(f"the head '{head_name}' of a vector denoiser must be an nn.Linear, "
                              f"got {type(head).__name__}")
        self.dim = head.out_features
        self.cond_dim = getattr(model, "cond_dim", None) if cond_dim is None else int(cond_dim)

    def check_cond(self, cond: Any, rows: int | None = None, what: str = "cond") -> Tensor:
        """`cond` as a ``(B, C)`` float tensor on the model's device (a one-line error
        otherwise; `rows`: the B it must have)."""
        if not isinstance(cond, Tensor):
            raise ShapeMismatchError(f"{what} must be a (B, C) tensor, got {type(cond).__name__}")
        expected = "C" if self.cond_dim is None else str(self.cond_dim)
        if cond.dim() != 2 or (self.cond_dim is not None and cond.shape[1] != self.cond_dim):
            raise ShapeMismatchError(f"{what} must have shape (B, {expected}), got "
                                     f"{tuple(cond.shape)}")
        if rows is not None and cond.shape[0] != rows:
            raise ShapeMismatchError(f"{what} has {cond.shape[0]} rows for {rows} vectors")
        return cond.to(self.device, self.dtype)

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        x0, cond = _unpack(batch)
        if not isinstance(x0, Tensor) or x0.dim() != 2 or x0.shape[1] != self.dim:
            shape = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
            raise ShapeMismatchError(f"clean vectors x must have shape (B, {self.dim}), got {shape}")
        cond = self.check_cond(cond, x0.shape[0])
        return super().training_pairs({"x": x0.float(), "cond": {"cond": cond}}, generator)

    def head_output_variance(self, posterior: Any, phi: Tensor,
                             inputs: Mapping[str, Any]) -> Tensor:
        """The head's closed form directly: nothing follows the head."""
        return posterior.output_variance(phi)

    def reduce_variance(self, variance: Tensor, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Per-dimension variances ``(B, D)`` -> their sum (the trace of the covariance)."""
        return {"variability": variance.double().sum(-1)}


def _unpack(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, Mapping):
        missing = [k for k in ("x", "cond") if k not in batch]
        if missing:
            raise ShapeMismatchError(f"a vector batch dict needs 'x' and 'cond'; it lacks {missing}")
        return batch["x"], batch["cond"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ShapeMismatchError("a vector batch is an (x0, cond) pair or a dict {'x': x0, "
                             f"'cond': cond}}, got {type(batch).__name__}")
