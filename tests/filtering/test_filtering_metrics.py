import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from genunc import filtering
from genunc.errors import NonFiniteError
from genunc.metrics.image import frechet_distance, precision_recall


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    failed = rng.random(200) < 0.3 + 0.1 * scores
    assert filtering.auroc(scores, failed) == pytest.approx(roc_auc_score(failed, scores))


def test_keep_fraction_and_order():
    scores = np.array([3.0, 1.0, 2.0, 1.0])
    assert filtering.keep_order(scores).tolist() == [1, 3, 2, 0]  # stable on ties
    assert filtering.keep_fraction(scores, 0.5).tolist() == [1, 3]
    with pytest.raises(NonFiniteError):
        filtering.keep_fraction([1.0, float("nan")], 0.5)


def test_retention_curve_of_a_perfect_score_is_monotone():
    quality = np.r_[np.ones(80), np.zeros(20)]
    fractions, means = filtering.retention_curve(-quality, quality, [0.5, 0.8, 1.0])
    assert means.tolist() == [1.0, 1.0, 0.8]


def test_frechet_distance_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 1, (20000, 3))
    b = rng.normal(0, 2, (20000, 3)) + np.array([1.0, 0, 0])
    # ||mu||^2 + sum (1 + 4 - 2*2) = 1 + 3
    assert frechet_distance(a, b) == pytest.approx(4.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_precision_recall_detects_mode_dropping():
    rng = np.random.default_rng(1)
    real = np.r_[rng.normal(0, 0.1, (200, 2)), rng.normal(5, 0.1, (200, 2))]
    dropped = rng.normal(0, 0.1, (400, 2))  # only one of the two modes
    p, r = precision_recall(real, dropped)
    assert p > 0.9 and r < 0.6
