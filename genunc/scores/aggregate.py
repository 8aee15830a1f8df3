"""Reducing per-step or per-position uncertainty to one number per sample.

Noise-prediction variability is recorded per sampler step, token statistics per sequence
position; both reduce the same ways, with one vocabulary (:data:`Aggregate`).  Values are
reduced in float64 over the entries a boolean mask selects (all of them without a mask).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from genunc.errors import GenuncError, ShapeMismatchError

#: what the variability score measures the variance of: the predicted noise (the paper's
#: choice), or the clean sample it implies, ``x0 = (x_t - sigma_t eps) / alpha_t``, whose
#: variance is the noise's times ``sigma_t^2 / alpha_t^2`` (late, low-noise steps weigh less)
VariabilityTarget = Literal["noise", "clean"]
VARIABILITY_TARGETS: tuple[str, ...] = ("noise", "clean")

#: how to reduce: the mean, the maximum, the sum, or the last selected entry
Aggregate = Literal["mean", "max", "sum", "last"]
AGGREGATES: tuple[str, ...] = ("mean", "max", "sum", "last")


def aggregate(values: Tensor | np.ndarray, mask: Tensor | None = None, how: Aggregate = "mean",
              dim: int = -1, empty: Literal["error", "nan"] = "error") -> Tensor:
    """Reduce `values` along `dim` over the entries where `mask` (same shape) is True.

    Entries outside the mask never count, whatever they hold (NaN where nothing was recorded);
    a sample with no entry in the mask is an error, or NaN with ``empty="nan"`` (a wrapped
    pipeline's sequence that committed nothing).
    """
    if how not in AGGREGATES:
        raise GenuncError(f"unknown aggregate {how!r}; choose from {AGGREGATES}")
    if empty not in ("error", "nan"):
        raise GenuncError(f"empty must be 'error' or 'nan', got {empty!r}")
    v = torch.as_tensor(values).double()
    if v.dim() == 0 or v.shape[dim] == 0:
        raise ShapeMismatchError(f"nothing to aggregate over: values have shape {tuple(v.shape)}")
    if mask is None:
        mask = torch.ones_like(v, dtype=torch.bool)
    elif mask.shape != v.shape:
        raise ShapeMismatchError(f"values {tuple(v.shape)} and mask {tuple(mask.shape)} differ")
    mask = mask.bool().to(v.device)
    any_entry = mask.any(dim)
    if empty == "error" and not any_entry.all():
        raise GenuncError("every sample needs at least one entry to aggregate over")
    if how in ("mean", "sum"):
        out = torch.where(mask, v, torch.zeros_like(v)).sum(dim)
        if how == "mean":
            out = out / mask.sum(dim).clamp_min(1)
    elif how == "max":
        out = v.masked_fill(~mask, -math.inf).amax(dim)
    else:
        position = torch.arange(v.shape[dim], device=v.device).reshape(
            [-1 if d == dim % v.dim() else 1 for d in range(v.dim())])
        last = (mask * (position + 1)).argmax(dim, keepdim=True)
        out = v.gather(dim, last).squeeze(dim)
    return torch.where(any_entry, out, torch.full_like(out, math.nan))


def aggregate_steps(per_step: Tensor | np.ndarray, how: Aggregate = "mean") -> np.ndarray:
    """Per-step values ``(S steps, B)`` -> one float64 value per sample ``(B,)``.

    Every step counts, so this is numpy's plain reduction over the step axis (the arithmetic
    every published variability figure was computed with).
    """
    if how not in AGGREGATES:
        raise GenuncError(f"unknown aggregate {how!r}; choose from {AGGREGATES}")
    values = np.asarray(per_step.detach().cpu().double() if isinstance(per_step, Tensor)
                        else per_step, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0:
        raise ShapeMismatchError(f"per-step values must be (S >= 1, B), got {values.shape}")
    if how == "last":
        return values[-1]
    return {"mean": values.mean, "max": values.max, "sum": values.sum}[how](axis=0)


def variability_score(per_step: Tensor | np.ndarray, timesteps: Tensor | np.ndarray,
                      alphas_cumprod: Tensor | np.ndarray, target: VariabilityTarget = "noise",
                      how: Aggregate = "mean", *,
                      clean_factors: Tensor | np.ndarray | None = None) -> np.ndarray:
    """Per-step variances ``(S, B)`` measured at `timesteps` -> one score per sample.

    ``target="clean"`` rescales each step's noise variance to the variance of the implied clean
    sample (``(1 - abar_t) / abar_t``) before reducing over the steps.  ``clean_factors``
    ``(S,)`` gives those factors directly, for predictions other than the noise (a velocity's
    clean sample ``x_t - sigma v`` has factor ``sigma ** 2``) or schedules not indexed by an
    integer timestep.
    """
    if target not in VARIABILITY_TARGETS:
        raise GenuncError(f"unknown variability target {target!r}; choose from {VARIABILITY_TARGETS}")
    values = np.asarray(per_step.detach().cpu().double() if isinstance(per_step, Tensor)
                        else per_step, dtype=np.float64)
    if target == "clean" and clean_factors is not None:
        factors = np.asarray(torch.as_tensor(clean_factors).double().cpu())
        if values.ndim != 2 or factors.shape != (values.shape[0],):
            raise ShapeMismatchError(f"per-step values {values.shape} and {factors.shape} clean "
                                     "factors differ")
        values = values * factors[:, None]
    elif target == "clean":
        abar = np.asarray(torch.as_tensor(alphas_cumprod).double().cpu())[
            np.asarray(torch.as_tensor(timesteps).long().cpu())]
        if values.ndim != 2 or len(abar) != values.shape[0]:
            raise ShapeMismatchError(f"per-step values {values.shape} and {len(abar)} timesteps differ")
        values = values * ((1 - abar) / abar)[:, None]
    return aggregate_steps(values, how)
