"""What every uncertainty pipeline shares, whatever it generates.

A pipeline is an adapter (how to call the denoiser) plus a head posterior plus a generation
loop.  This base owns everything that does not depend on the modality, so the three pipelines
cannot drift apart again:

* the score catalogue and the one rule for draws: a score needs a posterior when it uses the
  head posterior, at least one draw when it compares the MAP generation with perturbed ones
  (semantic, pixel variance, the posterior-averaged confidence), and at least two when it is a
  variance or a disagreement *across* draws (Monte-Carlo variability, mutual information);
  the exact variability needs the posterior but no draws;
* the random streams (:mod:`genunc.streams`): sample ``i`` of a call with ``first_sample = f``
  draws its initial noise, sampler noise and baselines from the streams of global index
  ``f + i``, and the head draws come from the run's one head-draw stream, so a run split into
  calls (chunks, processes) gives the same samples and scores as one call;
* argument checks, drawing the head draws (MAP first), the semantic entropy, the random
  baseline, and collecting per-chunk parts into one score array per score;
* fitting, loading and saving the posterior, with one persistence policy;
* one set of argument names: ``num_samples``, ``num_draws``, ``num_inference_steps``,
  ``scores``, ``seed``, ``chunk_size``, ``progress``.

A modality supplies its own ``__call__`` (what a chunk of generation is), ``_load`` (how its
model folder is read) and ``_fit_batches`` (what clean data looks like).
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from tqdm.auto import tqdm

from genunc import streams
from genunc.adapters.base import DenoiserAdapter
from genunc.errors import GenuncError, MissingFileError, describe
from genunc.posterior import POSTERIOR_DIR, HeadDraws, HeadPosterior, Posterior
from genunc.posterior.io import remove_saved
from genunc.posterior.laplace_tail import TailPosterior
from genunc.posterior.variance import ExactVariance, MonteCarloTailVariance, MonteCarloVariance
from genunc.sampling.diffusers_loop import HeadVariance
from genunc.sampling.precision import PRECISIONS
from genunc.scores import (
    VARIABILITY_TARGETS,
    VariabilityTarget,
    feature_scale,
    gaussian_entropy,
    random_scores,
    variability_score,
)
from genunc.scores.semantic import mean_step_entropy

#: score name -> the fewest head draws it needs (None: no posterior at all; 0: the posterior
#: but no draws)
ScoreCatalogue = Mapping[str, int | None]

#: where ``semantic_x0`` is measured by default, as fractions of the trajectory (step index
#: ``round(f * (steps - 1))``): steps 10 and 15 of 50, between the steps the validation seeds of
#: the two digits models chose (pixel DDPM: steps 5-10, validation AUROC 0.60; latent DiT:
#: step 15, 0.75; the last steps carry no signal; docs/results.md, images)
X0_FRACTIONS: tuple[float, ...] = (0.2, 0.3)


def default_x0_steps(num_steps: int) -> list[int]:
    """The step indices ``semantic_x0`` is measured at by default in a trajectory of
    `num_steps` denoiser evaluations (:data:`X0_FRACTIONS`)."""
    return sorted({round(f * (num_steps - 1)) for f in X0_FRACTIONS})


#: how the variability score estimates the head-output variance
VarianceEstimate = Literal["exact", "monte_carlo"]
VARIANCE_ESTIMATES: tuple[str, ...] = ("exact", "monte_carlo")


@dataclass
class UncertaintyOutput:
    """What every pipeline returns: one array per requested score (lower = more certain)."""

    scores: dict[str, np.ndarray]
    seed: int
    num_draws: int
    backbone_rows: int = 0  # sample-steps through the backbone, all trajectories together
    timings: dict[str, float] = field(default_factory=dict)
    #: with the variability score: name -> ``(S, N)`` per-step values, and the timestep of each
    #: row, so that other step windows and targets can be evaluated without generating again
    variability_per_step: dict[str, np.ndarray] | None = None
    variability_timesteps: np.ndarray | None = None
    #: with semantic_x0 (vectors: action_variance_x0): ``(S, N)`` its value at each of the
    #: ``x0_steps`` (the score is the mean), so that other steps can be evaluated without
    #: generating again
    semantic_x0_per_step: np.ndarray | None = None


@dataclass
class Request:
    """A checked call: the scores to compute and the head draws they use (MAP first)."""

    scores: tuple[str, ...]
    num_draws: int
    seed: int
    draws: HeadDraws | None  # M+1 parameter sets, draw 0 = the posterior mean; None: none needed
    first_sample: int = 0
    num_samples: int = 0

    def wants(self, *names: str) -> bool:
        return any(name in self.scores for name in names)

    @property
    def indices(self) -> range:
        """The global indices of this call's samples (what their random streams are keyed by)."""
        return range(self.first_sample, self.first_sample + self.num_samples)

    def generators(self, purpose: str, part: slice | None = None) -> list[torch.Generator]:
        """One generator per sample (of `part` of the call) for a per-sample purpose."""
        indices = self.indices if part is None else self.indices[part]
        return streams.sample_generators(self.seed, purpose, indices)

    @property
    def perturbed(self) -> HeadDraws | None:
        """The M posterior draws without the MAP."""
        return None if self.draws is None else self.draws[1:]


class ScoreCollector:
    """Per-chunk score parts, timings and backbone rows, joined once at the end of a call."""

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {}
        self.per_step: dict[str, list[np.ndarray]] = {}
        self.x0_per_step: list[np.ndarray] = []
        self.timesteps: np.ndarray | None = None
        self.timings: dict[str, float] = {}
        self.backbone_rows = 0

    def add(self, name: str, values: np.ndarray | Tensor) -> None:
        array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
        self.parts.setdefault(name, []).append(array)

    def add_variability(self, per_step: Mapping[str, Tensor], timesteps: Tensor,
                        alphas_cumprod: Tensor, target: VariabilityTarget,
                        replicates: Mapping[str, Tensor] | None = None,
                        clean_factors: Tensor | None = None) -> None:
        """One chunk's per-step variability ``name -> (S, B)``: kept, and reduced to scores.

        ``replicates`` (name -> ``(S, M, B)`` leave-one-draw-out per-step values, from a
        Monte-Carlo variance) add ``<name>_se``: the jackknife standard error of the score.
        ``clean_factors``: see :func:`~genunc.scores.variability_score`.
        """
        self.timesteps = timesteps.cpu().numpy()
        for name, values in per_step.items():
            values = values.detach().double().cpu().numpy()
            self.per_step.setdefault(name, []).append(values)
            self.add(name, variability_score(values, timesteps, alphas_cumprod, target,
                                             clean_factors=clean_factors))
        for name, reps in (replicates or {}).items():
            reps = reps.detach().double().cpu().numpy()
            m = reps.shape[1]
            loo = np.stack([variability_score(reps[:, i], timesteps, alphas_cumprod, target,
                                              clean_factors=clean_factors) for i in range(m)])
            self.add(f"{name}_se", np.sqrt((m - 1) / m * ((loo - loo.mean(0)) ** 2).sum(0)))

    def add_semantic_x0(self, features: np.ndarray | Tensor,
                        entropy: Callable[[np.ndarray], np.ndarray],
                        name: str = "semantic_x0") -> None:
        """One chunk's ``semantic_x0`` from the ``(S, M+1, B, D)`` features of the clean samples
        the MAP (first) and the M draws predict at each of S steps: the score, its jackknife
        error (M >= 2; :func:`~genunc.scores.semantic.mean_step_entropy`) and the per-step
        entropies (the output's ``semantic_x0_per_step``).  `name`: the score's name (vectors'
        spread of the predicted vectors is ``action_variance_x0``)."""
        score, se = mean_step_entropy(features, entropy)
        self.add(name, score)
        if se is not None:
            self.add(f"{name}_se", se)
        feats = features.detach().cpu().double().numpy() if isinstance(features, Tensor) \
            else np.asarray(features, dtype=np.float64)
        self.x0_per_step.append(np.stack([entropy(step) for step in feats]))

    def variability(self) -> dict[str, np.ndarray] | None:
        return {k: np.concatenate(v, axis=1) for k, v in self.per_step.items()} or None

    def output_fields(self, request: Request, *timing_names: str) -> dict[str, Any]:
        """What every pipeline's output holds: scores, seed, draws, cost, per-step variability
        (`timing_names`: timings reported as 0 when nothing was spent on them)."""
        return dict(scores=self.scores(request), seed=request.seed, num_draws=request.num_draws,
                    backbone_rows=self.backbone_rows,
                    timings={**dict.fromkeys(timing_names, 0.0), **self.timings},
                    variability_per_step=self.variability(), variability_timesteps=self.timesteps,
                    semantic_x0_per_step=np.concatenate(self.x0_per_step, axis=1)
                    if self.x0_per_step else None)

    @contextmanager
    def timer(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def scores(self, request: Request) -> dict[str, np.ndarray]:
        result = {name: np.concatenate(values) for name, values in self.parts.items()}
        if request.wants("random"):
            result["random"] = random_scores(request.seed, request.indices)
        return result


def load_diffusers_folder(path: Path, device: str) -> Any:
    """A diffusers pipeline folder (``model_index.json``), loaded by diffusers'
    ``DiffusionPipeline.from_pretrained``.  diffusers 0.42 leaves unloaded every component that
    its pipeline's ``__init__`` gives a default (``LLaDA2Pipeline``'s tokenizer): such a
    component, where the folder holds it, is loaded here by the class the index names."""
    import importlib
    import inspect
    import json

    import diffusers

    index = json.loads((path / "model_index.json").read_text())
    pipeline_class = getattr(diffusers, str(index.get("_class_name")), None)
    parameters = inspect.signature(pipeline_class.__init__).parameters if pipeline_class else {}
    components = {}
    for name, entry in index.items():
        parameter = parameters.get(name)
        if (parameter is None or parameter.default is inspect.Parameter.empty
                or not isinstance(entry, list) or None in entry or not (path / name).is_dir()):
            continue
        library, class_name = entry
        components[name] = getattr(importlib.import_module(library), class_name).from_pretrained(
            path / name)
    return diffusers.DiffusionPipeline.from_pretrained(path, **components).to(device)


#: what libraries raise on a truncated, empty or torn checkpoint or config (diffusers, torch,
#: safetensors, json): turned into one line naming the folder by ``from_pretrained``
_DAMAGED: tuple[type[BaseException], ...] = (OSError, ValueError, RuntimeError, EOFError,
                                              KeyError, pickle.UnpicklingError,
                                              SafetensorError)


class UncertaintyPipeline:
    """Base of the image, molecule and text pipelines (see the module docstring)."""

    #: every score this pipeline computes, with the fewest head draws it needs
    SCORES: ClassVar[ScoreCatalogue] = {"random": None}
    #: columns some scores add beside their own (e.g. the parts of a variability score)
    EXTRA_SCORE_COLUMNS: ClassVar[tuple[str, ...]] = ()
    #: how often each clean example is noised when fitting the posterior
    FIT_REPEATS: ClassVar[int] = 1

    def __init__(self, adapter: DenoiserAdapter,
                 posterior: HeadPosterior | TailPosterior | None = None) -> None:
        self.adapter = adapter
        self._posterior: HeadPosterior | TailPosterior | None = None
        self.posterior = posterior
        #: per-dimension unit of the semantic score's features (see :meth:`set_feature_scale`)
        self.feature_scale: np.ndarray | None = None

    @property
    def model(self) -> nn.Module:
        return self.adapter.model

    @property
    def posterior(self) -> HeadPosterior | TailPosterior | None:
        return self._posterior

    @posterior.setter
    def posterior(self, posterior: HeadPosterior | TailPosterior | None) -> None:
        """Attach a posterior, refusing one fitted on a different head."""
        if posterior is not None:
            posterior.check_matches(self.model)
        self._posterior = posterior

    @classmethod
    def score_columns(cls) -> tuple[str, ...]:
        """Every score column an export of this pipeline can hold."""
        return (*cls.SCORES, *cls.EXTRA_SCORE_COLUMNS)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], *,
                        posterior: HeadPosterior | str | os.PathLike[str] | None = "auto",
                        device: str = "cpu", **kwargs: Any) -> "UncertaintyPipeline":
        """Load a model folder; ``posterior="auto"`` also loads ``<path>/genunc_posterior`` when
        one was saved there, a path loads that posterior, ``None`` loads none."""
        path = Path(path)
        if not path.is_dir():
            raise MissingFileError(f"model folder {path} does not exist")
        try:
            pipe = cls._load(path, device=device, **kwargs)
        except GenuncError:
            raise
        except _DAMAGED as err:
            raise GenuncError(f"the model folder {path} is damaged or incomplete ({describe(err)}); "
                              "save or copy it again") from err
        if posterior == "auto":
            pipe.posterior = Posterior.load(path / POSTERIOR_DIR, pipe.model, missing="none")
        elif isinstance(posterior, (str, os.PathLike)):
            pipe.posterior = Posterior.load(posterior, pipe.model)
        else:
            pipe.posterior = posterior
        return pipe

    @classmethod
    def _load(cls, path: Path, *, device: str, **kwargs: Any) -> "UncertaintyPipeline":
        raise GenuncError(f"{cls.__name__} cannot load model folders; build it from a model "
                          "object instead")

    # ------------------------------------------------------------------ posterior
    def _fit_batches(self, data: Any, batch_size: int) -> Any:
        """Clean data as the batches the adapter's ``training_pairs`` takes (default: as given)."""
        return data

    def fit_posterior(self, data: Any, *, batch_size: int = 64, repeats: int | None = None,
                      seed: int = 0, progress: bool = True, tail: int | list[str] | None = None,
                      **fit_kwargs: Any) -> HeadPosterior | TailPosterior:
        """Fit the head posterior on clean data (see each pipeline for the forms it accepts).

        ``tail``: a tail posterior instead of the head alone: the last `tail` blocks
        (:func:`~genunc.posterior.default_tail`) or the tail's module names
        (:class:`TailPosterior`; its variability is Monte Carlo).
        ``fit_kwargs`` go to :meth:`HeadPosterior.fit_features` (structure, prior_precision, ...)
        or :meth:`TailPosterior.fit_data` (also ``curvature``, ``mc_samples``).
        """
        self.posterior = Posterior.fit(
            self.adapter, self._fit_batches(data, batch_size), tail=tail,
            repeats=self.FIT_REPEATS if repeats is None else repeats, seed=seed,
            progress=progress, **fit_kwargs)
        return self.posterior

    def load_or_fit_posterior(self, directory: str | os.PathLike[str], data: Any = None, *,
                              stale: Literal["error", "refit"] = "error",
                              **fit_kwargs: Any) -> HeadPosterior | TailPosterior | None:
        """The one persistence policy: use the posterior saved in `directory`; where none was
        saved, fit one on `data` and save it there (no `data`: leave the pipeline without one).

        ``stale`` says what to do with a posterior saved for other weights (the model was
        retrained): ``"error"`` refuses it (exports and CLI jobs, where silently refitting would
        change results), ``"refit"`` fits anew over it (scripts that merely cache a fit).
        """
        saved = Posterior.load(directory, self.model, missing="none",
                           stale="none" if stale == "refit" else "error")
        wanted = "tail" if fit_kwargs.get("tail") is not None else "head"
        if saved is not None and data is not None and saved.kind != wanted:
            if stale == "error":
                raise GenuncError(f"{directory} holds a posterior over the {saved.kind}"
                                  f", not over the {wanted} "
                                  "asked for; fit it again (genunc fit) or use another folder")
            saved = None  # refit: the other kind is replaced below
        if saved is not None or data is None:
            self.posterior = saved
            return saved
        posterior = self.fit_posterior(data, **fit_kwargs)
        remove_saved(directory)
        posterior.save(directory)
        return posterior

    # ------------------------------------------------------------------ runs of a job
    def prepare_run(self, generate: Mapping[str, Any], source: str) -> None:
        """Take (or refuse) the options of a run, the ``generate`` section of a config, once
        before its first chunk (`source`: the model, for messages)."""

    def chunk_call(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """The call that makes samples `indices` of a run (consecutive global indices)."""
        raise GenuncError(f"{type(self).__name__} does not say how a job calls it (chunk_call)")

    # ------------------------------------------------------------------ the chunk loop
    @staticmethod
    def chunks(n: int, chunk_size: int, what: str, progress: bool = True) -> Iterator[slice]:
        """The one loop over a call's samples: consecutive slices of at most `chunk_size`,
        with a progress bar over `what`.  Every stream is keyed by the global sample index,
        so the slicing never changes a result."""
        for start in tqdm(range(0, n, chunk_size), desc=what, disable=not progress):
            yield slice(start, min(start + chunk_size, n))

    # ------------------------------------------------------------------ calls
    def _check_scores(self, scores: tuple[str, ...] | list[str]) -> tuple[str, ...]:
        """Score names this pipeline computes, as a tuple (a one-line error otherwise)."""
        if isinstance(scores, str):
            raise GenuncError(f"scores must be a list of names, got the string {scores!r}")
        scores = tuple(scores)
        unknown = [s for s in scores if s not in self.SCORES]
        if unknown:
            raise GenuncError(f"unknown scores {unknown}; {type(self).__name__} computes "
                              f"{list(self.SCORES)}")
        return scores

    @staticmethod
    def _check_draws(minimum: Mapping[str, int | None], num_draws: int) -> tuple[list[str], int]:
        """The scores that read the posterior and the fewest draws they need, refusing a
        `num_draws` below it (`minimum`: score -> its fewest draws, None without a posterior)."""
        uses_posterior = sorted(s for s, m in minimum.items() if m is not None)
        needed = max((m for m in minimum.values() if m is not None), default=0)
        if num_draws < needed:
            which = sorted(s for s, m in minimum.items() if m is not None and m > num_draws)
            raise GenuncError(f"{which} need num_draws >= {needed}, got {num_draws}")
        return uses_posterior, needed

    def _request(self, scores: tuple[str, ...] | list[str], num_draws: int, seed: int,
                 check_only: bool = False, *, num_samples: int, first_sample: int = 0,
                 variance: VarianceEstimate = "exact",
                 variability_target: VariabilityTarget = "noise",
                 precision: str = "float32",
                 **counts: int | None) -> Request:
        """Check a call's arguments and draw the head draws its scores need.

        ``counts`` are further positive integers to check by name (``num_inference_steps=50``).
        ``check_only``: the arguments alone (a posterior may still be fitted before the call).
        ``variance``: how ``variability`` is estimated (exact: no draws; Monte Carlo: two);
        ``variability_target``: the variance of the predicted noise or of the clean sample;
        ``precision``: the backbone's (:mod:`genunc.sampling.precision`).
        """
        scores = self._check_scores(scores)
        for name, value in {"num_samples": num_samples, **counts}.items():
            if value is not None and value < 1:
                raise GenuncError(f"{name} must be at least 1, got {value}")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise GenuncError(f"seed must be a non-negative integer, got {seed!r}")
        if first_sample < 0:
            raise GenuncError(f"first_sample must be >= 0, got {first_sample}")
        if variance not in VARIANCE_ESTIMATES:
            raise GenuncError(f"variance must be one of {VARIANCE_ESTIMATES}, got {variance!r}")
        if variability_target not in VARIABILITY_TARGETS:
            raise GenuncError(f"variability_target must be one of {VARIABILITY_TARGETS}, got "
                              f"{variability_target!r}")
        if precision not in PRECISIONS:
            raise GenuncError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
        if precision != "float32" and not getattr(self.model, "supports_autocast", True):
            raise GenuncError(f"{type(self.model).__name__} cannot run under autocast "
                              f"(precision={precision!r}); use float32, or cast the model itself")
        minimum = {s: self.SCORES[s] for s in scores}
        if "variability" in minimum and variance == "monte_carlo":  # a variance over draws;
            # a tail posterior's always comes with its jackknife error (MonteCarloTailVariance)
            minimum["variability"] = 3 if getattr(self.posterior, "kind", None) == "tail" else 2
        uses_posterior, needed = self._check_draws(minimum, num_draws)
        request = Request(scores, num_draws, int(seed), None, first_sample, num_samples)
        if check_only or not uses_posterior:
            return request
        if self.posterior is None:
            raise GenuncError(f"no posterior, and {uses_posterior} need one: call "
                              "fit_posterior(...) or load one first")
        if needed > 0:
            # one head-draw stream per run, keyed by no sample: every chunk shares the draws
            generator = streams.torch_generator(int(seed), "head_draws",
                                                device=self.posterior.mean.device)
            request.draws = self.posterior.sample(num_draws, seed=generator, with_map=True)
        return request

    def _head_variance(self, request: Request, variance: VarianceEstimate) -> HeadVariance | None:
        """The variability score's variance estimator, or None when it was not asked for."""
        if not request.wants("variability"):
            return None
        if self.posterior.kind == "tail":
            if variance != "monte_carlo":
                raise GenuncError("a tail posterior has no closed-form output variance (its "
                                  "weights pass through nonlinearities): use "
                                  "variance='monte_carlo'")
            return MonteCarloTailVariance(self.adapter, request.perturbed)
        if variance == "monte_carlo":
            return MonteCarloVariance(self.adapter, request.perturbed)
        return ExactVariance(self.adapter, self.posterior)

    @staticmethod
    def check_steps(num_inference_steps: int, branch_at: int = 0,
                    variability_steps: list[int] | None = None) -> None:
        """Step indices must lie inside the trajectory (checked before anything runs)."""
        if not 0 <= branch_at <= num_inference_steps:
            raise GenuncError(f"branch_at must lie in [0, {num_inference_steps}], got {branch_at}")
        bad = [i for i in variability_steps or () if not 0 <= i < num_inference_steps]
        if bad:
            raise GenuncError(f"variability_steps {bad} lie outside the {num_inference_steps} "
                              f"steps (indices 0 to {num_inference_steps - 1})")

    @staticmethod
    def resolve_x0_steps(x0_steps: Sequence[int] | None, num_steps: int) -> list[int]:
        """The step indices ``semantic_x0`` reads (default :func:`default_x0_steps`), checked."""
        if x0_steps is None:
            return default_x0_steps(num_steps)
        steps = sorted({int(i) for i in x0_steps})
        bad = [i for i in steps if not 0 <= i < num_steps]
        if not steps or bad:
            raise GenuncError(f"x0_steps must name steps of the trajectory (indices 0 to "
                              f"{num_steps - 1}); got {list(x0_steps)}")
        return steps

    def set_feature_scale(self, real_features: Tensor | np.ndarray | None) -> np.ndarray | None:
        """Measure the semantic score's spread in units of real data's per-dimension SD
        (features of real samples, ``(N, D)``); None: raw extractor units."""
        self.feature_scale = None if real_features is None else feature_scale(real_features)
        return self.feature_scale

    def semantic_entropy(self, features: Tensor | np.ndarray) -> np.ndarray:
        """Jazbec et al.'s score from ``(M+1, B, D)`` features of the MAP and M generations, in
        the units :meth:`set_feature_scale` chose (floor: 1e-3 of that unit squared)."""
        return gaussian_entropy(features, scale=self.feature_scale)
