"""The molecule job: an equivariant denoiser folder (or the shipped QM9 model) to a scored SDF.

``generate`` writes an SDF export: one record per molecule with every score and EDM's quality
flags (atom-stable fraction, molecule stability, RDKit validity, SMILES) as SD properties, plus
the manifest tables; ``genunc filter`` then works on it like on any export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from genunc.errors import ConfigError
from genunc.features.molecule import features_of
from genunc.jobs.base import ChunkRecord, Job, scored_records
from genunc.jobs.shards import process_device
from genunc.metrics.molecule import evaluate_molecules, to_rdkit
from genunc.pipelines.molecule import MoleculeUncertaintyPipeline


class MoleculeJob(Job):
    modality = "molecule"
    export_format = "sdf"
    qualities = (None, "edm_metrics")
    quality_column = "molecule_stable"
    pipeline_class = MoleculeUncertaintyPipeline

    def shipped_models(self) -> dict[str, Path]:
        from genunc.zoo.shipped import QM9_DIR

        return {"qm9_edm": QM9_DIR}

    def load_pipeline(self, model_dir: Path, config: dict[str, Any]) -> MoleculeUncertaintyPipeline:
        if config["features"] not in (None, "descriptors"):
            raise ConfigError(f"molecule features are the invariant descriptors ('descriptors'); "
                              f"got {config['features']!r}")
        device = process_device(config["device"])
        return MoleculeUncertaintyPipeline.from_pretrained(model_dir, posterior=None, device=device)

    def training_set(self, config: dict[str, Any]) -> tuple[Any, np.ndarray]:
        """Clean training molecules and the ids used: ``zoo:qm9_train`` (EDM's training split)
        or a molecule cache file in genunc's QM9 format (:func:`genunc.data.qm9.save_cache`)."""
        from genunc.data.qm9 import edm_split, load_cache, load_qm9

        p = config["posterior"]
        limit = p["max_samples"] or 2000
        if p["data"] == "zoo:qm9_train":
            data = load_qm9()
            return data, edm_split(len(data))["train"][:limit]
        if Path(p["data"]).suffix == ".npz" and Path(p["data"]).exists():
            data = load_cache(Path(p["data"]))
            return data, np.arange(min(limit, len(data)))
        raise ConfigError(f"molecule posterior data {p['data']!r} is neither zoo:qm9_train nor "
                          f"an existing .npz molecule cache")

    def fit_data(self, pipe: MoleculeUncertaintyPipeline, config: dict[str, Any]) -> list[dict]:
        """The training molecules in padded batches."""
        data, ids = self.training_set(config)
        size = config["posterior"]["batch_size"]
        return [pipe.adapter.encode(data, ids[i : i + size]) for i in range(0, len(ids), size)]

    def prepare_scores(self, pipe: MoleculeUncertaintyPipeline, config: dict[str, Any]) -> None:
        """The semantic score measures spread in units of the training molecules' descriptor SD."""
        if "semantic" in config["generate"]["scores"]:
            data, ids = self.training_set(config)
            pipe.set_feature_scale(features_of([data.molecule(int(i)) for i in ids]))

    def records(self, pipe: MoleculeUncertaintyPipeline, config: dict[str, Any], out: Any,
                ids: list[str]) -> list[ChunkRecord]:
        trailing: dict[str, Any] = {}
        if config["quality"]:
            report = evaluate_molecules(out.molecules)
            trailing = {"atom_stable_fraction": report.atom_stable_fraction.astype(float),
                        "molecule_stable": report.molecule_stable.astype(bool),
                        "valid": report.valid.astype(bool), "smiles": report.smiles}
        n_atoms = [len(types) for _, types in out.molecules]
        records = scored_records(len(ids), out.scores, {"n_atoms": n_atoms}, trailing)
        return [(i, to_rdkit(*molecule), record)
                for i, molecule, record in zip(ids, out.molecules, records)]
