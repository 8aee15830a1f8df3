"""Adapter and sampler for EDM's own denoiser (:mod:`genunc.zoo.edm`).

EDM's network is called as ``model(t, xh, node_mask (B, N, 1), edge_mask (B*N*N, 1))`` with
``t = level / T`` and returns the centre-of-mass-free position noise followed by the atom-feature
noise.  :class:`EDMAdapter` builds those masks from genunc's ``(B, N)`` atom masks, and maps
genunc's timestep index ``i`` (0..T-1) to EDM's level ``i + 1``, as
:class:`~genunc.adapters.molecule.MoleculeAdapter` does.  Point clouds use EDM's normalisation
(``normalize_factors``: positions, one-hot types and charges divided by them) through the
adapter's :class:`~genunc.adapters.molecule.PointCloudLayout`.

Two posterior scopes, one posterior type:

* **head** (``dynamics.egnn.embedding_out``, the default): hidden node states -> atom-feature
  noise, an ``nn.Linear`` whose output the model only masks and places after the positions
  (:meth:`EDMAdapter.post_head`).  Every draw keeps the model E(3)-equivariant (invariant
  inputs, invariant outputs).  The position noise is outside this head: it is produced by the
  last block's coordinate MLP through ``tanh`` and a sum over neighbours, so it is neither linear
  in those weights (the closed-form variance and the head contract need that) nor one row per
  atom.  With the head alone, position variability is therefore zero by construction; positions
  still differ between the semantic score's generations, through the atom features the
  perturbed heads feed back into later steps.
* **block** (``tail=k``: a :class:`~genunc.posterior.TailPosterior` over the last ``k`` EGNN
  blocks, i.e. their node, edge and attention MLPs and their coordinate MLP, plus
  ``embedding_out``, ending at the parameter-free ``dynamics.readout``; see
  :meth:`genunc.zoo.edm.EDMModel.tail_modules`): the block's output is the whole model output,
  positions included, so position variability is non-zero.  It is fitted on the same noisy
  training pairs as the head, with the full noise (positions and features, one noise scale
  each) as the target (:meth:`EDMAdapter.tail_training_pairs`), and its variability is Monte
  Carlo over block draws re-run on the MAP trajectory's recorded block inputs, with a jackknife
  standard error (``variance="monte_carlo"``).  Every draw keeps the model E(3)-equivariant:
  EDM's layers are equivariant for any weights.
  :meth:`TailPosterior.linearised_output_variance <genunc.posterior.TailPosterior.linearised_output_variance>`
  is the first-order closed form of that variance under a diagonal block posterior (exact for
  the linearised block; one vector-Jacobian product per output element, so not yet what the
  pipeline's variability uses).

:class:`EDMAncestralScheduler` is EDM's ``p(z_s | z_t)`` step computed from EDM's float32
``gamma`` exactly as EDM computes it, behind the small part of diffusers' scheduler interface
genunc's loop uses; with :meth:`EDMAdapter.project` after each step it reproduces EDM's sampler
step for step.  It stops at ``z_0``: EDM's final ``p(x | z_0)`` (one more network call that
replaces the positions of ``z_0`` by the model's clean prediction, a change of order
``sigma_0 = 3e-3`` Angstrom for polynomial_2) is not taken; atom types come from ``z_0`` in
both.  diffusers' DDPM on the same schedule (``sampler="ddpm"``) is the same step in exact
arithmetic, computed from float32 cumulative products instead, and ends on the model's clean
prediction at level 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from genunc.adapters import edm_likelihood
from genunc.adapters.base import DenoiserAdapter, TrainingPairs
from genunc.adapters.molecule import MoleculeAdapter, PointCloudLayout, polynomial_alphas2
from genunc.errors import GenuncError

#: EDM's output head (see the module docstring)
EDM_HEAD = "dynamics.egnn.embedding_out"


@dataclass
class EDMStepOutput:
    prev_sample: Tensor


@dataclass
class LevelZero:
    """Level 0 of EDM's bound, float64: the centred data ``x0``, ``z_0 = alpha_0 x0 + sigma_0
    eps``, the noise and the network's prediction of it (masked), ``sigma_0`` and ``gamma_0``
    per molecule."""

    x0: Tensor
    z: Tensor
    eps: Tensor
    eps_hat: Tensor
    sigma: Tensor
    gamma: Tensor


class EDMAncestralScheduler:
    """EDM's ancestral sampler, ``z_s ~ p(z_s | z_t)``, with diffusers' ``step`` interface.

    ``gamma`` holds EDM's ``-log SNR`` at levels 0..T (float32, as EDM stores it).  Timesteps
    are genunc's indices ``level - 1``.  With fewer steps than T the levels are evenly spaced
    and the same formulas take the longer jumps (EDM samples every level).  The step's noise is
    drawn raw; the adapter's ``project`` then makes it EDM's (centre-of-mass-free positions,
    zero padding), which is linear, so the result equals EDM's step for the same noise.
    """

    init_noise_sigma = 1.0
    order = 1

    def __init__(self, gamma: Tensor) -> None:
        self.gamma = gamma.detach().float().cpu()
        self.num_train_timesteps = len(self.gamma) - 1
        self.timesteps = torch.arange(self.num_train_timesteps - 1, -1, -1)
        self._next: dict[int, int] = {}
        self.set_timesteps(self.num_train_timesteps)

    def set_timesteps(self, num_inference_steps: int, device: Any = None) -> None:
        n_levels = self.num_train_timesteps
        if not 1 <= num_inference_steps <= n_levels:
            raise GenuncError(f"num_inference_steps must lie in [1, {n_levels}], got {num_inference_steps}")
        levels = torch.linspace(n_levels, 0, num_inference_steps + 1, dtype=torch.float64).round().long()
        self._next = {int(t): int(s) for t, s in zip(levels[:-1], levels[1:])}
        self.timesteps = (levels[:-1] - 1).to(device)

    def scale_model_input(self, sample: Tensor, timestep: Any = None) -> Tensor:
        return sample

    def coefficients(self, timestep: int | Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(alpha_t|s, c = sigma_t|s^2 / (alpha_t|s sigma_t), sigma)`` of the step from index
        ``timestep``: ``z_s = z_t / alpha_t|s - c * eps + sigma * noise``."""
        t_level = int(timestep) + 1
        if t_level not in self._next:
            raise GenuncError(f"timestep {int(timestep)} is not one of this schedule's steps")
        gamma_t, gamma_s = self.gamma[t_level], self.gamma[self._next[t_level]]
        sigma2_ts = -torch.expm1(F.softplus(gamma_s) - F.softplus(gamma_t))
        alpha_ts = torch.exp(0.5 * (F.logsigmoid(-gamma_t) - F.logsigmoid(-gamma_s)))
        sigma_s, sigma_t = torch.sqrt(torch.sigmoid(gamma_s)), torch.sqrt(torch.sigmoid(gamma_t))
        sigma = torch.sqrt(sigma2_ts) * sigma_s / sigma_t
        return alpha_ts, sigma2_ts / alpha_ts / sigma_t, sigma

    def step(self, model_output: Tensor, timestep: int | Tensor, sample: Tensor,
             generator: torch.Generator | list[torch.Generator] | None = None,
             noise: Tensor | None = None, return_dict: bool = True) -> EDMStepOutput:
        """One ancestral step; ``noise`` (else drawn from `generator`, one per sample allowed)."""
        alpha_ts, c, sigma = self.coefficients(timestep)
        mu = sample / alpha_ts.to(sample) - c.to(sample) * model_output
        if noise is None:
            noise = _randn(sample, generator)
        return EDMStepOutput(mu + sigma.to(sample) * noise)


def _randn(like: Tensor, generator: torch.Generator | list[torch.Generator] | None) -> Tensor:
    """Gaussian noise shaped like `like`; with a list of generators, row i from generator i."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != like.shape[0]:
            # run_trajectory repeats the batch per trajectory group: the generators cycle
            if like.shape[0] % len(generator):
                raise GenuncError(f"{len(generator)} generators for a batch of {like.shape[0]}")
        rows = [torch.randn(like.shape[1:], generator=generator[i % len(generator)],
                            device=generator[i % len(generator)].device, dtype=like.dtype)
                for i in range(like.shape[0])]
        return torch.stack(rows).to(like.device)
    return torch.randn(like.shape, generator=generator, dtype=like.dtype,
                       device=generator.device if generator is not None else like.device).to(like.device)


class EDMAdapter(MoleculeAdapter):
    """EDM's EGNN dynamics (:class:`genunc.zoo.edm.EDMModel`) as a genunc molecule denoiser.

    Batches and sampler states are ``(B, N, 3+K)`` point clouds in EDM's normalised space with
    ``(B, N)`` atom masks.  ``context``: conditional checkpoints' per-node context
    ``(B, N, C)``, passed through to the model.
    """

    default_sampler = "edm"
    nll_unavailable = None

    def __init__(self, model: nn.Module, layout: PointCloudLayout, *, timesteps: int = 1000,
                 power: float = 2.0, precision: float = 1e-5, head_name: str = EDM_HEAD) -> None:
        DenoiserAdapter.__init__(self, model, head_name)
        self.layout = layout
        self.timesteps = timesteps
        self.alphas_cumprod = polynomial_alphas2(timesteps, power=power, s=precision)[1:]
        gamma = getattr(getattr(model, "gamma", None), "gamma", None)
        if gamma is None:
            raise GenuncError("an EDM model keeps its noise schedule in model.gamma.gamma")
        self.gamma = gamma.detach().float().cpu()

    def make_scheduler(self, kind: str = "edm") -> Any:
        """``edm`` (EDM's ancestral step, the default), or diffusers' ``ddpm`` / ``ddim``."""
        if kind == "edm":
            return EDMAncestralScheduler(self.gamma)
        if kind in ("ddpm", "ddim"):
            return super().make_scheduler(kind)
        raise GenuncError(f"unknown sampler {kind!r}: edm, ddpm or ddim")

    def denoise(self, x: Tensor, t: Tensor, node_mask: Tensor,  # type: ignore[override]
                context: Tensor | None = None) -> Tensor:
        b = x.shape[0]
        t = t.expand(b) if t.dim() == 0 else t
        return self.at_levels(x, t.reshape(b) + 1, node_mask, context)

    def at_levels(self, x: Tensor, levels: Tensor, node_mask: Tensor,
                  context: Tensor | None = None) -> Tensor:
        """The network at EDM's integer levels ``(B,)`` in 0..T (level 0: the data's own, which
        EDM's likelihood uses and the sampler never reaches)."""
        b, n, _ = x.shape
        mask = node_mask.bool()
        level = levels.reshape(b, 1).to(torch.float32) / self.timesteps  # EDM: float32 level / T
        pair = mask.unsqueeze(1) & mask.unsqueeze(2) & ~torch.eye(n, dtype=torch.bool, device=x.device)
        return self.model(level.to(x.dtype), x, mask.unsqueeze(-1).to(x.dtype),
                          pair.reshape(-1, 1).to(x.dtype), context)

    @torch.no_grad()
    def likelihood_terms(self, x0: Tensor, node_mask: Tensor, levels: Tensor, noise: Tensor,
                         weights: Tensor | None = None, context: Tensor | None = None,
                         max_rows: int = 512) -> dict[str, Tensor]:
        """EDM's bound on ``-log p(x, h | N)`` of molecules ``x0`` and its terms, per molecule
        (float64, nats; :mod:`genunc.adapters.edm_likelihood`).

        ``x0`` ``(B, N, F)`` in this layout's normalised units (positions are centred here);
        ``levels`` ``(B, L)`` EDM levels in 1..T at which the step terms are evaluated;
        ``noise`` ``(B, L + 1, N, F)``: each level's ``eps``, then the level-0 term's (made
        centre-of-mass free and masked here); ``weights`` ``(B, L)``: the coefficient of each
        level's ``||eps - eps_hat||^2 / 2`` (default EDM's estimator, ``T / L`` times the step
        weight: with one uniform level, EDM's own; see
        :func:`~genunc.adapters.edm_likelihood.stratified_weights`).  Returns
        ``position_constants``, ``prior_kl``, ``diffusion`` (the estimate of the steps' sum),
        ``reconstruction`` (``-log p(x, h | z_0)`` without the constants), ``log_det``
        (``(N - 1) * 3 * log s_x``) and their sum ``nll_xh``.  The network runs in ``x0``'s
        precision, ``max_rows`` noisy molecules per call; everything else in float64.
        """
        terms, level_0 = self.diffusion_bound(x0, node_mask, levels, noise, weights, context, max_rows)
        lay, mask = self.layout, node_mask.bool()
        position_error = ((level_0.eps - level_0.eps_hat)[..., lay.positions] ** 2
                          * mask.to(torch.float64).unsqueeze(-1)).sum((1, 2))
        terms["reconstruction"] = 0.5 * position_error - edm_likelihood.feature_log_likelihood(
            level_0.x0, level_0.z, level_0.sigma, mask, lay)
        terms["log_det"] = edm_likelihood.position_dimension(mask) * math.log(lay.scales[0])
        terms["nll_xh"] = sum(terms.values())
        return terms

    def diffusion_bound(self, x0: Tensor, node_mask: Tensor, levels: Tensor, noise: Tensor,
                        weights: Tensor | None, context: Tensor | None,
                        max_rows: int) -> tuple[dict[str, Tensor], "LevelZero"]:
        """The terms of EDM's bound that do not depend on what the diffusion's state encodes:
        ``position_constants``, ``prior_kl`` and ``diffusion`` (arguments as for
        :meth:`likelihood_terms`), and the level-0 quantities the reconstruction term is made
        of (EDM's discretised atom features; GeoLDM's Gaussian latents)."""
        b, n_levels = levels.shape
        if noise.shape[:2] != (b, n_levels + 1):
            raise GenuncError(f"noise must be (B, L + 1, N, F) = ({b}, {n_levels + 1}, ...), "
                              f"got {tuple(noise.shape)}")
        if int(levels.min()) < 1 or int(levels.max()) > self.timesteps:
            raise GenuncError(f"the step term's levels lie in 1..{self.timesteps}")
        mask = node_mask.bool()
        dtype = x0.dtype
        x0 = self._centre(x0, mask).to(torch.float64)
        noise = self._centre(noise.to(x0.device, torch.float64),
                             mask.unsqueeze(1).expand(-1, n_levels + 1, -1))
        gamma = self.gamma.to(x0.device, torch.float64)
        fmask = mask.to(torch.float64)

        # the step terms: sum over the levels of weight * ||eps - eps_hat||^2 / 2
        levels = levels.to(x0.device)
        if weights is None:
            weights = self.timesteps / n_levels * edm_likelihood.step_weight(gamma[levels - 1], gamma[levels])
        flat_levels = levels.reshape(-1)
        flat_noise = noise[:, :n_levels].reshape(b * n_levels, *x0.shape[1:])
        rows = torch.arange(b, device=x0.device).repeat_interleave(n_levels)
        losses = []
        for start in range(0, b * n_levels, max_rows):
            part = slice(start, start + max_rows)
            t, eps, i = flat_levels[part], flat_noise[part], rows[part]
            alpha, sigma = (v.view(-1, 1, 1) for v in edm_likelihood.alpha_sigma(gamma[t]))
            z_t = alpha * x0[i] + sigma * eps
            eps_hat = self.at_levels(z_t.to(dtype), t, mask[i], None if context is None else context[i])
            error = ((eps - eps_hat.to(torch.float64)) ** 2 * fmask[i].unsqueeze(-1)).sum((1, 2))
            losses.append(0.5 * error)
        diffusion = (weights.to(x0.device, torch.float64) * torch.cat(losses).view(b, n_levels)).sum(1)

        # level 0: the network's noise prediction at z_0
        zero = torch.zeros(b, dtype=torch.long, device=x0.device)
        gamma_0 = gamma[zero]
        alpha_0, sigma_0 = edm_likelihood.alpha_sigma(gamma_0)
        eps_0 = noise[:, n_levels]
        z_0 = alpha_0.view(-1, 1, 1) * x0 + sigma_0.view(-1, 1, 1) * eps_0
        eps_hat_0 = self.at_levels(z_0.to(dtype), zero, mask, context).to(torch.float64)
        terms = {"position_constants": edm_likelihood.position_constants(mask, gamma_0),
                 "prior_kl": edm_likelihood.prior_kl(x0, mask, gamma[zero + self.timesteps], self.layout),
                 "diffusion": diffusion}
        return terms, LevelZero(x0, z_0, eps_0, eps_hat_0 * fmask.unsqueeze(-1), sigma_0, gamma_0)

    def post_head(self, head_output: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        """Head output ``(..., B, N, K)`` -> the model output it makes: no position part, the
        features masked (the head leaves positions alone).  A block's output ``(..., B, N,
        3+K)`` (the readout's) is the model output already."""
        if head_output.shape[-1] == self.layout.width:
            return head_output
        mask = inputs["node_mask"].bool().unsqueeze(-1).to(head_output.dtype)
        features = head_output * mask
        return torch.cat([features.new_zeros(*features.shape[:-1], 3), features], -1)

    @property
    def output_groups(self) -> None:
        """The head predicts the atom-feature noise only: one group, one noise scale."""
        return None

    def head_output_variance(self, posterior: Any, phi: Tensor,
                             inputs: Mapping[str, Any]) -> Tensor:
        """Closed form: ``post_head`` only masks and pads, so it maps variances the same way."""
        return self.post_head(posterior.output_variance(phi), inputs)

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        pairs = self.tail_training_pairs(batch, generator)
        # the head predicts the atom-feature noise only
        pairs.target = pairs.target[..., self.layout.features]
        return pairs

    def tail_training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        """EDM's noisy pairs with the whole noise as target: a block's output is the model's
        (positions and features).  The same inputs as the head's pairs for the same generator."""
        pairs = super().training_pairs(batch, generator)
        if isinstance(batch, Mapping) and batch.get("context") is not None:
            pairs.inputs["context"] = batch["context"].to(self.device, self.dtype)
        return pairs

    @property
    def tail_output_groups(self) -> dict[str, slice]:
        """A block predicts positions and features: one noise scale each."""
        return {"positions": self.layout.positions, "features": self.layout.features}
