"""Score functions against closed forms: semantic entropy, mutual information, aggregation."""

import math

import numpy as np
import pytest
import torch

from genunc.errors import GenuncError
from genunc.scores import aggregate, aggregate_steps, gaussian_entropy
from genunc.scores.tokens import mutual_information, self_certainty


def test_gaussian_entropy_is_exact_on_known_features():
    feats = np.array([[[0.0, 1.0]], [[2.0, 1.0]], [[4.0, 1.0]]])  # var = (4, 0) per dim
    expected = 0.5 * (np.log(2 * np.pi * np.e * (4 + 0.1)) + np.log(2 * np.pi * np.e * 0.1))
    np.testing.assert_allclose(gaussian_entropy(feats, floor=0.1), [expected])
    big = 1e4 + np.array([[[1e-4]], [[-1e-4]]])  # cancellation-prone: two-pass stays exact
    np.testing.assert_allclose(gaussian_entropy(big, floor=0.0, ddof=0),
                               0.5 * np.log(2 * np.pi * np.e * 1e-8), rtol=1e-6)


def test_mutual_information_closed_forms():
    logits = torch.randn(5, 7)
    same = logits.expand(4, 5, 7)
    torch.testing.assert_close(mutual_information(same), torch.zeros(5, dtype=torch.float64),
                               atol=1e-12, rtol=0)
    draws = torch.randn(3, 5, 7)
    p = torch.softmax(draws.double(), -1).numpy()
    mean = p.mean(0)
    direct = -(mean * np.log(mean)).sum(-1) + (p * np.log(p)).sum(-1).mean(0)
    np.testing.assert_allclose(mutual_information(draws).numpy(), direct, rtol=1e-10)
    # two draws that are certain of different tokens: MI = log 2
    sharp = torch.tensor([[[50.0, 0.0]], [[0.0, 50.0]]])
    assert mutual_information(sharp).item() == pytest.approx(math.log(2), rel=1e-9)
    assert self_certainty(torch.zeros(2, 9)).abs().max() < 1e-12


def test_aggregate():
    values = torch.tensor([[1.0, 2.0, 9.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    assert aggregate(values, mask, "mean").tolist() == [1.5, 4.0]
    assert aggregate(values, mask, "max").tolist() == [2.0, 4.0]
    assert aggregate(values, mask, "sum").tolist() == [3.0, 4.0]
    assert aggregate(values, mask, "last").tolist() == [2.0, 4.0]
    with pytest.raises(GenuncError, match="at least one"):
        aggregate(values, torch.zeros_like(mask))
    with pytest.raises(GenuncError, match="unknown aggregate 'median'"):
        aggregate(values, mask, "median")
    per_step = np.array([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0]])  # (S = 3 steps, B = 2 samples)
    np.testing.assert_array_equal(aggregate_steps(per_step), [3.0, 3.0])
    np.testing.assert_array_equal(aggregate_steps(per_step, "max"), [5.0, 6.0])
    np.testing.assert_array_equal(aggregate_steps(per_step, "last"), [5.0, 1.0])
    with pytest.raises(GenuncError, match=r"\(S >= 1, B\)"):
        aggregate_steps(np.zeros(3))


def test_semantic_entropy_in_real_data_units_ignores_how_features_are_scaled():
    """Measured against the real data's per-dimension SD, the score does not change when an
    extractor scales a dimension by 1000 (raw units it does, through the fixed floor)."""
    from genunc.scores import feature_scale

    rng = np.random.default_rng(0)
    real = rng.normal(size=(500, 4))
    feats = rng.normal(size=(6, 10, 4)) * 0.1
    stretch = np.array([1000.0, 1.0, 0.001, 1.0])
    scaled = gaussian_entropy(feats, scale=feature_scale(real))
    stretched = gaussian_entropy(feats * stretch, scale=feature_scale(real * stretch))
    np.testing.assert_allclose(stretched, scaled, rtol=1e-9)
    assert not np.allclose(gaussian_entropy(feats * stretch) - gaussian_entropy(feats),
                           np.log(stretch).sum())  # raw units: the floor breaks the shift


def test_feature_scale_floors_dead_dimensions():
    from genunc.scores import feature_scale

    real = np.random.default_rng(1).normal(size=(100, 3))
    real[:, 2] = 5.0  # a dead unit
    scale = feature_scale(real, relative_floor=1e-3)
    assert scale[2] == pytest.approx(1e-3 * np.median(real.std(0, ddof=1)))
    with pytest.raises(GenuncError):
        feature_scale(np.ones((10, 3)))


def test_leave_one_out_mutual_information_and_its_jackknife_error():
    """Leaving draw m out equals the MI of the other draws; the jackknife standard error of an
    8-draw MI matches the spread of MI over independent 8-draw sets (within 35%)."""
    from genunc.scores.tokens import jackknife_standard_error, mutual_information_leave_one_out

    g = torch.Generator().manual_seed(0)
    centre = torch.randn(5, 7, generator=g, dtype=torch.float64) * 2  # 5 positions, 7 tokens
    draws = centre + 0.8 * torch.randn(8, 5, 7, generator=g, dtype=torch.float64)
    loo = mutual_information_leave_one_out(draws)
    for m in (0, 5):
        rest = torch.cat([draws[:m], draws[m + 1 :]])
        torch.testing.assert_close(loo[m], mutual_information(rest))
    sets = centre + 0.8 * torch.randn(400, 8, 5, 7, generator=g, dtype=torch.float64)
    mi = torch.stack([mutual_information(s) for s in sets])
    se = torch.stack([jackknife_standard_error(mutual_information_leave_one_out(s)) for s in sets])
    ratio = se.mean(0) / mi.std(0)
    assert ((ratio > 0.65) & (ratio < 1.35)).all(), ratio
    with pytest.raises(Exception, match="M >= 3"):
        mutual_information_leave_one_out(draws[:2])


def test_one_reduction_for_own_and_wrapped_token_scores():
    """Entries outside the mask never count, NaN included (a wrapped pipeline records NaN where
    nothing was committed); a row with no entry is an error, or NaN where asked."""
    values = torch.tensor([[0.2, float("nan"), 0.4], [float("nan"), float("nan"), 1.0],
                           [0.5, 0.5, 0.5]])
    mask = torch.tensor([[True, False, True], [False, False, True], [False, False, False]])
    mean = aggregate(values, mask, "mean", empty="nan")
    assert mean[:2].tolist() == pytest.approx([0.3, 1.0]) and torch.isnan(mean[2])
    assert aggregate(values, mask, "max", empty="nan")[:2].tolist() == pytest.approx([0.4, 1.0])
    assert aggregate(values, mask, "last", empty="nan")[:2].tolist() == pytest.approx([0.4, 1.0])
    with pytest.raises(GenuncError, match="at least one entry"):
        aggregate(values, mask, "mean")
