"""The Laplace posterior of a linear-Gaussian model is exact: check genunc against closed forms."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar
from torch import nn

from genunc.posterior import HeadPosterior

SIGMA = 0.5


def _data(n=400, f=4, o=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, f, generator=g, dtype=torch.float64)
    w = torch.randn(o, f, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(o, generator=g, dtype=torch.float64) * 0.3
    y = x @ w.T + b + SIGMA * torch.randn(n, o, generator=g, dtype=torch.float64)
    return x, y


def _design(x):
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def _closed_form(x, y, alpha):
    """Posterior of [W | b] per output: precision A = Phi^T Phi / s^2 + alpha I (same for all)."""
    phi = _design(x)
    a = phi.T @ phi / SIGMA**2 + alpha * torch.eye(phi.shape[1], dtype=x.dtype)
    mean = torch.linalg.solve(a, phi.T @ y / SIGMA**2)  # (F+1, O)
    return a, mean


def _train_map(x, y, alpha):
    """Gradient-based MAP (what a user's training would produce), independent of the closed form."""
    head = nn.Linear(x.shape[1], y.shape[1]).double()
    opt = torch.optim.LBFGS(head.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = 0.5 * ((head(x) - y) ** 2).sum() / SIGMA**2
        loss = loss + 0.5 * alpha * sum((p**2).sum() for p in head.parameters())
        loss.backward()
        return loss

    opt.step(closure)
    return head


def _laplace_layout(o, f):
    """laplace-torch's flat order (weight row-major, then bias) as (output, design column) pairs."""
    return [(i, j) for i in range(o) for j in range(f)] + [(i, f) for i in range(o)]


@pytest.mark.parametrize("structure", ["full", "diag", "kron"])
def test_posterior_matches_closed_form(structure):
    x, y = _data()
    alpha = 2.0
    head = _train_map(x, y, alpha)
    post = HeadPosterior.fit_features(
        head, (x, y), structure=structure, prior_precision=alpha, sigma_noise=SIGMA
    )
    a, mean = _closed_form(x, y, alpha)
    o, f = y.shape[1], x.shape[1]
    index = _laplace_layout(o, f)
    expected_mean = torch.tensor([mean[j, i] for i, j in index], dtype=torch.float64)
    torch.testing.assert_close(post.mean, expected_mean, rtol=1e-6, atol=1e-8)

    precision = torch.zeros(len(index), len(index), dtype=torch.float64)
    for p, (i, j) in enumerate(index):
        for q, (k, m) in enumerate(index):
            if i == k:
                precision[p, q] = a[j, m]
    if structure == "full":
        torch.testing.assert_close(
            post.posterior_covariance, torch.linalg.inv(precision), rtol=1e-6, atol=1e-10
        )
    elif structure == "diag":  # diagonal Laplace keeps the diagonal of the precision
        torch.testing.assert_close(
            post.posterior_variance, 1 / torch.diagonal(precision), rtol=1e-6, atol=1e-12
        )
    else:  # KFAC keeps the weight and bias blocks, each exact for a linear-Gaussian head
        blocks = precision.clone()
        nw = o * f
        blocks[:nw, nw:] = 0
        blocks[nw:, :nw] = 0
        torch.testing.assert_close(
            post.posterior_covariance, torch.linalg.inv(blocks), rtol=1e-5, atol=1e-10
        )


def _log_evidence(x, y, alpha):
    """Exact log p(y | alpha, sigma) of Bayesian linear regression (outputs independent)."""
    phi = _design(x).numpy()
    n = phi.shape[0]
    cov = SIGMA**2 * np.eye(n) + phi @ phi.T / alpha
    sign, logdet = np.linalg.slogdet(cov)
    sol = np.linalg.solve(cov, y.numpy())
    total = 0.0
    for k in range(y.shape[1]):
        total += -0.5 * (y[:, k].numpy() @ sol[:, k] + logdet + n * math.log(2 * math.pi))
    return total


def test_marglik_prior_precision_matches_evidence_maximiser():
    x, y = _data(n=300, f=6, o=2, seed=3)
    exact = minimize_scalar(lambda la: -_log_evidence(x, y, math.exp(la)), bounds=(-8, 8),
                            method="bounded", options={"xatol": 1e-8}).x
    alpha_star = math.exp(exact)

    # MacKay's loop: MAP at the current prior, Laplace evidence tunes the prior, repeat.
    alpha = 1.0
    for _ in range(4):
        head = _train_map(x, y, alpha)
        post = HeadPosterior.fit_features(head, (x, y), structure="full",
                                          prior_precision="marglik", sigma_noise=SIGMA)
        alpha = post.prior_precision
    assert alpha == pytest.approx(alpha_star, rel=1e-4)  # the issue asks for 10%; it is exact
    # and the Laplace evidence at the optimum is the exact evidence (linear-Gaussian)
    assert post.log_marginal_likelihood() == pytest.approx(_log_evidence(x, y, alpha), rel=1e-3)


def test_marglik_single_pass_is_close_with_plenty_of_data():
    x, y = _data(n=2000, f=6, o=2, seed=5)
    alpha_star = math.exp(minimize_scalar(lambda la: -_log_evidence(x, y, math.exp(la)),
                                          bounds=(-8, 8), method="bounded").x)
    head = _train_map(x, y, 1.0)
    post = HeadPosterior.fit_features(head, (x, y), structure="diag", prior_precision="marglik",
                                      sigma_noise=SIGMA)
    assert post.prior_precision == pytest.approx(alpha_star, rel=0.01)


def test_sigma_mle_and_joint_marglik_recover_noise():
    x, y = _data(n=3000, f=3, o=1, seed=7)
    head = _train_map(x, y, 1.0)
    mle = HeadPosterior.fit_features(head, (x, y), prior_precision=1.0, sigma_noise="mle")
    joint = HeadPosterior.fit_features(head, (x, y), prior_precision="marglik", sigma_noise="marglik")
    assert mle.sigma_noise == pytest.approx(SIGMA, rel=0.05)
    assert joint.sigma_noise == pytest.approx(SIGMA, rel=0.05)


def test_another_prior_precision_equals_a_refit_with_it():
    """with_prior_precision keeps the curvature: the diagonal variances (and evidence) equal a
    fresh fit at that prior, and the fitted posterior is left as it was."""
    x, y = _data()
    head = _train_map(x, y, 1.0)
    fitted = HeadPosterior.fit_features(head, (x, y), structure="diag", prior_precision=1.0,
                                        sigma_noise=SIGMA)
    before = fitted.posterior_variance.clone()
    for alpha in (0.01, 30.0):
        moved = fitted.with_prior_precision(alpha)
        refit = HeadPosterior.fit_features(head, (x, y), structure="diag", prior_precision=alpha,
                                           sigma_noise=SIGMA)
        torch.testing.assert_close(moved.posterior_variance, refit.posterior_variance)
        assert moved.prior_precision == pytest.approx(alpha)
        assert moved.log_marginal_likelihood() == pytest.approx(refit.log_marginal_likelihood())
    torch.testing.assert_close(fitted.posterior_variance, before, rtol=0, atol=0)
    with pytest.raises(Exception, match="positive"):
        fitted.with_prior_precision(0.0)
