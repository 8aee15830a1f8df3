"""The text job: a text model folder to a JSONL export, whichever pipeline runs it.

A genunc masked-diffusion LM folder (or a shipped task model) runs in genunc's own loop and
answers held-out prompts of its task, with the checker's verdict per sample; a diffusers text
pipeline folder (``LLaDA2Pipeline``, ``DiffusionGemmaPipeline``: ``model_index.json`` names it)
runs as the user's own pipeline with hooks and answers ``generate.prompts``.  The pipeline says
how a chunk is called and what it wrote (``chunk_call``, ``chunk_texts``); the job writes each
sample's completion, every score and (own loop) the NFE.  The prompt is the ``condition``
column, so ``genunc filter --best-of condition`` keeps the least uncertain of each prompt's
``candidates`` samples (best-of-N).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genunc.errors import ConfigError
from genunc.jobs.base import ChunkRecord, Job, chunk_indices, scored_records
from genunc.jobs.shards import process_device
from genunc.pipelines.text import TextUncertaintyPipeline


class TextJob(Job):
    modality = "text"
    export_format = "json"
    qualities = (None, "checker")
    quality_column = "correct"
    pipeline_class = TextUncertaintyPipeline

    def shipped_models(self) -> dict[str, Path]:
        from genunc.zoo.shipped import ARITH_DIR, SORT_DIR, SUDOKU4_DIR

        return {"arith_mdlm": ARITH_DIR, "sudoku4_mdlm": SUDOKU4_DIR, "sort_mdlm": SORT_DIR}

    def load_pipeline(self, model_dir: Path, config: dict[str, Any]) -> TextUncertaintyPipeline:
        device = process_device(config["device"])
        pipe = TextUncertaintyPipeline.from_pretrained(model_dir, posterior=None, device=device)
        if config["quality"] is not None and not pipe.checks_answers:
            raise ConfigError(f"{model_dir} has no task whose checker could judge its answers: "
                              "quality must be null")
        if config["features"] == "minilm":
            from genunc.features.text import MiniLMFeatures

            if pipe.checks_answers:  # the task's decoding; a diffusers pipeline returns texts
                pipe.feature_extractor = MiniLMFeatures(pipe.task.decode, device=device)
            else:
                pipe.feature_extractor = MiniLMFeatures(device=device).embed
        elif config["features"] not in (None, "answer"):
            raise ConfigError(f"text features are 'answer' or 'minilm', got {config['features']!r}")
        pipe.prepare_run(config["generate"], str(model_dir))
        return pipe

    def fit_data(self, pipe: TextUncertaintyPipeline, config: dict[str, Any]) -> Any:
        return pipe.fitting_data(config["posterior"])

    def fit_options(self, config: dict[str, Any]) -> dict[str, Any]:
        options = super().fit_options(config)
        del options["sigma_noise"], options["noise_groups"]  # a categorical likelihood has no noise
        return options

    def records(self, pipe: TextUncertaintyPipeline, config: dict[str, Any], out: Any,
                ids: list[str]) -> list[ChunkRecord]:
        chunk = pipe.chunk_texts(out, config["generate"], chunk_indices(ids),
                                 check=config["quality"] is not None)
        leading: dict[str, Any] = {"condition": chunk.prompts, "completion": chunk.completions}
        if chunk.nfe is not None:
            leading["nfe"] = chunk.nfe
        records = scored_records(len(ids), out.scores, leading, {"correct": chunk.correct})
        payloads = [{"prompt": prompt, "completion": completion}
                    for prompt, completion in zip(chunk.prompts, chunk.completions)]
        for payload, tokens in zip(payloads, chunk.token_mi or []):
            payload["token_mutual_information"] = tokens
        return [(i, payload, record) for i, payload, record in zip(ids, payloads, records)]
