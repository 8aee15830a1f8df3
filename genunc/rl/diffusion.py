"""The few-step diffusion chains of DUAL, in the scheduler's own arithmetic.

The actor is sampled at decision time by genunc's vector pipeline, which steps a diffusers
``DDPMScheduler``; training needs the same chain *with gradients* (the actor loss backpropagates
Q through the sampled action, as in Diffusion-QL).  :func:`reverse_chain` is that chain written
with the scheduler's formulas (epsilon prediction, ``fixed_small`` variance, optional clipping of
the predicted clean sample); a test checks it step for step against ``DDPMScheduler.step``.

The noise schedule is Diffusion-QL's variance-preserving one for a handful of steps
(:func:`vp_betas`): linear-beta schedules made for 1,000 steps leave a 5-step chain far from
pure noise at its start.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import DDPMScheduler
from torch import Tensor, nn


def vp_betas(steps: int, beta_min: float = 0.1, beta_max: float = 10.0) -> np.ndarray:
    """The discretised VP-SDE betas for a `steps`-step chain (Diffusion-QL's ``vp`` schedule)."""
    t = np.arange(1, steps + 1, dtype=np.float64)
    alpha = np.exp(-beta_min / steps - 0.5 * (beta_max - beta_min) * (2 * t - 1) / steps**2)
    return 1.0 - alpha


def make_scheduler(steps: int, clip: float | None = 1.0) -> DDPMScheduler:
    """A `steps`-step DDPM scheduler on the VP schedule; `clip` bounds the predicted clean sample
    (actions live in [-1, 1]; None: no clipping, for transition deltas)."""
    return DDPMScheduler(num_train_timesteps=steps, trained_betas=vp_betas(steps).tolist(),
                         clip_sample=clip is not None, clip_sample_range=clip or 1.0,
                         variance_type="fixed_small", prediction_type="epsilon")


def _alphas_cumprod(scheduler: DDPMScheduler, like: Tensor) -> Tensor:
    return scheduler.alphas_cumprod.to(device=like.device, dtype=like.dtype)


def denoising_loss(model: nn.Module, x0: Tensor, cond: Tensor, scheduler: DDPMScheduler,
                   generator: torch.Generator, weight: Tensor | None = None) -> Tensor:
    """The DDPM loss ``|eps - model(x_t, t, cond)|^2`` at a uniform random timestep per row
    (optionally weighted per row)."""
    abar = _alphas_cumprod(scheduler, x0)
    t = torch.randint(0, len(abar), (x0.shape[0],), generator=generator).to(x0.device)
    eps = torch.randn(x0.shape, generator=generator).to(x0)
    a = abar[t].unsqueeze(-1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    per_row = (model(x_t, t, cond) - eps).pow(2).mean(-1)
    return per_row.mean() if weight is None else (per_row * weight).sum() / weight.sum().clamp_min(1e-8)


def reverse_chain(model: nn.Module, cond: Tensor, scheduler: DDPMScheduler, noise: Tensor) -> Tensor:
    """The full ancestral chain from ``noise[0]`` (``x_T``), with ``noise[k]`` the step noise of
    the k-th step (the last step adds none): ``noise`` is ``(T, B, D)``.  Differentiable."""
    abar = _alphas_cumprod(scheduler, cond)
    steps = len(abar)
    clip = scheduler.config.clip_sample_range if scheduler.config.clip_sample else None
    x = noise[0]
    for k, t in enumerate(range(steps - 1, -1, -1)):
        a_t = abar[t]
        a_prev = abar[t - 1] if t > 0 else torch.ones_like(a_t)
        alpha_t = a_t / a_prev
        eps = model(x, t, cond)
        x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if clip is not None:
            x0 = x0.clamp(-clip, clip)
        x = (a_prev.sqrt() * (1 - alpha_t) / (1 - a_t)) * x0 + (alpha_t.sqrt() * (1 - a_prev) / (1 - a_t)) * x
        if t > 0:
            variance = ((1 - a_prev) / (1 - a_t) * (1 - alpha_t)).clamp_min(1e-20)
            x = x + variance.sqrt() * noise[k + 1]
    return x


def sample(model: nn.Module, cond: Tensor, scheduler: DDPMScheduler, dim: int,
           generator: torch.Generator | None = None) -> Tensor:
    """One chain per row of `cond` with fresh noise (training targets, rollouts of the
    transition model)."""
    steps = len(scheduler.alphas_cumprod)
    noise = torch.randn((steps, cond.shape[0], dim), generator=generator).to(cond)
    return reverse_chain(model, cond, scheduler, noise)
