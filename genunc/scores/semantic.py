"""Semantic (generative) uncertainty: entropy of a diagonal Gaussian fitted to features.

Jazbec et al. (UAI 2025) generate the same sample under the MAP and M posterior head draws,
embed all M+1 outputs with a feature extractor, fit a Gaussian with diagonal covariance and score
the sample by its entropy.  Their reference code computes the variance in fp16 as E[x^2] - E[x]^2,
which goes negative for near-identical features; genunc uses float64 and the two-pass formula.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from torch import Tensor

from genunc import streams
from genunc.errors import GenuncError, NonFiniteError, ShapeMismatchError


def feature_variance(features: Tensor | np.ndarray, ddof: int = 1) -> np.ndarray:
    """Per-sample, per-dimension variance across K generations: ``(K, B, D) -> (B, D)`` float64."""
    feats = np.asarray(features.detach().cpu().double() if isinstance(features, Tensor) else features,
                       dtype=np.float64)
    if feats.ndim != 3:
        raise ShapeMismatchError(f"features must be (K generations, B samples, D), got {feats.shape}")
    k = feats.shape[0]
    if k - ddof < 1:
        raise GenuncError(f"need more than {ddof} generation(s) per sample for a variance, got {k}")
    if not np.isfinite(feats).all():
        raise NonFiniteError("features contain NaN or infinite values")
    centred = feats - feats.mean(axis=0, keepdims=True)  # two passes: no cancellation
    return (centred**2).sum(axis=0) / (k - ddof)


def feature_scale(real_features: Tensor | np.ndarray, relative_floor: float = 1e-3) -> np.ndarray:
    """Per-dimension standard deviation of real data's features ``(N, D)``: the unit the semantic
    score measures spread in.  Dimensions that barely vary in the data (dead units) get at least
    `relative_floor` times the median SD, so they cannot blow up once divided by."""
    feats = np.asarray(real_features.detach().cpu().double() if isinstance(real_features, Tensor)
                       else real_features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ShapeMismatchError(f"real features must be (N >= 2, D), got {feats.shape}")
    if not np.isfinite(feats).all():
        raise NonFiniteError("real features contain NaN or infinite values")
    sd = feats.std(axis=0, ddof=1)
    reference = float(np.median(sd)) if np.median(sd) > 0 else float(sd.max())
    if reference <= 0:
        raise GenuncError("the real features do not vary at all: no scale to measure spread in")
    return np.maximum(sd, relative_floor * reference)


def gaussian_entropy(
    features: Tensor | np.ndarray, floor: float = 1e-3, ddof: int = 1,
    scale: np.ndarray | None = None,
) -> np.ndarray:
    """Entropy of ``N(mu, diag(var + floor))`` per sample: ``0.5 * sum_d log(2 pi e (var_d + floor))``.

    Args:
        features: ``(K, B, D)``: K generations (the MAP and M draws) of B samples.
        floor: variance floor; keeps dimensions that never move from dominating with ``log 0``.
        ddof: 1 for the unbiased variance (default), 0 for the maximum-likelihood one.
        scale: ``(D,)`` per-dimension unit (:func:`feature_scale` of real data): features are
            divided by it first, so every dimension's spread is measured against how much it
            varies in real data and `floor` is a fraction of the real variance.  Without it,
            spread and floor are in the extractor's raw units.

    Lower is more certain.
    """
    if floor < 0:
        raise GenuncError(f"variance floor must be non-negative, got {floor}")
    if scale is not None:
        scale = np.asarray(scale, dtype=np.float64)
        dims = np.shape(features)[-1]
        if scale.shape != (dims,) or not (scale > 0).all():
            raise ShapeMismatchError(f"scale must hold {dims} positive numbers, got shape "
                                     f"{scale.shape}")
        features = np.asarray(features.detach().cpu().double() if isinstance(features, Tensor)
                              else features, dtype=np.float64) / scale
    var = feature_variance(features, ddof) + floor
    if (var <= 0).any():
        raise GenuncError("zero variance with floor=0: entropy is -inf; use a positive floor")
    return 0.5 * np.log(2 * math.pi * math.e * var).sum(axis=1)


def pixel_variance(generations: Tensor, ddof: int = 1) -> np.ndarray:
    """Baseline: mean over pixels of the variance across the K generations ``(K, B, ...)``."""
    flat = generations.detach().double().flatten(2)
    return feature_variance(flat, ddof).mean(axis=1)


def random_scores(seed: int, indices: range | list[int]) -> np.ndarray:
    """Baseline: uniform random scores (what filtering without a signal achieves), one per
    sample from the sample's own stream, independent of everything else the seed drives."""
    return streams.sample_uniforms(seed, "random_baseline", indices)


def mean_step_entropy(
    features: Tensor | np.ndarray, entropy: Callable[[np.ndarray], np.ndarray],
) -> tuple[np.ndarray, np.ndarray | None]:
    """The one-trajectory semantic score (``semantic_x0``) from per-step features, and its
    Monte-Carlo error.

    Args:
        features: ``(S, K, B, D)``: at each of S steps, the features of the K = M+1 clean
            samples the MAP head (first) and M head draws predict, for B samples.
        entropy: ``(K, B, D) -> (B,)`` (the pipeline's semantic entropy, on its feature scale).

    Returns ``(score, se)``: the mean over the S steps of the per-step entropy, ``(B,)``; and the
    jackknife standard error of that mean over the M draws (leave one draw out, the MAP always
    kept: ``sqrt((M-1)/M * sum_j (s_(j) - mean s_(.))^2)``), None when M < 2.
    """
    feats = np.asarray(features.detach().cpu().double() if isinstance(features, Tensor)
                       else features, dtype=np.float64)
    if feats.ndim != 4:
        raise ShapeMismatchError(f"features must be (steps, M+1, B, D), got {feats.shape}")
    score = np.mean([entropy(step) for step in feats], axis=0)
    m = feats.shape[1] - 1
    if m < 2:
        return score, None
    loo = np.stack([np.mean([entropy(np.delete(step, j, axis=0)) for step in feats], axis=0)
                    for j in range(1, m + 1)])
    return score, np.sqrt((m - 1) / m * ((loo - loo.mean(0)) ** 2).sum(0))
