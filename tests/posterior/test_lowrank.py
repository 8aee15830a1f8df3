"""The low-rank-plus-diagonal posterior: exact against the full Laplace at full rank, the Woodbury
algebra against explicit matrices below it, and the tail fits that use it (regression, softmax,
save/load)."""

import pytest
import torch
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from genunc.errors import GenuncError
from genunc.posterior import Tail, TailData, TailPosterior
from genunc.posterior.lowrank import LowRankDiagLaplace


def _toy(seed=0, n=40, classes=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, classes or 2)).double()
    x = torch.randn(n, 3, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
    y = torch.distributions.Categorical(logits=out).sample() if classes \
        else out + 0.3 * torch.randn(n, 2, dtype=torch.float64)
    return model, x, y


def _fit(model, x, y, likelihood="regression", rank=None, **kwargs):
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    la = LowRankDiagLaplace(model, likelihood, prior_precision=2.0, **kwargs)
    la.fit(loader)
    n_params = sum(p.numel() for p in model.parameters())
    la.fit_low_rank(loader, rank or n_params, oversample=4, power_iterations=2)
    full = Laplace(model, likelihood, subset_of_weights="all", hessian_structure="full",
                   prior_precision=2.0, **kwargs)
    full.fit(loader)
    return la, full


@pytest.mark.parametrize("likelihood", ["regression", "classification"])
def test_full_rank_equals_the_full_laplace(likelihood):
    model, x, y = _toy(classes=3 if likelihood == "classification" else None)
    kwargs = {"sigma_noise": 0.3} if likelihood == "regression" else {}
    la, full = _fit(model, x, y, likelihood, **kwargs)
    close = dict(rtol=1e-5, atol=1e-9)  # float64 eigenpairs from subspace iteration
    torch.testing.assert_close(la.posterior_variance, torch.diagonal(full.posterior_covariance), **close)
    torch.testing.assert_close(la.log_det_posterior_precision, full.log_det_posterior_precision, **close)
    assert float(la.log_marginal_likelihood()) == pytest.approx(float(full.log_marginal_likelihood()),
                                                                rel=1e-7)
    delta = torch.randn(la.n_params, dtype=torch.float64)
    torch.testing.assert_close(la.square_norm(la.mean + delta), full.square_norm(full.mean + delta),
                               **close)
    js = torch.randn(2, 3, la.n_params, dtype=torch.float64)
    torch.testing.assert_close(la.functional_variance(js), full.functional_variance(js), **close)
    # the draws' covariance is the full posterior's (Monte-Carlo, 100k draws)
    draws = la.sample(100_000, generator=torch.Generator().manual_seed(0))
    empirical = torch.cov(draws.T)
    scale = torch.diagonal(full.posterior_covariance).sqrt()
    correlation_error = (empirical - full.posterior_covariance) / torch.outer(scale, scale)
    assert float(correlation_error.abs().max()) < 0.02
    torch.testing.assert_close(draws.mean(0), la.mean, atol=float(3 * scale.max() / 300), rtol=0)


def test_below_full_rank_the_algebra_matches_the_explicit_matrix():
    model, x, y = _toy(n=60)
    la, full = _fit(model, x, y, rank=5, sigma_noise=0.3)
    ggn = full.H  # the exact GGN (full structure, unscaled)
    top = torch.linalg.eigvalsh(ggn).flip(0)[:5]
    torch.testing.assert_close(la.eigenvalues, top, rtol=1e-6, atol=1e-8)
    d, v = la.posterior_precision
    precision = torch.diag(d) + v @ v.T
    torch.testing.assert_close(la.posterior_variance, torch.linalg.inv(precision).diagonal())
    torch.testing.assert_close(la.log_det_posterior_precision, torch.logdet(precision))
    # the diagonal is the GGN's (where the residual is not clipped) and the top directions are exact
    hf = la._H_factor
    torch.testing.assert_close(precision.diagonal(), hf * ggn.diagonal() + 2.0, rtol=1e-6, atol=1e-8)
    draws = la.sample(100_000, generator=torch.Generator().manual_seed(1))
    cov = torch.linalg.inv(precision)
    scale = cov.diagonal().sqrt()
    assert float(((torch.cov(draws.T) - cov) / torch.outer(scale, scale)).abs().max()) < 0.02


def test_marginal_likelihood_tunes_the_prior_through_the_low_rank_part():
    from genunc.posterior.base import optimise_marglik

    model, x, y = _toy()
    la, full = _fit(model, x, y, sigma_noise=0.3)
    optimise_marglik(la, True, False)
    optimise_marglik(full, True, False)
    assert la.prior_precision.item() == pytest.approx(full.prior_precision.item(), rel=1e-5)


# ------------------------------------------------------------------ tails
def _tail_data(model, x, y):
    tail = Tail(model, ["1", "2"])
    with torch.no_grad(), tail.capture() as rec:
        model(x)
        inputs = tail.inputs_of(rec, len(x))
    data = TailData()
    data.add(inputs, y)
    return tail, data


def test_tail_lowrank_equals_full_at_full_rank_and_its_draws_roundtrip(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2)).double()
    x = torch.randn(40, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x) + 0.3 * torch.randn(40, 2, dtype=torch.float64)
    tail, data = _tail_data(model, x, y)
    kwargs = dict(prior_precision=2.0, sigma_noise=0.3, curvature="exact")
    full = TailPosterior.fit_data(tail, data, structure="full", **kwargs)
    low = TailPosterior.fit_data(tail, data, structure="lowrank", rank=tail.n_params, **kwargs)
    # laplace-torch's full GGN carries ~1e-7 rounding (its smallest eigenvalues are -6e-7)
    torch.testing.assert_close(low.posterior_variance, full.posterior_variance, rtol=1e-5, atol=1e-9)
    assert low.log_marginal_likelihood() == pytest.approx(full.log_marginal_likelihood(), rel=1e-7)
    assert low.info["rank"] == tail.n_params and low.summary()["structure"] == "lowrank"
    # below full rank by marginal likelihood; saved and loaded, the same draws
    post = TailPosterior.fit_data(tail, data, structure="lowrank", rank=4, curvature="mc")
    assert post.prior_precision > 0 and post.info["curvature"] == "mc"
    post.save(tmp_path / "p")
    loaded = TailPosterior.load(tmp_path / "p", model)
    assert loaded.structure == "lowrank" and loaded.digest() == post.digest()
    a, b = post.sample(3, seed=5), loaded.sample(3, seed=5)
    for key in a.params:
        torch.testing.assert_close(a.params[key], b.params[key], rtol=0, atol=0)
    with pytest.raises(GenuncError, match="rank"):
        TailPosterior.fit_data(tail, data, structure="lowrank", rank=0)


def test_tail_lowrank_softmax_equals_full_at_full_rank():
    model, x, y = _toy(classes=3)
    tail, data = _tail_data(model, x, y)
    kwargs = dict(prior_precision=2.0, curvature="exact", likelihood="classification")
    full = TailPosterior.fit_data(tail, data, structure="full", **kwargs)
    low = TailPosterior.fit_data(tail, data, structure="lowrank", rank=tail.n_params, **kwargs)
    # laplace-torch's full GGN carries ~1e-7 rounding (its smallest eigenvalues are -6e-7)
    torch.testing.assert_close(low.posterior_variance, full.posterior_variance, rtol=1e-5, atol=1e-9)
    assert low.log_marginal_likelihood() == pytest.approx(full.log_marginal_likelihood(), rel=1e-7)


def test_text_block_takes_a_lowrank_posterior(tiny_text_model):
    """Attention and LayerNorm weights (refused by kron) take the low-rank posterior."""
    model = tiny_text_model(12, 9)
    names = ["blocks.layers.0", "norm", "head"]
    tail = Tail(model, names)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 11, (6, 9), generator=g)
    with torch.no_grad(), tail.capture() as rec:
        model(tokens)
        inputs = tail.inputs_of(rec, 6)
    data = TailData()
    mask = torch.rand(6, 9, generator=g) < 0.5
    data.add(inputs, tokens, mask)
    post = TailPosterior.fit_data(tail, data, structure="lowrank", rank=8, likelihood="classification",
                                  curvature="exact")
    diag = TailPosterior.fit_data(tail, data, structure="diag", likelihood="classification",
                                  curvature="exact", prior_precision=post.prior_precision)
    # the same GGN diagonal; correlations can only widen the marginals at a given prior
    torch.testing.assert_close(post.laplace.H, diag.laplace.H, rtol=1e-4, atol=1e-6)
    assert (post.posterior_variance >= diag.posterior_variance * (1 - 1e-4)).all()
    assert (post.posterior_variance > diag.posterior_variance * 1.01).any()
    draws = post.sample(2, seed=0)
    assert all(torch.isfinite(v).all() for v in draws.params.values())
