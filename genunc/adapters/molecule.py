"""Adapter for EDM-style equivariant diffusion on 3D molecules.

Samples are point clouds ``(B, N, 3 + K)``: positions (Angstrom) and scaled atom features (EDM:
one-hot / 4, charge / 10), with a node mask for padding.  The forward process is EDM's: position
noise is centre-of-mass free under the node mask, feature noise is plain Gaussian, and the noise
schedule is EDM's clipped polynomial schedule.  The head's position output is made centre-of-mass
free afterwards (:meth:`MoleculeAdapter.post_head`), as EDM does with its network output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from genunc.adapters.base import DenoiserAdapter, TrainingPairs
from genunc.errors import ShapeMismatchError
from genunc.zoo.molecule_model import remove_mean


def polynomial_alphas2(timesteps: int = 1000, power: float = 2.0, s: float = 1e-5,
                       clip: float = 1e-3) -> Tensor:
    """EDM's ``polynomial_2`` schedule: alpha_t^2 for t = 0..T (float64)."""
    t = torch.linspace(0, timesteps, timesteps + 1, dtype=torch.float64)
    alphas2 = (1 - (t / timesteps) ** power) ** 2
    alphas2 = torch.cat([torch.ones(1, dtype=torch.float64), alphas2])
    steps = (alphas2[1:] / alphas2[:-1]).clamp(min=clip, max=1.0)
    alphas2 = torch.cumprod(steps, 0)
    return (1 - 2 * s) * alphas2 + s


class MoleculeAdapter(DenoiserAdapter):
    """An equivariant point-cloud denoiser called as ``model(x, t / T, node_mask)``.

    Batches are dicts with ``x`` ``(B, N, 3+K)`` and ``node_mask`` ``(B, N)``.
    """

    likelihood = "regression"

    def __init__(self, model: nn.Module, head_name: str = "head", timesteps: int = 1000) -> None:
        super().__init__(model, head_name)
        self.timesteps = timesteps
        # noise levels t = 0..T-1 are EDM's levels 1..T (level 0 is the data itself)
        self.alphas_cumprod = polynomial_alphas2(timesteps)[1:]

    def alpha_sigma(self, t: Tensor) -> tuple[Tensor, Tensor]:
        a2 = self.alphas_cumprod.to(t.device)[t.long()]
        return a2.sqrt(), (1 - a2).sqrt()

    def make_scheduler(self, kind: str = "ddpm") -> Any:
        """A diffusers scheduler on this adapter's schedule; with :meth:`project` after each step,
        DDPM is EDM's ancestral sampler and DDIM (eta = 0) its deterministic counterpart."""
        from diffusers import DDIMScheduler, DDPMScheduler

        ac = self.alphas_cumprod
        betas = 1 - ac / torch.cat([torch.ones(1, dtype=ac.dtype), ac[:-1]])
        common = dict(num_train_timesteps=self.timesteps, trained_betas=betas.tolist(),
                      clip_sample=False, prediction_type="epsilon")
        if kind == "ddpm":
            return DDPMScheduler(variance_type="fixed_small", **common)
        if kind == "ddim":
            return DDIMScheduler(set_alpha_to_one=True, **common)
        raise ValueError(f"unknown scheduler kind {kind!r}: ddpm or ddim")

    def project(self, x: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        mask = inputs["node_mask"].bool()
        return torch.cat([remove_mean(x[..., :3], mask),
                          x[..., 3:] * mask.unsqueeze(-1).to(x.dtype)], dim=-1)

    def variability(self, eps_draws: Tensor, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Per-atom variance of the predicted noise across draws, positions and types apart.

        Position variance is summed over x, y, z (rotation invariant), feature variance over the
        feature channels; both are averaged over the molecule's real atoms, so that large
        molecules do not look uncertain merely for having more atoms.
        """
        var = eps_draws.double().var(0)  # (B, N, 3+K)
        mask = inputs["node_mask"].to(var.dtype)
        n_atoms = mask.sum(-1).clamp_min(1)
        pos = (var[..., :3].sum(-1) * mask).sum(-1) / n_atoms
        types = (var[..., 3:].sum(-1) * mask).sum(-1) / n_atoms
        return {"variability": pos + types, "variability_pos": pos, "variability_type": types}

    def denoise(self, x: Tensor, t: Tensor, node_mask: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = self.model(x, (t.to(x.dtype) + 1) / self.timesteps, node_mask)
        return self.post_head(out, {"x": x, "node_mask": node_mask})

    def post_head(self, head_output: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        mask = inputs["node_mask"].bool()
        pos = remove_mean(head_output[..., :3], mask)
        feats = head_output[..., 3:] * mask.unsqueeze(-1).to(head_output.dtype)
        return torch.cat([pos, feats], dim=-1)

    def sample_noise(self, shape: torch.Size, node_mask: Tensor,
                     generator: torch.Generator | None = None) -> Tensor:
        """Gaussian noise with centre-of-mass-free positions and zero padding."""
        eps = torch.randn(shape, generator=generator, dtype=torch.float32).to(node_mask.device)
        return self.project(eps, {"node_mask": node_mask})

    def training_pairs(self, batch: Any, generator: torch.Generator) -> TrainingPairs:
        if not isinstance(batch, Mapping) or "x" not in batch or "node_mask" not in batch:
            raise ShapeMismatchError("molecule batches are dicts with 'x' (B, N, 3+K) and 'node_mask'")
        x0 = batch["x"].to(self.device, self.dtype)
        mask = batch["node_mask"].to(self.device).bool()
        if x0.dim() != 3 or mask.shape != x0.shape[:2]:
            raise ShapeMismatchError(f"x must be (B, N, 3+K) with node_mask (B, N); got "
                                     f"{tuple(x0.shape)} and {tuple(mask.shape)}")
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (b,), generator=generator).to(self.device)
        eps = self.sample_noise(x0.shape, mask, generator).to(x0.dtype)
        alpha, sigma = self.alpha_sigma(t)
        x0 = torch.cat([remove_mean(x0[..., :3], mask), x0[..., 3:]], dim=-1)
        x_t = alpha.to(x0.dtype).view(b, 1, 1) * x0 + sigma.to(x0.dtype).view(b, 1, 1) * eps
        return TrainingPairs(inputs={"x": x_t, "t": t, "node_mask": mask}, target=eps, mask=mask)
