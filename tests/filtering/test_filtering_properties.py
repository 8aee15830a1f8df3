"""Filtering edge cases and property-based invariants (hypothesis)."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from genunc import filtering
from genunc.errors import GenuncError, NonFiniteError

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
score_lists = st.lists(finite, min_size=1, max_size=60)


def test_edge_cases():
    scores = [0.3, 0.1, 0.1, 0.9]
    assert filtering.keep_top_k(scores, 10).tolist() == [0, 1, 2, 3]  # k > N keeps all
    assert filtering.keep_top_k(scores, 0).tolist() == []
    assert filtering.keep_top_k(scores, 1).tolist() == [1]  # ties: earliest first
    assert filtering.keep_below(scores, 0.1).tolist() == [1, 2]
    assert filtering.best_of_n(scores, ["a", "b", "a", "b"]).tolist() == [2, 1]
    with pytest.raises(NonFiniteError, match="NaN"):
        filtering.keep_top_k([0.1, float("nan")], 1)
    with pytest.raises(GenuncError):
        filtering.keep_fraction(scores, 1.5)
    with pytest.raises(GenuncError):
        filtering.keep_top_k(scores, -1)
    with pytest.raises(GenuncError, match="group labels"):
        filtering.best_of_n(scores, ["a"])


@given(score_lists, st.integers(min_value=0, max_value=80))
def test_top_k_keeps_min_of_k_and_n_and_nothing_better_is_dropped(scores, k):
    kept = filtering.keep_top_k(scores, k)
    assert len(kept) == min(k, len(scores))
    assert len(set(kept.tolist())) == len(kept)
    dropped = np.setdiff1d(np.arange(len(scores)), kept)
    if len(kept) and len(dropped):
        assert max(np.asarray(scores)[kept]) <= min(np.asarray(scores)[dropped])


@given(score_lists, st.floats(min_value=0, max_value=1))
def test_fraction_is_monotone(scores, fraction):
    small = set(filtering.keep_fraction(scores, fraction / 2).tolist())
    large = set(filtering.keep_fraction(scores, fraction).tolist())
    assert small <= large


@given(score_lists)
def test_keep_order_is_invariant_to_exact_monotone_transforms(scores):
    np.testing.assert_array_equal(filtering.keep_order(scores),
                                  filtering.keep_order(np.asarray(scores) * 2.0))  # exact in fp


@settings(max_examples=50)
@given(st.lists(st.tuples(finite, st.integers(0, 4)), min_size=1, max_size=40))
def test_best_of_n_picks_one_minimum_per_group(pairs):
    scores = [p[0] for p in pairs]
    groups = [p[1] for p in pairs]
    best = filtering.best_of_n(scores, groups)
    assert sorted(np.asarray(groups)[best].tolist()) == sorted(set(groups))
    for i in best:
        same = [s for s, g in pairs if g == groups[i]]
        assert scores[i] == min(same)


@given(st.lists(st.floats(0, 1), min_size=2, max_size=50))
def test_auroc_of_a_perfect_and_reversed_score(quality):
    failed = np.asarray(quality) < 0.5
    assume(failed.any() and not failed.all())  # AUROC needs both classes
    assert filtering.auroc(failed.astype(float), failed) == 1.0
    assert filtering.auroc(-failed.astype(float), failed) == 0.0
