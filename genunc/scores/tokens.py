"""Token-level uncertainty for masked-diffusion language models.

``mutual_information`` is the epistemic part of the predictive entropy under the head posterior,
``H[E_m p_m] - E_m H[p_m]`` (Houlsby et al.'s BALD): zero when every draw predicts the same
distribution, large when the draws disagree.  The other functions are the baselines users compare
against, computed from the MAP logits alone: confidence of the committed token, the margin
between the two most likely tokens, and self-certainty (Kang et al., 2025: the KL divergence from
the uniform distribution to the prediction; higher = more certain).

Per-sequence scores (:func:`genunc.scores.aggregate` over the generated positions) follow
genunc's convention (lower = more certain = keep), so confidence,
margin and self-certainty enter with a minus sign.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genunc.errors import ShapeMismatchError


def entropy(log_probs: Tensor) -> Tensor:
    """Entropy over the last axis of log-probabilities (nats)."""
    return -(log_probs.exp() * log_probs).sum(-1)


def mutual_information(logits_draws: Tensor) -> Tensor:
    """``(M, ..., V)`` logits of M head draws -> ``(...)`` mutual information in nats (float64).

    Computed in float64 with log-sum-exp, so identical draws give exactly zero up to rounding
    and the result is clamped at 0 against the last bits of cancellation.
    """
    if logits_draws.dim() < 2 or logits_draws.shape[0] < 1:
        raise ShapeMismatchError(f"logits must be (M draws, ..., V), got {tuple(logits_draws.shape)}")
    log_p = torch.log_softmax(logits_draws.double(), dim=-1)
    m = log_p.shape[0]
    log_mean = torch.logsumexp(log_p, dim=0) - math.log(m)
    return (entropy(log_mean) - entropy(log_p).mean(0)).clamp_min(0.0)


def mutual_information_leave_one_out(logits_draws: Tensor) -> Tensor:
    """``(M, ..., V)`` logits -> ``(M, ...)``: the mutual information of the M - 1 draws left
    when draw m is left out (for a jackknife estimate of the Monte-Carlo error)."""
    m = logits_draws.shape[0]
    if m < 3:
        raise ShapeMismatchError(f"leave-one-out mutual information needs M >= 3 draws, got {m}")
    log_p = torch.log_softmax(logits_draws.double(), dim=-1)
    p = log_p.exp()
    rest_mean = (p.sum(0, keepdim=True) - p) / (m - 1)  # draw m left out
    h = entropy(log_p)  # (M, ...)
    rest_entropy = (h.sum(0, keepdim=True) - h) / (m - 1)
    return (entropy(rest_mean.clamp_min(1e-300).log()) - rest_entropy).clamp_min(0.0)


def jackknife_standard_error(leave_one_out: Tensor) -> Tensor:
    """Standard error of an estimate from its M leave-one-out values ``(M, ...)``:
    ``sqrt((M - 1) / M * sum_m (v_m - mean)^2)``."""
    m = leave_one_out.shape[0]
    centred = leave_one_out.double() - leave_one_out.double().mean(0, keepdim=True)
    return ((m - 1) / m * centred.square().sum(0)).sqrt()


def confidence(logits: Tensor, tokens: Tensor) -> Tensor:
    """Probability of ``tokens`` under ``logits`` (``(..., V)`` and ``(...)``)."""
    return torch.softmax(logits.double(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def margin(logits: Tensor) -> Tensor:
    """Top-1 minus top-2 probability."""
    top2 = torch.softmax(logits.double(), -1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def self_certainty(logits: Tensor) -> Tensor:
    """``KL(U || p) = -log V - mean_v log p_v``: 0 for a uniform prediction, larger when peaked."""
    log_p = torch.log_softmax(logits.double(), -1)
    return -math.log(log_p.shape[-1]) - log_p.mean(-1)


# ---------------------------------------------------------------------- MI without materialised draws
#: how ``mutual_information`` is estimated: from M materialised head draws (``sampled``, the
#: default), in closed form from the logits' Gaussian (``linearised``, ``bridge``), or from draws of
#: the MAP's top-K vocabulary rows only (``pruned``); see docs/concepts/scores.md
MI_ESTIMATORS = ("sampled", "linearised", "bridge", "pruned")

#: a logit at or below this is a forbidden class (the mask token's ``finfo.min``): probability 0
_FORBIDDEN = -1e30


def dirichlet_mutual_information(alpha: Tensor) -> Tensor:
    """``(..., K)`` Dirichlet concentrations -> ``(...)`` mutual information ``H[E p] - E H[p]``
    (nats, float64), in closed form: ``E H[p] = psi(a0 + 1) - sum_k (a_k / a0) psi(a_k + 1)``.
    Entries with ``alpha == 0`` are absent classes."""
    alpha = alpha.double()
    a0 = alpha.sum(-1)
    p = alpha / a0.unsqueeze(-1)
    log_p = torch.where(p > 0, p.clamp_min(1e-300).log(), torch.zeros_like(p))
    mean_entropy = -(p * log_p).sum(-1)
    expected_entropy = torch.digamma(a0 + 1) - (p * torch.digamma(alpha + 1)).sum(-1)
    return (mean_entropy - expected_entropy).clamp_min(0.0)


def _gaussian_parts(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    if mean.shape != var.shape or mean.dim() < 1:
        raise ShapeMismatchError(f"logit means and variances must share one (..., V) shape, got "
                                 f"{tuple(mean.shape)} and {tuple(var.shape)}")
    mean, var = mean.double(), var.double().clamp_min(0.0)
    return mean, var, mean > _FORBIDDEN


def laplace_bridge(mean: Tensor, var: Tensor) -> Tensor:
    """The Laplace bridge (Hobbhahn et al., 2022): independent Gaussian logits ``N(mean, var)``
    ``(..., V)`` -> Dirichlet concentrations ``(..., V)``,
    ``alpha_k = (1 - 2/K + exp(mu_k) sum_l exp(-mu_l) / K^2) / s_k``.

    The bridge inverts the Laplace approximation of a Dirichlet in the softmax basis, where the
    logits sum to zero; ``(mu, s)`` are those of the *centred* logits ``z - mean(z)``, whose
    softmax is the same: ``mu = mean - mean.mean()``, ``s_k = var_k (1 - 2/K) + sum(var) / K^2``
    (exact for independent logits).  laplace-torch's ``link_approx="bridge"`` conditions the
    Gaussian on ``sum = 0`` instead, which changes the distribution of the softmax and is not
    invariant to adding a constant to every logit; with centring the bridge recovers a
    Dirichlet's ``alpha`` from the Gaussian of its own Laplace approximation.  Classes it cannot
    represent get ``alpha = 0`` (left out): forbidden ones (logit at the dtype's lowest, the mask
    token) and deterministic ones (zero variance: rows outside the posterior; a Dirichlet has no
    fixed coordinate).  With fewer than two random classes the result is all zeros.
    """
    mean, var, allowed = _gaussian_parts(mean, var)
    keep = allowed & (var > 0)
    k = keep.sum(-1, keepdim=True).double().clamp_min(1)
    mu = torch.where(keep, mean, torch.zeros_like(mean))
    mu = torch.where(keep, mu - mu.sum(-1, keepdim=True) / k, mu)
    v = torch.where(keep, var, torch.zeros_like(var))
    s = v * (1 - 2 / k) + v.sum(-1, keepdim=True) / k.square()
    neg_mu = torch.where(keep, -mu, torch.full_like(mu, -torch.inf))
    log_term = mu + torch.logsumexp(neg_mu, -1, keepdim=True) - 2 * k.log()
    alpha = (1 - 2 / k + log_term.clamp_max(700).exp()) / s.clamp_min(1e-300)
    return torch.where(keep & (k >= 2), alpha, torch.zeros_like(alpha))


def bridge_mutual_information(mean: Tensor, var: Tensor) -> Tensor:
    """Mutual information of the Laplace bridge's Dirichlet (:func:`laplace_bridge`) for
    independent Gaussian logits ``(..., V)`` -> ``(...)``; zero where fewer than two classes are
    random.  Accurate when the variances look like a Dirichlet's (``var_k ~ 1 / alpha_k``, large
    ``alpha``); off by factors for equal variances (see the scores page)."""
    alpha = laplace_bridge(mean, var)
    out = dirichlet_mutual_information(alpha.clamp_min(0))
    return torch.where((alpha > 0).sum(-1) >= 2, out, torch.zeros_like(out))


def linearised_mutual_information(mean: Tensor, var: Tensor) -> Tensor:
    """Second-order mutual information of independent Gaussian logits ``(..., V)`` -> ``(...)``:
    ``0.5 * sum_k var_k p_k (1 - p_k)`` with ``p = softmax(mean)``, i.e. ``E KL(p_theta || p)``
    expanded to second order in the logit noise (``0.5 tr(F Sigma)``, ``F = diag p - p p^T``, the
    softmax's Fisher).  Exact as the variances go to 0, an overestimate once they are large
    enough for the softmax to saturate."""
    mean, var, allowed = _gaussian_parts(mean, var)
    p = torch.softmax(torch.where(allowed, mean, torch.full_like(mean, -torch.inf)), -1)
    return 0.5 * (var * p * (1 - p)).sum(-1)


def pruned_vocabulary(logits: Tensor, top_k: int) -> tuple[Tensor, Tensor | None]:
    """``(..., V)`` MAP logits -> the top-``K`` columns ``(..., K)`` and the remainder bucket's
    logit ``(...)``: the log-sum-exp of the other columns under the MAP (None when K = V)."""
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ShapeMismatchError(f"mi_top_k must be an integer >= 1, got {top_k!r}")
    v = logits.shape[-1]
    k = min(top_k, v)
    index = logits.topk(k, dim=-1).indices
    if k == v:
        return index, None
    rest = logits.double().scatter(-1, index, -torch.inf)
    return index, torch.logsumexp(rest, -1)


def with_remainder(top_logits_draws: Tensor, remainder: Tensor | None) -> Tensor:
    """``(M, ..., K)`` drawn logits of the top-K columns and the remainder bucket's logit
    ``(...)`` (the same in every draw) -> ``(M, ..., K + 1)`` logits over K + 1 outcomes, the
    input of :func:`mutual_information` (unchanged when there is no remainder, K = V)."""
    if remainder is None:
        return top_logits_draws
    bucket = remainder.to(top_logits_draws.dtype).expand(top_logits_draws.shape[:-1]).unsqueeze(-1)
    return torch.cat([top_logits_draws, bucket], -1)
