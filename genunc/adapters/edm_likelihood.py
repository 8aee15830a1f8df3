"""EDM's variational bound on ``-log p(x, h)`` of a molecule, term by term (Hoogeboom et al., 2022).

For a molecule of N atoms with positions ``x`` (centre-of-mass free) and atom features ``h``
(one-hot types, optionally the nuclear charge), in EDM's normalised units (``x / s_x``, one-hot
``/ s_type``, charge ``/ s_charge``: the ``normalize_factors``), EDM bounds the negative
log-likelihood by

    -log p(x, h | N) <= C_0 + KL_T + T * E_t[L_t] + L_0 + (N - 1) * 3 * log s_x

with, writing ``gamma = -log SNR`` (levels 0..T) and ``d = (N - 1) * 3`` for the positions'
dimension (the centre-of-mass-free subspace):

* ``C_0 = d * (gamma_0 / 2 + log(2 pi) / 2)``: the normalisation of the Gaussian
  ``p(x | z_0)``, whose standard deviation is ``sigma_0 / alpha_0 = exp(gamma_0 / 2)``;
* ``KL_T = KL(q(z_T | x, h) || N(0, I))`` on the positions' subspace and on every real atom's
  features (:func:`prior_kl`);
* ``L_t = 0.5 * (SNR(t - 1) / SNR(t) - 1) * ||eps - eps_hat(z_t, t)||^2`` for t = 1..T
  (:func:`step_weight`), the network's noise error at ``z_t = alpha_t [x, h] + sigma_t eps``;
* ``L_0 = -log p(x, h | z_0)`` without ``C_0``: half the position noise error at level 0, and
  the discretised Gaussian likelihoods of the atom types and charges
  (:func:`feature_log_likelihood`);
* the last term is the log-determinant of the normalisation ``x -> x / s_x`` (zero for
  ``s_x = 1``, EDM's QM9 setting), so that the bound is on the molecule in Angstrom.

EDM adds ``-log p(N)`` (its atom-count histogram) to report ``-log p(x, h, N)``.  Its evaluation
estimates ``T * E_t[L_t]`` with one uniform ``t`` per molecule; :func:`stratified_weights` gives
the deterministic stratified alternative genunc uses for a per-molecule score (exact with all
T levels).  Schedule quantities are computed in float64 from EDM's float32 ``gamma``; only the
network runs in the model's precision.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from genunc.adapters.molecule import PointCloudLayout
from genunc.errors import GenuncError

#: the floor EDM adds inside the logarithm of a discretised probability
PROBABILITY_FLOOR = 1e-10
LOG_2PI = math.log(2 * math.pi)


def stratified_weights(n: int, gamma: Tensor) -> tuple[Tensor, Tensor]:
    """At most ``n`` levels in 1..T and the coefficients of their ``||eps - eps_hat||^2 / 2`` in
    the estimate of ``sum_t L_t``: every level with its step weight when n >= T (the exact sum),
    else a stratified estimate.

    The levels are cut into ``n`` runs of equal summed step weight (``SNR(t-1)/SNR(t) - 1``,
    known exactly from ``gamma`` at levels 0..T); each run is represented by its level nearest
    the run's weight midpoint, which carries the run's summed weight.  Only the noise error is
    taken as constant within a run.  Equal weights minimise the estimate's variance for errors of
    equal spread, and follow the weights' sharp rise at both ends of EDM's polynomial schedule
    (with polynomial_2 over 1000 levels, the last of 50 equal-length runs holds a quarter of the
    whole weight, and the estimate's variance would be 5.7 times larger).  A level heavier than
    a run's share takes a run to itself, so fewer than ``n`` levels may come back.
    """
    if n < 1:
        raise GenuncError(f"the likelihood needs at least one noise level, got {n}")
    weights = step_weight(gamma[:-1].to(torch.float64), gamma[1:].to(torch.float64))  # level t at t - 1
    timesteps = len(weights)
    if n >= timesteps:
        return torch.arange(1, timesteps + 1), weights
    total = weights.sum()
    middle = torch.cumsum(weights, 0) - weights / 2
    run = torch.clamp(torch.floor(n * middle / total).long(), max=n - 1)
    levels, summed = [], []
    for k in torch.unique(run).tolist():
        members = torch.nonzero(run == k).view(-1)
        target = (k + 0.5) / n * total
        levels.append(int(members[torch.argmin((middle[members] - target).abs())]) + 1)
        summed.append(weights[members].sum())
    return torch.tensor(levels), torch.stack(summed)


def alpha_sigma(gamma: Tensor) -> tuple[Tensor, Tensor]:
    """``alpha = sqrt(sigmoid(-gamma))``, ``sigma = sqrt(sigmoid(gamma))``."""
    return torch.sigmoid(-gamma).sqrt(), torch.sigmoid(gamma).sqrt()


def step_weight(gamma_s: Tensor, gamma_t: Tensor) -> Tensor:
    """``SNR(s) / SNR(t) - 1``: the weight of the noise error in the step term ``L_t``."""
    return torch.expm1(gamma_t - gamma_s)


def position_dimension(node_mask: Tensor) -> Tensor:
    """``(N - 1) * 3`` per molecule: the centre-of-mass-free positions' dimension."""
    return (node_mask.to(torch.float64).sum(-1) - 1) * 3


def position_constants(node_mask: Tensor, gamma_0: Tensor) -> Tensor:
    """``C_0``: minus the log-normaliser of ``p(x | z_0)``, per molecule."""
    return position_dimension(node_mask) * (0.5 * gamma_0 + 0.5 * LOG_2PI)


def prior_kl(xh: Tensor, node_mask: Tensor, gamma_T: Tensor, layout: PointCloudLayout) -> Tensor:
    """``KL(N(alpha_T xh, sigma_T^2) || N(0, 1))`` per molecule, positions on their subspace.

    ``xh`` ``(B, N, F)`` normalised and masked, ``gamma_T`` ``(B,)``.
    """
    alpha, sigma = (v.view(-1, 1, 1) for v in alpha_sigma(gamma_T))
    mean = alpha * xh.to(torch.float64)
    mask = node_mask.to(torch.float64).unsqueeze(-1)
    features = (-sigma.log() + 0.5 * (sigma ** 2 + mean[..., layout.features] ** 2) - 0.5) * mask
    d = position_dimension(node_mask)
    s = sigma.view(-1)
    positions = d * (-s.log() + 0.5 * s ** 2 - 0.5) \
        + 0.5 * (mean[..., layout.positions] ** 2).sum((1, 2))
    return positions + features.sum((1, 2))


def _normal_cdf(x: Tensor) -> Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


def _log_bin(centre: Tensor, scale: Tensor) -> Tensor:
    """``log P(|Y - centre| < 1/2)`` for ``Y ~ N(0, scale^2)`` (floored as EDM floors it)."""
    return torch.log(_normal_cdf((centre + 0.5) / scale) - _normal_cdf((centre - 0.5) / scale)
                     + PROBABILITY_FLOOR)


def feature_log_likelihood(xh: Tensor, z0: Tensor, sigma_0: Tensor, node_mask: Tensor,
                           layout: PointCloudLayout) -> Tensor:
    """``log p(h | z_0)``: the discretised Gaussian likelihoods of the atom features, per molecule.

    In data units (one-hot and charge times their scales), with standard deviation
    ``sigma_0`` times the scale: each type's probability is the mass of its unit bin around 1
    under ``N(z_type, .)``, normalised over the types, and read at the true type; the charge's
    is the mass of the unit bin around the true (integer) charge.
    """
    xh, z0 = xh.to(torch.float64), z0.to(torch.float64)
    mask = node_mask.to(torch.float64)
    sigma_0 = sigma_0.view(-1, 1, 1)
    _, s_type, s_charge = layout.scales
    one_hot = xh[..., layout.types] * s_type
    log_bins = _log_bin(z0[..., layout.types] * s_type - 1, sigma_0 * s_type)
    log_types = log_bins - torch.logsumexp(log_bins, -1, keepdim=True)
    total = (log_types * one_hot * mask.unsqueeze(-1)).sum((1, 2))
    if layout.charges:
        charge = torch.round(xh[..., -1] * s_charge)
        log_charge = _log_bin(charge - z0[..., -1] * s_charge, sigma_0.view(-1, 1) * s_charge)
        total = total + (log_charge * mask).sum(1)
    return total
