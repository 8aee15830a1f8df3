"""A saved posterior reloads to identical draws, and refuses to attach to a different head."""

import json

import pytest
import torch

from genunc.adapters import NoisePredictionAdapter
from genunc.errors import FingerprintMismatchError
from genunc.posterior import HeadPosterior
from genunc.zoo.toy import ToyImageDenoiser


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return ToyImageDenoiser(channels=1, width=8)


@pytest.mark.parametrize("structure", ["diag", "kron", "full"])
def test_round_trip_gives_identical_draws(tmp_path, model, structure):
    adapter = NoisePredictionAdapter(model, "conv_out")
    post = HeadPosterior.fit(adapter, [torch.randn(8, 1, 6, 6)], structure=structure, progress=False)
    post.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "genunc_posterior.json", "genunc_posterior.safetensors"]
    loaded = HeadPosterior.load(tmp_path, adapter)
    torch.testing.assert_close(loaded.sample(5, seed=1).flat, post.sample(5, seed=1).flat)
    assert loaded.prior_precision == pytest.approx(post.prior_precision)
    assert loaded.sigma_noise == pytest.approx(post.sigma_noise)
    assert loaded.log_marginal_likelihood() == pytest.approx(post.log_marginal_likelihood(), rel=1e-6)
    torch.testing.assert_close(loaded.posterior_variance, post.posterior_variance)


def test_refuses_other_architecture_and_other_weights(tmp_path, model):
    post = HeadPosterior.fit(NoisePredictionAdapter(model, "conv_out"), [torch.randn(4, 1, 6, 6)],
                             progress=False)
    post.save(tmp_path)
    with pytest.raises(FingerprintMismatchError, match="parameter 'weight'"):
        HeadPosterior.load(tmp_path, ToyImageDenoiser(channels=1, width=16))
    other = ToyImageDenoiser(channels=1, width=8)  # same shapes, different weights
    with pytest.raises(FingerprintMismatchError, match="weights differ"):
        HeadPosterior.load(tmp_path, other)
    HeadPosterior.load(tmp_path, other, check_weights=False)  # explicit opt-out works


def test_missing_or_foreign_files(tmp_path, model):
    with pytest.raises(FileNotFoundError, match="no genunc posterior"):
        HeadPosterior.load(tmp_path, model)
    post = HeadPosterior.fit(NoisePredictionAdapter(model, "conv_out"), [torch.randn(4, 1, 6, 6)],
                             progress=False)
    post.save(tmp_path)
    meta = json.loads((tmp_path / "genunc_posterior.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "genunc_posterior.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="format 99"):
        HeadPosterior.load(tmp_path, model)


def test_save_leaves_no_temporary_files(tmp_path, model):
    post = HeadPosterior.fit(NoisePredictionAdapter(model, "conv_out"), [torch.randn(4, 1, 6, 6)],
                             progress=False)
    post.save(tmp_path)
    post.save(tmp_path)  # overwrite in place
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_load_saved_and_load_if_present(tmp_path, model):
    """Nothing saved -> None for both; other weights -> load_saved refuses, load_if_present skips."""
    assert HeadPosterior.load_saved(tmp_path, model) is None
    assert HeadPosterior.load_if_present(tmp_path, model) is None
    post = HeadPosterior.fit(NoisePredictionAdapter(model, "conv_out"), [torch.randn(4, 1, 6, 6)],
                             progress=False)
    post.save(tmp_path)
    torch.testing.assert_close(HeadPosterior.load_saved(tmp_path, model).mean, post.mean)
    other = ToyImageDenoiser(channels=1, width=8)
    with pytest.raises(FingerprintMismatchError):
        HeadPosterior.load_saved(tmp_path, other)
    assert HeadPosterior.load_if_present(tmp_path, other) is None
