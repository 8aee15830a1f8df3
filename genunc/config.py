"""YAML run configurations with command-line overrides (``--set section.key=value``)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from genunc.errors import ConfigError, MissingFileError

#: Every key a config may hold, with its default; unknown keys are rejected (typos fail loudly).
DEFAULTS: dict[str, Any] = {
    "modality": "image",  # image | molecule | text
    "model": None,  # zoo:<name> or a path to a model folder
    # image: zoo:digits_classifier | pixels | clip:<path>; molecule: descriptors;
    # text: answer (answer-level one-hot) | minilm (sentence embeddings, genunc[text])
    "features": "zoo:digits_classifier",
    # image: zoo:digits_classifier adds classifier-agreement columns; molecule: edm_metrics adds
    # atom/molecule stability, RDKit validity and SMILES; text: checker adds `correct`
    "quality": None,
    "device": "cpu",
    "posterior": {
        "dir": None,  # default: <model>/genunc_posterior for paths, outputs/<name>/posterior for zoo
        # image: zoo:digits_train or a .pt / .npy file of images (N, C, H, W);
        # molecule: zoo:qm9_train or a .npz molecule cache; text: zoo:arith_train
        "data": "zoo:digits_train",
        "max_samples": None,  # molecule / text: training examples used (default 2000 / 4000)
        "structure": "diag",
        "prior_precision": "marglik",
        "sigma_noise": "mle",
        "repeats": 4,
        "batch_size": 64,
        "seed": 0,
    },
    "generate": {
        "n_samples": 256,
        "num_draws": 5,
        "steps": 50,  # image/molecule: sampler steps; text: unmasking steps (null: 1 token/step)
        "scores": ["semantic", "variability", "pixel_variance"],
        "branch_at": 0,
        "draw_steps": None,
        # molecule: ddpm (EDM's ancestral sampler, default) or ddim;
        # text: random | low_confidence (default) | threshold | remask
        "sampler": None,
        "candidates": 1,  # text: samples per prompt (best-of-N: filter --best-of condition)
        "temperature": 0.0,  # text: token temperature (0 = greedy)
        "block_length": None,  # text: semi-autoregressive block length (default: one block)
        "threshold": 0.9,  # text: confidence threshold of the threshold / remask samplers
        "variability_steps": None,  # molecule: step indices where variability is measured (all)
        "nll_levels": 10,  # molecule: noise levels of the denoising_loss baseline
        "seed": 0,
        "chunk_size": 64,
        "out": "outputs/export",
    },
}


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> dict[str, Any]:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML)."""
    config = copy.deepcopy(DEFAULTS)
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"config file {path} not found")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        _merge(config, loaded, prefix="")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw else None
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(config, nested, prefix="")
    return config


def _merge(base: dict[str, Any], update: Mapping[str, Any], prefix: str) -> None:
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(f"unknown config key {name!r}; known here: {sorted(base)}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key {name!r} must be a mapping")
            _merge(base[key], value, prefix=f"{name}.")
        else:
            base[key] = value


def dump_config(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False)
