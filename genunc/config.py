"""YAML run configurations with command-line overrides (``--set section.key=value``)."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from genunc.errors import ConfigError, MissingFileError

#: Every key a config may hold, with its default; unknown keys are rejected (typos fail loudly).
DEFAULTS: dict[str, Any] = {
    "modality": "image",  # image | molecule | text | vector
    "model": None,  # zoo:<name> or a path to a model folder
    # image: zoo:digits_classifier | pixels | clip:<path>; molecule: descriptors;
    # text: answer (answer-level one-hot) | minilm (sentence embeddings, genunc[text])
    "features": "zoo:digits_classifier",
    # image: zoo:digits_judge adds the independent judge's agreement columns; molecule: edm_metrics adds
    # atom/molecule stability, RDKit validity and SMILES; text: checker adds `correct`; vector:
    # reference adds `reference_error` (distance to the context's reference vector)
    "quality": None,
    "device": "cpu",
    "posterior": {
        "dir": None,  # default: <model>/genunc_posterior for paths, outputs/<name>/posterior for zoo
        # image: zoo:digits_train or a .pt / .npy file of images (N, C, H, W);
        # molecule: zoo:qm9_train or a .npz molecule cache; text: zoo:arith_train;
        # vector: an .npz of clean vectors `x` (n, D) and their contexts `cond` (n, C)
        "data": "zoo:digits_train",
        "max_samples": None,  # molecule / text / vector: training examples used (2000 / 4000 / all)
        # diag | kron | full; lowrank (tail posteriors: the GGN diagonal plus its top `rank`
        # eigenpairs, for blocks where full does not fit and kron does not apply)
        "structure": "diag",
        "rank": 32,
        "prior_precision": "marglik",
        "sigma_noise": "mle",
        # regression: one noise scale per output group the adapter declares (molecules: positions
        # and atom features) when sigma_noise is mle; false pools them into one
        "noise_groups": True,
        # image / molecule: a posterior over the last `tail` blocks and the head (Monte-Carlo
        # variability, generate.variance: monte_carlo); null: the head alone
        "tail": None,
        # tail posteriors: how draws act; sample re-runs the block at each drawn weight set,
        # linearised applies its first-order expansion around the fitted weights (GLM predictive)
        "predictive": "sample",
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
        "score_steps": None,  # image: semantic / pixel scores from a run with fewer steps
        "variance": "exact",  # image/molecule variability: exact (closed form) or monte_carlo
        "variability_target": "noise",  # variance of the predicted noise, or of the clean sample
        # molecule: ddpm (EDM's ancestral sampler, default) or ddim (EDM checkpoints: edm, default);
        # text: random | low_confidence (default) | threshold | remask
        # image (diffusers pipeline folders): a diffusers scheduler class swapped in, e.g.
        # DDIMScheduler or DPMSolverMultistepScheduler (null: the pipeline's own)
        "sampler": None,
        # image (diffusers pipeline folders): classifier-free guidance scale (null: the
        # pipeline's default) and the prompts of text-conditioned pipelines (sample i gets
        # prompt i mod len(prompts))
        "guidance_scale": None,
        "prompts": None,
        "candidates": 1,  # text: samples per prompt; vector: per context (filter --best-of condition)
        # vector: an .npz whose `cond` (n, C) are the contexts generated for (sample i answers
        # context (i // candidates) mod n); its `x` (n, D), where present, are the references
        # that quality: reference measures against
        "contexts": None,
        "temperature": 0.0,  # text: token temperature (0 = greedy)
        "block_length": None,  # text: semi-autoregressive block length (default: one block)
        "gen_length": None,  # text, diffusers pipeline folders: tokens to generate (null: its default)
        "threshold": 0.9,  # text: confidence threshold of the threshold / remask samplers
        # text: how mutual_information is estimated: sampled (from the M draws), linearised
        # or bridge (draw-free closed forms), pruned (draws over the MAP's top mi_top_k tokens)
        "mi_estimator": "sampled",
        "mi_top_k": None,  # text: pruned's vocabulary (null: its default); linearised: null = all
        "variability_steps": None,  # image/molecule: step indices where variability is measured (all)
        "x0_steps": None,  # image, vector: step indices semantic_x0 / action_variance_x0 read
        "nll_levels": 10,  # molecule: noise levels of denoising_loss and nll (>= T: every level)
        # the backbone's precision: float32, or bfloat16 / float16 autocast (GPUs); head draws,
        # variances and scores stay in full precision
        "precision": "float32",
        "seed": 0,
        "chunk_size": 64,
        "out": "outputs/export",
    },
}


@dataclass(frozen=True)
class Rule:
    """What one config entry may hold."""

    kind: type  # int, float, str or list
    nullable: bool = False
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[Any, ...] | None = None
    words: tuple[str, ...] = ()  # strings allowed besides a number (e.g. "marglik")
    item: type | None = None  # element type of a list
    positive: bool = False  # strictly > 0 (floats)

    def describe(self) -> str:
        if self.choices:
            allowed = f"one of {list(self.choices)}"
        elif self.kind is list:
            allowed = f"a non-empty list of {self.item.__name__ if self.item else 'values'}"
        else:
            allowed = {int: "a whole number", float: "a number", str: "a non-empty string",
                       bool: "true or false"}[self.kind]
            bounds = [f">= {self.minimum:g}"] if self.minimum is not None else []
            bounds += [f"<= {self.maximum:g}"] if self.maximum is not None else []
            bounds += ["> 0"] if self.positive else []
            allowed += f" {' and '.join(bounds)}" if bounds else ""
        if self.words:
            allowed += f", or {' / '.join(repr(w) for w in self.words)}"
        return allowed + (", or null" if self.nullable else "")

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if isinstance(value, str) and value in self.words:
            return True
        if self.choices is not None:
            return value in self.choices
        if isinstance(value, bool) or self.kind is bool:  # YAML true/false: only for flags
            return isinstance(value, bool) and self.kind is bool
        if self.kind is list:
            return isinstance(value, list) and len(value) > 0 and (
                self.item is None or all(_is(v, self.item) for v in value))
        if not _is(value, self.kind):
            return False
        if self.kind is str:
            return bool(value.strip())
        if self.minimum is not None and value < self.minimum:
            return False
        if self.maximum is not None and value > self.maximum:
            return False
        return not (self.positive and value <= 0)


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, kind)


TEXT, OPTIONAL_TEXT = Rule(str), Rule(str, nullable=True)
COUNT, SEED = Rule(int, minimum=1), Rule(int, minimum=0)
#: the rule for every entry of :data:`DEFAULTS`
RULES: dict[str, Rule] = {
    "modality": TEXT, "model": OPTIONAL_TEXT, "features": OPTIONAL_TEXT,
    "quality": OPTIONAL_TEXT, "device": TEXT,
    "posterior.dir": OPTIONAL_TEXT, "posterior.data": TEXT,
    "posterior.max_samples": Rule(int, minimum=1, nullable=True),
    "posterior.structure": Rule(str, choices=("diag", "kron", "full", "lowrank")),
    "posterior.rank": COUNT,
    "posterior.prior_precision": Rule(float, positive=True, words=("marglik",)),
    "posterior.sigma_noise": Rule(float, positive=True, words=("mle", "marglik")),
    "posterior.noise_groups": Rule(bool),
    "posterior.tail": Rule(int, minimum=1, nullable=True),
    "posterior.predictive": Rule(str, choices=("sample", "linearised")),
    "posterior.repeats": COUNT, "posterior.batch_size": COUNT, "posterior.seed": SEED,
    "generate.n_samples": COUNT, "generate.num_draws": SEED,
    "generate.steps": Rule(int, minimum=1, nullable=True),
    "generate.scores": Rule(list, item=str),
    "generate.branch_at": SEED, "generate.score_steps": Rule(int, minimum=1, nullable=True),
    "generate.variance": Rule(str, choices=("exact", "monte_carlo")),
    "generate.variability_target": Rule(str, choices=("noise", "clean")),
    "generate.sampler": OPTIONAL_TEXT, "generate.candidates": COUNT,
    "generate.contexts": OPTIONAL_TEXT,
    "generate.guidance_scale": Rule(float, minimum=0, nullable=True),
    "generate.prompts": Rule(list, item=str, nullable=True),
    "generate.temperature": Rule(float, minimum=0),
    "generate.block_length": Rule(int, minimum=1, nullable=True),
    "generate.gen_length": Rule(int, minimum=1, nullable=True),
    "generate.threshold": Rule(float, minimum=0, maximum=1),
    # genunc.scores.tokens.MI_ESTIMATORS (not imported: the config loads without torch)
    "generate.mi_estimator": Rule(str, choices=("sampled", "linearised", "bridge", "pruned")),
    "generate.mi_top_k": Rule(int, minimum=1, nullable=True),
    "generate.variability_steps": Rule(list, item=int, nullable=True),
    "generate.x0_steps": Rule(list, item=int, nullable=True),
    "generate.precision": Rule(str, choices=("float32", "bfloat16", "float16")),
    "generate.nll_levels": COUNT, "generate.seed": SEED, "generate.chunk_size": COUNT,
    "generate.out": TEXT,
}


def check_config(config: Mapping[str, Any], rules: Mapping[str, Rule] | None = None) -> None:
    """Every entry against `rules` (default :data:`RULES`); all problems at once, each naming
    key, value and what is allowed."""
    rules = RULES if rules is None else rules
    problems = [f"  {key}: {value!r} is not allowed; expected {rules[key].describe()}"
                for key, value in flatten(config).items()
                if key in rules and not rules[key].accepts(value)]
    if problems:
        raise ConfigError("invalid config:\n" + "\n".join(problems))


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_config(path: str | Path | None, overrides: Iterable[str] = (), *,
                defaults: Mapping[str, Any] | None = None,
                rules: Mapping[str, Rule] | None = None) -> dict[str, Any]:
    """Defaults, then the YAML file, then ``section.key=value`` overrides (values parsed as YAML);
    the result is checked against the rules before anything uses it.  A job config uses
    :data:`DEFAULTS` / :data:`RULES`; other schemas (``genunc rl``'s) pass their own."""
    config = copy.deepcopy(DEFAULTS if defaults is None else dict(defaults))
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise MissingFileError(f"config file {path} not found")
        if not path.is_file():
            raise ConfigError(f"{path} is not a file: give the path of a YAML config")
        loaded = _parse_yaml(path.read_text(), str(path)) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping at the top level")
        _merge(config, loaded, prefix="")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        value = _parse_yaml(raw, f"--set {item}") if raw else None
        nested: dict[str, Any] = {}
        cursor = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            cursor = cursor.setdefault(part, {})
        cursor[parts[-1]] = value
        _merge(config, nested, prefix="")
    check_config(config, rules)
    return config


def _parse_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where} is not valid YAML{line}: {problem}") from None


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
