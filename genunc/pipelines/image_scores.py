"""What both image pipelines (genunc's own loop and the wrapped user pipeline) score the same way:
the semantic entropy and the pixel variance of the MAP and M perturbed generations."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from genunc.errors import GenuncError
from genunc.features import FeatureExtractor, extract_in_batches
from genunc.pipelines.base import Request, ScoreCollector
from genunc.scores import pixel_variance


class ImageScoring:
    """Mixin for :class:`~genunc.pipelines.base.UncertaintyPipeline` subclasses that generate
    images and hold a ``feature_extractor``: the one score table of the image modality, for
    genunc's own loop and for wrapped diffusers pipelines alike."""

    #: score -> the fewest draws it needs (0: none beyond the closed form; None: no posterior)
    SCORES: ClassVar[dict[str, int | None]] = {"semantic": 1, "variability": 0,
                                               "pixel_variance": 1, "random": None}
    #: with variance="monte_carlo" (always, for a tail posterior): the jackknife standard
    #: error of the variability
    EXTRA_SCORE_COLUMNS: ClassVar[tuple[str, ...]] = ("variability_se",)
    FIT_REPEATS: ClassVar[int] = 4

    feature_extractor: FeatureExtractor | None

    def fit_feature_scale(self, real_images: Tensor) -> np.ndarray | None:
        """Measure the semantic score in units of the real images' per-feature SD (see
        :meth:`~genunc.pipelines.base.UncertaintyPipeline.set_feature_scale`); returns the scale."""
        if self.feature_extractor is None:
            raise GenuncError("no feature_extractor to measure real images with")
        return self.set_feature_scale(extract_in_batches(self.feature_extractor, real_images))

    def check_feature_extractor(self, request: Request) -> None:
        if request.wants("semantic") and self.feature_extractor is None:
            raise GenuncError("the semantic score needs a feature_extractor")

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
    set_feature_scale: Any
    semantic_entropy: Any
