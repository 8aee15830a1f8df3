"""Config-driven jobs behind the CLI, one module per modality (same function names in each)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from genunc.config import dump_config
from genunc.errors import GenuncError
from genunc.export import Export, ExportWriter
from genunc.posterior import HeadPosterior
from genunc.posterior.laplace_head import POSTERIOR_DIR

#: ``(chunk index, sample ids) -> (sample id, payload, record)`` for each sample of the chunk
ChunkGenerator = Callable[[int, list[str]], Iterable[tuple[str, Any, dict[str, Any]]]]


def model_dir(config: dict[str, Any], shipped: dict[str, Path]) -> Path:
    """The model folder a config names: ``zoo:<name>`` for a shipped model, else a path."""
    model = config["model"]
    names = ", ".join(f"zoo:{name}" for name in shipped)
    if model is None:
        raise GenuncError(f"the config names no model (model: {names} or a folder path)")
    if str(model).startswith("zoo:"):
        if model[4:] not in shipped:
            raise GenuncError(f"unknown zoo {config['modality']} model {model!r}; shipped: {names}")
        return shipped[model[4:]]
    return Path(model)


def posterior_dir(config: dict[str, Any]) -> Path:
    """Where a config's posterior lives: ``posterior.dir``, else beside a model folder
    (``<model>/genunc_posterior``, which ``from_pretrained`` loads), else
    ``outputs/<zoo name>/posterior`` for shipped models (the package folder stays read-only)."""
    if config["posterior"]["dir"]:
        return Path(config["posterior"]["dir"])
    model = str(config["model"])
    if model.startswith("zoo:"):
        return Path("outputs") / model[4:] / "posterior"
    return Path(model) / POSTERIOR_DIR


def export_in_chunks(config: dict[str, Any], fmt: str, posterior: HeadPosterior | None,
                     generate_chunk: ChunkGenerator, progress: bool = True) -> Export:
    """Run a modality's generator chunk by chunk into one export directory (resumable).

    Chunk c holds samples ``c*chunk_size ...`` (ids zero-padded) and is generated with seed
    ``seed + c``; chunks whose samples are all committed are skipped, so an interrupted run
    regenerates exactly what is missing.  An export written with another config is refused.
    """
    g = config["generate"]
    metadata = {
        "modality": config["modality"],
        "model": str(config["model"]),
        "posterior_fingerprint": None if posterior is None else posterior.fingerprint,
        "posterior_summary": None if posterior is None else posterior.summary(),
        "config": config,
        "config_sha256": hashlib.sha256(dump_config(config).encode()).hexdigest(),
    }
    n, chunk = g["n_samples"], g["chunk_size"]
    with ExportWriter(g["out"], fmt, metadata=metadata) as writer:
        if writer.metadata.get("config_sha256") not in (None, metadata["config_sha256"]):
            raise GenuncError(f"{g['out']} was written with a different config; use a new `out`")
        for c, start in enumerate(tqdm(range(0, n, chunk), desc="chunks", disable=not progress)):
            ids = [f"{i:06d}" for i in range(start, min(start + chunk, n))]
            if all(i in writer for i in ids):
                continue  # already exported by an earlier (interrupted) run
            for sample_id, payload, record in generate_chunk(c, ids):
                writer.add(sample_id, payload, {"seed": g["seed"] + c, **record})
    return Export(g["out"])
