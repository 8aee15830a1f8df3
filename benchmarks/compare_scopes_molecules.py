"""Head posterior vs block posterior on the *same* test molecules, paired.

``eval_molecules.py`` saves each run's per-molecule test scores and labels under its ``--out``
(``test_s<seed>_n<n>_t<steps>.npz``); the generated molecules do not depend on the posterior
(same streams), which is checked through the atom counts and labels.  This prints, for each score
both runs have, Spearman with the atom count, the partial Spearman with atom stability (atom count
controlled) and AUROC(invalid), under both posteriors with the paired bootstrap interval of the
difference block - head, and the test runs' wall time.

Usage:  python benchmarks/compare_scopes_molecules.py --head outputs/eval_molecules_head
            --tail outputs/eval_molecules_tail [--n-test 250] [--steps 250] [--cost-n 16]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from protocol import TEST_SEED  # benchmarks/protocol.py

from genunc import filtering
from genunc.metrics.stats import bootstrap_interval, partial_spearman, spearman
from genunc.zoo.shipped import QM9_DIR

SCORES = ("variability", "semantic")


def _cell(interval: tuple[float, float, float], signed: bool = True) -> str:
    est, low, high = interval
    if not signed:
        return f"{est:.3f} [{low:.3f}, {high:.3f}]"
    return f"{est:+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--head", type=Path, required=True)
    parser.add_argument("--tail", type=Path, required=True)
    parser.add_argument("--n-test", type=int, default=250)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--boot", type=int, default=1000)
    parser.add_argument("--cost-n", type=int, default=0, help="molecules for a cost table (0: skip)")
    parser.add_argument("--draws", type=int, default=5, help="M for the cost table")
    parser.add_argument("--tail-blocks", type=int, default=1, help="the block run's --tail")
    parser.add_argument("--n-fit", type=int, default=2000, help="the runs' --n-fit")
    args = parser.parse_args()
    name = f"test_s{TEST_SEED}_n{args.n_test}_t{args.steps}.npz"
    head, tail = (dict(np.load(folder / name)) for folder in (args.head, args.tail))
    for key in ("n_atoms", "atom_stable_fraction", "valid"):
        if not np.array_equal(head[key], tail[key]):
            raise SystemExit(f"the two runs' {key} differ: not the same molecules")
    sizes = head["n_atoms"].astype(float)
    atom_st, invalid = head["atom_stable_fraction"], head["valid"] < 0.5
    print(f"{len(sizes)} test molecules (seed {TEST_SEED}, {args.steps} steps), the same in both "
          f"runs (checked); {invalid.mean():.1%} invalid; {args.boot} paired resamples")
    stats = (("rho(size)", lambda v, i: spearman(v[i], sizes[i])),
             ("rho(atom st) partial", lambda v, i: partial_spearman(v[i], atom_st[i], sizes[i])),
             ("AUROC(invalid)", lambda v, i: filtering.auroc(v[i], invalid[i])))
    print("| score | statistic | head posterior | block posterior | block - head |")
    print("|---|---|---|---|---|")
    for score in SCORES:
        key = f"score/{score}"
        if key not in head or key not in tail:
            continue
        h, b = head[key], tail[key]
        rows = np.arange(min(len(h), len(b)))  # the semantic score covers the first molecules
        for label, stat in stats:
            cells = [bootstrap_interval(lambda i, f=stat, v=v: f(v, i), rows, n_boot=args.boot)
                     for v in (h, b)]
            diff = bootstrap_interval(lambda i, f=stat, h=h, b=b: f(b, i) - f(h, i), rows,
                                      n_boot=args.boot)
            signed = label != "AUROC(invalid)"
            print(f"| {score} (n = {len(rows)}) | {label} | {_cell(cells[0], signed)} "
                  f"| {_cell(cells[1], signed)} "
                  f"| {_cell(diff)} |")
        print(f"| {score} | Spearman(head, block) | | | {spearman(h[rows], b[rows]):+.3f} |")
    print(f"\ntest run wall time (generation + variability, {len(sizes)} molecules): head "
          f"{float(head['seconds']):.0f} s, block {float(tail['seconds']):.0f} s")
    if args.cost_n > 0:
        cost_table(args)


def cost_table(args: argparse.Namespace) -> None:
    """Back-to-back timings in one process on the first `cost_n` test molecules: plain
    generation, variability (head: exact; block: Monte Carlo over --draws draws) and the semantic
    score under each posterior (the cached fits of the two eval_molecules runs)."""
    from eval_molecules import load_sampler  # benchmarks/eval_molecules.py

    from genunc.data.qm9 import edm_split, load_qm9

    data = load_qm9(progress=False)
    train = data.subset(edm_split(len(data))["train"])
    pipes = {"head": load_sampler(Path(QM9_DIR), args.head, train, args.n_fit),
             "block": load_sampler(Path(QM9_DIR), args.tail, train, args.n_fit, tail=args.tail_blocks)}
    common = dict(num_inference_steps=args.steps, seed=TEST_SEED, progress=False)
    calls = [("plain generation", "head", dict(scores=("random",), num_draws=0)),
             ("variability, head (exact)", "head", dict(scores=("variability",), num_draws=0)),
             (f"variability, block (Monte Carlo, M = {args.draws})", "block",
              dict(scores=("variability",), num_draws=args.draws, variance="monte_carlo")),
             (f"semantic, head (M = {args.draws})", "head",
              dict(scores=("semantic",), num_draws=args.draws)),
             (f"semantic, block (M = {args.draws})", "block",
              dict(scores=("semantic",), num_draws=args.draws))]
    for pipe in pipes.values():  # warm-up: first calls pay for allocations and caches
        pipe(2, num_inference_steps=5, seed=TEST_SEED, progress=False, scores=("semantic",),
             num_draws=2)
    rows = []
    for label, scope, kwargs in calls:
        tic = time.perf_counter()
        pipes[scope](args.cost_n, **kwargs, **common)
        rows.append((label, time.perf_counter() - tic))
    print(f"\ncost on {args.cost_n} molecules, {args.steps} steps, back to back in one process "
          "after a warm-up")
    print("| method | seconds | x plain |")
    print("|---|---:|---:|")
    for label, seconds in rows:
        print(f"| {label} | {seconds:.1f} | {seconds / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
