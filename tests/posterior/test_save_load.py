"""A saved posterior reloads to identical draws, and refuses to attach to a different head."""

import json

import pytest
import torch

from genunc.adapters import NoisePredictionAdapter
from genunc.errors import FingerprintMismatchError, MissingFileError
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
    with pytest.raises(MissingFileError, match="no complete genunc posterior"):
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


def test_load_policy_for_missing_and_stale_posteriors(tmp_path, model):
    """Nothing saved -> None where asked (an error otherwise); other weights -> refused unless
    stale="none"."""
    assert HeadPosterior.load(tmp_path, model, missing="none") is None
    assert HeadPosterior.load(tmp_path, model, missing="none", stale="none") is None
    with pytest.raises(MissingFileError):
        HeadPosterior.load(tmp_path, model)
    post = HeadPosterior.fit(NoisePredictionAdapter(model, "conv_out"), [torch.randn(4, 1, 6, 6)],
                             progress=False)
    post.save(tmp_path)
    torch.testing.assert_close(HeadPosterior.load(tmp_path, model, missing="none").mean, post.mean)
    other = ToyImageDenoiser(channels=1, width=8)
    with pytest.raises(FingerprintMismatchError):
        HeadPosterior.load(tmp_path, other, missing="none")
    assert HeadPosterior.load(tmp_path, other, stale="none") is None


def test_half_saved_posterior_is_an_error_not_a_missing_one(tmp_path, model):
    """A posterior folder with one of its two files is damaged: never treated as 'none saved'
    (which would trigger a silent refit over the remaining file)."""
    post = HeadPosterior.fit(NoisePredictionAdapter(model, "conv_out"), [torch.randn(4, 1, 6, 6)],
                             progress=False)
    post.save(tmp_path)
    (tmp_path / "genunc_posterior.json").unlink()
    with pytest.raises(MissingFileError, match="no complete genunc posterior"):
        HeadPosterior.load(tmp_path, model, missing="none")


def test_per_group_noise_scales_survive_save_and_load(tmp_path):
    head = torch.nn.Linear(3, 4).double()
    x = torch.randn(200, 3, dtype=torch.float64)
    y = torch.randn(200, 4, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0, 0.1], dtype=torch.float64)
    post = HeadPosterior.fit_features(head, (x, y), output_groups={"a": slice(0, 3), "b": slice(3, 4)})
    post.save(tmp_path)
    loaded = HeadPosterior.load(tmp_path, torch.nn.ModuleDict({"head": head}))
    assert loaded.sigma_noise == pytest.approx(post.sigma_noise)
    assert set(loaded.sigma_noise) == {"a", "b"}
    assert loaded.log_marginal_likelihood() == pytest.approx(post.log_marginal_likelihood(), rel=1e-9)
    torch.testing.assert_close(loaded.sample(4, seed=2).flat, post.sample(4, seed=2).flat)
    assert loaded.digest() == post.digest()
