"""Uncertainty scores for the diffusers pipeline the user already has, by running it with hooks.

    pipe = StableDiffusionPipeline.from_pretrained(path)
    upipe = ImageUncertaintyPipeline.from_pipe(pipe, feature_extractor=clip, posterior=post)
    out = upipe(prompt=[...], guidance_scale=7.5, generator=g, num_draws=5)   # out.images, out.scores

genunc never re-implements the pipeline's loop, so every scheduler, guidance rule and option keeps
working, and the returned images are those of ``pipe(...)`` by construction:

* the MAP generation *is* ``pipe(**kwargs)``, with a forward hook on the head that only reads
  the head's input (for the variability score) and a pre-hook on the denoiser that reads the
  timestep;
* posterior draw m is another call of the same pipeline, given a fresh copy of the generator
  state the MAP call started from, with a forward hook that replaces the head's output by the
  head under draw m.  All M+1 generations therefore share the initial latents and every sampler
  noise (DDPM and ancestral samplers included) and differ only by their head; the user's weights
  are never touched.  Under classifier-free guidance both halves of the batch use the same draw.

``semantic_x0`` needs no call beyond the MAP's: the same head hook applies the MAP and the M
draws to the head's input at the chosen denoiser evaluations (``x0_steps``), guides them like the
pipeline, and turns each prediction into the clean sample by the scheduler's own rule at the
denoiser's input; the VAE (where there is one) decodes them after the call.

Variability is the exact predictive variance of the *guided* prediction along the MAP
trajectory: a head affine in its input and linear in its weights maps the guided input
``phi_u + s (phi_c - phi_u)`` to the guided output ``u + s (c - u)``, so its variance is the
posterior's closed form at that input.  Per denoiser evaluation it is averaged over the entries
of the prediction the sampler steps with (epsilon, v, or the flow-matching velocity
``eps - x0``; a learned variance's channels are left out), then averaged over the evaluations.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from genunc import streams
from genunc._seed import as_generator, snapshot
from genunc.adapters.pipeline import DiffusersPipelineAdapter
from genunc.errors import ConfigError, GenuncError, ShapeMismatchError
from genunc.features import FeatureExtractor
from genunc.pipelines.base import (
    ScoreCollector,
    UncertaintyPipeline,
    VarianceEstimate,
)
from genunc.pipelines.image import ImageUncertaintyOutput, ImageUncertaintyPipeline
from genunc.posterior import HeadPosterior, Posterior, TailPosterior
from genunc.posterior.capture import capture_head
from genunc.posterior.heads import check_finite, head_ops_for
from genunc.posterior.observe import under_draw
from genunc.posterior.variance import MonteCarloTailVariance, MonteCarloVariance
from genunc.sampling.clean import predicted_clean
from genunc.scores import VariabilityTarget


@dataclass
class PipelineUncertaintyOutput(ImageUncertaintyOutput):
    """The pipeline's own output plus one score array per requested score (lower = keep).

    ``images`` are exactly what the pipeline returned, in its ``output_type``; ``draw_images``
    the M perturbed generations' images, when kept.  Attributes the pipeline's output has
    (``nsfw_content_detected``, ...) are read through.
    """

    images: Any = None
    pipeline_output: Any = None
    draw_images: Any = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name == "pipeline_output":
            raise AttributeError(name)
        try:
            return getattr(self.pipeline_output, name)
        except AttributeError:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}") from None


class WrappedImagePipeline(ImageUncertaintyPipeline):
    """A user's diffusers pipeline with a head posterior: the member of the image family that
    runs the pipeline's own loop (build it with :meth:`ImageUncertaintyPipeline.from_pipe`).

    Args:
        pipe: any diffusers pipeline with a ``unet`` or ``transformer`` whose head genunc knows
            (``conv_out`` of UNets; ``proj_out`` / ``proj_out_2`` of PixArt, SD3 and DiT).
        posterior: a posterior fitted on that head (refused otherwise), or fit one with
            :meth:`fit_posterior`.
        feature_extractor: images ``(B, C, H, W)`` in [-1, 1] -> features, for the semantic score.
        head_name: the head module inside the denoiser, where the default does not apply.
    """

    def __init__(self, pipe: Any, posterior: HeadPosterior | None = None,
                 feature_extractor: FeatureExtractor | None = None,
                 head_name: str | None = None) -> None:
        UncertaintyPipeline.__init__(self, DiffusersPipelineAdapter(pipe, head_name), posterior)
        self.feature_extractor = feature_extractor

    @property
    def pipe(self) -> Any:
        return self.adapter.pipe

    # ------------------------------------------------------------------ runs of a job
    def prepare_run(self, generate: Mapping[str, Any], source: str) -> None:
        """Take a run's options (``generate`` of a config): refuse those of genunc's own loop,
        swap in ``generate.sampler`` (a diffusers scheduler class, from the pipeline's
        scheduler config), silence the pipeline's own progress bar."""
        bad = [f"generate.{k}" for k, default in _OWN_LOOP_ONLY.items() if generate[k] != default]
        if bad:
            raise ConfigError(f"{', '.join(bad)} need genunc's own sampling loop (pixel DDPM/DDIM "
                              f"folders); {source} runs its own loop")
        if generate["precision"] != "float32":
            raise ConfigError("generate.precision applies to genunc's own loop; load a wrapped "
                              "pipeline in the dtype you want instead")
        if generate["sampler"]:
            self.pipe.scheduler = _scheduler(generate["sampler"], self.pipe.scheduler.config)
        self.pipe.set_progress_bar_config(disable=True)

    def chunk_call(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """The call that makes samples `indices` of a run: one generator per sample from its
        own initial-noise stream, the samples' conditions by global index, and the scores."""
        g = generate
        args: dict[str, Any] = dict(
            num_inference_steps=g["steps"], output_type="pt", num_draws=g["num_draws"],
            scores=tuple(g["scores"]), seed=g["seed"], first_sample=indices.start,
            variance=g["variance"], variability_target=g["variability_target"],
            x0_steps=g["x0_steps"], progress=False,
            generator=streams.sample_generators(g["seed"], "initial_noise", indices),
            **self._conditions(g, indices))
        if g["guidance_scale"] is not None:
            args["guidance_scale"] = g["guidance_scale"]
        return args

    def chunk_images(self, out: PipelineUncertaintyOutput, generate: Mapping[str, Any],
                     indices: range) -> tuple[Tensor, Tensor | None, list[Any]]:
        """A chunk's images in [-1, 1], class labels (None: unconditioned) and conditions
        (the class, or the prompt)."""
        call = self._conditions(generate, indices)
        labels = call.get("class_labels")
        labels = None if labels is None else torch.as_tensor(labels)
        condition = call.get("prompt", [None] * len(indices)) if labels is None \
            else labels.tolist()
        return _image_tensor(out.images, "pt"), labels, condition

    def _conditions(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """What samples `indices` are conditioned on: ``class_labels`` (``i mod classes``), a
        ``prompt`` list (``i mod len(prompts)``), or, unconditioned, ``batch_size``."""
        accepts = inspect.signature(type(self.pipe).__call__).parameters
        if "class_labels" in accepts:
            # the classes the pipeline names (DiT's id2label), else its label embedding's size
            named = set((getattr(self.pipe, "labels", None) or {}).values())
            classes = len(named) or int(self.adapter.model.config.get("num_embeds_ada_norm")
                                        or 1000)
            return {"class_labels": [i % classes for i in indices]}
        if "prompt" in accepts:
            prompts = generate["prompts"]
            if not prompts:
                raise ConfigError(f"{type(self.pipe).__name__} is text-conditioned: give "
                                  "generate.prompts (a list; sample i gets prompt i mod len)")
            return {"prompt": [prompts[i % len(prompts)] for i in indices]}
        return {"batch_size": len(indices)}

    # ------------------------------------------------------------------ generation
    def __call__(self, *args: Any, num_draws: int = 5,
                 scores: Sequence[str] = ("semantic", "variability"), seed: int = 0,
                 variance: VarianceEstimate = "exact",
                 variability_target: VariabilityTarget = "noise",
                 x0_steps: list[int] | None = None, first_sample: int = 0,
                 keep_draw_images: bool = False, progress: bool = True, check_only: bool = False,
                 **kwargs: Any) -> PipelineUncertaintyOutput | None:
        """Run ``pipe(*args, **kwargs)`` and score every image it returns.

        Args:
            num_draws: posterior head draws M (semantic and pixel variance use the M+1
                generations; the exact variability needs none, the Monte-Carlo one M >= 2).
            scores: any of ``semantic``, ``semantic_x0``, ``variability``,
                ``pixel_variance``, ``random``.
            seed: fixes the head draws and the random baseline; without a ``generator`` in
                `kwargs` it also fixes the pipeline's noise (genunc's initial-noise stream).
            variance: the variability's estimator: ``exact`` (closed form, diagonal posterior)
                or ``monte_carlo`` (sample variance of the M draws' guided predictions, any
                posterior structure; its jackknife standard error is reported as
                ``variability_se``).
            variability_target: the variance of the prediction the sampler steps with
                (``noise``: epsilon, v or velocity) or of the clean sample it implies
                (``clean``; :meth:`DiffusersPipelineAdapter.clean_factors`).
            x0_steps: the denoiser evaluations (indices, one per call of the denoiser) at which
                ``semantic_x0`` is measured (default:
                :func:`~genunc.pipelines.base.default_x0_steps` of the scheduler's
                number of timesteps).
            first_sample: the global index of the first image (keys the random baseline; pass
                per-image generators from :func:`genunc.streams.sample_generators` for noise
                that does not depend on the batch).
            keep_draw_images: also return the M perturbed generations' images.
            progress: show a bar over the posterior draws (the pipeline keeps its own bar;
                ``pipe.set_progress_bar_config(disable=True)`` silences it).
            check_only: check genunc's arguments and return None without generating.
            kwargs: the pipeline's own arguments, passed through unchanged.
        """
        request = self._request(scores, num_draws, seed, check_only, num_samples=1,
                                first_sample=first_sample, variance=variance,
                                variability_target=variability_target)
        self.check_feature_extractor(request)
        if request.wants("variability"):
            self._check_variability(kwargs, variance)
        if request.wants("semantic_x0"):
            self._check_clean(kwargs)
        if check_only:
            return None
        estimator = self._head_variance(request, variance)
        if isinstance(estimator, MonteCarloTailVariance):
            estimator = MonteCarloTailVariance(self.adapter, request.perturbed,
                                               combine=self._guidance_rule(kwargs, always=True))
        elif isinstance(estimator, MonteCarloVariance):
            estimator = MonteCarloVariance(self.adapter, request.perturbed,
                                           jackknife=len(request.perturbed) >= 3,
                                           combine=self._guidance_rule(kwargs))
        generator = kwargs.pop("generator", None)
        if generator is None:
            generator = streams.torch_generator(request.seed, "initial_noise")
        start = snapshot(generator)

        collected = ScoreCollector()
        steps: list[tuple[float, Tensor]] = []
        clean = _CleanRecord(request.draws, x0_steps) if request.wants("semantic_x0") else None
        with collected.timer("generation"), self._observe(steps, kwargs, estimator, clean):
            output = self.pipe(*args, generator=generator, **kwargs)
        images = _images(output)
        generations = [images]
        if request.wants("semantic", "pixel_variance"):
            draws = request.perturbed
            with collected.timer("draws"):
                for m in tqdm(range(len(draws)), desc="posterior draws", leave=False,
                              disable=not progress):
                    with under_draw(self.adapter.head, draws[m]):
                        generations.append(_images(self.pipe(*args, generator=snapshot(start),
                                                             **kwargs)))
        as_tensors = [_image_tensor(g, kwargs.get("output_type")) for g in generations]
        request.num_samples = as_tensors[0].shape[0]
        if steps:
            self._add_variability(collected, request, steps, variability_target)
        if clean is not None:
            self._add_clean(collected, request, clean, kwargs.get("output_type"))
        if len(as_tensors) > 1:
            self.add_generation_scores(collected, request, torch.stack(as_tensors))
        return PipelineUncertaintyOutput(
            **collected.output_fields(request, "generation", "draws", "features"),
            images=images, pipeline_output=output,
            draw_images=generations[1:] if keep_draw_images else None)

    def _add_variability(self, collected: ScoreCollector, request: Any,
                         steps: list[tuple[float, Tensor]], target: VariabilityTarget) -> None:
        """Per-evaluation values ``(1 [+ M], B)`` (the variance, then its leave-one-draw-out
        replicates) -> the score, and its jackknife standard error where replicates exist."""
        per_step = torch.stack([values for _, values in steps])  # (S, 1 [+ M], B)
        if per_step.shape[-1] != request.num_samples:
            raise ShapeMismatchError(f"the head saw {per_step.shape[-1]} samples per step but "
                                     f"the pipeline returned {request.num_samples} images")
        timesteps = torch.tensor([t for t, _ in steps], dtype=torch.float64)
        factors = self.adapter.clean_factors(timesteps) if target == "clean" else None
        replicates = {"variability": per_step[:, 1:]} if per_step.shape[1] > 1 else None
        collected.add_variability({"variability": per_step[:, 0]}, timesteps, torch.zeros(0),
                                  target, replicates=replicates, clean_factors=factors)

    def _add_clean(self, collected: ScoreCollector, request: Any, clean: "_CleanRecord",
                   output_type: str | None) -> None:
        """``semantic_x0`` from the clean samples recorded during the MAP call, decoded by the
        pipeline's VAE (not for ``output_type="latent"``, whose images are latents)."""
        if not clean.values:
            raise GenuncError(f"x0_steps {clean.steps} named no denoiser evaluation of this call "
                              f"({clean.calls} evaluations)")
        predictions = torch.stack(clean.values)  # (S, M+1, B, C, H, W)
        if predictions.shape[2] != request.num_samples:
            raise ShapeMismatchError(f"the head saw {predictions.shape[2]} samples per step but "
                                     f"the pipeline returned {request.num_samples} images")
        vae = getattr(self.pipe, "vae", None)
        decode = None if vae is None or output_type == "latent" else _decoder(vae)
        self.add_clean_scores(collected, predictions, decode)

    def _check_clean(self, kwargs: dict[str, Any]) -> None:
        """Options under which the clean-sample prediction is not the head at the recorded
        input, and posteriors the one-trajectory score does not cover."""
        if self.adapter.fourier:
            raise GenuncError("this UNet divides the head's output by the timestep (Fourier time "
                              "embedding); genunc's semantic_x0 does not cover it")
        if kwargs.get("skip_guidance_layers"):
            raise GenuncError("skip_guidance_layers adds a third denoiser call per step that "
                              "semantic_x0 does not follow; leave it out")

    def _check_variability(self, kwargs: dict[str, Any], variance: VarianceEstimate) -> None:
        """Options under which the guided prediction is no longer the head at one input."""
        if variance == "exact" and self.posterior is not None and self.posterior.structure != "diag":
            raise GenuncError(f"the exact variability needs the diagonal posterior, not "
                              f"{self.posterior.structure!r}: use variance='monte_carlo'")
        if self.adapter.fourier:
            raise GenuncError("this UNet divides the head's output by the timestep (Fourier time "
                              "embedding); genunc's variability does not cover it")
        if kwargs.get("guidance_rescale") and variance != "monte_carlo":
            raise GenuncError("guidance_rescale makes the guided prediction nonlinear in the "
                              "head's output: the closed form does not apply; use "
                              "variance='monte_carlo'")
        if kwargs.get("skip_guidance_layers"):
            raise GenuncError("skip_guidance_layers adds a third denoiser call per step that "
                              "genunc's variability does not follow; leave it out or drop "
                              "'variability' from scores")

    def _guidance_rule(self, kwargs: dict[str, Any], always: bool = False) -> Any:
        """The map from the draws' outputs on the whole (guided) batch to each draw's guided
        prediction, for what the guided-features shortcut cannot cover: ``guidance_rescale``
        (not affine in the head's output) and tail posteriors (not affine in the block's
        input); None where the shortcut applies.  Scales are read during the call."""
        if not (always or kwargs.get("guidance_rescale")):
            return None
        adapter = self.adapter

        def combine(outputs: Tensor) -> Tensor:
            scale = adapter.guidance(kwargs)
            if scale is None:
                return outputs
            return adapter.rescaled_guidance(outputs, scale, adapter.guidance_rescale(kwargs))

        combine.guides = True  # type: ignore[attr-defined]  # it wants both halves of the batch
        return combine

    @contextmanager
    def _observe(self, steps: list[tuple[float, Tensor]], kwargs: dict[str, Any],
                 estimator: Any, clean: "_CleanRecord | None" = None) -> Iterator[None]:
        """Record, per denoiser evaluation, the timestep and the guided prediction's variance
        per sample (``(1 [+ M], B)``: with a Monte-Carlo estimator, its leave-one-draw-out
        replicates follow), and at `clean`'s evaluations the clean samples the MAP and the
        draws predict; the head's output is left as it is."""
        if estimator is None and clean is None:
            yield
            return
        adapter = self.adapter
        tail = next((t for t in (getattr(estimator, "tail", None),
                                 getattr(getattr(clean, "draws", None), "tail", None))
                     if t is not None), None)
        guides = getattr(getattr(estimator, "combine", None), "guides", False)
        now: dict[str, Any] = {"calls": 0}
        with ExitStack() as stack:
            recorder = None if tail is None else stack.enter_context(tail.capture())

            def timestep(module: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
                t = kw.get("timestep", args[1] if len(args) > 1 else None)
                now["t"] = float(torch.as_tensor(t).reshape(-1)[0]) if t is not None else float("nan")
                now["x"] = next((kw[k] for k in ("sample", "hidden_states") if k in kw),
                                args[0] if args else None)
                now["calls"] += 1
                if recorder is not None:
                    recorder.reset()

            def head(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
                if tail is not None and tail.rerunning:
                    return  # the estimator's own re-run of the block
                phi = args[0].detach().float()
                if clean is not None:
                    clean.record(self, now, phi if tail is None else
                                 tail.inputs_of(recorder, phi.shape[0]), kwargs)
                if estimator is None:
                    return
                if tail is not None:
                    features = tail.inputs_of(recorder, phi.shape[0])
                else:
                    features = phi if guides else \
                        adapter.guided_features(phi, adapter.guidance(kwargs))
                variances = estimator(features, {})
                variances = variances if getattr(estimator, "replicates", False) else variances[None]
                reduced = torch.stack([adapter.reduce_variance(v, {})["variability"]
                                       for v in variances])
                steps.append((now.get("t", float("nan")), reduced.cpu()))

            for handle in (adapter.model.register_forward_pre_hook(timestep, with_kwargs=True),
                           adapter.head.register_forward_hook(head)):
                stack.callback(handle.remove)
            yield

    # ------------------------------------------------------------------ posterior
    def fit_posterior(self, images: Tensor | tuple[Tensor, Any], *,
                      prompts: Sequence[str] | None = None,
                      class_labels: Tensor | Sequence[int] | None = None,
                      conditioning: dict[str, Any] | None = None, batch_size: int = 16,
                      repeats: int | None = None, max_rows: int | None = None, seed: int = 0,
                      progress: bool = True, **fit_kwargs: Any) -> HeadPosterior:
        """Fit the head posterior on clean `images` ``(N, C, H, W)`` in [-1, 1] (or an
        ``(images, class_labels | prompts)`` pair, the form genunc's jobs read).

        The images are encoded with the pipeline's VAE (where it has one), captions embedded
        with its own text encoders, and each batch is noised `repeats` times at random training
        timesteps of its scheduler.  ``conditioning``: the denoiser's own keyword arguments,
        one row per image, for pipelines whose prompts genunc cannot embed.  ``max_rows``
        stops collecting once that many head rows are held (a Conv2d head's row is a whole
        sample's feature map; a Linear head's, one token).
        ``fit_kwargs`` go to :meth:`HeadPosterior.fit_features`.
        """
        if isinstance(images, tuple) and len(images) == 2:
            images, labels = images
            if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
                prompts = list(labels) if prompts is None else prompts
            elif class_labels is None:
                class_labels = labels
        tail = fit_kwargs.pop("tail", None)
        fit_kwargs.pop("noise_groups", None)  # an image denoiser's output is one group
        adapter = self.adapter
        generator = as_generator(seed)
        repeats = self.FIT_REPEATS if repeats is None else repeats
        batches = self._clean_batches(images, prompts, class_labels, conditioning, batch_size,
                                      generator)
        if tail is not None:
            return self._fit_tail(tail, batches, repeats, max_rows, generator, progress,
                                  fit_kwargs)
        n = images.shape[0]
        features, targets = [], []
        residual, count = 0.0, 0
        ops = head_ops_for(adapter.head)
        was_training = adapter.model.training
        adapter.model.eval()
        try:
            with torch.no_grad():
                for batch in tqdm(batches, total=-(-n // batch_size),
                                  desc="collecting head features", disable=not progress):
                    if max_rows is not None and sum(map(len, features)) >= max_rows:
                        break  # large heads: stop collecting, not just truncate afterwards
                    for _ in range(repeats):
                        pairs = adapter.training_pairs(batch, generator)
                        with capture_head(adapter.head, keep_output=True) as record:
                            output = adapter.denoise(**pairs.inputs).float()
                        phi = record.require_single_call(adapter.head_name)
                        _check_layout(adapter, output, record.output)
                        target = pairs.target.to(output)
                        residual += float((output[:, : adapter.prediction_channels] - target)
                                          .double().square().sum())
                        count += target.numel()
                        features.append(ops.to_rows(phi, None).float().cpu())
                        targets.append(ops.target_rows(adapter.head_targets(target, output), None,
                                                       "regression").float().cpu())
        finally:
            adapter.model.train(was_training)
        feats, targs = torch.cat(features), torch.cat(targets)
        if max_rows is not None:
            feats, targs = feats[:max_rows], targs[:max_rows]
        check_finite(feats, "head features")
        if adapter.learned_sigma and fit_kwargs.get("sigma_noise", "mle") == "mle":
            fit_kwargs["sigma_noise"] = max(float(np.sqrt(residual / count)), 1e-6)
        self.posterior = HeadPosterior.fit_features(
            adapter.head, (feats, targs), likelihood="regression", head_name=adapter.head_name,
            progress=progress, **fit_kwargs)
        return self.posterior

    def _clean_batches(self, images: Tensor, prompts: Sequence[str] | None,
                       class_labels: Tensor | Sequence[int] | None,
                       conditioning: dict[str, Any] | None, batch_size: int,
                       generator: torch.Generator) -> Iterator[dict[str, Any]]:
        """``{"x": what the denoiser diffuses, **conditioning}`` per batch of clean images."""
        adapter = self.adapter
        for start in range(0, images.shape[0], batch_size):
            part = slice(start, start + batch_size)
            rows = images[part].shape[0]
            with torch.no_grad():  # never around the yield: the consumer's grad mode is its own
                cond = (_rows(conditioning, part) if conditioning is not None else
                        adapter.conditioning(rows, None if prompts is None else prompts[part],
                                             None if class_labels is None else class_labels[part]))
                batch = {"x": adapter.encode(images[part], generator), **cond}
            yield batch

    def _fit_tail(self, tail: int | Sequence[str], batches: Iterator[dict[str, Any]],
                  repeats: int, max_rows: int | None, generator: torch.Generator, progress: bool,
                  fit_kwargs: dict[str, Any]) -> TailPosterior:
        """A tail posterior, over the blocks that end at the head (UNet denoisers: the last up-blocks
        and ``conv_norm_out`` / ``conv_act`` / ``conv_out``), fitted on the same noisy pairs."""
        adapter = self.adapter
        if not isinstance(adapter.head, nn.Conv2d):
            raise GenuncError(f"a tail posterior through from_pipe covers UNet denoisers; "
                              f"{type(adapter.model).__name__}'s layers after its last block do "
                              "not form a chain (fit the head)")
        self.posterior = Posterior.fit(adapter, batches, tail=tail, repeats=repeats,
                                       max_rows=max_rows, seed=generator, progress=progress,
                                       noise_groups=False, **fit_kwargs)
        return self.posterior


# ---------------------------------------------------------------------- helpers
class _CleanRecord:
    """``semantic_x0``'s record during the MAP call: at each chosen denoiser evaluation, the
    clean samples ``(M+1, B, C, H, W)`` the MAP head and the M draws predict (guided like the
    pipeline, by the scheduler's own rule at the denoiser's input), on the CPU."""

    def __init__(self, draws: Any, x0_steps: Sequence[int] | None) -> None:
        self.draws, self.requested = draws, x0_steps
        self.steps: list[int] | None = None
        self.values: list[Tensor] = []
        self.calls = 0

    def record(self, owner: WrappedImagePipeline, now: Mapping[str, Any], features: Any,
               kwargs: Mapping[str, Any]) -> None:
        adapter, scheduler = owner.adapter, owner.pipe.scheduler
        self.calls = index = now["calls"]
        if self.steps is None:  # the evaluations, once the pipeline has set its timesteps
            self.steps = owner.resolve_x0_steps(self.requested, len(scheduler.timesteps))
        if index - 1 not in self.steps:
            return
        x = now["x"]
        if not isinstance(x, Tensor):
            raise GenuncError("semantic_x0 reads the denoiser's input: the pipeline must pass it "
                              "as its first argument, `sample` or `hidden_states`")
        outputs = self.draws.to(x.device).apply(features)  # (M+1, rows, head layout)
        guided = adapter.guided_prediction(outputs, adapter.guidance(kwargs),
                                           adapter.guidance_rescale(kwargs))
        rows = guided.shape[1]
        sample = x[:rows].detach()  # a guided batch repeats the sample in both halves
        prediction = adapter.from_head_layout(guided, *sample.shape[-2:])
        prediction = prediction[:, :, : adapter.prediction_channels]
        self.values.append(predicted_clean(scheduler, prediction.float(), sample,
                                           now["t"]).cpu())


def _decoder(vae: nn.Module) -> Any:
    """Latents -> images in [-1, 1], as diffusers' latent pipelines decode them
    (``vae.decode(latents / scaling_factor + shift_factor)``)."""
    param = next(vae.parameters())
    scaling = float(vae.config.scaling_factor)
    shift = float(vae.config.get("shift_factor") or 0.0)

    def decode(latents: Tensor) -> Tensor:
        with torch.no_grad():
            z = (latents / scaling + shift).to(param.device, param.dtype)
            return vae.decode(z).sample.float().cpu()

    return decode


def _images(output: Any) -> Any:
    """The images of a pipeline output (``return_dict=False`` gives a tuple, images first)."""
    if isinstance(output, tuple):
        return output[0]
    images = getattr(output, "images", None)
    if images is None:
        raise GenuncError(f"{type(output).__name__} has no `images`: genunc scores image pipelines")
    return images


#: options of genunc's own loop that a wrapped pipeline (its own loop) cannot honour
_OWN_LOOP_ONLY = {"branch_at": 0, "score_steps": None, "variability_steps": None}


def _scheduler(name: str, config: Any) -> Any:
    """A diffusers scheduler class by name, built from the pipeline's scheduler config."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ConfigError(f"generate.sampler {name!r} is not a diffusers scheduler class "
                          "(e.g. DDIMScheduler, DPMSolverMultistepScheduler)")
    return cls.from_config(config)


def _image_tensor(images: Any, output_type: str | None) -> Tensor:
    """A pipeline's images as ``(N, C, H, W)`` float in [-1, 1] (latents as they are), the form
    genunc's feature extractors take."""
    if isinstance(images, Tensor):
        return images.float() if output_type == "latent" else images.float() * 2 - 1
    if isinstance(images, list):  # PIL images
        images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in images])
        if images.ndim == 3:
            images = images[..., None]
    array = torch.from_numpy(np.asarray(images, dtype=np.float32))
    return array.permute(0, 3, 1, 2) * 2 - 1


def _rows(value: Any, part: slice) -> Any:
    """One batch's rows of conditioning keywords (tensors and nested dicts of them)."""
    if isinstance(value, Tensor):
        return value[part]
    if isinstance(value, dict):
        return {k: _rows(v, part) for k, v in value.items()}
    return value


def _check_layout(adapter: DiffusersPipelineAdapter, output: Tensor, head_output: Tensor) -> None:
    """The model's output must be the head's, rearranged: otherwise the targets would be put
    where the head does not produce them (a model that changes the output after the head)."""
    mapped = adapter.to_head_layout(output)
    if mapped.shape != head_output.shape or not torch.allclose(
            mapped, head_output.float(), rtol=1e-4, atol=1e-5 * float(mapped.abs().max()) + 1e-6):
        raise GenuncError(f"{type(adapter.model).__name__} changes the output of "
                          f"'{adapter.head_name}' after it; genunc cannot fit targets to that head")
