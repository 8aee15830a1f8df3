"""Generate images with per-sample uncertainty from a diffusers UNet, in about three lines.

    pipe = ImageUncertaintyPipeline.from_pretrained("path/to/ddpm")   # diffusers folder
    pipe.fit_posterior(train_images)                                   # or a saved posterior
    out = pipe(num_samples=64, num_draws=5, seed=0)                    # out.images, out.scores
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from genunc.adapters.image import DiffusersImageAdapter
from genunc.errors import GenuncError, ShapeMismatchError
from genunc.features import FeatureExtractor, extract_in_batches
from genunc.posterior.laplace_head import POSTERIOR_DIR, HeadPosterior
from genunc.sampling.diffusers_loop import run_trajectory
from genunc.scores import aggregate_variability, gaussian_entropy, pixel_variance, random_scores

SCORES = ("semantic", "variability", "pixel_variance", "random")


@dataclass
class ImageUncertaintyOutput:
    """Images from the MAP model plus one score array per requested score (lower = keep)."""

    images: Tensor  # (N, C, H, W) in the model's range
    scores: dict[str, np.ndarray]
    class_labels: Tensor | None
    seed: int
    draw_images: Tensor | None = None  # (M, N, C, H, W) when kept
    timings: dict[str, float] = field(default_factory=dict)
    backbone_rows: int = 0  # sample-steps through the backbone, all trajectories together


class ImageUncertaintyPipeline:
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
        posterior: HeadPosterior | None = None,
        feature_extractor: FeatureExtractor | None = None,
        sampling_scheduler: Any | None = None,
    ) -> None:
        self.adapter = DiffusersImageAdapter(unet, scheduler)
        self._posterior: HeadPosterior | None = None
        self.posterior = posterior
        self.feature_extractor = feature_extractor
        if sampling_scheduler is None:
            from diffusers import DDIMScheduler

            sampling_scheduler = DDIMScheduler.from_config(scheduler.config)
        self.sampling_scheduler = sampling_scheduler

    @property
    def unet(self) -> nn.Module:
        return self.adapter.model

    @property
    def posterior(self) -> HeadPosterior | None:
        return self._posterior

    @posterior.setter
    def posterior(self, posterior: HeadPosterior | None) -> None:
        """Attach a posterior, refusing one fitted on a different head."""
        if posterior is not None:
            posterior.check_matches(self.unet)
        self._posterior = posterior

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        feature_extractor: FeatureExtractor | None = None,
        posterior: HeadPosterior | str | Path | None = "auto",
        device: str | torch.device = "cpu",
    ) -> "ImageUncertaintyPipeline":
        """Load a UNet + scheduler saved by diffusers (a pipeline folder or one model folder).

        ``posterior="auto"`` loads ``<path>/genunc_posterior`` when present.
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel, UNet2DModel

        path = Path(path)
        unet_dir = path / "unet" if (path / "unet").is_dir() else path
        sched_dir = path / "scheduler" if (path / "scheduler").is_dir() else path
        if not (unet_dir / "config.json").exists():
            raise FileNotFoundError(f"no diffusers UNet config in {unet_dir}")
        import json

        cls_name = json.loads((unet_dir / "config.json").read_text()).get("_class_name")
        unet_cls = UNet2DConditionModel if cls_name == "UNet2DConditionModel" else UNet2DModel
        unet = unet_cls.from_pretrained(unet_dir, low_cpu_mem_usage=False).to(device).eval()
        scheduler = DDPMScheduler.from_pretrained(sched_dir)
        pipe = cls(unet, scheduler, feature_extractor=feature_extractor)
        if posterior == "auto":
            pipe.posterior = HeadPosterior.load_saved(path / POSTERIOR_DIR, unet)
        elif isinstance(posterior, (str, Path)):
            pipe.posterior = HeadPosterior.load(posterior, unet)
        elif posterior is not None:
            pipe.posterior = posterior
        return pipe

    def fit_posterior(self, data: Any, *, batch_size: int = 64, repeats: int = 4,
                      seed: int = 0, progress: bool = True, **kwargs: Any) -> HeadPosterior:
        """Fit the head posterior on clean images (tensor, (images, labels) or batch iterable)."""
        batches = _batches(data, batch_size)
        self.posterior = HeadPosterior.fit(
            self.adapter, batches, repeats=repeats, seed=seed, progress=progress, **kwargs
        )
        return self.posterior

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
        draw_steps: int | None = None,
        variability_steps: list[int] | None = None,
        seed: int = 0,
        chunk_size: int = 64,
        keep_draw_images: bool = False,
        progress: bool = True,
    ) -> ImageUncertaintyOutput:
        """Generate `num_samples` images and score each one.

        Args:
            num_draws: posterior head draws M (the semantic score uses the MAP + M generations).
            scores: any of ``semantic``, ``variability``, ``pixel_variance``, ``random``.
            branch_at: perturbed trajectories share the MAP's first `branch_at` steps.
            draw_steps: run the perturbed trajectories with fewer steps (from ``x_T``).
            encoder_hidden_states: per-sample ``(N, L, D)`` conditioning for
                ``UNet2DConditionModel`` (e.g. text-encoder outputs).
            seed: fixes the initial noise, the draws and any sampler noise.
        """
        unknown = set(scores) - set(SCORES)
        if unknown:
            raise GenuncError(f"unknown scores {sorted(unknown)}; choose from {SCORES}")
        needs_draws = bool(set(scores) & {"semantic", "variability", "pixel_variance"})
        if needs_draws and num_draws < 1:
            raise GenuncError(f"num_draws must be at least 1 for {sorted(scores)}, got {num_draws}")
        if needs_draws and self.posterior is None:
            raise GenuncError("no posterior: call fit_posterior(...) or load one first")
        if "semantic" in scores and self.feature_extractor is None:
            raise GenuncError("the semantic score needs a feature_extractor")
        if draw_steps is not None and branch_at:
            raise GenuncError("draw_steps runs the draws from x_T; it cannot be combined with branch_at")
        labels = self._labels(num_samples, class_labels)
        if encoder_hidden_states is not None and encoder_hidden_states.shape[0] != num_samples:
            raise ShapeMismatchError(
                f"encoder_hidden_states must have {num_samples} rows, got "
                f"{tuple(encoder_hidden_states.shape)}"
            )
        device = self.adapter.device
        generator = torch.Generator().manual_seed(seed)
        x_T = torch.randn(num_samples, *self.adapter.sample_shape, generator=generator)
        trajectories = {"semantic", "pixel_variance"} & set(scores)
        draws = self.posterior.sample(num_draws, seed=seed) if needs_draws else None

        images, draw_images, per_step, rows = [], [], [], 0
        timings = {"generation": 0.0, "features": 0.0}
        chunks = range(0, num_samples, chunk_size)
        for start in tqdm(chunks, desc="generating", disable=not progress):
            sl = slice(start, start + chunk_size)
            cond = {"class_labels": labels[sl].to(device)} if labels is not None else {}
            if encoder_hidden_states is not None:
                cond["encoder_hidden_states"] = encoder_hidden_states[sl].to(device)
            step_gen = torch.Generator(device=device).manual_seed(seed + 1 + start)
            t0 = time.perf_counter()
            together = bool(trajectories) and draw_steps is None
            out = run_trajectory(
                self.adapter, self.sampling_scheduler, self.posterior, x_T[sl].to(device), cond,
                num_inference_steps=num_inference_steps,
                trajectory_draws=draws if together else None,
                branch_at=branch_at,
                variability_draws=draws if "variability" in scores else None,
                variability_steps=variability_steps,
                generator=step_gen,
            )
            rows += out.backbone_rows
            chunk_draws = out.draw_samples
            if trajectories and draw_steps is not None:
                side = run_trajectory(
                    self.adapter, self.sampling_scheduler, self.posterior, x_T[sl].to(device),
                    cond, num_inference_steps=draw_steps, trajectory_draws=draws,
                    include_map=False, generator=step_gen,
                )
                rows += side.backbone_rows
                chunk_draws = side.draw_samples
            timings["generation"] += time.perf_counter() - t0
            images.append(out.samples.cpu())
            if chunk_draws is not None:
                draw_images.append(chunk_draws.cpu())
            if out.variability_per_step is not None:
                per_step.append(out.variability_per_step["variability"].cpu())

        images_t = torch.cat(images)
        draws_t = torch.cat(draw_images, dim=1) if draw_images else None
        result: dict[str, np.ndarray] = {}
        if draws_t is not None:
            generations = torch.cat([images_t[None], draws_t])  # (M+1, N, ...)
            if "semantic" in scores:
                t0 = time.perf_counter()
                feats = torch.stack([extract_in_batches(self.feature_extractor, g) for g in generations])
                timings["features"] = time.perf_counter() - t0
                result["semantic"] = gaussian_entropy(feats)
            if "pixel_variance" in scores:
                result["pixel_variance"] = pixel_variance(generations)
        if per_step:
            result["variability"] = aggregate_variability(torch.cat(per_step, dim=1))
        if "random" in scores:
            result["random"] = random_scores(num_samples, seed)
        return ImageUncertaintyOutput(
            images=images_t, scores=result, class_labels=labels, seed=seed,
            draw_images=draws_t if keep_draw_images else None, timings=timings,
            backbone_rows=rows,
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


def _batches(data: Any, batch_size: int) -> Any:
    """Split a tensor or an (images, labels) pair into batches; pass iterables through."""
    if isinstance(data, Tensor):
        return [data[i : i + batch_size] for i in range(0, len(data), batch_size)]
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x, y = data
        return [{"x": x[i : i + batch_size], "class_labels": y[i : i + batch_size]}
                for i in range(0, len(x), batch_size)]
    return data
