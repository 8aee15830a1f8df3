"""Config-driven molecule jobs behind ``genunc fit`` and ``genunc generate`` (modality: molecule).

``generate`` writes an SDF export: one record per molecule with every score and EDM's quality
flags (atom-stable fraction, molecule stability, RDKit validity, SMILES) as SD properties, plus
the manifest tables; ``genunc filter`` then works on it like on any export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from genunc.errors import GenuncError
from genunc.export import Export
from genunc.jobs import export_in_chunks, model_dir, posterior_dir
from genunc.metrics.molecule import evaluate_molecules, to_rdkit
from genunc.pipelines.molecule import MoleculeUncertaintySampler, encode
from genunc.posterior import HeadPosterior


def _model_dir(config: dict[str, Any]) -> Path:
    from genunc.zoo.qm9 import QM9_DIR

    return model_dir(config, {"qm9_edm": QM9_DIR})


def posterior_batches(config: dict[str, Any]) -> list[dict]:
    """Clean training molecules for the posterior fit, in padded batches.

    ``posterior.data`` is ``zoo:qm9_train`` (EDM's training split) or the path of a molecule
    cache file in genunc's QM9 format (:func:`genunc.data.qm9.save_cache`).
    """
    from genunc.data.qm9 import edm_split, load_cache, load_qm9

    p = config["posterior"]
    limit = p["max_samples"] or 2000
    if p["data"] == "zoo:qm9_train":
        data = load_qm9()
        ids = edm_split(len(data))["train"][:limit]
    elif Path(p["data"]).suffix == ".npz" and Path(p["data"]).exists():
        data = load_cache(Path(p["data"]))
        ids = np.arange(min(limit, len(data)))
    else:
        raise GenuncError(f"molecule posterior data {p['data']!r} is neither zoo:qm9_train nor an "
                          f"existing .npz molecule cache")
    size = p["batch_size"]
    return [encode(data, ids[i : i + size]) for i in range(0, len(ids), size)]


def build_sampler(config: dict[str, Any], fit_if_missing: bool = True,
                  progress: bool = True) -> MoleculeUncertaintySampler:
    if config["features"] not in (None, "descriptors"):
        raise GenuncError(f"molecule features are the invariant descriptors ('descriptors'); got "
                          f"{config['features']!r}")
    sampler = MoleculeUncertaintySampler.from_pretrained(_model_dir(config), device=config["device"])
    sampler.posterior = HeadPosterior.load_saved(posterior_dir(config), sampler.adapter.model)
    if sampler.posterior is None and fit_if_missing:
        fit_posterior(sampler, config, progress=progress)
    return sampler


def fit_posterior(sampler: MoleculeUncertaintySampler, config: dict[str, Any],
                  progress: bool = True) -> HeadPosterior:
    p = config["posterior"]
    posterior = sampler.fit_posterior(
        posterior_batches(config), repeats=p["repeats"], seed=p["seed"], structure=p["structure"],
        prior_precision=p["prior_precision"], sigma_noise=p["sigma_noise"], progress=progress)
    posterior.save(posterior_dir(config))
    return posterior


def generate(config: dict[str, Any], progress: bool = True) -> Export:
    """Generate ``n_samples`` scored molecules into an SDF export, chunk by chunk (resumable).

    Chunk c holds molecules ``c*chunk_size ...`` generated with seed ``seed + c``: an interrupted
    run regenerates exactly the missing chunks when started again.
    """
    g = config["generate"]
    if config["quality"] not in (None, "edm_metrics"):
        raise GenuncError(f"molecule quality is 'edm_metrics' or null, got {config['quality']!r}")
    sampler = build_sampler(config, progress=progress)

    def generate_chunk(c: int, ids: list[str]):
        out = sampler(len(ids), num_draws=g["num_draws"], steps=g["steps"],
                      scores=tuple(g["scores"]), sampler=g["sampler"] or "ddpm",
                      variability_steps=g["variability_steps"], nll_levels=g["nll_levels"],
                      seed=g["seed"] + c, chunk_size=len(ids), progress=False)
        report = evaluate_molecules(out.molecules) if config["quality"] else None
        for j, sample_id in enumerate(ids):
            positions, types = out.molecules[j]
            record: dict[str, Any] = {"index_in_chunk": j, "n_atoms": int(len(types))}
            record.update({k: float(v[j]) for k, v in out.scores.items()})
            if report is not None:
                record.update({"atom_stable_fraction": float(report.atom_stable_fraction[j]),
                               "molecule_stable": bool(report.molecule_stable[j]),
                               "valid": bool(report.valid[j]), "smiles": report.smiles[j]})
            yield sample_id, to_rdkit(positions, types), record

    return export_in_chunks(config, "sdf", sampler.posterior, generate_chunk, progress)
