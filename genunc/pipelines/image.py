"""Generate images with per-sample uncertainty from a diffusers UNet, in about three lines.

    pipe = ImageUncertaintyPipeline.from_pretrained("path/to/ddpm")   # diffusers folder
    pipe.fit_posterior(train_images)                                   # or a saved posterior
    out = pipe(num_samples=64, num_draws=5, seed=0)                    # out.images, out.scores

or wrap a diffusers pipeline you already have (its own loop, scheduler and options):

    upipe = ImageUncertaintyPipeline.from_pipe(pipe, posterior=post, feature_extractor=clip)
    out = upipe(prompt=prompts, generator=g, num_draws=5)              # what pipe(...) returns
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from genunc.adapters.image import DiffusersImageAdapter
from genunc.errors import ConfigError, GenuncError, MissingFileError, ShapeMismatchError
from genunc.features import FeatureExtractor
from genunc.pipelines.base import (
    ScoreCollector,
    UncertaintyOutput,
    UncertaintyPipeline,
    VarianceEstimate,
    load_diffusers_folder,
)
from genunc.pipelines.image_scores import ImageScoring
from genunc.posterior import HeadPosterior, TailPosterior
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.scores import VariabilityTarget
from genunc.streams import randn_rows

#: pipeline folders genunc's own loop runs (late branching, fewer score steps); others are wrapped
OWN_LOOP = ("DDPMPipeline", "DDIMPipeline")


@dataclass
class ImageUncertaintyOutput(UncertaintyOutput):
    """Images from the MAP model plus one score array per requested score (lower = keep)."""

    images: Tensor | None = None  # (N, C, H, W) in the model's range
    class_labels: Tensor | None = None
    draw_images: Tensor | None = None  # (M, N, C, H, W) when kept


class ImageUncertaintyPipeline(ImageScoring, UncertaintyPipeline):
    """A diffusers UNet + scheduler with a head posterior and uncertainty scores.

    Args:
        unet: ``UNet2DModel`` or ``UNet2DConditionModel``.
        scheduler: the training scheduler (its ``add_noise`` makes fitting pairs).
        posterior: a fitted :class:`HeadPosterior` (or fit one with :meth:`fit_posterior`).
        feature_extractor: images -> features for the semantic score.
        sampling_scheduler: scheduler used for generation; default DDIM (eta = 0, deterministic)
            built from the training scheduler's config, as in the paper.
    """

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Any,
        posterior: HeadPosterior | TailPosterior | None = None,
        feature_extractor: FeatureExtractor | None = None,
        sampling_scheduler: Any | None = None,
    ) -> None:
        super().__init__(DiffusersImageAdapter(unet, scheduler), posterior)
        self.feature_extractor = feature_extractor
        if sampling_scheduler is None:
            from diffusers import DDIMScheduler

            sampling_scheduler = DDIMScheduler.from_config(scheduler.config)
        self.sampling_scheduler = sampling_scheduler

    @property
    def unet(self) -> nn.Module:
        return self.adapter.model

    # ------------------------------------------------------------------ construction
    @classmethod
    def _load(cls, path: Path, *, device: str, feature_extractor: FeatureExtractor | None = None
              ) -> "ImageUncertaintyPipeline":
        """A pixel UNet + scheduler saved by diffusers (a DDPM/DDIM pipeline folder or one
        model folder) runs in genunc's own loop; any other pipeline folder (latent, guided,
        transformer, flow matching: ``model_index.json`` names its class) is loaded with
        diffusers' ``DiffusionPipeline.from_pretrained`` and wrapped (:meth:`from_pipe`)."""
        from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

        index = path / "model_index.json"
        if index.exists() and json.loads(index.read_text()).get("_class_name") not in OWN_LOOP:
            return cls.from_pipe(load_diffusers_folder(path, device),
                                 feature_extractor=feature_extractor)
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
        if not (unet_dir / "config.json").exists():
            raise MissingFileError(f"no diffusers UNet config in {unet_dir}")
        cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
        unet_cls = UNet2DConditionModel if cls_name == "UNet2DConditionModel" else UNet2DModel
        unet = unet_cls.from_pretrained(unet_dir, low_cpu_mem_usage=False).to(device).eval()
        return ImageUncertaintyPipeline(unet, DDPMScheduler.from_pretrained(sched_dir),
                                        feature_extractor=feature_extractor)

    @classmethod
    def from_pipe(cls, pipe: Any, *, posterior: HeadPosterior | TailPosterior | None = None,
                  feature_extractor: FeatureExtractor | None = None,
                  head_name: str | None = None) -> "ImageUncertaintyPipeline":
        """Wrap a diffusers pipeline the user already has (any scheduler, guidance, options):
        ``from_pipe(pipe)(prompt=..., num_draws=5)`` returns what ``pipe(prompt=...)`` returns,
        plus scores.  The result is a member of this family,
        :class:`~genunc.pipelines.wrapped.WrappedImagePipeline`."""
        from genunc.pipelines.wrapped import WrappedImagePipeline  # the family's wrapped member

        return WrappedImagePipeline(pipe, posterior=posterior, feature_extractor=feature_extractor,
                                    head_name=head_name)

    def _fit_batches(self, data: Any, batch_size: int) -> Any:
        """A tensor of images, an ``(images, labels)`` pair, or an iterable of batches."""
        if isinstance(data, Tensor):
            return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
        if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            x, y = data
            return [{"x": x[i : i + batch_size], "class_labels": y[i : i + batch_size]}
                    for i in range(0, len(x), batch_size)]
        return data

    # ------------------------------------------------------------------ runs of a job
    def prepare_run(self, generate: Mapping[str, Any], source: str) -> None:
        """Refuse the options of a run (``generate`` of a config) that only a wrapped
        diffusers pipeline honours: genunc's own loop samples DDIM, unguided."""
        given = [f"generate.{k}" for k in ("sampler", "guidance_scale", "prompts")
                 if generate[k] is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to diffusers pipeline folders only; "
                              f"{source} runs in genunc's own loop (DDIM, unguided)")

    def chunk_call(self, generate: Mapping[str, Any], indices: range) -> dict[str, Any]:
        """The call that makes samples `indices` of a run (class i mod classes)."""
        g, n_classes = generate, self.adapter.num_classes
        n = len(indices)
        labels = None if n_classes is None else torch.arange(indices.start, indices.stop) % n_classes
        return dict(num_samples=n, class_labels=labels, num_draws=g["num_draws"],
                    num_inference_steps=g["steps"], scores=tuple(g["scores"]),
                    branch_at=g["branch_at"], score_steps=g["score_steps"],
                    variability_steps=g["variability_steps"], variance=g["variance"],
                    variability_target=g["variability_target"], x0_steps=g["x0_steps"],
                    seed=g["seed"],
                    first_sample=indices.start, chunk_size=n, precision=g["precision"],
                    progress=False)

    def chunk_images(self, out: ImageUncertaintyOutput, generate: Mapping[str, Any],
                     indices: range) -> tuple[Tensor, Tensor | None, list[Any]]:
        """A chunk's images in [-1, 1], class labels (None: unconditioned) and conditions."""
        labels = out.class_labels
        return out.images, labels, [None] * len(indices) if labels is None else labels.tolist()

    # ------------------------------------------------------------------ generation
    def __call__(
        self,
        num_samples: int = 16,
        *,
        class_labels: Tensor | list[int] | None = None,
        encoder_hidden_states: Tensor | None = None,
        num_draws: int = 5,
        num_inference_steps: int = 50,
        scores: tuple[str, ...] = ("semantic", "variability", "pixel_variance"),
        branch_at: int = 0,
        score_steps: int | None = None,
        variability_steps: list[int] | None = None,
        variance: VarianceEstimate = "exact",
        variability_target: VariabilityTarget = "noise",
        x0_steps: list[int] | None = None,
        precision: str = "float32",
        seed: int = 0,
        first_sample: int = 0,
        chunk_size: int = 64,
        keep_draw_images: bool = False,
        progress: bool = True,
        check_only: bool = False,
    ) -> ImageUncertaintyOutput | None:
        """Generate `num_samples` images and score each one.

        Args:
            num_draws: posterior head draws M (the semantic score uses the MAP + M generations).
            scores: any of ``semantic``, ``semantic_x0``, ``variability``,
                ``pixel_variance``, ``random``.
            branch_at: perturbed trajectories share the MAP's first `branch_at` steps.
            score_steps: compute the semantic and pixel-variance scores from a cheaper run of
                the MAP and the M draws with this many steps (from the same ``x_T``); the
                returned images still take ``num_inference_steps``.
            variability_steps: the step indices variability is measured at (default: all).
            variance: ``exact`` (closed form, no draws) or ``monte_carlo`` (over the M draws).
            variability_target: the variance of the predicted ``noise`` or of the ``clean``
                sample it implies.
            x0_steps: the step indices ``semantic_x0`` is measured at (default:
                :func:`~genunc.pipelines.base.default_x0_steps`).
            encoder_hidden_states: per-sample ``(N, L, D)`` conditioning for
                ``UNet2DConditionModel`` (e.g. text-encoder outputs).
            seed: the run's seed; with ``first_sample`` it fixes every random stream.
            first_sample: global index of the first sample: sample ``i`` draws its initial and
                sampler noise from the streams of index ``first_sample + i``, so a run split
                into calls gives the samples of one call.
            precision: the backbone's precision: ``float32``, or ``bfloat16`` / ``float16``
                autocast (the GPU speed-up); head draws, variances, scores and sampler states
                stay in full precision.
            check_only: check the arguments and return None, generating nothing.
        """
        request = self._request(scores, num_draws, seed, check_only, num_samples=num_samples,
                                first_sample=first_sample, variance=variance,
                                variability_target=variability_target, precision=precision,
                                num_inference_steps=num_inference_steps, chunk_size=chunk_size,
                                score_steps=score_steps)
        self.check_feature_extractor(request)
        if score_steps is not None and branch_at:
            raise GenuncError("score_steps runs the scoring generations from x_T; it cannot be "
                              "combined with branch_at")
        self.check_steps(num_inference_steps, branch_at, variability_steps)
        clean_steps = self.resolve_x0_steps(x0_steps, num_inference_steps)
        labels = self._labels(num_samples, class_labels)
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != num_samples:
            raise ShapeMismatchError(
                f"encoder_hidden_states must have {num_samples} rows, got "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        if check_only:
            return None
        device = self.adapter.device
        x_T = randn_rows(self.adapter.sample_shape, request.generators("initial_noise"))
        # the trajectory mode, decided here once: the draws' own trajectories run with the MAP's
        # (branching off it after `branch_at` steps), or in a run of their own with `score_steps`
        generations = request.wants("semantic", "pixel_variance")
        with_map = request.draws if generations and score_steps is None else None
        scoring_run = request.draws if generations and score_steps is not None else None
        head_variance = self._head_variance(request, variance)
        clean_draws = request.draws if request.wants("semantic_x0") else None

        collected = ScoreCollector()
        images, draw_images, scoring_maps = [], [], []
        for sl in self.chunks(num_samples, chunk_size, "generating", progress):
            cond = {"class_labels": labels[sl].to(device)} if labels is not None else {}
            if encoder_hidden_states is not None:
                cond["encoder_hidden_states"] = encoder_hidden_states[sl].to(device)
            with collected.timer("generation"):
                out = run_trajectory(
                    self.adapter, self.sampling_scheduler, x_T[sl].to(device), cond,
                    num_inference_steps=num_inference_steps, trajectory_draws=with_map,
                    branch_at=branch_at, variability=head_variance,
                    variability_steps=variability_steps,
                    generator=request.generators("sampler_noise", sl), precision=precision,
                    clean_draws=clean_draws, clean_steps=clean_steps)
                collected.backbone_rows += out.backbone_rows
                chunk_draws = out.draw_samples
                if scoring_run is not None:
                    side = run_trajectory(
                        self.adapter, self.sampling_scheduler, x_T[sl].to(device), cond,
                        num_inference_steps=score_steps, trajectory_draws=scoring_run,
                        generator=request.generators("sampler_noise", sl), precision=precision)
                    collected.backbone_rows += side.backbone_rows
                    chunk_draws = side.draw_samples
                    scoring_maps.append(side.samples.cpu())
            images.append(out.samples.cpu())
            if out.clean_per_step is not None:
                self.add_clean_scores(collected, out.clean_per_step)
            if chunk_draws is not None:
                draw_images.append(chunk_draws.cpu())
            if out.variability_per_step is not None:
                collected.add_variability(out.variability_per_step, out.variability_timesteps,
                                          self.adapter.alphas_cumprod, variability_target,
                                          out.variability_replicates)

        images_t = torch.cat(images)
        draws_t = torch.cat(draw_images, dim=1) if draw_images else None
        if draws_t is not None:
            scored_map = torch.cat(scoring_maps) if scoring_maps else images_t
            # (M+1, N, ...), MAP first
            self.add_generation_scores(collected, request, torch.cat([scored_map[None], draws_t]))
        return ImageUncertaintyOutput(
            **collected.output_fields(request, "generation", "features"),
            images=images_t, class_labels=labels,
            draw_images=draws_t if keep_draw_images else None,
        )

    def _labels(self, n: int, class_labels: Tensor | list[int] | None) -> Tensor | None:
        n_classes = self.adapter.num_classes
        if class_labels is None:
            return None if n_classes is None else torch.arange(n) % n_classes
        labels = torch.as_tensor(class_labels, dtype=torch.long)
        if labels.shape != (n,):
            raise ShapeMismatchError(f"class_labels must have shape ({n},), got {tuple(labels.shape)}")
        if n_classes is None:
            raise GenuncError("this UNet is unconditional; do not pass class_labels")
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise GenuncError(f"class labels must lie in [0, {n_classes})")
        return labels
