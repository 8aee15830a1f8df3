"""Adapter for EDM-style equivariant diffusion on 3D molecules.

Samples are point clouds ``(B, N, 3 + K)``: positions (Angstrom) and scaled atom features (EDM:
one-hot / 4, charge / 10), with a node mask for padding.  Where each part sits on the last axis
is read from the head's output irreps (``1x1o + Kx0e``: one vector, then K scalars) into a
:class:`PointCloudLayout`, so no code slices by hand-written offsets.  The forward process is EDM's: position
noise is centre-of-mass free under the node mask, feature noise is plain Gaussian, and the noise
schedule is EDM's clipped polynomial schedule.  The head's position output is made centre-of-mass
free afterwards (:meth:`MoleculeAdapter.post_head`), as EDM does with its network output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from genunc.adapters.base import DenoiserAdapter, TrainingPairs
from genunc.data.qm9 import ATOMIC_NUMBERS
from genunc.errors import GenuncError, NonFiniteError, ShapeMismatchError

#: EDM's scaling of the atom features: one-hot types / 4, nuclear charge / 10
ONE_HOT_SCALE, CHARGE_SCALE = 0.25, 0.1
#: a decoded molecule: ``(N, 3)`` positions in Angstrom and ``(N,)`` atom-type indices
Molecule = tuple[np.ndarray, np.ndarray]


def remove_mean(x: Tensor, node_mask: Tensor) -> Tensor:
    """Subtract the masked mean over atoms from ``(..., B, N, 3)`` vectors (padding stays 0)."""
    mask = node_mask.to(x.dtype).unsqueeze(-1)
    mean = (x * mask).sum(-2, keepdim=True) / mask.sum(-2, keepdim=True).clamp_min(1)
    return (x - mean) * mask


@dataclass(frozen=True)
class PointCloudLayout:
    """Where positions, atom types and the charge sit on a point cloud's last axis.

    EDM's atom features are the one-hot type (``n_types`` channels) followed by the nuclear
    charge (absent where a model was trained without it); :meth:`from_irreps` reads the split
    from a head's output irreps.  ``scales`` are EDM's ``normalize_factors``: positions, one-hot
    types and charges are divided by them (default: 1, 4, 10).
    """

    n_types: int
    atomic_numbers: tuple[int, ...] = ATOMIC_NUMBERS
    scales: tuple[float, float, float] = (1.0, 1 / ONE_HOT_SCALE, 1 / CHARGE_SCALE)
    charges: bool = True

    @classmethod
    def from_irreps(cls, irreps: Any, atomic_numbers: Sequence[int] = ATOMIC_NUMBERS) -> "PointCloudLayout":
        """From ``1x1o + Kx0e`` (e3nn irreps or their string): positions, then K = types + charge."""
        parts = [(mul, (ir.l, ir.p)) for mul, ir in irreps] if not isinstance(irreps, str) \
            else _parse_irreps(irreps)
        if len(parts) != 2 or parts[0] != (1, (1, -1)) or parts[1][1] != (0, 1):
            raise GenuncError(f"a molecule head must output '1x1o + Kx0e' (positions, then atom "
                              f"features); got {irreps}")
        layout = cls(parts[1][0] - 1, tuple(atomic_numbers))
        if layout.n_types != len(layout.atomic_numbers):
            raise GenuncError(f"the head outputs {parts[1][0]} atom features, but {len(atomic_numbers)} "
                              f"atom types + a charge make {len(atomic_numbers) + 1}")
        return layout

    @property
    def width(self) -> int:
        return 3 + self.n_types + int(self.charges)

    positions = slice(0, 3)
    features = slice(3, None)

    @property
    def types(self) -> slice:
        return slice(3, 3 + self.n_types)

    def encode(self, positions: np.ndarray, types: np.ndarray, mask: np.ndarray) -> Tensor:
        """Padded ``(B, N, 3)`` positions and ``(B, N)`` type indices as scaled point clouds."""
        s_pos, s_type, s_charge = self.scales
        parts = [positions.astype(np.float32) * (1 / s_pos),
                 np.eye(self.n_types, dtype=np.float32)[types] * (1 / s_type)]
        if self.charges:
            numbers = np.asarray(self.atomic_numbers, dtype=np.float32)
            parts.append(numbers[types][..., None] * (1 / s_charge))
        x = np.concatenate(parts, -1) * mask[..., None]
        return torch.from_numpy(x.astype(np.float32))

    def clean(self, x: Tensor, node_mask: Tensor) -> Tensor:
        """Replace continuous atom features by the scaled one-hot/charge of their argmax types:
        the molecule as it will be decoded."""
        _, s_type, s_charge = self.scales
        types = x[..., self.types].argmax(-1)
        parts = [x[..., self.positions],
                 torch.nn.functional.one_hot(types, self.n_types).to(x.dtype) * (1 / s_type)]
        if self.charges:
            numbers = torch.as_tensor(self.atomic_numbers, dtype=x.dtype, device=x.device)
            parts.append((numbers[types] * (1 / s_charge))[..., None])
        return torch.cat(parts, -1) * node_mask.unsqueeze(-1).to(x.dtype)

    def decode(self, x: Tensor, node_mask: Tensor) -> list[Molecule]:
        """Positions (Angstrom) and argmax atom types of each molecule (padding dropped)."""
        out = []
        for xi, mi in zip(x.detach().cpu(), node_mask.cpu().bool()):
            atoms = xi[mi]
            out.append((atoms[:, self.positions].double().numpy() * self.scales[0],
                        atoms[:, self.types].argmax(-1).numpy()))
        return out


def _parse_irreps(text: str) -> list[tuple[int, tuple[int, int]]]:
    parts = []
    for term in text.replace(" ", "").split("+"):
        mul, ir = term.split("x") if "x" in term else ("1", term)
        parts.append((int(mul), (int(ir[:-1]), 1 if ir[-1] == "e" else -1)))
    return parts


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
    #: the sampler a pipeline uses when none is named
    default_sampler = "ddpm"
    #: why the ``nll`` score (the model's own likelihood) is not available for this model; None
    #: where the adapter computes it (``likelihood_terms``)
    nll_unavailable: str | None = (
        "nll is the model's own likelihood and needs an EDM or GeoLDM checkpoint (EDM's gamma "
        "schedule, normalize_factors and a network trained down to level 0); this denoiser is "
        "not one: use denoising_loss")
    #: noise entries per molecule the likelihood takes beyond EDM's (each level's, level 0's)
    likelihood_extra_noise = 0

    def likelihood_data(self, x: Tensor, node_mask: Tensor) -> Tensor:
        """What the likelihood scores for generated states `x`: the molecule as it will be
        decoded (:meth:`clean`)."""
        return self.clean(x, node_mask)

    def __init__(self, model: nn.Module, head_name: str = "head", timesteps: int = 1000,
                 layout: PointCloudLayout | None = None) -> None:
        super().__init__(model, head_name)
        if layout is None:
            irreps = getattr(self.head, "irreps_out", None)
            if irreps is None:
                raise GenuncError(f"head '{head_name}' has no output irreps; pass layout=")
            layout = PointCloudLayout.from_irreps(irreps)
        self.layout = layout
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
        raise GenuncError(f"unknown sampler {kind!r}: ddpm or ddim")

    def project(self, x: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        return self._centre(x, inputs["node_mask"].bool())

    def _centre(self, x: Tensor, mask: Tensor) -> Tensor:
        """Centre-of-mass-free positions, zero padding: the subspace EDM diffuses in."""
        lay = self.layout
        return torch.cat([remove_mean(x[..., lay.positions], mask),
                          x[..., lay.features] * mask.unsqueeze(-1).to(x.dtype)], dim=-1)

    @property
    def output_groups(self) -> dict[str, slice]:
        """Positions (Angstrom noise) and the scaled atom features have residuals of different
        size (RMS about 0.70 vs 0.24 on the shipped model): one noise scale each."""
        return {"positions": self.layout.positions, "features": self.layout.features}

    def reduce_variance(self, variance: Tensor, inputs: Mapping[str, Any]) -> dict[str, Tensor]:
        """Per-atom output variance, positions and types apart.

        Position variance is summed over x, y, z (rotation invariant), feature variance over the
        feature channels; both are averaged over the molecule's real atoms, so that large
        molecules do not look uncertain merely for having more atoms.
        """
        var = variance.double()  # (B, N, 3+K)
        mask = inputs["node_mask"].to(var.dtype)
        n_atoms = mask.sum(-1).clamp_min(1)
        pos = (var[..., self.layout.positions].sum(-1) * mask).sum(-1) / n_atoms
        types = (var[..., self.layout.features].sum(-1) * mask).sum(-1) / n_atoms
        return {"variability": pos + types, "variability_pos": pos, "variability_type": types}

    def denoise(self, x: Tensor, t: Tensor, node_mask: Tensor) -> Tensor:
        t = t.expand(x.shape[0]) if t.dim() == 0 else t
        out = self.model(x, (t.to(x.dtype) + 1) / self.timesteps, node_mask)
        return self.post_head(out, {"x": x, "node_mask": node_mask})

    def post_head(self, head_output: Tensor, inputs: Mapping[str, Any]) -> Tensor:
        return self._centre(head_output, inputs["node_mask"].bool())

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
        width = self.layout.width
        if x0.dim() != 3 or mask.shape != x0.shape[:2] or x0.shape[-1] != width:
            raise ShapeMismatchError(f"x must be (B, N, {width}) (positions, then atom features) "
                                     f"with node_mask (B, N); got {tuple(x0.shape)} and "
                                     f"{tuple(mask.shape)}")
        if not torch.isfinite(x0[mask]).all():
            raise NonFiniteError("molecules hold NaN or infinite values")
        b = x0.shape[0]
        t = torch.randint(0, self.timesteps, (b,), generator=generator).to(self.device)
        eps = self.sample_noise(x0.shape, mask, generator).to(x0.dtype)
        alpha, sigma = self.alpha_sigma(t)
        lay = self.layout
        x0 = torch.cat([remove_mean(x0[..., lay.positions], mask), x0[..., lay.features]], dim=-1)
        x_t = alpha.to(x0.dtype).view(b, 1, 1) * x0 + sigma.to(x0.dtype).view(b, 1, 1) * eps
        return TrainingPairs(inputs={"x": x_t, "t": t, "node_mask": mask}, target=eps, mask=mask)

    # ------------------------------------------------------------------ molecules <-> tensors
    def encode(self, data: Any, ids: np.ndarray | None = None) -> dict[str, Tensor]:
        """Molecules of a dataset with ``subset(ids)`` and ``padded()`` (e.g.
        :class:`genunc.data.qm9.QM9`) as a padded batch ``{"x": (B, N, 3+K), "node_mask": (B, N)}``."""
        sub = data if ids is None else data.subset(ids)
        positions, types, mask = sub.padded()
        return {"x": self.layout.encode(positions, types, mask), "node_mask": torch.from_numpy(mask)}

    def decode(self, x: Tensor, node_mask: Tensor) -> list[Molecule]:
        return self.layout.decode(x, node_mask)

    def clean(self, x: Tensor, node_mask: Tensor) -> Tensor:
        return self.layout.clean(x, node_mask)
