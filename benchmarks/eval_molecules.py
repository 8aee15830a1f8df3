"""Does genunc's uncertainty find the bad molecules?  The protocol of arXiv 2606.13451, small scale.

Prints four tables:

1. quality of the reference model's molecules (atom / molecule stability, RDKit validity,
   uniqueness, novelty vs training SMILES) beside the real-data row (EDM's bond tables on real
   QM9 molecules; published: 99.0 / 95.2 / 97.7);
2. Spearman correlation between each score and molecule stability, atom stability and validity,
   and the AUROC of each score for "molecule unstable";
3. the metrics after dropping the 10 / 20 / 50 % most uncertain molecules, per score, against
   random drops (mean over 10 seeds);
4. cost, in one run on a subset: plain generation, + variability, + the likelihood baseline, and
   the semantic score (M + 1 generations), with the semantic score's own correlations.

Usage:  python benchmarks/eval_molecules.py [--n 1000] [--draws 5] [--steps 250] [--cost-n 64]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from genunc import filtering
from genunc.data.qm9 import edm_split, load_qm9
from genunc.metrics.molecule import canonical_training_smiles, evaluate_molecules
from genunc.pipelines import MoleculeUncertaintyPipeline
from genunc.scores import random_scores
from genunc.zoo.qm9 import QM9_DIR

SCORES = ("variability", "variability_pos", "variability_type", "denoising_loss", "random")
QUALITY = ("molecule_stable", "atom_stable_fraction", "valid")


def load_sampler(model: Path, out: Path, train, n_fit: int) -> MoleculeUncertaintyPipeline:
    """The model with the posterior cached in `out` (fitted there on `n_fit` training molecules)."""
    pipe = MoleculeUncertaintyPipeline.from_pretrained(model, posterior=None)
    batches = [pipe.adapter.encode(train, np.arange(i, min(i + 64, n_fit)))
               for i in range(0, n_fit, 64)]
    pipe.load_or_fit_posterior(out / "posterior", batches, stale="refit")
    return pipe


def quality_of(report) -> dict[str, np.ndarray]:
    return {"molecule_stable": report.molecule_stable.astype(float),
            "atom_stable_fraction": report.atom_stable_fraction, "valid": report.valid.astype(float)}


def metric_row(molecules, idx, train_smiles) -> list[float]:
    r = evaluate_molecules([molecules[i] for i in idx], train_smiles)
    return [r.atom_stability, r.molecule_stability, r.validity, r.valid_and_unique]


def print_quality(name: str, report) -> None:
    novelty = "" if report.novelty is None else f"{report.novelty:>9.1%}"
    print(f"{name:<30}{report.atom_stability:>9.1%}{report.molecule_stability:>9.1%}"
          f"{report.validity:>9.1%}{report.uniqueness:>9.1%}{report.valid_and_unique:>9.1%}{novelty}")


def _mean_report(reports):
    from types import SimpleNamespace

    keys = ("atom_stability", "molecule_stability", "validity", "uniqueness", "valid_and_unique")
    return SimpleNamespace(**{k: float(np.mean([getattr(r, k) for r in reports])) for k in keys},
                           novelty=None)


def _cell(value: float, width: int) -> str:
    """A correlation, or 'constant' where the quality column has one value (rho undefined)."""
    return f"{'constant':>{width}}" if np.isnan(value) else f"{value:>{width}.3f}"


def correlation_table(scores: dict[str, np.ndarray], quality: dict[str, np.ndarray]) -> None:
    failures = {"unstable": quality["molecule_stable"] < 0.5, "invalid": quality["valid"] < 0.5}
    print(f"{'score':<20}" + "".join(f"{q:>22}" for q in QUALITY)
          + "".join(f"{'AUROC(' + f + ')':>17}" for f in failures))
    for name, values in scores.items():
        rhos = [filtering.spearman(values, quality[q]) for q in QUALITY]
        aucs = [filtering.auroc(values, failed) for failed in failures.values()]
        print(f"{name:<20}" + "".join(_cell(r, 22) for r in rhos)
              + "".join(_cell(a, 17) for a in aucs))
    constant = [q for q in QUALITY if np.ptp(quality[q]) == 0]
    if constant:
        print(f"  ('constant': every molecule has the same {', '.join(constant)}, so no score can "
              f"rank by it)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=str(QM9_DIR), help="model folder (default: shipped)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    parser.add_argument("--n-fit", type=int, default=2000, help="training molecules for the posterior")
    parser.add_argument("--n-real", type=int, default=1000, help="real molecules for the calibration row")
    parser.add_argument("--cost-n", type=int, default=64, help="molecules for the cost table (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/eval_molecules")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)

    data = load_qm9()
    split = edm_split(len(data))
    train = data.subset(split["train"])
    train_smiles = canonical_training_smiles(train.smiles)
    sampler = load_sampler(Path(args.model), out, train, args.n_fit)
    print(f"posterior: {sampler.posterior.summary()}")

    # ---------------------------------------------------------------- generation + scores
    start = time.perf_counter()
    result = sampler(args.n, num_draws=args.draws, num_inference_steps=args.steps, sampler=args.sampler,
                     scores=("variability", "denoising_loss", "random"), seed=args.seed)
    seconds = time.perf_counter() - start
    report = evaluate_molecules(result.molecules, train_smiles)
    quality = quality_of(report)
    real_ids = np.random.default_rng(args.seed).choice(len(train), args.n_real, replace=False)
    real = evaluate_molecules([train.molecule(i) for i in real_ids], train_smiles)

    print(f"\n{args.n} molecules, {args.steps} {args.sampler.upper()} steps, M = {args.draws}, "
          f"seed {args.seed} ({seconds:.0f} s)")
    print(f"{'':<30}{'atom st':>9}{'mol st':>9}{'valid':>9}{'unique':>9}{'V*U':>9}{'novel':>9}")
    print_quality(f"real QM9 ({args.n_real} train mols)", real)
    print("  (published real-data row: atom 99.0%, molecule 95.2%, valid 97.7%)")
    print_quality("reference model", report)

    print(f"\nSpearman rho, score vs quality ({args.n} molecules; negative = score finds bad ones)")
    correlation_table({k: result.scores[k] for k in SCORES}, quality)

    print("\nmetrics after dropping the most uncertain (atom st / mol st / valid / V*U)")
    print(f"{'drop':<8}{'score':<20}{'atom st':>9}{'mol st':>9}{'valid':>9}{'V*U':>9}")
    for drop in (0.1, 0.2, 0.5):
        keep_fraction = 1 - drop
        for name in ("variability", "variability_pos", "variability_type", "denoising_loss"):
            row = metric_row(result.molecules,
                             filtering.keep_fraction(result.scores[name], keep_fraction), train_smiles)
            print(f"{drop:<8.0%}{name:<20}" + "".join(f"{v:>9.1%}" for v in row))
        rand = np.mean([metric_row(result.molecules, filtering.keep_fraction(
            random_scores(s, range(args.n)), keep_fraction), train_smiles)
            for s in range(10)], axis=0)
        print(f"{drop:<8.0%}{'random (10 seeds)':<20}" + "".join(f"{v:>9.1%}" for v in rand))

    # ---------------------------------------------------------------- cost + semantic
    if args.cost_n > 0:
        cost_and_semantic(sampler, args)


def cost_and_semantic(sampler: MoleculeUncertaintyPipeline, args: argparse.Namespace) -> None:
    n = args.cost_n
    common = dict(num_draws=args.draws, num_inference_steps=args.steps, seed=args.seed + 1, progress=False)

    def timed(**kwargs):
        tic = time.perf_counter()
        res = sampler(n, sampler=args.sampler, **common, **kwargs)
        return time.perf_counter() - tic, res

    t_plain, _ = timed(scores=("random",))
    t_var, _ = timed(scores=("variability",))
    t_nll, nll = timed(scores=("denoising_loss",))
    t_sem, sem = timed(scores=("semantic", "variability"))
    print(f"\ncost on {n} molecules (same run, CPU, {torch.get_num_threads()} threads)")
    print(f"{'method':<40}{'seconds':>9}{'x plain':>9}")
    for name, t in [("plain generation", t_plain), ("+ variability (M heads per step)", t_var),
                    (f"+ denoising_loss ({nll.timings['denoising_loss']:.1f} s of it)", t_nll),
                    ("semantic (M+1 generations) + variability", t_sem)]:
        print(f"{name:<40}{t:>9.1f}{t / t_plain:>9.2f}")
    sem_report = evaluate_molecules(sem.molecules)
    draw_reports = [evaluate_molecules(d) for d in sem.draw_molecules]
    print(f"\nperturbed generations keep MAP quality? (semantic run, {n} molecules)")
    print(f"{'':<30}{'atom st':>9}{'mol st':>9}{'valid':>9}{'unique':>9}{'V*U':>9}")
    print_quality("MAP head", sem_report)
    print_quality(f"posterior draws (mean of {len(draw_reports)})", _mean_report(draw_reports))
    sem_quality = quality_of(sem_report)
    print(f"\nsemantic vs variability on the same {n} molecules (Spearman rho vs quality):")
    correlation_table({k: sem.scores[k] for k in ("semantic", "variability")}, sem_quality)


if __name__ == "__main__":
    main()
