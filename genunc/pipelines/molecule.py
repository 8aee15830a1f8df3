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
* ``denoising_loss``: the model-likelihood proxy.  The diffusion training loss of the decoded
  molecule, averaged over ``nll_levels`` evenly spaced noise levels with fixed noise: a
  Monte-Carlo estimate of the (unweighted) variational bound on -log p, up to constants.
* ``nll`` (EDM and GeoLDM checkpoints): the model's own likelihood of the decoded molecule in
  nats, ``-log p(x, h, N)`` exactly as the model's evaluation computes it (EDM's variational
  bound, :meth:`EDMAdapter.likelihood_terms <genunc.adapters.edm.EDMAdapter.likelihood_terms>`;
  GeoLDM's on the encoded latent plus its decoder terms,
  :meth:`GeoLDMAdapter.likelihood_terms <genunc.adapters.geoldm.GeoLDMAdapter.likelihood_terms>`;
  plus ``-log p(N)`` from the atom-count histogram), its sum over the T steps estimated at (at most)
  ``nll_levels`` stratified levels, one per run of equal summed step weight, carrying that
  weight (exact over the steps when ``nll_levels >= T``), with fixed noise.
* ``random``.

The sampler is the shared diffusers loop (:func:`genunc.sampling.run_trajectory`) on the
adapter's EDM schedule: DDPM (ancestral, EDM's sampler) by default, DDIM on request; the adapter's
``project`` keeps positions centre-of-mass free and padding empty after every step.

EDM's own checkpoints load too: ``from_pretrained`` recognises an EDM output folder
(``args.pickle`` + ``generative_model_ema.npy``) and runs EDM's network
(:mod:`genunc.zoo.edm`) through :class:`~genunc.adapters.edm.EDMAdapter`, with EDM's
normalisation, EDM's QM9 atom-count histogram (or the folder's ``atom_histogram.json``) and EDM's
ancestral step as the default sampler.  GeoLDM's (:mod:`genunc.zoo.geoldm`; its ``args.pickle``
has ``latent_nf``) load the same way: latents sampled by the latent dynamics and decoded by its
VAE (:class:`~genunc.adapters.geoldm.GeoLDMAdapter`), the posterior in the latent dynamics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genunc import streams
from genunc.adapters import edm_likelihood
from genunc.adapters.edm import EDMAdapter
from genunc.adapters.geoldm import GeoLDMAdapter, LatentLayout
from genunc.adapters.molecule import Molecule, MoleculeAdapter, PointCloudLayout
from genunc.data.qm9 import ATOM_TYPES, ATOMIC_NUMBERS, EDM_QM9_ATOM_HISTOGRAM
from genunc.errors import GenuncError, MissingFileError
from genunc.features.molecule import features_of
from genunc.pipelines.base import (
    Request,
    ScoreCollector,
    UncertaintyOutput,
    UncertaintyPipeline,
    VarianceEstimate,
)
from genunc.posterior import HeadPosterior
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.scores import VariabilityTarget
from genunc.streams import randn_rows
from genunc.zoo import edm_args, geoldm
from genunc.zoo.edm import load_edm
from genunc.zoo.molecule_model import EquivariantDenoiser
from genunc.zoo.pretrained import read_config

ATOM_HISTOGRAM_FILE = "atom_histogram.json"


@dataclass
class MoleculeUncertaintyOutput(UncertaintyOutput):
    molecules: list[Molecule] | None = None
    n_atoms: np.ndarray | None = None
    #: with the semantic score: the M perturbed generations, ``draw_molecules[m][i]``
    draw_molecules: list[list[Molecule]] | None = None


def _check_qm9_types(path: Path, atom_types: Any) -> None:
    """EDM-style checkpoints decode QM9 with hydrogens; anything else is refused in one line."""
    if atom_types != ATOM_TYPES:
        raise GenuncError(f"{path}: atom types {atom_types}; the pipeline decodes QM9 "
                          f"with hydrogens {ATOM_TYPES}")


def _atom_histogram(path: Path) -> Any:
    """Molecule sizes of an EDM-style folder: its ``atom_histogram.json``, else EDM's QM9 one."""
    histogram_file = path / ATOM_HISTOGRAM_FILE
    return json.loads(histogram_file.read_text()) if histogram_file.exists() \
        else EDM_QM9_ATOM_HISTOGRAM


class MoleculeUncertaintyPipeline(UncertaintyPipeline):
    """An equivariant denoiser + atom-count distribution + head posterior."""

    SCORES = {"variability": 0, "semantic": 1, "semantic_x0": 1, "denoising_loss": None,
              "nll": None, "random": None}
    EXTRA_SCORE_COLUMNS = ("variability_pos", "variability_type", "variability_se",
                           "variability_pos_se", "variability_type_se", "semantic_x0_se")
    FIT_REPEATS = 2

    def __init__(self, model: EquivariantDenoiser, atom_histogram: Mapping[int, int],
                 posterior: HeadPosterior | None = None, timesteps: int = 1000,
                 adapter: MoleculeAdapter | None = None) -> None:
        """`adapter`: how to drive `model` (default: genunc's own denoiser's adapter)."""
        super().__init__(adapter or MoleculeAdapter(model, "head", timesteps), posterior)
        counts = {int(k): int(v) for k, v in atom_histogram.items()}
        self.atom_counts = np.array(sorted(counts))
        weights = np.array([counts[k] for k in self.atom_counts], dtype=np.float64)
        self.atom_probs = weights / weights.sum()

    @classmethod
    def _load(cls, path: Path, *, device: str) -> "MoleculeUncertaintyPipeline":
        """A folder written by ``genunc zoo train qm9-edm`` (model, schedule, atom counts), or an
        EDM output folder (:meth:`from_edm`)."""
        if (path / edm_args.ARGS_FILE).is_file():  # an EDM or GeoLDM output folder
            args = edm_args.read_args(path / edm_args.ARGS_FILE)
            if geoldm.is_geoldm_args(args):
                return cls.from_geoldm(path, device=device)
            if not {"n_layers", "nf", "diffusion_steps"} <= set(vars(args)):
                raise GenuncError(f"{path}/args.pickle is neither an EDM nor a GeoLDM training run's "
                                  "options (no n_layers / nf / diffusion_steps / latent_nf)")
            return cls.from_edm(path, device=device)
        histogram = path / ATOM_HISTOGRAM_FILE
        if not histogram.exists():
            raise MissingFileError(f"{path} is neither a genunc model folder (no {ATOM_HISTOGRAM_FILE}) "
                                   "nor an EDM or GeoLDM output folder (no args.pickle)")
        return cls(EquivariantDenoiser.from_pretrained(path, device=device),
                   json.loads(histogram.read_text()), timesteps=read_config(path)["timesteps"])

    @classmethod
    def from_edm(cls, path: str | Path, *, device: str = "cpu") -> "MoleculeUncertaintyPipeline":
        """An EDM output folder (``args.pickle`` + ``generative_model_ema.npy``) as a pipeline.

        Unconditional QM9 checkpoints with hydrogens (EDM's atom types H, C, N, O, F); molecule
        sizes from the folder's ``atom_histogram.json`` if it has one, else EDM's QM9 histogram.
        """
        path = Path(path)
        config = edm_args.read_config(path)
        if config.context_node_nf:
            raise GenuncError(f"{path} is a conditional EDM checkpoint ({list(config.conditioning)}); "
                              "load_edm() loads its network, but the pipeline samples unconditional "
                              "models only (it has no property distribution to draw contexts from)")
        _check_qm9_types(path, config.atom_types)
        model = load_edm(path, device=device)
        layout = PointCloudLayout(len(ATOM_TYPES), ATOMIC_NUMBERS, scales=config.normalize_factors,
                                  charges=config.include_charges)
        adapter = EDMAdapter(model, layout, timesteps=config.diffusion_steps,
                             power=config.schedule_power, precision=config.diffusion_noise_precision)
        return cls(model, _atom_histogram(path), timesteps=config.diffusion_steps, adapter=adapter)

    @classmethod
    def from_geoldm(cls, path: str | Path, *, device: str = "cpu") -> "MoleculeUncertaintyPipeline":
        """A GeoLDM output folder (``args.pickle`` + ``generative_model_ema.npy``) as a pipeline:
        latents sampled by the latent dynamics (EDM's ancestral step), decoded by the VAE; the
        posterior lives in the latent dynamics (:class:`~genunc.adapters.geoldm.GeoLDMAdapter`).

        Unconditional QM9 checkpoints with hydrogens; molecule sizes as for :meth:`from_edm`.
        """
        path = Path(path)
        config, vae_config = geoldm.read_geoldm_configs(path)
        if config.context_node_nf:
            raise GenuncError(f"{path} is a conditional GeoLDM checkpoint ({list(config.conditioning)}); "
                              "load_geoldm() loads its networks, but the pipeline samples "
                              "unconditional models only")
        _check_qm9_types(path, vae_config.atom_types)
        model = geoldm.load_geoldm(path, device=device)
        # GeoLDM's VAE reads and writes molecules unscaled (it ignores normalize_factors)
        molecule = PointCloudLayout(len(ATOM_TYPES), ATOMIC_NUMBERS, scales=(1.0, 1.0, 1.0),
                                    charges=vae_config.include_charges)
        adapter = GeoLDMAdapter(model, LatentLayout(model.vae, config.latent_nf, molecule),
                                trainable_ae=config.trainable_ae, timesteps=config.diffusion_steps,
                                power=config.schedule_power,
                                precision=config.diffusion_noise_precision)
        return cls(model, _atom_histogram(path), timesteps=config.diffusion_steps, adapter=adapter)

    def _masks(self, request: Request, n_atoms: np.ndarray | None) -> Tensor:
        """Atom masks ``(N, W)``; each molecule's size comes from its own stream.

        Every chunk is padded to the same width W (the largest size the model generates), so
        that a molecule's noise, and hence the molecule, does not depend on its chunk.
        """
        if n_atoms is None:
            u = streams.sample_uniforms(request.seed, "atom_counts", request.indices)
            cdf = np.cumsum(self.atom_probs)
            n_atoms = self.atom_counts[np.minimum(np.searchsorted(cdf, u * cdf[-1], side="right"),
                                                  len(cdf) - 1)]
        width = max(int(self.atom_counts.max()), int(np.max(n_atoms)))
        return torch.arange(width)[None, :] < torch.as_tensor(n_atoms)[:, None]

    @torch.no_grad()
    def denoising_loss(self, x0: Tensor, node_mask: Tensor, levels: int = 10,
                       generators: list[torch.Generator] | None = None) -> np.ndarray:
        """Per-molecule diffusion loss of clean samples ``x0``, averaged over ``levels`` noise
        levels (per atom; the noise of molecule i from ``generators[i]``): the model-likelihood
        baseline."""
        b = x0.shape[0]
        if generators is None:
            generators = streams.sample_generators(0, "likelihood_noise", range(b))
        ts = torch.linspace(0, self.adapter.timesteps - 1, levels).round().long().to(x0.device)
        t = ts.repeat_interleave(b)
        mask = node_mask.repeat(levels, 1)
        x0 = x0.repeat(levels, 1, 1)
        noise = randn_rows((levels, *x0.shape[1:]), generators)  # (B, levels, N, F)
        noise = noise.transpose(0, 1).reshape(x0.shape).to(x0.device)
        eps = self.adapter.project(noise, {"node_mask": mask}).to(x0.dtype)
        alpha, sigma = self.adapter.alpha_sigma(t)
        x_t = alpha.to(x0.dtype).view(-1, 1, 1) * x0 + sigma.to(x0.dtype).view(-1, 1, 1) * eps
        err = ((self.adapter.denoise(x_t, t, mask) - eps) ** 2).sum(-1) * mask.to(x0.dtype)
        per_molecule = err.sum(-1) / mask.sum(-1).clamp_min(1)
        return per_molecule.reshape(levels, b).mean(0).double().cpu().numpy()

    def log_p_atoms(self, n_atoms: Tensor | np.ndarray) -> np.ndarray:
        """``log p(N)`` under the atom-count histogram (EDM's ``DistributionNodes``: a size it
        never saw gets ``log 1e-30``)."""
        probs = dict(zip(self.atom_counts.tolist(), self.atom_probs.tolist()))
        return np.log(np.array([probs.get(int(n), 0.0) for n in np.asarray(n_atoms)]) + 1e-30)

    @torch.no_grad()
    def nll_terms(self, x0: Tensor, node_mask: Tensor, levels: int = 10,
                  generators: list[torch.Generator] | None = None) -> dict[str, np.ndarray]:
        """The model's own negative log-likelihood ``-log p(x, h, N)`` of clean molecules ``x0``
        (nats per molecule, ``nll``) and its terms (``atom_count`` is ``-log p(N)``): EDM's
        variational bound (:mod:`genunc.adapters.edm_likelihood`) for EDM checkpoints, GeoLDM's
        (:meth:`GeoLDMAdapter.likelihood_terms <genunc.adapters.geoldm.GeoLDMAdapter.likelihood_terms>`)
        for GeoLDM ones; ``x0`` is what the adapter's ``likelihood_data`` makes of samples.

        The sum over the T steps is estimated at (at most) ``levels`` stratified levels, one per
        run of equal summed step weight, carrying its run's weight
        (:func:`~genunc.adapters.edm_likelihood.stratified_weights`; exact over the steps with
        all T when ``levels >= T``), the same levels for every molecule; molecule i's noise
        (each level's, then the level-0 term's, then any the adapter adds) comes from
        ``generators[i]``.
        """
        if self.adapter.nll_unavailable:
            raise GenuncError(self.adapter.nll_unavailable)
        b = x0.shape[0]
        if generators is None:
            generators = streams.sample_generators(0, "likelihood_noise", range(b))
        t, weights = edm_likelihood.stratified_weights(levels, self.adapter.gamma)
        rows = len(t) + 1 + self.adapter.likelihood_extra_noise
        noise = randn_rows((rows, x0.shape[1], self.adapter.layout.width), generators).to(x0.device)
        terms = self.adapter.likelihood_terms(x0, node_mask, t.expand(b, -1), noise,
                                              weights.expand(b, -1))
        out = {k: v.cpu().numpy() for k, v in terms.items()}
        out["atom_count"] = -self.log_p_atoms(node_mask.sum(1).cpu().numpy())
        out["nll"] = out["nll_xh"] + out["atom_count"]
        return out

    # ------------------------------------------------------------------ runs of a job
    def chunk_call(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """The call that makes molecules `indices` of a run (``generate`` of a config)."""
        g = generate
        return dict(num_samples=len(indices), num_draws=g["num_draws"],
                    num_inference_steps=g["steps"], scores=tuple(g["scores"]),
                    sampler=g["sampler"], variability_steps=g["variability_steps"],
                    x0_steps=g["x0_steps"],
                    variance=g["variance"], variability_target=g["variability_target"],
                    nll_levels=g["nll_levels"], seed=g["seed"], first_sample=indices.start,
                    chunk_size=len(indices), precision=g["precision"], progress=False)

    @torch.no_grad()
    def __call__(self, num_samples: int = 64, *, num_draws: int = 5,
                 num_inference_steps: int = 1000, scores: tuple[str, ...] = ("variability",),
                 sampler: str | None = None, variability_steps: list[int] | None = None,
                 x0_steps: list[int] | None = None, variance: VarianceEstimate = "exact",
                 variability_target: VariabilityTarget = "noise",
                 n_atoms: np.ndarray | None = None, nll_levels: int = 10, seed: int = 0,
                 first_sample: int = 0, chunk_size: int = 64, precision: str = "float32",
                 progress: bool = True, check_only: bool = False) -> MoleculeUncertaintyOutput | None:
        """Generate ``num_samples`` molecules and score them.

        Args:
            num_inference_steps: sampler steps (EDM: 1000; fewer use the scheduler's strided
                timesteps).
            sampler: ``ddpm`` (ancestral, EDM's) or ``ddim`` (deterministic); EDM checkpoints
                also ``edm`` (EDM's own step, their default).  None: the adapter's default.
            variability_steps: indices of the steps at which variability is measured
                (default: all).
            x0_steps: indices of the steps at which ``semantic_x0`` is measured (default:
                :func:`~genunc.pipelines.base.default_x0_steps`): the molecules the MAP
                head and the M draws predict from the MAP's own features there (the
                scheduler's clean-sample rule), by the invariant descriptors of ``semantic``,
                the mean of the per-step entropies; ``semantic_x0_se`` its jackknife error.
            variance: ``exact`` (closed form, no draws) or ``monte_carlo`` (over the M draws).
            variability_target: the variance of the predicted ``noise`` or of the ``clean``
                sample it implies.
            n_atoms: atom count per molecule (default: drawn from the training histogram).
            nll_levels: noise levels averaged by ``denoising_loss`` and by ``nll`` (whose
                stratified levels cover every level when ``nll_levels >= T``).
            seed: the run's seed (every stream of the call is keyed by it).
            first_sample: the global index of the first molecule (molecule ``i`` draws from
                the streams of index ``first_sample + i``).
            precision: the backbone's precision: ``float32``, or ``bfloat16`` / ``float16``
                autocast (the GPU speed-up); head draws, variances, scores and sampler states
                stay in full precision.
            check_only: check the arguments and return None, generating nothing.
        """
        request = self._request(scores, num_draws, seed, check_only, num_samples=num_samples,
                                first_sample=first_sample, variance=variance,
                                variability_target=variability_target, precision=precision,
                                num_inference_steps=num_inference_steps, chunk_size=chunk_size,
                                nll_levels=nll_levels)
        if request.wants("nll") and self.adapter.nll_unavailable:
            raise GenuncError(self.adapter.nll_unavailable)
        if n_atoms is not None and len(n_atoms) != num_samples:
            raise GenuncError(f"n_atoms has {len(n_atoms)} entries for {num_samples} molecules")
        scheduler = self.adapter.make_scheduler(sampler or self.adapter.default_sampler)
        self.check_steps(num_inference_steps, variability_steps=variability_steps)
        clean_steps = self.resolve_x0_steps(x0_steps, num_inference_steps)
        if check_only:
            return None
        masks = self._masks(request, n_atoms)
        layout = self.adapter.layout
        device = self.adapter.device
        head_variance = self._head_variance(request, variance)
        collected = ScoreCollector()
        molecules: list[Molecule] = []
        semantic = request.wants("semantic")
        draw_molecules: list[list[Molecule]] | None = \
            [[] for _ in range(num_draws)] if semantic else None
        for sl in self.chunks(num_samples, chunk_size, "molecules", progress):
            mask = masks[sl].to(device)
            noise = randn_rows((mask.shape[1], layout.width), request.generators("initial_noise", sl))
            x_T = self.adapter.project(noise.to(device), {"node_mask": mask})
            with collected.timer("generation"):
                out = run_trajectory(
                    self.adapter, scheduler, x_T, {"node_mask": mask},
                    num_inference_steps=num_inference_steps,
                    trajectory_draws=request.draws if semantic else None,
                    variability=head_variance, variability_steps=variability_steps,
                    generator=request.generators("sampler_noise", sl), precision=precision,
                    clean_draws=request.draws if request.wants("semantic_x0") else None,
                    clean_steps=clean_steps)
            collected.backbone_rows += out.backbone_rows
            chunk_molecules = layout.decode(out.samples, mask)
            molecules += chunk_molecules
            if out.variability_per_step is not None:
                collected.add_variability(out.variability_per_step, out.variability_timesteps,
                                          self.adapter.alphas_cumprod, variability_target,
                                          out.variability_replicates)
            if semantic:
                generations = [chunk_molecules] + [layout.decode(d, mask) for d in out.draw_samples]
                for m, generation in enumerate(generations[1:]):
                    draw_molecules[m] += generation
                feats = np.stack([features_of(gen) for gen in generations])
                collected.add("semantic", self.semantic_entropy(feats))
            if out.clean_per_step is not None:
                with collected.timer("features"):
                    feats = np.stack([np.stack([
                        features_of(layout.decode(self.adapter.project(x0.to(device),
                                                                       {"node_mask": mask}), mask))
                        for x0 in step]) for step in out.clean_per_step])  # (S, M+1, B, D)
                    collected.add_semantic_x0(feats, self.semantic_entropy)
            if request.wants("denoising_loss"):
                with collected.timer("denoising_loss"):
                    collected.add("denoising_loss", self.denoising_loss(
                        layout.clean(out.samples, mask), mask, nll_levels,
                        request.generators("likelihood_noise", sl)))
            if request.wants("nll"):
                with collected.timer("nll"):
                    collected.add("nll", self.nll_terms(
                        self.adapter.likelihood_data(out.samples, mask), mask, nll_levels,
                        request.generators("likelihood_noise", sl))["nll"])
        return MoleculeUncertaintyOutput(
            **collected.output_fields(request, "generation", "denoising_loss", "nll"),
            molecules=molecules, n_atoms=masks.sum(1).numpy(), draw_molecules=draw_molecules)
