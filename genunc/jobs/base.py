"""What a config-driven job does, written once for every modality.

A :class:`Job` turns a run config into a pipeline with its posterior (``genunc fit``) and into
an export of scored samples (``genunc generate``).  The steps that do not depend on the
modality live here: resolving ``zoo:<name>`` model specs, where the posterior lives and the
policy for it (load what was saved, or fit and save it), and the chunked, resumable export.  A
modality's job says only what is its own: how to load its model folder, what clean data the
posterior is fitted on, and how to turn one chunk of generation into export records.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar, Literal

from tqdm.auto import tqdm

from genunc.config import dump_config, flatten
from genunc.errors import ConfigError
from genunc.export import Export, ExportWriter
from genunc.jobs.shards import ProcessShard, merge_shards, shard_complete, shard_info, wait_for
from genunc.pipelines.base import UncertaintyPipeline
from genunc.posterior import POSTERIOR_DIR, HeadPosterior
from genunc.posterior.fingerprint import weights_digest
from genunc.posterior.io import remove_saved, saved_files, saved_kind

#: one sample of a chunk: (sample id, payload for the export's file, manifest record)
ChunkRecord = tuple[str, Any, dict[str, Any]]


class Job(ABC):
    """The modality-specific half of ``genunc fit`` / ``genunc generate``."""

    #: the config's ``modality`` value
    modality: ClassVar[str]
    #: export file format (``png``, ``sdf`` or ``json``)
    export_format: ClassVar[str]
    #: allowed values of the config's ``quality`` key (None: no quality columns)
    qualities: ClassVar[tuple[str | None, ...]] = (None,)
    #: the export column a quality option fills that ``genunc report`` judges scores against
    quality_column: ClassVar[str | None] = None
    #: the pipeline this job drives (its score catalogue names the export's columns)
    pipeline_class: ClassVar[type[UncertaintyPipeline]]

    @abstractmethod
    def shipped_models(self) -> dict[str, Path]:
        """``zoo:<name>`` -> folder of the models genunc ships for this modality."""

    @abstractmethod
    def load_pipeline(self, model_dir: Path, config: dict[str, Any]) -> UncertaintyPipeline:
        """The pipeline of `model_dir` with the config's feature extractor, no posterior yet."""

    @abstractmethod
    def fit_data(self, pipe: UncertaintyPipeline, config: dict[str, Any]) -> Any:
        """Clean data for the posterior fit, in a form ``pipe.fit_posterior`` accepts."""

    def fit_options(self, config: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of ``fit_posterior`` taken from the config's posterior section."""
        p = config["posterior"]
        _check_tail_options(config)
        return {"batch_size": p["batch_size"], "repeats": p["repeats"], "seed": p["seed"],
                "structure": p["structure"], "prior_precision": p["prior_precision"],
                "sigma_noise": p["sigma_noise"], "noise_groups": p["noise_groups"],
                **({"tail": p["tail"]} if p["tail"] is not None else {}),
                **({"rank": p["rank"]} if p["structure"] == "lowrank" else {})}

    def prepare_scores(self, pipe: UncertaintyPipeline, config: dict[str, Any]) -> None:
        """Whatever the scores need besides the posterior (e.g. the semantic score's unit)."""
        return None  # most scores need nothing more

    def call_args(self, pipe: UncertaintyPipeline, config: dict[str, Any],
                  ids: list[str]) -> dict[str, Any]:
        """The pipeline call that generates the samples `ids` (consecutive global indices: the
        call's ``first_sample`` is the first id, its seed the run's): the pipeline's own
        ``chunk_call`` for the config's ``generate`` section."""
        return pipe.chunk_call(config["generate"], chunk_indices(ids))

    @abstractmethod
    def records(self, pipe: UncertaintyPipeline, config: dict[str, Any], out: Any,
                ids: list[str]) -> Iterable[ChunkRecord]:
        """The export records of one chunk's pipeline output `out`."""

    def generate_chunk(self, pipe: UncertaintyPipeline, config: dict[str, Any],
                       ids: list[str]) -> Iterable[ChunkRecord]:
        return self.records(pipe, config, pipe(**self.call_args(pipe, config, ids)), ids)

    # ------------------------------------------------------------------ shared steps
    def model_dir(self, config: dict[str, Any]) -> Path:
        """The model folder a config names: ``zoo:<name>`` for a shipped model, else a path."""
        shipped = self.shipped_models()
        model = config["model"]
        names = ", ".join(f"zoo:{name}" for name in shipped)
        if model is None:
            raise ConfigError(f"the config names no model (model: {names} or a folder path)")
        if str(model).startswith("zoo:"):
            if model[4:] not in shipped:
                raise ConfigError(f"unknown zoo {self.modality} model {model!r}; shipped: {names}")
            return shipped[model[4:]]
        return Path(model)

    def build_pipeline(self, config: dict[str, Any],
                       posterior: Literal["load_or_fit", "load", "none"] = "load_or_fit",
                       progress: bool = True) -> UncertaintyPipeline:
        """The config's pipeline, with the posterior saved in its posterior folder (``load``);
        where none was saved, one is fitted and saved there (``load_or_fit``).  A saved
        posterior of other weights is refused, never silently refitted.  ``none``: no posterior
        (``genunc fit`` fits a new one whatever was saved)."""
        if config["quality"] not in self.qualities:
            raise ConfigError(f"{self.modality} quality is one of {list(self.qualities)}, got "
                              f"{config['quality']!r}")
        pipe = self.load_pipeline(self.model_dir(config), config)
        if posterior != "none":
            _check_tail_options(config)
            saved = pipe.load_or_fit_posterior(posterior_dir(config))
            if saved is not None:
                _check_kind(posterior_dir(config), config)
            if saved is None and posterior == "load_or_fit":
                self.fit_posterior(pipe, config, progress=progress)
            _use_posterior_as_configured(pipe, config)
        return pipe

    def fit_posterior(self, pipe: UncertaintyPipeline, config: dict[str, Any],
                      progress: bool = True) -> HeadPosterior:
        """Fit anew (``genunc fit``) and save to the config's posterior folder."""
        posterior = pipe.fit_posterior(self.fit_data(pipe, config), progress=progress,
                                       **self.fit_options(config))
        remove_saved(posterior_dir(config))  # a posterior of the other kind is replaced
        posterior.save(posterior_dir(config))
        return posterior

    def generate(self, config: dict[str, Any], progress: bool = True) -> Export:
        """``n_samples`` scored samples into the config's export folder, chunk by chunk.

        Chunk c holds samples ``c*chunk_size ...`` (ids zero-padded, the samples' global
        indices): sample i draws from the run seed's streams of index i and every chunk shares
        the run's head draws, so the export does not depend on the chunk size.  Chunks whose
        samples are all committed are skipped, so an interrupted run regenerates exactly what
        is missing.  Resuming an export made by another run (config,
        model weights or posterior) is refused.

        Under a launcher (``torchrun``, ``accelerate launch``) each process writes the shard of
        its block of indices (:mod:`genunc.jobs.shards`); the last to finish merges them into
        the config's export, which is then the one a single process would have written.
        """
        shard = ProcessShard.from_environment()
        # ranks > 0 never read a posterior folder rank 0 may be writing: they wait for it below
        pipe = self.build_pipeline(config, posterior="load" if shard.rank == 0 else "none",
                                   progress=progress)
        self.prepare_scores(pipe, config)
        g = config["generate"]
        n, size = g["n_samples"], g["chunk_size"]
        block = shard.indices(n)
        # every argument checked before anything is written (posterior fit, export folder)
        if len(block):
            first = [f"{i:06d}" for i in range(block.start, min(block.start + size, block.stop))]
            pipe(**self.call_args(pipe, config, first), check_only=True)
        if pipe.posterior is None and shard.rank > 0:  # rank 0 fits it; the others wait
            directory = posterior_dir(config)
            kind = "tail" if config["posterior"]["tail"] is not None else "head"
            _check_tail_options(config)
            if saved_kind(directory) not in (None, kind):  # the files awaited would never come
                _check_kind(directory, config)
            wait_for(saved_files(directory), POSTERIOR_WAIT_S,
                     "rank 0's posterior fit")
            pipe.load_or_fit_posterior(directory)
        if pipe.posterior is None:
            self.fit_posterior(pipe, config, progress=progress)
        _use_posterior_as_configured(pipe, config)
        posterior = pipe.posterior
        metadata = {
            "modality": config["modality"],
            "model": str(config["model"]),
            "posterior_fingerprint": None if posterior is None else posterior.fingerprint,
            "posterior_summary": None if posterior is None else posterior.summary(),
            "config": config,
            "config_sha256": hashlib.sha256(dump_config(config).encode()).hexdigest(),
            # what a resumed run must share with this one, entry by entry
            "identity": {**flatten(config), "model_weights_sha256": weights_digest(pipe.model),
                         "posterior_sha256": None if posterior is None else posterior.digest()},
        }
        out = Path(g["out"])
        if shard.distributed:
            metadata["shard"] = shard_info(shard, block)
            out = shard.directory(out)
        with ExportWriter(out, self.export_format, metadata=metadata) as writer:
            for start in tqdm(range(block.start, block.stop, size), desc="chunks",
                              disable=not progress):
                ids = [f"{i:06d}" for i in range(start, min(start + size, block.stop))]
                if all(i in writer for i in ids):
                    continue  # already exported by an earlier (interrupted) run
                for sample_id, payload, record in self.generate_chunk(pipe, config, ids):
                    writer.add(sample_id, payload, {"seed": g["seed"], **record})
        if shard.distributed:
            shards = [ProcessShard(r, shard.world_size).directory(g["out"])
                      for r in range(shard.world_size)]
            if all(shard_complete(p) for p in shards):  # the last process to finish merges
                return merge_shards(g["out"], shard.world_size)
        return Export(out)


#: how long ranks > 0 wait for rank 0 to fit and save the posterior (seconds)
POSTERIOR_WAIT_S = 6 * 3600.0

#: identity entries that may differ between exports whose samples could still coincide
_SAMPLE_FREE = ("generate.out", "generate.n_samples", "generate.chunk_size")


def shared_samples(first: dict[str, Any], second: dict[str, Any]) -> int:
    """How many samples two exports (their ``run.json`` metadata) share: sample i of a run
    draws from the streams of (seed, i), so exports equal in everything that decides a sample
    (seed included; size, folder and chunking aside) hold the same first samples.  0 where they
    cannot coincide (or nothing is known)."""
    a, b = first.get("identity"), second.get("identity")
    if not a or not b:
        return 0
    rest = set(a) | set(b)
    if any(a.get(k) != b.get(k) for k in rest if k not in _SAMPLE_FREE):
        return 0
    return min(a["generate.n_samples"], b["generate.n_samples"])


def chunk_indices(ids: list[str]) -> range:
    """The global sample indices of a chunk's (consecutive) ids."""
    return range(int(ids[0]), int(ids[0]) + len(ids))


def _use_posterior_as_configured(pipe: UncertaintyPipeline, config: dict[str, Any]) -> None:
    """Options of use, not of fit, that a loaded or fitted posterior takes from the config."""
    if pipe.posterior is not None and pipe.posterior.kind == "tail":
        pipe.posterior.predictive = config["posterior"]["predictive"]


def _check_tail_options(config: dict[str, Any]) -> None:
    """Options that only a tail posterior takes."""
    if config["posterior"]["structure"] == "lowrank" and config["posterior"]["tail"] is None:
        raise ConfigError("posterior.structure=lowrank is for a tail posterior "
                          "(posterior.tail); the head takes diag, kron or full")
    if config["posterior"]["predictive"] != "sample" and config["posterior"]["tail"] is None:
        raise ConfigError("posterior.predictive=linearised is for a tail posterior "
                          "(posterior.tail); head draws are linear in the weights already")


def _check_kind(directory: Path, config: dict[str, Any]) -> None:
    """A saved posterior must be the kind the config asks for (head, or a tail: posterior.tail)."""
    wanted = "head" if config["posterior"]["tail"] is None else "tail"
    if saved_kind(directory) != wanted:
        raise ConfigError(f"{directory} holds a posterior over the {saved_kind(directory)} but the "
                          f"config asks for one over the {'block' if wanted == 'tail' else 'head'} "
                          f"(posterior.tail={config['posterior']['tail']}); run genunc fit to "
                          "replace it, or set posterior.dir to another folder")


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


def scored_records(n: int, scores: dict[str, Any], leading: dict[str, Any] | None = None,
                   trailing: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One manifest record per sample of a chunk of `n`: its index in the chunk, the `leading`
    columns, every score, then the `trailing` columns (each an array or list of `n` values;
    a column that is None is left out)."""

    def cells(columns: dict[str, Any] | None, j: int) -> dict[str, Any]:
        return {name: values[j].item() if hasattr(values[j], "item") else values[j]
                for name, values in (columns or {}).items() if values is not None}

    return [{"index_in_chunk": j, **cells(leading, j),
             **{k: float(v[j]) for k, v in scores.items()}, **cells(trailing, j)}
            for j in range(n)]
