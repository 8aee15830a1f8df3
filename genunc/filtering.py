"""Selecting samples by uncertainty, and judging how well a score ranks quality.

Convention everywhere: lower score = more certain = keep first.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata, spearmanr

from genunc.errors import GenuncError, NonFiniteError


def _scores(scores) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise GenuncError(f"scores must be one value per sample, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise NonFiniteError(f"{int((~np.isfinite(values)).sum())} scores are NaN or infinite")
    return values


def keep_order(scores) -> np.ndarray:
    """Indices from most to least certain; ties keep their original order (stable)."""
    return np.argsort(_scores(scores), kind="stable")


def keep_fraction(scores, fraction: float) -> np.ndarray:
    """Indices of the ``round(fraction * N)`` least uncertain samples."""
    if not 0 <= fraction <= 1:
        raise GenuncError(f"fraction must lie in [0, 1], got {fraction}")
    order = keep_order(scores)
    return np.sort(order[: int(round(fraction * len(order)))])


def retention_curve(scores, quality, fractions=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean quality of the kept samples as the kept fraction grows (quality: higher is better)."""
    quality = np.asarray(quality, dtype=np.float64)
    order = keep_order(scores)
    if len(quality) != len(order):
        raise GenuncError(f"{len(order)} scores but {len(quality)} quality values")
    fractions = np.linspace(0.05, 1.0, 20) if fractions is None else np.asarray(fractions)
    means = np.array([quality[order[: max(1, int(round(f * len(order))))]].mean() for f in fractions])
    return fractions, means


def auroc(scores, failed) -> float:
    """Probability that a failed sample scores higher (more uncertain) than a good one."""
    values = _scores(scores)
    failed = np.asarray(failed, dtype=bool)
    n_fail, n_ok = int(failed.sum()), int((~failed).sum())
    if n_fail == 0 or n_ok == 0:
        return float("nan")
    ranks = rankdata(values)  # ties share their mean rank (Mann-Whitney U)
    return float((ranks[failed].sum() - n_fail * (n_fail + 1) / 2) / (n_fail * n_ok))


def spearman(scores, quality) -> float:
    return float(spearmanr(_scores(scores), np.asarray(quality, dtype=np.float64)).statistic)
