"""Bootstrap intervals and confounder-controlled rank correlations on data whose answer is known."""

import numpy as np
import pytest
from scipy.stats import spearmanr

from genunc.errors import GenuncError, NonFiniteError
from genunc.metrics.stats import auroc, binned_spearman, bootstrap_interval, partial_spearman


def _width(n, seed=0):
    x = np.random.default_rng(seed).normal(3.0, 2.0, n)
    _, low, high = bootstrap_interval(np.mean, x, n_boot=2000, seed=1)
    return high - low


def test_the_bootstrap_interval_of_a_mean_covers_the_truth_and_has_the_normal_width():
    x = np.random.default_rng(0).normal(3.0, 2.0, 400)
    estimate, low, high = bootstrap_interval(np.mean, x)
    assert estimate == pytest.approx(x.mean())
    assert low < 3.0 < high
    # a 95% interval of a mean is 2 * 1.96 * sd / sqrt(n) wide (a 90% or 97.5% one is 14% off)
    assert high - low == pytest.approx(2 * 1.96 * x.std() / np.sqrt(400), rel=0.06)


def test_the_bootstrap_interval_shrinks_as_one_over_root_n():
    assert _width(100) / _width(1600) == pytest.approx(4.0, rel=0.2)


def test_the_bootstrap_interval_covers_the_truth_about_as_often_as_it_says():
    rng = np.random.default_rng(5)
    covered = []
    for _ in range(200):
        _, low, high = bootstrap_interval(np.mean, rng.normal(0.0, 1.0, 60), n_boot=400,
                                          level=0.9, seed=int(rng.integers(1 << 30)))
        covered.append(low < 0.0 < high)
    assert 0.82 <= np.mean(covered) <= 0.96  # percentile intervals run a little short at n = 60


def test_the_bootstrap_is_reproducible_and_resamples_pairs_jointly():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=300)
    bad = scores + rng.normal(size=300) > 0.5
    first = bootstrap_interval(auroc, scores, bad, n_boot=200, seed=3)
    assert first == bootstrap_interval(auroc, scores, bad, n_boot=200, seed=3)
    assert first != bootstrap_interval(auroc, scores, bad, n_boot=200, seed=4)
    # pairs kept together: the difference of identical columns is zero in every replicate
    assert bootstrap_interval(lambda a, b: float(np.abs(a - b).max()), scores, scores.copy(),
                              n_boot=50) == (0.0, 0.0, 0.0)
    assert first[1] < first[0] < first[2] and first[0] > 0.7


def test_replicates_without_a_finite_statistic_are_left_out():
    bad = np.zeros(30, dtype=bool)
    bad[0] = True  # most resamples hold no failure at all: AUROC is NaN there
    estimate, low, high = bootstrap_interval(auroc, np.arange(30.0), bad, n_boot=300)
    assert estimate == 0.0 and low == 0.0 and high == 0.0
    nothing = bootstrap_interval(lambda a: float("nan"), np.arange(5.0), n_boot=10)
    assert np.isnan(nothing).all()


def test_partial_spearman_removes_a_shared_driver():
    rng = np.random.default_rng(0)
    z = rng.normal(size=2000)
    x, y = z + 0.3 * rng.normal(size=2000), z + 0.3 * rng.normal(size=2000)
    assert spearmanr(x, y).statistic > 0.8
    assert abs(partial_spearman(x, y, z)) < 0.06


def test_partial_spearman_of_an_unrelated_control_is_the_plain_spearman():
    rng = np.random.default_rng(1)
    x = rng.normal(size=2000)
    y = x + rng.normal(size=2000)
    z = rng.normal(size=2000)
    assert partial_spearman(x, y, z) == pytest.approx(spearmanr(x, y).statistic, abs=0.02)
    # several controls at once, one of which is the driver: nothing is left
    w = rng.normal(size=2000)
    a, b = w + 0.3 * rng.normal(size=2000), w + 0.3 * rng.normal(size=2000)
    assert abs(partial_spearman(a, b, np.column_stack([z, w]))) < 0.06


def test_partial_spearman_is_nan_when_the_control_explains_everything():
    z = np.arange(50.0)
    assert np.isnan(partial_spearman(z**3, np.random.default_rng(0).normal(size=50), z))


def test_binned_spearman_sees_nothing_where_y_follows_x_only_through_the_group():
    rng = np.random.default_rng(0)
    groups = rng.integers(0, 10, 3000)
    x = groups + 0.5 * rng.normal(size=3000)
    y = groups + 0.5 * rng.normal(size=3000)
    assert spearmanr(x, y).statistic > 0.8
    rho, used = binned_spearman(x, y, groups)
    assert used == 10 and abs(rho) < 0.06


def test_binned_spearman_keeps_a_within_group_relation_and_skips_small_or_flat_groups():
    rng = np.random.default_rng(1)
    groups = np.repeat(["a", "b", "c", "d"], [400, 400, 5, 40])
    x = rng.normal(size=len(groups))
    y = x + rng.normal(size=len(groups))
    y[groups == "d"] = 1.0  # constant: no correlation to speak of
    rho, used = binned_spearman(x, y, groups)
    assert used == 2  # "c" is too small, "d" is flat
    inside = [spearmanr(x[groups == g], y[groups == g]).statistic for g in "ab"]
    assert rho == pytest.approx(np.mean(inside))
    assert binned_spearman(x, y, groups, min_size=500) == (pytest.approx(np.nan, nan_ok=True), 0)


@pytest.mark.parametrize("call", [
    lambda: bootstrap_interval(np.mean, np.zeros(5), np.zeros(4)),
    lambda: bootstrap_interval(np.mean, np.zeros(1)),
    lambda: bootstrap_interval(np.mean),
    lambda: bootstrap_interval(np.mean, np.zeros(5), level=1.0),
    lambda: bootstrap_interval(np.mean, np.zeros(5), n_boot=0),
    lambda: partial_spearman(np.zeros(10), np.zeros(9), np.zeros(10)),
    lambda: partial_spearman(np.arange(3.0), np.arange(3.0), np.arange(3.0)),
    lambda: partial_spearman(np.zeros((10, 2)), np.zeros(10), np.zeros(10)),
    lambda: binned_spearman(np.zeros(10), np.zeros(10), np.zeros(11)),
    lambda: binned_spearman(np.zeros(2), np.zeros(2), np.zeros(2)),
    lambda: binned_spearman(np.zeros(10), np.zeros(10), np.zeros(10), min_size=2),
])
def test_invalid_input_is_refused(call):
    with pytest.raises(GenuncError):
        call()


def test_non_finite_values_are_named():
    with pytest.raises(NonFiniteError, match="x holds 1 NaN"):
        partial_spearman([1.0, np.nan, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0], [0.0, 1.0, 0.0, 1.0])


def test_basic_interval_reflects_a_resampling_bias_about_the_estimate():
    """A resample always holds fewer distinct values: every replicate sits below the estimate,
    so the percentile interval lies below it and the basic one, reflected, above it."""
    x = np.random.default_rng(0).normal(size=40)
    distinct = lambda v: float(len(np.unique(v)))  # noqa: E731 - a resample always has fewer
    est, low, high = bootstrap_interval(distinct, x, n_boot=200)
    assert high < est
    est, low, high = bootstrap_interval(distinct, x, n_boot=200, method="basic")
    assert low > est
    with pytest.raises(GenuncError, match="method"):
        bootstrap_interval(distinct, x, method="bca")
