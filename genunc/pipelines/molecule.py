"""Generate 3D molecules with per-molecule uncertainty from an equivariant denoiser.

    pipe = MoleculeUncertaintyPipeline.from_pretrained("path/to/qm9_edm")
    pipe.fit_posterior(train_molecules)
    out = pipe(num_samples=100, num_draws=5, seed=0)   # out.molecules, out.scores

Scores (lower = more certain):

* ``variability`` (with ``variability_pos`` / ``variability_type``): variance of the predicted
  noise across M head draws along the MAP trajectory, per atom, averaged over steps; one head op
  per step on top of plain generation.
* ``semantic``: Jazbec et al.'s entropy over invariant molecule descriptors
  (:mod:`genunc.features.molecule`) of the MAP and M perturbed generations from the same noise;
  costs M+1 generations.  With either sampler the generations differ only by their heads (the
  trajectories share the ancestral sampler's noise).
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from genunc.adapters.molecule import Molecule, MoleculeAdapter
from genunc.errors import GenuncError, MissingFileError
from genunc.features.molecule import features_of
from genunc.pipelines.base import ScoreCollector, UncertaintyOutput, UncertaintyPipeline
from genunc.posterior import HeadPosterior
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.scores import aggregate_steps
from genunc.zoo.molecule_model import EquivariantDenoiser
from genunc.zoo.pretrained import read_config

ATOM_HISTOGRAM_FILE = "atom_histogram.json"


@dataclass
class MoleculeUncertaintyOutput(UncertaintyOutput):
    molecules: list[Molecule] | None = None
    n_atoms: np.ndarray | None = None
    #: with the semantic score: the M perturbed generations, ``draw_molecules[m][i]``
    draw_molecules: list[list[Molecule]] | None = None


class MoleculeUncertaintyPipeline(UncertaintyPipeline):
    """An equivariant denoiser + atom-count distribution + head posterior."""

    SCORES = {"variability": 2, "semantic": 1, "denoising_loss": 0, "random": 0}
    EXTRA_SCORE_COLUMNS = ("variability_pos", "variability_type")
    FIT_REPEATS = 2

    def __init__(self, model: EquivariantDenoiser, atom_histogram: Mapping[int, int],
                 posterior: HeadPosterior | None = None, timesteps: int = 1000) -> None:
        super().__init__(MoleculeAdapter(model, "head", timesteps), posterior)
        counts = {int(k): int(v) for k, v in atom_histogram.items()}
        self.atom_counts = np.array(sorted(counts))
        weights = np.array([counts[k] for k in self.atom_counts], dtype=np.float64)
        self.atom_probs = weights / weights.sum()

    @classmethod
    def _load(cls, path: Path, *, device: str) -> "MoleculeUncertaintyPipeline":
        """A folder written by ``genunc zoo train qm9-edm`` (model, schedule, atom counts)."""
        histogram = path / ATOM_HISTOGRAM_FILE
        if not histogram.exists():
            raise MissingFileError(f"{path} holds no {ATOM_HISTOGRAM_FILE}")
        return cls(EquivariantDenoiser.from_pretrained(path, device=device),
                   json.loads(histogram.read_text()), timesteps=read_config(path)["timesteps"])

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
    def __call__(self, num_samples: int = 64, *, num_draws: int = 5,
                 num_inference_steps: int = 1000, scores: tuple[str, ...] = ("variability",),
                 sampler: str = "ddpm", variability_steps: list[int] | None = None,
                 n_atoms: np.ndarray | None = None, nll_levels: int = 10, seed: int = 0,
                 chunk_size: int = 64, progress: bool = True,
                 check_only: bool = False) -> MoleculeUncertaintyOutput | None:
        """Generate ``num_samples`` molecules and score them.

        Args:
            num_inference_steps: sampler steps (EDM: 1000; fewer use the scheduler's strided
                timesteps).
            sampler: ``ddpm`` (ancestral, EDM's) or ``ddim`` (deterministic).
            variability_steps: indices of the steps at which variability is measured
                (default: all).
            n_atoms: atom count per molecule (default: drawn from the training histogram).
            nll_levels: noise levels averaged by the ``denoising_loss`` baseline.
            check_only: check the arguments and return None, generating nothing.
        """
        request = self._request(scores, num_draws, seed, check_only, num_samples=num_samples,
                                num_inference_steps=num_inference_steps, chunk_size=chunk_size,
                                nll_levels=nll_levels)
        if n_atoms is not None and len(n_atoms) != num_samples:
            raise GenuncError(f"n_atoms has {len(n_atoms)} entries for {num_samples} molecules")
        scheduler = self.adapter.make_scheduler(sampler)
        self.check_steps(num_inference_steps, variability_steps=variability_steps)
        if check_only:
            return None
        rng = np.random.default_rng(seed)
        masks = self._masks(num_samples, rng, n_atoms)
        layout = self.adapter.layout
        device = self.adapter.device
        collected = ScoreCollector()
        molecules: list[Molecule] = []
        semantic = request.wants("semantic")
        draw_molecules: list[list[Molecule]] | None = \
            [[] for _ in range(num_draws)] if semantic else None
        for start in tqdm(range(0, num_samples, chunk_size), desc="molecules",
                          disable=not progress):
            mask = masks[start : start + chunk_size].to(device)
            mask = mask[:, : int(mask.sum(1).max())]
            g = torch.Generator().manual_seed(seed * 1_000_003 + start)
            x_T = self.adapter.sample_noise((mask.shape[0], mask.shape[1], layout.width), mask, g)
            with collected.timer("generation"):
                out = run_trajectory(
                    self.adapter, scheduler, x_T.to(device), {"node_mask": mask},
                    num_inference_steps=num_inference_steps,
                    trajectory_draws=request.draws if semantic else None,
                    variability_draws=request.perturbed if request.wants("variability") else None,
                    variability_steps=variability_steps, generator=g)
            collected.backbone_rows += out.backbone_rows
            chunk_molecules = layout.decode(out.samples, mask)
            molecules += chunk_molecules
            for name, per_step in (out.variability_per_step or {}).items():
                collected.add(name, aggregate_steps(per_step))
            if semantic:
                generations = [chunk_molecules] + [layout.decode(d, mask) for d in out.draw_samples]
                for m, generation in enumerate(generations[1:]):
                    draw_molecules[m] += generation
                feats = np.stack([features_of(gen) for gen in generations])
                collected.add("semantic", self.semantic_entropy(feats))
            if request.wants("denoising_loss"):
                with collected.timer("denoising_loss"):
                    collected.add("denoising_loss", self.denoising_loss(
                        layout.clean(out.samples, mask), mask, nll_levels, seed=seed + start))
        return MoleculeUncertaintyOutput(
            scores=collected.scores(request, num_samples), seed=seed, num_draws=num_draws,
            backbone_rows=collected.backbone_rows,
            timings={"generation": 0.0, "denoising_loss": 0.0, **collected.timings},
            molecules=molecules, n_atoms=masks.sum(1).numpy(), draw_molecules=draw_molecules)
