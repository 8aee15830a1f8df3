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
