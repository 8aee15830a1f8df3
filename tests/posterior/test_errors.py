"""Bad inputs fail early with messages that say what to do."""

import pytest
import torch
from torch import nn

from genunc.adapters import NoisePredictionAdapter
from genunc.errors import (
    GenuncError,
    HeadNotCalledError,
    HeadNotFoundError,
    NonFiniteError,
    ShapeMismatchError,
)
from genunc.posterior import HeadPosterior, collect_head_data
from genunc.zoo.toy import ToyImageDenoiser


def test_unknown_head_lists_candidates():
    with pytest.raises(HeadNotFoundError) as err:
        NoisePredictionAdapter(ToyImageDenoiser(), "conv_outt")
    message = str(err.value)
    assert "Did you mean 'conv_out'" in message
    assert "conv_in" in message and "body.1" in message


def test_head_not_on_forward_path():
    model = ToyImageDenoiser()
    model.unused = nn.Linear(3, 3)
    adapter = NoisePredictionAdapter(model, "unused")
    with pytest.raises(HeadNotCalledError, match="not called"):
        collect_head_data(adapter, [torch.randn(2, 1, 4, 4)], progress=False)


def test_head_called_twice():
    class Twice(ToyImageDenoiser):
        def forward(self, x, t):
            return self.conv_out(self.conv_out(self.conv_in(x)).repeat(1, self.width, 1, 1))

    adapter = NoisePredictionAdapter(Twice(), "conv_out")
    with pytest.raises(HeadNotCalledError, match="called 2 times"):
        collect_head_data(adapter, [torch.randn(2, 1, 4, 4)], progress=False)


def test_nan_features_are_reported():
    model = ToyImageDenoiser()
    x = torch.randn(2, 1, 4, 4)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        collect_head_data(NoisePredictionAdapter(model, "conv_out"), [x], progress=False)
    head = nn.Linear(3, 2)
    feats = torch.randn(10, 3)
    post = HeadPosterior.fit_features(head, (feats, torch.randn(10, 2)))
    feats[1, 1] = float("inf")
    with pytest.raises(NonFiniteError, match="infinite"):
        post.sample(2).apply(feats)


def test_shape_mismatches():
    head = nn.Linear(3, 2)
    with pytest.raises(ShapeMismatchError, match="rows"):
        HeadPosterior.fit_features(head, (torch.randn(10, 3), torch.randn(9, 2)))
    with pytest.raises(ShapeMismatchError, match="targets"):
        HeadPosterior.fit_features(head, (torch.randn(10, 3), torch.randn(10, 5)))
    with pytest.raises(ShapeMismatchError, match="class targets"):
        HeadPosterior.fit_features(head, (torch.randn(10, 3), torch.full((10,), 7)),
                                   likelihood="classification")
    post = HeadPosterior.fit_features(head, (torch.randn(10, 3), torch.randn(10, 2)))
    with pytest.raises(ShapeMismatchError, match="expects 3 input features"):
        post.sample(2).apply(torch.randn(4, 5))
    with pytest.raises(ShapeMismatchError, match="leading draw axis"):
        post.sample(2).apply(torch.randn(4, 3), per_draw=True)
    conv = nn.Conv2d(4, 1, 3)
    post = HeadPosterior.fit_features(conv, (torch.randn(6, 4, 5, 5), torch.randn(6, 9)))
    with pytest.raises(ShapeMismatchError, match="Conv2d head expects"):
        post.sample(2).apply(torch.randn(2, 3, 5, 5))
    other = HeadPosterior.fit_features(nn.Conv2d(4, 2, 3), (torch.randn(6, 4, 5, 5), torch.randn(6, 18)))
    with pytest.raises(ShapeMismatchError, match="draw for 'weight'"):
        post.ops.apply(torch.randn(2, 4, 5, 5), other.sample(2).params)


def test_bad_options():
    head = nn.Linear(3, 2)
    data = (torch.randn(10, 3), torch.randn(10, 2))
    with pytest.raises(GenuncError, match="structure"):
        HeadPosterior.fit_features(head, data, structure="lowrank")
    with pytest.raises(GenuncError, match="sigma_noise"):
        HeadPosterior.fit_features(head, data, sigma_noise="guess")
    with pytest.raises(GenuncError, match="prior precision must be positive"):
        HeadPosterior.fit_features(head, data, prior_precision=0.0)
    post = HeadPosterior.fit_features(head, data)
    with pytest.raises(GenuncError, match="at least 1"):
        post.sample(0)
    with pytest.raises(ShapeMismatchError, match="empty"):
        collect_head_data(NoisePredictionAdapter(ToyImageDenoiser(), "conv_out"), [], progress=False)
