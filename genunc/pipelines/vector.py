"""Generate vectors (actions) for contexts (states) with per-candidate uncertainty scores.

    pipe = VectorUncertaintyPipeline(model, scheduler)          # model(x_t, t, cond) -> eps
    pipe.fit_posterior({"x": actions, "cond": states})          # head posterior, marglik prior
    out = pipe(states, num_candidates=10, num_draws=8)           # out.samples (B, N, D)

For each of the B contexts, N candidate vectors, each its own chain: candidate ``n`` of context
``b`` is sample ``i = b*N + n`` of the call and draws its initial and sampler noise from the
streams of global index ``first_sample + i`` (:mod:`genunc.streams`), so a call split into
chunks or calls gives the same vectors and scores.  All chains of a chunk run as one batch
through the shared diffusers loop (:func:`~genunc.sampling.diffusers_loop.run_trajectory`) on
the given scheduler (clipping is its own ``clip_sample``).

Scores, one per candidate, ``(B, N)`` arrays (lower = more certain):

* ``action_variance``: the spread of the final vector across the posterior: the MAP chain and M
  chains under head draws, each from the MAP chain's initial noise and sampler noise (the M+1
  chains are extra rows of the same backbone call, the M heads one batched op), give M+1 final
  vectors; the score is their total variance, the trace of their sample covariance (the sum
  over the D dimensions of the unbiased variance across the M+1 vectors).  A posterior collapsed
  to its mean gives M+1 identical chains and 0.
* ``action_variance_x0``: the same spread at the cost of one chain: along the MAP chain only, at
  each of the ``x0_steps`` (default: the last step), the clean vector each of the M+1 heads
  predicts from the MAP chain's recorded head input (one batched head op; the scheduler's own
  ``pred_original_sample`` rule), its total variance across them, mean over the steps; with
  ``action_variance_x0_se`` its jackknife error over the draws.  It sees the head's uncertainty
  where the MAP chain goes, not how a draw's chain would depart from it: ``action_variance``
  runs M+1 backbones per step, this none (benchmarks/bench_action_scores.py measures both and
  their rank agreement).
* ``variability``: the exact (closed-form, :meth:`HeadPosterior.output_variance`) variance of
  the predicted noise under the head posterior given the MAP chain's features, summed over the D
  dimensions (the trace, as above) and averaged over the chain's steps; no draws.
  ``variance="monte_carlo"`` estimates it over the M draws instead.
* ``random``: the baseline.

``num_draws=0, scores=()`` is plain generation (the cost baseline): the same vectors for the
same seed as any scored call (to float32 rounding: the scored call's backbone batch is M+1 times
larger, which a BLAS may round differently; bit for bit in the tests).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from genunc._io import atomic_write
from genunc.adapters.vector import VectorDenoiserAdapter
from genunc.errors import (
    ConfigError,
    GenuncError,
    MissingFileError,
    ShapeMismatchError,
    describe,
)
from genunc.pipelines.base import (
    ScoreCollector,
    UncertaintyOutput,
    UncertaintyPipeline,
    VarianceEstimate,
)
from genunc.posterior import HeadPosterior
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.streams import randn_rows
from genunc.zoo.pretrained import CONFIG_FILE, WEIGHTS_FILE, read_config

#: where a vector model folder keeps its scheduler (diffusers' ``save_pretrained`` layout)
SCHEDULER_DIR = "scheduler"


@dataclass
class VectorUncertaintyOutput(UncertaintyOutput):
    """The MAP chains' final vectors plus one ``(B, N)`` array per requested score."""

    samples: Tensor | None = None  # (B, N, D)
    cond: Tensor | None = None  # (B, C), the contexts
    draw_samples: Tensor | None = None  # (M, B, N, D) when kept: the draws' chains' vectors


class VectorUncertaintyPipeline(UncertaintyPipeline):
    """A vector denoiser + its diffusers scheduler + a head posterior.

    Args:
        model: ``model(x_t (B, D), t (B,), cond (B, C)) -> eps (B, D)`` ending in an
            ``nn.Linear`` head.
        scheduler: the diffusers scheduler it was trained with (e.g. ``DDPMScheduler`` with
            ``num_train_timesteps=5`` and ``clip_sample=True``); it makes the fitting pairs
            (its ``alphas_cumprod``) and runs the chains (its ``step``).
        head_name: the head's module name.
        posterior: a fitted :class:`HeadPosterior` (or fit one with :meth:`fit_posterior`).
        cond_dim: the context width C, when the model has no ``cond_dim`` attribute.
    """

    SCORES = {"action_variance": 1, "action_variance_x0": 1, "variability": 0, "random": None}
    EXTRA_SCORE_COLUMNS = ("variability_se", "action_variance_x0_se")

    def __init__(self, model: nn.Module, scheduler: Any, head_name: str = "head",
                 posterior: HeadPosterior | None = None, *, cond_dim: int | None = None) -> None:
        super().__init__(VectorDenoiserAdapter(model, head_name, scheduler=scheduler,
                                               cond_dim=cond_dim), posterior)
        self.scheduler = scheduler

    @property
    def dim(self) -> int:
        """D, the width of the generated vectors."""
        return self.adapter.dim

    # ------------------------------------------------------------------ model folders
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the model folder :meth:`from_pretrained` reads: ``config.json`` (the model's
        class as ``module:Class``, its constructor arguments, the head's name), the weights
        (``model.safetensors``) and the scheduler (``scheduler/``).  The model's arguments come
        from its ``config`` (a dict, or a method returning one)."""
        from safetensors.torch import save_file

        model, directory = self.model, Path(directory)
        arguments = getattr(model, "config", None)
        arguments = arguments() if callable(arguments) else arguments
        if not isinstance(arguments, dict):
            raise GenuncError(f"{type(model).__name__} keeps no constructor arguments (a dict "
                              "or method `config`): it cannot be saved as a model folder")
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(state, str(p)))
        self.scheduler.save_pretrained(directory / SCHEDULER_DIR)
        config = {"model_class": f"{type(model).__module__}:{type(model).__qualname__}",
                  "model": arguments, "head_name": self.adapter.head_name,
                  "cond_dim": self.adapter.cond_dim}
        atomic_write(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")
        return directory

    @classmethod
    def _load(cls, path: Path, *, device: str) -> "VectorUncertaintyPipeline":
        """A folder :meth:`save_pretrained` wrote (the model class is imported by the name the
        folder gives)."""
        from diffusers import DDPMScheduler, SchedulerMixin
        from safetensors.torch import load_file

        config = read_config(path)
        if "model_class" not in config:
            raise MissingFileError(f"{path / CONFIG_FILE} names no model_class: not a vector "
                                   "model folder (VectorUncertaintyPipeline.save_pretrained)")
        model_class = _import_class(config["model_class"], path)
        model = model_class(**config.get("model", {}))
        weights = path / WEIGHTS_FILE
        if not weights.exists():
            raise MissingFileError(f"{path} holds no {WEIGHTS_FILE}")
        model.load_state_dict(load_file(str(weights)))
        scheduler_dir = path / SCHEDULER_DIR
        if not scheduler_dir.is_dir():
            raise MissingFileError(f"{path} holds no {SCHEDULER_DIR}/ folder")
        scheduler_class = json.loads((scheduler_dir / "scheduler_config.json").read_text()) \
            .get("_class_name", "DDPMScheduler")
        import diffusers

        scheduler_cls = getattr(diffusers, scheduler_class, DDPMScheduler)
        if not issubclass(scheduler_cls, SchedulerMixin):
            raise GenuncError(f"{scheduler_dir} names {scheduler_class}, not a diffusers scheduler")
        return cls(model.to(device).eval(), scheduler_cls.from_pretrained(scheduler_dir),
                   head_name=config.get("head_name", "head"), cond_dim=config.get("cond_dim"))

    # ------------------------------------------------------------------ posterior
    def _fit_batches(self, data: Any, batch_size: int) -> Any:
        """A dict ``{"x": (n, D), "cond": (n, C)}`` or an ``(x, cond)`` pair of full tensors
        (cut into batches of `batch_size`), or an iterable of ``(x0, cond)`` batches."""
        if isinstance(data, dict) or (isinstance(data, tuple) and len(data) == 2
                                      and all(isinstance(v, Tensor) for v in data)):
            x, cond = (data["x"], data["cond"]) if isinstance(data, dict) else data
            x, cond = torch.as_tensor(x), torch.as_tensor(cond)
            if len(x) != len(cond):
                raise ShapeMismatchError(f"{len(x)} vectors x but {len(cond)} contexts cond")
            return [(x[i : i + batch_size], cond[i : i + batch_size])
                    for i in range(0, len(x), batch_size)]
        return data

    # ------------------------------------------------------------------ runs of a job
    def prepare_run(self, generate: Mapping[str, Any], source: str) -> None:
        """Read the run's contexts (``generate.contexts``, :func:`read_vectors`) and refuse the
        options vectors do not take."""
        given = [f"generate.{k}" for k in ("sampler", "guidance_scale", "prompts", "score_steps",
                                           "variability_steps") if generate.get(k) is not None]
        given += ["generate.branch_at"] if generate.get("branch_at") else []
        if given:
            raise ConfigError(f"{', '.join(given)} do not apply to vectors ({source} runs its "
                              "scheduler's chain from step 0)")
        if generate.get("contexts") is None:
            raise ConfigError("vector runs need generate.contexts: an .npz whose 'cond' holds the "
                              f"({self.adapter.cond_dim or 'C'}-wide) contexts to generate for")
        self.run_contexts = self.adapter.check_cond(
            read_vectors(generate["contexts"], "cond"), what=f"{generate['contexts']}: cond")

    def chunk_call(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """The call that makes samples `indices` of a run: sample i answers context
        ``(i // candidates) mod len(contexts)``, as the one candidate of its own row (its
        streams are those of index i either way)."""
        g = generate
        rows = self.run_contexts[context_of(indices, g["candidates"], len(self.run_contexts))]
        return dict(cond=rows, num_candidates=1, num_draws=g["num_draws"],
                    num_inference_steps=g["steps"], scores=tuple(g["scores"]),
                    variance=g["variance"], x0_steps=g.get("x0_steps"), seed=g["seed"],
                    first_sample=indices.start,
                    chunk_size=len(indices), progress=False)

    # ------------------------------------------------------------------ generation
    def __call__(
        self,
        cond: Tensor,
        *,
        num_candidates: int = 10,
        num_draws: int = 8,
        num_inference_steps: int | None = None,
        scores: tuple[str, ...] = ("action_variance", "variability"),
        variance: VarianceEstimate = "exact",
        seed: int = 0,
        first_sample: int = 0,
        chunk_size: int = 4096,
        x0_steps: list[int] | None = None,
        keep_draw_samples: bool = False,
        progress: bool = False,
        check_only: bool = False,
    ) -> VectorUncertaintyOutput | None:
        """`num_candidates` vectors for each row of `cond` ``(B, C)``, each scored.

        Args:
            num_draws: posterior head draws M (``action_variance`` runs M+1 chains per
                candidate; exact ``variability`` needs none).
            num_inference_steps: the scheduler's steps (default: all its train timesteps).
            scores: any of ``action_variance``, ``action_variance_x0``, ``variability``,
                ``random``; ``()`` with ``num_draws=0`` is plain generation.
            variance: ``exact`` (closed form) or ``monte_carlo`` (over the M draws, M >= 2).
            seed: the run's seed; with ``first_sample`` it fixes every random stream.
            first_sample: the global index of the call's first candidate (candidate n of
                context b is sample ``first_sample + b*num_candidates + n``).
            chunk_size: candidates per backbone batch (each with its M+1 chains); the result
                does not depend on it.
            x0_steps: the step indices ``action_variance_x0`` reads (default: the last one,
                chosen on validation states of the shipped Hopper agent, where it ranks a
                state's candidates as ``action_variance`` does best; docs/results.md).
            keep_draw_samples: also return the draws' chains' vectors ``(M, B, N, D)``.
            check_only: check the arguments and return None, generating nothing.
        """
        if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) \
                or num_candidates < 1:
            raise GenuncError(f"num_candidates must be a whole number >= 1, got {num_candidates!r}")
        cond = self.adapter.check_cond(cond)
        train_steps = len(self.adapter.alphas_cumprod)
        steps = train_steps if num_inference_steps is None else num_inference_steps
        if isinstance(steps, int) and steps > train_steps:
            raise GenuncError(f"num_inference_steps={steps} exceeds the scheduler's "
                              f"{train_steps} train timesteps")
        b, n = cond.shape[0], cond.shape[0] * num_candidates
        request = self._request(scores, num_draws, seed, check_only, num_samples=n,
                                first_sample=first_sample, variance=variance,
                                num_inference_steps=steps, chunk_size=chunk_size, contexts=b)
        clean_steps = self.resolve_x0_steps([steps - 1] if x0_steps is None else x0_steps, steps)
        if check_only:
            return None
        rows_cond = cond.repeat_interleave(num_candidates, dim=0)  # row b*N + n: context b
        x_T = randn_rows((self.dim,), request.generators("initial_noise")).to(cond)
        chains = request.draws if request.wants("action_variance") else None
        clean_draws = request.draws if request.wants("action_variance_x0") else None
        head_variance = self._head_variance(request, variance)
        collected = ScoreCollector()
        samples, draw_samples = [], []
        for sl in self.chunks(n, chunk_size, "generating", progress):
            with collected.timer("generation"):
                out = run_trajectory(
                    self.adapter, self.scheduler, x_T[sl], {"cond": rows_cond[sl]},
                    num_inference_steps=steps, trajectory_draws=chains,
                    variability=head_variance, generator=request.generators("sampler_noise", sl),
                    clean_draws=clean_draws, clean_steps=clean_steps)
            collected.backbone_rows += out.backbone_rows
            samples.append(out.samples)
            if out.draw_samples is not None:
                draw_samples.append(out.draw_samples)
                finals = torch.cat([out.samples[None], out.draw_samples])  # (M+1, n, D)
                collected.add("action_variance", total_variance(finals.cpu().double().numpy()))
            if out.clean_per_step is not None:
                collected.add_semantic_x0(out.clean_per_step, total_variance,
                                          name="action_variance_x0")
            if out.variability_per_step is not None:
                collected.add_variability(out.variability_per_step, out.variability_timesteps,
                                          self.adapter.alphas_cumprod, "noise",
                                          out.variability_replicates)
        fields = collected.output_fields(request, "generation")
        fields["scores"] = {k: v.reshape(b, num_candidates) for k, v in fields["scores"].items()}
        if fields["variability_per_step"] is not None:
            fields["variability_per_step"] = {
                k: v.reshape(len(v), b, num_candidates)
                for k, v in fields["variability_per_step"].items()}
        if fields["semantic_x0_per_step"] is not None:
            per_step = fields["semantic_x0_per_step"]
            fields["semantic_x0_per_step"] = per_step.reshape(len(per_step), b, num_candidates)
        kept = torch.cat(draw_samples, dim=1) if keep_draw_samples and draw_samples else None
        return VectorUncertaintyOutput(
            **fields, samples=torch.cat(samples).reshape(b, num_candidates, self.dim), cond=cond,
            draw_samples=None if kept is None else kept.reshape(len(kept), b, num_candidates,
                                                                self.dim))


def total_variance(vectors: np.ndarray) -> np.ndarray:
    """``(K, B, D) -> (B,)``: the trace of the sample covariance of K vectors (the sum over D
    of the unbiased variance across K), the spread ``action_variance`` also measures."""
    return np.asarray(vectors, dtype=np.float64).var(axis=0, ddof=1).sum(-1)


def context_of(indices: range, candidates: int, contexts: int) -> Tensor:
    """The context each sample of `indices` answers, ``(i // candidates) mod contexts``."""
    return (torch.arange(indices.start, indices.stop) // candidates) % contexts


def read_vectors(path: str | Path, key: str) -> Tensor:
    """Array `key` of an ``.npz`` file as a float32 tensor (one-line errors otherwise)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"{path} not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            files = list(data.files)
            array = data[key] if key in files else None
    except (OSError, ValueError) as err:
        raise GenuncError(f"{path} is not a readable .npz ({describe(err)})") from None
    if array is None:
        raise ConfigError(f"{path} holds no '{key}' array (it holds {files})")
    if not np.issubdtype(array.dtype, np.number):
        raise ConfigError(f"{path}: '{key}' holds {array.dtype} values, not numbers")
    return torch.from_numpy(np.asarray(array, dtype=np.float32))


def _import_class(spec: str, folder: Path) -> type[nn.Module]:
    """``package.module:Class`` -> the class (a one-line error naming the folder otherwise)."""
    module, _, name = str(spec).partition(":")
    try:
        found = getattr(import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise GenuncError(f"{folder / CONFIG_FILE} names the model class {spec!r}, which cannot "
                          f"be imported ({type(err).__name__}: {err})") from None
    if not (isinstance(found, type) and issubclass(found, nn.Module)):
        raise GenuncError(f"{folder / CONFIG_FILE} names {spec!r}, which is not an nn.Module class")
    return found
