"""The text job: a masked-diffusion LM folder (or a shipped task model) to a JSONL export.

``generate`` answers held-out prompts of the model's task with ``candidates`` samples each and
writes the completion, the checker's verdict, every score and the NFE per sample; the prompt is
the ``condition`` column, so ``genunc filter --best-of condition`` keeps the least uncertain
candidate per prompt (best-of-N).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from genunc import streams
from genunc.errors import ConfigError
from genunc.jobs.base import ChunkRecord, Job, scored_records
from genunc.jobs.shards import process_device
from genunc.pipelines.text import TextUncertaintyPipeline
from genunc.sampling.masked import UnmaskingConfig
from genunc.tasks import Task, task_from_spec

#: the posterior data that means "the model's own task, training split"
TASK_TRAIN = ("zoo:task_train", "zoo:arith_train")


def task_of(pipe: TextUncertaintyPipeline) -> Task:
    spec = pipe.metadata.get("task") or {}
    try:
        return task_from_spec(spec)
    except ConfigError:
        raise ConfigError(f"the model folder names no known task (got {spec!r})") from None


def unmasking_config(g: dict[str, Any]) -> UnmaskingConfig:
    return UnmaskingConfig(g["sampler"] or "low_confidence", steps=g["steps"],
                           block_length=g["block_length"], threshold=g["threshold"],
                           temperature=g["temperature"])


class TextJob(Job):
    modality = "text"
    export_format = "json"
    qualities = (None, "checker")
    pipeline_class = TextUncertaintyPipeline

    def shipped_models(self) -> dict[str, Path]:
        from genunc.zoo.arith import ARITH_DIR
        from genunc.zoo.order_tasks import SORT_DIR, SUDOKU4_DIR

        return {"arith_mdlm": ARITH_DIR, "sudoku4_mdlm": SUDOKU4_DIR, "sort_mdlm": SORT_DIR}

    def load_pipeline(self, model_dir: Path, config: dict[str, Any]) -> TextUncertaintyPipeline:
        if config["generate"]["candidates"] < 1:
            raise ConfigError(f"candidates must be >= 1, got {config['generate']['candidates']}")
        device = process_device(config["device"])
        pipe = TextUncertaintyPipeline.from_pretrained(model_dir, posterior=None, device=device)
        if config["features"] == "minilm":
            from genunc.features.text import MiniLMFeatures

            pipe.feature_extractor = MiniLMFeatures(task_of(pipe).decode, device=device)
        elif config["features"] not in (None, "answer"):
            raise ConfigError(f"text features are 'answer' or 'minilm', got {config['features']!r}")
        return pipe

    def fit_data(self, pipe: TextUncertaintyPipeline, config: dict[str, Any]) -> list[dict]:
        """The task's training problems as sequences with their prompt masks."""
        p = config["posterior"]
        if p["data"] not in TASK_TRAIN:
            raise ConfigError(f"text posterior data is one of {TASK_TRAIN} (the model's task's "
                              f"training problems), got {p['data']!r}")
        task = task_of(pipe)
        pairs = task.split()["train"][: p["max_samples"] or 4000]
        size = p["batch_size"]
        return [{"x": task.sequences(pairs[i : i + size]),
                 "prompt_mask": task.prompt_mask(len(pairs[i : i + size]))}
                for i in range(0, len(pairs), size)]

    def fit_options(self, config: dict[str, Any]) -> dict[str, Any]:
        if config["posterior"]["tail"] is not None:
            raise ConfigError("text posteriors cover the vocabulary head only for now "
                              "(posterior.tail must be null)")
        options = super().fit_options(config)
        del options["sigma_noise"], options["noise_groups"]  # a categorical likelihood has no noise
        return options

    def call_args(self, pipe: TextUncertaintyPipeline, config: dict[str, Any],
                  ids: list[str]) -> dict[str, Any]:
        """Held-out prompts in a seeded order, ``candidates`` samples each."""
        g = config["generate"]
        task = task_of(pipe)
        test = task.split()["test"]
        order = streams.numpy_generator(g["seed"], "prompt_order").permutation(len(test))
        index = np.array([int(i) for i in ids])
        pairs = test[order[(index // g["candidates"]) % len(test)]]
        return dict(prompts=task.prompts(pairs), config=unmasking_config(g),
                    num_draws=g["num_draws"], scores=tuple(g["scores"]), seed=g["seed"],
                    first_sample=int(ids[0]), precision=g["precision"], progress=False)

    def records(self, pipe: TextUncertaintyPipeline, config: dict[str, Any], out: Any,
                ids: list[str]) -> list[ChunkRecord]:
        task = task_of(pipe)
        texts = [task.decode(tokens) for tokens in out.tokens]
        prompts = [text[: task.prompt_length] for text in texts]
        completions = [text[task.prompt_length :] for text in texts]
        correct = task.check(out.tokens).astype(bool) if config["quality"] else None
        records = scored_records(len(ids), out.scores,
                                 {"condition": prompts, "completion": completions,
                                  "nfe": out.row_nfe.astype(int)},
                                 {"correct": correct})
        return [(i, {"prompt": prompt, "completion": completion}, record)
                for i, prompt, completion, record in zip(ids, prompts, completions, records)]
