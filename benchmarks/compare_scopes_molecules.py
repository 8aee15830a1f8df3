"""Head posterior vs block posterior on the *same* test molecules, paired.

``eval_molecules.py`` saves each run's per-molecule test scores and labels under its ``--out``
(``test_s<seed>_n<n>_t<steps>.npz``); the generated molecules do not depend on the posterior
(same streams), which is checked through the atom counts and labels.  This prints, for each score
both runs have, Spearman with the atom count, the partial Spearman with atom stability (atom count
controlled) and AUROC(invalid), under both posteriors with the paired bootstrap interval of the
difference block - head, and the test runs' wall time.

Usage:  python benchmarks/compare_scopes_molecules.py --head outputs/eval_molecules_head
            --tail outputs/eval_molecules_tail [--n-test 250] [--steps 250]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from protocol import TEST_SEED  # benchmarks/protocol.py

from genunc import filtering
from genunc.metrics.stats import bootstrap_interval, partial_spearman, spearman

SCORES = ("variability", "semantic")


def _cell(interval: tuple[float, float, float]) -> str:
    est, low, high = interval
    return f"{est:+.3f} [{low:+.3f}, {high:+.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--head", type=Path, required=True)
    parser.add_argument("--tail", type=Path, required=True)
    parser.add_argument("--n-test", type=int, default=250)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--boot", type=int, default=1000)
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
            print(f"| {score} (n = {len(rows)}) | {label} | {_cell(cells[0])} | {_cell(cells[1])} "
                  f"| {_cell(diff)} |")
        print(f"| {score} | Spearman(head, block) | | | {spearman(h[rows], b[rows]):+.3f} |")
    print(f"\ntest run wall time (generation + variability, {len(sizes)} molecules): head "
          f"{float(head['seconds']):.0f} s, block {float(tail['seconds']):.0f} s")


if __name__ == "__main__":
    main()
