"""Config-driven text jobs behind ``genunc fit`` and ``genunc generate`` (modality: text).

``generate`` answers held-out prompts of the reference task with ``candidates`` samples each and
writes a JSONL export: the completion, the checker's verdict, every score and the NFE per
sample; the prompt is the ``condition`` column, so ``genunc filter --best-of condition`` keeps
the least uncertain candidate per prompt (best-of-N).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from genunc.errors import GenuncError
from genunc.export import Export
from genunc.jobs import export_in_chunks, model_dir, posterior_dir
from genunc.pipelines.text import TextUncertaintySampler
from genunc.posterior import HeadPosterior
from genunc.sampling.masked import UnmaskingConfig
from genunc.tasks import ArithmeticTask


def _model_dir(config: dict[str, Any]) -> Path:
    from genunc.zoo.arith import ARITH_DIR

    return model_dir(config, {"arith_mdlm": ARITH_DIR})


def task_of(sampler: TextUncertaintySampler) -> ArithmeticTask:
    spec = sampler.metadata.get("task") or {}
    if spec.get("name") != "arithmetic":
        raise GenuncError(f"the model folder names no known task (got {spec!r})")
    return ArithmeticTask(spec["op"], spec["digits"])


def build_sampler(config: dict[str, Any], fit_if_missing: bool = True,
                  progress: bool = True) -> TextUncertaintySampler:
    sampler = TextUncertaintySampler.from_pretrained(_model_dir(config), device=config["device"])
    if config["features"] == "minilm":
        from genunc.features.text import MiniLMEmbedder

        task = task_of(sampler)
        sampler.embedder = MiniLMEmbedder(task.decode, device=config["device"])
    elif config["features"] not in (None, "answer"):
        raise GenuncError(f"text features are 'answer' or 'minilm', got {config['features']!r}")
    sampler.posterior = HeadPosterior.load_saved(posterior_dir(config), sampler.adapter.model)
    if sampler.posterior is None and fit_if_missing:
        fit_posterior(sampler, config, progress=progress)
    return sampler


def fit_posterior(sampler: TextUncertaintySampler, config: dict[str, Any],
                  progress: bool = True) -> HeadPosterior:
    p = config["posterior"]
    if p["data"] != "zoo:arith_train":
        raise GenuncError(f"text posterior data is 'zoo:arith_train', got {p['data']!r}")
    task = task_of(sampler)
    pairs = task.split()["train"][: p["max_samples"] or 4000]
    size = p["batch_size"]
    batches = [{"x": task.sequences(pairs[i : i + size]),
                "prompt_mask": task.prompt_mask(len(pairs[i : i + size]))}
               for i in range(0, len(pairs), size)]
    posterior = sampler.fit_posterior(batches, repeats=p["repeats"], seed=p["seed"],
                                      structure=p["structure"],
                                      prior_precision=p["prior_precision"], progress=progress)
    posterior.save(posterior_dir(config))
    return posterior


def unmasking_config(g: dict[str, Any]) -> UnmaskingConfig:
    return UnmaskingConfig(g["sampler"] or "low_confidence", steps=g["steps"],
                           block_length=g["block_length"], threshold=g["threshold"],
                           temperature=g["temperature"])


def generate(config: dict[str, Any], progress: bool = True) -> Export:
    """``n_samples`` sequences: held-out prompts in a seeded order, ``candidates`` each."""
    g = config["generate"]
    if config["quality"] not in (None, "checker"):
        raise GenuncError(f"text quality is 'checker' or null, got {config['quality']!r}")
    if g["candidates"] < 1:
        raise GenuncError(f"candidates must be >= 1, got {g['candidates']}")
    sampler = build_sampler(config, progress=progress)
    task = task_of(sampler)
    test = task.split()["test"]
    order = np.random.default_rng(g["seed"]).permutation(len(test))
    unmasking = unmasking_config(g)

    def generate_chunk(c: int, ids: list[str]):
        index = np.array([int(i) for i in ids])
        pairs = test[order[(index // g["candidates"]) % len(test)]]
        out = sampler(task.prompts(pairs), unmasking, num_draws=g["num_draws"],
                      scores=tuple(g["scores"]), seed=g["seed"] + c)
        correct = task.check(out.tokens) if config["quality"] else None
        for j, sample_id in enumerate(ids):
            text = task.decode(out.tokens[j])
            prompt, completion = text[: task.prompt_length], text[task.prompt_length :]
            record: dict[str, Any] = {"index_in_chunk": j, "condition": prompt,
                                      "completion": completion, "nfe": int(out.row_nfe[j])}
            record.update({k: float(v[j]) for k, v in out.scores.items()})
            if correct is not None:
                record["correct"] = bool(correct[j])
            yield sample_id, {"prompt": prompt, "completion": completion}, record

    return export_in_chunks(config, "json", sampler.posterior, generate_chunk, progress)
