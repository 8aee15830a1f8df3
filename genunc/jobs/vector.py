"""The vector job: a vector model folder (a diffusion policy's actor, say) to a JSONL export.

The config names the model folder (written by
:meth:`~genunc.pipelines.vector.VectorUncertaintyPipeline.save_pretrained`), the fitting data
(``posterior.data``: an ``.npz`` of clean vectors ``x`` and contexts ``cond``) and the contexts
to generate for (``generate.contexts``: an ``.npz`` whose ``cond`` holds them).  Sample i is
candidate ``i mod candidates`` of context ``(i // candidates) mod n``; each record holds the
vector, its context's index (the ``condition`` column, so ``genunc filter --best-of condition``
keeps the least uncertain candidate per context) and every score.  Vectors have no judge:
``quality: reference`` measures each vector's distance to its context's reference vector (the
contexts file's ``x``), the ``reference_error`` column (lower is better: ``genunc evaluate
--quality reference_error --fail-above T``); without it the export has no quality column.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from genunc.errors import ConfigError
from genunc.jobs.base import ChunkRecord, Job, chunk_indices, scored_records
from genunc.jobs.shards import process_device
from genunc.pipelines.vector import VectorUncertaintyPipeline, context_of, read_vectors


class VectorJob(Job):
    modality = "vector"
    export_format = "json"
    qualities = (None, "reference")
    quality_column = "reference_error"
    pipeline_class = VectorUncertaintyPipeline

    def __init__(self) -> None:
        self._references: dict[str, Any] = {}  # contexts file -> its reference vectors

    def shipped_models(self) -> dict[str, Path]:
        return {}  # no shipped vector models: the config names a folder

    def load_pipeline(self, model_dir: Path, config: dict[str, Any]) -> VectorUncertaintyPipeline:
        if config["features"] is not None:
            raise ConfigError(f"vector scores read no feature extractor; set features: null (got "
                              f"{config['features']!r})")
        pipe = VectorUncertaintyPipeline.from_pretrained(
            model_dir, posterior=None, device=process_device(config["device"]))
        pipe.prepare_run(config["generate"], str(model_dir))
        if config["quality"] == "reference":
            self.references(pipe, config)  # a missing or misshapen reference fails before work
        return pipe

    def fit_data(self, pipe: VectorUncertaintyPipeline, config: dict[str, Any]) -> dict[str, Any]:
        """The clean vectors ``x`` and contexts ``cond`` of ``posterior.data`` (at most
        ``posterior.max_samples``)."""
        p = config["posterior"]
        if not str(p["data"]).endswith(".npz"):
            raise ConfigError(f"vector posterior data is an .npz of 'x' and 'cond', got {p['data']!r}")
        x, cond = read_vectors(p["data"], "x"), read_vectors(p["data"], "cond")
        return {"x": x[: p["max_samples"]], "cond": cond[: p["max_samples"]]}

    def references(self, pipe: VectorUncertaintyPipeline, config: dict[str, Any]) -> Any:
        """The contexts file's ``x``: one reference vector per context."""
        path = config["generate"]["contexts"]
        if path in self._references:
            return self._references[path]
        x = read_vectors(path, "x")
        if x.shape != (len(pipe.run_contexts), pipe.dim):
            raise ConfigError(f"{path}: 'x' must hold one {pipe.dim}-vector per context, shape "
                              f"({len(pipe.run_contexts)}, {pipe.dim}); got {tuple(x.shape)}")
        self._references[path] = x
        return x

    def records(self, pipe: VectorUncertaintyPipeline, config: dict[str, Any], out: Any,
                ids: list[str]) -> list[ChunkRecord]:
        g = config["generate"]
        indices = chunk_indices(ids)
        contexts = context_of(indices, g["candidates"], len(pipe.run_contexts))
        vectors = out.samples[:, 0].cpu()  # one candidate per row (chunk_call)
        trailing: dict[str, Any] = {}
        if config["quality"] == "reference":
            reference = self.references(pipe, config)[contexts]
            trailing["reference_error"] = (vectors - reference).norm(dim=-1).double().numpy()
        scores = {name: values[:, 0] for name, values in out.scores.items()}
        leading = {"condition": contexts.numpy(),
                   "candidate": [i % g["candidates"] for i in indices]}
        records = scored_records(len(ids), scores, leading, trailing)
        payloads = [{"x": vector.tolist(), "cond": pipe.run_contexts[c].tolist()}
                    for vector, c in zip(vectors, contexts.tolist())]
        return list(zip(ids, payloads, records))
