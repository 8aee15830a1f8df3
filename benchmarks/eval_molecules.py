"""Does genunc's uncertainty find the bad molecules?  The protocol of arXiv 2606.13451, small
scale, with the confounder controlled: molecule size.

Protocol: a validation seed chooses the variability step window and target (by the
within-atom-count Spearman correlation with the atom-stable fraction); a test seed (disjoint
streams) reports everything, with bootstrap 95% intervals (1,000 resamples of the test
molecules).  Tables:

1. quality of the reference model's molecules (atom / molecule stability, RDKit validity,
   uniqueness, novelty vs training SMILES) beside the real-data row;
2. per score: Spearman with the atom count, then with atom stability and validity raw, partial
   (atom count controlled: ranks regressed on its rank) and within atom-count bins (weighted mean
   of per-size correlations, bins of >= 20), and AUROC(invalid) raw;
3. metrics after dropping the 20% most uncertain, globally and within each atom count, against
   the random score (its own stream);
4. the semantic score (``--semantic-n``) on the first test molecules, whose MAP generations are
   those molecules;
5. cost (``--cost-n``): plain generation, exact and Monte-Carlo variability on the same
   molecules, and the Monte-Carlo score's rank agreement with the exact one;
6. the one-trajectory semantic score ``semantic_x0`` (``--x0-draws``, default 16; 0 skips it):
   its steps (a contiguous window of every 5th step and the last, mean of the per-step
   entropies) chosen on the validation molecules by the partial (size-controlled) Spearman
   with the atom-stable fraction; on the test molecules of table 4, paired against the full
   semantic score (differences of partial rho and AUROC(invalid), bootstrap intervals), its
   Spearman with it and its Monte-Carlo error; its cost against plain generation on
   ``--x0-cost-n`` molecules (one run each).

Usage:  OMP_NUM_THREADS=1 python benchmarks/eval_molecules.py [--n-val 300] [--n-test 700]
        [--steps 250] [--cost-n 32] [--semantic-n 150] [--x0-draws 16] [--x0-cost-n 32]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from protocol import (  # benchmarks/protocol.py
    TEST_SEED,
    VAL_SEED,
    cached,
    choose_x0_steps,
    windowed_variability,
    windows,
    x0_grid,
)

from genunc import filtering
from genunc.data.qm9 import edm_split, load_qm9
from genunc.metrics.molecule import canonical_training_smiles, evaluate_molecules
from genunc.metrics.stats import binned_spearman, bootstrap_interval, partial_spearman, spearman
from genunc.pipelines import MoleculeUncertaintyPipeline
from genunc.zoo.shipped import QM9_DIR

SCORES = ("variability", "variability_pos", "variability_type", "denoising_loss", "random")
MIN_BIN = 20


def load_sampler(model: Path, out: Path, train, n_fit: int,
                 tail: int | None = None) -> MoleculeUncertaintyPipeline:
    """The model with the posterior cached in `out` (fitted there on `n_fit` training molecules;
    ``tail``: over the last `tail` interactions and the head)."""
    pipe = MoleculeUncertaintyPipeline.from_pretrained(model, posterior=None)
    batches = [pipe.adapter.encode(train, np.arange(i, min(i + 64, n_fit)))
               for i in range(0, n_fit, 64)]
    pipe.load_or_fit_posterior(out / "posterior", batches, stale="refit", tail=tail)
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


def ci(stat, *arrays, boot: int) -> str:
    est, low, high = bootstrap_interval(stat, *arrays, n_boot=boot)
    return f"{est:+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default=str(QM9_DIR), help="model folder (default: shipped)")
    parser.add_argument("--n-val", type=int, default=300)
    parser.add_argument("--n-test", type=int, default=700)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--sampler", default="ddpm", choices=["ddpm", "ddim"])
    parser.add_argument("--n-fit", type=int, default=2000, help="training molecules for the posterior")
    parser.add_argument("--n-real", type=int, default=1000, help="real molecules for the calibration row")
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--cost-n", type=int, default=32, help="molecules for the cost table (0: skip)")
    parser.add_argument("--draws", type=int, default=5, help="M for the Monte-Carlo cost row and "
                        "the semantic score")
    parser.add_argument("--tail", type=int, default=None,
                        help="a posterior over the last TAIL interactions and the head (Monte-Carlo "
                        "variability over --draws draws); use another --out")
    parser.add_argument("--semantic-n", type=int, default=150,
                        help="first test molecules also scored by the semantic score (0: skip)")
    parser.add_argument("--x0-draws", type=int, default=16,
                        help="M of semantic_x0 (0: skip it; needs --semantic-n)")
    parser.add_argument("--x0-steps", default=None,
                        help="comma-separated steps of semantic_x0 instead of the validation "
                        "choice (e.g. the choice of an earlier run, to try more draws)")
    parser.add_argument("--x0-cost-n", type=int, default=32,
                        help="molecules of semantic_x0's cost table (0: none)")
    parser.add_argument("--out", default="outputs/eval_molecules")
    args = parser.parse_args()
    out = Path(args.out)

    data = load_qm9()
    split = edm_split(len(data))
    train = data.subset(split["train"])
    train_smiles = canonical_training_smiles(train.smiles)
    sampler = load_sampler(Path(args.model), out, train, args.n_fit, tail=args.tail)
    # a block posterior has no closed-form variance: variability over the M draws
    tail_extra = {"variance": "monte_carlo", "num_draws": args.draws} if args.tail else {}
    summary = sampler.posterior.summary()
    print(f"posterior: prior precision {summary['prior_precision']:.4g}, sigma "
          f"{summary.get('sigma_noise')}, relative perturbation {summary['relative_perturbation']:.3%}")

    runs, runs_seconds = {}, {}
    for name, seed, n in (("validation", VAL_SEED, args.n_val), ("test", TEST_SEED, args.n_test)):
        def make(n=n, seed=seed) -> dict:
            out = sampler(n, num_inference_steps=args.steps, sampler=args.sampler, seed=seed,
                          scores=("variability", "denoising_loss", "random"), progress=False,
                          **tail_extra)
            return {k: getattr(out, k) for k in ("molecules", "n_atoms", "scores",
                                                 "variability_per_step", "variability_timesteps")}

        res = cached(out, f"{run_key(sampler, n, seed, args)}_scores", make)
        runs[name] = (res, evaluate_molecules(res.molecules, train_smiles))
        runs_seconds[name] = res.seconds
        print(f"{name}: seed {seed}, {n} molecules ({runs_seconds[name]:.0f} s)")

    val, val_report = runs["validation"]
    val_q = quality_of(val_report)
    table = {}
    for wname, rows in windows(args.steps).items():
        for target in ("noise", "clean"):
            values = windowed_variability(val, sampler.adapter.alphas_cumprod, rows, target)
            table[(wname, target)] = binned_spearman(values, val_q["atom_stable_fraction"],
                                                     val.n_atoms, min_size=MIN_BIN)[0]
    print("\nvariability on the validation seed: within-size Spearman with atom stability "
          "(more negative = finds worse molecules)")
    for (wname, tname), value in table.items():
        print(f"  {wname:14s} {tname:5s} {value:+.3f}")
    window, target = min(table, key=lambda k: np.nan_to_num(table[k], nan=np.inf))
    print(f"chosen: {window}, target {target}")
    x0_steps = None
    if args.x0_draws and args.semantic_n:
        x0_steps = [int(v) for v in args.x0_steps.split(",")] if args.x0_steps else \
            choose_molecule_x0_steps(sampler, val, val_q, args)

    res, report = runs["test"]
    quality = quality_of(report)
    real_ids = np.random.default_rng(0).choice(len(train), args.n_real, replace=False)
    real = evaluate_molecules([train.molecule(i) for i in real_ids], train_smiles)
    print(f"\nTEST seed {TEST_SEED}: {args.n_test} molecules, {args.steps} {args.sampler.upper()} steps")
    print(f"{'':<30}{'atom st':>9}{'mol st':>9}{'valid':>9}{'unique':>9}{'V*U':>9}{'novel':>9}")
    print_quality(f"real QM9 ({args.n_real} train mols)", real)
    print_quality("reference model", report)

    scores = {k: res.scores[k] for k in SCORES}
    scores[f"variability ({window}, {target}; val.)"] = windowed_variability(
        res, sampler.adapter.alphas_cumprod, windows(args.steps)[window], target)
    sizes = res.n_atoms.astype(float)
    atom_st, valid = quality["atom_stable_fraction"], quality["valid"]
    invalid = valid < 0.5
    print(f"\nbootstrap 95% intervals ({args.boot} resamples); partial: atom count controlled; "
          f"binned: within atom counts with >= {MIN_BIN} molecules")
    print("| score | rho(size) | rho(atom st) raw | rho(atom st) partial | rho(atom st) binned | "
          "rho(valid) raw | rho(valid) partial | AUROC(invalid) |")
    print("|---|---|---|---|---:|---|---|---|")
    for name, values in scores.items():
        binned, bins = binned_spearman(values, atom_st, res.n_atoms, min_size=MIN_BIN)
        print(f"| {name} | {ci(spearman, values, sizes, boot=args.boot)} "
              f"| {ci(spearman, values, atom_st, boot=args.boot)} "
              f"| {ci(partial_spearman, values, atom_st, sizes, boot=args.boot)} | {binned:+.3f} "
              f"| {ci(spearman, values, valid, boot=args.boot)} "
              f"| {ci(partial_spearman, values, valid, sizes, boot=args.boot)} "
              f"| {ci(filtering.auroc, values, invalid, boot=args.boot)} |")
    print(f"  ({bins} atom-count bins used)")

    print("\nmetrics after dropping the 20% most uncertain (atom st / mol st / valid / V*U)")
    print(f"{'score':<44}{'selection':<14}{'atom st':>9}{'mol st':>9}{'valid':>9}{'V*U':>9}")
    print(f"{'(all molecules)':<44}{'':<14}" + "".join(
        f"{v:>9.1%}" for v in metric_row(res.molecules, np.arange(args.n_test), train_smiles)))
    for name, values in scores.items():
        for how, idx in (("global", filtering.keep_fraction(values, 0.8)),
                         ("within size", filtering.keep_fraction_within(values, res.n_atoms, 0.8))):
            print(f"{name:<44}{how:<14}" + "".join(
                f"{v:>9.1%}" for v in metric_row(res.molecules, idx, train_smiles)))
    kept_sizes = sizes[filtering.keep_fraction(scores["variability"], 0.8)].mean()
    print(f"mean atom count: all {sizes.mean():.2f}, kept 80% by variability {kept_sizes:.2f}")

    saved = {f"score/{k}": np.asarray(v) for k, v in scores.items()}
    if args.semantic_n > 0:
        saved["score/semantic"] = semantic_table(sampler, res, scores, quality, train, args)
        if x0_steps is not None:
            saved["score/semantic_x0"] = x0_table(sampler, res, saved["score/semantic"], quality,
                                                  x0_steps, args)
    # per-molecule test scores and labels, for a paired head-vs-block comparison
    # (benchmarks/compare_scopes_molecules.py)
    np.savez(out / f"test_s{TEST_SEED}_n{args.n_test}_t{args.steps}.npz", n_atoms=res.n_atoms,
             atom_stable_fraction=atom_st, valid=valid, seconds=runs_seconds["test"],
             tail=-1 if args.tail is None else args.tail, **saved)
    if args.cost_n > 0 and not args.tail:
        cost_table(sampler, args)


def semantic_table(sampler: MoleculeUncertaintyPipeline, res, scores: dict[str, np.ndarray],
                   quality: dict[str, np.ndarray], train, args: argparse.Namespace) -> np.ndarray:
    """The semantic score (M + 1 generations each) on the first test molecules: its MAP
    generations are those molecules (same streams), so the labels above apply unchanged.
    Returns the semantic scores."""
    from genunc.features.molecule import features_of

    n = min(args.semantic_n, args.n_test)
    sampler.set_feature_scale(features_of([train.molecule(i) for i in range(args.n_fit)]))
    def make() -> dict:
        out = sampler(n, num_inference_steps=args.steps, sampler=args.sampler, seed=TEST_SEED,
                      num_draws=args.draws, scores=("semantic",), progress=False)
        return {"molecules": out.molecules, "scores": out.scores}

    sem = cached(Path(args.out), f"{run_key(sampler, n, TEST_SEED, args)}_semanticm{args.draws}", make)
    seconds = sem.seconds
    same = all(np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], atol=1e-4)
               for a, b in zip(sem.molecules, res.molecules[:n]))
    if not same:
        raise SystemExit("the semantic run's MAP molecules differ from the test molecules")
    rows = {"semantic": sem.scores["semantic"], **{k: v[:n] for k, v in scores.items()}}
    sizes = res.n_atoms[:n].astype(float)
    atom_st, invalid = quality["atom_stable_fraction"][:n], quality["valid"][:n] < 0.5
    print(f"\nsemantic score on the first {n} test molecules (M = {args.draws}, {seconds:.0f} s; "
          f"their MAP generations are the molecules above), bootstrap 95% intervals")
    print("| score | rho(size) | rho(atom st) raw | rho(atom st) partial | AUROC(invalid) |")
    print("|---|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {ci(spearman, values, sizes, boot=args.boot)} "
              f"| {ci(spearman, values, atom_st, boot=args.boot)} "
              f"| {ci(partial_spearman, values, atom_st, sizes, boot=args.boot)} "
              f"| {ci(filtering.auroc, values, invalid, boot=args.boot)} |")
    return np.asarray(sem.scores["semantic"])


def run_key(sampler: MoleculeUncertaintyPipeline, n: int, seed: int, args) -> str:
    """What decides a run of this script's: the posterior, sizes, seed, steps, sampler."""
    tail = f"_tail{args.tail}m{args.draws}" if args.tail else ""
    return f"{sampler.posterior.digest()[:12]}_n{n}_s{seed}_t{args.steps}_{args.sampler}{tail}"


def x0_call(sampler: MoleculeUncertaintyPipeline, n: int, seed: int, steps: list[int], args,
            like=None, cache: bool = True):
    """semantic_x0 alone on molecules 0..n-1 of `seed` (the MAP trajectory's own molecules:
    checked against `like`, a run's molecules, when given); cached unless timed."""
    def make() -> dict:
        out = sampler(n, num_inference_steps=args.steps, sampler=args.sampler, seed=seed,
                      num_draws=args.x0_draws, scores=("semantic_x0",), x0_steps=steps,
                      progress=False)
        return {k: getattr(out, k) for k in ("molecules", "scores", "semantic_x0_per_step")}

    key = f"{run_key(sampler, n, seed, args)}_x0m{args.x0_draws}_" + "-".join(map(str, steps))
    out = cached(Path(args.out), key, make) if cache else SimpleNamespace(**make())
    if like is not None and not all(np.array_equal(a[1], b[1]) and np.allclose(a[0], b[0], atol=1e-4)
                                    for a, b in zip(out.molecules, like[:n])):
        raise SystemExit("the semantic_x0 run's molecules differ from the run it scores")
    return out


def choose_molecule_x0_steps(sampler: MoleculeUncertaintyPipeline, val, val_q, args) -> list[int]:
    """semantic_x0's steps from the validation molecules (see the module docstring)."""
    grid = x0_grid(args.steps)
    sizes = val.n_atoms.astype(float)
    out = x0_call(sampler, len(val.molecules), VAL_SEED, grid, args, like=val.molecules)
    atom_st = val_q["atom_stable_fraction"]
    return choose_x0_steps(out.semantic_x0_per_step, None, grid, args.x0_draws,
                           criterion=lambda v: -partial_spearman(v, atom_st, sizes),
                           label="-partial rho(atom stable)")


def x0_table(sampler: MoleculeUncertaintyPipeline, res, semantic: np.ndarray,
             quality: dict[str, np.ndarray], steps: list[int], args) -> np.ndarray:
    """semantic_x0 against the full semantic score on the same first test molecules, paired;
    then its cost.  Returns the semantic_x0 scores."""
    n = len(semantic)
    x0 = x0_call(sampler, n, TEST_SEED, steps, args, like=res.molecules)
    values, se = x0.scores["semantic_x0"], x0.scores["semantic_x0_se"]
    sizes = res.n_atoms[:n].astype(float)
    atom_st, invalid = quality["atom_stable_fraction"][:n], quality["valid"][:n] < 0.5
    d_rho = bootstrap_interval(lambda a, b, q, z: partial_spearman(a, q, z) - partial_spearman(b, q, z),
                               values, semantic, atom_st, sizes, n_boot=args.boot)
    d_auroc = bootstrap_interval(lambda a, b, w: filtering.auroc(a, w) - filtering.auroc(b, w),
                                 values, semantic, invalid, n_boot=args.boot)
    fmt = lambda e, lo, hi: f"{e:+.3f} [{lo:+.3f}, {hi:+.3f}]"  # noqa: E731
    print(f"\nsemantic_x0 (M = {args.x0_draws}, steps {steps}, chosen on validation) on the same "
          f"{n} test molecules ({x0.seconds:.0f} s), bootstrap 95% intervals")
    print("| score | rho(size) | rho(atom st) raw | rho(atom st) partial | AUROC(invalid) |")
    print("|---|---|---|---|---|")
    print(f"| semantic_x0 | {ci(spearman, values, sizes, boot=args.boot)} "
          f"| {ci(spearman, values, atom_st, boot=args.boot)} "
          f"| {ci(partial_spearman, values, atom_st, sizes, boot=args.boot)} "
          f"| {ci(filtering.auroc, values, invalid, boot=args.boot)} |")
    print("\n| semantic_x0 - semantic: Delta partial rho(atom st) | Delta AUROC(invalid) | Spearman "
          "with semantic | median jackknife SE | SD across molecules |")
    print("|---|---|---:|---:|---:|")
    print(f"| {fmt(*d_rho)} | {fmt(*d_auroc)} | {spearman(values, semantic):.3f} "
          f"| {np.median(se):.4f} | {values.std():.4f} |")
    if args.x0_cost_n > 0:
        m = args.x0_cost_n
        start = time.perf_counter()
        sampler(m, num_inference_steps=args.steps, sampler=args.sampler, seed=TEST_SEED + 1,
                num_draws=0, scores=("random",), progress=False)
        plain = time.perf_counter() - start
        start = time.perf_counter()
        x0_call(sampler, m, TEST_SEED + 1, steps, args, cache=False)
        scored = time.perf_counter() - start
        print(f"cost on {m} molecules, one run each: plain {plain:.1f} s, semantic_x0 {scored:.1f} s "
              f"({scored / plain:.2f}x)")
    return np.asarray(values)


def cost_table(sampler: MoleculeUncertaintyPipeline, args: argparse.Namespace) -> None:
    n = args.cost_n
    common = dict(num_inference_steps=args.steps, sampler=args.sampler, seed=TEST_SEED + 1,
                  progress=False)
    rows = []
    for label, kwargs in (("plain generation", dict(scores=("random",), num_draws=0)),
                          ("variability, exact", dict(scores=("variability",), num_draws=0)),
                          (f"variability, Monte Carlo M = {args.draws}",
                           dict(scores=("variability",), num_draws=args.draws, variance="monte_carlo"))):
        tic = time.perf_counter()
        res = sampler(n, **kwargs, **common)
        rows.append((label, time.perf_counter() - tic, res))
    exact = rows[1][2].scores["variability"]
    print(f"\ncost on {n} molecules, {args.steps} steps, one run:")
    print("| method | seconds | x plain | Spearman vs exact |")
    print("|---|---:|---:|---:|")
    for label, seconds, res in rows:
        rho = "" if label == "plain generation" else f"{spearman(res.scores['variability'], exact):.3f}"
        print(f"| {label} | {seconds:.1f} | {seconds / rows[0][1]:.2f} | {rho} |")


if __name__ == "__main__":
    main()
