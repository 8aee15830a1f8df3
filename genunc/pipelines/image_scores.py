"""What both image pipelines (genunc's own loop and the wrapped user pipeline) score the same way:
the semantic entropy and the pixel variance of the MAP and M perturbed generations, and the
one-trajectory semantic score ``semantic_x0``.

``semantic_x0``: along the MAP trajectory only, at a few steps (``x0_steps``), the clean sample
the MAP head and each of the M head draws predict from the head input the MAP already computed
(one batched head op, then the scheduler's ``pred_original_sample`` rule,
:func:`genunc.sampling.clean.predicted_clean`), decoded by the VAE where there is one, clamped
to [-1, 1], featurised by the semantic score's extractor and scored by the same entropy on the
same feature scale (the MAP's prediction is one of the M+1, as in ``semantic``); the score is
the mean of the per-step entropies, and ``semantic_x0_se`` its jackknife standard error over the
draws (M >= 2).  No extra generation runs: its cost is the head, the decoder and the extractor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from genunc.errors import GenuncError
from genunc.features import FeatureExtractor, extract_in_batches
from genunc.pipelines.base import X0_FRACTIONS, Request, ScoreCollector, default_x0_steps
from genunc.scores import pixel_variance

__all__ = ["X0_FRACTIONS", "ImageScoring", "default_x0_steps"]

class ImageScoring:
    """Mixin for :class:`~genunc.pipelines.base.UncertaintyPipeline` subclasses that generate
    images and hold a ``feature_extractor``: the one score table of the image modality, for
    genunc's own loop and for wrapped diffusers pipelines alike."""

    #: score -> the fewest draws it needs (0: none beyond the closed form; None: no posterior)
    SCORES: ClassVar[dict[str, int | None]] = {"semantic": 1, "semantic_x0": 1,
                                               "variability": 0, "pixel_variance": 1,
                                               "random": None}
    #: with variance="monte_carlo" (always, for a tail posterior): the jackknife standard
    #: error of the variability; with semantic_x0 and M >= 2, its jackknife standard error
    EXTRA_SCORE_COLUMNS: ClassVar[tuple[str, ...]] = ("variability_se", "semantic_x0_se")
    FIT_REPEATS: ClassVar[int] = 4

    feature_extractor: FeatureExtractor | None

    def fit_feature_scale(self, real_images: Tensor) -> np.ndarray | None:
        """Measure the semantic score in units of the real images' per-feature SD (see
        :meth:`~genunc.pipelines.base.UncertaintyPipeline.set_feature_scale`); returns the scale."""
        if self.feature_extractor is None:
            raise GenuncError("no feature_extractor to measure real images with")
        return self.set_feature_scale(extract_in_batches(self.feature_extractor, real_images))

    def check_feature_extractor(self, request: Request) -> None:
        if request.wants("semantic", "semantic_x0") and self.feature_extractor is None:
            raise GenuncError("the semantic score needs a feature_extractor")

    def add_clean_scores(self, collected: ScoreCollector, clean: Tensor,
                         decode: Callable[[Tensor], Tensor] | None = None) -> None:
        """``semantic_x0`` (and ``semantic_x0_se``) from ``(S, M+1, B, ...)`` clean-sample
        predictions, MAP first: decoded (`decode`: latents -> images in [-1, 1]), clamped to
        [-1, 1], featurised, entropy per step, mean over steps.

        The decoder gets B latents at a time, as many as the pipeline's own call decodes at
        once, so its peak memory is the plain call's (Stable Diffusion's VAE decoder at 512 px
        takes 0.96 GB for one image, 1.62 GB for two: the 17 latents of M = 16 at once would
        take about 11 GB)."""
        s, k, b = clean.shape[:3]
        with collected.timer("features"):
            flat = clean.reshape(s * k * b, *clean.shape[3:])
            if decode is not None:
                flat = torch.cat([decode(flat[i : i + b]) for i in range(0, len(flat), b)])
            images = flat.float().clamp(-1, 1)
            feats = extract_in_batches(self.feature_extractor, images)
            collected.add_semantic_x0(feats.reshape(s, k, b, -1), self.semantic_entropy)

    def add_generation_scores(self, collected: ScoreCollector, request: Request,
                              generations: Tensor) -> None:
        """Semantic entropy and pixel variance of ``(M+1, N, C, H, W)`` generations, MAP first."""
        if request.wants("semantic"):
            with collected.timer("features"):
                feats = torch.stack([extract_in_batches(self.feature_extractor, g)
                                     for g in generations])
            collected.add("semantic", self.semantic_entropy(feats))
        if request.wants("pixel_variance"):
            collected.add("pixel_variance", pixel_variance(generations))

    # provided by UncertaintyPipeline
    resolve_x0_steps: Any
    set_feature_scale: Any
    semantic_entropy: Any
