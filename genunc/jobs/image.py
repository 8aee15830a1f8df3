"""The image job: a diffusers model folder (or a shipped digits model) to a PNG export.

A pixel DDPM/DDIM folder runs in genunc's own loop (late branching, fewer score steps); any other
diffusers pipeline folder (latent, guided, transformer, flow matching) runs as the user's own
pipeline with hooks (:class:`~genunc.pipelines.wrapped.WrappedImagePipeline`).  Either way sample
i's noise comes from its own stream, so the export does not depend on the chunk size.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genunc import streams
from genunc.errors import ConfigError, MissingFileError
from genunc.features import DigitsFeatures, FeatureExtractor, flatten_pixels
from genunc.jobs.base import ChunkRecord, Job, scored_records
from genunc.jobs.shards import process_device
from genunc.pipelines.image import ImageUncertaintyPipeline
from genunc.pipelines.wrapped import WrappedImagePipeline, _image_tensor


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
def _judge(device: str) -> Any:
    """The independent digits judge (not the network any score reads) whose verdict fills the
    export's quality columns."""
    from genunc.zoo.judge import DigitsJudgeEvaluator

    return DigitsJudgeEvaluator(device=device)


class ImageJob(Job):
    modality = "image"
    export_format = "png"
    qualities = (None, "zoo:digits_judge")
    pipeline_class = ImageUncertaintyPipeline

    def shipped_models(self) -> dict[str, Path]:
        from genunc.zoo import digits
        from genunc.zoo.digits_latent import LATENT_DIR

        return {"digits_ddpm": digits.DDPM_DIR, "digits_latent": LATENT_DIR}

    def load_pipeline(self, model_dir: Path, config: dict[str, Any]) -> Any:
        device = process_device(config["device"])
        pipe = ImageUncertaintyPipeline.from_pretrained(
            model_dir, feature_extractor=feature_extractor(config["features"], device),
            posterior=None, device=device)
        g = config["generate"]
        if isinstance(pipe, WrappedImagePipeline):
            _check_wrapped_options(g)
            if g["sampler"]:
                pipe.pipe.scheduler = _scheduler(g["sampler"], pipe.pipe.scheduler.config)
            pipe.pipe.set_progress_bar_config(disable=True)
        else:
            own = {"sampler": g["sampler"], "guidance_scale": g["guidance_scale"],
                   "prompts": g["prompts"]}
            given = [f"generate.{k}" for k, v in own.items() if v is not None]
            if given:
                raise ConfigError(f"{', '.join(given)} apply to diffusers pipeline folders only; "
                                  f"{model_dir} runs in genunc's own loop (DDIM, unguided)")
        return pipe

    def fit_data(self, pipe: ImageUncertaintyPipeline, config: dict[str, Any]) -> Any:
        return training_data(config["posterior"]["data"])

    def prepare_scores(self, pipe: ImageUncertaintyPipeline, config: dict[str, Any]) -> None:
        """The semantic score measures spread in units of the real images' feature SD."""
        if "semantic" in config["generate"]["scores"] and pipe.feature_extractor is not None:
            pipe.fit_feature_scale(_images(training_data(config["posterior"]["data"])))

    def call_args(self, pipe: Any, config: dict[str, Any], ids: list[str]) -> dict[str, Any]:
        if isinstance(pipe, WrappedImagePipeline):
            return _wrapped_call_args(pipe, config, ids)
        g = config["generate"]
        n_classes = pipe.adapter.num_classes
        start, n = int(ids[0]), len(ids)
        labels = None if n_classes is None else torch.arange(start, start + n) % n_classes
        return dict(num_samples=n, class_labels=labels, num_draws=g["num_draws"],
                    num_inference_steps=g["steps"], scores=tuple(g["scores"]),
                    branch_at=g["branch_at"], score_steps=g["score_steps"],
                    variability_steps=g["variability_steps"], variance=g["variance"],
                    variability_target=g["variability_target"], seed=g["seed"],
                    first_sample=start, chunk_size=n, precision=g["precision"], progress=False)

    def records(self, pipe: Any, config: dict[str, Any], out: Any,
                ids: list[str]) -> list[ChunkRecord]:
        n = len(ids)
        if isinstance(pipe, WrappedImagePipeline):
            images = _image_tensor(out.images, "pt")
            call = _wrapped_conditions(pipe, config["generate"], range(int(ids[0]), int(ids[0]) + n))
            labels = call.get("class_labels")
            labels = None if labels is None else torch.as_tensor(labels)
            condition = call.get("prompt", [None] * n) if labels is None else labels.tolist()
        else:
            images, labels = out.images, out.class_labels
            condition = [None] * n if labels is None else labels.tolist()
        if len(images) != n:
            raise ConfigError(f"the pipeline returned {len(images)} images for {n} samples "
                              "(num_images_per_prompt is not a job option)")
        trailing: dict[str, Any] = {}
        if config["quality"] and labels is not None:
            probs = _judge(process_device(config["device"])).probabilities(images)
            trailing["p_class"] = probs[np.arange(n), labels.numpy()]
            trailing["judge_agrees"] = probs.argmax(1) == labels.numpy()
        records = scored_records(n, out.scores, {"condition": condition}, trailing)
        return list(zip(ids, images, records))


#: options of genunc's own loop that a wrapped pipeline (its own loop) cannot honour
_OWN_LOOP_ONLY = {"branch_at": 0, "score_steps": None, "variability_steps": None}


def _check_wrapped_options(g: dict[str, Any]) -> None:
    bad = [f"generate.{k}" for k, default in _OWN_LOOP_ONLY.items() if g[k] != default]
    if bad:
        raise ConfigError(f"{', '.join(bad)} need genunc's own sampling loop (pixel DDPM/DDIM "
                          "folders); a diffusers pipeline folder runs its own loop")
    if g["precision"] != "float32":
        raise ConfigError("generate.precision applies to genunc's own loop; load a wrapped "
                          "pipeline in the dtype you want instead")


def _scheduler(name: str, config: Any) -> Any:
    """A diffusers scheduler class by name, built from the pipeline's scheduler config."""
    import diffusers

    cls = getattr(diffusers, name, None)
    if cls is None or not name.endswith("Scheduler"):
        raise ConfigError(f"generate.sampler {name!r} is not a diffusers scheduler class "
                          "(e.g. DDIMScheduler, DPMSolverMultistepScheduler)")
    return cls.from_config(config)


def _wrapped_call_args(pipe: WrappedImagePipeline, config: dict[str, Any],
                       ids: list[str]) -> dict[str, Any]:
    """The wrapped pipeline's call for samples `ids`: one generator per sample from its own
    initial-noise stream, the samples' conditions by global index, and genunc's score
    arguments."""
    g = config["generate"]
    start, n = int(ids[0]), len(ids)
    indices = range(start, start + n)
    args: dict[str, Any] = dict(
        num_inference_steps=g["steps"], output_type="pt", num_draws=g["num_draws"],
        scores=tuple(g["scores"]), seed=g["seed"], first_sample=start, variance=g["variance"],
        variability_target=g["variability_target"], progress=False,
        generator=streams.sample_generators(g["seed"], "initial_noise", indices),
        **_wrapped_conditions(pipe, g, indices))
    if g["guidance_scale"] is not None:
        args["guidance_scale"] = g["guidance_scale"]
    return args


def _wrapped_conditions(pipe: WrappedImagePipeline, g: dict[str, Any],
                        indices: range) -> dict[str, Any]:
    """What samples `indices` are conditioned on: ``class_labels`` (``i mod classes``), a
    ``prompt`` list (``i mod len(prompts)``), or, unconditioned, ``batch_size``."""
    accepts = inspect.signature(type(pipe.pipe).__call__).parameters
    args: dict[str, Any] = {}
    if "class_labels" in accepts:
        # the classes the pipeline names (DiT's id2label), else its label embedding's size
        named = set((getattr(pipe.pipe, "labels", None) or {}).values())
        classes = len(named) or int(pipe.adapter.model.config.get("num_embeds_ada_norm") or 1000)
        args["class_labels"] = [i % classes for i in indices]
    elif "prompt" in accepts:
        if not g["prompts"]:
            raise ConfigError(f"{type(pipe.pipe).__name__} is text-conditioned: give "
                              "generate.prompts (a list; sample i gets prompt i mod len)")
        args["prompt"] = [g["prompts"][i % len(g["prompts"])] for i in indices]
    else:
        args["batch_size"] = len(indices)
    return args
