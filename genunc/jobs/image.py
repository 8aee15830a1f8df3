"""Config-driven image jobs behind ``genunc fit`` and ``genunc generate``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from genunc.errors import GenuncError
from genunc.export import Export
from genunc.jobs import export_in_chunks, model_dir, posterior_dir
from genunc.features import DigitsFeatures, flatten_pixels
from genunc.pipelines.image import ImageUncertaintyPipeline
from genunc.posterior import HeadPosterior


def _model_dir(config: dict[str, Any]) -> Path:
    from genunc.zoo import digits

    return model_dir(config, {"digits_ddpm": digits.DDPM_DIR})


def feature_extractor(spec: str | None, device: str) -> Any:
    if spec is None:
        return None
    if spec == "zoo:digits_classifier":
        return DigitsFeatures(device=device)
    if spec == "pixels":
        return flatten_pixels
    if spec.startswith("clip:"):
        from genunc.features import ClipFeatures

        return ClipFeatures(spec[5:], device=device)
    raise GenuncError(f"unknown feature extractor {spec!r}: zoo:digits_classifier, pixels or clip:<path>")


def training_data(spec: str) -> Any:
    from genunc.zoo import digits

    if spec == "zoo:digits_train":
        return digits.split_digits()["train"]
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"posterior data {path} not found")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path)).float()
    data = torch.load(path, weights_only=True)
    if isinstance(data, dict):
        return data["x"], data["class_labels"]
    return data


def build_pipeline(config: dict[str, Any], fit_if_missing: bool = True,
                   progress: bool = True) -> ImageUncertaintyPipeline:
    """Model + features from the config; posterior loaded from its dir (fitted there if absent)."""
    device = config["device"]
    pipe = ImageUncertaintyPipeline.from_pretrained(
        _model_dir(config), feature_extractor=feature_extractor(config["features"], device),
        posterior=None, device=device)
    pipe.posterior = HeadPosterior.load_saved(posterior_dir(config), pipe.unet)
    if pipe.posterior is None and fit_if_missing:
        fit_posterior(pipe, config, progress=progress)
    return pipe


def fit_posterior(pipe: ImageUncertaintyPipeline, config: dict[str, Any],
                  progress: bool = True) -> HeadPosterior:
    p = config["posterior"]
    posterior = pipe.fit_posterior(
        training_data(p["data"]), batch_size=p["batch_size"], repeats=p["repeats"], seed=p["seed"],
        structure=p["structure"], prior_precision=p["prior_precision"],
        sigma_noise=p["sigma_noise"], progress=progress)
    posterior.save(posterior_dir(config))
    return posterior


def generate(config: dict[str, Any], progress: bool = True) -> Export:
    """Generate ``n_samples`` scored images into an export directory, chunk by chunk (resumable).

    Chunk c holds samples ``c*chunk_size ...`` and is generated with seed ``seed + c``, so an
    interrupted run regenerates exactly the missing samples when started again.
    """
    g = config["generate"]
    pipe = build_pipeline(config, progress=progress)
    quality = DigitsFeatures(device=config["device"]) \
        if config["quality"] == "zoo:digits_classifier" else None
    if config["quality"] not in (None, "zoo:digits_classifier"):
        raise GenuncError(f"unknown quality model {config['quality']!r}")
    n_classes = pipe.adapter.num_classes

    def generate_chunk(c: int, ids: list[str]):
        start = int(ids[0])
        labels = None if n_classes is None else torch.arange(start, start + len(ids)) % n_classes
        out = pipe(len(ids), class_labels=labels, num_draws=g["num_draws"],
                   num_inference_steps=g["steps"], scores=tuple(g["scores"]),
                   branch_at=g["branch_at"], draw_steps=g["draw_steps"], seed=g["seed"] + c,
                   chunk_size=len(ids), progress=False)
        extra: dict[str, np.ndarray] = {}
        if quality is not None and labels is not None:
            probs = quality.probabilities(out.images)
            extra["p_class"] = probs[torch.arange(len(ids)), labels].double().numpy()
            extra["classifier_agrees"] = (probs.argmax(1) == labels).numpy()
        for j, sample_id in enumerate(ids):
            record = {"index_in_chunk": j, "condition": None if labels is None else int(labels[j])}
            record.update({k: float(v[j]) for k, v in out.scores.items()})
            record.update({k: v[j].item() for k, v in extra.items()})
            yield sample_id, out.images[j], record

    return export_in_chunks(config, "png", pipe.posterior, generate_chunk, progress)
