"""Generate QM9-like molecules with uncertainty, export them as a scored SDF, keep the confident ones.

    python examples/filter_molecules.py --n 128 --keep 0.8
    python examples/filter_molecules.py --edm path/to/edm_qm9 --n 128 --keep 0.8
    python examples/filter_molecules.py --edm path/to/edm_qm9 --tail 1 --n 128 --keep 0.8
    python examples/filter_molecules.py --geoldm path/to/geoldm_qm9 --n 128 --keep 0.8
    python examples/filter_molecules.py --sdf outputs/filter_molecules/export/samples.sdf --keep 0.5

The first form loads the shipped QM9 denoiser (``--edm``: an EDM output folder with
``args.pickle`` and ``generative_model_ema.npy`` instead; its head posterior covers the atom-type
noise, so its variability is the atom-type part; ``--geoldm``: a GeoLDM output folder, whose
latents are sampled, decoded by its VAE and scored, the posterior in its latent dynamics), fits
(or reloads) its head posterior (``--tail k``: a block posterior over the last k blocks and the
head instead, which for EDM covers the position noise too; its variability is Monte Carlo over
the draws), generates ``--n`` molecules scored by noise-prediction variability (and the
likelihood baseline), writes an export whose SDF records carry every score and EDM's quality
flags, then writes ``kept.sdf`` with the ``--keep`` least uncertain molecules and prints quality
before and after.
The second form only filters an existing scored SDF file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from genunc.data.qm9 import edm_split, load_cache, load_qm9
from genunc.errors import GenuncError
from genunc.export import ExportWriter
from genunc.export.sdf import filter_sdf, read_sdf_scores, record_properties, split_records
from genunc.metrics.molecule import evaluate_molecules, to_rdkit
from genunc.pipelines import MoleculeUncertaintyPipeline
from genunc.zoo.shipped import QM9_DIR


def training_batches(pipe: MoleculeUncertaintyPipeline, data_path: str | None,
                     n_fit: int) -> list[dict]:
    """Clean molecules for the posterior: a molecule cache, or QM9's training split."""
    if data_path:
        data = load_cache(Path(data_path))
        ids = np.arange(min(n_fit, len(data)))
    else:
        data = load_qm9()
        ids = edm_split(len(data))["train"][:n_fit]
    return [pipe.adapter.encode(data, ids[i : i + 64]) for i in range(0, len(ids), 64)]


def stability_summary(path: Path) -> str:
    props = [record_properties(r) for r in split_records(Path(path).read_text())]
    if not props:
        return "0 molecules"
    stable = np.mean([p.get("molecule_stable") == "1" for p in props])
    valid = np.mean([p.get("valid") == "1" for p in props])
    atoms = np.mean([float(p.get("atom_stable_fraction", "nan")) for p in props])
    return (f"{len(props):>5} molecules: molecule-stable {stable:6.1%}, atom-stable "
            f"{atoms:6.1%}, valid {valid:6.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--sdf", help="only filter this scored SDF file")
    parser.add_argument("--model", default=str(QM9_DIR), help="model folder (default: shipped)")
    parser.add_argument("--edm", help="an EDM output folder (args.pickle + generative_model_ema.npy); "
                        "replaces --model")
    parser.add_argument("--geoldm", help="a GeoLDM output folder (args.pickle + generative_model_ema.npy); "
                        "replaces --model")
    parser.add_argument("--posterior-data", help="molecule cache .npz for the posterior fit "
                        "(default: QM9's training split)")
    parser.add_argument("--n-fit", type=int, default=2000)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--tail", type=int, help="a block posterior over the last TAIL blocks and "
                        "the head (EDM: positions too) instead of the head alone")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--score", default="variability")
    parser.add_argument("--keep", type=float, default=0.8, help="fraction to keep")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/filter_molecules")
    args = parser.parse_args()
    out = Path(args.out)
    if args.edm and args.geoldm:
        parser.error("--edm and --geoldm name one model folder each: pass one")
    if args.edm or args.geoldm:
        args.model = args.edm or args.geoldm

    if args.sdf:
        source = Path(args.sdf)
    else:
        pipe = MoleculeUncertaintyPipeline.from_pretrained(args.model)
        # a posterior cached here for other weights (a retrained model) is simply refitted
        # (a cached posterior of the other scope, head or block, is refitted too)
        pipe.load_or_fit_posterior(out / "posterior",
                                   training_batches(pipe, args.posterior_data, args.n_fit),
                                   stale="refit", **({"tail": args.tail} if args.tail else {}))
        identity = {"model": str(args.model), "n": args.n, "draws": args.draws,
                    "steps": args.steps, "seed": args.seed, "tail": args.tail,
                    "posterior_sha256": pipe.posterior.digest()}
        metadata = {"modality": "molecule", "model": args.model, "identity": identity,
                    "posterior_fingerprint": pipe.posterior.fingerprint}
        # opened before generating: an export made with other settings is refused up front
        with ExportWriter(out / "export", "sdf", metadata=metadata) as writer:
            result = pipe(args.n, num_draws=args.draws, num_inference_steps=args.steps,
                          seed=args.seed, scores=("variability", "denoising_loss", "random"),
                          variance="monte_carlo" if args.tail else "exact")
            report = evaluate_molecules(result.molecules)
            for i, (positions, types) in enumerate(result.molecules):
                record = {"seed": args.seed, "n_atoms": len(types),
                          **{k: float(v[i]) for k, v in result.scores.items()},
                          "atom_stable_fraction": float(report.atom_stable_fraction[i]),
                          "molecule_stable": bool(report.molecule_stable[i]),
                          "valid": bool(report.valid[i]), "smiles": report.smiles[i]}
                writer.add(f"{i:06d}", to_rdkit(positions, types), record)
        source = out / "export" / "samples.sdf"

    kept = out / "kept.sdf"
    info = filter_sdf(source, kept, args.score, fraction=args.keep)
    _, scores = read_sdf_scores(kept, args.score)
    print(f"all  {stability_summary(source)}")
    print(f"kept {stability_summary(kept)}   ({args.score} <= {scores.max():.4g})")
    print(f"wrote {kept} ({info['kept']} of {info['total']} records)")


if __name__ == "__main__":
    try:
        main()
    except GenuncError as err:  # a user mistake: one line, not a traceback
        sys.exit(f"filter_molecules: error: {err}")
