"""Statistics for judging scores honestly: bootstrap intervals and confounder-controlled ranks.

A score's AUROC or Spearman on a few hundred samples is noisy, so every number is reported with a
bootstrap interval.  And a score can rank quality well only because both follow a confounder
(molecule size, digit class): :func:`partial_spearman` removes a continuous confounder's share of
the rank correlation, :func:`binned_spearman` keeps only the correlation inside each group.

Pure numpy/scipy.  ``auroc`` and ``spearman`` are :mod:`genunc.filtering`'s, re-exported here so
that evaluation code finds every statistic in one place.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.stats import rankdata

from genunc import streams
from genunc.errors import GenuncError, NonFiniteError
from genunc.filtering import auroc, spearman

__all__ = ["auroc", "binned_spearman", "bootstrap_interval", "partial_spearman", "spearman"]


def bootstrap_interval(statistic: Callable[..., float], *arrays, n_boot: int = 1000, level: float = 0.95,
                       seed: int = 0, method: str = "percentile") -> tuple[float, float, float]:
    """``(estimate, low, high)``: `statistic` on the data, and the percentile bootstrap interval.

    Each replicate draws N sample indices with replacement and applies them to every array at
    once (axis 0), so paired values (score and label, x and z) stay paired.  The draws come from
    the ``bootstrap`` stream of `seed` (:mod:`genunc.streams`): the interval is reproducible and no global
    random state is touched.  Replicates whose statistic is not finite (an AUROC on a resample
    without failures) are left out of the quantiles; where none is finite the bounds are NaN.

    ``method="basic"`` reflects the quantiles about the estimate (``2 est - q``), which removes
    the resampling bias to first order: for statistics a resample biases, such as a Fréchet
    distance (duplicated samples shrink the fitted covariance, so replicates sit above the
    estimate), where the percentile interval is shifted by that bias.
    """
    if method not in ("percentile", "basic"):
        raise GenuncError(f"method must be 'percentile' or 'basic', got {method!r}")
    if not arrays:
        raise GenuncError("bootstrap_interval needs at least one array")
    data = [np.asarray(a) for a in arrays]
    n = _common_length(data, at_least=2)
    if n_boot < 1:
        raise GenuncError(f"n_boot must be at least 1, got {n_boot}")
    if not 0 < level < 1:
        raise GenuncError(f"level must lie strictly between 0 and 1, got {level}")
    estimate = float(statistic(*data))
    rng = streams.numpy_generator(seed, "bootstrap")
    replicates = np.empty(n_boot)
    for b in range(n_boot):
        idx = rng.integers(0, n, size=n)
        replicates[b] = statistic(*(a[idx] for a in data))
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return estimate, float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = np.quantile(finite, [tail, 1 - tail])
    if method == "basic":
        low, high = 2 * estimate - high, 2 * estimate - low
    return estimate, float(low), float(high)


def partial_spearman(x, y, z) -> float:
    """Spearman correlation of `x` and `y` with the (monotone) share of `z` removed.

    All are ranked; the ranks of x and of y are regressed on the ranks of z (with an intercept;
    `z` may be ``(N, K)`` for several confounders, each column ranked) and the residuals are
    correlated.  NaN when a residual is constant (x or y fully explained by z).
    """
    x, y = _vector(x, "x"), _vector(y, "y")
    z = np.asarray(z, dtype=np.float64)
    z = z[:, None] if z.ndim == 1 else z
    if z.ndim != 2:
        raise GenuncError(f"z must be (N,) or (N, K), got shape {z.shape}")
    _finite(z, "z")
    n = _common_length([x, y, z], at_least=z.shape[1] + 3)
    design = np.column_stack([np.ones(n), *(rankdata(col) for col in z.T)])
    rx, ry = _residual(rankdata(x), design), _residual(rankdata(y), design)
    if rx is None or ry is None:
        return float("nan")
    return float(rx @ ry / np.sqrt((rx @ rx) * (ry @ ry)))


def binned_spearman(x, y, groups, min_size: int = 10) -> tuple[float, int]:
    """``(rho, n_groups)``: Spearman within each group, averaged with the group sizes as weights.

    Only groups with at least `min_size` members and non-constant x and y count; `n_groups` says
    how many did (rho is NaN when none did).  A score that only tracks which group a sample is in
    (e.g. which digit was asked for) gets ~0 here however large its overall Spearman.
    """
    x, y = _vector(x, "x"), _vector(y, "y")
    groups = np.asarray(groups)
    if groups.ndim != 1:
        raise GenuncError(f"groups must be one label per sample, got shape {groups.shape}")
    _common_length([x, y, groups], at_least=3)
    if min_size < 3:
        raise GenuncError(f"min_size must be at least 3 (a Spearman needs 3 points), got {min_size}")
    total, weight, used = 0.0, 0, 0
    for g in np.unique(groups):
        member = groups == g
        size = int(member.sum())
        if size < min_size or np.ptp(x[member]) == 0 or np.ptp(y[member]) == 0:
            continue
        total += size * spearman(x[member], y[member])
        weight += size
        used += 1
    return (total / weight if used else float("nan")), used


# ------------------------------------------------------------------------------------- checks
def _vector(values, name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise GenuncError(f"{name} must be one value per sample, got shape {v.shape}")
    _finite(v, name)
    return v


def _finite(values: np.ndarray, name: str) -> None:
    if not np.isfinite(values).all():
        raise NonFiniteError(f"{name} holds {int((~np.isfinite(values)).sum())} NaN or infinite values")


def _common_length(arrays: list[np.ndarray], at_least: int) -> int:
    lengths = {len(a) if a.ndim else 0 for a in arrays}
    if len(lengths) != 1:
        raise GenuncError(f"the arrays must have one entry per sample each, got lengths {sorted(lengths)}")
    n = lengths.pop()
    if n < at_least:
        raise GenuncError(f"needs at least {at_least} samples, got {n}")
    return n


def _residual(ranks: np.ndarray, design: np.ndarray) -> np.ndarray | None:
    """What of `ranks` the design does not explain; None when that is (numerically) nothing."""
    coef, *_ = np.linalg.lstsq(design, ranks, rcond=None)
    residual = ranks - design @ coef
    spread = np.linalg.norm(ranks - ranks.mean())
    return None if np.linalg.norm(residual) <= 1e-9 * max(spread, 1.0) else residual
