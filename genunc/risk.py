"""Risk-controlled filtering: a threshold whose kept samples fail at most alpha of the time.

Given a calibration set with uncertainty scores and pass/fail labels, :func:`calibrate_threshold`
picks the loosest threshold ``lambda`` such that, with probability at least ``1 - delta`` over
the calibration draw, the failure rate among new samples with ``score <= lambda`` is at most
``alpha``.  It is Learn-then-Test (Angelopoulos et al., 2021): each candidate threshold is a null
hypothesis "risk > alpha", tested with an exact binomial (or Hoeffding-Bentkus) p-value, and the
candidates are tested in a fixed sequence from strict to loose, stopping at the first that cannot
be rejected, so no multiplicity correction is needed.  The guarantee is distribution-free: it
needs only calibration and test samples drawn i.i.d. from the same generator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.stats import binom

from genunc.errors import GenuncError
from genunc.filtering import checked_scores

Method = Literal["binomial", "hoeffding_bentkus"]


@dataclass(frozen=True)
class RiskControl:
    """A certified threshold and what it promises."""

    threshold: float  # keep samples with score <= threshold; -inf when nothing can be certified
    alpha: float
    delta: float
    method: str
    n_calibration: int
    kept_calibration: int
    failures_kept_calibration: int
    p_value: float

    @property
    def kept_fraction(self) -> float:
        return self.kept_calibration / self.n_calibration

    @property
    def certified(self) -> bool:
        return math.isfinite(self.threshold)

    def select(self, scores) -> np.ndarray:
        """Indices of new samples the certified threshold keeps."""
        return np.flatnonzero(checked_scores(scores) <= self.threshold)

    def describe(self) -> str:
        if not self.certified:
            return (f"no threshold certifies failure rate <= {self.alpha:g} at confidence "
                    f"{1 - self.delta:g} from {self.n_calibration} calibration samples: keep none "
                    "(more calibration data or a looser alpha would help)")
        return (f"keep score <= {self.threshold:.6g}: with probability >= {1 - self.delta:g}, "
                f"at most {self.alpha:.1%} of kept samples fail ({self.method}); kept "
                f"{self.kept_fraction:.1%} of calibration samples, of which "
                f"{self.failures_kept_calibration / max(self.kept_calibration, 1):.1%} failed")

    def to_dict(self) -> dict:
        return {**asdict(self), "kept_fraction": self.kept_fraction, "certified": self.certified}


def binomial_p_value(failures: int, n: int, alpha: float) -> float:
    """P(Binomial(n, alpha) <= failures): small when the observed rate is well below alpha."""
    return float(binom.cdf(failures, n, alpha))


def hoeffding_bentkus_p_value(failures: int, n: int, alpha: float) -> float:
    """The Hoeffding-Bentkus p-value of Bates et al. (2021) for a [0, 1]-bounded mean."""
    rate = failures / n
    if rate >= alpha:
        return 1.0

    def kl(a: float, b: float) -> float:
        terms = 0.0
        if a > 0:
            terms += a * math.log(a / b)
        if a < 1:
            terms += (1 - a) * math.log((1 - a) / (1 - b))
        return terms

    hoeffding = math.exp(-n * kl(rate, alpha))
    bentkus = math.e * binom.cdf(math.ceil(n * rate), n, alpha)
    return float(min(hoeffding, bentkus, 1.0))


def calibrate_threshold(
    scores: np.typing.ArrayLike,
    failed: np.typing.ArrayLike,
    alpha: float,
    delta: float = 0.1,
    method: Method = "binomial",
    max_candidates: int = 200,
    min_kept_fraction: float = 0.1,
) -> RiskControl:
    """Loosest threshold with failure rate among kept samples <= alpha, w.p. >= 1 - delta.

    Args:
        scores: calibration uncertainty scores (lower = more certain).
        failed: calibration labels, True where the sample is bad.
        alpha: tolerated failure rate among kept samples.
        delta: allowed probability that the guarantee fails.
        method: ``binomial`` (exact tail, default) or ``hoeffding_bentkus``.
        max_candidates: thresholds tested, evenly spaced in kept count.
        min_kept_fraction: the strictest threshold tested keeps this share of the calibration
            set.  The sequence stops at its first non-rejection, so starting where kept sets are
            tiny (and tests have no power) would often stop at once; on the synthetic benchmark
            in the tests, starting at 10% instead of the smallest testable set raises the mean
            kept fraction from 0.27 to 0.40 at the same guarantee.
    """
    values = checked_scores(scores)
    failed = np.asarray(failed, dtype=bool)
    if len(failed) != len(values):
        raise GenuncError(f"{len(values)} scores but {len(failed)} labels")
    if not 0 < alpha < 1 or not 0 < delta < 1:
        raise GenuncError(f"alpha and delta must lie in (0, 1), got {alpha}, {delta}")
    p_value = {"binomial": binomial_p_value, "hoeffding_bentkus": hoeffding_bentkus_p_value}.get(method)
    if p_value is None:
        raise GenuncError(f"unknown method {method!r}; choose binomial or hoeffding_bentkus")

    order = np.argsort(values, kind="stable")
    sorted_scores, sorted_failed = values[order], failed[order]
    n = len(values)
    # Fewer kept samples than this cannot reject "risk > alpha" even with zero failures.
    n_min = max(1, math.ceil(math.log(delta) / math.log(1 - alpha)))
    if not 0 <= min_kept_fraction <= 1:
        raise GenuncError(f"min_kept_fraction must lie in [0, 1], got {min_kept_fraction}")
    n_start = max(n_min, math.ceil(min_kept_fraction * n))
    nothing = RiskControl(-math.inf, alpha, delta, method, n, 0, 0, 1.0)
    if n < n_start:
        return nothing
    counts = np.unique(
        np.linspace(n_start, n, min(max_candidates, n - n_start + 1)).round().astype(int))
    cum_failed = np.cumsum(sorted_failed)
    best = nothing
    for kept in counts:  # fixed sequence: strict -> loose, stop at the first non-rejection
        while kept < n and sorted_scores[kept] == sorted_scores[kept - 1]:
            kept += 1  # a threshold keeps all ties
        failures = int(cum_failed[kept - 1])
        p = p_value(failures, int(kept), alpha)
        if p > delta:
            break
        best = RiskControl(float(sorted_scores[kept - 1]), alpha, delta, method, n, int(kept),
                           failures, p)
    return best
