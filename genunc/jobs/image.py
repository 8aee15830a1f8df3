"""The image job: a diffusers model folder (or a shipped digits model) to a PNG export.

A pixel DDPM/DDIM folder runs in genunc's own loop (late branching, fewer score steps); any other
diffusers pipeline folder (latent, guided, transformer, flow matching) runs as the user's own
pipeline with hooks (:class:`~genunc.pipelines.wrapped.WrappedImagePipeline`).  Either way sample
i's noise comes from its own stream, so the export does not depend on the chunk size.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genunc import plugins
from genunc.errors import ConfigError, MissingFileError
from genunc.features import DigitsFeatures, FeatureExtractor, flatten_pixels
from genunc.jobs.base import ChunkRecord, Job, chunk_indices, scored_records
from genunc.jobs.shards import process_device
from genunc.pipelines.image import ImageUncertaintyPipeline


def feature_extractor(spec: str | None, device: str) -> FeatureExtractor | None:
    """``zoo:digits_classifier``, ``pixels`` or ``clip:<path>`` (None: no semantic score)."""
    if spec is None:
        return None
    if spec == "zoo:digits_classifier":
        return DigitsFeatures(device=device)
    if spec == "pixels":
        return flatten_pixels
    if spec.startswith("clip:"):
        from genunc.features import ClipFeatures

        return ClipFeatures(spec[5:], device=device)
    raise ConfigError(f"unknown feature extractor {spec!r}: zoo:digits_classifier, pixels or "
                      "clip:<path>")


def training_data(spec: str) -> Any:
    """``zoo:digits_train``, a ``.npy`` of images, or a ``.pt`` of images, ``{x, class_labels}``
    or ``{x, prompts}`` (images in [-1, 1], ``(N, C, H, W)``)."""
    from genunc.zoo import digits

    if spec == "zoo:digits_train":
        return digits.split_digits()["train"]
    path = Path(spec)
    if not path.exists():
        raise MissingFileError(f"posterior data {path} not found")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)).float()
    data = torch.load(path, weights_only=True)
    if isinstance(data, dict):
        if "prompts" in data:
            return data["x"], list(data["prompts"])
        return data["x"], data["class_labels"]
    return data


def _images(data: Any) -> torch.Tensor:
    """The images of what :func:`training_data` returns."""
    return data[0] if isinstance(data, tuple) else data


@lru_cache
def _judge(quality: str, device: str) -> Any:
    """The judge a ``zoo:<name>`` quality names, found by its registration (the ``genunc.judges``
    entry points, :func:`genunc.plugins.judge`): ``zoo:digits_judge`` is the independent digits
    judge (not the network any score reads) whose verdict fills the export's quality columns."""
    return plugins.judge(quality.removeprefix("zoo:"), device=device)


class ImageJob(Job):
    modality = "image"
    export_format = "png"
    quality_column = "judge_agrees"
    pipeline_class = ImageUncertaintyPipeline

    @property
    def qualities(self) -> tuple[str | None, ...]:  # type: ignore[override]
        """None, ``zoo:digits_judge`` or ``zoo:<name>`` of any other registered judge."""
        others = [f"zoo:{name}" for name in plugins.registered(plugins.JUDGES) if name != "digits_judge"]
        return (None, "zoo:digits_judge", *others)

    def shipped_models(self) -> dict[str, Path]:
        from genunc.zoo.shipped import DDPM_DIR, LATENT_DIR

        return {"digits_ddpm": DDPM_DIR, "digits_latent": LATENT_DIR}

    def load_pipeline(self, model_dir: Path, config: dict[str, Any]) -> Any:
        device = process_device(config["device"])
        if config["quality"]:  # a judge that is not there fails before any work
            _judge(config["quality"], device)
        pipe = ImageUncertaintyPipeline.from_pretrained(
            model_dir, feature_extractor=feature_extractor(config["features"], device),
            posterior=None, device=device)
        pipe.prepare_run(config["generate"], str(model_dir))
        return pipe

    def fit_data(self, pipe: ImageUncertaintyPipeline, config: dict[str, Any]) -> Any:
        return training_data(config["posterior"]["data"])

    def prepare_scores(self, pipe: ImageUncertaintyPipeline, config: dict[str, Any]) -> None:
        """The semantic score measures spread in units of the real images' feature SD."""
        if "semantic" in config["generate"]["scores"] and pipe.feature_extractor is not None:
            pipe.fit_feature_scale(_images(training_data(config["posterior"]["data"])))

    def records(self, pipe: Any, config: dict[str, Any], out: Any,
                ids: list[str]) -> list[ChunkRecord]:
        n = len(ids)
        images, labels, condition = pipe.chunk_images(out, config["generate"], chunk_indices(ids))
        if len(images) != n:
            raise ConfigError(f"the pipeline returned {len(images)} images for {n} samples "
                              "(num_images_per_prompt is not a job option)")
        trailing: dict[str, Any] = {}
        if config["quality"] and labels is not None:
            probs = _judge(config["quality"], process_device(config["device"])).probabilities(images)
            trailing["p_class"] = probs[np.arange(n), labels.numpy()]
            trailing["judge_agrees"] = probs.argmax(1) == labels.numpy()
        records = scored_records(n, out.scores, {"condition": condition}, trailing)
        return list(zip(ids, images, records))
