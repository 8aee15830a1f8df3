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
