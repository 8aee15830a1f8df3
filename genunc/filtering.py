"""Selecting samples by uncertainty, and judging how well a score ranks quality.

Convention everywhere: lower score = more certain = keep first.  Every selector returns sorted
integer indices into the original arrays, so it composes with any sample container.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy.stats import rankdata, spearmanr

from genunc.errors import GenuncError, NonFiniteError


def checked_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    """Scores as one finite float per sample (a one-line error otherwise)."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise GenuncError(f"scores must be one value per sample, got shape {values.shape}")
    if not np.isfinite(values).all():
        raise NonFiniteError(
            f"{int((~np.isfinite(values)).sum())} of {len(values)} scores are NaN or infinite; "
            "drop or fix those samples first"
        )
    return values


# ---------------------------------------------------------------------------- selection
def keep_order(scores) -> np.ndarray:
    """Indices from most to least certain; ties keep their original order (stable)."""
    return np.argsort(checked_scores(scores), kind="stable")


def keep_top_k(scores, k: int) -> np.ndarray:
    """Indices of the `k` least uncertain samples (all of them if ``k >= N``)."""
    if k < 0:
        raise GenuncError(f"k must be non-negative, got {k}")
    return np.sort(keep_order(scores)[:k])


def keep_fraction(scores, fraction: float) -> np.ndarray:
    """Indices of the ``round(fraction * N)`` least uncertain samples."""
    if not 0 <= fraction <= 1:
        raise GenuncError(f"fraction must lie in [0, 1], got {fraction}")
    values = checked_scores(scores)
    return keep_top_k(values, int(round(fraction * len(values))))


def keep_fraction_within(scores, groups: Sequence, fraction: float) -> np.ndarray:
    """Keep the least uncertain `fraction` of every group (e.g. per class), sorted indices: a
    global cut can keep 96% of one class and 62% of another, so that a kept set "improves" by
    changing its class mix."""
    s = checked_scores(scores)
    groups = np.asarray(groups)
    if groups.shape != s.shape:
        raise GenuncError(f"{len(s)} scores but {len(groups)} group labels")
    kept = [idx[keep_fraction(s[idx], fraction)] for g in np.unique(groups)
            for idx in [np.flatnonzero(groups == g)]]
    return np.sort(np.concatenate(kept))


def keep_below(scores, threshold: float) -> np.ndarray:
    """Indices of samples whose score is at most `threshold`."""
    if threshold is None or np.isnan(threshold):
        raise GenuncError(f"threshold must be a number, got {threshold}")
    return np.flatnonzero(checked_scores(scores) <= threshold)


def best_of_n(scores, groups: Sequence) -> np.ndarray:
    """For each group (condition, prompt), the index of its least uncertain sample.

    Ties go to the earliest sample of the group.  Returned in order of first appearance.
    """
    values = checked_scores(scores)
    groups = np.asarray(groups)
    if len(groups) != len(values):
        raise GenuncError(f"{len(values)} scores but {len(groups)} group labels")
    best: dict = {}
    for i, (g, s) in enumerate(zip(groups.tolist(), values)):
        if g not in best or s < values[best[g]]:
            best[g] = i
    return np.array(list(best.values()), dtype=np.int64)


def select(scores, *, fraction: float | None = None, k: int | None = None,
           threshold: float | None = None, groups: Sequence | None = None,
           within: Sequence | None = None) -> np.ndarray:
    """The one selection rule behind every filter: exactly one of keep a `fraction`, keep `k`,
    keep score <= `threshold`, or the best sample per value of `groups` (best-of-N).
    ``within`` (with `fraction` only): keep that fraction of every value of `within` (per class,
    per molecule size), so the kept set's mix of those values stays that of the whole.
    Returns sorted indices."""
    rules = {"fraction": fraction, "k": k, "threshold": threshold, "groups": groups}
    given = sorted(name for name, value in rules.items() if value is not None)
    if len(given) != 1:
        raise GenuncError(f"give exactly one of {sorted(rules)}; got {given or 'none'}")
    if within is not None and fraction is None:
        raise GenuncError("a selection within groups keeps a fraction of each: give fraction")
    if within is not None:
        return keep_fraction_within(scores, within, fraction)
    if fraction is not None:
        return keep_fraction(scores, fraction)
    if k is not None:
        return keep_top_k(scores, k)
    if threshold is not None:
        return keep_below(scores, threshold)
    return np.sort(best_of_n(scores, groups))


# ---------------------------------------------------------------------------- statistics
def retention_curve(scores, quality, fractions=None) -> tuple[np.ndarray, np.ndarray]:
    """Mean quality of the kept samples as the kept fraction grows (quality: higher is better)."""
    quality = np.asarray(quality, dtype=np.float64)
    order = keep_order(scores)
    if len(quality) != len(order):
        raise GenuncError(f"{len(order)} scores but {len(quality)} quality values")
    fractions = np.linspace(0.05, 1.0, 20) if fractions is None else np.asarray(fractions)
    means = np.array([quality[order[: max(1, int(round(f * len(order))))]].mean() for f in fractions])
    return fractions, means


def area_under_retention(scores, quality) -> float:
    """Mean of the retention curve over kept fractions 1/N .. 1 (higher is better)."""
    order = keep_order(scores)
    quality = np.asarray(quality, dtype=np.float64)[order]
    return float((np.cumsum(quality) / np.arange(1, len(quality) + 1)).mean())


def auroc(scores, failed) -> float:
    """Probability that a failed sample scores higher (more uncertain) than a good one."""
    values = checked_scores(scores)
    failed = np.asarray(failed, dtype=bool)
    n_fail, n_ok = int(failed.sum()), int((~failed).sum())
    if n_fail == 0 or n_ok == 0:
        return float("nan")
    ranks = rankdata(values)  # ties share their mean rank (Mann-Whitney U)
    return float((ranks[failed].sum() - n_fail * (n_fail + 1) / 2) / (n_fail * n_ok))


def spearman(scores, quality) -> float:
    """Spearman's rho; NaN (without a warning) when either side is constant."""
    values, quality = checked_scores(scores), np.asarray(quality, dtype=np.float64)
    if np.ptp(values) == 0 or np.ptp(quality) == 0:
        return float("nan")
    return float(spearmanr(values, quality).statistic)


def summarize(scores, quality, failed=None) -> dict[str, float]:
    """Spearman with quality, AURC, and the AUROC for `failed` (NaN when not given: which samples
    failed is the caller's rule, see :mod:`genunc.labels`)."""
    quality = np.asarray(quality, dtype=np.float64)
    return {
        "spearman": spearman(scores, quality),
        "auroc": float("nan") if failed is None else auroc(scores, np.asarray(failed, dtype=bool)),
        "area_under_retention": area_under_retention(scores, quality),
        "quality_all": float(quality.mean()),
    }


def plot_retention(path: str | Path, curves: dict[str, tuple[np.ndarray, np.ndarray]],
                   ylabel: str = "quality of kept samples", title: str = "retention") -> Path:
    """Write a retention plot (one line per score) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, (fractions, values) in curves.items():
        ax.plot(fractions, values, marker="o", ms=3, label=name,
                ls="--" if name.startswith("random") else "-")
    ax.set_xlabel("fraction kept (least uncertain first)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path
