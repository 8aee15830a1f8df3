"""Adapters for plain ``nn.Module`` denoisers, for models that do not come from a known library.

* :class:`NoisePredictionAdapter`: Gaussian (DDPM) noise prediction ``model(x_t, t) -> eps`` for
  any continuous data: images ``(B, C, H, W)`` with a Conv2d head, point clouds ``(B, N, D)`` with
  a node mask and a Linear head, ...
* :class:`MaskedTokenAdapter`: absorbing-state (masked) discrete diffusion
  ``model(x_t) -> logits (B, L, V)`` with a Linear vocabulary head.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from genunc.adapters.base import DenoiserAdapter, TrainingPairs
from genunc.errors import ShapeMismatchError


def _as_dict(batch: Tensor | Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(batch, Tensor):
        return {"x": batch}
    if isinstance(batch, (tuple, list)):
        return {"x": batch[0]}
    if "x" not in batch:
        raise ShapeMismatchError(f"a batch dict needs the clean sample under 'x'; got {list(batch)}")
    return dict(batch)


def linear_beta_alphas_cumprod(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> Tensor:
    """DDPM's linear schedule, as cumulative products of ``1 - beta`` (float64)."""
    betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, dim=0)


class NoisePredictionAdapter(DenoiserAdapter):
    """A denoiser called as ``call(model, x_t, t, **cond)`` that predicts the added noise.

    Batches are tensors (the clean samples) or dicts with ``x`` plus optional ``node_mask``
    ``(B, N)`` (padded point clouds; padding gets no noise and does not count as data) and
    ``cond`` (a dict of extra model keyword arguments, e.g. class labels).
    """

    likelihood = "regression"

    def __init__(
        self,
        model: nn.Module,
        head_name: str,
        alphas_cumprod: Tensor | None = None,
        call: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__(model, head_name)
        self.alphas_cumprod = (
            linear_beta_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod.double()
        )
        self.call = call or (lambda m, x, t, **cond: m(x, t, **cond))

    def denoise(self, x: Tensor, t: Tensor, **cond: Any) -> Tensor:
        return self.call(self.model, x, t, **cond)

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        data = _as_dict(batch)
        x0 = data["x"].to(self.device, self.dtype)
        node_mask = data.get("node_mask")
        b = x0.shape[0]
        t = torch.randint(0, len(self.alphas_cumprod), (b,), generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0)
        if node_mask is not None:
            node_mask = node_mask.to(self.device).bool()
            eps = eps * node_mask.unsqueeze(-1)
        abar = self.alphas_cumprod[t].to(x0).view(b, *([1] * (x0.dim() - 1)))
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        inputs = {"x": x_t, "t": t.to(self.device), **data.get("cond", {})}
        return TrainingPairs(inputs=inputs, target=eps, mask=node_mask)


class MaskedTokenAdapter(DenoiserAdapter):
    """A masked-diffusion LM called as ``model(x_t)`` returning logits ``(B, L, V)``.

    Training pairs follow the absorbing-state process: draw ``t ~ U(0, 1]`` per sequence, replace
    each token by ``mask_id`` with probability ``t`` (at least one per sequence), and ask the head
    to classify the clean token at the masked positions.
    """

    likelihood = "classification"

    def __init__(
        self,
        model: nn.Module,
        head_name: str,
        mask_id: int,
        call: Callable[..., Tensor] | None = None,
    ) -> None:
        super().__init__(model, head_name)
        self.mask_id = int(mask_id)
        self.call = call or _logits_of

    def denoise(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.call(self.model, x, **kwargs)

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        data = _as_dict(batch)
        x0 = data["x"].long()
        b, length = x0.shape
        t = torch.rand(b, 1, generator=generator).clamp_min(1.0 / length)
        masked = torch.rand(b, length, generator=generator) < t
        forced = torch.randint(0, length, (b,), generator=generator)
        masked[torch.arange(b), forced] = True
        x_t = torch.where(masked, torch.full_like(x0, self.mask_id), x0)
        return TrainingPairs(
            inputs={"x": x_t.to(self.device)},
            target=x0.to(self.device),
            mask=masked.to(self.device),
        )


def _logits_of(model: nn.Module, x: Tensor, **kwargs: Any) -> Tensor:
    out = model(x, **kwargs)
    return out.logits if hasattr(out, "logits") else out
