"""Generate 3D molecules with per-molecule uncertainty from an equivariant denoiser.

    sampler = MoleculeUncertaintySampler.from_pretrained("path/to/qm9_edm")
    sampler.fit_posterior(train_molecules)
    out = sampler(num_molecules=100, num_draws=5, seed=0)   # out.molecules, out.scores

Scores (lower = more certain):

* ``variability`` (with ``variability_pos`` / ``variability_type``): variance of the predicted
  noise across M head draws along the MAP trajectory, per atom, averaged over steps; one head op
  per step on top of plain generation.
* ``semantic``: Jazbec et al.'s entropy over invariant molecule descriptors
  (:mod:`genunc.features.molecule`) of the MAP and M perturbed generations from the same noise;
  costs M+1 generations.  Use ``sampler="ddim"`` for it, so that the generations differ only by
  their heads.
* ``denoising_loss``: the model-likelihood baseline.  The diffusion training loss of the decoded
  molecule, averaged over ``nll_levels`` evenly spaced noise levels with fixed noise: a
  Monte-Carlo estimate of the (unweighted) variational bound on -log p, up to constants.
* ``random``.

The sampler is the shared diffusers loop (:func:`genunc.sampling.run_trajectory`) on the
adapter's EDM schedule: DDPM (ancestral, EDM's sampler) by default, DDIM on request; the adapter's
``project`` keeps positions centre-of-mass free and padding empty after every step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from genunc.adapters.molecule import MoleculeAdapter
from genunc.data.qm9 import ATOMIC_NUMBERS, QM9
from genunc.errors import GenuncError
from genunc.posterior.laplace_head import POSTERIOR_DIR, HeadPosterior
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.features.molecule import features_of
from genunc.scores import aggregate_variability, gaussian_entropy, random_scores
from genunc.zoo.molecule_model import EquivariantDenoiser

ONE_HOT_SCALE, CHARGE_SCALE = 0.25, 0.1  # EDM's feature scaling
N_TYPES = len(ATOMIC_NUMBERS)
SCORES = ("variability", "semantic", "denoising_loss", "random")


def encode(data: QM9, ids: np.ndarray | None = None) -> dict[str, Tensor]:
    """QM9 molecules as a padded batch ``{"x": (B, N, 3+6), "node_mask": (B, N)}``."""
    sub = data if ids is None else data.subset(ids)
    pos, typ, mask = sub.padded()
    onehot = np.eye(N_TYPES, dtype=np.float32)[typ] * ONE_HOT_SCALE
    charge = np.asarray(ATOMIC_NUMBERS, dtype=np.float32)[typ][..., None] * CHARGE_SCALE
    x = np.concatenate([pos, onehot, charge], -1) * mask[..., None]
    return {"x": torch.from_numpy(x), "node_mask": torch.from_numpy(mask)}


def clean_features(x: Tensor, node_mask: Tensor) -> Tensor:
    """Replace a sample's continuous atom features by the scaled one-hot/charge of its argmax
    types: the molecule as it will be decoded."""
    types = x[..., 3 : 3 + N_TYPES].argmax(-1)
    onehot = torch.nn.functional.one_hot(types, N_TYPES).to(x.dtype) * ONE_HOT_SCALE
    charge = torch.as_tensor(ATOMIC_NUMBERS, dtype=x.dtype, device=x.device)[types] * CHARGE_SCALE
    out = torch.cat([x[..., :3], onehot, charge.unsqueeze(-1)], -1)
    return out * node_mask.unsqueeze(-1).to(x.dtype)


def decode(x: Tensor, node_mask: Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """Positions and argmax atom types of each generated molecule (padding dropped)."""
    out = []
    for xi, mi in zip(x.detach().cpu(), node_mask.cpu().bool()):
        atoms = xi[mi]
        out.append((atoms[:, :3].double().numpy(), atoms[:, 3 : 3 + N_TYPES].argmax(-1).numpy()))
    return out


@dataclass
class MoleculeOutput:
    molecules: list[tuple[np.ndarray, np.ndarray]]
    scores: dict[str, np.ndarray]
    n_atoms: np.ndarray
    seed: int
    backbone_rows: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    #: with the semantic score: the M perturbed generations, ``draw_molecules[m][i]``
    draw_molecules: list[list[tuple[np.ndarray, np.ndarray]]] | None = None


class MoleculeUncertaintySampler:
    """An equivariant denoiser + atom-count distribution + head posterior."""

    def __init__(self, model: EquivariantDenoiser, atom_histogram: Mapping[int, int],
                 posterior: HeadPosterior | None = None, timesteps: int = 1000) -> None:
        self.adapter = MoleculeAdapter(model, "head", timesteps)
        counts = {int(k): int(v) for k, v in atom_histogram.items()}
        self.atom_counts = np.array(sorted(counts))
        weights = np.array([counts[k] for k in self.atom_counts], dtype=np.float64)
        self.atom_probs = weights / weights.sum()
        self.posterior = posterior
        if posterior is not None:
            posterior.check_matches(model)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str = "cpu") -> "MoleculeUncertaintySampler":
        from safetensors.torch import load_file

        directory = Path(directory)
        config = json.loads((directory / "config.json").read_text())
        model = EquivariantDenoiser(**config["model"])
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        histogram = json.loads((directory / "atom_histogram.json").read_text())
        sampler = cls(model.to(device).eval(), histogram, timesteps=config["timesteps"])
        sampler.posterior = HeadPosterior.load_saved(directory / POSTERIOR_DIR, model)
        return sampler

    def fit_posterior(self, batches: Any, *, repeats: int = 2, seed: int = 0,
                      progress: bool = True, **kwargs: Any) -> HeadPosterior:
        """Fit the head posterior on clean molecule batches (dicts from :func:`encode`)."""
        self.posterior = HeadPosterior.fit(self.adapter, batches, repeats=repeats, seed=seed,
                                           progress=progress, **kwargs)
        return self.posterior

    def _masks(self, n: int, rng: np.random.Generator, n_atoms: np.ndarray | None) -> Tensor:
        if n_atoms is None:
            n_atoms = rng.choice(self.atom_counts, size=n, p=self.atom_probs)
        width = int(n_atoms.max())
        return torch.arange(width)[None, :] < torch.as_tensor(n_atoms)[:, None]

    @torch.no_grad()
    def denoising_loss(self, x0: Tensor, node_mask: Tensor, levels: int = 10,
                       seed: int = 0) -> np.ndarray:
        """Per-molecule diffusion loss of clean samples ``x0``, averaged over ``levels`` noise
        levels (per atom, fixed noise for a given seed): the model-likelihood baseline."""
        b = x0.shape[0]
        g = torch.Generator().manual_seed(seed)
        ts = torch.linspace(0, self.adapter.timesteps - 1, levels).round().long().to(x0.device)
        t = ts.repeat_interleave(b)
        mask = node_mask.repeat(levels, 1)
        x0 = x0.repeat(levels, 1, 1)
        eps = self.adapter.sample_noise(x0.shape, mask, g).to(x0.dtype)
        alpha, sigma = self.adapter.alpha_sigma(t)
        x_t = alpha.to(x0.dtype).view(-1, 1, 1) * x0 + sigma.to(x0.dtype).view(-1, 1, 1) * eps
        err = ((self.adapter.denoise(x_t, t, mask) - eps) ** 2).sum(-1) * mask.to(x0.dtype)
        per_molecule = err.sum(-1) / mask.sum(-1).clamp_min(1)
        return per_molecule.reshape(levels, b).mean(0).double().cpu().numpy()

    @torch.no_grad()
    def __call__(self, num_molecules: int = 64, *, num_draws: int = 5, steps: int = 1000,
                 scores: tuple[str, ...] = ("variability",), sampler: str = "ddpm",
                 variability_steps: list[int] | None = None, n_atoms: np.ndarray | None = None,
                 nll_levels: int = 10, seed: int = 0, chunk_size: int = 64,
                 progress: bool = True) -> MoleculeOutput:
        """Generate ``num_molecules`` molecules and score them.

        Args:
            steps: sampler steps (EDM: 1000; fewer use the scheduler's strided timesteps).
            sampler: ``ddpm`` (ancestral, EDM's) or ``ddim`` (deterministic).
            variability_steps: indices of the steps at which variability is measured
                (default: all).
            n_atoms: atom count per molecule (default: drawn from the training histogram).
            nll_levels: noise levels averaged by the ``denoising_loss`` baseline.
        """
        unknown = set(scores) - set(SCORES)
        if unknown:
            raise GenuncError(f"unknown scores {sorted(unknown)}; choose from {SCORES}")
        uses_posterior = {"variability", "semantic"} & set(scores)
        if uses_posterior:
            if self.posterior is None:
                raise GenuncError("no posterior: call fit_posterior(...) or load one first")
            if num_draws < 2:
                raise GenuncError(f"{sorted(uses_posterior)} need num_draws >= 2, got {num_draws}")
        if n_atoms is not None and len(n_atoms) != num_molecules:
            raise GenuncError(f"n_atoms has {len(n_atoms)} entries for {num_molecules} molecules")
        rng = np.random.default_rng(seed)
        masks = self._masks(num_molecules, rng, n_atoms)
        scheduler = self.adapter.make_scheduler(sampler)
        draws = self.posterior.sample(num_draws, seed=seed) if uses_posterior else None
        device = self.adapter.device
        molecules, parts, rows = [], {}, 0
        draw_molecules: list[list] | None = [[] for _ in range(num_draws)] \
            if "semantic" in scores else None
        timings = {"generation": 0.0, "denoising_loss": 0.0}
        for start in tqdm(range(0, num_molecules, chunk_size), desc="molecules",
                          disable=not progress):
            mask = masks[start : start + chunk_size].to(device)
            mask = mask[:, : int(mask.sum(1).max())]
            g = torch.Generator().manual_seed(seed * 1_000_003 + start)
            x_T = self.adapter.sample_noise((mask.shape[0], mask.shape[1], 3 + N_TYPES + 1), mask, g)
            tic = time.perf_counter()
            out = run_trajectory(self.adapter, scheduler, self.posterior, x_T.to(device),
                                 {"node_mask": mask}, num_inference_steps=steps,
                                 trajectory_draws=draws if "semantic" in scores else None,
                                 variability_draws=draws if "variability" in scores else None,
                                 variability_steps=variability_steps, generator=g)
            timings["generation"] += time.perf_counter() - tic
            rows += out.backbone_rows
            chunk_molecules = decode(out.samples, mask)
            molecules += chunk_molecules
            for name, per_step in (out.variability_per_step or {}).items():
                parts.setdefault(name, []).append(aggregate_variability(per_step))
            if "semantic" in scores:
                generations = [chunk_molecules] + [decode(d, mask) for d in out.draw_samples]
                for m, generation in enumerate(generations[1:]):
                    draw_molecules[m] += generation
                feats = np.stack([features_of(gen) for gen in generations])
                parts.setdefault("semantic", []).append(gaussian_entropy(feats))
            if "denoising_loss" in scores:
                tic = time.perf_counter()
                parts.setdefault("denoising_loss", []).append(self.denoising_loss(
                    clean_features(out.samples, mask), mask, nll_levels, seed=seed + start))
                timings["denoising_loss"] += time.perf_counter() - tic
        result = {name: np.concatenate(values) for name, values in parts.items()}
        if "random" in scores:
            result["random"] = random_scores(num_molecules, seed)
        return MoleculeOutput(molecules, result, masks.sum(1).numpy(), seed, rows, timings,
                              draw_molecules)
